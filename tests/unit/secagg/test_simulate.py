"""End-to-end properties of a SecAgg+ round driven by common.secagg.simulate."""

from __future__ import annotations

import math

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.errors import DataError, ProtocolAbort, ProtocolError
from common.rng import seeded_generator
from common.secagg import Stage, make_config, run_round
from common.secagg.client import SecAggClient
from common.secagg.messages import (
    AdvertiseKeysRequest,
    Ciphertext,
    CollectMaskedRequest,
    ShareKeysRequest,
)
from common.secagg.params import SecAggConfig
from common.secagg.quantize import error_bound, lift_signed, quantize
from common.secagg.signing import public_bytes, quorum
from common.secagg.simulate import client_generators, federated_config, make_identities, members_of


def _config(
    n: int, d: int = 200, **kw: object
) -> tuple[SecAggConfig, dict[int, Ed25519PrivateKey]]:
    """A configuration binding a fresh identity to each node, and those identities."""
    args: dict[str, object] = {
        "run_id": 11,
        "round": 4,
        "cohort": [100 + 3 * i for i in range(n)],
        "threshold": 0.6,
        "value_bound": 2.0,
        "vector_length": d,
    }
    args.update(kw)
    return federated_config(**args)


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
        config, identities = _config(n, bits=bits)
        inputs = _inputs(config)
        result = run_round(inputs, config, {}, seeded_generator(99), identities=identities)
        assert result.contributors == config.cohort and result.dropped == ()
        assert np.array_equal(result.sum_int, _expected(config, inputs, config.cohort))
        plain = np.sum([inputs[u] for u in config.cohort], axis=0)
        assert np.all(np.abs(result.sum - plain) <= error_bound(config, n) + 1e-9)
        assert result.sum.dtype == np.float64


@pytest.mark.parametrize(
    "stage",
    [
        Stage.ADVERTISE_KEYS,
        Stage.SHARE_KEYS,
        Stage.COLLECT_MASKED,
        Stage.CONSISTENCY,
        Stage.UNMASK,
    ],
)
def test_run_round_dropouts_at_each_stage_exact_survivor_sum(stage: Stage) -> None:
    config, identities = _config(14, threshold=0.6)  # k = 12, t = 8, quorum 11
    assert quorum(config) == 11
    inputs = _inputs(config, 1)
    rng = seeded_generator(5)
    for _ in range(3):
        dropped = set(rng.choice(config.cohort, size=3, replace=False).tolist())
        result = run_round(
            inputs, config, {stage: dropped}, seeded_generator(99), identities=identities
        )
        if stage in (Stage.CONSISTENCY, Stage.UNMASK):
            assert result.contributors == config.cohort  # their inputs are in, masks removed
        else:
            assert set(result.dropped) == dropped
        assert np.array_equal(result.sum_int, _expected(config, inputs, result.contributors))


def test_run_round_dropouts_across_all_stages_exact_sum() -> None:
    # The graph now comes from fresh keys (v3), so the pattern must work for any graph:
    # 7 = k - t dropouts in all leave every secret t live holders, and 25 masked inputs
    # clear the consistency quorum of 20.
    config, identities = _config(30, d=50, threshold=0.55)  # k = 16, t = 9, quorum 20
    assert (config.neighbours, config.threshold, quorum(config)) == (16, 9, 20)
    inputs = _inputs(config, 2)
    cohort = list(config.cohort)
    drop = {
        Stage.ADVERTISE_KEYS: {cohort[0]},
        Stage.SHARE_KEYS: {cohort[5]},
        Stage.COLLECT_MASKED: set(cohort[10:13]),
        Stage.CONSISTENCY: {cohort[20]},
        Stage.UNMASK: {cohort[25]},
    }
    result = run_round(inputs, config, drop, seeded_generator(99), identities=identities)
    expected_out = {cohort[0], cohort[5], *cohort[10:13]}
    assert set(result.dropped) == expected_out
    assert cohort[20] in result.contributors and cohort[25] in result.contributors
    assert np.array_equal(result.sum_int, _expected(config, inputs, result.contributors))


def test_run_round_masked_dropout_down_to_the_consistency_quorum() -> None:
    # v3's price: more than half the cohort must reach the consistency round, even where
    # t alone would do (complete graph, so the outcome does not depend on the keys)
    config, identities = _config(12, d=20)  # k = 11, t = 7, quorum 10
    assert (config.neighbours, config.threshold, quorum(config)) == (11, 7, 10)
    inputs = _inputs(config, 3)
    cohort = list(config.cohort)
    result = run_round(
        inputs,
        config,
        {Stage.COLLECT_MASKED: set(cohort[:2])},
        seeded_generator(99),
        identities=identities,
    )
    assert result.dropped == tuple(cohort[:2])
    assert np.array_equal(result.sum_int, _expected(config, inputs, result.contributors))
    with pytest.raises(ProtocolAbort, match="consistency quorum 10"):
        run_round(
            inputs,
            config,
            {Stage.COLLECT_MASKED: set(cohort[:3])},
            seeded_generator(99),
            identities=identities,
        )


