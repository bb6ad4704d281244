"""Signed heads: the server's Ed25519 signature over the head of its audit chain.

Guarantee
---------
A :class:`SignedHead` binds ``(record_id, seq, head_hash, time)`` under the
server's Ed25519 key. Because ``head_hash`` commits to every earlier event
(:mod:`common.audit.chain`), a valid signed head proves that the holder of the
private key vouched for the *entire* history up to ``seq`` at ``time``. Against
whom: anyone who can edit the central database but does not hold the server's
signing key (an insider with DB access, a backup restored from elsewhere, a
compromised replica). Sites keep the signed heads they receive; a history that
no longer contains a head they hold is detectably rewritten
(:mod:`common.audit.witness`).

Assumptions: Ed25519 is existentially unforgeable (RFC 8032); the verifier
has the genuine public key (out of band); the server does not sign two
conflicting heads (it would be caught by any two sites comparing heads).

Message layout (version 1): the ASCII domain label ``fedseal/audit-head/v1``,
a zero byte, then the canonical JSON of ``{"v": 1, "record_id", "seq",
"head_hash", "time"}``. The label keeps these signatures from being replayed
as any other fedseal signature.

References
----------
RFC 8032 (Edwards-Curve Digital Signature Algorithm), Section 5.1.
Laurie, Langley, Kasper, RFC 6962 (Certificate Transparency): signed tree
heads witnessed by third parties.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.audit.chain import MAX_FIELD_CHARS, canonical_json, is_hex_digest
from common.errors import ConfigurationError, DataError, IntegrityError

__all__ = [
    "HEAD_DOMAIN",
    "HEAD_VERSION",
    "MAX_ENCODED_HEAD_BYTES",
    "SignedHead",
    "load_public_key_pem",
    "public_key_hex",
    "public_key_from_hex",
    "sign_head",
]

HEAD_VERSION = 1
HEAD_DOMAIN = b"fedseal/audit-head/v1\x00"
SIGNATURE_BYTES = 64
MAX_ENCODED_HEAD_BYTES = 1024
"""Upper bound on :meth:`SignedHead.encode` output; :meth:`SignedHead.decode` refuses more."""


def _validate(record_id: object, seq: object, head_hash: object, time: object) -> None:
    if not isinstance(record_id, str) or not record_id or len(record_id) > MAX_FIELD_CHARS:
        raise DataError("signed head: record_id must be a non-empty string of <= 256 characters")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise DataError("signed head: seq must be a positive int")
    if not is_hex_digest(head_hash):
        raise DataError("signed head: head_hash must be 64 lowercase hex characters")
    if not isinstance(time, str) or not time or len(time) > MAX_FIELD_CHARS:
        raise DataError("signed head: time must be a non-empty string")


@dataclass(frozen=True, slots=True)
class SignedHead:
    """The server's signature over the chain head ``(record_id, seq, head_hash, time)``."""

    record_id: str
    seq: int
    head_hash: str
    time: str
    signature: bytes

    def __post_init__(self) -> None:
        _validate(self.record_id, self.seq, self.head_hash, self.time)
        if not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_BYTES:
            raise DataError("signed head: signature must be 64 bytes")

    def message(self) -> bytes:
        """The exact bytes that are signed."""
        return _message(self.record_id, self.seq, self.head_hash, self.time)

    def verify(self, public_key: Ed25519PublicKey) -> None:
        """Check the signature.

        Raises
        ------
        IntegrityError
            If the signature does not verify under ``public_key``.
        """
        try:
            public_key.verify(self.signature, self.message())
        except InvalidSignature:
            raise IntegrityError("signed head: signature does not verify") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (signature in hex)."""
        return {
            "v": HEAD_VERSION,
            "record_id": self.record_id,
            "seq": self.seq,
            "head_hash": self.head_hash,
            "time": self.time,
            "signature": self.signature.hex(),
        }

    def encode(self) -> bytes:
        """Versioned canonical-JSON bytes, at most :data:`MAX_ENCODED_HEAD_BYTES`."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: object) -> SignedHead:
        """Validate a dict as produced by :meth:`to_dict` (raises :class:`DataError`)."""
        if not isinstance(data, dict):
            raise DataError("signed head: expected a JSON object")
        expected = {"v", "record_id", "seq", "head_hash", "time", "signature"}
        if set(data) != expected:
            raise DataError(f"signed head: fields must be exactly {sorted(expected)}")
        version = data["v"]
        if isinstance(version, bool) or version != HEAD_VERSION:
            raise DataError(f"signed head: unsupported version {version!r}")
        signature = data["signature"]
        if not isinstance(signature, str) or len(signature) != 2 * SIGNATURE_BYTES:
            raise DataError("signed head: signature must be 128 hex characters")
        try:
            raw = bytes.fromhex(signature)
        except ValueError:
            raise DataError("signed head: signature is not hex") from None
        return cls(
            record_id=data["record_id"],
            seq=data["seq"],
            head_hash=data["head_hash"],
            time=data["time"],
            signature=raw,
        )

    @classmethod
    def decode(cls, data: bytes) -> SignedHead:
        """Parse :meth:`encode` output, checking size, version and every field.

        Raises
        ------
        DataError
            If ``data`` is too long, not UTF-8 JSON, or any field is invalid.
        """
        if not isinstance(data, bytes):
            raise DataError("signed head: expected bytes")
        if len(data) > MAX_ENCODED_HEAD_BYTES:
            raise DataError(f"signed head: {len(data)} bytes exceeds {MAX_ENCODED_HEAD_BYTES}")
        try:
            value = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise DataError("signed head: not UTF-8 JSON") from None
        return cls.from_dict(value)


def _message(record_id: str, seq: int, head_hash: str, time: str) -> bytes:
    body = {
        "v": HEAD_VERSION,
        "record_id": record_id,
        "seq": seq,
        "head_hash": head_hash,
        "time": time,
    }
    return HEAD_DOMAIN + canonical_json(body)


def sign_head(
    private_key: Ed25519PrivateKey, record_id: str, seq: int, head_hash: str, time: str
) -> SignedHead:
    """Sign the head ``(record_id, seq, head_hash, time)`` with the server's Ed25519 key.

    Raises
    ------
    DataError
        If any field is invalid (see :class:`SignedHead`).
    """
    _validate(record_id, seq, head_hash, time)
    signature = private_key.sign(_message(record_id, seq, head_hash, time))
    return SignedHead(record_id, seq, head_hash, time, signature)


def public_key_hex(public_key: Ed25519PublicKey) -> str:
    """The raw 32-byte public key in hex."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    """Parse a raw 32-byte Ed25519 public key given in hex (raises :class:`DataError`)."""
    try:
        raw = bytes.fromhex(text)
    except (TypeError, ValueError):
        raise DataError("public key is not hex") from None
    if len(raw) != 32:
        raise DataError("an Ed25519 public key is 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def load_public_key_pem(data: bytes) -> Ed25519PublicKey:
    """Parse a PEM SubjectPublicKeyInfo holding an Ed25519 key.

    Raises
    ------
    ConfigurationError
        If the data is not PEM or the key is not Ed25519.
    """
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise ConfigurationError("not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigurationError("the public key is not an Ed25519 key")
    return key
