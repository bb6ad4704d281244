"""X25519 key pairs and Diffie-Hellman agreement (RFC 7748).

Guarantee: given two honestly generated key pairs, :func:`agree` yields the
same 32-byte shared secret on both sides, which is computationally hidden from
any party that sees only the public keys (CDH assumption on Curve25519).

Untrusted key bytes are never cast: :func:`parse_public_key` accepts exactly a
``bytes`` object of 32 bytes and raises :class:`~common.errors.ProtocolError`
on anything else; :func:`agree` raises :class:`~common.errors.IntegrityError`
when the peer key is a low-order point (the all-zero shared secret that
OpenSSL refuses, RFC 7748 §6.1), so a malicious peer cannot force a known key.

The shared secret is raw key material; always pass it through
:mod:`common.crypto.kdf` with a purpose label before use.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from common.errors import IntegrityError, ProtocolError

KEY_SIZE = 32
"""Size in bytes of raw X25519 public keys, private keys and shared secrets."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    """An X25519 key pair held in memory for one protocol round.

    Attributes
    ----------
    private_key : X25519PrivateKey
        The secret scalar (never serialised by this module).
    public_bytes : bytes
        The raw 32-byte public key to advertise.
    """

    private_key: X25519PrivateKey
    public_bytes: bytes


def generate_key_pair() -> KeyPair:
    """Generate a fresh X25519 key pair from the OpenSSL CSPRNG."""
    private_key = X25519PrivateKey.generate()
    return KeyPair(
        private_key=private_key, public_bytes=private_key.public_key().public_bytes_raw()
    )


def key_pair_from_private_bytes(data: bytes) -> KeyPair:
    """Rebuild a key pair from its raw 32-byte private key.

    Raises
    ------
    ProtocolError
        If ``data`` is not ``bytes`` of exactly 32 bytes.
    """
    if type(data) is not bytes or len(data) != KEY_SIZE:
        raise ProtocolError("an X25519 private key must be exactly 32 raw bytes")
    private_key = X25519PrivateKey.from_private_bytes(data)
    return KeyPair(
        private_key=private_key, public_bytes=private_key.public_key().public_bytes_raw()
    )


def private_bytes(key_pair: KeyPair) -> bytes:
    """Return the raw 32-byte private key (for Shamir sharing and sealed state only)."""
    return key_pair.private_key.private_bytes_raw()


def parse_public_key(data: object) -> X25519PublicKey:
    """Parse an untrusted raw X25519 public key.

    Parameters
    ----------
    data : object
        Must be a ``bytes`` object of exactly 32 bytes.

    Raises
    ------
    ProtocolError
        On any other type or length.
    """
    if type(data) is not bytes:
        raise ProtocolError(f"an X25519 public key must be bytes, got {type(data).__name__}")
    if len(data) != KEY_SIZE:
        raise ProtocolError(f"an X25519 public key must be {KEY_SIZE} bytes, got {len(data)}")
    return X25519PublicKey.from_public_bytes(data)


def agree(private_key: X25519PrivateKey, peer_public: bytes) -> bytes:
    """X25519 Diffie-Hellman: the 32-byte shared secret with ``peer_public``.

    Raises
    ------
    ProtocolError
        If ``peer_public`` is not 32 raw bytes.
    IntegrityError
        If the peer key is a low-order point (all-zero shared secret).
    """
    peer = parse_public_key(peer_public)
    try:
        return private_key.exchange(peer)
    except ValueError:
        raise IntegrityError("key agreement failed") from None
