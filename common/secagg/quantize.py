"""Stochastic rounding of bounded real vectors into Z_{2^b}, and back for sums.

Guarantee. Let ``s = config.scale``, ``M = ceil(fl(value_bound * s))`` and ``n`` the
cohort size; :func:`~common.secagg.params.make_config` ensures
``n * M <= 2^(b-1) - 1``. For an input ``x`` with ``|x_j| <= value_bound``:

1. :func:`quantize` returns ``q_j mod 2^b`` where ``q_j = floor(y_j) + B_j``,
   ``y_j = fl(x_j * s)`` and ``B_j ~ Bernoulli(y_j - floor(y_j))`` drawn from
   the given generator; hence ``E[q_j] = y_j`` (unbiased), ``|q_j - y_j| < 1``
   and ``|q_j| <= M`` (rounding is monotone, so ``|y_j| <= fl(bound * s) <= M``).
2. For ``m <= n`` such inputs the integer sum ``S_j = sum_i q_ij`` satisfies
   ``|S_j| <= n * M < 2^(b-1)``, so reading the ring sum as a signed integer in
   ``[-2^(b-1), 2^(b-1))`` recovers ``S_j`` exactly (:func:`lift_signed`).
3. :func:`dequantize_sum` returns ``fl(S_j / s)``, and for every coordinate
   (exact real arithmetic on the right, ``u = 2^-53`` the float64 unit roundoff)::

       |fl(S_j / s) - sum_i x_ij| < m (1 + u) / s + 3 m u value_bound

   Proof: split the error as ``A + B + C`` with
   ``A = fl(S_j / s) - S_j / s``, ``B = (S_j - sum_i y_ij) / s`` and
   ``C = sum_i (y_ij - x_ij s) / s``. One rounding gives
   ``|A| <= u |S_j| / s <= u m M / s < u m (2 value_bound + 1 / s)`` since
   ``M < fl(value_bound s) + 1 <= value_bound s (1 + u) + 1``; (1) gives ``|B| < m / s``; one rounding
   per product gives ``|C| <= m u value_bound``. Summing proves the bound,
   which :func:`error_bound` returns.
4. Sensitivity after rounding (:func:`quantised_l2_bound`). For one input with
   ``||x||_2 <= C`` (``d`` coordinates), what it adds to the exact sum of step 2
   read back at scale ``s`` is ``q / s``, and ``||q / s||_2 < C (1 + u) + sqrt(d) / s``.
   Proof: ``q / s = x + (y - x s) / s + (q - y) / s``. One rounding per product
   gives ``|y_j - x_j s| <= u |x_j| s``, so the middle term's norm is at most
   ``u C``; by (1) every coordinate of the last term is below ``1 / s`` in
   magnitude, so its norm is below ``sqrt(d) / s``; the triangle inequality
   finishes. The bound is approached when every coordinate is rounded up from
   just above an integer, so nothing smaller holds for every coin sequence.
   Hence one site moves the secure sum by up to ``C + sqrt(d) / s``, not ``C``:
   that, not ``C``, is the L2 sensitivity a DP mechanism on a secure sum is
   calibrated to (issue 13 measured norms up to 7.05 for ``C = 5`` at 8 bits).

The generator is passed in (never a global one). Production callers pass
:func:`common.rng.secure_generator` (a ChaCha20 keystream keyed from the OS
CSPRNG), so the rounding coins are unpredictable to the server and to anyone
who does not observe the site's process memory; a seeded numpy generator is
for simulations and tests only. The coins are the 53-bit uniforms of
:meth:`common.rng.ChaCha20Random.random`: ``P[B_j = 1]`` differs from the
fractional part by less than ``2^-53``.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from common.crypto.prg import CHUNK_WORDS, RingArray
from common.errors import ConfigurationError, DataError
from common.rng import ChaCha20Random, RandomSource
from common.secagg.params import SecAggConfig


def error_bound(config: SecAggConfig, count: int) -> float:
    """The per-coordinate bound on ``|dequantize_sum(S) - sum x|`` for ``count`` inputs."""
    unit = 2.0**-53
    return count * (1.0 + unit) / config.scale + 3.0 * count * unit * config.value_bound


def rounding_slack(vector_length: int, scale: float) -> float:
    """``sqrt(d) / s``: a strict bound on ``||q / s - x||_2`` from stochastic rounding (item 4).

    Raises
    ------
    ConfigurationError
        Unless ``vector_length`` is a positive int and ``scale`` positive and finite.
    """
    if isinstance(vector_length, bool) or not isinstance(vector_length, int) or vector_length < 1:
        raise ConfigurationError(f"vector_length must be a positive int, got {vector_length!r}")
    if isinstance(scale, bool) or not isinstance(scale, int | float):
        raise ConfigurationError(f"scale must be a positive finite number, got {scale!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ConfigurationError(f"scale must be a positive finite number, got {scale!r}")
    return math.sqrt(vector_length) / float(scale)


def quantised_l2_bound(clip_norm: float, vector_length: int, scale: float) -> float:
    """L2 bound on one quantised input as it reaches the dequantised sum (module item 4).

    Parameters
    ----------
    clip_norm : float
        ``C > 0``: the input's L2 norm before quantisation (its clipping bound).
    vector_length : int
        ``d``, coordinates per input.
    scale : float
        The quantisation scale ``s`` (``SecAggConfig.scale``); a smaller scale
        gives a larger bound, so pass the smallest scale any round can get.

    Returns
    -------
    float
        ``C (1 + 2^-40) + sqrt(d) / s``, strictly above ``||q / s||_2`` (it
        covers the ``u C`` of item 4 with room to spare).

    Raises
    ------
    ConfigurationError
        For a value outside its domain.
    """
    if isinstance(clip_norm, bool) or not isinstance(clip_norm, int | float):
        raise ConfigurationError(f"clip_norm must be a positive finite number, got {clip_norm!r}")
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ConfigurationError(f"clip_norm must be a positive finite number, got {clip_norm!r}")
    return float(clip_norm) * (1.0 + 2.0**-40) + rounding_slack(vector_length, scale)


def _check_array(x: object, config: SecAggConfig) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "fiu" or x.dtype == np.bool_:
        raise DataError("a secure-aggregation input must be a real numpy array")
    if x.shape != (config.vector_length,):
        raise DataError(f"input shape {x.shape} != ({config.vector_length},)")
    return x


def _out_of_bound(bound: float) -> DataError:
    return DataError(
        f"input has entries that are not finite or exceed the bound {bound}; "
        "clip before secure aggregation"
    )


def check_input(x: object, config: SecAggConfig) -> npt.NDArray[np.float64]:
    """Validate an input vector and return it as float64.

    Raises
    ------
    DataError
        If ``x`` is not a 1-D real array of length ``vector_length`` whose
        entries are finite with ``|x_j| <= value_bound``.
    """
    values = np.asarray(_check_array(x, config), dtype=np.float64)
    if not np.all(np.abs(values) <= config.value_bound):  # False for NaN too
        raise _out_of_bound(config.value_bound)
    return values


def quantize(x: object, config: SecAggConfig, rng: RandomSource) -> RingArray:
    """Stochastically round ``x * scale`` and embed it into Z_{2^b}.

    The vector is processed in cache-sized chunks (converted to float64
    chunk by chunk, so a float32 input needs no full float64 copy); the
    coins are drawn in order, so the output is the same as rounding the whole
    vector at once with ``rng.random(d) < frac``.

    Parameters
    ----------
    x : numpy.ndarray
        Shape ``(vector_length,)``, finite, ``|x_j| <= value_bound``.
    config : SecAggConfig
        The round's configuration (scale, bits).
    rng : ChaCha20Random or numpy.random.Generator
        Source of the rounding coins (:func:`common.rng.secure_generator` in
        production); nothing is drawn from it if ``x`` is invalid.

    Returns
    -------
    numpy.ndarray
        ``config.dtype`` words in ``[0, 2^b)``.

    Raises
    ------
    DataError
        On an invalid input (see :func:`check_input`).
    """
    if not isinstance(rng, ChaCha20Random | np.random.Generator):
        raise DataError("quantize needs a ChaCha20Random or a numpy Generator")
    x = _check_array(x, config)
    length = config.vector_length
    chunk = max(1, min(length, CHUNK_WORDS))
    scaled = np.empty(chunk, dtype=np.float64)
    rounded = np.empty(chunk, dtype=np.float64)
    coins = np.empty(chunk, dtype=np.float64)
    up = np.empty(chunk, dtype=np.bool_)
    bound = config.value_bound
    for start in range(0, length, chunk):  # validate everything before drawing any coin
        count = min(chunk, length - start)
        part = scaled[:count]
        np.copyto(part, x[start : start + count], casting="unsafe")
        np.abs(part, out=part)
        if not bool(np.all(part <= bound)):  # False for NaN too
            raise _out_of_bound(config.value_bound)
    ring: RingArray = np.empty(length, dtype=config.dtype)
    # |q_j| <= M < 2^(b-1): a signed word of the ring's width holds q_j exactly, and
    # its two's-complement bits are q_j mod 2^w, the value the ring word must hold.
    signed = ring.view(np.int32 if config.dtype.itemsize == 4 else np.int64)
    for start in range(0, length, chunk):
        count = min(chunk, length - start)
        y, fl, c, b = scaled[:count], rounded[:count], coins[:count], up[:count]
        np.copyto(y, x[start : start + count], casting="unsafe")  # exact: widening to float64
        np.multiply(y, config.scale, out=y)  # y = fl(x * s)
        np.floor(y, out=fl)
        np.subtract(y, fl, out=y)  # fractional part, exact
        rng.random(out=c)
        np.less(c, y, out=b)  # B ~ Bernoulli(frac)
        np.add(fl, b, out=fl)  # floor(y) + B: an integer below 2^53, exact
        np.copyto(signed[start : start + count], fl, casting="unsafe")
    if config.bits not in (32, 64):
        np.bitwise_and(ring, config.dtype.type((1 << config.bits) - 1), out=ring)
    return ring


def lift_signed(ring: RingArray, bits: int) -> npt.NDArray[np.int64]:
    """Read ring elements as signed integers in ``[-2^(bits-1), 2^(bits-1))``."""
    wide = ring.astype(np.int64)
    wide[wide >= 1 << (bits - 1)] -= 1 << bits
    return wide


def dequantize_sum(
    ring_sum: RingArray, config: SecAggConfig
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """The real sum and the exact integer sum encoded by a ring sum of at most n inputs.

    Returns
    -------
    tuple
        ``(sum_float, sum_int)``: ``sum_int`` is the signed integer sum of the
        quantised inputs (exact), ``sum_float = sum_int / scale`` (float64).
    """
    sum_int = lift_signed(ring_sum, config.bits)
    return sum_int / config.scale, sum_int
