"""Server side of DP-FedAvg: Gaussian noise on the sum of clipped client updates.

Guarantee
---------
If every contribution in the sum has L2 norm ``<= Delta`` (``Delta = C`` for
updates clipped to ``C`` by :func:`common.dp.clipping.clip_l2`; more after
secure aggregation's stochastic rounding, see
:func:`common.secagg.quantize.quantised_l2_bound`), the sum has L2 sensitivity
``Delta`` under adding or removing one site. :func:`noise_aggregate` adds
``N(0, (z*Delta)^2)`` to every coordinate of that sum — the Gaussian mechanism
with noise multiplier ``z`` — and divides the noised sum by a **fixed
denominator** ``D`` that does not depend on who took part: ``D = q*N``, the
*expected* number of contributors, when each of ``N`` sites is Poisson-sampled
with probability ``q``; the planned cohort size for a fixed-size cohort
(McMahan, Ramage, Talwar, Zhang, ICLR 2018, Alg. 1, the fixed-denominator
estimator ``sum / (q W)`` with unit weights).

Why fixed: dividing by the realised count ``k`` would release ``k`` with the
model (``model_t - model_{t-1}`` times the known noise scale gives it away)
and with it the sample itself: under Poisson sampling ``k = N`` proves every
site took part, an event of probability ``q^N`` that no noise covers, so
``delta >= q^N`` whatever ``z`` is (9.8e-4 at ``N = 10``, ``q = 0.5``). With
``D`` public, the release ``(sum + noise) / D`` is post-processing of the
Gaussian mechanism on the sum; its L2 sensitivity as a mean is ``Delta / D``
(``C / (q N)`` for clipped plain updates) and the noise on the mean has std
``z * Delta / D`` per coordinate (:func:`mean_noise_std`). Under Poisson
sampling ``E[sum_{i in S} x_i / (q N)] = (1/N) sum_i x_i``: the estimator is
unbiased for the mean over all ``N`` sites. A round with no contributor at
all releases ``noise / D`` (the model plus noise, exactly what the same
mechanism gives for an empty sum): the same distribution family as any other
round, so whether a round "happened" does not depend on the count; skipping
it, or releasing the model unchanged, would tell the count was zero.

Each call emits one client-level :class:`~common.dp.events.PrivacyEvent`
``(z, sample_rate, 1)`` for :class:`~common.dp.accounting.ClientLevelAccountant`:
``sample_rate = q`` only when sites were Poisson-sampled with probability
``q``, ``1.0`` for a fixed-size cohort.

Against whom: anyone who sees the released model, but not the generator state
(pass :func:`common.rng.secure_generator` in production). The function is
pure: no I/O, the generator is passed in, inputs are not mutated. With
``z = 0`` it returns exactly ``sum / D`` and the event has infinite epsilon.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from common.dp.events import PrivacyEvent, PrivacyLevel
from common.dp.noise import _check_real, add_gaussian_noise, central_noise_std
from common.errors import DataError
from common.rng import RandomSource

__all__ = ["CentralDpResult", "mean_noise_std", "noise_aggregate"]

FloatArray = npt.NDArray[np.floating]


@dataclass(frozen=True, slots=True, eq=False)
class CentralDpResult:
    """Outcome of one DP-FedAvg aggregation.

    Attributes
    ----------
    mean : list of ndarray
        Noised sum divided by ``denominator``, same shapes as the input.
    event : PrivacyEvent
        Client-level event of this round, ``(z, sample_rate, 1)``.
    denominator : float
        The fixed denominator ``D`` (never the realised count).
    noise_std : float
        Std of the noise added to the sum (``z * Delta``); the mean carries
        ``noise_std / denominator``.
    """

    mean: list[FloatArray]
    event: PrivacyEvent
    denominator: float
    noise_std: float


def mean_noise_std(noise_multiplier: float, sensitivity: float, denominator: float) -> float:
    """``z * Delta / D``: the noise std per coordinate of the released mean update.

    Raises
    ------
    ConfigurationError
        If a value is outside its domain (``z >= 0``, ``Delta > 0``, ``D > 0``).
    """
    return central_noise_std(noise_multiplier, sensitivity) / _check_real(
        "denominator", denominator, positive=True
    )


def noise_aggregate(
    sum_of_clipped: Sequence[npt.NDArray[np.generic]],
    *,
    denominator: float,
    noise_multiplier: float,
    sensitivity: float,
    rng: RandomSource,
    sample_rate: float = 1.0,
) -> CentralDpResult:
    """Add ``N(0, (z*Delta)^2)`` to the sum of bounded contributions and divide by ``D``.

    Parameters
    ----------
    sum_of_clipped : sequence of ndarray
        Coordinate-wise sum of the contributions (all zeros when none came).
    denominator : float
        ``D > 0``, fixed before the round: ``q * N`` under Poisson sampling of
        ``N`` sites, the planned cohort size for a fixed cohort. Never the
        number of contributions actually in the sum.
    noise_multiplier : float
        ``z >= 0``.
    sensitivity : float
        ``Delta > 0``, the L2 bound on what one site can add to the sum.
    rng : ChaCha20Random or numpy.random.Generator
        Noise source (:func:`common.rng.secure_generator` in production).
    sample_rate : float
        Per-site Poisson sampling probability ``q`` in (0, 1] if the server
        sampled sites that way, ``1.0`` (no amplification) otherwise.

    Returns
    -------
    CentralDpResult
        Noised mean, the round's privacy event, the denominator and the noise std.

    Raises
    ------
    ConfigurationError
        For parameters outside their domains.
    DataError
        For an empty array list or non-finite sums.
    """
    d = _check_real("denominator", denominator, positive=True)
    if len(sum_of_clipped) == 0:
        raise DataError("the aggregate holds no arrays")
    arrays = [np.asarray(a) for a in sum_of_clipped]
    for a in arrays:
        if a.dtype.kind not in "fiu" or a.dtype == np.bool_:
            raise DataError(f"the aggregate has non-numeric dtype {a.dtype}")
        if a.size and not np.all(np.isfinite(a)):
            raise DataError("the aggregate holds NaN or infinite values")
    std = central_noise_std(noise_multiplier, sensitivity)
    event = PrivacyEvent(noise_multiplier, sample_rate, 1, PrivacyLevel.CLIENT)
    noised = add_gaussian_noise(arrays, std, rng)
    mean: list[FloatArray] = [a / np.asarray(d, dtype=a.dtype) for a in noised]
    return CentralDpResult(mean=mean, event=event, denominator=d, noise_std=std)
