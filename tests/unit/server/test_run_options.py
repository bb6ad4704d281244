"""The run options of ``fedseal-sim run`` and ``fedseal-server start``: one set, one RunConfig.

Each command is invoked through typer's CliRunner with its run entry point
(``simulations.engine.run_simulation``, ``server.cli.serve``) replaced by a spy
that captures the ``RunConfig`` it receives, so nothing is started.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pytest
import typer
from typer.testing import CliRunner

import server.cli as server_cli
import simulations.engine as engine
from common.config import RunConfig
from common.env import SAFE_FLOWER_ENV
from server.run_options import (
    COORDINATOR_OPTIONS,
    SHARED_OPTIONS,
    SIMULATION_OPTIONS,
    RunOption,
    with_run_options,
)
from simulations.cli import app as sim_app
from simulations.faults import FaultPlan

SIM, SERVER = "fedseal-sim run", "fedseal-server start"
OPTIONS = {SIM: SIMULATION_OPTIONS, SERVER: COORDINATOR_OPTIONS}
# Simulation-only fault injection: declared by fedseal-sim itself, never shared, not in RunConfig.
SIM_ONLY_PARAMS = {"drop_rate", "drop_stage"}

# A valid, non-default value per non-boolean field: (command-line text, value in RunConfig).
VALUES: dict[str, tuple[str, object]] = {
    "dataset": ("breast_cancer", "breast_cancer"),
    "model": ("cnn", "cnn"),
    "num_features": ("4", 4),
    "num_classes": ("3", 3),
    "partition": ("dirichlet", "dirichlet"),
    "alpha": ("0.25", 0.25),
    "synthetic_rows": ("5000", 5000),
    "rounds": ("7", 7),
    "fraction_train": ("0.5", 0.5),
    "min_sites": ("3", 3),
    "sampling": ("poisson", "poisson"),
    "round_timeout_s": ("150", 150.0),
    "wait_sites": ("4", 4),
    "wait_timeout_s": ("45", 45.0),
    "max_failed_rounds": ("5", 5),
    "local_epochs": ("3", 3),
    "batch_size": ("32", 32),
    "learning_rate": ("0.05", 0.05),
    "seed": ("7", 7),
    "site_epsilon": ("3", 3.0),
    "site_delta": ("1e-6", 1e-6),
    "max_grad_norm": ("2", 2.0),
    "site_noise_multiplier": ("1.5", 1.5),
    "dp_batch_size": ("32", 32),
    "dp_local_epochs": ("2", 2),
    "dp_learning_rate": ("2", 2.0),
    "accountant": ("rdp", "rdp"),
    "noise_multiplier": ("0.7", 0.7),
    "delta": ("1e-6", 1e-6),
    "client_epsilon": ("2", 2.0),
    "clip_norm": ("2.5", 2.5),
    "secagg_threshold": ("3", 3.0),
    "secagg_bits": ("24", 24),
    "secagg_setup_rounds": ("4", 4),
}


# Options valid only with others: (command, field) -> (extra arguments, the fields they set).
# fedseal-server start takes client-level DP's N from --wait-sites (or the roster).
COMPANIONS: dict[tuple[str, str], tuple[list[str], dict[str, object]]] = {
    (SIM, "client_epsilon"): (["--central-dp"], {"central_dp": True}),
    (SERVER, "client_epsilon"): (
        ["--central-dp", "--wait-sites", "4"],
        {"central_dp": True, "wait_sites": 4, "num_sites": 4},
    ),
    (SERVER, "central_dp"): (["--wait-sites", "4"], {"wait_sites": 4, "num_sites": 4}),
    # distributed DP is client-level DP too (central_dp on), with the noise at the sites
    (SIM, "distributed_dp"): ([], {"central_dp": True}),
    (SERVER, "distributed_dp"): (
        ["--wait-sites", "4"],
        {"central_dp": True, "wait_sites": 4, "num_sites": 4},
    ),
}


class Captured(Exception):
    """Raised by the spies in place of a run; carries the RunConfig they received."""

    def __init__(self, cfg: RunConfig, faults: object = None) -> None:
        super().__init__("captured")
        self.cfg = cfg
        self.faults = faults


Invoke = Callable[..., Any]


@pytest.fixture()
def invoke(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Invoke:
    """``invoke(command, *args)``: the CliRunner result of one command, run entry points spied."""
    for key, value in SAFE_FLOWER_ENV.items():  # start_cmd sets these; keep ours untouched
        monkeypatch.setenv(key, os.environ.get(key, value))

    def fake_run_simulation(cfg: RunConfig, faults: object = None, **_: object) -> None:
        raise Captured(cfg, faults)

    def fake_serve(link_settings: object, cfg: RunConfig, server_settings: object) -> int:
        raise Captured(cfg)

    monkeypatch.setattr(engine, "run_simulation", fake_run_simulation)
    monkeypatch.setattr(engine, "stdout_to_stderr", contextlib.nullcontext)
    monkeypatch.setattr(server_cli, "serve", fake_serve)

    def run(command: str, *args: str) -> Any:
        if command == SIM:
            argv = ["run", "--out", str(tmp_path / "run"), *args]
            return CliRunner().invoke(sim_app, argv)
        argv = [
            "start",
            "--allow-no-dropout",
            "--insecure",
            "--state-dir",
            str(tmp_path / "srv"),
            *args,
        ]
        return CliRunner().invoke(server_cli.app, argv)

    return run


def _captured(result: Any) -> RunConfig:
    assert isinstance(result.exception, Captured), result.output
    return result.exception.cfg


def _command(command: str) -> click.Command:
    app, name = (sim_app, "run") if command == SIM else (server_cli.app, "start")
    group = typer.main.get_command(app)
    assert isinstance(group, click.Group)
    return group.commands[name]


def _params(command: str) -> dict[str, click.Parameter]:
    return {p.name: p for p in _command(command).params if p.name is not None}


def _changed(option: RunOption) -> tuple[list[str], object]:
    """Arguments that set ``option`` to a non-default value, and that value."""
    if option.value_type is bool:
        on, off = option.flags[0].split("/")
        return ([off] if option.default else [on]), not option.default
    text, value = VALUES[option.field]
    return [option.flags[0], text], value


def test_both_commands_expose_the_shared_options_with_same_flags_and_defaults() -> None:
    sim, server = _params(SIM), _params(SERVER)
    for option in SHARED_OPTIONS:
        a, b = sim[option.field], server[option.field]
        assert (a.opts, a.secondary_opts) == (b.opts, b.secondary_opts), option.field
        assert a.default == b.default == getattr(RunConfig(), option.field), option.field
    # Where a field's choices differ (dataset: no custom in simulations) the
    # simulation accepts a subset of what the coordinator accepts.
    for field in ("dataset", "model", "sampling", "accountant"):
        sim_choices, server_choices = sim[field].type, server[field].type
        assert isinstance(sim_choices, click.Choice) and isinstance(server_choices, click.Choice)
        assert set(sim_choices.choices) <= set(server_choices.choices)
    assert "custom" in server["dataset"].type.choices  # type: ignore[attr-defined]


def test_each_command_exposes_exactly_its_run_option_set() -> None:
    fields = set(RunConfig.__dataclass_fields__)
    sim_fields = {o.field for o in SIMULATION_OPTIONS}
    assert set(_params(SIM)) & fields == sim_fields
    assert SIM_ONLY_PARAMS <= set(_params(SIM)) and not SIM_ONLY_PARAMS & fields
    assert set(_params(SERVER)) & fields == {o.field for o in COORDINATOR_OPTIONS}
    assert not SIM_ONLY_PARAMS & set(_params(SERVER))
    assert {o.field for o in SHARED_OPTIONS} <= sim_fields


@pytest.mark.parametrize(
    ("command", "option"),
    [(c, o) for c, opts in OPTIONS.items() for o in opts],
    ids=lambda v: v.field if isinstance(v, RunOption) else v.split()[0],
)
def test_each_run_option_reaches_the_run_config(
    invoke: Invoke, command: str, option: RunOption
) -> None:
    args, value = _changed(option)
    extra, companions = COMPANIONS.get((command, option.field), ([], {}))
    cfg = _captured(invoke(command, *args, *extra))
    expected = RunConfig().replace(**companions, **{option.field: value})
    if option.field == "client_epsilon":  # the target sets the noise multiplier
        assert cfg.noise_multiplier != expected.noise_multiplier
        expected = expected.replace(noise_multiplier=cfg.noise_multiplier)
    assert cfg == expected


def test_values_table_covers_every_valued_option() -> None:
    valued = {o.field for opts in OPTIONS.values() for o in opts if o.value_type is not bool}
    assert valued == set(VALUES)


def test_sim_documented_spellings_reach_the_run_config(invoke: Invoke) -> None:
    result = invoke(
        SIM,
        "-n",
        "5",
        "-r",
        "3",
        "--json",
        "--no-secagg",
        "--site-epsilon",
        "3",
        "--central-dp",
        "--noise-multiplier",
        "1.0",
        "--sampling",
        "poisson",
        "--fraction",
        "0.5",
        "--lr",
        "0.05",
        "--drop-rate",
        "0.3",
        "--drop-stage",
        "keys",
    )
    cfg = _captured(result)
    assert cfg == RunConfig(
        num_sites=5,
        rounds=3,
        secagg=False,
        site_epsilon=3.0,
        central_dp=True,
        noise_multiplier=1.0,
        sampling="poisson",
        fraction_train=0.5,
        learning_rate=0.05,
    )
    # the drop options become the simulated network's fault plan, never the sites' config
    assert isinstance(result.exception, Captured)
    assert result.exception.faults == FaultPlan(0.3, "keys", seed=0)


def test_sim_min_sites_capped_at_clients(invoke: Invoke) -> None:
    cfg = _captured(invoke(SIM, "--clients", "1", "--min-sites", "3"))
    assert (cfg.num_sites, cfg.min_sites) == (1, 1)


def test_server_documented_spellings_reach_the_run_config(invoke: Invoke) -> None:
    cfg = _captured(
        invoke(
            SERVER,
            "--rounds",
            "5",
            "--min-sites",
            "3",
            "--dp",
            "--site-epsilon",
            "2",
            "--round-timeout",
            "150",
            "--secagg-threshold",
            "0.8",
            "--dp-batch-size",
            "64",
            "--dp-local-epochs",
            "2",
            "--dp-learning-rate",
            "1.5",
            "--dataset",
            "custom",
            "--num-features",
            "4",
            "--num-classes",
            "2",
        )
    )
    assert cfg == RunConfig(
        rounds=5,
        min_sites=3,
        dp=True,
        site_epsilon=2.0,
        round_timeout_s=150.0,
        secagg_threshold=0.8,
        dp_batch_size=64,
        dp_local_epochs=2,
        dp_learning_rate=1.5,
        dataset="custom",
        num_features=4,
        num_classes=2,
    )


def test_server_start_help_lists_secagg_threshold_and_dp_sgd_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("typer.rich_utils.MAX_WIDTH", 160)  # long flags unabridged
    result = CliRunner().invoke(server_cli.app, ["start", "--help"])
    assert result.exit_code == 0, result.output
    for flag in (
        "--secagg-threshold",
        "--dp-batch-size",
        "--dp-local-epochs",
        "--dp-learning-rate",
    ):
        assert flag in result.output


@pytest.mark.parametrize("command", [SIM, SERVER])
@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--secagg-threshold", "0.3"], "secagg_threshold"),
        (["--rounds", "0"], "rounds"),
        (["--site-delta", "2"], "site_delta"),
        (["--dp-local-epochs", "0"], "dp_local_epochs"),
        (["--dp-batch-size", "-1"], "dp_batch_size"),
    ],
)
def test_invalid_run_option_one_line_error_exit_2(
    invoke: Invoke, command: str, args: list[str], field: str
) -> None:
    result = invoke(command, *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and field in lines[0], lines


@pytest.mark.parametrize("command", [SIM, SERVER])
def test_invalid_choice_exit_2(invoke: Invoke, command: str) -> None:
    result = invoke(command, "--sampling", "sometimes")
    assert result.exit_code == 2 and "--sampling" in result.output


def test_sim_refuses_custom_dataset_exit_2(invoke: Invoke) -> None:
    result = invoke(SIM, "--dataset", "custom")
    assert result.exit_code == 2 and "--dataset" in result.output


def test_with_run_options_direct_call_builds_defaults_and_given_values() -> None:
    @with_run_options(SHARED_OPTIONS)
    def command(name: str = "x", *, run_config: RunConfig) -> tuple[str, RunConfig]:
        return name, run_config

    assert command() == ("x", RunConfig())
    assert command(name="y", rounds=3, dp=True) == ("y", RunConfig(rounds=3, dp=True))


def test_with_run_options_needs_a_run_config_parameter() -> None:
    def command(name: str = "x") -> None:
        return None

    with pytest.raises(TypeError, match="run_config"):
        with_run_options(SHARED_OPTIONS)(command)


def test_with_run_options_refuses_a_parameter_named_like_a_field() -> None:
    def command(rounds: int = 1, *, run_config: RunConfig) -> None:
        return None

    with pytest.raises(TypeError, match="rounds"):
        with_run_options(SHARED_OPTIONS)(command)


def test_run_option_for_unknown_field_refused() -> None:
    with pytest.raises(ValueError, match="not a RunConfig field"):
        RunOption("no_such_field", ("--no-such-field",), "help")


def test_sim_client_epsilon_prints_the_calibrated_multiplier_and_the_learning_warning(
    invoke: Invoke,
) -> None:
    from common.dp import PrivacyEvent, PrivacyLevel, epsilon_for

    result = invoke(SIM, "--central-dp", "--client-epsilon", "4", "--rounds", "3")
    cfg = _captured(result)
    event = PrivacyEvent(cfg.noise_multiplier, 1.0, 1, PrivacyLevel.CLIENT)
    assert epsilon_for([event] * 3, cfg.delta, cfg.accountant) <= 4.0
    assert f"noise multiplier z = {cfg.noise_multiplier:.4g}" in result.stderr
    # 10 sites cannot learn under client-level DP: the run is warned, with the noise on the mean
    assert "warning:" in result.stderr and "noise std on the mean" in result.stderr


def test_sim_unreachable_client_epsilon_is_one_line_exit_2(invoke: Invoke) -> None:
    # At delta 1e-5 exact accounting reaches 1e-9 (z ~ 9e4); at 1e-12 it needs z > 1e6.
    result = invoke(SIM, "--central-dp", "--client-epsilon", "1e-9", "--delta", "1e-12")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines


def test_server_central_dp_without_planned_sites_is_refused(invoke: Invoke) -> None:
    result = invoke(SERVER, "--central-dp")
    assert result.exit_code == 2, result.output
    assert "--wait-sites" in result.stderr
