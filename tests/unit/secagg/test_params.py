"""Tests of common.secagg.params, graph, stages and quantize."""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections.abc import Sequence

import numpy as np
import pytest

from common.errors import ConfigurationError, DataError, ProtocolError
from common.rng import seeded_generator
from common.secagg.graph import neighbour_graph
from common.secagg.params import IDENTITY_SIZE, PROTOCOL_VERSION, SecAggConfig, make_config
from common.secagg.quantize import dequantize_sum, error_bound, lift_signed, quantize
from common.secagg.stages import STAGE_LABELS, TRANSITIONS, WIRE_STAGES, Stage, check_transition

SEED = bytes(range(32))


def _identity(node: int) -> bytes:
    """A stand-in 32-byte identity key for ``node`` (the configuration does not parse keys)."""
    return hashlib.sha256(b"identity" + node.to_bytes(8, "big")).digest()


def _identities(cohort: Sequence[int]) -> list[bytes]:
    return [_identity(u) if type(u) is int and u >= 0 else bytes(32) for u in cohort]


def _config(n: int = 5, **overrides: object) -> SecAggConfig:
    kwargs: dict[str, object] = {
        "run_id": 7,
        "round": 3,
        "cohort": list(range(10, 10 + n)),
        "threshold": 0.6,
        "value_bound": 1.0,
        "vector_length": 64,
    }
    kwargs.update(overrides)
    kwargs.setdefault("identities", _identities(kwargs["cohort"]))  # type: ignore[arg-type]
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
        {"neighbours": 0},
        {"round": 2**64},
        {"bits": 7},
        {"run_id": -1},
    ):
        with pytest.raises(ConfigurationError):
            _config(**overrides)


def test_make_config_takes_no_graph_seed() -> None:
    # v3: the graph seed is derived from the signed advertisements, never configured
    with pytest.raises(TypeError):
        _config(graph_seed=SEED)
    assert "graph_seed" not in {f for f in SecAggConfig.__dataclass_fields__}


def test_config_encode_decode_roundtrip_and_rejects_tampering() -> None:
    config = _config(20)
    data = config.encode()
    assert config.version == PROTOCOL_VERSION == 3 and data[4] == 3
    assert SecAggConfig.decode(data) == config
    with pytest.raises(ConfigurationError, match="version"):
        SecAggConfig.decode(data[:4] + bytes([2]) + data[5:])
    with pytest.raises(ConfigurationError):
        SecAggConfig.decode(data[:-1])
    with pytest.raises(ConfigurationError):
        SecAggConfig.decode(data + b"\x00")
    tampered = bytearray(data)
    tampered[-9] ^= 0xFF  # the bits byte
    with pytest.raises(ConfigurationError):
        SecAggConfig.decode(bytes(tampered))


_HEAD_SIZE = 4 + 1 + 8 + 8 + 4  # magic, version, run, round, n
_TAIL_SIZE = 4 + 4 + 4 + 8 + 1 + 8  # t, k, d, bound, bits, scale


def test_config_binds_each_node_to_its_identity_reordered_with_the_cohort() -> None:
    keys = {u: _identity(u) for u in (10, 11, 12)}
    config = _config(cohort=[12, 10, 11], identities=[keys[12], keys[10], keys[11]])
    assert config.cohort == (10, 11, 12)
    assert config.identities == (keys[10], keys[11], keys[12])
    for u in config.cohort:
        assert config.identity_of(u) == keys[u]
    with pytest.raises(ConfigurationError, match="not in the cohort"):
        config.identity_of(13)
    # the digest (what every advertisement signs) covers the binding: one other key, or
    # two nodes' keys swapped, gives another configuration
    other = _config(cohort=[12, 10, 11], identities=[keys[12], keys[10], _identity(99)])
    swapped = _config(cohort=[12, 10, 11], identities=[keys[10], keys[12], keys[11]])
    digests = {config.digest(), other.digest(), swapped.digest()}
    assert len(digests) == 3


def test_make_config_duplicate_identities_raise() -> None:
    key = _identity(1)
    with pytest.raises(ConfigurationError, match="two share one"):
        _config(3, identities=[key, _identity(2), key])
    with pytest.raises(ConfigurationError, match="two share one"):
        _config(2, identities=[key, key])


