"""Contract tests for SqlRecord, run on every backend (SQLite memory and file, PostgreSQL)."""

from __future__ import annotations

import csv
import io
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text

from common.audit.chain import event_hash
from common.audit.export import parse_export
from common.audit.seal import public_key_hex, verify_chain
from common.errors import DataError, IntegrityError, RecordError
from server.record.schema import SCHEMA_VERSION
from server.record.store import SqlRecord

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def _sealed(record: SqlRecord, n: int = 8, seal_every: int = 2) -> None:
    """n events, sealed after every `seal_every` events (seals at 2, 4, 6, 8)."""
    for i in range(1, n + 1):
        record.append_event("run-a", "test_event", "server", {"i": i, "note": f"event {i}"})
        if i % seal_every == 0:
            record.seal(KEY)


def _sql(record: SqlRecord, statement: str, **params: object) -> None:
    with record.engine.begin() as conn:
        conn.execute(text(statement), params)


def _row(record: SqlRecord, seq: int) -> dict[str, object]:
    with record.engine.connect() as conn:
        return dict(
            conn.execute(text("SELECT * FROM audit_events WHERE seq = :s"), {"s": seq})
            .mappings()
            .one()
        )


# ----------------------------------------------------------------- chain


def test_append_event_sequence_links_each_event_to_its_predecessor(record: SqlRecord) -> None:
    _sealed(record, n=4)
    events = record.events()
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert all(b.prev_hash == a.hash for a, b in zip(events, events[1:], strict=False))
    assert events[2].payload() == {"i": 3, "note": "event 3"}
    report = record.verify(KEY.public_key())
    assert report.ok and report.summary() == "OK: 4 events, 2 seals"


def test_append_event_nan_payload_refused_and_nothing_written(record: SqlRecord) -> None:
    record.append_event(None, "a", "server", {})
    with pytest.raises(DataError):
        record.append_event(None, "b", "server", {"x": float("nan")})
    assert len(record.events()) == 1


def test_verify_empty_record_ok(record: SqlRecord) -> None:
    assert record.verify(KEY.public_key()).summary() == "OK: 0 events, 0 seals"
    assert record.verify_trusting_stored_key().summary() == "OK: 0 events, 0 seals"


def test_verify_edited_payload_names_that_event(record: SqlRecord) -> None:
    _sealed(record)
    _sql(record, "UPDATE audit_events SET payload_json = :p WHERE seq = 5", p='{"i":55,"note":"x"}')
    report = record.verify(KEY.public_key())
    assert not report.ok and report.first_bad_seq == 5
    assert "hash mismatch" in (report.problem or "")


def test_verify_deleted_row_names_the_missing_seq(record: SqlRecord) -> None:
    _sealed(record)
    _sql(record, "DELETE FROM audit_events WHERE seq = 5")
    report = record.verify(KEY.public_key())
    assert report.first_bad_seq == 5 and "gap" in (report.problem or "")


def test_verify_swapped_rows_names_the_first_of_the_pair(record: SqlRecord) -> None:
    _sealed(record)
    a, b = _row(record, 4), _row(record, 5)
    cols = ("time", "run_id", "kind", "actor", "payload_json", "prev_hash", "hash")
    sets = ", ".join(f"{c} = :{c}" for c in cols)
    _sql(record, f"UPDATE audit_events SET {sets} WHERE seq = 4", **{c: b[c] for c in cols})
    _sql(record, f"UPDATE audit_events SET {sets} WHERE seq = 5", **{c: a[c] for c in cols})
    report = record.verify(KEY.public_key())
    assert report.first_bad_seq == 4 and "hash mismatch" in (report.problem or "")


def _shift_up_from(record: SqlRecord, seq: int) -> None:
    _sql(record, "UPDATE audit_events SET seq = seq + 1000 WHERE seq >= :s", s=seq)
    _sql(record, "UPDATE audit_events SET seq = seq - 999 WHERE seq >= 1000")


