"""``--db`` checked before anything launches (server.preflight)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.errors import ConfigurationError
from server.preflight import check_record_db, sqlite_path


def test_sqlite_path_reads_paths_and_sqlite_urls_only() -> None:
    assert sqlite_path("sqlite:////abs/r.db?mode=rwc") == Path("/abs/r.db")
    assert sqlite_path("sqlite:///rel/r.db") == Path("rel/r.db")
    assert sqlite_path("plain/r.db") == Path("plain/r.db")
    assert sqlite_path("sqlite://") is None and sqlite_path("sqlite:///:memory:") is None
    assert sqlite_path("postgresql+psycopg://u@h/db") is None


def test_db_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="is a directory"):
        check_record_db(str(tmp_path))


def test_db_with_a_missing_parent_is_refused_unless_the_launch_makes_it(tmp_path: Path) -> None:
    db = tmp_path / "srv" / "record.db"
    with pytest.raises(ConfigurationError, match=f"directory {db.parent} does not exist"):
        check_record_db(str(db))
    check_record_db(str(db), state_dir=tmp_path / "srv")  # the state dir: made by the launch
    with pytest.raises(ConfigurationError, match="does not exist"):
        check_record_db(f"sqlite:///{tmp_path / 'a' / 'b' / 'r.db'}", state_dir=tmp_path / "a")


def test_resume_needs_the_record_to_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist; give the run's record"):
        check_record_db(str(tmp_path / "r.db"), must_exist=True)
    (tmp_path / "r.db").write_bytes(b"")
    check_record_db(str(tmp_path / "r.db"), must_exist=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_db_in_a_read_only_directory_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigurationError, match="is not writable"):
        check_record_db(str(locked / "r.db"))


def test_other_databases_are_left_to_the_record() -> None:
    check_record_db("postgresql://nobody@127.0.0.1:1/none")
    check_record_db(None)
