"""The report's figures as matplotlib objects: one quantity per axes, units named, gaps for failures.

Issue 12: the accuracy plot drew round number, participants, sampled and
seconds on the accuracy axis (every numeric field of the round's JSON on one
axes). These tests inspect the figures ``report_figures`` builds, not just
that a PNG exists.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from server.record.store import SqlRecord
from server.report import FAILED_LABEL, ReportFigures, report_figures, write_report
from server.results import RoundResult, SiteOutcome

ACCURACY = {1: 0.42, 2: 0.61, 4: 0.77}
LOSS = {1: 1.9, 2: 1.2, 4: 0.8}
KWH = {1: (0.001, 0.002), 2: (0.003, 0.001), 4: (0.002, 0.002)}
DELTA_RECORD, DELTA_CLIENT = 1e-5, 1e-3


def _result(rnd: int, *, failed: bool = False) -> RoundResult:
    sites = (
        SiteOutcome(1, not failed, num_examples=30, train_seconds=0.5),
        SiteOutcome(2, not failed, num_examples=30, train_seconds=0.6),
        SiteOutcome(3, False, reason="dropped"),
    )
    return RoundResult(
        round=rnd,
        accuracy=None if failed else ACCURACY[rnd],
        loss=None if failed else LOSS[rnd],
        participants=0 if failed else 2,
        sampled=3,
        seconds=2.5 + rnd,
        sites=sites,
        evaluation="none" if failed else "central",
        client_level_epsilon=None if failed else 0.3 * rnd,
        failed=failed,
        failure="too few usable updates" if failed else None,
    )


@pytest.fixture()
def figures(tmp_path: Path) -> Iterator[tuple[ReportFigures, SqlRecord, str]]:
    """Rounds 1, 2 finished, 3 failed, 4 finished: every kind of figure input."""
    with SqlRecord(str(tmp_path / "record.db")) as rec:
        run = rec.create_run({"rounds": 4})
        parent = None
        for rnd in (1, 2, 3, 4):
            rec.start_round(run, rnd, [1, 2, 3])
            if rnd == 3:
                result = _result(rnd, failed=True)
                rec.fail_round(run, rnd, result.failure or "failed", result.to_json())
                continue
            result = _result(rnd)
            for node, kwh in zip((1, 2), KWH[rnd], strict=True):
                rec.record_energy(run, rnd, node, kwh, 0.4, False)
                rec.record_privacy(
                    run,
                    rnd,
                    level="record",
                    epsilon=0.5 * rnd,
                    delta=DELTA_RECORD,
                    noise_multiplier=1.1,
                    sample_rate=0.1,
                    steps=10,
                    accountant="rdp",
                    node_id=node,
                )
            rec.record_privacy(
                run,
                rnd,
                level="client",
                epsilon=0.3 * rnd,
                delta=DELTA_CLIENT,
                noise_multiplier=1.0,
                sample_rate=1.0,
                steps=1,
                accountant="rdp",
            )
            rec.finish_round(run, rnd, result.to_json())
            v = rec.add_model_version(
                run,
                rnd,
                parent,
                bytes([rnd]),
                {"accuracy": ACCURACY[rnd], "loss": LOSS[rnd]},
                0.5 * rnd,
                0.3 * rnd,
                rec.energy_total_kwh(run),
                [1, 2],
            )
            parent = v.version
        figs = report_figures(rec, run)
        try:
            yield figs, rec, run
        finally:
            figs.close()


def _axes(fig: Figure, title_word: str) -> Axes:
    found = [ax for ax in fig.axes if title_word.lower() in ax.get_title().lower()]
    assert len(found) == 1, [ax.get_title() for ax in fig.axes]
    return found[0]


def _labels(ax: Axes) -> list[str]:
    return [str(line.get_label()) for line in ax.get_lines()]


def _xy(line: Line2D) -> tuple[list[float], list[float]]:
    xs = np.asarray(line.get_xdata(), dtype=float).tolist()
    ys = np.asarray(line.get_ydata(), dtype=float).tolist()
    return xs, ys


def _y_at(ax: Axes, label: str, rnd: int) -> float:
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
    xs, ys = _xy(line)
    return ys[xs.index(float(rnd))]


def _legend_texts(ax: Axes) -> list[str]:
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend is not None else []


def test_every_axes_has_a_title_and_labelled_axes(
    figures: tuple[ReportFigures, SqlRecord, str],
) -> None:
    figs, _, _ = figures
    for fig in (figs.metrics, figs.epsilon, figs.energy):
        for ax in fig.axes:
            assert ax.get_title(), "an axes without a title"
            assert ax.get_xlabel() == "round"
            assert ax.get_ylabel(), f"{ax.get_title()}: no y label"


def test_accuracy_axes_draws_accuracy_alone_on_zero_to_one(
    figures: tuple[ReportFigures, SqlRecord, str],
) -> None:
    figs, _, _ = figures
    ax = _axes(figs.metrics, "accuracy")
    assert _labels(ax) == ["accuracy"]  # not round, participants, sampled, seconds, loss
    assert ax.get_ylim() == (0.0, 1.0)
    assert "0-1" in ax.get_ylabel()
    for rnd, acc in ACCURACY.items():
        assert _y_at(ax, "accuracy", rnd) == pytest.approx(acc)
    _, ys = _xy(ax.get_lines()[0])
    assert all(math.isnan(y) or 0.0 <= y <= 1.0 for y in ys)


def test_one_quantity_per_axes_each_with_its_unit(
    figures: tuple[ReportFigures, SqlRecord, str],
) -> None:
    figs, _, _ = figures
    assert len(figs.metrics.axes) == 4
    loss = _axes(figs.metrics, "loss")
    sites = _axes(figs.metrics, "sites")
    seconds = _axes(figs.metrics, "duration")
    assert _labels(loss) == ["loss"]
    assert sorted(_labels(sites)) == ["accepted (participants)", "sampled"]
    assert "count" in sites.get_ylabel()
    assert _labels(seconds) == ["round duration"]
    assert "(s)" in seconds.get_ylabel()
    assert _y_at(sites, "sampled", 2) == 3 and _y_at(sites, "accepted (participants)", 2) == 2
    assert _y_at(seconds, "round duration", 4) == pytest.approx(6.5)
    # the round number is the x axis, never a plotted quantity
    for ax in figs.metrics.axes:
        assert "round" not in _labels(ax)


def test_failed_round_is_a_gap_and_marked_not_a_zero(
    figures: tuple[ReportFigures, SqlRecord, str],
) -> None:
    figs, _, _ = figures
    acc = _axes(figs.metrics, "accuracy")
    loss = _axes(figs.metrics, "loss")
    assert math.isnan(_y_at(acc, "accuracy", 3))
    assert math.isnan(_y_at(loss, "loss", 3))
    for ax in (acc, loss, *figs.epsilon.axes, *figs.energy.axes):
        assert FAILED_LABEL in _legend_texts(ax), ax.get_title()
    for ax in figs.epsilon.axes:
        (line,) = ax.get_lines()
        assert math.isnan(_y_at(ax, str(line.get_label()), 3))


def test_epsilon_units_on_separate_axes(figures: tuple[ReportFigures, SqlRecord, str]) -> None:
    figs, _, _ = figures
    assert len(figs.epsilon.axes) == 2
    record_ax = _axes(figs.epsilon, "record-level")
    client_ax = _axes(figs.epsilon, "client-level")
    assert _labels(record_ax) == ["record-level ε so far"]
    assert _labels(client_ax) == ["client-level ε so far"]
    assert "per training record" in record_ax.get_ylabel()
    assert f"δ={DELTA_RECORD:g}" in record_ax.get_ylabel()
    assert "per site" in client_ax.get_ylabel()
    assert f"δ={DELTA_CLIENT:g}" in client_ax.get_ylabel()
    assert _y_at(record_ax, "record-level ε so far", 4) == pytest.approx(2.0)
    assert _y_at(client_ax, "client-level ε so far", 4) == pytest.approx(1.2)


def test_energy_is_kwh_per_round(figures: tuple[ReportFigures, SqlRecord, str]) -> None:
    figs, _, _ = figures
    (ax,) = figs.energy.axes
    assert "kWh" in ax.get_ylabel()
    (bars,) = ax.containers
    got = {round(float(b.get_x() + b.get_width() / 2)): b.get_height() for b in bars}
    assert got == pytest.approx({rnd: sum(k) for rnd, k in KWH.items()})
    assert 3 not in got  # the failed round released nothing and drew no bar


def test_write_report_saves_the_figures_and_names_failed_rounds(
    figures: tuple[ReportFigures, SqlRecord, str], tmp_path: Path
) -> None:
    _, rec, run = figures
    before = len(plt.get_fignums())
    paths = write_report(rec, run, tmp_path / "out")
    assert len(plt.get_fignums()) == before  # figures closed after saving
    for png in (paths.accuracy_png, paths.epsilon_png, paths.energy_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = paths.html.read_text()
    assert text.count("data:image/png;base64,") == 3
    assert "Failed rounds (no model update): 3." in text
    assert "Rounds completed: 3." in text
