"""Key parsing is strict and canonical; signature verification never raises."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.errors import ConfigurationError
from policies.keys import canonical_node_key, parse_ed25519_public_key, verify_ed25519


def test_parse_ed25519_public_key_all_encodings_same_raw_bytes() -> None:
    pub = Ed25519PrivateKey.generate().public_key()
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    pem = pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ssh = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    for form in (raw, raw.hex(), raw.hex().upper(), pem.decode(), ssh.decode() + " coordinator"):
        assert parse_ed25519_public_key(form) == raw


@pytest.mark.parametrize("bad", ["", "zz" * 32, "ab" * 31, "not a key"])
def test_parse_ed25519_public_key_malformed_raises(bad: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_ed25519_public_key(bad)


def test_parse_ed25519_public_key_ecdsa_key_raises() -> None:
    pem = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ConfigurationError, match="Ed25519"):
        parse_ed25519_public_key(pem.decode())


def test_canonical_node_key_drops_comment_and_matches_pem() -> None:
    pub = ec.generate_private_key(ec.SECP384R1()).public_key()
    ssh = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    pem = pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert canonical_node_key(ssh.decode() + " site@host\n") == ssh.decode()
    assert canonical_node_key(pem) == ssh.decode()


def test_canonical_node_key_garbage_raises() -> None:
    with pytest.raises(ConfigurationError):
        canonical_node_key("ecdsa-sha2-nistp384 AAAA")


def test_verify_ed25519_valid_true_tampered_false() -> None:
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    sig = key.sign(b"payload")
    assert verify_ed25519(raw, b"payload", sig)
    assert not verify_ed25519(raw, b"payloaD", sig)
    assert not verify_ed25519(raw, b"payload", sig[:-1] + bytes([sig[-1] ^ 1]))
    assert not verify_ed25519(raw, b"payload", sig[:10])
    assert not verify_ed25519(b"\x00" * 5, b"payload", sig)