def _insert(record: SqlRecord, row: dict[str, object]) -> None:
    _sql(
        record,
        "INSERT INTO audit_events (seq, time, run_id, kind, actor, payload_json, prev_hash, hash) "
        "VALUES (:seq, :time, :run_id, :kind, :actor, :payload_json, :prev_hash, :hash)",
        **row,
    )


def test_verify_inserted_copied_row_names_the_inserted_seq(record: SqlRecord) -> None:
    _sealed(record)
    copy = _row(record, 2)
    _shift_up_from(record, 5)
    _insert(record, {**copy, "seq": 5})
    report = record.verify(KEY.public_key())
    assert report.first_bad_seq == 5 and "hash mismatch" in (report.problem or "")


def test_verify_inserted_forged_row_names_the_first_event_it_displaced(
    record: SqlRecord,
) -> None:
    # A forger who hashes the inserted event correctly (no key needed) still
    # breaks the next event, whose hash bound its old seq: seq 6 is named.
    _sealed(record)
    prev = _row(record, 4)
    _shift_up_from(record, 5)
    payload = {"forged": True}
    digest = event_hash(
        str(prev["hash"]), 5, "2024-01-01T00:00:00Z", "run-a", "x", "server", payload
    )
    _insert(
        record,
        {
            "seq": 5,
            "time": "2024-01-01T00:00:00Z",
            "run_id": "run-a",
            "kind": "x",
            "actor": "server",
            "payload_json": '{"forged":true}',
            "prev_hash": prev["hash"],
            "hash": digest,
        },
    )
    report = record.verify(KEY.public_key())
    assert report.first_bad_seq == 6


def test_verify_forged_event_appended_after_last_seal_is_unsealed(record: SqlRecord) -> None:
    _sealed(record)
    head = _row(record, 8)
    digest = event_hash(str(head["hash"]), 9, "t", None, "x", "server", {})
    _insert(
        record,
        {
            "seq": 9,
            "time": "t",
            "run_id": None,
            "kind": "x",
            "actor": "server",
            "payload_json": "{}",
            "prev_hash": head["hash"],
            "hash": digest,
        },
    )
    report = record.verify(KEY.public_key())
    assert report.first_bad_seq == 9 and "unsealed tail" in (report.problem or "")


def test_verify_truncated_tail_names_first_removed_seq(record: SqlRecord) -> None:
    _sealed(record)
    _sql(record, "DELETE FROM audit_events WHERE seq >= 7")
    report = record.verify(KEY.public_key())
    assert report.first_bad_seq == 7 and "truncated tail" in (report.problem or "")


def test_verify_truncated_tail_with_its_seal_leaves_unsealed_events(record: SqlRecord) -> None:
    _sealed(record)
    _sql(record, "DELETE FROM audit_events WHERE seq = 8")
    _sql(record, "DELETE FROM audit_seals WHERE seq = 8")
    report = record.verify(KEY.public_key())
    assert report.first_bad_seq == 7 and "unsealed tail" in (report.problem or "")


def test_verify_rehashed_rewrite_caught_by_the_next_seal(record: SqlRecord) -> None:
    _sealed(record)
    events = record.events()
    prev = events[3].hash
    for ev in events[4:]:  # rewrite 5..8 with a consistent chain, no key needed
        payload = {"i": 0} if ev.seq == 5 else ev.payload()
        digest = event_hash(prev, ev.seq, ev.time, ev.run_id, ev.kind, ev.actor, payload)
        body = '{"i":0}' if ev.seq == 5 else ev.payload_json
        _sql(
            record,
            "UPDATE audit_events SET payload_json = :p, prev_hash = :ph, hash = :h WHERE seq = :s",
            p=body,
            ph=prev,
            h=digest,
            s=ev.seq,
        )
        prev = digest
    report = record.verify(KEY.public_key())
    assert report.first_bad_seq == 6 and "bad seal" in (report.problem or "")


