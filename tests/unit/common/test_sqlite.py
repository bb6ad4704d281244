"""common.sqlite: pragmas per connection, BEGIN IMMEDIATE, one shared in-memory database."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from common.errors import ConfigurationError
from common.sqlite import is_memory_url, sqlite_engine


def _pragma(engine, name: str) -> object:
    with engine.connect() as conn:
        return conn.exec_driver_sql(f"PRAGMA {name}").scalar()


def test_sqlite_engine_applies_requested_pragmas_on_every_connection(tmp_path: Path) -> None:
    engine = sqlite_engine(
        f"sqlite:///{tmp_path / 'a.db'}",
        foreign_keys=True,
        journal_mode="wal",
        synchronous="normal",
    )
    try:
        for _ in range(2):  # a fresh DBAPI connection each time
            assert _pragma(engine, "foreign_keys") == 1
            assert _pragma(engine, "journal_mode") == "wal"
            assert _pragma(engine, "synchronous") == 1  # NORMAL
            engine.dispose()
    finally:
        engine.dispose()


def test_sqlite_engine_leaves_unrequested_pragmas_at_sqlite_defaults(tmp_path: Path) -> None:
    engine = sqlite_engine(f"sqlite:///{tmp_path / 'a.db'}")
    try:
        assert _pragma(engine, "foreign_keys") == 0
        assert _pragma(engine, "journal_mode") == "delete"
    finally:
        engine.dispose()


def test_sqlite_engine_transaction_takes_the_write_lock_when_it_begins(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    first, second = sqlite_engine(url), sqlite_engine(url, timeout_s=0.05)
    try:
        with first.begin() as conn:
            conn.execute(text("CREATE TABLE t (x INTEGER)"))
        with first.begin() as conn:
            conn.execute(text("SELECT count(*) FROM t")).scalar()  # a read only
            with pytest.raises(OperationalError, match="locked"), second.begin() as other:
                other.execute(text("SELECT count(*) FROM t"))
        with second.begin() as other:  # free again once the first has committed
            other.execute(text("INSERT INTO t VALUES (1)"))
    finally:
        first.dispose()
        second.dispose()


def test_sqlite_engine_memory_url_is_one_database_for_every_session() -> None:
    engine = sqlite_engine("sqlite://", check_same_thread=False)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (x INTEGER)"))
            conn.execute(text("INSERT INTO t VALUES (7)"))
        with engine.connect() as conn:
            assert conn.execute(text("SELECT x FROM t")).scalar() == 7
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("url", "memory"),
    [("sqlite://", True), ("sqlite:///:memory:", True), ("sqlite:///record.db", False)],
)
def test_is_memory_url(url: str, memory: bool) -> None:
    assert is_memory_url(url) is memory


@pytest.mark.parametrize(
    "kwargs",
    [{"journal_mode": "wal; DROP TABLE t"}, {"synchronous": "SOMETIMES"}],
)
def test_sqlite_engine_unknown_pragma_value_refused(kwargs: dict[str, str]) -> None:
    with pytest.raises(ConfigurationError):
        sqlite_engine("sqlite://", **kwargs)


def test_sqlite_engine_non_sqlite_url_refused() -> None:
    with pytest.raises(ConfigurationError, match="not a SQLite URL"):
        sqlite_engine("postgresql+psycopg://u@localhost/db")
