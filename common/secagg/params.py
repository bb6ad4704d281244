"""The validated configuration of one secure-aggregation round.

Guarantee: a :class:`SecAggConfig` that exists is consistent. In particular

* ``1 <= t <= k <= n - 1`` and ``2t > k`` (a strict majority of a node's
  neighbours is needed to reconstruct either of its secrets, so a server
  that sends inconsistent survivor lists to different neighbours cannot
  obtain both the self-mask seed and the mask key of one node; Bonawitz et
  al. 2017 §4; Bell et al. 2020 §3);
* ``k`` is ``n - 1`` (complete graph) or even (a circulant k-regular graph);
* the quantisation cannot wrap: with ``M = ceil(value_bound * scale)`` every
  quantised coordinate lies in ``[-M, M]`` and ``n * M <= 2^(b-1) - 1``, so
  the sum of ``n`` inputs read as a signed integer modulo ``2^b`` is exact.

Anything else raises :class:`~common.errors.ConfigurationError` at
construction. The configuration is public (it carries no secret) and
travels to clients via :meth:`SecAggConfig.encode`.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.crypto.prg import ring_dtype
from common.errors import ConfigurationError

PROTOCOL_VERSION = 3
"""Wire version of this implementation: the message header's and the encoded
configuration's version byte, also bound into every share's AEAD associated
data and every sealed client state (via the configuration digest), so a
message or ciphertext of another version is rejected.

