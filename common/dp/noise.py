"""The Gaussian mechanism's noise: N(0, std^2) added to every coordinate.

Guarantee
---------
:func:`add_gaussian_noise` returns ``x + e`` with ``e`` i.i.d. normal of mean 0
and standard deviation ``std``, drawn from the caller's
:data:`~common.rng.RandomSource`. Added to a statistic of L2 sensitivity
``C`` with ``std = z * C`` (:func:`central_noise_std`), it is the Gaussian
mechanism with noise multiplier ``z`` (Dwork & Roth 2014, Thm. A.1;
Mironov 2017, Prop. 7 for its Rényi DP). The guarantee holds against anyone
who does not observe the generator's state: production callers pass
:func:`common.rng.secure_generator` (a ChaCha20 keystream under a key from
the OS CSPRNG; unpredictable to anyone who does not observe the process's
memory), tests a seeded numpy generator. The noise is drawn in float64 and
added in float64 before the cast back; what the sampler does and does not
do about floating-point attacks (Mironov 2012; Jin et al. 2022) is stated
in :class:`common.rng.ChaCha20Random`: the mechanism is accounted as the
ideal Gaussian. Inputs are never mutated; the global numpy/Python
generators are never used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import overload

import numpy as np
import numpy.typing as npt

from common.errors import ConfigurationError, DataError
from common.rng import ChaCha20Random, RandomSource

__all__ = ["add_gaussian_noise", "central_noise_std"]

FloatArray = npt.NDArray[np.floating]


def _check_real(name: str, value: float, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0.0 or (positive and v == 0.0):
        bound = "> 0" if positive else ">= 0"
        raise ConfigurationError(f"{name} must be finite and {bound}, got {value!r}")
    return v


def central_noise_std(noise_multiplier: float, clip_norm: float) -> float:
    """Standard deviation ``z * C`` of the noise on a sum of ``C``-clipped updates.

    Parameters
    ----------
    noise_multiplier : float
        ``z >= 0`` (dimensionless).
    clip_norm : float
        ``C > 0``, the L2 sensitivity of the sum (units of the update).

    Returns
    -------
    float
        The noise std, in the units of the update.

    Raises
    ------
    ConfigurationError
        If either value is outside its domain.
    """
    z = _check_real("noise_multiplier", noise_multiplier, positive=False)
    c = _check_real("clip_norm", clip_norm, positive=True)
    return z * c


def _noised(array: npt.NDArray[np.generic], std: float, rng: RandomSource) -> FloatArray:
    arr = np.asarray(array)
    if arr.dtype == np.bool_ or arr.dtype.kind not in "fiu":
        raise DataError(f"cannot add noise to an array of dtype {arr.dtype}")
    dtype = arr.dtype if arr.dtype.kind == "f" else np.dtype(np.float64)
    if std == 0.0:
        return arr.astype(dtype, copy=True)
    noise = rng.normal(0.0, std, size=arr.shape)
    out: FloatArray = (arr.astype(np.float64) + noise).astype(dtype, copy=False)
    return out


@overload
def add_gaussian_noise(
    vector: npt.NDArray[np.generic], std: float, rng: RandomSource
) -> FloatArray: ...


@overload
def add_gaussian_noise(
    vector: Sequence[npt.NDArray[np.generic]], std: float, rng: RandomSource
) -> list[FloatArray]: ...


def add_gaussian_noise(
    vector: npt.NDArray[np.generic] | Sequence[npt.NDArray[np.generic]],
    std: float,
    rng: RandomSource,
) -> FloatArray | list[FloatArray]:
    """Return ``vector`` plus i.i.d. ``N(0, std^2)`` noise on every coordinate.

    Parameters
    ----------
    vector : ndarray or sequence of ndarray
        Values to noise (any shape). Floating dtypes are kept (noise is drawn
        and added in float64, then cast); integer input gives float64.
    std : float
        Noise standard deviation ``>= 0``, in the units of ``vector``; with
        ``0`` the result is an exact copy.
    rng : ChaCha20Random or numpy.random.Generator
        Source of the noise: :func:`common.rng.secure_generator` in
        production, a seeded generator only in simulations and tests.

    Returns
    -------
    ndarray or list of ndarray
        New arrays; the input is not modified.

    Raises
    ------
    ConfigurationError
        If ``std`` is negative or not finite, or ``rng`` is not a random source.
    DataError
        If the values are not numeric.
    """
    s = _check_real("std", std, positive=False)
    if not isinstance(rng, ChaCha20Random | np.random.Generator):
        raise ConfigurationError("rng must be a ChaCha20Random or numpy Generator (see common.rng)")
    if isinstance(vector, np.ndarray):
        return _noised(vector, s, rng)
    return [_noised(a, s, rng) for a in vector]
