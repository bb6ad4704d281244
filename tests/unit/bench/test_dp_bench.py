"""The ``bench dp`` command: torch and ChaCha20 noise side by side, ratios over repeats."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from simulations.bench.cli import bench_app
from simulations.bench.dp_sgd import bench_dp_sgd, bench_noise_draw


def test_dp_bench_reports_each_noise_source_with_spread_over_repeats() -> None:
    rows = bench_dp_sgd(
        models=("mlp",), modes=("non_private", "hooks"), steps=1, warmup=0, repeats=3
    )
    by_noise = {(r["mode"], r["noise"]): r for r in rows}
    assert set(by_noise) == {("non_private", "-"), ("hooks", "torch"), ("hooks", "chacha20")}
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
        bench_app, ["dp", "--steps", "1", "--warmup", "0", "--repeats", "1", "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    noises = {r["noise"] for r in doc["rows"]}
    assert {"torch", "chacha20"} <= noises
    assert all("median" in r["draw_ms"] for r in doc["noise_draw"])
