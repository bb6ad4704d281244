"""Where a site keeps its own state: ledger, witnessed audit heads, the state-sealing key,
the site's identity key (:mod:`client.identity`), and (deployed sites) the copies of the
site policy and the roster in force.

Resolution of the site's state directory, first match wins:

1. ``state-dir`` in the SuperNode's node config (``fedseal-client start``);
2. the simulation's site root (``<out>/sites/site-<partition-id>``);
3. ``$FLWR_HOME/fedseal-sites/site-<partition-id or node id>`` (e.g. ``flwr run .``).

There is no fourth choice: without any of them the site refuses to run
rather than keep its state in the shared temporary directory, where another
local user (or a process of the coordinator's on the same host) could
read the ledger, plant a state key or replace the witnessed heads.

The state directory is private: created mode 0700 (the umask cannot widen
it), and an existing one that group or others can access, or that belongs
to another user, is refused with a one-line reason. The ledger and the
witness file live inside it and are covered by it.

The state key (32 random bytes, file mode 0600) seals per-round secure
aggregation secrets while they wait in Flower's node context between
messages; it never leaves the site. An existing key file is used only if
it is a regular file owned by this user with no group/other permissions:
a **planted state key** (one written by someone else, or readable by them)
would let its author decrypt the sealed secrets.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from common.audit.witness import WITNESS_FILE as WITNESS_FILE
from common.errors import ConfigurationError
from common.rng import secure_bytes

STATE_KEY_FILE = "state.key"
LEDGER_FILE = "ledger.db"
DATA_CACHE_DIR = "data-cache"  # the site file parsed once (common.data_cache), memory-mapped
WITNESS_INDEX_FILE = "witnessed-heads.index.json"
SEQUENCE_FILE = "instruction-seq.json"
LOCK_FILE = "site.lock"
POLICY_FILE = "policy.toml"  # the site policy `fedseal-client start` put in force
IDENTITY_FILE = "identity.key"  # the site's Ed25519 identity key (client.identity)
ROSTER_FILE = "roster.json"  # the roster `fedseal-client start --roster` put in force
ROSTER_VERSION_FILE = "roster-version.json"  # the newest roster version this site accepted
KEY_BYTES = 32
PRIVATE_DIR_MODE = 0o700

__all__ = [
    "KEY_BYTES",
    "DATA_CACHE_DIR",
    "LEDGER_FILE",
    "STATE_KEY_FILE",
    "WITNESS_FILE",
    "private_dir",
    "site_dir",
    "state_key",
]


def _refuse_shared(path: Path, info: os.stat_result, what: str, fix: str) -> None:
    """Raise if ``info`` shows ``path`` is another user's, or open to group or others."""
    if os.name != "posix":
        return
    if info.st_uid != os.getuid():
        raise ConfigurationError(
            f"{what} {path} is owned by uid {info.st_uid}, not by this user (uid {os.getuid()}); "
            "refusing to use it"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigurationError(
            f"{what} {path} is accessible by group or others (mode {mode:04o}); {fix}"
        )


def private_dir(path: Path) -> Path:
    """Create ``path`` mode 0700 (parents as usual) or check that an existing one is private.

    Defends against a **shared state directory**: one that another local
    user can list or write lets them read the ledger and witnessed heads, or
    plant files (a state key, a forged witness file) for the site to trust.

    Raises
    ------
    ConfigurationError
        If ``path`` is not a directory, belongs to another user, or is
        accessible by group or others.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, PRIVATE_DIR_MODE)
    except FileExistsError:
        pass
    else:
        os.chmod(path, PRIVATE_DIR_MODE)  # the umask may have narrowed it; never wider than 0700
    try:
        info = os.stat(path)  # a link is judged by what it points to
    except OSError as exc:
        raise ConfigurationError(
            f"cannot use site state directory {path}: {exc.strerror}"
        ) from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigurationError(f"site state directory {path} is not a directory")
    _refuse_shared(path, info, "site state directory", f"run chmod 700 {path}")
    return path


def site_dir(node_config: Mapping[str, Any], node_id: int, site_root: Path | None) -> Path:
    """The private state directory of the site running this ClientApp (created 0700 if missing).

    Raises
    ------
    ConfigurationError
        If none of ``state-dir``, a site root or ``FLWR_HOME`` says where the
        state goes (the shared temporary directory is never used), or the
        directory is not private (:func:`private_dir`).
    """
    if node_config.get("state-dir"):
        path = Path(str(node_config["state-dir"]))
    else:
        label = (
            f"site-{node_config['partition-id']}"
            if "partition-id" in node_config
            else f"node-{node_id}"
        )
        if site_root is not None:
            path = site_root / label
        else:
            home = os.environ.get("FLWR_HOME")
            if not home:
                raise ConfigurationError(
                    "no private place for this site's state: set --state-dir "
                    "(fedseal-client start) or FLWR_HOME"
                )
            path = Path(home) / "fedseal-sites" / label
    return private_dir(path)


def read_private_file(path: Path, what: str, limit: int) -> bytes:
    """Up to ``limit`` bytes of an existing file, refused unless it is this user's private regular file.

    Used for the site's secret files (``state.key``, ``identity.key``): a
    file that is a link, another user's, or readable by group or others may
    have been planted, or copied by someone else.

    Raises
    ------
    ConfigurationError
        The file cannot be opened, is not a regular file, or is not private.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what} {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigurationError(f"{what} {path} is not a regular file")
        _refuse_shared(path, info, what, f"it may have been planted; remove {path}")
        return fh.read(limit)


def create_private_file(path: Path, data: bytes, *, sync: bool = True) -> bool:
    """Write ``data`` to a new file ``path`` (mode 0600, never a link); False if it exists.

    The file is created exclusively (``O_EXCL``), so an existing file is
    never overwritten, and (unless ``sync`` is False) synced before this returns.
    """
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600
        )
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        if sync:
            os.fsync(fh.fileno())
    return True


def state_key(directory: Path) -> bytes:
    """This site's state-sealing key, created on first use (0600, never overwritten).

    Defends against a **planted state key**: an existing ``state.key`` is
    used only if it is a regular file (not a link) owned by this user with
    no group or other permissions.

    Raises
    ------
    ConfigurationError
        If the existing key file is refused, or is not 32 bytes.
    """
    path = directory / STATE_KEY_FILE
    key = secure_bytes(KEY_BYTES)
    if create_private_file(path, key):
        return key
    for _ in range(50):  # another process may be writing it right now
        key = read_private_file(path, "state key", KEY_BYTES + 1)
        if len(key) == KEY_BYTES:
            return key
        time.sleep(0.05)
    raise ConfigurationError(f"{path} is corrupt: expected {KEY_BYTES} bytes")


@contextlib.contextmanager
def site_lock(directory: Path) -> Iterator[None]:
    """Hold this site's state lock (an exclusive ``flock`` on ``site.lock``) for the block.

    Serialises the read-check-write of the site's small state files
    (instruction sequence numbers, the witness index) between ClientApp
    processes of the same site.
    """
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def replace_file(path: Path, data: bytes, *, mode: int | None = None, sync: bool = True) -> None:
    """Write ``path`` crash-safely: a synced temporary file renamed over it, then the directory synced.

    After a crash the file holds either its old or its new content, never a
    mix. ``mode`` (e.g. 0o444 for a frozen copy) is set before the rename;
    otherwise the file is 0600. ``sync=False`` skips both syncs: still whole
    after a process crash, but a power cut may bring back the old content
    (for state that only hardens a check another durable record already makes).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if not sync:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
