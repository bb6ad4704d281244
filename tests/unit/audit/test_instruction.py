"""Signed instructions: the message layout, signatures, the signature record and sequence numbers."""

from __future__ import annotations

import hashlib
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.audit.instruction import (
    INSTRUCTION_DOMAIN,
    MAX_SEQ,
    InstructionHeader,
    InstructionSignature,
    InstructionSigner,
    key_fingerprint,
    next_sequence,
    verify_instruction,
)
from common.errors import DataError

KEY = Ed25519PrivateKey.from_private_bytes(b"\x05" * 32)
SIGNER = InstructionSigner(KEY)
DIGEST = bytes(range(32))


def header(**changes: object) -> InstructionHeader:
    fields: dict[str, object] = dict(
        message_type="train.secagg_masked", run_id="run-1", group_id="3",
        dst_node_id=1000, seq=(5 << 32) + 1, key_id=SIGNER.key_id,
    )  # fmt: skip
    fields.update(changes)
    return InstructionHeader(**fields)  # type: ignore[arg-type]


def test_message_layout_is_the_documented_one() -> None:
    expected = (
        b"fedseal/instruction/v1\x00"
        + struct.pack(">H", 19) + b"train.secagg_masked"
        + struct.pack(">H", 5) + b"run-1"
        + struct.pack(">H", 1) + b"3"
        + struct.pack(">QQ", 1000, (5 << 32) + 1)
        + hashlib.sha256(SIGNER.public_key).digest()
        + DIGEST
    )  # fmt: skip
    assert header().message(DIGEST) == expected
    assert InstructionHeader.parse_message(expected) == (header(), DIGEST)


def test_known_answer_signature() -> None:
    # Ed25519 is deterministic: this pins the layout and the key handling (change => new label).
    signature = SIGNER.sign(header(), DIGEST)
    assert hashlib.sha256(signature).hexdigest() == KNOWN_SIGNATURE_SHA256


KNOWN_SIGNATURE_SHA256 = "361427b9b6989aff07d7c464565f10eb3791d54f4a8a2dc05f6fb439a909f9c9"


@pytest.mark.parametrize(
    "change",
    [{"message_type": "train"}, {"run_id": "run-2"}, {"group_id": "4"}, {"dst_node_id": 1001},
     {"seq": (5 << 32) + 2}],
)  # fmt: skip
def test_every_header_field_is_signed(change: dict[str, object]) -> None:
    signature = SIGNER.sign(header(), DIGEST)
    assert verify_instruction(SIGNER.public_key, header().message(DIGEST), signature)
    assert not verify_instruction(SIGNER.public_key, header(**change).message(DIGEST), signature)
    assert not verify_instruction(SIGNER.public_key, header().message(bytes(32)), signature)


def test_verify_refuses_other_key_and_malformed_input() -> None:
    message = header().message(DIGEST)
    signature = SIGNER.sign(header(), DIGEST)
    other = InstructionSigner(Ed25519PrivateKey.from_private_bytes(b"\x06" * 32))
    assert not verify_instruction(other.public_key, message, signature)
    assert not verify_instruction(SIGNER.public_key, message, signature[:-1])
    assert not verify_instruction(SIGNER.public_key[:-1], message, signature)
    assert not verify_instruction(SIGNER.public_key, message, bytes(64))
    with pytest.raises(DataError, match="another signing key"):
        other.sign(header(), DIGEST)


def test_domain_separates_from_audit_heads() -> None:
    assert header().message(DIGEST).startswith(INSTRUCTION_DOMAIN)
    assert INSTRUCTION_DOMAIN != b"fedseal/audit-head/v1\x00"


@pytest.mark.parametrize(
    "change",
    [{"message_type": ""}, {"run_id": "r" * 257}, {"group_id": 3}, {"dst_node_id": -1},
     {"dst_node_id": True}, {"seq": 0}, {"seq": MAX_SEQ + 1}, {"seq": True}, {"key_id": b"k"}],
)  # fmt: skip
def test_header_fields_are_checked(change: dict[str, object]) -> None:
    with pytest.raises(DataError):
        header(**change)


@pytest.mark.parametrize("cut", [1, 10, 40, 70])
def test_parse_refuses_truncated_or_padded_messages(cut: int) -> None:
    message = header().message(DIGEST)
    with pytest.raises(DataError):
        InstructionHeader.parse_message(message[:-cut])
    with pytest.raises(DataError):
        InstructionHeader.parse_message(message + b"\x00")
    with pytest.raises(DataError):
        InstructionHeader.parse_message(
            b"fedseal/audit-head/v1\x00" + message[len(INSTRUCTION_DOMAIN) :]
        )


def test_signature_record_fields_round_trip_and_are_checked() -> None:
    sig = InstructionSignature(7, SIGNER.key_id, bytes(64))
    assert InstructionSignature.from_fields(sig.to_fields()) == sig
    good = sig.to_fields()
    for bad in (
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "seq"},
        {**good, "v": 2},
        {**good, "v": True},
        {**good, "seq": True},
        {**good, "seq": 0},
        {**good, "seq": "7"},
        {**good, "key-id": bytes(31)},
        {**good, "signature": bytes(65)},
        {**good, "signature": "00" * 64},
    ):
        with pytest.raises(DataError):
            InstructionSignature.from_fields(bad)


def test_next_sequence_grows_within_a_process_and_across_restarts() -> None:
    seq, used = 0, []
    for epoch in (0, 0, 3, 3, 3, 5):
        seq = next_sequence(seq, epoch)
        used.append(seq)
    assert used == sorted(set(used))
    assert used[:2] == [1, 2] and used[2] == 3 << 32 and used[-1] == 5 << 32
    # a resumed run's process starts from 0, but its epoch (the resume seal) is above the old one
    assert next_sequence(0, 6) > max(used)
    with pytest.raises(DataError):
        next_sequence(MAX_SEQ, 0)
    with pytest.raises(DataError):
        next_sequence(-1, 0)


def test_key_fingerprint_is_sha256_of_the_raw_key() -> None:
    assert key_fingerprint(SIGNER.public_key) == hashlib.sha256(SIGNER.public_key).digest()
    with pytest.raises(DataError):
        key_fingerprint(b"short")
