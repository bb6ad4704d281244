"""Client-level DP at the coordinator (DP-FedAvg, McMahan et al. 2018) around any aggregator.

:class:`CentralDP` wraps an :class:`~server.aggregation.base.Aggregator`
whose sum holds unit-weight contributions each clipped to L2 ``C`` (sites
clip under secure aggregation; the plain aggregator re-clips when asked).
After the inner aggregate it adds Gaussian noise of std ``z * Delta`` to the
sum (:func:`common.dp.noise_aggregate`, OS-entropy generator), divides by the
run's fixed denominator ``D`` (:func:`server.cohort.dp_denominator`: ``q*N``
under Poisson sampling, the planned cohort size otherwise), emits the round's
:class:`~common.dp.PrivacyEvent` and commits it to the run's client-level
accountant, in the spirit of Flower's ``DifferentialPrivacyServerSideFixedClipping``
and dp_accounting's check-then-commit accountants.

The sensitivity ``Delta`` (:func:`client_level_sensitivity`), fixed at construction:

* plain aggregation: ``C`` (the server re-clips every update it sums);
* secure aggregation: ``C + sqrt(d) / s``, the bound on a quantised
  contribution (:func:`common.secagg.quantize.quantised_l2_bound`) at the
  smallest scale ``s`` any round can get, that of a cohort of ``N`` sites
  (the round loop refuses to sample among more than ``N`` admitted sites);
* secure aggregation over a **Poisson** cohort: twice that (``m`` times for a
  protocol minimum of ``m`` sites, :func:`server.cohort.min_secure_cohort`).
  Secure aggregation cannot run for fewer than ``m`` sites, so such a round
  releases noise only: the sum counts as zero. Then one site's presence can
  switch ``m - 1`` other sites' contributions on (a cohort of ``m - 1``
  others becomes a cohort of ``m``), so the output moves by up to
  ``m * C'`` (``C'`` the bound on one contribution) on that event. Conditioned
  on the other sites' coins this is still one site sampled with probability
  ``q`` shifting a Gaussian by at most ``m * C'``, so the sampled-Gaussian
  accountant holds with that sensitivity. A fixed cohort is not random in the
  site's presence (its size comes from the plan), so it keeps ``C'``.

What the round releases never depends on the realised count: a round whose
Poisson cohort is empty, or too small for secure aggregation, is aggregated
like any other (noise only, ``noise / D`` added to the model) rather than
aborted; the run's ``min_sites`` applies to the connected sites, not to the
contributors. A round that *failed* for another reason (the secure protocol
lost too many sites, a policy denial) gets no noise and spends nothing: it is
not released, as before. The noise multiplier can be calibrated to a target
client-level epsilon (:func:`calibrate_client_noise`), and
:func:`client_level_outlook` says beforehand whether the noise lets the model
learn at all.

What is private, against whom: one site's whole contribution to the released
model, against whoever receives the model and the released outputs
(:meth:`server.results.RoundResult.released`), with ``q`` the Poisson sampling
rate of sites when the server samples that way (amplification), else 1. This
coordinator adds the noise after it has seen the sum; see DESIGN.md §4.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from common.config import RunConfig
from common.dp import (
    ClientLevelAccountant,
    PrivacyEvent,
    calibrate_noise_multiplier,
    epsilon_for,
    noise_aggregate,
)
from common.dp.central import mean_noise_std
from common.errors import ConfigurationError, ProtocolAbort
from common.rng import secure_generator
from server.aggregation.base import (
    Aggregate,
    Aggregator,
    ClientLevelRelease,
    RoundInput,
)
from server.aggregation.exchange import Exchange
from server.cohort import dp_denominator, min_secure_cohort, planned_sites
from server.results import SiteOutcome

NOISE_ONLY_EVENT = "central_dp_noise_only"


def client_level_sensitivity(cfg: RunConfig, vector_length: int) -> float:
    """``Delta``: how far one site can move the sum CentralDP noises (see the module docstring).

    Raises
    ------
    ConfigurationError
        If ``N`` sites cannot share the secure-aggregation ring at
        ``secagg_bits``, or a value is outside its domain.
    """
    if not cfg.secagg:
        return cfg.clip_norm
    from common.secagg.params import default_scale
    from common.secagg.quantize import quantised_l2_bound

    scale = default_scale(cfg.clip_norm, cfg.secagg_bits, planned_sites(cfg))
    contribution = quantised_l2_bound(cfg.clip_norm, vector_length, scale)
    return contribution * (min_secure_cohort(cfg) if cfg.sampling == "poisson" else 1)


@dataclass(frozen=True, slots=True)
class ClientLevelOutlook:
    """What client-level DP does to each round's update, known before the run.

    ``mean_noise_std`` is the noise std per coordinate of the released mean
    update, ``z * Delta / D``; ``update_scale`` is ``C / sqrt(d)``, the root
    mean square coordinate of an update clipped to exactly ``C``, the largest
    typical coordinate a clipped update has. When the noise exceeds it, the
    noise added to the model each round has a larger norm (``sqrt(d)`` times
    its std) than the whole mean update can have (``C``): every round moves
    the model more at random than towards anything, which is what the runs at
    10 sites showed (chance accuracy at 0.7 to 2.5 per coordinate).
    """

    denominator: float
    sensitivity: float
    noise_multiplier: float
    clip_norm: float
    vector_length: int
    mean_noise_std: float

    @property
    def update_scale(self) -> float:
        """``C / sqrt(d)``."""
        return self.clip_norm / math.sqrt(self.vector_length)

    @property
    def learns(self) -> bool:
        """Whether the noise per coordinate stays at or below :attr:`update_scale`."""
        return self.mean_noise_std <= self.update_scale

    @property
    def sites_needed(self) -> int:
        """The smallest denominator (sites per round) at which :attr:`learns` would hold."""
        return math.ceil(self.noise_multiplier * self.sensitivity / self.update_scale)

    def warning(self) -> str | None:
        """One line saying why the run cannot learn, or None when it can."""
        if self.learns:
            return None
        return (
            f"client-level DP will drown every update at this cohort size: the noise std on the "
            f"mean is {self.mean_noise_std:.3g} per coordinate (z*Delta/D = "
            f"{self.noise_multiplier:g} x {self.sensitivity:.4g} / {self.denominator:g}), above "
            f"C/sqrt(d) = {self.update_scale:.3g} for an update clipped to C = {self.clip_norm:g} "
            f"over d = {self.vector_length} coordinates; it needs about {self.sites_needed} "
            "sites per round (q*N), or a smaller noise multiplier (a larger epsilon)"
        )

    def to_json(self) -> dict[str, Any]:
        """The fields and :attr:`update_scale`, for the results document."""
        return {**asdict(self), "update_scale": self.update_scale}


def client_level_outlook(cfg: RunConfig, vector_length: int) -> ClientLevelOutlook:
    """The noise on each round's mean update under ``cfg``, against a clipped update's size."""
    sensitivity = client_level_sensitivity(cfg, vector_length)
    denominator = dp_denominator(cfg)
    return ClientLevelOutlook(
        denominator=denominator,
        sensitivity=sensitivity,
        noise_multiplier=cfg.noise_multiplier,
        clip_norm=cfg.clip_norm,
        vector_length=vector_length,
        mean_noise_std=mean_noise_std(cfg.noise_multiplier, sensitivity, denominator),
    )


def calibrate_client_noise(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the noise multiplier that meets ``client_epsilon`` over its rounds.

    The smallest ``z`` with client-level epsilon ``<= client_epsilon`` at
    ``delta`` after ``rounds`` rounds at the client-level sampling rate
    (:func:`common.dp.calibrate_noise_multiplier`); ``cfg`` unchanged when no
    target is set. The sensitivity does not enter: the noise std is ``z``
    times it whatever it is.

    Raises
    ------
    ConfigurationError
        If the target cannot be met.
    """
    if cfg.client_epsilon <= 0:
        return cfg
    z = calibrate_noise_multiplier(
        cfg.client_epsilon, cfg.delta, cfg.client_sample_rate, cfg.rounds, cfg.accountant
    )
    return cfg.replace(noise_multiplier=z)


