"""The site's identity key: an Ed25519 key pair whose private half never leaves the site.

The public half goes into the federation roster (``fedseal-server roster
add --identity-key HEX``), which the roster authority signs
(:mod:`common.roster`); with it a site signs what it says in the secure
aggregation protocol, so that its neighbours (and not the coordinator's word)
decide which node is which site.

The key lives in the site's private state directory (:mod:`client.state`)
as ``identity.key``: the 32-byte Ed25519 private seed (RFC 8032 §5.1.5),
mode 0600, created once (``fedseal-client identity init``) and never
overwritten. It is used only if it is this user's regular file with no
group or other permissions: a **planted identity key** (written by someone
else) would let its author sign as the site, and a readable one may have
been copied.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.state import IDENTITY_FILE, create_private_file, private_dir, read_private_file
from common.errors import ConfigurationError

SEED_BYTES = 32

__all__ = ["create_site_identity", "identity_public_bytes", "load_site_identity"]


def identity_public_bytes(key: Ed25519PrivateKey) -> bytes:
    """The 32 raw public-key bytes of an identity key (what the roster lists)."""
    return key.public_key().public_bytes_raw()


def create_site_identity(directory: Path) -> bytes:
    """Make this site's identity key in ``directory`` (0600); return its 32 public bytes.

    Raises
    ------
    ConfigurationError
        The directory is not private (:func:`client.state.private_dir`), or
        an identity key exists there already (it is never replaced: the
        roster names its public half).
    """
    directory = private_dir(Path(directory))
    path = directory / IDENTITY_FILE
    key = Ed25519PrivateKey.generate()
    if not create_private_file(path, key.private_bytes_raw()):
        raise ConfigurationError(
            f"a site identity key exists already in {directory}; refusing to replace it "
            "(the roster names its public key; `fedseal-client identity show` prints it)"
        )
    return identity_public_bytes(key)


def load_site_identity(directory: Path) -> Ed25519PrivateKey:
    """This site's identity key from ``directory`` (cached per process while the file is unchanged).

    Raises
    ------
    ConfigurationError
        There is none (``run `fedseal-client identity init```), the directory
        or the file is not private to this user, or the file is not 32 bytes.
    """
    directory = Path(directory)
    path = directory / IDENTITY_FILE
    if not directory.is_dir() or not path.exists():
        raise ConfigurationError(
            f"no site identity key in {directory}: run `fedseal-client identity init`"
        )
    private_dir(directory)
    try:
        info = os.stat(path, follow_symlinks=False)
    except OSError as exc:
        raise ConfigurationError(f"cannot read site identity key {path}: {exc.strerror}") from None
    return _load(str(path), info.st_mtime_ns, info.st_ino, info.st_mode, info.st_uid)


@functools.lru_cache(maxsize=64)
def _load(path: str, mtime_ns: int, inode: int, mode: int, uid: int) -> Ed25519PrivateKey:
    # The stat values are part of the key: a replaced, re-owned or re-permissioned file is read again.
    seed = read_private_file(Path(path), "site identity key", SEED_BYTES + 1)
    if len(seed) != SEED_BYTES:
        raise ConfigurationError(
            f"site identity key {path} is corrupt: expected {SEED_BYTES} bytes"
        )
    return Ed25519PrivateKey.from_private_bytes(seed)
