"""The ``bench`` CLI: JSON shape of the side-by-side secure-aggregation benchmark."""

from __future__ import annotations

import json
import os

import pytest
import typer
from typer.testing import CliRunner

from simulations.bench.cli import bench_app, parse_counts, ratio

ROW_KEYS = {
    "clients",
    "params",
    "repeats",
    "plain_s",
    "fedseal_s",
    "flower_secaggplus_s",
    "fedseal_over_plain",
    "flower_over_fedseal",
    "samples",
}
ACCEPTANCE_MAX_VS_PLAIN = 2.0
AUTHENTICATED_MAX_VS_PLAIN = 1.6  # issue 11: steady-state authenticated round, median of 3
AUTHENTICATED_SETUP_EVERY_ROUND_MAX_VS_PLAIN = 2.5  # issue 11: --setup-rounds 1
ACCEPTANCE_MIN_FLOWER_SPEEDUP = 8.0


def _run_secagg(*args: str) -> dict[str, list[dict[str, object]]]:
    result = CliRunner().invoke(bench_app, ["secagg", *args, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # stdout is exactly one JSON document
    assert isinstance(doc, dict)
    return doc


def test_parse_counts_list_returns_ints() -> None:
    assert parse_counts("10, 50,1_000", "--clients") == [10, 50, 1000]


@pytest.mark.parametrize("text", ["", "10,", "ten", "0", "-3", "1.5"])
def test_parse_counts_invalid_raises(text: str) -> None:
    with pytest.raises(typer.BadParameter):
        parse_counts(text, "--clients")


def test_ratio_missing_or_zero_denominator_returns_none() -> None:
    assert ratio(None, 1.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None
    assert ratio(3.0, 2.0) == 1.5


def test_secagg_one_round_is_refused() -> None:
    result = CliRunner().invoke(bench_app, ["secagg", "--rounds", "1", "--json"])
    assert result.exit_code != 0


def _tiny_row(*extra: str) -> dict[str, object]:
    doc = _run_secagg("--clients", "3", "--params", "1000", "--rounds", "3", *extra)
    assert list(doc) == ["rows"]
    (row,) = doc["rows"]
    assert set(row) == ROW_KEYS
    assert (row["clients"], row["params"]) == (3, 1000)
    return row


@pytest.mark.slow  # a real bench run (two interleaved repeats): -m slow
def test_secagg_repeats_interleave_and_report_the_ratio_spread() -> None:
    row = _tiny_row("--no-flower", "--repeats", "2")
    samples = row["samples"]
    assert isinstance(samples, list) and len(samples) == 2 and row["repeats"] == 2
    assert all(s["plain_s"] > 0.0 and s["fedseal_s"] > 0.0 for s in samples)
    ratios = [s["fedseal_s"] / s["plain_s"] for s in samples]
    spread = row["fedseal_over_plain"]
    assert isinstance(spread, dict)
    assert spread["min"] == pytest.approx(min(ratios)) and spread["max"] == pytest.approx(
        max(ratios)
    )
    assert spread["min"] <= spread["median"] <= spread["max"]
    assert row["flower_over_fedseal"] is None


@pytest.mark.slow  # a real bench run, one repeat
def test_secagg_tiny_cell_without_flower_json_has_positive_fedseal_times() -> None:
    row = _tiny_row("--no-flower", "--repeats", "1")
    for key in ("plain_s", "fedseal_s"):
        value = row[key]
        assert isinstance(value, float) and value > 0.0, (key, value)
    assert row["flower_secaggplus_s"] is None


@pytest.mark.slow
def test_secagg_tiny_cell_with_flower_json_has_three_positive_times() -> None:
    row = _tiny_row("--repeats", "1")
    for key in ("plain_s", "fedseal_s", "flower_secaggplus_s"):
        value = row[key]
        assert isinstance(value, float) and value > 0.0, (key, value)


def _acceptance_row(*extra: str) -> dict[str, object]:
    """The 50 x 1M cell, median of 3 interleaved runs (the issue's acceptance figure)."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("the acceptance figures are defined for at least 2 cores")
    args = ("--clients", "50", "--params", "1000000", "--rounds", "4", "--repeats", "3")
    (row,) = _run_secagg(*args, *extra)["rows"]
    return row


def _median(row: dict[str, object], key: str) -> float:
    spread = row[key]
    assert isinstance(spread, dict), (key, row)
    return float(spread["median"])


@pytest.mark.slow
def test_secagg_50_clients_1m_params_within_2x_plain() -> None:
    """Issue 4: a fedseal secure round <= 2x a plain FedAvg round (2-core machine)."""
    row = _acceptance_row("--no-flower")
    assert _median(row, "fedseal_over_plain") <= ACCEPTANCE_MAX_VS_PLAIN, row


@pytest.mark.slow
def test_authenticated_steady_state_round_within_1_6x_plain() -> None:
    """Issue 11: the authenticated (v3) steady-state secure round <= 1.6x plain, median of 3."""
    row = _acceptance_row("--no-flower")
    assert _median(row, "fedseal_over_plain") <= AUTHENTICATED_MAX_VS_PLAIN, row


@pytest.mark.slow
def test_authenticated_round_with_a_setup_every_round_within_2_5x_plain() -> None:
    """Issue 11: with ``--setup-rounds 1`` (keys and shares every round) <= 2.5x plain."""
    row = _acceptance_row("--no-flower", "--setup-rounds", "1")
    assert _median(row, "fedseal_over_plain") <= AUTHENTICATED_SETUP_EVERY_ROUND_MAX_VS_PLAIN, row


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="Flower's SecAgg+ round measures 5.4-6.4x a plain round here (not 17x), so 8x "
    "would need a secure round faster than plain FedAvg; see simulations/bench/RESULTS.md",
)
def test_secagg_50_clients_1m_params_8x_faster_than_flower() -> None:
    """Issue 4: >= 8x faster than Flower's SecAgg+. Not reachable here (an XPASS fails loudly)."""
    row = _acceptance_row()
    assert _median(row, "flower_over_fedseal") >= ACCEPTANCE_MIN_FLOWER_SPEEDUP, row


def test_stage_breakdown_runs_the_real_handlers_and_reports_each_exchange() -> None:
    from simulations.bench.secagg_stages import bench_stages

    report = bench_stages(3, 64)
    assert [s["action"].split(".")[-1] for s in report["secure"]] == [
        "secagg_identity",
        "secagg_keys",
        "secagg_shares",
        "secagg_masked",
        "secagg_consistency",
        "secagg_unmask",
    ]
    assert [s["action"] for s in report["plain"]] == ["train"]
    assert report["plain_s"] > 0 and report["secure_s"] > 0
    assert all(s["sites_s"] > 0 for s in report["secure"])


def test_echo_config_secure_with_and_without_setup_rounds() -> None:
    from simulations.bench.secagg import echo_config

    default = echo_config(5, 100, 3, secagg=True)
    assert default.secagg and not default.dp and default.workload == "echo"
    assert echo_config(5, 100, 3, secagg=True, setup_rounds=1).secagg_setup_rounds == 1
    assert not echo_config(5, 100, 3, secagg=False).secagg
