"""Accounting for the distributed Skellam mechanism: RDP, Poisson sampling of sites, (eps, delta).

Guarantee
---------
One round of :mod:`common.dp.skellam` releases ``S + Sk(mu')`` per coordinate
(``S`` the integer sum of the sites' rounded rotated updates, ``mu' = m mu_s``
the noise of the ``m`` survivors actually summed). With L2 and L1
sensitivities ``Delta_2``, ``Delta_1`` (after conditional rounding), the
Skellam mechanism is ``(alpha, eps(alpha))``-RDP for every integer
``alpha > 1`` with (Agarwal, Kairouz, Liu, NeurIPS 2021, Theorem 3.5, noise
``Sk(mu, mu)`` of variance ``2 mu``)::

    eps(alpha) = alpha Delta_2^2 / (4 mu)
                 + min( ((2 alpha - 1) Delta_2^2 + 6 Delta_1) / (16 mu^2),  3 Delta_1 / (4 mu) )

(:func:`skellam_rdp`). The first term is the Gaussian mechanism's RDP at the
same variance; the second is the price of discreteness, ``O(1/mu^2)``.

Poisson sampling of sites with probability ``q < 1`` (each site's update
enters a round independently with probability ``q``) amplifies this with
the general upper bound of Zhu & Wang, "Poisson Subsampled Rényi
Differential Privacy", ICML 2019, Theorem 6, valid for any mechanism and
integer ``alpha >= 2`` (:func:`subsampled_rdp`)::

    eps_q(alpha) <= 1/(alpha-1) log( (1-q)^(alpha-1) (alpha q - q + 1)
                     + C(alpha,2) q^2 (1-q)^(alpha-2) e^{eps(2)}
                     + 3 sum_{l=3..alpha} C(alpha,l) q^l (1-q)^(alpha-l) e^{(l-1) eps(l)} )

(capped at the unsampled ``eps(alpha)``, which also holds). Rounds compose
by adding RDP order by order (Mironov, CSF 2017); the total converts to
``(eps, delta)`` with dp_accounting's conversion
(``rdp_privacy_accountant.compute_epsilon``: Canonne, Kamath, Steinke 2020's
improved bound), minimised over :data:`ORDERS`. Everything here is an upper
bound on the true privacy loss of the mechanism; tests compare it with the
exact Rényi divergence of the Skellam distributions (scipy's pmf).

The adjacency is zero-out (one site's update replaced by zero; its coin and
noise share unchanged), as in the paper; the unit is a site (client level).
Each round's event names the survivors' noise ``mu'`` actually summed, which
the server knows after unmasking; calibration (:func:`calibrate_noise_multiplier`)
assumes the floor, ``t`` survivors, so the realised epsilon is never above
the planned one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special

from common.errors import ConfigurationError

__all__ = [
    "ACCOUNTANT",
    "ORDERS",
    "SkellamAccountant",
    "SkellamEvent",
    "calibrate_noise_multiplier",
    "epsilon_for",
    "rdp_curve",
    "skellam_rdp",
    "subsampled_rdp",
]

ACCOUNTANT = "rdp-skellam"
"""The accountant's name in records: the paper's RDP bound, Zhu-Wang sampling, RDP conversion."""
ORDERS: tuple[int, ...] = (*range(2, 129), 160, 192, 256, 384, 512, 768, 1024)
"""Integer RDP orders (the sampling bound and the Skellam bound are stated for integers)."""


def skellam_rdp(alpha: int, mu: float, l2: float, l1: float) -> float:
    """The Skellam mechanism's RDP at integer order ``alpha`` (module docstring, Theorem 3.5).

    Raises
    ------
    ConfigurationError
        For ``alpha < 2``, ``mu <= 0`` or negative sensitivities.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, int) or alpha < 2:
        raise ConfigurationError(f"RDP order must be an int >= 2, got {alpha!r}")
    if not (math.isfinite(mu) and mu > 0):
        raise ConfigurationError(f"the Skellam parameter must be positive, got {mu!r}")
    if not (l2 >= 0 and l1 >= 0):
        raise ConfigurationError("sensitivities must be >= 0")
    gaussian = alpha * l2 * l2 / (4.0 * mu)
    discrete = min(((2 * alpha - 1) * l2 * l2 + 6.0 * l1) / (16.0 * mu * mu), 3.0 * l1 / (4.0 * mu))
    return gaussian + discrete


def subsampled_rdp(alpha: int, q: float, base: Sequence[float]) -> float:
    """Zhu & Wang 2019, Theorem 6: RDP at ``alpha`` of the mechanism Poisson-sampled at rate ``q``.

    ``base[j]`` is the unsampled RDP at order ``j + 2`` for ``j < alpha - 1``.
    Computed in log space; never above ``base[alpha - 2]``.
    """
    if q >= 1.0:
        return float(base[alpha - 2])
    if alpha == 1 or q <= 0.0:
        return 0.0
    log_q, log_1q = math.log(q), math.log1p(-q)
    terms = [
        (alpha - 1) * log_1q + math.log1p((alpha - 1) * q),
        math.log(special.comb(alpha, 2, exact=False))
        + 2 * log_q
        + (alpha - 2) * log_1q
        + float(base[0]),
    ]
    for ell in range(3, alpha + 1):
        terms.append(
            math.log(3.0)
            + float(special.gammaln(alpha + 1) - special.gammaln(ell + 1))
            - float(special.gammaln(alpha - ell + 1))
            + ell * log_q
            + (alpha - ell) * log_1q
            + (ell - 1) * float(base[ell - 2])
        )
    bound = float(special.logsumexp(terms)) / (alpha - 1)
    return min(bound, float(base[alpha - 2]))


