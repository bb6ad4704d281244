"""AES-256-GCM authenticated encryption with the protocol context bound in.

Guarantee: a ciphertext opens only under the same key *and* the same
associated data ``(version, run, round, sender, receiver, stage)``, so a
share replayed from another round, re-labelled as from another sender or
receiver, or moved to another stage fails to open; any modified byte fails to
open (IND-CCA2 and INT-CTXT of GCM, NIST SP 800-38D; McGrew & Viega 2004).

Nonces are 96 random bits from the OS CSPRNG, prepended to the ciphertext.
Each key in this protocol encrypts at most a handful of messages, far below
the 2^32 random-nonce limit of SP 800-38D §8.3.

Every failure (wrong size, wrong key, wrong associated data, tampering)
raises the same opaque :class:`~common.errors.IntegrityError`.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.errors import IntegrityError
from common.rng import secure_bytes

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE
"""Bytes a ciphertext is longer than its plaintext."""

_AD_PREFIX = b"fedseal/aead"
_AD = struct.Struct(">BQQQQB")


def associated_data(
    *, version: int, run_id: int, round: int, sender: int, receiver: int, stage: int
) -> bytes:
    """Canonical associated data for one protocol message.

    Layout: ``b"fedseal/aead" || u8 version || u64 run || u64 round ||
    u64 sender || u64 receiver || u8 stage`` (big-endian).
    """
    return _AD_PREFIX + _AD.pack(version, run_id, round, sender, receiver, stage)


def encrypt(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """Encrypt and authenticate ``plaintext``; returns ``nonce || ciphertext || tag``.

    Raises
    ------
    IntegrityError
        If the key is not 32 bytes.
    """
    if type(key) is not bytes or len(key) != KEY_SIZE:
        raise IntegrityError("authenticated encryption failed")
    nonce = secure_bytes(NONCE_SIZE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, blob: bytes, associated: bytes) -> bytes:
    """Authenticate and decrypt ``blob`` produced by :func:`encrypt`.

    Raises
    ------
    IntegrityError
        On any failure, with no detail about which check failed.
    """
    if (
        type(key) is not bytes
        or len(key) != KEY_SIZE
        or type(blob) is not bytes
        or len(blob) < OVERHEAD
    ):
        raise IntegrityError("authenticated decryption failed")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], associated)
    except (InvalidTag, ValueError):
        raise IntegrityError("authenticated decryption failed") from None