@pytest.mark.parametrize(
    "identities",
    [
        [_identity(u) for u in range(4)],  # one too few
        [_identity(u) for u in range(6)],  # one too many
        [],
        [_identity(u) for u in range(4)] + [bytes(IDENTITY_SIZE - 1)],  # 31 bytes
        [_identity(u) for u in range(4)] + [bytes(IDENTITY_SIZE + 1)],  # 33 bytes
        [_identity(u) for u in range(4)] + [bytearray(IDENTITY_SIZE)],  # not bytes
        [_identity(u) for u in range(4)] + ["x" * IDENTITY_SIZE],
        [_identity(u) for u in range(4)] + [None],
        b"".join(_identity(u) for u in range(5)),  # the keys concatenated, not a sequence
        "identities",
        None,
        {_identity(u) for u in range(5)},  # a set has no order
    ],
    ids=[
        "too-few",
        "too-many",
        "none-given",
        "short-key",
        "long-key",
        "bytearray",
        "str-key",
        "none-key",
        "bytes",
        "str",
        "None",
        "set",
    ],
)
def test_make_config_wrong_number_size_or_type_of_identities_raise(identities: object) -> None:
    with pytest.raises(ConfigurationError, match="identities"):
        _config(5, identities=identities)


def test_make_config_identities_are_required() -> None:
    with pytest.raises(TypeError, match="identities"):
        make_config(  # type: ignore[call-arg]
            run_id=1, round=1, cohort=[1, 2, 3], threshold=2, value_bound=1.0, vector_length=1
        )


def test_config_encode_layout_and_decode_roundtrip_with_identities() -> None:
    n = 7
    config = _config(n)
    data = config.encode()
    assert len(data) == _HEAD_SIZE + n * (8 + IDENTITY_SIZE) + _TAIL_SIZE
    assert data[:4] == b"fsac" and struct.unpack_from(">I", data, _HEAD_SIZE - 4)[0] == n
    assert struct.unpack_from(f">{n}Q", data, _HEAD_SIZE) == config.cohort
    start = _HEAD_SIZE + 8 * n
    stored = [data[start + i * 32 : start + (i + 1) * 32] for i in range(n)]
    assert stored == [_identity(u) for u in config.cohort] == list(config.identities)
    decoded = SecAggConfig.decode(data)
    assert decoded == config and decoded.identities == config.identities
    assert decoded.encode() == data and decoded.digest() == config.digest()
    for u in config.cohort:
        assert decoded.identity_of(u) == _identity(u)
    # another key in the identity section is another (valid) configuration
    other = bytearray(data)
    other[start + 32 * 3] ^= 1
    changed = SecAggConfig.decode(bytes(other))
    assert changed.identity_of(config.cohort[3]) != _identity(config.cohort[3])
    assert changed.digest() != config.digest()
    # two nodes bound to one key does not decode
    twice = data[: start + 32] + data[start : start + 32] + data[start + 64 :]
    with pytest.raises(ConfigurationError, match="two share one"):
        SecAggConfig.decode(twice)
    # the v3-without-binding layout (no identity section) is a wrong size
    unbound = data[:start] + data[start + 32 * n :]
    with pytest.raises(ConfigurationError, match="wrong size"):
        SecAggConfig.decode(unbound)
    for cut in (1, 32, 33):
        with pytest.raises(ConfigurationError, match="wrong size"):
            SecAggConfig.decode(data[: start + 32 * n - cut] + data[start + 32 * n :])


def test_neighbour_graph_regular_symmetric_deterministic() -> None:
    for n in (3, 10, 14, 50, 101):
        config = _config(n)
        graph = neighbour_graph(config, SEED)
        assert graph == neighbour_graph(config, SEED)
        for u, nbrs in graph.items():
            assert len(nbrs) == config.neighbours and u not in nbrs
            assert all(u in graph[v] for v in nbrs)


def test_neighbour_graph_depends_on_seed() -> None:
    a = neighbour_graph(_config(50), SEED)
    b = neighbour_graph(_config(50), bytes(32))
    assert a != b


def test_check_transition_every_pair_matches_table() -> None:
    allowed = {
        (Stage.INIT, Stage.ADVERTISE_KEYS),
        (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS),
        (Stage.SHARE_KEYS, Stage.COLLECT_MASKED),
        (Stage.COLLECT_MASKED, Stage.CONSISTENCY),
        (Stage.CONSISTENCY, Stage.UNMASK),
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


def test_wire_stages_in_protocol_order_with_labels_and_actions() -> None:
    assert WIRE_STAGES == (
        Stage.ADVERTISE_KEYS,
        Stage.SHARE_KEYS,
        Stage.COLLECT_MASKED,
        Stage.CONSISTENCY,
        Stage.UNMASK,
    )
    assert STAGE_LABELS == ("keys", "shares", "masked", "consistency", "unmask")
    for stage in WIRE_STAGES:
        assert Stage.from_label(stage.label) is stage
        assert stage.action == f"secagg_{stage.label}"
        assert Stage.from_action(stage.action) is stage
    with pytest.raises(ProtocolError):
        Stage.from_label("init")
    assert Stage.from_action("train") is None
