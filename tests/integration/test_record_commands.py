"""Commands that write to a recorded run's audit log keep it verifiable (issue 12, item 3).

On a real record (one ``fedseal-sim run``), every command that can append to
the audit log either seals what it appends with the record's key in force or
refuses, in one line, before writing anything; and no command but ``keys``
(and ``fedseal-sim run`` for a *fresh* run directory) makes a signing key.
For each such command and each key situation (none given, a directory with no
key, another ``fedseal-server keys`` pair, the record's own key):

* refused: a non-zero exit with one ``error:`` line, the audit log (events and
  seals) byte for byte as before, no key file written anywhere, and
  ``audit verify --public-key`` (the key the sites were given) still exit 0;
* accepted: new events, sealed, and ``audit verify`` exit 0.

The read-only commands are checked to leave the log and the key directories
as they were.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from server.cli import app as server_cli
from server.record.keys import KeyPaths, create_keypair, write_keypair

BIN = Path(sys.executable).parent
runner = CliRunner()
GATE = 'kind = "server"\n[release.min_metrics]\naccuracy = 0.05\n'


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One small simulated run, recorded and sealed: (its run directory, its run id)."""
    out = tmp_path_factory.mktemp("recorded") / "run"
    proc = subprocess.run(
        [str(BIN / "fedseal-sim"), "run", "--clients", "3", "--rounds", "1",
         "--no-dp", "--no-secagg", "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout)["run_id"]


@dataclass(frozen=True)
class Run:
    """A private copy of the recorded run, and the public key its sites were given."""

    dir: Path
    run_id: str
    trusted_pub: Path
    tmp: Path

    @property
    def db(self) -> Path:
        return self.dir / "record.db"

    @property
    def keys(self) -> Path:
        return self.dir / "keys"


@pytest.fixture()
def run(recorded: tuple[Path, str], tmp_path: Path) -> Run:
    src, run_id = recorded
    dest = tmp_path / "run"
    shutil.copytree(src, dest)
    trusted = tmp_path / "trusted-audit.pub"
    shutil.copyfile(dest / "keys" / "audit.pub", trusted)
    return Run(dest, run_id, trusted, tmp_path)


def _log(db: Path) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """Every audit event and seal row, as stored."""
    with sqlite3.connect(db) as conn:
        events = conn.execute("SELECT * FROM audit_events ORDER BY seq").fetchall()
        seals = conn.execute("SELECT * FROM audit_seals ORDER BY seq").fetchall()
    return events, seals


def _files(*dirs: Path) -> dict[str, bytes]:
    """Every file under ``dirs`` and its bytes."""
    return {
        str(p): p.read_bytes()
        for d in dirs
        if d.exists()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def _key_files(root: Path) -> dict[str, bytes]:
    """Every signing-key file under ``root`` (current, staged, archived) and its bytes."""
    found = [*root.rglob("audit.key*"), *root.rglob("audit.pub*")]
    return {str(p): p.read_bytes() for p in sorted(found) if p.is_file()}


def _verify(r: Run) -> None:
    check = runner.invoke(
        server_cli, ["audit", "verify", "--db", str(r.db), "--public-key", str(r.trusted_pub)]
    )
    assert check.exit_code == 0 and check.stdout.startswith("OK:"), check.output


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert "Traceback" not in stderr
    return lines[0]


# --------------------------------------------------------------- key situations


def _no_keys(r: Run) -> list[str]:
    return []


def _empty_keys(r: Run) -> list[str]:
    (r.tmp / "empty-keys").mkdir()
    return ["--keys", str(r.tmp / "empty-keys")]


def _other_keys(r: Run) -> list[str]:
    made = runner.invoke(server_cli, ["keys", str(r.tmp / "other-keys")])
    assert made.exit_code == 0, made.output
    return ["--keys", str(r.tmp / "other-keys")]


def _right_keys(r: Run) -> list[str]:
    return ["--keys", str(r.keys)]


REFUSED = {"no-keys": _no_keys, "empty-keys": _empty_keys, "other-keys": _other_keys}

# The fedseal-server commands that append to the audit log: name -> arguments before --keys.
APPENDING: dict[str, Callable[[Run], list[str]]] = {
    "models-tag": lambda r: ["models", "tag", "1", "released", "--db", str(r.db)],
    "models-export-policy": lambda r: [
        "models",
        "export",
        "1",
        "--db",
        str(r.db),
        "--out",
        str(r.tmp / "model.bin"),
        "--policy",
        str(_gate(r)),
    ],  # fmt: skip
    "audit-rotate-key": lambda r: ["audit", "rotate-key", "--db", str(r.db)],
    # a new run on this record (refused before any SuperLink starts)
    "start": lambda r: [
        "start",
        "--no-secagg",  # a two-site secure run is refused for its cohort before the key check
        "--insecure",
        "--port",
        "1",
        "--state-dir",
        str(r.tmp / "srv"),
        "--db",
        str(r.db),
    ],  # fmt: skip
}


def _gate(r: Run) -> Path:
    path = r.tmp / "gate.toml"
    path.write_text(GATE)
    return path


@pytest.mark.parametrize("situation", sorted(REFUSED))
@pytest.mark.parametrize("command", sorted(APPENDING))
def test_appending_command_without_the_records_key_refuses_and_writes_nothing(
    run: Run, command: str, situation: str
) -> None:
    args = APPENDING[command](run) + REFUSED[situation](run)
    log, keys = _log(run.db), _key_files(run.tmp)
    result = runner.invoke(server_cli, args)
    assert result.exit_code in (1, 2), result.output
    line = _one_error_line(result.stderr)
    if situation == "other-keys":
        assert "key in force" in line, line
    else:
        assert "--keys" in line or "fedseal-server keys" in line, line
    assert _log(run.db) == log
    assert _key_files(run.tmp) == keys  # no key made, staged or replaced, anywhere
    assert not (run.tmp / "model.bin").exists()
    assert not (run.tmp / "srv" / "keys").exists()
    _verify(run)


@pytest.mark.parametrize("command", ["models-tag", "models-export-policy", "audit-rotate-key"])
def test_appending_command_with_the_records_key_seals_what_it_appends(
    run: Run, command: str
) -> None:
    events, seals = _log(run.db)
    result = runner.invoke(server_cli, APPENDING[command](run) + _right_keys(run))
    assert result.exit_code == 0, result.output
    after_events, after_seals = _log(run.db)
    assert len(after_events) > len(events) and after_events[: len(events)] == events
    assert after_seals[: len(seals)] == seals
    # the new tail is sealed: the newest seal covers the newest event
    with sqlite3.connect(run.db) as conn:
        (sealed,) = conn.execute("SELECT MAX(seq) FROM audit_seals").fetchone()
        (newest,) = conn.execute("SELECT MAX(seq) FROM audit_events").fetchone()
    assert sealed == newest
    _verify(run)


def test_rotate_key_with_another_records_keys_leaves_their_staged_key_alone(run: Run) -> None:
    """A directory with another record's interrupted rotation: refused, nothing there touched."""
    other = run.tmp / "other-keys"
    create_keypair(other)
    write_keypair(KeyPaths.staged(other), Ed25519PrivateKey.generate())
    log, files = _log(run.db), _files(other)
    result = runner.invoke(
        server_cli, ["audit", "rotate-key", "--db", str(run.db), "--keys", str(other)]
    )
    assert result.exit_code == 1
    assert "not the record's key in force" in _one_error_line(result.stderr)
    assert _files(other) == files and _log(run.db) == log
    _verify(run)


# ------------------------------------------------------------ fedseal-sim run


def _sim(r: Run, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "fedseal-sim"), "run", "--clients", "3", "--rounds", "1",
         "--no-dp", "--no-secagg", "--out", str(r.dir), "--json", *extra],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _delete_key(r: Run) -> None:
    for p in r.keys.iterdir():
        p.unlink()


def _replace_key(r: Run) -> None:
    _delete_key(r)
    create_keypair(r.keys)


@pytest.mark.parametrize("resume", [True, False], ids=["resume", "new-run-same-dir"])
@pytest.mark.parametrize("change", [_delete_key, _replace_key], ids=["key-deleted", "key-replaced"])
def test_sim_run_on_a_recorded_directory_without_its_key_refuses_up_front(
    run: Run, change: Callable[[Run], None], resume: bool
) -> None:
    change(run)
    log = _log(run.db)
    before = _files(run.keys, run.dir / "federation", run.dir / "sites")
    proc = _sim(run, *(["--resume", run.run_id] if resume else []))
    assert proc.returncode == 1, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert "key" in doc["error"] and "\n" not in doc["error"], doc
    assert _log(run.db) == log
    # no key made, and the federation's roster still names the record's key
    assert _files(run.keys, run.dir / "federation", run.dir / "sites") == before
    _verify(run)


def test_sim_run_on_a_recorded_directory_with_its_key_appends_a_sealed_run(run: Run) -> None:
    (events, seals), keys = _log(run.db), _key_files(run.tmp)
    proc = _sim(run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["run_id"] != run.run_id
    after_events, after_seals = _log(run.db)
    assert after_events[: len(events)] == events and after_seals[: len(seals)] == seals
    assert len(after_events) > len(events) and len(after_seals) > len(seals)
    assert _key_files(run.tmp) == keys  # the directory's key, not a new one
    _verify(run)


# ------------------------------------------------------------- read-only commands


def test_read_only_commands_leave_the_log_and_keys_as_they_were(run: Run) -> None:
    log, keys = _log(run.db), _key_files(run.tmp)
    state = run.tmp / "srv"
    db = str(run.db)
    for args, code in (
        (["report", run.run_id, "--db", db, "--out", str(run.tmp / "report")], 0),
        (["audit", "verify", "--db", db, "--trust-stored-key"], 0),
        (["audit", "export", "--db", db, "--out", str(run.tmp / "audit.jsonl")], 0),
        (["models", "list", "--db", db], 0),
        (["models", "show", "1", "--db", db], 0),
        (["models", "export", "1", "--db", db, "--out", str(run.tmp / "m.bin")], 0),
        # a finished run is not resumed; no key is made in the state directory either
        (["resume", run.run_id, "--insecure", "--state-dir", str(state), "--db", db], 2),
    ):
        result = runner.invoke(server_cli, args)
        assert result.exit_code == code, (args, result.output)
    assert (run.tmp / "report" / "report.html").is_file()
    assert _log(run.db) == log and _key_files(run.tmp) == keys
    assert not (state / "keys").exists()
    _verify(run)
