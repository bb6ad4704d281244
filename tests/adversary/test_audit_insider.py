"""A coordinator insider against the sealed audit record, the signing key and the site's state.

The attacker can write the coordinator's database and its files, but holds
neither the verifier's copy of the audit key nor the sites' witnessed heads.
Each test plays one attack and asserts the defence that refuses or detects it:

(a) cut a finished run's last event with its seal -> a site's witnessed head shows it;
(b) plant a world-writable ``state.key`` for a site -> refused;
(c) delete the signing key and start again -> refused, no new key appears;
(d) verify without the trusted key -> refused (never silently trusts the stored copy);
(e) seal with a key of one's own, no rotation -> rejected, naming the seq.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from client.cli import app as client_cli
from client.state import STATE_KEY_FILE, WITNESS_FILE, private_dir, site_dir, state_key
from client.witness import read_heads, witness_head
from common.audit.chain import event_hash
from common.audit.seal import KEY_ROTATED, public_key_hex, rotation_payload, sign_head
from common.audit.witness import verify_with_witnesses
from common.config import RunConfig
from common.errors import ConfigurationError
from server.app import ServerSettings, open_run
from server.book import RunBook
from server.cli import app as server_cli
from server.record import KeyPaths, SqlRecord, create_keypair, load_public_key, load_signing_key
from simulations.engine import prepare_signing_key

runner = CliRunner()
RUN_ID = "00000000feed"


def _finished_run(tmp_path: Path, site: Path | None = None) -> tuple[Path, Path]:
    """A sealed, finished run; every head it sealed is witnessed by ``site``. (db, keys)."""
    keys = tmp_path / "keys"
    create_keypair(keys)
    db = tmp_path / "record.db"
    record = SqlRecord(f"sqlite:///{db}")
    book = RunBook(record, load_signing_key(keys), RUN_ID)
    heads = []
    book.start({"rounds": 2}, None)
    heads.append(book.head)
    for rnd in (1, 2):
        book.round_started(rnd, [1, 2])
        book.event("probe", {"round": rnd})
        book.round_finished(rnd, {"accuracy": 0.5})
        heads.append(book.seal())
    book.finish()  # run_finished, sealed: the final head, sent to every site
    heads.append(book.head)
    record.close()
    if site is not None:
        for head in heads:
            assert head is not None
            witness_head(private_dir(site) / WITNESS_FILE, head.encode())
    return db, keys


def _cut_last_event_and_its_seal(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        (last,) = conn.execute("SELECT MAX(seq) FROM audit_events").fetchone()
        conn.execute("DELETE FROM audit_seals WHERE seq = ?", (last,))
        conn.execute("DELETE FROM audit_events WHERE seq = ?", (last,))
    return int(last)


# --------------------------------------------------------------------- (a)


def test_a_clean_tail_cut_of_a_finished_run_is_caught_by_a_witnessed_head(
    tmp_path: Path,
) -> None:
    site = tmp_path / "site-0"
    db, keys = _finished_run(tmp_path, site)
    trusted = load_public_key(KeyPaths.in_dir(keys).public_key)
    cut = _cut_last_event_and_its_seal(db)
    with SqlRecord(str(db), create=False) as record:
        # The record alone is a consistent sealed prefix: this is the gap.
        assert record.verify(trusted).ok
        assert record.events()[-1].kind != "run_finished"
        report = verify_with_witnesses(
            record.events(), record.seals(), read_heads(site / WITNESS_FILE), trusted,
            record.record_id,
        )  # fmt: skip
    assert not report.ok and report.first_bad_seq == cut
    assert "tampered" in (report.problem or "") and "truncated" in (report.problem or "")

    verify = runner.invoke(
        server_cli,
        ["audit", "verify", "--db", str(db), "--public-key", str(KeyPaths.in_dir(keys).public_key),
         "--witness", str(site)],
    )  # fmt: skip
    assert verify.exit_code == 1, verify.output
    assert verify.stdout.startswith(f"FAILED at seq {cut}: tampered")

    export = tmp_path / "audit.jsonl"
    assert (
        runner.invoke(
            server_cli, ["audit", "export", "--db", str(db), "--out", str(export)]
        ).exit_code
        == 0
    )
    check = runner.invoke(
        client_cli,
        ["audit", "check", "--record", str(export), "--public-key",
         str(KeyPaths.in_dir(keys).public_key), "--state-dir", str(site)],
    )  # fmt: skip
    assert check.exit_code == 1 and f"FAILED at seq {cut}" in check.stdout, check.output


def test_a_uncut_finished_run_passes_with_its_witnessed_heads(tmp_path: Path) -> None:
    site = tmp_path / "site-0"
    db, keys = _finished_run(tmp_path, site)
    verify = runner.invoke(
        server_cli,
        ["audit", "verify", "--db", str(db), "--public-key", str(KeyPaths.in_dir(keys).public_key),
         "--witness", str(site / WITNESS_FILE)],
    )  # fmt: skip
    assert verify.exit_code == 0 and "witnessed: all 4 heads" in verify.stdout, verify.output
    export = tmp_path / "audit.jsonl"
    exported = runner.invoke(server_cli, ["audit", "export", "--db", str(db), "--out", str(export)])
    assert exported.exit_code == 0
    check = runner.invoke(
        client_cli,
        ["audit", "check", "--record", str(export), "--public-key",
         str(KeyPaths.in_dir(keys).public_key), "--state-dir", str(site)],
    )  # fmt: skip
    assert check.exit_code == 0 and check.stdout.startswith("OK:"), check.output


# --------------------------------------------------------------------- (b)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_b_a_planted_world_writable_state_key_is_refused(tmp_path: Path) -> None:
    directory = site_dir({"partition-id": 0}, 1, tmp_path / "sites")
    planted = directory / STATE_KEY_FILE
    planted.write_bytes(b"\x41" * 32)  # the attacker knows this key
    planted.chmod(0o666)
    with pytest.raises(ConfigurationError, match="accessible by group or others") as info:
        state_key(directory)
    assert "\n" not in str(info.value)


def test_b_no_state_dir_never_falls_back_to_the_shared_temp_dir(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FLWR_HOME", raising=False)
    with pytest.raises(ConfigurationError, match="--state-dir"):
        site_dir({"partition-id": 0}, 1, None)


# --------------------------------------------------------------------- (c)


def _files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()} if directory.exists() else set()


def test_c_a_deleted_signing_key_is_refused_at_start_and_not_recreated(tmp_path: Path) -> None:
    db, keys = _finished_run(tmp_path)
    paths = KeyPaths.in_dir(keys)
    for path in (paths.private_key, paths.public_key):
        path.unlink()
    settings = ServerSettings(db_url=f"sqlite:///{db}", key_dir=keys)
    with pytest.raises(ConfigurationError, match="fedseal-server keys") as info:
        open_run(RunConfig(num_sites=2, rounds=1, min_sites=1), settings, {})
    assert str(keys / "audit.key") in str(info.value) and "\n" not in str(info.value)
    assert _files(keys) == set()

    # The coordinator's command line says the same before starting anything.
    state = tmp_path / "srv"
    start = runner.invoke(
        server_cli, ["start", "--no-secagg", "--insecure", "--state-dir", str(state), "--port", "1",
                     "--db", str(db), "--keys", str(keys)],
    )  # fmt: skip
    assert start.exit_code == 2 and "fedseal-server keys" in start.output, start.output
    assert _files(keys) == set() and not (state / "superlink.log").exists()

    # A simulation directory that already holds a record gets no fresh key either.
    with pytest.raises(ConfigurationError, match="fedseal-server keys"):
        prepare_signing_key(tmp_path, resume=False)
    with pytest.raises(ConfigurationError, match="fedseal-server keys"):
        prepare_signing_key(tmp_path, resume=True)
    assert _files(keys) == set()


def test_c_a_fresh_simulation_directory_gets_its_key_made_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_dir = prepare_signing_key(tmp_path / "run", resume=False)
    assert _files(key_dir) == {"audit.key", "audit.pub"}
    assert "created the audit-signing key" in capsys.readouterr().err


# --------------------------------------------------------------------- (d)


def test_d_verify_without_a_trusted_key_refuses(tmp_path: Path) -> None:
    db, _ = _finished_run(tmp_path)
    result = runner.invoke(server_cli, ["audit", "verify", "--db", str(db)])
    assert result.exit_code == 2
    assert "needs the trusted key" in result.output and "OK" not in result.stdout
    assert len(result.output.strip().splitlines()) == 1


# --------------------------------------------------------------------- (e)


def _plant_seal(db: Path, planted: Ed25519PrivateKey, record_id: str) -> int:
    """Append a forged event with a correct hash and seal it with ``planted``; its seq."""
    with SqlRecord(str(db), create=False) as record:
        head = record.events()[-1]
    seq, time = head.seq + 1, "2030-01-01T00:00:00Z"
    payload = '{"note":"forged"}'
    digest = event_hash(head.hash, seq, time, RUN_ID, "forged", "server", {"note": "forged"})
    signed = sign_head(planted, record_id, seq, digest, time)
    with sqlite3.connect(db) as conn:
        conn.execute(
            "INSERT INTO audit_events (seq, time, run_id, kind, actor, payload_json, prev_hash, hash)"
            " VALUES (?, ?, ?, 'forged', 'server', ?, ?, ?)",
            (seq, time, RUN_ID, payload, head.hash, digest),
        )
        conn.execute(
            "INSERT INTO audit_seals (record_id, seq, head_hash, time, public_key_hex, signature_hex)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (record_id, seq, digest, time, public_key_hex(planted.public_key()), signed.signature.hex()),
        )  # fmt: skip
    return seq


def test_e_a_seal_by_a_planted_key_without_rotation_is_rejected_naming_the_seq(
    tmp_path: Path,
) -> None:
    db, keys = _finished_run(tmp_path)
    pub = KeyPaths.in_dir(keys).public_key
    with SqlRecord(str(db), create=False) as record:
        record_id = record.record_id
    planted = Ed25519PrivateKey.generate()
    seq = _plant_seal(db, planted, record_id)
    result = runner.invoke(
        server_cli, ["audit", "verify", "--db", str(db), "--public-key", str(pub)]
    )
    assert result.exit_code == 1
    assert result.stdout.startswith(f"FAILED at seq {seq}: bad seal"), result.output
    assert "key in force" in result.stdout


def test_e_a_forged_rotation_to_a_planted_key_is_rejected(tmp_path: Path) -> None:
    db, keys = _finished_run(tmp_path)
    trusted = load_public_key(KeyPaths.in_dir(keys).public_key)
    planted = Ed25519PrivateKey.generate()
    with SqlRecord(str(db), create=False) as record:
        # the attacker appends a key_rotated event naming their key, sealed by their key
        event, _ = record.append_sealed(
            None, KEY_ROTATED, "operator", rotation_payload(trusted, planted.public_key()), planted
        )
        record.append_event(RUN_ID, "forged", "server", {"note": "after the rotation"})
        record.seal(planted)
        report = record.verify(trusted)
    assert not report.ok and report.first_bad_seq == event.seq
    assert "not sealed by the key in force" in (report.problem or "")
