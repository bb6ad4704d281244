"""The ``bench dp`` command: modes and noise sources side by side by model size, ratios over repeats."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from simulations.bench.cli import bench_app, parse_param_counts
from simulations.bench.dp_sgd import MODELS, bench_dp_sgd, bench_noise_draw, width_for


def test_dp_bench_reports_each_noise_source_with_spread_over_repeats() -> None:
    rows = bench_dp_sgd(
        models=("mlp",), modes=("non_private", "hooks"), steps=1, warmup=0, repeats=3
    )
    by_noise = {(r["mode"], r["noise"]): r for r in rows}
    assert set(by_noise) == {
        ("non_private", "-"),
        ("hooks", "none"),
        ("hooks", "torch"),
        ("hooks", "chacha20"),
    }
    assert by_noise[("hooks", "none")]["error"] is None
    cipher = by_noise[("hooks", "chacha20")]
    assert cipher["error"] is None
    spread = cipher["ratio_vs_torch_noise"]
    assert spread is not None and spread.low <= spread.median <= spread.high
    assert by_noise[("hooks", "torch")]["ratio_vs_torch_noise"] is None


def test_noise_draw_bench_times_both_sources() -> None:
    rows = bench_noise_draw(sizes=(1000,), draws=2, repeats=3)
    assert [r["noise"] for r in rows] == ["torch", "chacha20"]
    assert rows[1]["ratio_vs_torch_noise"].median > 0


def test_dp_bench_cli_json_is_one_document() -> None:
    result = CliRunner().invoke(
        bench_app,
        ["dp", "--params", "2e4", "--steps", "1", "--warmup", "0", "--repeats", "1", "--json"],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    noises = {r["noise"] for r in doc["rows"]}
    assert {"none", "torch", "chacha20"} <= noises
    assert all("median" in r["draw_ms"] for r in doc["noise_draw"])
    modes = {r["mode"] for r in doc["rows"]}
    assert {"non_private", "hooks", "ghost", "fast"} <= modes


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("target", [1, 5_000, 123_457, 10_000_000])
def test_width_for_is_the_smallest_width_reaching_the_count(model: str, target: int) -> None:
    count = MODELS[model][1]
    width = width_for(model, target)
    assert count(width) >= target
    assert width == 1 or count(width - 1) < target


def test_dp_bench_widened_model_compares_fast_with_ghost_in_each_repeat() -> None:
    rows = bench_dp_sgd(
        models=("mlp",),
        params=(5_000,),
        modes=("non_private", "ghost", "fast"),
        noises=("torch",),
        steps=1,
        warmup=0,
        repeats=3,
        hooks_max_params=1_000,
    )
    by_mode = {r["mode"]: r for r in rows}
    assert set(by_mode) == {"non_private", "ghost", "fast"}
    assert all(r["params"] >= 5_000 and r["error"] is None for r in rows)
    spread = by_mode["fast"]["ratio_vs_ghost"]
    assert spread is not None and spread.low <= spread.median <= spread.high
    assert by_mode["ghost"]["ratio_vs_ghost"] is None


def test_dp_bench_skips_hooks_above_the_cap_and_says_why() -> None:
    rows = bench_dp_sgd(
        models=("mlp",),
        params=(5_000,),
        modes=("non_private", "hooks"),
        noises=("torch",),
        steps=1,
        warmup=0,
        repeats=1,
        hooks_max_params=1_000,
    )
    hooks = next(r for r in rows if r["mode"] == "hooks")
    assert hooks["step_ms"] is None and "skipped" in hooks["error"]
    assert "GiB" in hooks["error"]


def test_dp_bench_large_cnn_is_one_row_saying_it_was_skipped() -> None:
    rows = bench_dp_sgd(models=("cnn",), params=(3_000_000,), steps=1, warmup=0, repeats=1)
    assert len(rows) == 1 and "skipped" in rows[0]["error"] and rows[0]["params"] >= 3_000_000


def test_parse_param_counts_takes_e_notation_and_refuses_fractions() -> None:
    assert parse_param_counts("1e5, 2_000,3", "--params") == [100_000, 2_000, 3]
    for bad in ("1.5", "0", "1e-3", "", "x"):
        with pytest.raises(typer.BadParameter):
            parse_param_counts(bad, "--params")
