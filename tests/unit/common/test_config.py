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


@pytest.mark.parametrize("value", [0, -1, 33, True, 2.0])
def test_secagg_setup_rounds_out_of_range_refused(value: object) -> None:
    with pytest.raises(ConfigurationError, match="secagg_setup_rounds"):
        RunConfig(secagg_setup_rounds=value)  # type: ignore[arg-type]


def test_secagg_setup_rounds_travels_in_the_flower_run_config() -> None:
    cfg = RunConfig(secagg_setup_rounds=3)
    assert RunConfig.from_flower(cfg.to_flower()) == cfg
