"""Checks ``fedseal-server start``/``resume`` make before any process is launched.

A coordinator that only finds out at the end of its first round that it
cannot write its central record has started a SuperLink, admitted sites and
spent their privacy budget for nothing; a bad ``--db`` is refused first, in
one line naming the path and the fix.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from common.errors import ConfigurationError

#: Free space a record needs to start (schema, first rounds' events, model versions).
MIN_FREE_BYTES = 4 * 1024**2


def sqlite_path(db: str) -> Path | None:
    """The file an SQLite ``--db`` (a path or ``sqlite:///PATH``) names; None for other URLs."""
    if "://" not in db:
        return Path(db)
    scheme, _, rest = db.partition("://")
    rest = rest.split("?", 1)[0]  # sqlite:///relative, sqlite:////absolute, then any options
    if scheme.split("+", 1)[0] != "sqlite" or rest in ("", "/", "/:memory:"):
        return None
    return Path(rest[1:] if rest.startswith("/") else rest)


def check_record_db(
    db: str | None, *, state_dir: Path | None = None, must_exist: bool = False
) -> None:
    """Refuse an SQLite ``--db`` that cannot be written: ConfigurationError, one line.

    SQLite writes its journal next to the database file, so the directory
    must be writable as well as the file. Other database URLs (PostgreSQL)
    are checked when the record connects. ``None`` (the default
    ``STATE_DIR/record.db``) is not checked here: the state directory is
    made by the launch itself.

    Parameters
    ----------
    db : str or None
        The ``--db`` option as given.
    state_dir : Path or None
        The launch's state directory: made by the launch itself, so a
        database directly in it may name it before it exists.
    must_exist : bool
        ``resume``: the run's record must already be there.
    """
    if db is None:
        return
    path = sqlite_path(db)
    if path is None:
        return
    path = path.resolve()
    parent = path.parent
    if path.is_dir():
        raise ConfigurationError(f"--db {path} is a directory; give the database file's path")
    if must_exist and not path.exists():
        raise ConfigurationError(f"--db {path} does not exist; give the run's record database")
    if not parent.exists() and state_dir is not None and parent == state_dir.resolve():
        parent = next(p for p in parent.parents if p.exists())  # where the launch creates it
    if not parent.is_dir():
        raise ConfigurationError(
            f"--db {path}: directory {parent} does not exist; create it or choose another path"
        )
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise ConfigurationError(f"--db {path} is not writable by this user; fix its permissions")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigurationError(
            f"--db {path}: directory {parent} is not writable by this user "
            "(SQLite writes its journal there); choose a writable location"
        )
    free = shutil.disk_usage(parent).free
    if free < MIN_FREE_BYTES:
        raise ConfigurationError(
            f"--db {path}: only {free // 1024} KiB free on its disk (the record and its model "
            f"versions need at least {MIN_FREE_BYTES // 1024**2} MiB to start); free some space"
        )
