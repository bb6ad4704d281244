"""The ``bench`` CLI: JSON shape of the side-by-side secure-aggregation benchmark."""

from __future__ import annotations

import json
import os

import pytest
import typer
from typer.testing import CliRunner

from simulations.bench.cli import bench_app, parse_counts, ratio

ROW_KEYS = {"clients", "params", "plain_s", "fedseal_s", "flower_secaggplus_s"}
ACCEPTANCE_MAX_VS_PLAIN = 2.0
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


def test_secagg_tiny_cell_without_flower_json_has_positive_fedseal_times() -> None:
    row = _tiny_row("--no-flower")
    for key in ("plain_s", "fedseal_s"):
        value = row[key]
        assert isinstance(value, float) and value > 0.0, (key, value)
    assert row["flower_secaggplus_s"] is None


@pytest.mark.slow
def test_secagg_tiny_cell_with_flower_json_has_three_positive_times() -> None:
    row = _tiny_row()
    for key in ("plain_s", "fedseal_s", "flower_secaggplus_s"):
        value = row[key]
        assert isinstance(value, float) and value > 0.0, (key, value)


def _acceptance_row() -> tuple[float, float, float]:
    if (os.cpu_count() or 1) < 2:
        pytest.skip("the acceptance figures are defined for at least 2 cores")
    (row,) = _run_secagg("--clients", "50", "--params", "1000000", "--rounds", "4")["rows"]
    plain, fedseal, flower = row["plain_s"], row["fedseal_s"], row["flower_secaggplus_s"]
    assert isinstance(plain, float) and isinstance(fedseal, float) and isinstance(flower, float)
    return plain, fedseal, flower


@pytest.mark.slow
def test_secagg_50_clients_1m_params_within_2x_plain() -> None:
    """Issue 4: a fedseal secure round <= 2x a plain FedAvg round (2-core machine)."""
    plain, fedseal, flower = _acceptance_row()
    assert fedseal / plain <= ACCEPTANCE_MAX_VS_PLAIN, (plain, fedseal, flower)


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="Flower's SecAgg+ round measures 5.4-6.4x a plain round here (not 17x), so 8x "
    "would need a secure round faster than plain FedAvg; see simulations/bench/RESULTS.md",
)
def test_secagg_50_clients_1m_params_8x_faster_than_flower() -> None:
    """Issue 4: >= 8x faster than Flower's SecAgg+. Not reachable here (an XPASS fails loudly)."""
    plain, fedseal, flower = _acceptance_row()
    assert flower / fedseal >= ACCEPTANCE_MIN_FLOWER_SPEEDUP, (plain, fedseal, flower)


def test_stage_breakdown_runs_the_real_handlers_and_reports_each_exchange() -> None:
    from simulations.bench.secagg_stages import bench_stages

    report = bench_stages(3, 64)
    assert [s["action"].split(".")[-1] for s in report["secure"]] == [
        "secagg_keys",
        "secagg_shares",
        "secagg_masked",
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
