"""Hypothesis properties of secure aggregation over n, t, k, vector sizes and dropouts."""

from __future__ import annotations

from collections.abc import Sequence
from unittest import mock

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from common.crypto import shamir
from common.errors import ConfigurationError, ProtocolAbort
from common.rng import seeded_generator
from common.secagg import SecAggConfig, Stage, make_config, run_round, simulate
from common.secagg.graph import neighbour_graph
from common.secagg.messages import AdvertiseKeysReply
from common.secagg.quantize import error_bound, lift_signed, quantize
from common.secagg.server import SecAggServer
from common.secagg.signing import graph_seed, quorum
from common.secagg.simulate import client_generators, federated_config


class _Recording(SecAggServer):
    """The real server; remembers the advertisements it was given (to rebuild the graph)."""

    advertised: list[AdvertiseKeysReply] = []

    def receive_advertise_keys(self, replies: Sequence[AdvertiseKeysReply]):  # type: ignore[no-untyped-def]
        _Recording.advertised = list(replies)
        return super().receive_advertise_keys(replies)


@st.composite
def rounds(draw: st.DrawFn) -> tuple:
    n = draw(st.integers(3, 16))
    k_choices = [n - 1] + [k for k in range(2, n - 1) if k % 2 == 0]
    k = draw(st.sampled_from(k_choices))
    t = draw(st.integers(k // 2 + 1, k))
    d = draw(st.integers(1, 40))
    bits = draw(st.sampled_from([16, 32, 40]))
    config, identities = federated_config(
        run_id=draw(st.integers(0, 2**64 - 1)),
        round=draw(st.integers(0, 1000)),
        cohort=draw(st.lists(st.integers(1, 2**64 - 1), min_size=n, max_size=n, unique=True)),
        threshold=t,
        neighbours=k,
        value_bound=1.5,
        vector_length=d,
        bits=bits,
    )
    stage = draw(st.sampled_from(list(Stage)[1:]))
    # mostly few dropouts (k - t always leaves t holders), sometimes any number
    most = draw(st.one_of(st.integers(0, k - t + 1), st.integers(0, n)))
    dropped = draw(st.sets(st.sampled_from(config.cohort), max_size=most))
    return config, identities, stage, dropped, draw(st.integers(0, 2**32))


def _graph(config, advertised: list[AdvertiseKeysReply]) -> dict[int, frozenset[int]]:
    """The graph every party must use: seeded by the advertisements, in node order (v3)."""
    entries = [r.advertisement().encode() for r in sorted(advertised, key=lambda r: r.node_id)]
    return neighbour_graph(config, graph_seed(config, entries))


def _expected_contributors(config, graph, stage: Stage, dropped: set[int]) -> set[int] | None:
    """An independent model of the protocol's dropout rules: contributors, or None for abort.

    In v3 the masked inputs must also reach the consistency quorum, a quorum of the
    survivors must sign, and the signers are the only ones that reveal shares.
    """
    t, q = config.threshold, quorum(config)
    alive = set(config.cohort) - dropped
    if stage in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS):
        while True:  # nodes with fewer than t live neighbours are excluded
            weak = {u for u in alive if len(graph[u] & alive) < t}
            if not weak:
                break
            alive -= weak
        return alive if len(alive) >= max(t, q) else None
    if stage is Stage.COLLECT_MASKED:
        if len(alive) < max(t, q):
            return None
        needed = alive | {x for x in dropped if graph[x] & alive}
        return alive if all(len(graph[u] & alive) >= t for u in needed) else None
    # CONSISTENCY: a quorum must sign; UNMASK: all signed. Either way every node's seed needs
    # t revealing neighbours.
    if stage is Stage.CONSISTENCY and len(alive) < q:
        return None
    return set(config.cohort) if all(len(graph[u] & alive) >= t for u in config.cohort) else None


@settings(max_examples=40, deadline=None)
@given(rounds())
def test_run_round_any_dropout_pattern_exact_sum_or_abort(case: tuple) -> None:
    config, identities, stage, dropped, seed = case
    rng = seeded_generator(seed)
    inputs = {u: rng.uniform(-1.5, 1.5, config.vector_length) for u in config.cohort}
    _Recording.advertised = []
    with mock.patch.object(simulate, "SecAggServer", _Recording):
        try:
            result = run_round(
                inputs, config, {stage: dropped}, seeded_generator(seed), identities=identities
            )
        except ProtocolAbort:
            result = None
    if _Recording.advertised:
        graph = _graph(config, _Recording.advertised)
        contributors = _expected_contributors(config, graph, stage, dropped)
    else:  # nobody advertised: the round cannot start
        contributors = None
    event(f"{stage.name}: {'abort' if contributors is None else 'sum'}")
    if contributors is None:
        assert result is None, (stage, dropped)
        return
    assert result is not None, (stage, dropped)
    assert set(result.contributors) == contributors
    generators = client_generators(config, seeded_generator(seed))
    expected = np.zeros(config.vector_length, dtype=np.int64)
    for u in contributors:
        expected += lift_signed(quantize(inputs[u], config, generators[u]), config.bits)
    assert np.array_equal(result.sum_int, expected)
    plain = np.sum([inputs[u] for u in contributors], axis=0)
    assert np.all(np.abs(result.sum - plain) <= error_bound(config, len(contributors)) + 1e-9)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_config_binding_roundtrips_in_any_cohort_order(data: st.DataObject) -> None:
    n = data.draw(st.integers(2, 12))
    cohort = data.draw(st.lists(st.integers(1, 2**64 - 1), min_size=n, max_size=n, unique=True))
    keys = data.draw(st.lists(st.binary(min_size=32, max_size=32), min_size=n, max_size=n))
    fields = {"run_id": 1, "round": 2, "threshold": 1.0, "value_bound": 1.0, "vector_length": 3}
    if len(set(keys)) < n:  # two nodes bound to one key: never a configuration
        with pytest.raises(ConfigurationError, match="two share one"):
            make_config(cohort=cohort, identities=keys, **fields)
        return
    config = make_config(cohort=cohort, identities=keys, **fields)
    binding = dict(zip(cohort, keys, strict=True))
    assert config.cohort == tuple(sorted(cohort))
    assert all(config.identity_of(u) == binding[u] for u in cohort)
    data_bytes = config.encode()
    assert len(data_bytes) == 25 + 40 * n + 29
    decoded = SecAggConfig.decode(data_bytes)
    assert decoded == config and decoded.digest() == config.digest()
    # any other binding of the same cohort is another configuration (another digest)
    i, j = data.draw(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)))
    if i != j:
        swapped = list(keys)
        swapped[i], swapped[j] = swapped[j], swapped[i]
        assert make_config(cohort=cohort, identities=swapped, **fields).digest() != config.digest()


@settings(max_examples=50, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    k=st.integers(1, 12),
    data=st.data(),
)
def test_shamir_roundtrip_any_t_subset(secret: bytes, k: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, k))
    indices = data.draw(st.lists(st.integers(1, 2**32 - 1), min_size=k, max_size=k, unique=True))
    shares = shamir.split_secret(secret, threshold=t, indices=indices)
    subset = data.draw(st.permutations(shares))[:t]
    assert shamir.combine_shares(subset, threshold=t) == secret
    if t > 1:
        with pytest.raises(ProtocolAbort):
            shamir.combine_shares(subset[: t - 1], threshold=t)
