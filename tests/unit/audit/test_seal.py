"""Signed heads: signatures bind every field; encode/decode round-trips and rejects junk."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.audit.seal import (
    MAX_ENCODED_HEAD_BYTES,
    SignedHead,
    load_public_key_pem,
    public_key_from_hex,
    public_key_hex,
    sign_head,
)
from common.errors import ConfigurationError, DataError, IntegrityError

KEY = Ed25519PrivateKey.from_private_bytes(b"\x02" * 32)


def head() -> SignedHead:
    return sign_head(KEY, "rec", 7, "ab" * 32, "2025-01-01T00:00:00Z")


def test_signed_head_verify_right_key_passes() -> None:
    head().verify(KEY.public_key())


def test_signed_head_verify_wrong_key_raises() -> None:
    with pytest.raises(IntegrityError):
        head().verify(Ed25519PrivateKey.generate().public_key())


@pytest.mark.parametrize(
    "change", [{"record_id": "other"}, {"seq": 8}, {"head_hash": "cd" * 32}, {"time": "later"}]
)
def test_signed_head_any_field_changed_fails_verification(change: dict[str, object]) -> None:
    forged = dataclasses.replace(head(), **change)
    with pytest.raises(IntegrityError):
        forged.verify(KEY.public_key())


def test_signed_head_encode_decode_round_trip() -> None:
    h = head()
    data = h.encode()
    assert len(data) <= MAX_ENCODED_HEAD_BYTES
    assert SignedHead.decode(data) == h


@pytest.mark.parametrize(
    "data",
    [
        b"x" * (MAX_ENCODED_HEAD_BYTES + 1),
        b"\xff\xfe",
        b"[]",
        b'{"v":2}',
    ],
)
def test_signed_head_decode_junk_refused(data: bytes) -> None:
    with pytest.raises(DataError):
        SignedHead.decode(data)


@pytest.mark.parametrize(
    "field,value",
    [("seq", True), ("seq", 0), ("head_hash", "AB" * 32), ("signature", "00"), ("extra", 1)],
)
def test_signed_head_decode_bad_field_refused(field: str, value: object) -> None:
    d = head().to_dict()
    d[field] = value
    with pytest.raises(DataError):
        SignedHead.from_dict(d)


def test_public_key_hex_round_trip() -> None:
    pk = KEY.public_key()
    assert public_key_hex(public_key_from_hex(public_key_hex(pk))) == public_key_hex(pk)
    with pytest.raises(DataError):
        public_key_from_hex("00" * 31)


def test_load_public_key_pem_non_ed25519_refused() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ConfigurationError):
        load_public_key_pem(pem)
    with pytest.raises(ConfigurationError):
        load_public_key_pem(b"not pem")
