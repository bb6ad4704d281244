"""Who takes part in a round: waiting for sites to connect, then sampling the cohort.

``fixed`` sampling draws a fixed-size cohort reproducibly from the run seed;
``poisson`` samples each site independently from OS entropy, as privacy
amplification by sampling assumes (the client-level accountant is told which).
"""

from __future__ import annotations

import math
import time

from flwr.serverapp import Grid

from common.config import RunConfig
from common.errors import ProtocolAbort
from common.rng import secure_generator, seeded_generator

NODE_WAIT_POLL_S = 1.0


def sample_cohort(node_ids: list[int], cfg: RunConfig, server_round: int) -> list[int]:
    """Choose this round's sites.

    ``fixed``: ``max(min_sites, ceil(fraction_train * n))`` sites uniformly without
    replacement (reproducible from the run seed). ``poisson``: each site
    independently with probability ``fraction_train``, from OS entropy, as
    privacy amplification by sampling assumes.
    """
    nodes = sorted(node_ids)
    if cfg.sampling == "poisson":
        rng = secure_generator()
        return [n for n in nodes if rng.random() < cfg.fraction_train]
    k = min(len(nodes), max(cfg.min_sites, math.ceil(cfg.fraction_train * len(nodes))))
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
