import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from common.config import RunConfig
from common.errors import ConfigurationError, DataError
from common.models import build_model
from common.records import (
    KEY_VECTOR,
    ModelSpec,
    check_vector,
    config_to_record,
    record_to_config,
    record_to_vector,
    state_dict_to_vector,
    vector_to_record,
    vector_to_state_dict,
)


@pytest.mark.parametrize("name,shape", [("mlp", (64,)), ("cnn", (1, 8, 8))])
def test_state_dict_vector_record_round_trip_exact(name, shape):
    model = build_model(name, shape, 10, seed=3)
    sd = model.state_dict()
    spec = ModelSpec.of(sd)
    vec = state_dict_to_vector(sd)
    assert vec.dtype == np.float32 and vec.shape == (spec.size,)
    back = vector_to_state_dict(record_to_vector(vector_to_record(vec), spec.size), spec)
    assert list(back) == list(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k])


def test_record_to_vector_wrong_shape_rejected():
    with pytest.raises(DataError, match="shape"):
        record_to_vector(vector_to_record(np.zeros(5, np.float32)), 6)


def test_record_to_vector_wrong_dtype_rejected():
    rec = ArrayRecord({KEY_VECTOR: Array(np.zeros(4, np.float64))})
    with pytest.raises(DataError, match="dtype"):
        record_to_vector(rec, 4)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_record_to_vector_non_finite_rejected(bad):
    v = np.zeros(4, np.float32)
    v[2] = bad
    with pytest.raises(DataError, match="NaN or infinite"):
        record_to_vector(vector_to_record(v), 4)


def test_record_to_vector_extra_array_rejected():
    rec = vector_to_record(np.zeros(3, np.float32))
    rec["other"] = Array(np.zeros(1, np.float32))
    with pytest.raises(DataError, match="exactly one"):
        record_to_vector(rec, 3)


def test_record_to_vector_oversized_payload_rejected():
    rec = vector_to_record(np.zeros(3, np.float32))
    arr = rec[KEY_VECTOR]
    arr.data = arr.data + b"\0" * 10_000
    with pytest.raises(DataError, match="payload size"):
        record_to_vector(rec, 3)


def test_record_to_vector_not_a_record_rejected():
    with pytest.raises(DataError):
        record_to_vector({"vector": np.zeros(3)}, 3)


def test_check_vector_int_dtype_rejected():
    with pytest.raises(DataError):
        check_vector(np.zeros(3, np.int32), 3)


def test_vector_to_state_dict_wrong_length_rejected():
    spec = ModelSpec.of(build_model("mlp", (4,), 2).state_dict())
    with pytest.raises(DataError):
        vector_to_state_dict(np.zeros(spec.size + 1, np.float32), spec)


def test_config_record_round_trip():
    cfg = RunConfig(rounds=4)
    parsed, rnd, extra = record_to_config(config_to_record(cfg, 3, foo="x"), ("foo",))
    assert parsed == cfg and rnd == 3 and extra == {"foo": "x"}


def test_record_to_config_missing_round_rejected():
    with pytest.raises(ConfigurationError):
        record_to_config(ConfigRecord(RunConfig().to_flower()))


def test_bundle_round_trip_and_limits() -> None:
    import pytest

    from common.errors import DataError
    from common.records import (
        bundle_to_record,
        bytes_to_record,
        record_to_bundle,
        record_to_bytes,
    )

    items = [b"first", b"", b"x" * 100]
    record = bundle_to_record(items)
    assert record_to_bundle(record, 3, 100) == items
    # a bundle of one is the single-payload record
    assert record_to_bytes(bundle_to_record([b"abc"]), 10) == b"abc"
    assert record_to_bundle(bytes_to_record(b"abc"), 1, 10) == [b"abc"]
    with pytest.raises(DataError, match="bundle of 1 to 2"):
        record_to_bundle(record, 2, 100)  # more payloads than allowed
    with pytest.raises(DataError, match="exceeds the limit"):
        record_to_bundle(record, 3, 99)  # one payload too large: refused before parsing
    with pytest.raises(DataError):
        record_to_bundle(b"not a record", 3, 100)
    with pytest.raises(DataError):
        bundle_to_record([])
