"""L2 clipping of an update (one array or a list of arrays seen as one vector).

Guarantee
---------
:func:`clip_l2` returns new arrays whose joint L2 norm, computed in float64
over the returned values, is at most ``clip_norm`` — for every shape
(0-d, empty, zero, huge and tiny norms), after float rounding in the output
dtype. This bounds the L2 sensitivity of a sum of clipped updates by
``clip_norm`` under add/remove adjacency, the precondition of the Gaussian
mechanism in DP-FedAvg (McMahan et al., ICLR 2018, Alg. 1) and DP-SGD (Abadi
et al., CCS 2016). Inputs are never mutated. Non-finite values are refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import overload

import numpy as np
import numpy.typing as npt

from common.errors import ConfigurationError, DataError

__all__ = ["clip_l2", "l2_norm"]

FloatArray = npt.NDArray[np.floating]
_MAX_SHRINK_ITERATIONS = 64
_NARROW = (np.dtype(np.float16), np.dtype(np.float32))
_CHUNK = 1 << 15  # float64 words per pass of the narrow path: L2-resident


def _as_float(array: npt.ArrayLike) -> FloatArray:
    arr = np.asarray(array)
    if arr.dtype == np.bool_ or arr.dtype.kind not in "fiu":
        raise DataError(f"cannot clip an array of dtype {arr.dtype}")
    out: FloatArray = arr.astype(np.float64) if arr.dtype.kind in "iu" else arr
    return out


def _max_abs(arrays: Sequence[FloatArray]) -> float:
    m = 0.0
    for a in arrays:
        if a.size:
            m = max(m, float(np.max(np.abs(a.astype(np.float64, copy=False)))))
    return m


def _scaled_norm(arrays: Sequence[FloatArray], scale: float) -> float:
    """``||arrays|| / scale`` in float64 without overflow or underflow."""
    total = 0.0
    for a in arrays:
        if a.size:
            v = a.astype(np.float64, copy=False).ravel() / scale
            total += _dot(v)
    return math.sqrt(total)


def _narrow_sum_squares(arrays: Sequence[FloatArray]) -> float:
    """``sum x_j^2`` in float64 for float16/float32 arrays, one cache-sized chunk at a time.

    Why this is exact enough and safe: a float32 value widened to float64 is
    exact and so is its square (24 + 24 significant bits <= 53); the largest
    square is below 1.2e77 and the smallest non-zero one above 1e-90, so no
    partial sum of fewer than 1e200 terms can overflow or underflow. The only
    way the total is not finite is a NaN or infinite input, which the caller
    refuses. The sum is a float64 sum of products (:func:`_dot`).
    """
    total = 0.0
    buf = np.empty(_CHUNK, dtype=np.float64)
    for a in arrays:
        flat = a.reshape(-1)
        for start in range(0, flat.size, _CHUNK):
            part = buf[: min(_CHUNK, flat.size - start)]
            np.copyto(part, flat[start : start + part.size])
            total += _dot(part)
    return total


def _dot(v: npt.NDArray[np.float64]) -> float:
    """``sum v_j^2`` of a 1-D float64 array, without BLAS.

    ``np.dot`` calls OpenBLAS, whose worker threads spin against every other
    process on a loaded machine (a simulation runs one ClientApp process per
    core): measured 2.5-137 ms for 1M values where this loop takes about 1 ms.
    """
    return float(np.einsum("i,i->", v, v))


def _narrow(arrays: Sequence[FloatArray]) -> bool:
    return all(a.dtype in _NARROW for a in arrays)


def l2_norm(arrays: Sequence[npt.ArrayLike]) -> float:
    """Joint L2 norm of ``arrays`` in float64, robust to overflow and underflow.

    Returns ``math.inf`` only if the true norm exceeds the float64 range.

    Raises
    ------
    DataError
        If any value is NaN or infinite, or the dtype is not numeric.
    """
    floats = [_as_float(a) for a in arrays]
    if _narrow(floats):
        total = _narrow_sum_squares(floats)
        if not math.isfinite(total):
            raise DataError("cannot take the norm of an update with NaN or infinite values")
        return math.sqrt(total)
    for a in floats:
        if a.size and not np.all(np.isfinite(a)):
            raise DataError("cannot take the norm of an update with NaN or infinite values")
    m = _max_abs(floats)
    if m == 0.0:
        return 0.0
    with np.errstate(over="ignore"):
        return float(m * _scaled_norm(floats, m))


@overload
def clip_l2(update: npt.NDArray[np.generic], clip_norm: float) -> tuple[FloatArray, float]: ...


@overload
def clip_l2(
    update: Sequence[npt.NDArray[np.generic]], clip_norm: float
) -> tuple[list[FloatArray], float]: ...


def clip_l2(
    update: npt.NDArray[np.generic] | Sequence[npt.NDArray[np.generic]], clip_norm: float
) -> tuple[FloatArray | list[FloatArray], float]:
    """Scale ``update`` by ``min(1, clip_norm / ||update||_2)``.

    Parameters
    ----------
    update : ndarray or sequence of ndarray
        One array of any shape (0-d and empty included) or a list of arrays
        whose concatenation is the vector to clip. Integer arrays are
        converted to float64; floating arrays keep their dtype.
    clip_norm : float
        The L2 bound ``C``, finite and ``> 0`` (same units as the update).

    Returns
    -------
    clipped : ndarray or list of ndarray
        New arrays (same structure and shapes) with joint L2 norm ``<= C``.
    original_norm : float
        The input's joint L2 norm (float64; ``inf`` only beyond float64 range).

    Raises
    ------
    ConfigurationError
        If ``clip_norm`` is not a finite positive number.
    DataError
        If the update holds NaN/inf or non-numeric values.
    """
    if isinstance(clip_norm, bool) or not isinstance(clip_norm, int | float):
        raise ConfigurationError(f"clip_norm must be a real number, got {clip_norm!r}")
    c = float(clip_norm)
    if not (math.isfinite(c) and c > 0.0):
        raise ConfigurationError(f"clip_norm must be finite and > 0, got {clip_norm!r}")
    single = isinstance(update, np.ndarray)
    arrays = [_as_float(update)] if single else [_as_float(a) for a in update]
    if _narrow(arrays):  # float16/float32: one chunked pass, no full-size temporaries
        total = _narrow_sum_squares(arrays)
        if not math.isfinite(total):
            raise DataError("cannot clip an update with NaN or infinite values")
        original = math.sqrt(total)
        factor = c / original if original > c else 1.0
    else:
        for a in arrays:
            if a.size and not np.all(np.isfinite(a)):
                raise DataError("cannot clip an update with NaN or infinite values")
        m = _max_abs(arrays)
        if m == 0.0:
            out = [a.copy() for a in arrays]
            return (out[0] if single else out), 0.0
        relative = _scaled_norm(arrays, m)  # ||x|| / m, in [1, sqrt(size)]
        with np.errstate(over="ignore"):
            original = float(m * relative)
        # factor = C / ||x||, formed without overflowing ||x||.
        factor = (c / m) / relative if original > c else 1.0
    if original <= c:
        out = [a.copy() for a in arrays]
    else:
        out = [(a * factor).astype(a.dtype, copy=False) for a in arrays]
        # Rounding in the output dtype may leave the norm a few ulps above C:
        # shrink geometrically until the float64 norm of the result is <= C.
        eps = max(float(np.finfo(a.dtype).eps) for a in arrays)
        shrink, step = 1.0, 4.0 * eps
        for _ in range(_MAX_SHRINK_ITERATIONS):
            if l2_norm(out) <= c:
                break
            shrink *= max(0.0, 1.0 - step)
            step *= 2.0
            out = [(a * (factor * shrink)).astype(a.dtype, copy=False) for a in arrays]
        else:  # unreachable in practice: step reaches 1 within 64 doublings
            out = [np.zeros_like(a) for a in arrays]
    return (out[0] if single else out), original
