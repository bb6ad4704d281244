"""End-to-end properties of a SecAgg+ round driven by common.secagg.simulate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.errors import ProtocolAbort
from common.rng import seeded_generator
from common.secagg import Stage, make_config, run_round
from common.secagg.client import SecAggClient
from common.secagg.graph import neighbour_graph
from common.secagg.messages import AdvertiseKeysRequest, ShareKeysRequest
from common.secagg.params import SecAggConfig
from common.secagg.quantize import error_bound, lift_signed, quantize
from common.secagg.simulate import client_generators


def _config(n: int, d: int = 200, **kw: object) -> SecAggConfig:
    args: dict[str, object] = {
        "run_id": 11,
        "round": 4,
        "cohort": [100 + 3 * i for i in range(n)],
        "threshold": 0.6,
        "value_bound": 2.0,
        "vector_length": d,
        "graph_seed": bytes(range(32)),
    }
    args.update(kw)
    return make_config(**args)  # type: ignore[arg-type]


def _inputs(config: SecAggConfig, seed: int = 0) -> dict[int, np.ndarray]:
    rng = seeded_generator(seed)
    return {u: rng.uniform(-2.0, 2.0, config.vector_length) for u in config.cohort}


def _expected(
    config: SecAggConfig, inputs: dict[int, np.ndarray], nodes: tuple[int, ...]
) -> np.ndarray:
    generators = client_generators(config, seeded_generator(99))
    quantised = {
        u: lift_signed(quantize(inputs[u], config, generators[u]), config.bits)
        for u in config.cohort
    }
    return np.sum([quantised[u] for u in nodes], axis=0)


def test_run_round_no_dropout_exact_quantised_sum_and_float_bound() -> None:
    for n, bits in ((3, 32), (8, 16), (20, 40)):
        config = _config(n, bits=bits)
        inputs = _inputs(config)
        result = run_round(inputs, config, {}, seeded_generator(99))
        assert result.contributors == config.cohort and result.dropped == ()
        assert np.array_equal(result.sum_int, _expected(config, inputs, config.cohort))
        plain = np.sum([inputs[u] for u in config.cohort], axis=0)
        assert np.all(np.abs(result.sum - plain) <= error_bound(config, n) + 1e-9)
        assert result.sum.dtype == np.float64


@pytest.mark.parametrize(
    "stage", [Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.COLLECT_MASKED, Stage.UNMASK]
)
def test_run_round_dropouts_at_each_stage_exact_survivor_sum(stage: Stage) -> None:
    config = _config(14, threshold=0.6)
    inputs = _inputs(config, 1)
    rng = seeded_generator(5)
    for _ in range(3):
        dropped = set(rng.choice(config.cohort, size=3, replace=False).tolist())
        result = run_round(inputs, config, {stage: dropped}, seeded_generator(99))
        if stage is Stage.UNMASK:
            assert result.contributors == config.cohort  # their inputs are in, masks removed
        else:
            assert set(result.dropped) == dropped
        assert np.array_equal(result.sum_int, _expected(config, inputs, result.contributors))


def test_run_round_dropouts_across_all_stages_exact_sum() -> None:
    config = _config(30, d=50, threshold=0.55)
    inputs = _inputs(config, 2)
    cohort = list(config.cohort)
    drop = {
        Stage.ADVERTISE_KEYS: {cohort[0]},
        Stage.SHARE_KEYS: {cohort[5]},
        Stage.COLLECT_MASKED: set(cohort[10:19]),  # 30 % at the masked-input stage
    }
    result = run_round(inputs, config, drop, seeded_generator(99))
    expected_out = {cohort[0], cohort[5], *cohort[10:19]}
    assert set(result.dropped) == expected_out
    assert np.array_equal(result.sum_int, _expected(config, inputs, result.contributors))


def test_run_round_below_threshold_aborts() -> None:
    config = _config(5)  # k = 4, t = 3
    inputs = _inputs(config)
    cohort = list(config.cohort)
    for stage in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.COLLECT_MASKED, Stage.UNMASK):
        with pytest.raises(ProtocolAbort, match="threshold"):
            run_round(inputs, config, {stage: set(cohort[:3])}, seeded_generator(0))


def test_masked_vector_uniform_chi_square() -> None:
    # A client's masked vector of an all-zero input must look uniform over Z_2^32.
    config = _config(5, d=200_000, value_bound=1.0)
    u = config.cohort[0]
    clients = {v: SecAggClient(v, config) for v in config.cohort}
    keys = {v: clients[v].advertise_keys(AdvertiseKeysRequest(11, 4, v)) for v in config.cohort}
    graph = neighbour_graph(config)
    from common.secagg.messages import Ciphertext, CollectMaskedRequest, PeerKeys

    shares = {}
    for v in config.cohort:
        peers = tuple(
            PeerKeys(w, keys[w].encryption_key, keys[w].mask_key) for w in sorted(graph[v])
        )
        shares[v] = clients[v].share_keys(ShareKeysRequest(11, 4, v, peers))
    incoming = tuple(
        Ciphertext(v, next(c.data for c in shares[v].ciphertexts if c.node_id == u))
        for v in sorted(graph[u])
    )
    reply = clients[u].collect_masked(
        CollectMaskedRequest(11, 4, u, incoming),
        np.zeros(config.vector_length),
        seeded_generator(0),
    )
    buckets = 256
    counts = np.bincount((reply.masked >> np.uint32(24)).astype(np.int64), minlength=buckets)
    expected = config.vector_length / buckets
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 255 degrees of freedom: mean 255, sd ~22.6; 400 is beyond p = 1e-8.
    assert chi2 < 400, chi2
    low = np.bincount((reply.masked & np.uint32(255)).astype(np.int64), minlength=buckets)
    assert float(((low - expected) ** 2 / expected).sum()) < 400
    assert math.isclose(float(reply.masked.mean()), 2**31, rel_tol=0.01)
