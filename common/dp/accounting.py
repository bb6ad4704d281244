"""Privacy accounting: (epsilon, delta) of a recorded history of privacy events.

Guarantee
---------
:func:`epsilon_for` returns an epsilon such that the composition of the given
Poisson-sampled Gaussian mechanisms (:class:`~common.dp.events.PrivacyEvent`)
is (epsilon, delta)-differentially private with respect to the unit named by
the events' level (add/remove adjacency of one record, or of one site). It is
computed from the full history every time, never kept as a running number,
by Opacus' accountants loaded with that history:

* ``"prv"`` — numerical composition of privacy loss random variables
  (Gopi, Lee, Wutschitz 2021); Opacus returns the *upper* end of its error
  interval (``eps_error = 0.01``), so the figure is an upper bound.
* ``"rdp"`` — Rényi DP of the sampled Gaussian mechanism (Mironov 2017;
  Mironov, Talwar, Zhang 2019) converted to (epsilon, delta) over Opacus'
  default orders.

Both assume that every unit is included in every step independently with
probability ``sample_rate`` (``1.0``: always included, no amplification
claimed) and that the noise is Gaussian with std ``noise_multiplier`` times
the L2 sensitivity. The history is loaded exactly as Opacus' own accountant
records it (consecutive identical ``(noise_multiplier, sample_rate)`` pairs
merged), so a figure recomputed here equals the one an Opacus
``PrivacyEngine`` reports for the same mechanism applications.

:class:`ClientLevelAccountant` applies this to DP-FedAvg (McMahan et al.
2018), one event per round, and states which site sampling it assumes.

References
----------
Gopi, Lee, Wutschitz, "Numerical Composition of Differential Privacy",
NeurIPS 2021. Mironov, "Rényi Differential Privacy", CSF 2017. McMahan,
Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language
Models", ICLR 2018.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from enum import StrEnum
from typing import Literal

import numpy as np

from common.dp.events import PrivacyEvent, PrivacyLevel
from common.errors import ConfigurationError

__all__ = [
    "ACCOUNTANTS",
    "AccountantName",
    "ClientLevelAccountant",
    "ClientSampling",
    "calibrate_noise_multiplier",
    "epsilon_for",
    "merge_history",
    "validate_accountant",
    "validate_delta",
]

AccountantName = Literal["prv", "rdp"]
ACCOUNTANTS: tuple[AccountantName, ...] = ("prv", "rdp")
_MAX_NOISE_MULTIPLIER = 1e6
_EPSILON_TOLERANCE = 0.01


def validate_accountant(accountant: str) -> AccountantName:
    """Return ``accountant`` if it is ``"prv"`` or ``"rdp"``.

    Raises
    ------
    ConfigurationError
        For any other name.
    """
    if accountant == "prv":
        return "prv"
    if accountant == "rdp":
        return "rdp"
    raise ConfigurationError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def validate_delta(delta: float) -> float:
    """Return ``delta`` as a float if it lies in the open interval (0, 1).

    Raises
    ------
    ConfigurationError
        If ``delta`` is not a real number in (0, 1).
    """
    if isinstance(delta, bool) or not isinstance(delta, int | float):
        raise ConfigurationError(f"delta must be a real number, got {delta!r}")
    if not 0.0 < float(delta) < 1.0:
        raise ConfigurationError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def merge_history(events: Iterable[PrivacyEvent]) -> list[tuple[float, float, int]]:
    """Opacus history triples ``(noise_multiplier, sample_rate, steps)`` of ``events``.

    Consecutive events with equal noise multiplier and sample rate are merged
    (steps added), as Opacus' accountants do step by step.

    Raises
    ------
    ConfigurationError
        If the events mix privacy levels (record- and client-level epsilons
        are never composed together).
    """
    history: list[tuple[float, float, int]] = []
    level: PrivacyLevel | None = None
    for event in events:
        if not isinstance(event, PrivacyEvent):
            raise ConfigurationError(f"expected a PrivacyEvent, got {type(event).__name__}")
        if level is None:
            level = event.level
        elif event.level is not level:
            raise ConfigurationError(
                f"cannot compose {level.value}-level and {event.level.value}-level events"
            )
        if (
            history
            and history[-1][0] == event.noise_multiplier
            and (history[-1][1] == event.sample_rate)
        ):
            z, q, steps = history[-1]
            history[-1] = (z, q, steps + event.steps)
        else:
            history.append((event.noise_multiplier, event.sample_rate, event.steps))
    return history


def _epsilon_of_history(
    history: Sequence[tuple[float, float, int]], delta: float, accountant: AccountantName
) -> float:
    if not history:
        return 0.0
    if any(z == 0.0 for z, _, _ in history):
        return math.inf
    # Imported here: opacus pulls in torch, which the pure callers may not need.
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc: PRVAccountant | RDPAccountant = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.load_state_dict({"history": list(history), "mechanism": accountant})
    # sample_rate = 1 makes Opacus' PRV evaluate log(0) on a masked-out branch.
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        eps = float(acc.get_epsilon(delta=delta))
    if math.isnan(eps):
        raise ConfigurationError(f"accountant {accountant!r} returned NaN for {history!r}")
    return eps


def epsilon_for(events: Iterable[PrivacyEvent], delta: float, accountant: str = "prv") -> float:
    """Epsilon of the composition of ``events`` at ``delta``.

    Parameters
    ----------
    events : iterable of PrivacyEvent
        The full mechanism history, all of one level, in application order.
    delta : float
        Target delta in (0, 1).
    accountant : {"prv", "rdp"}
        Opacus accountant to use.

    Returns
    -------
    float
        ``0.0`` for an empty history, ``math.inf`` if any event has noise
        multiplier 0, the accountant's epsilon otherwise.

    Raises
    ------
    ConfigurationError
        For an unknown accountant, a delta outside (0, 1) or mixed levels.
    """
    name = validate_accountant(accountant)
    d = validate_delta(delta)
    return _epsilon_of_history(merge_history(events), d, name)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    *,
    prior_events: Sequence[PrivacyEvent] = (),
    epsilon_tolerance: float = _EPSILON_TOLERANCE,
) -> float:
    """Smallest noise multiplier (to ``epsilon_tolerance``) keeping epsilon <= target.

    Without ``prior_events`` this is Opacus' ``get_noise_multiplier``; with
    them it is the same bisection over the composition of the prior history
    and ``steps`` new steps at ``sample_rate`` (so a dataset that already
    spent some budget gets enough noise for the remainder).

    Parameters
    ----------
    target_epsilon : float
        Epsilon to stay at or below, ``> 0``.
    delta : float
        Delta in (0, 1).
    sample_rate : float
        Poisson sampling rate of the new steps, in (0, 1].
    steps : int
        Number of new steps, ``>= 1``.
    accountant : {"prv", "rdp"}
        Accountant used for the search.
    prior_events : sequence of PrivacyEvent
        History already spent (same level).
    epsilon_tolerance : float
        The returned multiplier gives an epsilon in
        ``[target - tolerance, target]``.

    Returns
    -------
    float
        A noise multiplier ``z`` with ``epsilon_for(prior + [z, q, steps]) <= target``.

    Raises
    ------
    ConfigurationError
        If the inputs are outside their domains, or the target cannot be met
        with ``z <= 1e6`` (e.g. the prior history alone exceeds it).
    """
    name = validate_accountant(accountant)
    d = validate_delta(delta)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigurationError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    if not (math.isfinite(epsilon_tolerance) and epsilon_tolerance > 0):
        raise ConfigurationError(f"epsilon_tolerance must be > 0, got {epsilon_tolerance!r}")
    # Validates sample_rate and steps through the event's own domain checks.
    PrivacyEvent(1.0, sample_rate, steps)
    if not prior_events:
        from opacus.accountants.utils import get_noise_multiplier

        try:
            with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return float(
                    get_noise_multiplier(
                        target_epsilon=target_epsilon,
                        target_delta=d,
                        sample_rate=float(sample_rate),
                        steps=steps,
                        accountant=name,
                        epsilon_tolerance=epsilon_tolerance,
                    )
                )
        except ValueError as exc:
            raise ConfigurationError(
                f"cannot reach epsilon {target_epsilon} at delta {d} with "
                f"sample_rate {sample_rate} over {steps} steps: {exc}"
            ) from exc
    prior = merge_history(prior_events)

    def eps_at(z: float) -> float:
        return _epsilon_of_history([*prior, (z, float(sample_rate), steps)], d, name)

    low, high = 0.0, 10.0
    eps_high = math.inf
    while eps_high > target_epsilon:
        high *= 2.0
        if high > _MAX_NOISE_MULTIPLIER:
            raise ConfigurationError(
                f"cannot reach epsilon {target_epsilon} at delta {d}: the prior history "
                "leaves no room for further steps"
            )
        eps_high = eps_at(high)
    while target_epsilon - eps_high > epsilon_tolerance:
        mid = (low + high) / 2.0
        eps_mid = eps_at(mid)
        if eps_mid < target_epsilon:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    return high


class ClientSampling(StrEnum):
    """How the server picks the sites of a DP-FedAvg round.

    ``POISSON``: each site independently with probability ``q`` (amplification
    by sampling applies; events carry ``sample_rate = q``).
    ``FIXED_COHORT``: a fixed-size cohort (or every site); accounted without
    amplification (events carry ``sample_rate = 1.0``), which is a valid
    upper bound for any cohort selection.
    """

    POISSON = "poisson"
    FIXED_COHORT = "fixed_cohort"


class ClientLevelAccountant:
    """Client-level accountant for DP-FedAvg: one event per aggregated round.

    Check-then-commit: :meth:`epsilon_if` is a dry run, :meth:`record` appends.
    Epsilon is recomputed from the whole event list on every query.

    Parameters
    ----------
    sampling : ClientSampling
        The site sampling actually performed by the server.
    sample_rate : float
        The Poisson rate ``q`` in (0, 1] when ``sampling`` is ``POISSON``;
        must be ``1.0`` (the default) for ``FIXED_COHORT``.
    accountant : {"prv", "rdp"}
        Accountant used for epsilon.
    events : sequence of PrivacyEvent
        History to restore (e.g. from the central record after a resume).

    Raises
    ------
    ConfigurationError
        On inconsistent sampling and sample rate, or invalid restored events.
    """

    __slots__ = ("_accountant", "_events", "_sample_rate", "_sampling")

    def __init__(
        self,
        sampling: ClientSampling | str,
        sample_rate: float = 1.0,
        accountant: str = "prv",
        events: Sequence[PrivacyEvent] = (),
    ) -> None:
        try:
            self._sampling = ClientSampling(sampling)
        except ValueError as exc:
            raise ConfigurationError(f"unknown client sampling {sampling!r}") from exc
        self._accountant = validate_accountant(accountant)
        PrivacyEvent(1.0, sample_rate, 1, PrivacyLevel.CLIENT)
        self._sample_rate = float(sample_rate)
        if self._sampling is ClientSampling.FIXED_COHORT and self._sample_rate != 1.0:
            raise ConfigurationError(
                "a fixed-size cohort gets no Poisson amplification: sample_rate must be 1.0, "
                f"got {sample_rate!r}"
            )
        self._events: list[PrivacyEvent] = []
        for event in events:
            self._check(event)
            self._events.append(event)

    @property
    def sampling(self) -> ClientSampling:
        """The site sampling this accountant assumes."""
        return self._sampling

    @property
    def sample_rate(self) -> float:
        """The per-round site sampling rate used in every event."""
        return self._sample_rate

    @property
    def accountant(self) -> AccountantName:
        """The accountant's name (``"prv"`` or ``"rdp"``)."""
        return self._accountant

    @property
    def events(self) -> tuple[PrivacyEvent, ...]:
        """The recorded events, in order."""
        return tuple(self._events)

    @property
    def rounds(self) -> int:
        """Number of rounds recorded (sum of event steps)."""
        return sum(e.steps for e in self._events)

    def event_for_round(self, noise_multiplier: float) -> PrivacyEvent:
        """The event one DP-FedAvg round with ``noise_multiplier`` produces here."""
        return PrivacyEvent(noise_multiplier, self._sample_rate, 1, PrivacyLevel.CLIENT)

    def _check(self, event: PrivacyEvent) -> None:
        if not isinstance(event, PrivacyEvent) or event.level is not PrivacyLevel.CLIENT:
            raise ConfigurationError("client-level accounting takes client-level PrivacyEvents")
        if event.sample_rate != self._sample_rate:
            raise ConfigurationError(
                f"event sample_rate {event.sample_rate} differs from the {self._sampling.value} "
                f"sampling rate {self._sample_rate} this accountant assumes"
            )

    def epsilon(self, delta: float) -> float:
        """Client-level epsilon of the recorded rounds at ``delta``."""
        return epsilon_for(self._events, delta, self._accountant)

    def epsilon_if(self, event: PrivacyEvent, delta: float) -> float:
        """Dry run: the epsilon after also applying ``event`` (nothing recorded)."""
        self._check(event)
        return epsilon_for([*self._events, event], delta, self._accountant)

    def record(self, event: PrivacyEvent) -> None:
        """Append ``event`` (validated against the assumed sampling)."""
        self._check(event)
        self._events.append(event)