def test_verify_wrong_public_key_fails_at_first_seal(record: SqlRecord) -> None:
    _sealed(record)
    other = Ed25519PrivateKey.generate().public_key()
    report = record.verify(other)
    assert not report.ok and report.first_bad_seq == 2
    assert "signature" in (report.problem or "")


def test_verify_forged_seal_signature_fails_trusting_the_stored_key(record: SqlRecord) -> None:
    _sealed(record)
    _sql(record, "UPDATE audit_seals SET signature_hex = :s WHERE seq = 4", s="00" * 64)
    report = record.verify_trusting_stored_key()
    assert report.first_bad_seq == 4 and "signature" in (report.problem or "")


def test_seal_empty_log_refused(record: SqlRecord) -> None:
    with pytest.raises(RecordError, match="nothing to seal"):
        record.seal(KEY)


def test_seals_latest_seal_and_stored_public_keys_follow_the_seals_made(
    record: SqlRecord,
) -> None:
    assert record.seals() == [] and record.latest_seal() is None
    assert record.stored_public_keys() == []
    _sealed(record, n=4)
    seals = record.seals()
    assert [s.seq for s in seals] == [2, 4]
    assert all(s.record_id == record.record_id for s in seals)
    assert record.latest_seal() == seals[-1]
    assert record.stored_public_keys() == [public_key_hex(KEY.public_key())]


def test_verify_trusting_stored_key_a_second_key_without_rotation_fails_at_its_seal(
    record: SqlRecord,
) -> None:
    _sealed(record, n=4)
    record.append_event("run-a", "test_event", "server", {"i": 5})
    record.seal(Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33))))
    report = record.verify_trusting_stored_key()
    assert not report.ok and report.first_bad_seq == 5
    assert "key in force at seq 5" in (report.problem or "")


