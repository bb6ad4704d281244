import pytest

from common.config import RunConfig
from common.errors import ConfigurationError


def test_run_config_flower_round_trip_equal():
    cfg = RunConfig(rounds=7, local_epochs=3, learning_rate=0.2, partition="dirichlet", alpha=0.3)
    assert RunConfig.from_flower(cfg.to_flower()) == cfg


def test_run_config_int_for_float_accepted():
    assert RunConfig.from_flower({"learning-rate": 1}).learning_rate == 1.0


@pytest.mark.parametrize(
    "values",
    [
        {"rounds": 0},
        {"rounds": True},
        {"rounds": "3"},
        {"fraction-train": 0.0},
        {"fraction-train": 1.5},
        {"dataset": "mnist"},
        {"learning-rate": float("nan")},
        {"test-fraction": 1.0},
        {"no-such-key": 1},
        {"dataset": "custom"},
    ],
)
def test_run_config_bad_value_raises(values):
    with pytest.raises(ConfigurationError):
        RunConfig.from_flower(values)
