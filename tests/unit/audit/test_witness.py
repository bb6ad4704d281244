"""Witness checks catch what the record alone cannot: truncation with its seals, full rewrites."""

from __future__ import annotations

import dataclasses

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.audit.chain import GENESIS_HASH, AuditEvent, make_event
from common.audit.seal import sign_head, verify_chain
from common.audit.witness import check_witness

KEY = Ed25519PrivateKey.from_private_bytes(b"\x03" * 32)
RID = "rec"


def build(n: int, salt: str = "") -> list[AuditEvent]:
    events, prev = [], GENESIS_HASH
    for seq in range(1, n + 1):
        ev = make_event(prev, seq, "t", "run", "k", "server", {"i": seq, "s": salt})
        events.append(ev)
        prev = ev.hash
    return events


def test_check_witness_intact_history_ok() -> None:
    events = build(6)
    heads = [sign_head(KEY, RID, s, events[s - 1].hash, "t") for s in (2, 4, 6)]
    report = check_witness(heads, events, KEY.public_key(), RID)
    assert report.ok and "up to seq 6" in report.summary()


def test_check_witness_truncation_with_seals_caught() -> None:
    events = build(6)
    heads = [sign_head(KEY, RID, s, events[s - 1].hash, "t") for s in (4, 6)]
    # Truncated at the seal at 4, seal at 6 deleted: the record alone verifies...
    assert verify_chain(events[:4], heads[:1], KEY.public_key(), RID).ok
    # ...but the site holding the head at 6 sees the truncation.
    report = check_witness(heads, events[:4], KEY.public_key(), RID)
    assert not report.ok and "truncated" in report.summary()
    assert report.checks[0].ok and not report.checks[1].ok


def test_check_witness_rewritten_history_caught() -> None:
    original = build(4)
    head = sign_head(KEY, RID, 4, original[3].hash, "t")
    rewritten = build(4, salt="forged")  # consistent chain, different content
    report = check_witness([head], rewritten, KEY.public_key(), RID)
    assert not report.ok and "rewritten" in report.summary()


def test_check_witness_edit_before_head_caught() -> None:
    events = build(4)
    head = sign_head(KEY, RID, 4, events[3].hash, "t")
    events[1] = dataclasses.replace(events[1], payload_json='{"i":9,"s":""}')
    report = check_witness([head], events, KEY.public_key(), RID)
    assert not report.ok and "seq 2" in report.summary()


def test_check_witness_head_under_untrusted_key_refused() -> None:
    events = build(2)
    head = sign_head(Ed25519PrivateKey.generate(), RID, 2, events[1].hash, "t")
    assert not check_witness([head], events, KEY.public_key(), RID).ok


def test_check_witness_no_heads_not_ok() -> None:
    assert not check_witness([], build(2), KEY.public_key(), RID).ok