@dataclass(frozen=True, slots=True)
class SkellamEvent:
    """One round of the distributed Skellam mechanism, as the accountant composes it.

    ``mu`` is the Skellam parameter of the noise in the unmasked sum (the
    survivors' shares), ``l2``/``l1`` the sensitivities (integer domain),
    ``sample_rate`` the Poisson rate of sites (1: no amplification claimed).
    """

    mu: float
    l2: float
    l1: float
    sample_rate: float = 1.0
    survivors: int = 0

    def __post_init__(self) -> None:
        for name in ("mu", "l2", "l1", "sample_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigurationError(f"{name} must be a real number, got {value!r}")
            if not math.isfinite(float(value)) or float(value) < 0:
                raise ConfigurationError(f"{name} must be finite and >= 0, got {value!r}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ConfigurationError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")


@functools.lru_cache(maxsize=256)
def _curve(mu: float, l2: float, l1: float, q: float) -> tuple[float, ...]:
    if mu == 0.0:
        return tuple(math.inf for _ in ORDERS)
    top = max(ORDERS)
    base = [skellam_rdp(a, mu, l2, l1) for a in range(2, top + 1)]
    if q >= 1.0:
        return tuple(base[a - 2] for a in ORDERS)
    return tuple(subsampled_rdp(a, q, base) for a in ORDERS)


def rdp_curve(event: SkellamEvent) -> np.ndarray:
    """The event's RDP at every order of :data:`ORDERS`."""
    return np.array(_curve(event.mu, event.l2, event.l1, event.sample_rate))


def epsilon_for(events: Iterable[SkellamEvent], delta: float) -> float:
    """Epsilon at ``delta`` of the composition of ``events`` (0 for none, inf if one has no noise).

    Raises
    ------
    ConfigurationError
        For a delta outside (0, 1).
    """
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    if not 0.0 < delta < 1.0:
        raise ConfigurationError(f"delta must be in (0, 1), got {delta!r}")
    total = np.zeros(len(ORDERS))
    count = 0
    for event in events:
        total = total + rdp_curve(event)
        count += 1
    if count == 0:
        return 0.0
    if not np.all(np.isfinite(total)):
        return math.inf
    eps, _ = compute_epsilon(list(ORDERS), list(total), delta)
    return float(eps)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    rounds: int,
    sample_rate: float,
    l2_of_z: Callable[[float], tuple[float, float, float]],
) -> float:
    """Smallest ``z`` (relative 1e-3) whose ``rounds`` events at the noise floor stay <= target.

    ``l2_of_z(z)`` returns ``(mu, l2, l1)`` of the run's parameters for
    noise multiplier ``z`` (the sensitivities depend on ``gamma``, which
    depends on ``z`` through the wrap bound).

    Raises
    ------
    ConfigurationError
        If no ``z`` up to 1e4 meets the target.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigurationError(f"target epsilon must be > 0, got {target_epsilon!r}")

    def eps(z: float) -> float:
        mu, l2, l1 = l2_of_z(z)
        return epsilon_for([SkellamEvent(mu, l2, l1, sample_rate)] * rounds, delta)

    low, high = 1e-2, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2.0
        if high > 1e4:
            raise ConfigurationError(
                f"client-level epsilon {target_epsilon:g} cannot be met over {rounds} rounds"
            )
    while high / low > 1.0 + 1e-3:
        mid = math.sqrt(low * high)
        if eps(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


class SkellamAccountant:
    """The run's client-level accountant under distributed DP: events in, epsilon out.

    Check-then-commit like :class:`common.dp.accounting.ClientLevelAccountant`:
    :meth:`epsilon_if` is a dry run, :meth:`record` appends.
    """

    def __init__(self, sample_rate: float, events: Sequence[SkellamEvent] = ()) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise ConfigurationError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        self.sample_rate = float(sample_rate)
        self._events: list[SkellamEvent] = []
        for event in events:
            self.record(event)

    @property
    def events(self) -> tuple[SkellamEvent, ...]:
        return tuple(self._events)

    def _check(self, event: SkellamEvent) -> None:
        if not isinstance(event, SkellamEvent):
            raise ConfigurationError(f"expected a SkellamEvent, got {type(event).__name__}")
        if event.sample_rate != self.sample_rate:
            raise ConfigurationError(
                f"event sample rate {event.sample_rate} differs from the run's {self.sample_rate}"
            )

    def epsilon(self, delta: float) -> float:
        return epsilon_for(self._events, delta)

    def epsilon_if(self, event: SkellamEvent, delta: float) -> float:
        self._check(event)
        return epsilon_for([*self._events, event], delta)

    def record(self, event: SkellamEvent) -> None:
        self._check(event)
        self._events.append(event)
