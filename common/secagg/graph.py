"""The public k-regular neighbour graph of a round.

Guarantee: every party computes the same graph from the public configuration
alone, and the graph is a uniformly random relabelling (up to 2^-64
tie probability per pair) of the circulant graph ``C_n(1, ..., k/2)`` (or the
complete graph when ``k = n - 1``) by a permutation drawn from the ChaCha20
PRG keyed by HKDF(graph_seed, "fedseal/v1/neighbour-graph", run, round).
Because the seed is fixed in the configuration before any key is advertised,
the server cannot choose a client's neighbours after seeing keys or dropouts
(Bell et al. 2020 §4, the Harary-graph variant with a random relabelling).
The graph is symmetric, has no self-loops, and every node has exactly ``k``
neighbours.
"""

from __future__ import annotations

import numpy as np

from common.crypto.kdf import LABEL_NEIGHBOUR_GRAPH, derive_round_key
from common.crypto.prg import expand_seed
from common.secagg.params import SecAggConfig


def neighbour_graph(config: SecAggConfig) -> dict[int, frozenset[int]]:
    """Map every cohort node to the set of its ``k`` neighbours."""
    n, k = config.size, config.neighbours
    cohort = config.cohort
    if k == n - 1:
        everyone = frozenset(cohort)
        return {node: everyone - {node} for node in cohort}
    key = derive_round_key(
        config.graph_seed, LABEL_NEIGHBOUR_GRAPH, run_id=config.run_id, round=config.round
    )
    order = np.argsort(expand_seed(key, n, 64), kind="stable")
    ring = [cohort[int(i)] for i in order]
    graph: dict[int, frozenset[int]] = {}
    for position, node in enumerate(ring):
        graph[node] = frozenset(
            ring[(position + sign * offset) % n]
            for offset in range(1, k // 2 + 1)
            for sign in (1, -1)
        )
    return graph
