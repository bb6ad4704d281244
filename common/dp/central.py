"""Server side of DP-FedAvg: Gaussian noise on the sum of clipped client updates.

Guarantee
---------
If every contributing site clipped its update to L2 norm ``<= C``
(:func:`common.dp.clipping.clip_l2`; the clients' job, so that secure
aggregation can hide individual updates), the sum has L2 sensitivity ``C``
under adding or removing one site. :func:`noise_aggregate` adds
``N(0, (z*C)^2)`` to every coordinate of that sum — the Gaussian mechanism
with noise multiplier ``z`` — and returns the noised sum divided by the
number of contributors actually present (unweighted average; McMahan,
Ramage, Talwar, Zhang, ICLR 2018, Alg. 1 with the fixed-denominator
estimator replaced by the observed count). The division is post-processing;
the contributor count is treated as public, since the server observes which
sites sent an update. Each call emits one client-level
:class:`~common.dp.events.PrivacyEvent` ``(z, sample_rate, 1)`` for
:class:`~common.dp.accounting.ClientLevelAccountant`: ``sample_rate = q``
only when sites were Poisson-sampled with probability ``q``, ``1.0`` for a
fixed-size cohort.

Against whom: anyone who sees the released model (and the count), but not
the generator state (pass :func:`common.rng.secure_generator` in
production). The function is pure: no I/O, the generator is passed in,
inputs are not mutated. With ``z = 0`` it returns exactly ``sum / n`` and
the event has infinite epsilon.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from common.dp.events import PrivacyEvent, PrivacyLevel
from common.dp.noise import add_gaussian_noise, central_noise_std
from common.errors import ConfigurationError, DataError

__all__ = ["CentralDpResult", "noise_aggregate"]

FloatArray = npt.NDArray[np.floating]


@dataclass(frozen=True, slots=True, eq=False)
class CentralDpResult:
    """Outcome of one DP-FedAvg aggregation.

    Attributes
    ----------
    mean : list of ndarray
        Noised sum divided by ``contributors``, same shapes as the input.
    event : PrivacyEvent
        Client-level event of this round, ``(z, sample_rate, 1)``.
    contributors : int
        Number of sites whose clipped updates are in the sum (the real count).
    noise_std : float
        Std of the noise added to the sum (``z * C``); the mean carries
        ``noise_std / contributors``.
    """

    mean: list[FloatArray]
    event: PrivacyEvent
    contributors: int
    noise_std: float


def noise_aggregate(
    sum_of_clipped: Sequence[npt.NDArray[np.generic]],
    contributors: int,
    *,
    noise_multiplier: float,
    clip_norm: float,
    rng: np.random.Generator,
    sample_rate: float = 1.0,
) -> CentralDpResult:
    """Add ``N(0, (z*C)^2)`` to the sum of clipped updates and average.

    Parameters
    ----------
    sum_of_clipped : sequence of ndarray
        Coordinate-wise sum of the contributors' clipped updates.
    contributors : int
        Number of updates actually in the sum, ``>= 1``.
    noise_multiplier : float
        ``z >= 0``.
    clip_norm : float
        ``C > 0``, the clipping bound every client applied.
    rng : numpy.random.Generator
        Noise source.
    sample_rate : float
        Per-site Poisson sampling probability ``q`` in (0, 1] if the server
        sampled sites that way, ``1.0`` (no amplification) otherwise.

    Returns
    -------
    CentralDpResult
        Noised mean, the round's privacy event, the count and the noise std.

    Raises
    ------
    ConfigurationError
        For parameters outside their domains.
    DataError
        For an empty update list, non-finite sums or no contributors.
    """
    if isinstance(contributors, bool) or not isinstance(contributors, int):
        raise ConfigurationError(f"contributors must be an int, got {contributors!r}")
    if contributors < 1:
        raise DataError(f"cannot average over {contributors} contributors")
    if len(sum_of_clipped) == 0:
        raise DataError("the aggregate holds no arrays")
    arrays = [np.asarray(a) for a in sum_of_clipped]
    for a in arrays:
        if a.dtype.kind not in "fiu" or a.dtype == np.bool_:
            raise DataError(f"the aggregate has non-numeric dtype {a.dtype}")
        if a.size and not np.all(np.isfinite(a)):
            raise DataError("the aggregate holds NaN or infinite values")
    std = central_noise_std(noise_multiplier, clip_norm)
    event = PrivacyEvent(noise_multiplier, sample_rate, 1, PrivacyLevel.CLIENT)
    noised = add_gaussian_noise(arrays, std, rng)
    mean: list[FloatArray] = [a / np.asarray(contributors, dtype=a.dtype) for a in noised]
    return CentralDpResult(mean=mean, event=event, contributors=contributors, noise_std=std)