def test_exports_hold_every_event_and_seal_and_verify_offline(record: SqlRecord) -> None:
    _sealed(record, n=4)
    buffer = io.StringIO()
    assert record.export_jsonl(buffer) == 4
    lines = buffer.getvalue().splitlines()
    assert list(record.iter_export_lines()) == lines
    parsed = parse_export(lines)
    assert parsed.record_id == record.record_id
    assert parsed.public_key_hex == public_key_hex(KEY.public_key())
    assert list(parsed.events) == record.events() and list(parsed.seals) == record.seals()
    assert verify_chain(parsed.events, parsed.seals, KEY.public_key(), parsed.record_id).ok
    table = io.StringIO()
    assert record.export_csv(table) == 4
    rows = list(csv.reader(io.StringIO(table.getvalue())))
    assert rows[0] == ["seq", "time", "run_id", "kind", "actor", "payload", "prev_hash", "hash"]
    assert [r[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    assert rows[3][5] == '{"i":3,"note":"event 3"}' and rows[4][7] == record.events()[3].hash


@pytest.mark.durable
def test_append_event_two_concurrent_writers_keep_chain_valid(
    record_url: str, artifact_dir: Path
) -> None:
    SqlRecord(record_url, artifact_dir).close()
    errors: list[BaseException] = []

    def writer(name: str) -> None:
        try:
            with SqlRecord(record_url, artifact_dir) as rec:
                for i in range(15):
                    rec.append_event(None, "race", name, {"i": i})
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f"w{k}",)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with SqlRecord(record_url, artifact_dir) as rec:
        rec.seal(KEY)
        events = rec.events()
        assert [e.seq for e in events] == list(range(1, 31))
        assert rec.verify(KEY.public_key()).ok


# ----------------------------------------------------------------- schema


@pytest.mark.durable
def test_open_newer_schema_refused(record: SqlRecord, record_url: str) -> None:
    _sql(
        record,
        "UPDATE schema_meta SET value = :v WHERE key = 'schema_version'",
        v=str(SCHEMA_VERSION + 1),
    )
    with pytest.raises(RecordError, match="newer than this fedseal"):
        SqlRecord(record_url)


@pytest.mark.durable
def test_open_existing_record_keeps_record_id(record: SqlRecord, record_url: str) -> None:
    with SqlRecord(record_url, create=False) as again:
        assert again.record_id == record.record_id


def test_open_missing_sqlite_file_without_create_refused(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="no record database"):
        SqlRecord(str(tmp_path / "absent.db"), create=False)
    assert not (tmp_path / "absent.db").exists()


def test_open_bad_url_refused() -> None:
    with pytest.raises(RecordError):
        SqlRecord("nosuchdriver://x/y")


# ----------------------------------------------------------------- runs, rounds, energy


def test_run_lifecycle_appends_events_in_same_order(record: SqlRecord) -> None:
    run = record.create_run({"rounds": 2}, policy_hash="p" * 8, app_hash="a" * 8)
    record.record_node(run, 7, True, "allow-listed", name="site-a")
    record.record_node(run, 2**64 - 1, False, "unknown key")
    record.start_round(run, 1, [7])
    record.record_privacy(
        run,
        1,
        level="client",
        epsilon=0.5,
        delta=1e-5,
        noise_multiplier=1.1,
        sample_rate=1.0,
        steps=1,
    )
    record.record_energy(run, 1, 7, 0.002, 0.8, True)
    record.finish_round(run, 1, {"accuracy": 0.9})
    record.finish_run(run)
    kinds = [e.kind for e in record.events(run)]
    assert kinds == [
        "run_started",
        "node_admitted",
        "node_denied",
        "round_started",
        "privacy_spent",
        "energy_reported",
        "round_finished",
        "run_finished",
    ]
    assert record.get_run(run).status == "finished"
    assert [n.node_id for n in record.nodes(run)] == [7, 2**64 - 1]
    assert record.rounds(run)[0].metrics == {"accuracy": 0.9}
    assert record.energy(run)[0].estimated is True
    assert record.privacy(run)[0].level == "client"
    assert record.energy_total_kwh(run) == pytest.approx(0.002)


def test_record_energy_same_round_and_node_twice_refused(record: SqlRecord) -> None:
    run = record.create_run({})
    record.record_energy(run, 1, 3, 0.1, 1.0, False)
    with pytest.raises(RecordError):
        record.record_energy(run, 1, 3, 0.1, 1.0, False)
    assert len(record.energy(run)) == 1
    assert [e.kind for e in record.events()] == ["run_started", "energy_reported"]


def test_record_energy_negative_or_nan_refused(record: SqlRecord) -> None:
    run = record.create_run({})
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(DataError):
            record.record_energy(run, 1, 3, bad, 1.0, False)


def test_start_round_finished_round_refused_open_round_restarted(record: SqlRecord) -> None:
    run = record.create_run({})
    record.start_round(run, 1, [1])
    record.start_round(run, 1, [1, 2])  # crash before finishing: restart
    record.finish_round(run, 1, {})
    with pytest.raises(RecordError, match="already finished"):
        record.start_round(run, 1, [1])
    assert len(record.rounds(run)) == 1
    assert record.events()[2].payload()["restarted"] is True


def test_fail_round_closes_it_failed_with_its_reason_and_never_reopens(record: SqlRecord) -> None:
    run = record.create_run({})
    record.start_round(run, 1, [1, 2])
    with pytest.raises(DataError, match="reason"):
        record.fail_round(run, 1, "", {})
    record.fail_round(run, 1, "round 1: too few updates", {"failed": True})
    (info,) = record.rounds(run)
    assert (info.status, info.metrics) == ("failed", {"failed": True})
    event = record.events()[-1]
    assert event.kind == "round_failed"
    assert event.payload() == {
        "round": 1,
        "reason": "round 1: too few updates",
        "metrics": {"failed": True},
    }
    with pytest.raises(RecordError, match="already failed"):
        record.start_round(run, 1, [1])
    with pytest.raises(RecordError, match="not open"):
        record.fail_round(run, 1, "again", {})


def test_record_privacy_unknown_level_refused(record: SqlRecord) -> None:
    run = record.create_run({})
    with pytest.raises(DataError):
        record.record_privacy(
            run,
            1,
            level="both",
            epsilon=1.0,
            delta=1e-5,
            noise_multiplier=1.0,
            sample_rate=0.1,
            steps=1,
        )


def test_resume_run_reopens_the_run_and_returns_its_last_version(record: SqlRecord) -> None:
    run = record.create_run({"rounds": 3}, run_id="run-r")
    assert record.resume_run(run) is None
    record.add_model_version(run, 1, None, b"w1", {}, None, None, None, [1])
    v2 = record.add_model_version(run, 2, None, b"w2", {}, None, None, None, [1])
    record.finish_run(run, "aborted", "crash")
    assert record.get_run(run).status == "aborted"
    assert record.resume_run(run) == v2
    info = record.get_run(run)
    assert info.status == "running" and info.finished_at is None
    assert record.events(run)[-1].payload() == {
        "previous_status": "aborted",
        "last_version": v2.version,
        "last_round": 2,
    }
    other = record.create_run({})
    assert [r.run_id for r in record.list_runs()] == [run, other]
    assert record.list_runs()[0].config == {"rounds": 3}
    with pytest.raises(RecordError, match="already exists"):
        record.create_run({}, run_id="run-r")
    with pytest.raises(RecordError, match="no run"):
        record.get_run("absent")


# ----------------------------------------------------------------- model registry


def test_model_registry_round_trip_and_lineage(record: SqlRecord, tmp_path: Path) -> None:
    run = record.create_run({})
    v1 = record.add_model_version(
        run, 1, None, b"weights-1", {"accuracy": 0.5}, 1.0, 0.3, 0.01, [1, 2]
    )
    v2 = record.add_model_version(
        run, 2, v1.version, b"weights-2", {"accuracy": 0.6}, 2.0, 0.5, 0.02, [1]
    )
    assert record.latest_version(run) == v2
    assert [v.version for v in record.list_versions(run)] == [v1.version, v2.version]
    assert record.get_version(v2.version).parent == v1.version
    tagged = record.tag_version(v2.version, "released")
    assert tagged.tags == ("released",)
    dest = record.export_version(v2.version, tmp_path / "out.bin")
    assert dest.read_bytes() == b"weights-2"
    assert record.events()[-1].kind == "model_version_tagged"


def test_add_model_version_parent_from_other_run_refused(record: SqlRecord) -> None:
    run_a, run_b = record.create_run({}), record.create_run({})
    v = record.add_model_version(run_a, 1, None, b"a", {}, None, None, None, [])
    with pytest.raises(RecordError, match="parent"):
        record.add_model_version(run_b, 1, v.version, b"b", {}, None, None, None, [])


def test_export_version_artifact_altered_on_disk_refused(record: SqlRecord, tmp_path: Path) -> None:
    run = record.create_run({})
    v = record.add_model_version(run, 1, None, b"genuine weights", {}, None, None, None, [1])
    assert record.artifacts is not None
    path = record.artifacts.path(v.sha256)
    path.write_bytes(b"tampered weights")
    dest = tmp_path / "export.bin"
    with pytest.raises(IntegrityError, match="altered"):
        record.export_version(v.version, dest)
    assert not dest.exists()


def test_load_version_bytes_returns_the_artifact_and_refuses_an_altered_one(
    record: SqlRecord,
) -> None:
    run = record.create_run({})
    v = record.add_model_version(run, 1, None, b"genuine weights", {}, None, None, None, [1])
    assert record.load_version_bytes(v.version) == b"genuine weights"
    assert record.artifacts is not None
    record.artifacts.path(v.sha256).write_bytes(b"tampered weights")
    with pytest.raises(IntegrityError, match="altered"):
        record.load_version_bytes(v.version)
