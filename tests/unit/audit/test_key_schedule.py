"""Key rotation in the pure verifier, and the witnessed-heads verdict that sees a tail cut."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.audit.chain import GENESIS_HASH, AuditEvent, make_event
from common.audit.seal import (
    KEY_ROTATED,
    SignedHead,
    key_schedule,
    rotation_payload,
    sign_head,
    verify_chain,
)
from common.audit.witness import check_witness, parse_witness_lines, verify_with_witnesses
from common.errors import DataError

OLD = Ed25519PrivateKey.from_private_bytes(b"\x05" * 32)
NEW = Ed25519PrivateKey.from_private_bytes(b"\x06" * 32)
RID = "rec"


def history(rotate_at: int | None, n: int, previous: Ed25519PrivateKey = OLD) -> list[AuditEvent]:
    events: list[AuditEvent] = []
    prev = GENESIS_HASH
    for seq in range(1, n + 1):
        if seq == rotate_at:
            kind = KEY_ROTATED
            payload: dict[str, object] = dict(
                rotation_payload(previous.public_key(), NEW.public_key())
            )
        else:
            kind, payload = "k", {"i": seq}
        ev = make_event(prev, seq, "t", None, kind, "server", payload)
        events.append(ev)
        prev = ev.hash
    return events


def seal(key: Ed25519PrivateKey, events: list[AuditEvent], seq: int) -> SignedHead:
    return sign_head(key, RID, seq, events[seq - 1].hash, "t")


def test_rotation_sealed_by_the_old_key_hands_over_at_its_seq() -> None:
    events = history(3, 5)
    seals = [seal(OLD, events, 2), seal(OLD, events, 3), seal(NEW, events, 3), seal(NEW, events, 5)]
    schedule = key_schedule(events, seals, OLD.public_key(), RID)
    assert schedule.problem is None and len(schedule.epochs) == 2
    assert schedule.epochs[0].last_seq == 3 and schedule.epochs[1].first_seq == 3
    assert verify_chain(events, seals, OLD.public_key(), RID).ok


def test_the_retired_key_can_no_longer_seal_after_the_rotation() -> None:
    events = history(3, 5)
    seals = [seal(OLD, events, 3), seal(OLD, events, 5)]  # old key keeps sealing
    report = verify_chain(events, seals, OLD.public_key(), RID)
    assert not report.ok and report.first_bad_seq == 5
    assert "key in force at seq 5" in (report.problem or "")


def test_unsealed_rotation_refused_and_its_key_not_followed() -> None:
    events = history(3, 5)
    seals = [seal(OLD, events, 2), seal(NEW, events, 3), seal(NEW, events, 5)]
    report = verify_chain(events, seals, OLD.public_key(), RID)
    assert not report.ok and report.first_bad_seq == 3
    assert "not sealed by the key in force" in (report.problem or "")


def test_rotation_naming_another_previous_key_refused() -> None:
    stranger = Ed25519PrivateKey.generate()
    events = history(3, 3, previous=stranger)
    seals = [seal(OLD, events, 3), seal(NEW, events, 3)]
    report = verify_chain(events, seals, OLD.public_key(), RID)
    assert report.first_bad_seq == 3 and "claims to retire key" in (report.problem or "")


def test_malformed_rotation_refused() -> None:
    ev = make_event(GENESIS_HASH, 1, "t", None, KEY_ROTATED, "server", {"public_key": "zz"})
    report = verify_chain([ev], [sign_head(OLD, RID, 1, ev.hash, "t")], OLD.public_key(), RID)
    assert report.first_bad_seq == 1 and "malformed" in (report.problem or "")


def test_witnessed_head_by_the_rotated_key_is_accepted() -> None:
    events = history(3, 5)
    seals = [seal(OLD, events, 3), seal(NEW, events, 5)]
    heads = [seal(NEW, events, 5)]
    assert check_witness(heads, events, OLD.public_key(), RID, seals).ok
    # without the history's rotation seal, nothing puts the new key in force
    assert not check_witness(heads, events, OLD.public_key(), RID).ok


def test_verify_with_witnesses_reports_a_clean_tail_cut_at_the_first_missing_seq() -> None:
    events = history(None, 6)
    seals = [seal(OLD, events, 4), seal(OLD, events, 6)]
    witnessed = [seal(OLD, events, 6)]
    cut_events, cut_seals = events[:4], seals[:1]
    assert verify_chain(cut_events, cut_seals, OLD.public_key(), RID).ok  # the record alone
    report = verify_with_witnesses(cut_events, cut_seals, witnessed, OLD.public_key(), RID)
    assert not report.ok and report.first_bad_seq == 5
    assert "tampered" in (report.problem or "") and "truncated" in (report.problem or "")
    assert verify_with_witnesses(events, seals, witnessed, OLD.public_key(), RID).ok


def test_verify_with_witnesses_head_for_another_record_fails() -> None:
    events = history(None, 2)
    other = sign_head(OLD, "other", 2, events[1].hash, "t")
    report = verify_with_witnesses(events, [seal(OLD, events, 2)], [other], OLD.public_key(), RID)
    assert not report.ok and "record" in (report.problem or "")


def test_parse_witness_lines_reads_the_site_format_and_names_a_bad_line() -> None:
    events = history(None, 2)
    head = seal(OLD, events, 2)
    lines = [json.dumps({"head": head.encode().hex()}), "", "{}"]
    assert parse_witness_lines(lines[:2]) == [head]
    with pytest.raises(DataError, match="f:3"):
        parse_witness_lines(lines, "f")
