"""One SQLAlchemy engine recipe for fedseal's SQLite databases (the record, the site ledger).

Guarantee
---------
An engine from :func:`sqlite_engine` starts every transaction with ``BEGIN
IMMEDIATE``: SQLite's write lock is taken when the transaction begins, not at
its first write. A transaction that reads and then writes (read the audit
head and link the next event to it; sum a privacy history and reserve the
next round against a budget) therefore runs alone among writers: no other
connection can commit between its read and its write, so the check it made
still holds when it writes. Other connections wait for the lock up to
``timeout_s`` (SQLite's busy timeout) instead of failing at once.

To make that so, the driver's own transaction handling is switched off
(pysqlite would otherwise issue a deferred ``BEGIN`` lazily, before the first
write, or not at all before a read); SQLAlchemy's ``begin`` event issues the
``BEGIN IMMEDIATE`` instead.

The pragmas are per connection in SQLite, so they are applied to every new
DBAPI connection, each only when asked for (``None`` leaves SQLite's
default or the file's current setting):

``foreign_keys``
    SQLite ignores ``FOREIGN KEY`` constraints unless this is on for the
    connection; on, a row that names a missing parent is refused.
``journal_mode``
    How commits are made atomic: ``DELETE`` (SQLite's default rollback
    journal) or ``WAL`` (write-ahead log: readers are not blocked by a
    writer; the mode is stored in the file), among others.
``synchronous``
    How hard SQLite waits for the disk: ``FULL`` syncs at every commit so a
    committed transaction survives a power cut, ``NORMAL`` (with WAL) may
    lose the last commits but never corrupts the file, ``OFF`` trusts the OS.

A memory URL (``sqlite://`` or ``sqlite:///:memory:``) gets a single shared
connection (:class:`~sqlalchemy.pool.StaticPool`): every session of the
engine then sees the same database, which lives as long as the engine.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import StaticPool

from common.errors import ConfigurationError

__all__ = [
    "JOURNAL_MODES",
    "SYNCHRONOUS_LEVELS",
    "is_memory_url",
    "sqlite_engine",
]

JOURNAL_MODES = ("DELETE", "TRUNCATE", "PERSIST", "MEMORY", "WAL", "OFF")
"""The values SQLite accepts for ``PRAGMA journal_mode``."""

SYNCHRONOUS_LEVELS = ("OFF", "NORMAL", "FULL", "EXTRA")
"""The values SQLite accepts for ``PRAGMA synchronous``."""


def is_memory_url(url: str) -> bool:
    """Whether a SQLite URL names an in-memory database rather than a file.

    Parameters
    ----------
    url
        A SQLAlchemy URL such as ``sqlite:///path/to/file.db`` or ``sqlite://``.

    Returns
    -------
    bool
        ``True`` for ``sqlite://`` and ``sqlite:///:memory:``.

    Raises
    ------
    ConfigurationError
        If ``url`` is not a SQLAlchemy URL.
    """
    try:
        database = make_url(url).database
    except ArgumentError:
        raise ConfigurationError(f"not a database URL: {url!r}") from None
    return database in (None, "", ":memory:")


def _pragmas(
    foreign_keys: bool | None, journal_mode: str | None, synchronous: str | None
) -> list[str]:
    statements: list[str] = []
    if foreign_keys is not None:
        statements.append(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
    if journal_mode is not None:
        mode = journal_mode.upper()
        if mode not in JOURNAL_MODES:
            raise ConfigurationError(
                f"journal_mode must be one of {JOURNAL_MODES}, got {journal_mode!r}"
            )
        statements.append(f"PRAGMA journal_mode={mode}")
    if synchronous is not None:
        level = synchronous.upper()
        if level not in SYNCHRONOUS_LEVELS:
            raise ConfigurationError(
                f"synchronous must be one of {SYNCHRONOUS_LEVELS}, got {synchronous!r}"
            )
        statements.append(f"PRAGMA synchronous={level}")
    return statements


def sqlite_engine(
    url: str,
    *,
    timeout_s: float = 30.0,
    foreign_keys: bool | None = None,
    journal_mode: str | None = None,
    synchronous: str | None = None,
    check_same_thread: bool = True,
) -> Engine:
    """A SQLAlchemy engine for a SQLite file or memory URL whose transactions begin immediately.

    Parameters
    ----------
    url
        ``sqlite:///<path>`` for a file, ``sqlite://`` or ``sqlite:///:memory:``
        for a database in memory (one shared connection, see the module text).
    timeout_s
        How long a connection waits for another's write lock before the
        statement fails with "database is locked".
    foreign_keys
        ``PRAGMA foreign_keys`` for every connection; ``None`` leaves SQLite's
        default (off).
    journal_mode
        ``PRAGMA journal_mode`` (one of :data:`JOURNAL_MODES`); ``None`` leaves
        the file's current mode.
    synchronous
        ``PRAGMA synchronous`` (one of :data:`SYNCHRONOUS_LEVELS`); ``None``
        leaves SQLite's default.
    check_same_thread
        pysqlite's guard against using a connection from a thread other than
        the one that opened it; pass ``False`` when the engine is shared by
        threads (its pool hands each connection to one user at a time).

    Returns
    -------
    Engine
        The engine; nothing is opened until its first connection.

    Raises
    ------
    ConfigurationError
        If ``url`` is not a SQLite URL or a pragma value is not one SQLite knows.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigurationError(f"not a database URL: {url!r}") from None
    if parsed.get_backend_name() != "sqlite":
        raise ConfigurationError(f"not a SQLite URL: {url!r}")
    statements = _pragmas(foreign_keys, journal_mode, synchronous)
    kwargs: dict[str, Any] = {
        "connect_args": {"timeout": timeout_s, "check_same_thread": check_same_thread}
    }
    if is_memory_url(url):
        kwargs["poolclass"] = StaticPool
    engine = create_engine(url, **kwargs)

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the "begin" listener issues BEGIN
        cursor = dbapi_connection.cursor()
        try:
            for statement in statements:
                cursor.execute(statement)
        finally:
            cursor.close()

    def on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    event.listen(engine, "connect", on_connect)
    event.listen(engine, "begin", on_begin)
    return engine
