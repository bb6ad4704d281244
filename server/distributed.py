"""Distributed client-level DP at the coordinator: decode the noised sum, account, add nothing.

:class:`DistributedDP` wraps the secure aggregator when the run sets
``distributed_dp``. Each site has already added its share of Skellam noise
in the quantised domain before masking (:mod:`common.dp.skellam`,
:func:`client.secure.handle_masked`), so the sum secure aggregation unmasks
carries the whole noise: this wrapper only decodes it (signed integers /
``gamma``, inverse rotation), divides by the run's fixed denominator ``D``
(:func:`server.cohort.dp_denominator`, as central DP does,
:mod:`common.dp.central`), and records the round's
:class:`~common.dp.skellam_accounting.SkellamEvent` with the noise of the
survivors actually summed, ``m mu / t_r`` for ``m`` contributors and the
round's threshold ``t_r`` (never less than the target ``mu``: the sites'
consistency check refuses fewer than ``t_r`` survivors). **It calls no
noise sampler** (a test patches every sampler to raise).

What is private, against whom: one site's update (zero-out adjacency,
:mod:`common.dp.skellam`), against this coordinator too — it never holds an
un-noised sum — and anyone it releases the model to, assuming at least
``t_r`` honest survivors per round. A coordinator that under-reports the
survivors only makes its own epsilon larger; the noise is the sites'.

A round that fails (too few sites for secure aggregation, a lost quorum, a
policy denial) releases nothing and spends nothing. Under zero-out
adjacency who takes part does not depend on any site's data, so such a
failure reveals nothing the accountant must cover (unlike central DP's
add/remove analysis, which releases noise-only rounds instead).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from common.config import RunConfig
from common.dp.distributed import check_run_noise
from common.dp.skellam import MECHANISM, decode_sum, padded_length, rotation_key
from common.dp.skellam_accounting import ACCOUNTANT, SkellamAccountant, SkellamEvent
from common.errors import ConfigurationError, NotSupportedError, ProtocolAbort
from server.aggregation.base import Aggregate, Aggregator, ClientLevelRelease, RoundInput
from server.aggregation.exchange import Exchange
from server.cohort import dp_denominator, planned_sites

APPLIED_EVENT = "distributed_dp_applied"


@dataclass(frozen=True, slots=True)
class DistributedOutlook:
    """The run's distributed-DP parameters, known before the run (the ``--json`` privacy block)."""

    mechanism: str
    accountant: str
    denominator: float
    noise_multiplier: float
    clip_norm: float
    vector_length: int
    padded_length: int
    bits: int
    gamma: float
    l2_sensitivity: float
    l1_sensitivity: float
    target_mu: float
    threshold_floor: int
    sensitivity: float
    mean_noise_std: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def warning(self) -> str | None:
        scale = self.clip_norm / math.sqrt(self.vector_length)
        if self.mean_noise_std <= scale:
            return None
        return (
            f"distributed DP will drown every update at this cohort size: the noise std on the "
            f"mean is {self.mean_noise_std:.3g} per coordinate, above C/sqrt(d) = {scale:.3g}"
        )


class DistributedDP:
    """Decode, divide by ``D`` and account a secure sum that the sites already noised.

    Raises
    ------
    ConfigurationError
        At construction, when the run is not a secure distributed-DP run or its
        parameters are invalid (too few bits, noise below its own epsilon target).
    """

    def __init__(self, inner: Aggregator, cfg: RunConfig, *, vector_length: int) -> None:
        if not (cfg.distributed_dp and cfg.secagg):
            raise ConfigurationError("distributed DP needs a secure-aggregation run")
        self.inner = inner
        self.cfg = cfg
        self.vector_length = vector_length
        self.params = check_run_noise(cfg, vector_length)
        self.population = planned_sites(cfg)
        self.denominator = dp_denominator(cfg)
        self.accountant = SkellamAccountant(cfg.client_sample_rate)
        p = self.params
        self.outlook = DistributedOutlook(
            mechanism=MECHANISM,
            accountant=ACCOUNTANT,
            denominator=self.denominator,
            noise_multiplier=cfg.noise_multiplier,
            clip_norm=cfg.clip_norm,
            vector_length=vector_length,
            padded_length=padded_length(vector_length),
            bits=p.bits,
            gamma=p.gamma,
            l2_sensitivity=p.l2,
            l1_sensitivity=p.l1,
            target_mu=p.mu,
            threshold_floor=p.threshold,
            sensitivity=p.sensitivity(),
            mean_noise_std=math.sqrt(2.0 * p.mu) / p.gamma / self.denominator,
        )

    @property
    def clipped_to(self) -> float:
        return self.cfg.clip_norm

    def _floor_event(self) -> SkellamEvent:
        p = self.params
        return SkellamEvent(p.mu, p.l2, p.l1, self.cfg.client_sample_rate)

    def restore(self, events: list[Any]) -> None:
        """Resuming needs the rounds' Skellam events, which the record does not keep yet."""
        if events:
            raise NotSupportedError(
                "resuming a distributed-DP run is not supported yet (its Skellam events are "
                "not read back from the record)"
            )

    def epsilon_after_next(self) -> float:
        """Client-level epsilon if one more round is released at the noise floor."""
        return self.accountant.epsilon_if(self._floor_event(), self.cfg.delta)

    def aggregate(self, round_input: RoundInput, exchange: Exchange) -> Aggregate:
        if len(round_input.cohort) > self.population:
            agg = Aggregate(np.zeros(round_input.global_vector.size), 1.0, [], [])
            agg.failure = ProtocolAbort(
                f"round {round_input.server_round}: a cohort larger than the "
                f"{self.population} sites distributed DP is calibrated for"
            )
            return agg
        agg = self.inner.aggregate(round_input, exchange)
        if agg.failure is not None:
            return agg
        if agg.unmasked is None:
            agg.failure = ProtocolAbort("distributed DP: the aggregator returned no secure sum")
            return agg
        sum_int, config_bytes, threshold = agg.unmasked
        survivors = len(agg.contributors)
        if survivors < threshold:  # the sites' consistency check makes this impossible
            agg.failure = ProtocolAbort(
                f"round {round_input.server_round}: {survivors} survivors, below the threshold "
                f"{threshold} the noise floor needs; not released"
            )
            return agg
        p = self.params
        total = decode_sum(sum_int, p, rotation_key(config_bytes))
        mu = survivors * p.mu / threshold
        event = SkellamEvent(mu, p.l2, p.l1, self.cfg.client_sample_rate, survivors)
        self.accountant.record(event)
        agg.total = total
        agg.mean_update = np.asarray(total / self.denominator, dtype=np.float32)
        noise_std = math.sqrt(2.0 * mu) / p.gamma
        agg.central = ClientLevelRelease(
            epsilon=self.accountant.epsilon(self.cfg.delta),
            noise_std=noise_std,
            denominator=self.denominator,
            sensitivity=p.sensitivity(),
            mechanism=MECHANISM,
            accountant=ACCOUNTANT,
        )
        agg.event(
            APPLIED_EVENT,
            {
                "round": round_input.server_round,
                "mechanism": MECHANISM,
                "accountant": ACCOUNTANT,
                "survivors_mu": mu,
                "target_mu": p.mu,
                "threshold": threshold,
                "noise_std": noise_std,
                "gamma": p.gamma,
                "l2_sensitivity": p.l2,
                "l1_sensitivity": p.l1,
                "denominator": self.denominator,
                "sampling": self.cfg.client_sampling,
            },
        )
        return agg
