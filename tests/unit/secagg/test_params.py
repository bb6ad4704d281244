"""Tests of common.secagg.params, graph, stages and quantize."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from common.errors import ConfigurationError, DataError, ProtocolError
from common.rng import seeded_generator
from common.secagg.graph import neighbour_graph
from common.secagg.params import SecAggConfig, make_config
from common.secagg.quantize import dequantize_sum, error_bound, lift_signed, quantize
from common.secagg.stages import TRANSITIONS, Stage, check_transition

SEED = bytes(range(32))


def _config(n: int = 5, **overrides: object) -> SecAggConfig:
    kwargs: dict[str, object] = {
        "run_id": 7,
        "round": 3,
        "cohort": list(range(10, 10 + n)),
        "threshold": 0.6,
        "value_bound": 1.0,
        "vector_length": 64,
        "graph_seed": SEED,
    }
    kwargs.update(overrides)
    return make_config(**kwargs)  # type: ignore[arg-type]


def test_make_config_sum_cannot_wrap() -> None:
    for n, bits in ((3, 8), (50, 32), (100, 16), (7, 53)):
        config = _config(n, bits=bits)
        assert n * config.max_quantised <= 2 ** (bits - 1) - 1


def test_make_config_explicit_scale_that_wraps_raises() -> None:
    with pytest.raises(ConfigurationError):
        _config(10, bits=16, scale=4000.0)
    with pytest.raises(ConfigurationError):
        _config(200, bits=8)


def test_make_config_threshold_rules() -> None:
    config = _config(50)
    assert config.neighbours == 18 and config.threshold == 11
    assert _config(10).neighbours == 9
    with pytest.raises(ConfigurationError):
        _config(threshold=0.5)
    with pytest.raises(ConfigurationError):
        _config(50, threshold=2)  # 2t <= k
    with pytest.raises(ConfigurationError):
        _config(threshold=True)
    with pytest.raises(ConfigurationError):
        _config(50, neighbours=7)  # odd and not n - 1
    assert _config(50, threshold=20).neighbours == 20


def test_make_config_invalid_values_raise() -> None:
    for overrides in (
        {"cohort": [1, 1, 2]},
        {"cohort": [0, 1, 2]},
        {"cohort": [1]},
        {"value_bound": float("nan")},
        {"value_bound": -1.0},
        {"vector_length": 0},
        {"vector_length": True},
        {"graph_seed": bytes(31)},
        {"bits": 7},
        {"run_id": -1},
    ):
        with pytest.raises(ConfigurationError):
            _config(**overrides)


def test_config_encode_decode_roundtrip_and_rejects_tampering() -> None:
    config = _config(20)
    data = config.encode()
    assert SecAggConfig.decode(data) == config
    with pytest.raises(ConfigurationError):
        SecAggConfig.decode(data[:-1])
    with pytest.raises(ConfigurationError):
        SecAggConfig.decode(data + b"\x00")
    tampered = bytearray(data)
    tampered[-9] ^= 0xFF  # the bits byte
    with pytest.raises(ConfigurationError):
        SecAggConfig.decode(bytes(tampered))


def test_neighbour_graph_regular_symmetric_deterministic() -> None:
    for n in (3, 10, 14, 50, 101):
        config = _config(n)
        graph = neighbour_graph(config)
        assert graph == neighbour_graph(config)
        for u, nbrs in graph.items():
            assert len(nbrs) == config.neighbours and u not in nbrs
            assert all(u in graph[v] for v in nbrs)


def test_neighbour_graph_depends_on_seed() -> None:
    a = neighbour_graph(_config(50))
    b = neighbour_graph(_config(50, graph_seed=bytes(32)))
    assert a != b


def test_check_transition_every_pair_matches_table() -> None:
    allowed = {
        (Stage.INIT, Stage.ADVERTISE_KEYS),
        (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS),
        (Stage.SHARE_KEYS, Stage.COLLECT_MASKED),
        (Stage.COLLECT_MASKED, Stage.UNMASK),
    }
    assert allowed == TRANSITIONS
    for previous, following in itertools.product(Stage, Stage):
        if (previous, following) in allowed:
            check_transition(previous, following)
        else:
            with pytest.raises(ProtocolError):
                check_transition(previous, following)


def test_quantize_bounded_unbiased_and_in_ring() -> None:
    config = _config(5, vector_length=4)
    x = np.array([1.0, -1.0, 0.3 / config.scale, -2.7 / config.scale])
    draws = np.stack(
        [lift_signed(quantize(x, config, seeded_generator(i)), 32) for i in range(2000)]
    )
    assert np.all(np.abs(draws) <= config.max_quantised)
    assert np.all(np.abs(draws - x * config.scale) < 1)
    assert abs(draws[:, 2].mean() - 0.3) < 0.05 and abs(draws[:, 3].mean() + 2.7) < 0.05


def test_quantize_rejects_out_of_bound_nan_and_wrong_shape() -> None:
    config = _config(5, vector_length=3)
    rng = seeded_generator(0)
    for bad in (
        np.array([0.0, 1.01, 0.0]),
        np.array([0.0, np.nan, 0.0]),
        np.array([0.0, np.inf, 0.0]),
        np.zeros(4),
        np.zeros((3, 1)),
        np.array([True, False, True]),
        [0.0, 0.0, 0.0],
    ):
        with pytest.raises(DataError):
            quantize(bad, config, rng)


def test_dequantize_sum_within_proven_bound_at_extremes() -> None:
    n = 7
    config = _config(n, bits=12, vector_length=500)
    rng = seeded_generator(1)
    xs = [rng.uniform(-1, 1, 500) for _ in range(n)]
    xs[0][:10] = 1.0
    xs[1][:10] = 1.0
    total = np.zeros(500, dtype=config.dtype)
    for x in xs:
        total = (total + quantize(x, config, rng)) & np.uint32(2**12 - 1)
    value, exact = dequantize_sum(total, config)
    assert np.all(np.abs(value - np.sum(xs, axis=0)) <= error_bound(config, n) + 1e-12)
    assert np.all(np.abs(exact) <= n * config.max_quantised)
