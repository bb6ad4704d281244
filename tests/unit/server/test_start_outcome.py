"""``fedseal-server start``: refuses a secure cohort that cannot lose a site; its exit code
says how the run ended (from the record, since ``flwr run`` exits 0 whatever happened).

``server.cli.serve`` is replaced by a stand-in that plays the ServerApp's part on the
record (a run finished, aborted, or left running) and returns ``flwr run``'s exit code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import server.cli as server_cli
from server.app import ServerSettings
from server.book import RunBook
from server.deploy import LinkSettings
from server.record import SqlRecord, load_signing_key
from server.record.keys import create_keypair


def _start(tmp_path: Path, *args: str) -> Any:
    keys = tmp_path / "keys"
    if not keys.exists():
        create_keypair(keys)
    argv = ["start", "--insecure", "--state-dir", str(tmp_path / "srv"), "--keys", str(keys)]
    argv += ["--db", str(tmp_path / "record.db"), "--port", "9", *args]
    return CliRunner().invoke(server_cli.app, argv)


def _serving(ending: str | None, calls: list[Any]) -> Callable[..., int]:
    """A ``serve`` whose ServerApp opens a run and ends it ``ending`` (None: it dies)."""

    def serve(link: LinkSettings, cfg: Any, settings: ServerSettings) -> int:
        calls.append(cfg)
        assert settings.db_url is not None and settings.key_dir is not None
        record = SqlRecord(settings.db_url)
        book = RunBook(record, load_signing_key(settings.key_dir), "0000deadbeef")
        book.start(asdict(cfg), policy_hash=None)
        if ending == "finished":
            book.finish("finished", None)
        elif ending == "aborted":
            book.finish("aborted", "3 failed rounds in a row (max_failed_rounds=3); last: lost")
        record.close()
        return 0  # `flwr run` says 0 in every case

    return serve


@pytest.mark.parametrize("sites", ["2", "3"])
def test_secure_cohort_tolerating_no_dropout_is_refused_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sites: str
) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(server_cli, "serve", _serving("finished", calls))
    result = _start(tmp_path, "--min-sites", sites)
    assert result.exit_code == 2 and calls == [], result.output
    line = result.output.strip().splitlines()[-1]
    assert "tolerates no dropout" in line and "--allow-no-dropout" in line
    assert f"cohort of {sites} sites" in line


def test_no_dropout_accepted_when_asked_and_four_sites_need_no_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(server_cli, "serve", _serving("finished", calls))
    allowed = _start(tmp_path / "a", "--min-sites", "3", "--allow-no-dropout")
    assert allowed.exit_code == 0 and "warning" in allowed.output, allowed.output
    four = _start(tmp_path / "b", "--wait-sites", "4")
    assert four.exit_code == 0, four.output
    assert "round 1 starts when 4 sites are connected" in four.output
    plain = _start(tmp_path / "c", "--min-sites", "2", "--no-secagg")
    assert plain.exit_code == 0, plain.output
    assert len(calls) == 3 and calls[1].wait_sites == 4


@pytest.mark.parametrize(
    ("ending", "code", "text"),
    [
        ("finished", 0, "run 0000deadbeef finished"),
        ("aborted", server_cli.EXIT_RUN_ABORTED, "run 0000deadbeef aborted: 3 failed rounds"),
        (None, server_cli.EXIT_RUN_UNFINISHED, "fedseal-server resume 0000deadbeef"),
    ],
)
def test_exit_code_says_how_the_run_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: str | None, code: int, text: str
) -> None:
    monkeypatch.setattr(server_cli, "serve", _serving(ending, []))
    result = _start(tmp_path, "--no-secagg")
    assert result.exit_code == code, result.output
    assert text in result.output


def test_a_server_app_that_started_no_run_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_cli, "serve", lambda *_: 1)
    result = _start(tmp_path, "--no-secagg")
    assert result.exit_code == 1 and "started no run (flwr exit code 1)" in result.output
