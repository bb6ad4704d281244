"""Client-level DP at the coordinator (DP-FedAvg, McMahan et al. 2018) around any aggregator.

:class:`CentralDP` wraps an :class:`~server.aggregation.base.Aggregator`
whose sum holds unit-weight contributions each clipped to L2 ``C`` (sites
clip under secure aggregation; the plain aggregator re-clips when asked):
after the inner aggregate, it adds Gaussian noise of std ``z*C`` to the sum
(:func:`common.dp.noise_aggregate`, OS-entropy generator), emits the round's
:class:`~common.dp.PrivacyEvent` and commits it to the run's client-level
accountant, in the spirit of Flower's ``DifferentialPrivacyServerSideFixedClipping``
and dp_accounting's check-then-commit accountants. A round that failed, or
that has fewer usable contributions than the run's minimum, gets no noise
and spends nothing: it is not released.

What is private, against whom: one site's whole contribution to the released
model, against whoever receives the model, with ``q`` the Poisson sampling
rate of sites when the server samples that way (amplification), else 1.
This coordinator adds the noise after it has seen the sum; see DESIGN.md §4.
"""

from __future__ import annotations

import numpy as np

from common.config import RunConfig
from common.dp import ClientLevelAccountant, PrivacyEvent, noise_aggregate
from common.errors import ConfigurationError
from common.rng import secure_generator
from server.aggregation.base import (
    Aggregate,
    Aggregator,
    ClientLevelRelease,
    RoundInput,
    require_contributors,
)
from server.aggregation.exchange import Exchange


class CentralDP:
    """DP-FedAvg noise on the aggregate of ``inner``; the run's client-level accountant.

    Raises
    ------
    ConfigurationError
        At construction, when ``inner`` does not bound every contribution by
        the run's ``clip_norm`` (its sensitivity would be unbounded).
    """

    def __init__(self, inner: Aggregator, cfg: RunConfig) -> None:
        clipped_to = getattr(inner, "clipped_to", None)
        if clipped_to is None or clipped_to > cfg.clip_norm:
            raise ConfigurationError(
                "central DP needs an aggregator whose contributions are clipped to clip_norm"
            )
        self.inner = inner
        self.cfg = cfg
        self.accountant = ClientLevelAccountant(
            cfg.client_sampling, cfg.client_sample_rate, cfg.accountant
        )

    @property
    def clipped_to(self) -> float:
        return self.cfg.clip_norm

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
        agg = self.inner.aggregate(round_input, exchange)
        require_contributors(
            agg, self.cfg.min_sites, round_input.server_round, len(round_input.cohort)
        )
        if agg.failure is not None:
            return agg
        central = noise_aggregate(
            [agg.total],
            len(agg.contributors),
            noise_multiplier=self.cfg.noise_multiplier,
            clip_norm=self.cfg.clip_norm,
            rng=secure_generator(),
            sample_rate=self.cfg.client_sample_rate,
        )
        self.accountant.record(central.event)
        agg.mean_update = np.asarray(central.mean[0], dtype=np.float32)
        agg.central = ClientLevelRelease(
            epsilon=self.accountant.epsilon(self.cfg.delta),
            noise_std=central.noise_std,
            contributors=len(agg.contributors),
        )
        return agg
