"""SHA-256 hash commitment to a client's 32-byte self-mask seed.

Guarantee: a client publishes ``commit_seed(b, run, round, node)`` before it
shares ``b``; afterwards the server accepts a reconstructed seed only if it
opens that commitment, so no share holder can make the server accept a
different seed for that node, run and round.

* Binding: opening one commitment with two seeds is a SHA-256 collision
  (collision resistance of SHA-256; FIPS 180-4).
* Hiding: ``b`` is 32 uniform CSPRNG bytes, used for nothing but this
  commitment, its Shamir shares and the HKDF-derived self-mask seed; modelling
  SHA-256 as a random oracle, the commitment reveals nothing about ``b`` to a
  party that cannot evaluate SHA-256 on the order of 2^256 times (Bellare and
  Rogaway, "Random Oracles are Practical", CCS 1993). The same model makes it
  independent of ``HKDF(b, self-mask label, ...)``, which is HMAC-SHA256 keyed
  by an extract of ``b``, a different oracle query.

The committed string is injective in its fields::

    LABEL_SEED_COMMITMENT || 0x00 || u64(run) || u64(round) || u64(node) || b

(the label contains no zero byte, every later field has a fixed size), so a
commitment for one node, run or round never opens for another.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from common.errors import ConfigurationError

LABEL_SEED_COMMITMENT = b"fedseal/v1/seed-commitment"
"""Domain-separation label of the self-mask seed commitment (its first version)."""
COMMITMENT_SIZE = 32
SEED_SIZE = 32
_FIELDS = struct.Struct(">QQQ")
_U64_MAX = 2**64 - 1


def _check_u64(name: str, value: object) -> int:
    if type(value) is not int or not 0 <= value <= _U64_MAX:
        raise ConfigurationError(f"{name} must be an int in [0, 2^64), got {value!r}")
    return value


def commit_seed(seed: bytes, *, run_id: int, round: int, node_id: int) -> bytes:
    """The 32-byte commitment to ``seed`` for this node, run and round.

    Raises
    ------
    ConfigurationError
        If ``seed`` is not 32 bytes or an id is outside [0, 2^64).
    """
    if type(seed) is not bytes or len(seed) != SEED_SIZE:
        raise ConfigurationError(f"a committed seed must be exactly {SEED_SIZE} bytes")
    fields = _FIELDS.pack(
        _check_u64("run_id", run_id), _check_u64("round", round), _check_u64("node_id", node_id)
    )
    return hashlib.sha256(LABEL_SEED_COMMITMENT + b"\x00" + fields + seed).digest()


def opens(commitment: bytes, seed: bytes, *, run_id: int, round: int, node_id: int) -> bool:
    """Whether ``seed`` opens ``commitment`` for this node, run and round (constant time).

    A ``seed`` of the wrong size does not open anything (returns False).
    """
    if type(seed) is not bytes or len(seed) != SEED_SIZE:
        return False
    expected = commit_seed(seed, run_id=run_id, round=round, node_id=node_id)
    return hmac.compare_digest(expected, commitment)
