"""The record's database: where it is, its engine, its schema check, and its transactions.

:func:`locate` reads a URL (a bare path means a SQLite file; ``postgresql://``
means psycopg 3) without touching the database. :class:`Database` opens it:
the engine (SQLite through :func:`common.sqlite.sqlite_engine`, so every
transaction begins with ``BEGIN IMMEDIATE`` and foreign keys are enforced),
then the schema, which is created only when asked and refused when it is not
a fedseal record or is newer than this code (:mod:`server.record.schema`).
Work runs through :meth:`Database.write` (one transaction, committed whole or
not at all, retried only on lock contention) and :meth:`Database.read`;
either way a database failure surfaces as :class:`~common.errors.RecordError`.
"""

from __future__ import annotations

import time as _time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from sqlalchemy import inspect
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import (
    ArgumentError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlmodel import Session, SQLModel, create_engine, select

from common.errors import ConfigurationError, RecordError
from common.sqlite import sqlite_engine
from server.record.schema import (
    META_AUDIT_LOCK,
    META_CREATED,
    META_RECORD_ID,
    META_SCHEMA_VERSION,
    RECORD_TABLE_NAMES,
    SCHEMA_VERSION,
    SchemaMeta,
)
from server.record.values import utc_now

__all__ = ["WRITE_ATTEMPTS", "Database", "Location", "locate", "normalise_url"]

T = TypeVar("T")
WRITE_ATTEMPTS = 8
"""How many times :meth:`Database.write` runs a transaction that met lock contention."""
SQLITE_BUSY_TIMEOUT_S = 30.0


def normalise_url(url: str) -> str:
    """A SQLAlchemy URL from ``url``: a bare path means a SQLite file; ``postgresql://`` uses psycopg 3."""
    text = str(url).strip()
    if not text:
        raise ConfigurationError("empty database URL")
    if "://" not in text:
        return f"sqlite:///{Path(text).expanduser().resolve()}"
    for prefix in ("postgresql://", "postgres://"):
        if text.startswith(prefix):
            return "postgresql+psycopg://" + text[len(prefix) :]
    return text


@dataclass(frozen=True, slots=True)
class Location:
    """Where a record database is: its SQLAlchemy URL and, for SQLite, its file or memory."""

    url: str
    sqlite: bool
    memory: bool
    file: Path | None


def locate(url: str, *, create: bool) -> Location:
    """Read a record URL (:func:`normalise_url`) without opening the database.

    Parameters
    ----------
    url
        A SQLAlchemy URL or a bare SQLite file path.
    create
        Whether a missing SQLite file may be created later; if not, its
        absence is refused here, before anything could create it.

    Raises
    ------
    RecordError
        If ``url`` is not a database URL, or (``create=False``) names a SQLite
        file that does not exist.
    """
    normal = normalise_url(url)
    try:
        parsed = make_url(normal)
    except ArgumentError:
        raise RecordError(f"not a database URL: {url!r}") from None
    sqlite = parsed.get_backend_name() == "sqlite"
    memory = parsed.database in (None, "", ":memory:")
    db_file: Path | None = None
    if sqlite and not memory:
        db_file = Path(str(parsed.database))
        if not create and not db_file.is_file():
            raise RecordError(f"no record database at {db_file}")
    return Location(normal, sqlite, memory, db_file)


def _make_engine(where: Location) -> Engine:
    try:
        if where.sqlite:
            # check_same_thread off: the pool hands a connection to one thread at a
            # time, and an in-memory record's single connection is shared by all.
            return sqlite_engine(
                where.url,
                timeout_s=SQLITE_BUSY_TIMEOUT_S,
                foreign_keys=True,
                check_same_thread=False,
            )
        return create_engine(where.url)
    except NoSuchModuleError:
        raise RecordError(
            f"no SQLAlchemy driver for {where.url.split('://')[0]!r}; for PostgreSQL "
            "install fedseal[postgres] (psycopg)"
        ) from None
    except (ArgumentError, ConfigurationError, ImportError) as exc:
        raise RecordError(f"cannot use database URL: {exc}") from None


class Database:
    """An open record database: its engine, its record id, and transactions on it.

    Parameters
    ----------
    where
        From :func:`locate`.
    create
        Create the schema if the database has none (``False``: refuse it).

    Raises
    ------
    RecordError
        Missing driver, unreachable server, a database that holds no record
        (with ``create=False``), one that is not a fedseal record, or one
        whose schema version is newer than this code's.
    """

    def __init__(self, where: Location, *, create: bool) -> None:
        self.engine = _make_engine(where)
        try:
            self.record_id = self._open_schema(create)
        except BaseException:
            self.engine.dispose()
            raise

    def _open_schema(self, create: bool) -> str:
        try:
            tables = set(inspect(self.engine).get_table_names())
        except OperationalError as exc:
            raise RecordError(f"cannot open the record database: {exc.orig}") from None
        except SQLAlchemyError as exc:
            raise RecordError(f"cannot open the record database: {exc}") from None
        ours = set(RECORD_TABLE_NAMES)
        if "schema_meta" not in tables:
            if tables & ours:
                raise RecordError("the database has fedseal tables but no schema_meta; refusing it")
            if not create:
                raise RecordError("the database holds no fedseal record (no schema_meta table)")
            self._create_schema()
        meta = self._meta()
        raw_version = meta.get(META_SCHEMA_VERSION)
        try:
            version = int(raw_version) if raw_version is not None else None
        except ValueError:
            version = None
        if version is None:
            raise RecordError("the record's schema_meta has no valid schema version")
        if version > SCHEMA_VERSION:
            raise RecordError(
                f"the record's schema version {version} is newer than this fedseal "
                f"supports ({SCHEMA_VERSION}); upgrade fedseal to open it"
            )
        if version < SCHEMA_VERSION:
            raise RecordError(
                f"the record's schema version {version} has no migration to {SCHEMA_VERSION}"
            )
        record_id = meta.get(META_RECORD_ID)
        if not record_id:
            raise RecordError("the record's schema_meta has no record id")
        return record_id

    def _create_schema(self) -> None:
        try:
            SQLModel.metadata.create_all(
                self.engine,
                tables=[SQLModel.metadata.tables[name] for name in RECORD_TABLE_NAMES],
            )
            with Session(self.engine) as session, session.begin():
                if session.get(SchemaMeta, META_SCHEMA_VERSION) is None:
                    for key, value in (
                        (META_SCHEMA_VERSION, str(SCHEMA_VERSION)),
                        (META_RECORD_ID, uuid.uuid4().hex),
                        (META_CREATED, utc_now()),
                        (META_AUDIT_LOCK, "0"),
                    ):
                        session.add(SchemaMeta(key=key, value=value))
        except SAIntegrityError:
            return  # another process created it at the same moment; read theirs
        except SQLAlchemyError as exc:
            raise RecordError(f"cannot create the record schema: {exc}") from None

    def _meta(self) -> dict[str, str]:
        with Session(self.engine) as session:
            return {m.key: m.value for m in session.exec(select(SchemaMeta)).all()}

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()

    def write(self, work: Callable[[Session], T]) -> T:
        """Run ``work`` in one transaction, retrying only on lock contention.

        Parameters
        ----------
        work
            Called with the transaction's session; what it adds or changes
            commits when it returns, and nothing does if it raises.

        Returns
        -------
        T
            What ``work`` returned.

        Raises
        ------
        RecordError
            If the database refuses the write (a constraint, a lock still held
            after :data:`WRITE_ATTEMPTS` attempts, any other database error).
            Exceptions raised by ``work`` itself propagate unchanged.
        """
        for attempt in range(WRITE_ATTEMPTS):
            try:
                with Session(self.engine, expire_on_commit=False) as session, session.begin():
                    return work(session)
            except OperationalError as exc:
                text = str(exc.orig).lower()
                retry = "locked" in text or "deadlock" in text or "could not serialize" in text
                if not retry or attempt == WRITE_ATTEMPTS - 1:
                    raise RecordError(f"record write failed: {exc.orig}") from None
                _time.sleep(0.05 * (attempt + 1))
            except SAIntegrityError as exc:
                raise RecordError(f"record write refused by a constraint: {exc.orig}") from None
            except SQLAlchemyError as exc:
                raise RecordError(f"record write failed: {exc}") from None
        raise RecordError("record write failed")

    def read(self, work: Callable[[Session], T]) -> T:
        """Run ``work`` in a session that writes nothing and return its result.

        Raises
        ------
        RecordError
            On any database error (exceptions raised by ``work`` propagate).
        """
        try:
            with Session(self.engine, expire_on_commit=False) as session:
                return work(session)
        except SQLAlchemyError as exc:
            raise RecordError(f"record read failed: {exc}") from None