@pytest.mark.parametrize(
    ("stage", "count", "reason"),
    [
        (Stage.ADVERTISE_KEYS, 3, "threshold"),
        (Stage.SHARE_KEYS, 3, "threshold"),
        (Stage.COLLECT_MASKED, 3, "threshold"),
        (Stage.COLLECT_MASKED, 2, "quorum 4"),  # 3 = t masked inputs, but quorum 4
        (Stage.CONSISTENCY, 2, "3 valid signatures, fewer than the quorum 4"),
        (Stage.UNMASK, 3, "threshold"),
    ],
)
def test_run_round_below_threshold_or_quorum_aborts(stage: Stage, count: int, reason: str) -> None:
    config, identities = _config(5)  # k = 4, t = 3, quorum 4
    inputs = _inputs(config)
    cohort = list(config.cohort)
    with pytest.raises(ProtocolAbort, match=reason):
        run_round(
            inputs, config, {stage: set(cohort[:count])}, seeded_generator(0), identities=identities
        )


def test_run_round_with_given_identities_and_objects_off_the_wire() -> None:
    config, identities = _config(6, d=10)
    inputs = _inputs(config, 4)
    for wire in (True, False):
        result = run_round(
            inputs, config, {}, seeded_generator(1), wire=wire, identities=identities
        )
        assert np.array_equal(result.sum_int, _expected_with(config, inputs, 1))
        assert result.rejected == {}


def test_federated_config_binds_the_identities_it_returns() -> None:
    config, identities = _config(6, d=10, cohort=[40, 10, 30, 20, 60, 50])
    assert config.cohort == (10, 20, 30, 40, 50, 60) and set(identities) == set(config.cohort)
    for u in config.cohort:
        assert config.identity_of(u) == public_bytes(identities[u])
    again, _ = _config(6, d=10, cohort=[40, 10, 30, 20, 60, 50])
    assert set(again.identities).isdisjoint(config.identities)  # fresh keys every call
    assert again.digest() != config.digest()


def test_run_round_refuses_identities_other_than_the_bound_ones() -> None:
    config, identities = _config(5, d=4)
    inputs = _inputs(config)
    with pytest.raises(DataError, match="one key per cohort node"):
        run_round(
            inputs, config, {}, seeded_generator(0), identities=dict(list(identities.items())[1:])
        )
    # a roster the configuration does not bind: every site refuses before it makes keys
    strangers = make_identities(config.cohort)
    with pytest.raises(ProtocolError, match="binds node .* to another identity"):
        run_round(inputs, config, {}, seeded_generator(0), identities=strangers)
    # two sites' keys swapped: each site finds its node bound to the other's key
    first, second = config.cohort[:2]
    swapped = {**identities, first: identities[second], second: identities[first]}
    with pytest.raises(ProtocolError, match=f"binds node {first} to another identity"):
        run_round(inputs, config, {}, seeded_generator(0), identities=swapped)
    # and a configuration made by make_config with those very keys runs
    bound = make_config(
        run_id=config.run_id,
        round=config.round,
        cohort=list(config.cohort),
        identities=[public_bytes(swapped[u]) for u in config.cohort],
        threshold=config.threshold,
        value_bound=config.value_bound,
        vector_length=config.vector_length,
    )
    result = run_round(inputs, bound, {}, seeded_generator(0), identities=swapped)
    assert result.contributors == config.cohort


def _expected_with(config: SecAggConfig, inputs: dict[int, np.ndarray], seed: int) -> np.ndarray:
    generators = client_generators(config, seeded_generator(seed))
    return np.sum(
        [lift_signed(quantize(inputs[u], config, generators[u]), config.bits) for u in inputs],
        axis=0,
    )


def test_masked_vector_uniform_chi_square() -> None:
    # A client's masked vector of an all-zero input must look uniform over Z_2^32.
    config, identities = _config(5, d=200_000, value_bound=1.0)
    u = config.cohort[0]
    members = members_of(identities)
    clients = {v: SecAggClient(v, config, identities[v], members) for v in config.cohort}
    keys = {v: clients[v].advertise_keys(AdvertiseKeysRequest(11, 4, v)) for v in config.cohort}
    ads = tuple(keys[v].advertisement() for v in config.cohort)
    shares = {v: clients[v].share_keys(ShareKeysRequest(11, 4, v, ads)) for v in config.cohort}
    incoming = tuple(
        Ciphertext(v, next(c.data for c in shares[v].ciphertexts if c.node_id == u))
        for v in sorted(clients[u].neighbours)
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
