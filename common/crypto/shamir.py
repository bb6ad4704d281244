"""Shamir t-of-k secret sharing over the prime field GF(2^521 - 1).

Guarantee (information-theoretic): any ``t - 1`` shares of a secret are
jointly uniform and independent of it; any ``t`` shares with distinct non-zero
indices determine it (Shamir, "How to share a secret", CACM 1979). The field
is the Mersenne prime p = 2^521 - 1, so every 32-byte secret (< 2^256) is a
field element. Polynomial coefficients are drawn uniformly from GF(p) by
rejection sampling on 521-bit strings from the OS CSPRNG (no modulo bias).

Reconstruction is Lagrange interpolation at 0 over exactly ``t`` shares.
Duplicate or zero indices and out-of-field values raise
:class:`~common.errors.ProtocolError`; fewer than ``t`` shares raise
:class:`~common.errors.ProtocolAbort`; a result that is not a valid secret of
the expected size (inconsistent shares) raises
:class:`~common.errors.IntegrityError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.errors import ConfigurationError, IntegrityError, ProtocolAbort, ProtocolError
from common.rng import secure_bytes

PRIME = 2**521 - 1
"""The field modulus, the Mersenne prime M521."""
VALUE_SIZE = 66
"""Bytes of a big-endian encoded field element (ceil(521 / 8))."""
SECRET_SIZE = 32
MAX_INDEX = 2**32 - 1


@dataclass(frozen=True, slots=True)
class Share:
    """One Shamir share: the polynomial evaluated at ``index``.

    Attributes
    ----------
    index : int
        The evaluation point, in [1, 2^32).
    value : int
        The field element, in [0, p).
    """

    index: int
    value: int

    def __post_init__(self) -> None:
        if type(self.index) is not int or not 1 <= self.index <= MAX_INDEX:
            raise ProtocolError(f"a share index must be an int in [1, 2^32), got {self.index!r}")
        if type(self.value) is not int or not 0 <= self.value < PRIME:
            raise ProtocolError("a share value must be a field element")


def _random_field_element() -> int:
    while True:
        candidate = int.from_bytes(secure_bytes(VALUE_SIZE), "big") & PRIME
        if candidate < PRIME:
            return candidate


def split_secret(secret: bytes, *, threshold: int, indices: Sequence[int]) -> tuple[Share, ...]:
    """Split ``secret`` into one share per index, any ``threshold`` of which recover it.

    Parameters
    ----------
    secret : bytes
        Exactly 32 bytes.
    threshold : int
        ``t`` with 1 <= t <= len(indices).
    indices : Sequence[int]
        Distinct evaluation points in [1, 2^32).

    Raises
    ------
    ConfigurationError
        On a wrong-size secret, a threshold out of range, or duplicate indices.
    ProtocolError
        On an index out of range.
    """
    if type(secret) is not bytes or len(secret) != SECRET_SIZE:
        raise ConfigurationError(f"a shared secret must be exactly {SECRET_SIZE} bytes")
    if len(set(indices)) != len(indices):
        raise ConfigurationError("share indices must be distinct")
    if type(threshold) is not int or not 1 <= threshold <= len(indices):
        raise ConfigurationError(f"threshold must be in [1, {len(indices)}], got {threshold!r}")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [_random_field_element() for _ in range(threshold - 1)]
    shares = []
    for index in indices:
        value = 0
        for coefficient in reversed(coefficients):  # Horner's rule
            value = (value * index + coefficient) % PRIME
        shares.append(Share(index=index, value=value))
    return tuple(shares)


def combine_shares(shares: Sequence[Share], *, threshold: int) -> bytes:
    """Recover a 32-byte secret from at least ``threshold`` shares.

    Uses the ``threshold`` shares with the smallest indices.

    Raises
    ------
    ProtocolAbort
        If fewer than ``threshold`` shares are given.
    ProtocolError
        On a non-share, duplicate or zero index.
    IntegrityError
        If the interpolated value is not a 32-byte secret.
    """
    for share in shares:
        if not isinstance(share, Share):
            raise ProtocolError("not a Shamir share")
    indices = [share.index for share in shares]
    if len(set(indices)) != len(indices):
        raise ProtocolError("duplicate share indices")
    if type(threshold) is not int or threshold < 1:
        raise ConfigurationError(f"threshold must be a positive int, got {threshold!r}")
    if len(shares) < threshold:
        raise ProtocolAbort(f"{len(shares)} shares cannot reconstruct a {threshold}-of-k secret")
    chosen = sorted(shares, key=lambda share: share.index)[:threshold]
    secret = 0
    for j, share_j in enumerate(chosen):
        numerator, denominator = 1, 1
        for m, share_m in enumerate(chosen):
            if m != j:
                numerator = numerator * share_m.index % PRIME
                denominator = denominator * (share_m.index - share_j.index) % PRIME
        secret = (secret + share_j.value * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_SIZE):
        raise IntegrityError("shares do not reconstruct a valid secret")
    return secret.to_bytes(SECRET_SIZE, "big")


def encode_value(value: int) -> bytes:
    """A field element as 66 big-endian bytes."""
    if type(value) is not int or not 0 <= value < PRIME:
        raise ProtocolError("not a field element")
    return value.to_bytes(VALUE_SIZE, "big")


def decode_value(data: bytes) -> int:
    """Parse 66 big-endian bytes into a field element.

    Raises
    ------
    ProtocolError
        On a wrong size or a value >= p.
    """
    if type(data) is not bytes or len(data) != VALUE_SIZE:
        raise ProtocolError(f"a share value must be {VALUE_SIZE} bytes")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise ProtocolError("a share value must be a field element")
    return value