3: authenticated SecAgg+ (:mod:`common.secagg.signing`): advertisements
signed by roster identities, the neighbour-graph seed derived from them
(the configuration no longer carries a server-chosen seed), a signed
consistency round before unmasking.
2: ``AdvertiseKeysReply`` carries a commitment to the self-mask seed.
1: initial format. The key-derivation labels carry their own version (``v1``
in :mod:`common.crypto.kdf`); their derivations are unchanged in version 2.
"""
NEIGHBOUR_FACTOR = 3.0
"""``c`` in the default neighbour degree ``k = c * log2(n)`` (rounded up to even)."""
MIN_BITS = 8
MAX_BITS = 53
"""Up to 53 bits so that every quantised sum is exact in a float64 mantissa."""
MAX_COHORT = 65_536
IDENTITY_SIZE = 32
"""A roster identity key: raw Ed25519 public bytes."""
MAX_VECTOR_LENGTH = 2**32 - 1
_U64_MAX = 2**64 - 1

_MAGIC = b"fsac"
_HEAD = struct.Struct(">4sBQQI")
_TAIL = struct.Struct(">IIIdBd")


@dataclass(frozen=True, slots=True)
class SecAggConfig:
    """Public parameters of one secure-aggregation round; build with :func:`make_config`.

    Attributes
    ----------
    version : int
        Protocol version (:data:`PROTOCOL_VERSION`).
    run_id, round : int
        The run and round this configuration belongs to (bound into every key and message).
    cohort : tuple[int, ...]
        The sorted, distinct node ids invited to the round.
    identities : tuple[bytes, ...]
        The roster identity key (32 raw Ed25519 bytes) of each cohort node, in
        cohort order, all distinct (protocol v3). Every advertisement signs
        this configuration's digest, so all honest sites that exchange shares
        bind each node id to the same identity (:mod:`common.secagg.signing`).
    threshold : int
        ``t``: shares needed to reconstruct a node's secret; minimum live neighbours.
    neighbours : int
        ``k``: degree of the neighbour graph.
    vector_length : int
        Number of coordinates ``d`` of every input.
    value_bound : float
        Every input coordinate must satisfy ``|x| <= value_bound``.
    bits : int
        ``b``: arithmetic is in Z_{2^b}.
    scale : float
        Quantisation scale: ``x`` becomes a stochastic rounding of ``x * scale``.
    """

    version: int
    run_id: int
    round: int
    cohort: tuple[int, ...]
    identities: tuple[bytes, ...]
    threshold: int
    neighbours: int
    vector_length: int
    value_bound: float
    bits: int
    scale: float

    @property
    def size(self) -> int:
        """``n``, the number of invited clients."""
        return len(self.cohort)

    @property
    def dtype(self) -> np.dtype[Any]:
        """Little-endian word type of ring elements (uint32 for b <= 32, else uint64)."""
        return ring_dtype(self.bits)

    @property
    def max_quantised(self) -> int:
        """``M = ceil(value_bound * scale)``: the largest magnitude of a quantised coordinate."""
        return math.ceil(self.value_bound * self.scale)

    @property
    def masked_size(self) -> int:
        """Bytes of one masked vector on the wire."""
        return self.vector_length * self.dtype.itemsize

    def share_index(self, node_id: int) -> int:
        """The Shamir evaluation point of ``node_id``: its 1-based position in the cohort.

        Raises
        ------
        ConfigurationError
            If ``node_id`` is not in the cohort.
        """
        position = bisect.bisect_left(self.cohort, node_id)
        if position == len(self.cohort) or self.cohort[position] != node_id:
            raise ConfigurationError(f"node {node_id} is not in the cohort")
        return position + 1

    def identity_of(self, node_id: int) -> bytes:
        """The roster identity key the configuration binds to ``node_id``.

        Raises
        ------
        ConfigurationError
            If ``node_id`` is not in the cohort.
        """
        return self.identities[self.share_index(node_id) - 1]

    def contains(self, node_id: object) -> bool:
        """Whether ``node_id`` is an int (not bool) naming a cohort member."""
        if type(node_id) is not int:
            return False
        position = bisect.bisect_left(self.cohort, node_id)
        return position < len(self.cohort) and self.cohort[position] == node_id

    def encode(self) -> bytes:
        """Canonical bytes of this configuration (big-endian, fixed layout)."""
        head = _HEAD.pack(_MAGIC, self.version, self.run_id, self.round, len(self.cohort))
        ids = struct.pack(f">{len(self.cohort)}Q", *self.cohort) + b"".join(self.identities)
        tail = _TAIL.pack(
            self.threshold,
            self.neighbours,
            self.vector_length,
            self.value_bound,
            self.bits,
            self.scale,
        )
        return head + ids + tail

    def digest(self) -> bytes:
        """SHA-256 of :meth:`encode`, to bind state to this exact configuration."""
        return hashlib.sha256(self.encode()).digest()

    @classmethod
    def decode(cls, data: bytes) -> SecAggConfig:
        """Parse and re-validate bytes from :meth:`encode`.

        Raises
        ------
        ConfigurationError
            On a wrong type, size, magic, version, or any invalid value.
        """
        if type(data) is not bytes or len(data) < _HEAD.size + _TAIL.size:
            raise ConfigurationError("secure-aggregation configuration: too short or not bytes")
        magic, version, run_id, round_, count = _HEAD.unpack_from(data)
        if magic != _MAGIC or version != PROTOCOL_VERSION:
            raise ConfigurationError("secure-aggregation configuration: unknown format or version")
        entry = 8 + IDENTITY_SIZE
        if count > MAX_COHORT or len(data) != _HEAD.size + entry * count + _TAIL.size:
            raise ConfigurationError("secure-aggregation configuration: wrong size")
        cohort = struct.unpack_from(f">{count}Q", data, _HEAD.size)
        start = _HEAD.size + 8 * count
        identities = [
            data[start + i * IDENTITY_SIZE : start + (i + 1) * IDENTITY_SIZE] for i in range(count)
        ]
        t, k, d, bound, bits, scale = _TAIL.unpack_from(data, _HEAD.size + entry * count)
        if list(cohort) != sorted(set(cohort)):
            raise ConfigurationError("secure-aggregation configuration: cohort not canonical")
        config = make_config(
            run_id=run_id,
            round=round_,
            cohort=cohort,
            identities=identities,
            threshold=t,
            value_bound=bound,
            vector_length=d,
            bits=bits,
            neighbours=k,
            scale=scale,
        )
        if config.encode() != data:
            raise ConfigurationError("secure-aggregation configuration: not canonical")
        return config


def _check_u64(name: str, value: object) -> int:
    if type(value) is not int or not 0 <= value <= _U64_MAX:
        raise ConfigurationError(f"{name} must be an int in [0, 2^64), got {value!r}")
    return value


def _normalise_degree(k: int, n: int) -> int:
    """Round ``k`` up to a degree a circulant graph on ``n`` nodes can have."""
    if k >= n - 1:
        return n - 1
    k += k % 2
    return n - 1 if k >= n - 1 else k


def default_neighbours(n: int) -> int:
    """Default degree: ``ceil(c * log2 n)`` rounded up to even, or ``n - 1`` for small ``n``."""
    return _normalise_degree(max(1, math.ceil(NEIGHBOUR_FACTOR * math.log2(n))), n)


def default_scale(value_bound: float, bits: int, n: int) -> float:
    """The scale :func:`make_config` gives ``n`` clients by default: the largest that cannot wrap.

    The largest float ``s <= floor((2^(b-1) - 1) / n) / value_bound`` with
    ``n * ceil(value_bound * s) <= 2^(b-1) - 1``; it never grows with ``n``,
    so the scale of a cohort of at most ``n`` clients is at least this one.

    Raises
    ------
    ConfigurationError
        If ``n`` clients cannot share a ``bits``-bit ring at all.
    """
    largest = ((1 << (bits - 1)) - 1) // n
    if largest < 1:
        raise ConfigurationError(f"{n} clients cannot share a {bits}-bit ring without wrapping")
    chosen = largest / value_bound
    while math.ceil(value_bound * chosen) > largest:
        chosen = math.nextafter(chosen, 0.0)
    return chosen


def _choose_scale(value_bound: float, bits: int, n: int, scale: float | None) -> float:
    limit = (1 << (bits - 1)) - 1
    if scale is None:
        return default_scale(value_bound, bits, n)
    if type(scale) is not float or not math.isfinite(scale) or scale <= 0:
        raise ConfigurationError(f"scale must be a positive finite float, got {scale!r}")
    if n * math.ceil(value_bound * scale) > limit:
        raise ConfigurationError(
            f"the sum of {n} inputs bounded by {value_bound} at scale {scale} can wrap "
            f"Z_2^{bits}: need n * ceil(bound * scale) <= 2^{bits - 1} - 1"
        )
    return scale


def resolve_threshold(
    threshold: float | int, n: int, neighbours: int | None = None
) -> tuple[int, int]:
    """The ``(t, k)`` a threshold setting gives a cohort of ``n`` clients (not yet validated).

    The one place a threshold fraction becomes a count: a float in (0.5, 1]
    is a fraction of the neighbour degree, ``t = ceil(fraction * k)`` with
    ``k`` the default degree for ``n`` unless given; an int is ``t`` itself,
    with the default degree raised to at least ``t``. :func:`make_config`
    validates the pair.

    Raises
    ------
    ConfigurationError
        For a fraction outside (0.5, 1], a non-int degree or another type.
    """
    if type(threshold) is float:
        if not 0.5 < threshold <= 1.0:
            raise ConfigurationError(f"a threshold fraction must be in (0.5, 1], got {threshold}")
        k = default_neighbours(n) if neighbours is None else neighbours
        if type(k) is not int:
            raise ConfigurationError(f"neighbours must be an int, got {k!r}")
        return math.ceil(threshold * k), k
    if type(threshold) is int:
        if neighbours is None:
            return threshold, _normalise_degree(max(default_neighbours(n), threshold), n)
        return threshold, neighbours
    raise ConfigurationError(
        f"threshold must be a float fraction or an int count, got {threshold!r}"
    )


def make_config(
    *,
    run_id: int,
    round: int,
    cohort: Sequence[int],
    identities: Sequence[bytes],
    threshold: float | int,
    value_bound: float,
    vector_length: int,
    bits: int = 32,
    neighbours: int | None = None,
    scale: float | None = None,
) -> SecAggConfig:
    """Build a validated :class:`SecAggConfig`.

    Parameters
    ----------
    run_id, round : int
        In [0, 2^64).
    cohort : Sequence[int]
        At least 2 distinct node ids in [1, 2^64); stored sorted.
    identities : Sequence[bytes]
        Each cohort node's 32-byte roster identity key, in the order of
        ``cohort`` as given (reordered with it); all distinct.
    threshold : float or int
        A float in (0.5, 1] is a fraction of the neighbour degree
        (``t = ceil(fraction * k)``); an int is the count ``t`` itself.
    value_bound : float
        Positive, finite bound on every input coordinate's magnitude.
    vector_length : int
        ``d`` in [1, 2^32).
    bits : int
        Ring size exponent ``b`` in [8, 53]; 32 (uint32 words) is fastest.
    neighbours : int or None
        Degree ``k``; default ``ceil(3 log2 n)`` rounded up to even and at
        least ``t``, or ``n - 1`` when that is not smaller.
    scale : float or None
        Quantisation scale; default the largest one that cannot wrap,
        ``floor((2^(b-1) - 1) / n) / value_bound``.

    Raises
    ------
    ConfigurationError
        On any invalid or inconsistent value (see the module docstring).
    """
    _check_u64("run_id", run_id)
    _check_u64("round", round)
    if isinstance(cohort, str | bytes) or not isinstance(cohort, Sequence):
        raise ConfigurationError("cohort must be a sequence of node ids")
    ids = tuple(_check_u64("node id", node) for node in cohort)
    if len(set(ids)) != len(ids) or 0 in ids:
        raise ConfigurationError("cohort node ids must be distinct and non-zero")
    n = len(ids)
    if isinstance(identities, str | bytes) or not isinstance(identities, Sequence):
        raise ConfigurationError("identities must be a sequence of 32-byte keys")
    keys = tuple(identities)
    if len(keys) != n or any(type(k) is not bytes or len(k) != IDENTITY_SIZE for k in keys):
        raise ConfigurationError(f"identities must be {n} keys of exactly {IDENTITY_SIZE} bytes")
    if len(set(keys)) != n:
        raise ConfigurationError("every cohort node needs its own identity (two share one)")
    bound_to = dict(zip(ids, keys, strict=True))
    if not 2 <= n <= MAX_COHORT:
        raise ConfigurationError(f"a secure-aggregation cohort needs 2..{MAX_COHORT} clients")
    if type(bits) is not int or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigurationError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    if type(vector_length) is not int or not 1 <= vector_length <= MAX_VECTOR_LENGTH:
        raise ConfigurationError(
            f"vector_length must be an int in [1, 2^32), got {vector_length!r}"
        )
    if (
        isinstance(value_bound, bool)
        or not isinstance(value_bound, int | float)
        or not math.isfinite(value_bound)
        or value_bound <= 0
    ):
        raise ConfigurationError(f"value_bound must be positive and finite, got {value_bound!r}")
    bound = float(value_bound)

    t, k = resolve_threshold(threshold, n, neighbours)
    if type(k) is not int or not 1 <= k <= n - 1:
        raise ConfigurationError(f"neighbours must be an int in [1, {n - 1}], got {k!r}")
    if k != n - 1 and k % 2:
        raise ConfigurationError(f"neighbours must be even or n - 1 = {n - 1}, got {k}")
    if not 1 <= t <= k:
        raise ConfigurationError(f"threshold {t} must be in [1, neighbours = {k}]")
    if 2 * t <= k:
        raise ConfigurationError(
            f"threshold {t} must exceed half the neighbours ({k}) so that no node's two "
            "secrets can both be reconstructed"
        )
    chosen_scale = _choose_scale(bound, bits, n, scale)
    return SecAggConfig(
        version=PROTOCOL_VERSION,
        run_id=run_id,
        round=round,
        cohort=tuple(sorted(ids)),
        identities=tuple(bound_to[node] for node in sorted(ids)),
        threshold=t,
        neighbours=k,
        vector_length=vector_length,
        value_bound=bound,
        bits=bits,
        scale=chosen_scale,
    )
