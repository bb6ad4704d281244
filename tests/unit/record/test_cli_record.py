"""``fedseal-server audit|models|keys`` through typer's CliRunner: exit codes and messages."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from common.audit.export import parse_export
from server.cli_record import audit_app, keys_cmd, models_app
from server.record.keys import create_keypair, load_private_key
from server.record.store import SqlRecord

app = typer.Typer()
app.add_typer(audit_app, name="audit")
app.add_typer(models_app, name="models")
app.command("keys")(keys_cmd)
runner = CliRunner()


@pytest.fixture()
def populated(tmp_path: Path) -> tuple[Path, Path]:
    """A small sealed record with two model versions; returns (db file, public key file)."""
    keys = create_keypair(tmp_path / "keys")
    key = load_private_key(keys.private_key)
    db = tmp_path / "record.db"
    with SqlRecord(str(db)) as rec:
        run = rec.create_run({"rounds": 2}, run_id="run-1")
        parent = None
        for rnd in (1, 2):
            rec.start_round(run, rnd, [1, 2])
            rec.record_energy(run, rnd, 1, 0.001 * rnd, 0.5, True)
            rec.record_privacy(
                run,
                rnd,
                level="client",
                epsilon=0.4 * rnd,
                delta=1e-5,
                noise_multiplier=1.0,
                sample_rate=1.0,
                steps=rnd,
            )
            v = rec.add_model_version(
                run,
                rnd,
                parent,
                f"w{rnd}".encode(),
                {"accuracy": 0.5 + rnd / 10},
                1.0 * rnd,
                0.4 * rnd,
                rec.energy_total_kwh(run, rnd),
                [1, 2],
            )
            parent = v.version
            rec.finish_round(run, rnd, {"accuracy": 0.5 + rnd / 10})
            rec.seal(key)
        rec.finish_run(run)
        rec.seal(key)
    return db, keys.public_key


def test_audit_verify_intact_exit_0(populated: tuple[Path, Path]) -> None:
    db, pub = populated
    result = runner.invoke(app, ["audit", "verify", "--db", str(db), "--public-key", str(pub)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK: 12 events, 3 seals")


def test_audit_verify_edited_row_exit_1_names_seq(populated: tuple[Path, Path]) -> None:
    db, pub = populated
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audit_events SET actor = 'mallory' WHERE seq = 3")
    result = runner.invoke(app, ["audit", "verify", "--db", str(db), "--public-key", str(pub)])
    assert result.exit_code == 1
    assert "FAILED at seq 3: hash mismatch" in result.output


def test_audit_verify_missing_db_one_line_error(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["audit", "verify", "--db", str(tmp_path / "none.db"), "--trust-stored-key"]
    )
    assert result.exit_code == 1
    assert "no record database" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "none.db").exists()


def test_audit_verify_bad_url_one_line_error() -> None:
    result = runner.invoke(
        app, ["audit", "verify", "--db", "nosuchdriver://h/db", "--trust-stored-key"]
    )
    assert result.exit_code == 1 and "error:" in result.output


def test_audit_verify_newer_schema_one_line_error(populated: tuple[Path, Path]) -> None:
    db, pub = populated
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE schema_meta SET value = '99' WHERE key = 'schema_version'")
    result = runner.invoke(app, ["audit", "verify", "--db", str(db), "--public-key", str(pub)])
    assert result.exit_code == 1 and "newer than this fedseal" in result.output


def test_audit_export_jsonl_verifies_offline(populated: tuple[Path, Path], tmp_path: Path) -> None:
    db, _ = populated
    out = tmp_path / "audit.jsonl"
    result = runner.invoke(app, ["audit", "export", "--db", str(db), "--out", str(out)])
    assert result.exit_code == 0, result.output
    parsed = parse_export(out.read_text().splitlines())
    assert len(parsed.events) == 12 and len(parsed.seals) == 3


def test_audit_export_csv_has_header_and_rows(populated: tuple[Path, Path]) -> None:
    db, _ = populated
    result = runner.invoke(app, ["audit", "export", "--db", str(db), "--format", "csv"])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].startswith("seq,time,run_id,kind") and len(lines) == 13


def test_models_list_json_one_version_per_round_with_intact_hash(
    populated: tuple[Path, Path],
) -> None:
    db, _ = populated
    result = runner.invoke(app, ["models", "list", "--db", str(db), "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["artifact_intact"] for r in rows)
    assert rows[1]["parent"] == rows[0]["version"]


def test_models_show_prints_privacy_and_energy_card(populated: tuple[Path, Path]) -> None:
    db, _ = populated
    result = runner.invoke(app, ["models", "show", "2", "--db", str(db)])
    assert result.exit_code == 0
    assert "client-level ε 0.8" in result.output and "record-level ε 2" in result.output
    assert "0.003 kWh" in result.output and "includes estimates" in result.output
    card = json.loads(runner.invoke(app, ["models", "show", "2", "--db", str(db), "--json"]).stdout)
    assert card["energy"]["estimated"] is True and card["energy"]["co2eq_g"] == pytest.approx(1.0)


def test_models_export_altered_artifact_exit_1(
    populated: tuple[Path, Path], tmp_path: Path
) -> None:
    db, _ = populated
    dest = tmp_path / "model.bin"
    ok = runner.invoke(app, ["models", "export", "1", "--db", str(db), "--out", str(dest)])
    assert ok.exit_code == 0 and dest.read_bytes() == b"w1"
    with SqlRecord(str(db), create=False) as rec:
        assert rec.artifacts is not None
        rec.artifacts.path(rec.get_version(1).sha256).write_bytes(b"w1-evil")
    dest.unlink()
    bad = runner.invoke(app, ["models", "export", "1", "--db", str(db), "--out", str(dest)])
    assert bad.exit_code == 1 and "altered" in bad.output and not dest.exists()


def test_models_tag_without_keys_refused_before_writing(populated: tuple[Path, Path]) -> None:
    db, pub = populated
    before = _events(db)
    result = runner.invoke(app, ["models", "tag", "2", "released", "--db", str(db)])
    assert result.exit_code == 2 and "--keys DIR" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert _events(db) == before
    check = runner.invoke(app, ["audit", "verify", "--db", str(db), "--public-key", str(pub)])
    assert check.exit_code == 0, check.output


def test_models_tag_with_keys_is_recorded_sealed_and_verifies(
    populated: tuple[Path, Path],
) -> None:
    db, pub = populated
    keys = str(pub.parent)
    result = runner.invoke(app, ["models", "tag", "2", "released", "--db", str(db), "--keys", keys])
    assert result.exit_code == 0 and "released" in result.output
    check = runner.invoke(app, ["audit", "verify", "--db", str(db), "--public-key", str(pub)])
    assert check.exit_code == 0 and check.output.startswith("OK: 13 events, 4 seals"), check.output


def test_models_tag_with_a_key_the_record_does_not_have_in_force_refused(
    populated: tuple[Path, Path], tmp_path: Path
) -> None:
    db, pub = populated
    other = create_keypair(tmp_path / "other").private_key.parent
    before = _events(db)
    result = runner.invoke(
        app, ["models", "tag", "2", "released", "--db", str(db), "--keys", str(other)]
    )
    assert result.exit_code == 2 and "not the record's key in force" in result.output
    assert _events(db) == before


RELEASE_GATE = 'kind = "server"\n[release]\nmax_client_epsilon = 0.5\n'


def test_models_export_policy_without_keys_refused_before_writing(
    populated: tuple[Path, Path], tmp_path: Path
) -> None:
    db, _ = populated
    (tmp_path / "gate.toml").write_text(RELEASE_GATE)
    before = _events(db)
    dest = tmp_path / "model.bin"
    args = ["models", "export", "2", "--db", str(db), "--out", str(dest)]
    for extra in ([], ["--force"]):
        result = runner.invoke(app, [*args, "--policy", str(tmp_path / "gate.toml"), *extra])
        assert result.exit_code == 2 and "--keys DIR" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert _events(db) == before and not dest.exists()


def test_models_export_policy_denied_then_forced_both_sealed_and_verify(
    populated: tuple[Path, Path], tmp_path: Path
) -> None:
    db, pub = populated
    (tmp_path / "gate.toml").write_text(RELEASE_GATE)
    dest = tmp_path / "model.bin"
    args = ["models", "export", "2", "--db", str(db), "--out", str(dest),
            "--policy", str(tmp_path / "gate.toml"), "--keys", str(pub.parent)]  # fmt: skip
    denied = runner.invoke(app, args)
    assert denied.exit_code == 1 and "max_client_epsilon" in denied.output and not dest.exists()
    verify = ["audit", "verify", "--db", str(db), "--public-key", str(pub)]
    assert runner.invoke(app, verify).exit_code == 0
    forced = runner.invoke(app, [*args, "--force"])
    assert forced.exit_code == 0 and dest.read_bytes() == b"w2", forced.output
    assert "release_override" in [e.kind for e in _record_events(db)]
    check = runner.invoke(app, verify)
    assert check.exit_code == 0 and check.output.startswith("OK:"), check.output


def test_audit_verify_without_trusted_key_refused_exit_2(populated: tuple[Path, Path]) -> None:
    db, _ = populated
    result = runner.invoke(app, ["audit", "verify", "--db", str(db)])
    assert result.exit_code == 2
    assert "needs the trusted key" in result.output and "--public-key" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_audit_verify_trust_stored_key_warns_on_stderr(populated: tuple[Path, Path]) -> None:
    db, _ = populated
    result = runner.invoke(app, ["audit", "verify", "--db", str(db), "--trust-stored-key"])
    assert result.exit_code == 0 and result.stdout.startswith("OK: 12 events, 3 seals")
    assert "WARNING" in result.stderr and "coordinator's own copy" in result.stderr
    assert "WARNING" not in result.stdout


def test_audit_verify_public_key_and_trust_stored_key_exclude_each_other(
    populated: tuple[Path, Path],
) -> None:
    db, pub = populated
    result = runner.invoke(
        app, ["audit", "verify", "--db", str(db), "--public-key", str(pub), "--trust-stored-key"]
    )
    assert result.exit_code == 2 and "exclude each other" in result.output


def test_audit_rotate_key_then_verify_with_the_original_key(
    populated: tuple[Path, Path], tmp_path: Path
) -> None:
    db, pub = populated
    original = tmp_path / "original.pub"
    original.write_bytes(pub.read_bytes())
    keys = pub.parent
    result = runner.invoke(app, ["audit", "rotate-key", "--db", str(db), "--keys", str(keys)])
    assert result.exit_code == 0, result.output
    assert "key_rotated at seq 13" in result.output
    assert oct((keys / "audit.key.1").stat().st_mode & 0o777) == "0o600"
    assert (keys / "audit.pub.1").read_bytes() == original.read_bytes()
    assert (keys / "audit.pub").read_bytes() != original.read_bytes()
    tag = ["models", "tag", "1", "old", "--db", str(db), "--keys", str(keys)]
    assert runner.invoke(app, tag).exit_code == 0  # sealed by the new key
    check = runner.invoke(app, ["audit", "verify", "--db", str(db), "--public-key", str(original)])
    assert check.exit_code == 0 and check.output.startswith("OK: 14 events, 6 seals"), check.output


def _events(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM audit_events").fetchone()[0])


def _record_events(db: Path) -> list:
    with SqlRecord(str(db), create=False) as rec:
        return rec.events()


def test_keys_command_refuses_overwrite_without_force(tmp_path: Path) -> None:
    assert runner.invoke(app, ["keys", str(tmp_path)]).exit_code == 0
    again = runner.invoke(app, ["keys", str(tmp_path)])
    assert again.exit_code == 2 and "--force" in again.output
    assert runner.invoke(app, ["keys", str(tmp_path), "--force"]).exit_code == 0
