"""The record contract suite's backend fixture: SQLite file, and PostgreSQL when available.

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


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def record_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL for an empty record database on each backend."""
    if request.param == "sqlite":
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