class CentralDP:
    """DP-FedAvg noise on the aggregate of ``inner``; the run's client-level accountant.

    ``vector_length`` is the model size ``d`` (secure aggregation's rounding
    slack grows with it). ``cfg`` describes ``inner`` (``secagg`` on means a
    secure sum): :func:`server.pipeline.aggregator_for` builds both from it.

    Raises
    ------
    ConfigurationError
        At construction, when ``inner`` does not bound every contribution by
        the run's ``clip_norm`` (its sensitivity would be unbounded), when the
        secure sensitivity cannot be computed (too few bits for ``N`` sites),
        or when the noise multiplier misses the run's ``client_epsilon`` target.
    """

    def __init__(self, inner: Aggregator, cfg: RunConfig, *, vector_length: int) -> None:
        clipped_to = getattr(inner, "clipped_to", None)
        if clipped_to is None or clipped_to > cfg.clip_norm:
            raise ConfigurationError(
                "central DP needs an aggregator whose contributions are clipped to clip_norm"
            )
        self.inner = inner
        self.cfg = cfg
        self.population = planned_sites(cfg)
        self.outlook = client_level_outlook(cfg, vector_length)
        self.denominator = self.outlook.denominator
        self.sensitivity = self.outlook.sensitivity
        # Secure aggregation cannot run below this many sites: such rounds release noise only.
        self.min_cohort = min_secure_cohort(cfg) if cfg.secagg else 0
        self.accountant = ClientLevelAccountant(
            cfg.client_sampling, cfg.client_sample_rate, cfg.accountant
        )
        self._check_target()

    @property
    def clipped_to(self) -> float:
        return self.cfg.clip_norm

    def _check_target(self) -> None:
        """Refuse a noise multiplier that cannot keep the run within ``client_epsilon``."""
        if self.cfg.client_epsilon <= 0:
            return
        event = self.accountant.event_for_round(self.cfg.noise_multiplier)
        planned = epsilon_for([event] * self.cfg.rounds, self.cfg.delta, self.cfg.accountant)
        if planned > self.cfg.client_epsilon * (1 + 1e-6):
            raise ConfigurationError(
                f"noise_multiplier {self.cfg.noise_multiplier:g} gives client-level epsilon "
                f"{planned:.3g} over {self.cfg.rounds} rounds, above client_epsilon "
                f"{self.cfg.client_epsilon:g}; calibrate it (server.privacy.calibrate_client_noise)"
            )

    def restore(self, events: list[PrivacyEvent]) -> None:
        """Replace the accountant's history (a resumed run's recorded client-level events)."""
        self.accountant = ClientLevelAccountant(
            self.cfg.client_sampling, self.cfg.client_sample_rate, self.cfg.accountant, events
        )

    def epsilon_after_next(self) -> float:
        """Client-level epsilon if one more round is released (what a policy cap judges)."""
        event = self.accountant.event_for_round(self.cfg.noise_multiplier)
        return self.accountant.epsilon_if(event, self.cfg.delta)

    def aggregate(self, round_input: RoundInput, exchange: Exchange) -> Aggregate:
        cohort = round_input.cohort
        if len(cohort) > self.population:
            # The loop never samples among more than N sites; a cohort above N would
            # make the rounding slack (and the denominator) wrong: not released.
            agg = Aggregate(np.zeros(round_input.global_vector.size), 1.0, [], [])
            agg.failure = ProtocolAbort(
                f"round {round_input.server_round}: a cohort larger than the {self.population} "
                "sites client-level DP is calibrated for"
            )
            return agg
        if len(cohort) < self.min_cohort:
            agg = self._noise_only(round_input)
        else:
            agg = self.inner.aggregate(round_input, exchange)
        if agg.failure is not None:
            return agg
        central = noise_aggregate(
            [agg.total],
            denominator=self.denominator,
            noise_multiplier=self.cfg.noise_multiplier,
            sensitivity=self.sensitivity,
            rng=secure_generator(),
            sample_rate=self.cfg.client_sample_rate,
        )
        self.accountant.record(central.event)
        agg.mean_update = np.asarray(central.mean[0], dtype=np.float32)
        agg.central = ClientLevelRelease(
            epsilon=self.accountant.epsilon(self.cfg.delta),
            noise_std=central.noise_std,
            denominator=central.denominator,
            sensitivity=self.sensitivity,
        )
        return agg

    def _noise_only(self, round_input: RoundInput) -> Aggregate:
        """A cohort too small for secure aggregation: nobody is asked, the sum counts as zero.

        Its sites are told nothing and send nothing; the coordinator's
        private record says so (:data:`NOISE_ONLY_EVENT`), the released
        outputs do not (the round looks like any other).
        """
        server_round = round_input.server_round
        reason = (
            f"not asked: the cohort is below secure aggregation's minimum of {self.min_cohort} "
            "sites; the round released noise only"
        )
        agg = Aggregate(
            np.zeros(round_input.global_vector.size),
            1.0,
            [],
            [SiteOutcome(n, False, reason) for n in round_input.cohort],
        )
        agg.event(
            NOISE_ONLY_EVENT,
            {
                "round": server_round,
                "reason": f"cohort below secure aggregation's minimum of {self.min_cohort}",
                "cohort": [str(n) for n in round_input.cohort],
            },
        )
        return agg
