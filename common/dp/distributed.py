"""A run's distributed-DP parameters, derived by every site and by the server from public settings.

Both sides call :func:`run_params` on the run configuration
(:class:`common.config.RunConfig`) and the model size: nothing about the
noise is taken from a coordinator's message. The noise multiplier ``z`` is
the run's ``noise_multiplier``; when the run targets a client-level epsilon
(``client_epsilon``) the commands calibrate ``z`` with the Skellam accountant
(:func:`calibrate_run_noise`) and each site checks the ``z`` it was given
meets the target (:func:`check_run_noise`) before adding any noise, so a
run configuration with too little noise for its own claimed epsilon is refused.

``t`` for the wrap bound is the smallest threshold any admissible cohort
(2 to ``num_sites`` sites) resolves to (:func:`smallest_threshold`); the
noise share of a round is ``mu / t_r`` with the round's own threshold
(:func:`common.dp.skellam.site_share`).
"""

from __future__ import annotations

import functools
import math

from common.config import RunConfig
from common.dp.skellam import SkellamParams, make_params
from common.dp.skellam_accounting import (
    SkellamEvent,
    calibrate_noise_multiplier,
    epsilon_for,
)
from common.errors import ConfigurationError
from common.secagg.params import MAX_COHORT, resolve_threshold

__all__ = ["calibrate_run_noise", "check_run_noise", "run_params", "smallest_threshold"]


def smallest_threshold(cfg: RunConfig) -> int:
    """The smallest ``t`` a cohort of 2 to ``num_sites`` sites gets from the run's threshold."""
    n_max = max(2, min(cfg.num_sites, MAX_COHORT))
    best = math.inf
    for n in range(2, n_max + 1):
        try:
            t, _ = resolve_threshold(cfg.secagg_threshold_value, n)
        except ConfigurationError:
            continue
        best = min(best, t)
    if best is math.inf:
        raise ConfigurationError("no cohort size gives the run's secure-aggregation threshold")
    return max(1, int(best))


@functools.lru_cache(maxsize=64)
def _params(cfg: RunConfig, dimension: int, z: float) -> SkellamParams:
    return make_params(
        dimension=dimension,
        clip_norm=cfg.clip_norm,
        bits=cfg.secagg_bits,
        max_sites=cfg.num_sites,
        threshold=smallest_threshold(cfg),
        noise_multiplier=z,
    )


def run_params(cfg: RunConfig, dimension: int) -> SkellamParams:
    """The run's :class:`~common.dp.skellam.SkellamParams` (cached per configuration and size).

    Raises
    ------
    ConfigurationError
        If distributed DP is off or the ring cannot hold the noised sum.
    """
    if not cfg.distributed_dp:
        raise ConfigurationError("the run does not use distributed DP")
    return _params(cfg, dimension, float(cfg.noise_multiplier))


def _event(cfg: RunConfig, params: SkellamParams) -> SkellamEvent:
    return SkellamEvent(params.mu, params.l2, params.l1, cfg.client_sample_rate)


def planned_epsilon(cfg: RunConfig, dimension: int) -> float:
    """Client-level epsilon after ``rounds`` rounds at the noise floor (``t`` survivors)."""
    params = run_params(cfg, dimension)
    return epsilon_for([_event(cfg, params)] * cfg.rounds, cfg.delta)


def calibrate_run_noise(cfg: RunConfig, dimension: int) -> RunConfig:
    """``cfg`` with the smallest ``z`` (relative 1e-3) that meets ``client_epsilon`` (unchanged if none)."""
    if not cfg.distributed_dp or cfg.client_epsilon <= 0:
        return cfg

    def sensitivities(z: float) -> tuple[float, float, float]:
        p = _params(cfg, dimension, z)
        return p.mu, p.l2, p.l1

    z = calibrate_noise_multiplier(
        cfg.client_epsilon, cfg.delta, cfg.rounds, cfg.client_sample_rate, sensitivities
    )
    return cfg.replace(noise_multiplier=z)


def check_run_noise(cfg: RunConfig, dimension: int) -> SkellamParams:
    """The run's parameters, once its ``z`` is shown to meet its own ``client_epsilon``.

    Raises
    ------
    ConfigurationError
        If the configuration claims a client-level epsilon its noise does not give.
    """
    params = run_params(cfg, dimension)
    if cfg.client_epsilon > 0:
        planned = planned_epsilon(cfg, dimension)
        if planned > cfg.client_epsilon * (1 + 1e-6):
            raise ConfigurationError(
                f"noise multiplier {cfg.noise_multiplier:g} gives client-level epsilon "
                f"{planned:.4g} over {cfg.rounds} rounds under distributed DP, above the "
                f"run's client_epsilon {cfg.client_epsilon:g}"
            )
    return params
