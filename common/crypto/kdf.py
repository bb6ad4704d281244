"""HKDF-SHA256 key derivation with one versioned info label per purpose (RFC 5869).

Guarantee: keys derived for different purposes, runs, rounds or node pairs are
computationally independent, even from the same input secret, because each
derivation's HKDF ``info`` is a distinct, prefix-free string::

    info = label || 0x00 || u64(run_id) || u64(round) || u64(node_a) || u64(node_b)

(big-endian, node ids in ascending order so both ends of a pair derive the
same key; per-node and per-round derivations carry fewer fields). Labels
contain no zero byte, so the ``0x00`` separator makes the encoding
injective. Assumption: HMAC-SHA256 is a PRF and the input keying material
has enough min-entropy (an X25519 shared secret or 32 CSPRNG bytes)
(Krawczyk, "Cryptographic Extraction and Key Derivation", CRYPTO 2010).
The salt is empty (RFC 5869 §3.1 allows it for uniformly random-ish inputs).
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.errors import ConfigurationError

LABEL_SHARE_ENCRYPTION = b"fedseal/v1/share-encryption"
"""Key for the AEAD that carries Shamir shares from one client to another."""
LABEL_PAIRWISE_MASK = b"fedseal/v1/pairwise-mask"
"""PRG seed of the mask two neighbours add with opposite signs."""
LABEL_SELF_MASK = b"fedseal/v1/self-mask"
"""PRG seed of a client's own mask, derived from its shared seed ``b``."""
LABEL_NEIGHBOUR_GRAPH = b"fedseal/v1/neighbour-graph"
"""PRG seed of the public neighbour-graph permutation."""
LABEL_CLIENT_STATE = b"fedseal/v1/client-state"
"""Key that seals a client's round state under its site-held key."""
LABEL_RELEASE_CACHE = b"fedseal/v1/release-cache"
"""Key that seals a site's released replies at rest under its site-held key."""

LABELS = (
    LABEL_SHARE_ENCRYPTION,
    LABEL_PAIRWISE_MASK,
    LABEL_SELF_MASK,
    LABEL_NEIGHBOUR_GRAPH,
    LABEL_CLIENT_STATE,
    LABEL_RELEASE_CACHE,
)

KEY_SIZE = 32
_U64_MAX = 2**64 - 1


def _u64(name: str, value: int) -> bytes:
    if type(value) is not int or not 0 <= value <= _U64_MAX:
        raise ConfigurationError(f"{name} must be an int in [0, 2^64), got {value!r}")
    return struct.pack(">Q", value)


def _info(label: bytes, fields: tuple[tuple[str, int], ...]) -> bytes:
    if label not in LABELS:
        raise ConfigurationError(f"unknown key-derivation label {label!r}")
    return label + b"\x00" + b"".join(_u64(name, value) for name, value in fields)


def hkdf_sha256(secret: bytes, info: bytes, length: int = KEY_SIZE) -> bytes:
    """HKDF-SHA256 (empty salt) of ``secret`` with ``info``, ``length`` bytes."""
    if type(secret) is not bytes or len(secret) < 16:
        raise ConfigurationError("key-derivation input must be at least 16 bytes")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def pair_info(label: bytes, *, run_id: int, round: int, node_a: int, node_b: int) -> bytes:
    """The HKDF info string for a key shared by two nodes (order-independent)."""
    if node_a == node_b:
        raise ConfigurationError("a pairwise key needs two distinct nodes")
    low, high = sorted((node_a, node_b))
    return _info(label, (("run_id", run_id), ("round", round), ("node", low), ("node", high)))


def node_info(label: bytes, *, run_id: int, round: int, node_id: int) -> bytes:
    """The HKDF info string for a key owned by one node."""
    return _info(label, (("run_id", run_id), ("round", round), ("node_id", node_id)))


def round_info(label: bytes, *, run_id: int, round: int) -> bytes:
    """The HKDF info string for a per-round public value."""
    return _info(label, (("run_id", run_id), ("round", round)))


def derive_pair_key(
    secret: bytes, label: bytes, *, run_id: int, round: int, node_a: int, node_b: int
) -> bytes:
    """Derive a 32-byte key for a node pair from a shared secret.

    Both nodes obtain the same key whatever the argument order.

    Raises
    ------
    ConfigurationError
        On an unknown label, equal node ids, or ids/run/round outside [0, 2^64).
    """
    info = pair_info(label, run_id=run_id, round=round, node_a=node_a, node_b=node_b)
    return hkdf_sha256(secret, info)


def derive_node_key(secret: bytes, label: bytes, *, run_id: int, round: int, node_id: int) -> bytes:
    """Derive a 32-byte key bound to one node, run and round."""
    return hkdf_sha256(secret, node_info(label, run_id=run_id, round=round, node_id=node_id))


def derive_round_key(secret: bytes, label: bytes, *, run_id: int, round: int) -> bytes:
    """Derive a 32-byte key bound to one run and round."""
    return hkdf_sha256(secret, round_info(label, run_id=run_id, round=round))


def derive_site_key(secret: bytes, label: bytes) -> bytes:
    """Derive a 32-byte key for one purpose of a site's own secret (no run, round or node).

    Raises
    ------
    ConfigurationError
        On an unknown label or a secret shorter than 16 bytes.
    """
    return hkdf_sha256(secret, _info(label, ()))
