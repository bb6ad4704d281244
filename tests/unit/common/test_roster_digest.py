"""The roster's cached signed bytes and digest are the ones its fields give, and stay so."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.errors import IntegrityError
from common.roster import Roster, RosterMember, _signed_bytes, sign_roster

AUTHORITY = Ed25519PrivateKey.from_private_bytes(b"\x05" * 32)


def _key(i: int) -> bytes:
    return (
        Ed25519PrivateKey.from_private_bytes(bytes([0x60 + i]) * 32).public_key().public_bytes_raw()
    )


def _roster(n: int = 4) -> Roster:
    members = [RosterMember(f"site-{i}", _key(i)) for i in range(n)]
    return sign_roster(
        federation="scale", version=1, coordinator_key=None, members=members, authority=AUTHORITY
    )


def test_cached_digest_is_the_digest_of_the_fields() -> None:
    r = _roster()
    fresh = _signed_bytes(r.federation, r.version, r.coordinator_key, r.members, r.authority_key)
    assert r.signed_bytes() == fresh
    assert r.digest() == hashlib.sha256(fresh).digest()


def test_an_edited_copy_gets_its_own_digest_and_fails_verification() -> None:
    r = _roster()
    edited = dataclasses.replace(r, members=(*r.members, RosterMember("sybil", _key(9))))
    assert edited.digest() != r.digest()
    assert edited != r and _roster() == r and hash(_roster()) == hash(r)
    r.verify(AUTHORITY.public_key().public_bytes_raw())
    with pytest.raises(IntegrityError):
        edited.verify(AUTHORITY.public_key().public_bytes_raw())
