"""The record contract suite's backends: SQLite in memory, SQLite file, and PostgreSQL.

Every test that takes ``record_url`` (or ``record``, an open
:class:`~server.record.SqlRecord` on it) runs once per backend, in the
spirit of Flower's ``linkstate_test.py``: the same assertions must hold on
each. A test that opens the database a second time (another ``SqlRecord``
on the same URL, another process or thread) is marked ``durable`` and skips
the in-memory backend, whose database lives only as long as its engine.

PostgreSQL: set ``FEDSEAL_TEST_PG_URL`` (``bash .ci/postgres.sh ENV_FILE``
starts a throwaway server and writes it). Each test gets a fresh database on
that server, dropped afterwards. Without the variable the PostgreSQL cases
skip with a message, except under ``CI``, where they fail: CI must never pass
without having run them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from server.record import SqlRecord

PG_ENV = "FEDSEAL_TEST_PG_URL"


def _pg_unavailable(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so the PostgreSQL contract tests must run)")
    pytest.skip(message)


def _pg_database(base_url: str) -> Iterator[str]:
    try:
        import psycopg
    except ImportError:
        _pg_unavailable("psycopg is not installed: pip install 'fedseal[postgres]'")
        raise
    url = make_url(base_url)
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"fedseal_test_{uuid.uuid4().hex[:16]}"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        _pg_unavailable(f"cannot reach PostgreSQL at {PG_ENV}: {exc}")
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


MEMORY = "sqlite-memory"
BACKENDS = (
    pytest.param(MEMORY, id=MEMORY),
    pytest.param("sqlite-file", id="sqlite-file"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "durable: the test reopens the record database, so it skips SQLite in memory",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every test that uses ``record_url`` on each backend it can use."""
    if "record_url" not in metafunc.fixturenames:
        return
    durable = metafunc.definition.get_closest_marker("durable") is not None
    backends = [b for b in BACKENDS if not (durable and b.values[0] == MEMORY)]
    metafunc.parametrize("record_url", backends, indirect=True)


@pytest.fixture()
def record_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL for an empty record database on the backend the test is parametrised with."""
    if request.param == MEMORY:
        yield "sqlite://"
        return
    if request.param == "sqlite-file":
        yield f"sqlite:///{tmp_path / 'record.db'}"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        _pg_unavailable(
            f"{PG_ENV} is not set: no PostgreSQL server for the record contract tests "
            "(run `bash .ci/postgres.sh ENV_FILE` and source ENV_FILE)"
        )
        return
    yield from _pg_database(base)


@pytest.fixture()
def artifact_dir(tmp_path: Path) -> Path:
    return tmp_path / "artifacts"


@pytest.fixture()
def record(record_url: str, artifact_dir: Path) -> Iterator[SqlRecord]:
    """An open record on an empty database of each backend."""
    rec = SqlRecord(record_url, artifact_dir)
    yield rec
    rec.close()
