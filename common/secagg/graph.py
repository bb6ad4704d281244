"""The public k-regular neighbour graph of a round.

Guarantee: every party computes the same graph from the public configuration
alone, and the graph is a uniformly random relabelling (up to 2^-64
tie probability per pair) of the circulant graph ``C_n(1, ..., k/2)`` (or the
complete graph when ``k = n - 1``) by a permutation drawn from the ChaCha20
PRG keyed by HKDF(seed, "fedseal/v1/neighbour-graph", run, round). In protocol
v3 the seed is :func:`common.secagg.signing.graph_seed`, a hash over the
round's signed key advertisements, which every site recomputes: the
coordinator does not choose it (Bell et al. 2020 §4, the Harary-graph variant
with a random relabelling).
The graph is symmetric, has no self-loops, and every node has exactly ``k``
neighbours.
"""

from __future__ import annotations

import numpy as np

from common.crypto.kdf import LABEL_NEIGHBOUR_GRAPH, derive_round_key
from common.crypto.prg import expand_seed
from common.secagg.params import SecAggConfig


def neighbour_graph(config: SecAggConfig, seed: bytes) -> dict[int, frozenset[int]]:
    """Map every cohort node to the set of its ``k`` neighbours under the 32-byte ``seed``."""
    n, k = config.size, config.neighbours
    cohort = config.cohort
    if k == n - 1:
        everyone = frozenset(cohort)
        return {node: everyone - {node} for node in cohort}
    key = derive_round_key(seed, LABEL_NEIGHBOUR_GRAPH, run_id=config.run_id, round=config.round)
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
