"""Properties of the pure audit chain: canonical encoding, hashing, every tamper kind."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

import common.audit.chain as chain_module
from common.audit.chain import (
    GENESIS_HASH,
    AuditEvent,
    canonical_json,
    event_hash,
    make_event,
    parse_canonical_json,
)
from common.audit.seal import SignedHead, sign_head, verify_chain
from common.errors import DataError

KEY = Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)
RID = "record-1"


def build(n: int) -> list[AuditEvent]:
    events: list[AuditEvent] = []
    prev = GENESIS_HASH
    for seq in range(1, n + 1):
        ev = make_event(prev, seq, f"2025-01-01T00:00:{seq:02d}Z", "run", "k", "server", {"i": seq})
        events.append(ev)
        prev = ev.hash
    return events


def seal_at(events: list[AuditEvent], seq: int) -> SignedHead:
    return sign_head(KEY, RID, seq, events[seq - 1].hash, "t")


def verify(events: list[AuditEvent], seals: list[SignedHead]):
    return verify_chain(events, seals, KEY.public_key(), RID)


def test_canonical_json_sorted_compact_utf8() -> None:
    assert (
        canonical_json({"b": 1, "a": [1.5, "é", None, True]})
        == '{"a":[1.5,"é",null,true],"b":1}'.encode()
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_canonical_json_non_finite_refused(bad: float) -> None:
    with pytest.raises(DataError):
        canonical_json({"x": [bad]})


@pytest.mark.parametrize("bad", [{1: "a"}, {"x": b"bytes"}, {"x": {1, 2}}])
def test_canonical_json_non_json_refused(bad: object) -> None:
    with pytest.raises(DataError):
        canonical_json(bad)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(json_values)
def test_canonical_json_parse_round_trip_is_identity(value: object) -> None:
    text = canonical_json(value).decode()
    assert canonical_json(parse_canonical_json(text)).decode() == text


def test_parse_canonical_json_whitespace_refused() -> None:
    with pytest.raises(DataError):
        parse_canonical_json('{"a": 1}')


def test_event_hash_matches_independent_sha256() -> None:
    expected = hashlib.sha256(
        bytes(32)
        + b'{"actor":"s","kind":"k","payload":{"x":1},"run_id":null,"seq":1,"time":"t","v":1}'
    ).hexdigest()
    assert event_hash(GENESIS_HASH, 1, "t", None, "k", "s", {"x": 1}) == expected


def test_event_hash_bool_seq_refused() -> None:
    with pytest.raises(DataError):
        event_hash(GENESIS_HASH, True, "t", None, "k", "s", {})


@pytest.mark.parametrize("field", ["seq", "time", "run_id", "kind", "actor", "payload"])
def test_event_hash_every_field_changes_the_hash(field: str) -> None:
    base = {"seq": 1, "time": "t", "run_id": "r", "kind": "k", "actor": "a", "payload": {"x": 1}}
    changed = dict(base, **{field: {"seq": 2, "payload": {"x": 2}}.get(field, "other")})
    assert event_hash(GENESIS_HASH, **base) != event_hash(GENESIS_HASH, **changed)  # type: ignore[arg-type]


def test_verify_chain_intact_ok() -> None:
    events = build(6)
    report = verify(events, [seal_at(events, 3), seal_at(events, 6)])
    assert report.ok and report.summary() == "OK: 6 events, 2 seals"


@pytest.mark.parametrize("target", range(1, 7))
def test_verify_chain_edited_payload_named(target: int) -> None:
    events = build(6)
    events[target - 1] = dataclasses.replace(events[target - 1], payload_json='{"i":0}')
    report = verify(events, [seal_at(build(6), 6)])
    assert report.first_bad_seq == target and "hash mismatch" in (report.problem or "")


@pytest.mark.parametrize("target", range(1, 6))
def test_verify_chain_deleted_event_named(target: int) -> None:
    events = build(6)
    del events[target - 1]
    report = verify(events, [seal_at(build(6), 6)])
    assert report.first_bad_seq == target and "gap" in (report.problem or "")


@pytest.mark.parametrize("target", range(1, 6))
def test_verify_chain_swapped_export_lines_named(target: int) -> None:
    events = build(6)
    events[target - 1], events[target] = events[target], events[target - 1]
    report = verify(events, [seal_at(build(6), 6)])
    assert report.first_bad_seq == target


def test_verify_chain_duplicated_event_named() -> None:
    events = build(4)
    seals = [seal_at(events, 4)]
    events.insert(2, events[1])
    report = verify(events, seals)
    assert report.first_bad_seq == 3 and "out of order" in (report.problem or "")


def test_verify_chain_non_canonical_payload_refused() -> None:
    events = build(3)
    events[1] = dataclasses.replace(events[1], payload_json='{"i": 2}')
    report = verify(events, [seal_at(build(3), 3)])
    assert report.first_bad_seq == 2 and "malformed" in (report.problem or "")


def test_verify_chain_truncated_tail_named_by_first_missing_seq() -> None:
    events = build(6)
    seals = [seal_at(events, 3), seal_at(events, 6)]
    report = verify(events[:4], seals)
    assert report.first_bad_seq == 5 and "truncated tail" in (report.problem or "")


def test_verify_chain_unsealed_tail_named() -> None:
    events = build(6)
    report = verify(events, [seal_at(events, 4)])
    assert report.first_bad_seq == 5 and "unsealed tail" in (report.problem or "")


def test_verify_chain_no_seals_is_unsealed_from_start() -> None:
    assert verify(build(2), []).first_bad_seq == 1


def test_verify_chain_seal_of_other_record_refused() -> None:
    events = build(2)
    seal = sign_head(KEY, "other-record", 2, events[1].hash, "t")
    assert "other-record" in (verify(events, [seal]).problem or "")


def test_verify_chain_wrong_key_names_seal_seq() -> None:
    events = build(4)
    other = Ed25519PrivateKey.generate()
    seals = [seal_at(events, 2), sign_head(other, RID, 4, events[3].hash, "t")]
    report = verify(events, seals)
    assert report.first_bad_seq == 4 and "signature" in (report.problem or "")


def test_verify_chain_without_key_still_checks_seal_hash() -> None:
    events = build(3)
    seal = sign_head(KEY, RID, 3, "f" * 64, "t")
    report = verify_chain(events, [seal], None)
    assert report.first_bad_seq == 3 and "no longer matches" in (report.problem or "")


def test_chain_module_imports_nothing_else_of_the_audit_package() -> None:
    # The chain is the bottom layer: seals build on it, never the other way round.
    tree = ast.parse(Path(chain_module.__file__).read_text(encoding="utf-8"))
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert [name for name in imported if name.startswith("common.audit")] == []
