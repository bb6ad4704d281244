"""Who takes part in a round: waiting for sites to connect, then sampling the cohort.

``fixed`` sampling draws a fixed-size cohort reproducibly from the run seed;
``poisson`` samples each site independently from OS entropy, as privacy
amplification by sampling assumes (the client-level accountant is told which).
"""

from __future__ import annotations

import logging
import math
import time

from flwr.serverapp import Grid

from common.config import RunConfig
from common.errors import ConfigurationError, ProtocolAbort
from common.rng import secure_generator, seeded_generator

NODE_WAIT_POLL_S = 1.0
WAIT_PROGRESS_S = 10.0

log = logging.getLogger("flwr.fedseal.server")


def fixed_cohort_size(cfg: RunConfig, available: int) -> int:
    """Sites a ``fixed`` cohort draws from ``available`` ones: ``max(min_sites, ceil(f * n))``, at most n."""
    return min(available, max(cfg.min_sites, math.ceil(cfg.fraction_train * available)))


def planned_sites(cfg: RunConfig) -> int:
    """``N``, the number of sites the run is planned for (``num_sites``).

    A simulation has ``num_sites`` virtual sites; ``fedseal-server start``
    sets it from the roster's members or ``--wait-sites`` under client-level
    DP. It is public (the roster is), fixed before any round, and never the
    number of sites that happen to be connected or to take part.
    """
    return cfg.num_sites


def dp_denominator(cfg: RunConfig) -> float:
    """The fixed denominator of DP-FedAvg's mean (:mod:`common.dp.central`).

    ``q * N`` under Poisson sampling (the expected number of contributors),
    the planned cohort size ``fixed_cohort_size(cfg, N)`` for a fixed cohort;
    ``N`` from :func:`planned_sites`. Known before the run, so dividing by it
    releases nothing about who took part.
    """
    n = planned_sites(cfg)
    if cfg.sampling == "poisson":
        return cfg.fraction_train * n
    return float(fixed_cohort_size(cfg, n))


def min_secure_cohort(cfg: RunConfig) -> int:
    """The smallest cohort secure aggregation runs for with ``cfg``'s threshold and bits.

    2 for a threshold fraction; more for a threshold count ``t`` (it needs
    ``k >= t`` neighbours). Found by asking :func:`common.secagg.make_config`
    itself, so the rule lives in one place.

    Raises
    ------
    ConfigurationError
        If no cohort up to the protocol's maximum satisfies the configuration.
    """
    from common.secagg.params import MAX_COHORT, make_config

    for n in range(2, MAX_COHORT + 1):
        try:
            make_config(
                run_id=0,
                round=0,
                cohort=list(range(1, n + 1)),
                identities=[i.to_bytes(32, "big") for i in range(1, n + 1)],
                threshold=cfg.secagg_threshold_value,
                value_bound=cfg.clip_norm,
                vector_length=1,
                bits=cfg.secagg_bits,
            )
        except ConfigurationError:
            continue
        return n
    raise ConfigurationError(
        f"no secure-aggregation cohort works with threshold {cfg.secagg_threshold} "
        f"at {cfg.secagg_bits} bits"
    )


def sample_cohort(node_ids: list[int], cfg: RunConfig, server_round: int) -> list[int]:
    """Choose this round's sites.

    ``fixed``: :func:`fixed_cohort_size` sites uniformly without replacement
    (reproducible from the run seed). ``poisson``: each site independently
    with probability ``fraction_train``, from OS entropy, as privacy
    amplification by sampling assumes (the cohort may be empty).
    """
    nodes = sorted(node_ids)
    if cfg.sampling == "poisson":
        rng = secure_generator()
        return [n for n in nodes if rng.random() < cfg.fraction_train]
    k = fixed_cohort_size(cfg, len(nodes))
    rng = seeded_generator(cfg.seed * 1_000_003 + server_round)
    picked = rng.choice(len(nodes), size=k, replace=False)  # indices: node ids exceed int64
    return sorted(nodes[int(i)] for i in picked)


def wait_for_nodes(grid: Grid, minimum: int, timeout_s: float) -> list[int]:
    """Block until ``minimum`` nodes are connected; ProtocolAbort after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() > deadline:
            raise ProtocolAbort(
                f"only {len(nodes)} site(s) connected after {timeout_s:.0f} s; need {minimum}"
            )
        time.sleep(NODE_WAIT_POLL_S)


def wait_for_sites(grid: Grid, expected: int, timeout_s: float) -> tuple[list[int], float]:
    """Wait up to ``timeout_s`` for ``expected`` connected sites; (the connected ones, seconds).

    Never raises for too few: after the timeout the run starts with whoever
    is connected (each round then applies ``min_sites`` itself). Says every
    :data:`WAIT_PROGRESS_S` seconds how many are there.
    """
    start = time.monotonic()
    deadline, next_report = start + timeout_s, start
    while True:
        nodes = list(grid.get_node_ids())
        now = time.monotonic()
        if len(nodes) >= expected or now >= deadline:
            return nodes, now - start
        if now >= next_report:
            log.info(
                "waiting for sites: %d of %d connected (up to %.0f s more)",
                len(nodes),
                expected,
                deadline - now,
            )
            next_report = now + WAIT_PROGRESS_S
        time.sleep(min(NODE_WAIT_POLL_S, max(deadline - now, 0.0)))


def expected_cohort(cfg: RunConfig) -> int:
    """The cohort size a run expects: from ``wait_sites`` (else ``min_sites``) connected sites."""
    return fixed_cohort_size(cfg, cfg.wait_sites or cfg.min_sites)


def secure_dropout_tolerance(cfg: RunConfig) -> tuple[int, int, int, int]:
    """(sites a secure round may lose, cohort n, threshold t, neighbours k) for the expected cohort.

    Raises
    ------
    ConfigurationError
        If the threshold setting gives no valid (t, k) for that cohort.
    """
    from common.secagg.params import resolve_threshold
    from common.secagg.signing import tolerated_dropouts

    n = expected_cohort(cfg)
    t, k = resolve_threshold(cfg.secagg_threshold_value, n)
    return tolerated_dropouts(n, t, k), n, t, k
