"""Run reports from the central record: PNG plots and a self-contained HTML summary.

``report_figures(record, run_id)`` builds the three figures as matplotlib
objects (so tests can inspect what each axes draws), ``write_report(record,
run_id, out_dir)`` saves them as ``accuracy.png``, ``epsilon.png`` and
``energy.png`` and writes ``report.html`` with the images embedded as base64,
so the HTML is one file an auditor can open offline.

One quantity per axes, each with a title and a y-label that names its unit:

* ``accuracy.png``: accuracy of the global model on a fixed 0-1 axis, its
  cross-entropy loss, the sites sampled and accepted, and the round's
  wall-clock seconds: four axes, never one.
* ``epsilon.png``: record-level ε (DP-SGD, per training record at a site) and
  client-level ε (DP-FedAvg, per site's participation) on separate axes:
  they protect different units and are never added or drawn together.
* ``energy.png``: kWh per round summed over the sites that reported it
  (hatched bars include estimates).

A round that failed (or never closed) released nothing: its accuracy, loss,
ε and energy are drawn as gaps (NaN, never zero) and the round is shaded on
every per-round axes, labelled in the legend.

Under client-level DP (the run's ``central_dp``) the report shows nothing
that depends on how many sites took part (:meth:`server.results.RoundResult.released`):
the sites and duration axes and the per-round energy bars say the figures
are withheld, and the energy line gives the run's total without the number
of site reports.
"""

from __future__ import annotations

import base64
import html
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from server.record import SqlRecord  # noqa: E402
from server.record.values import ModelVersion, PrivacyEntry, RoundInfo  # noqa: E402

__all__ = ["ReportFigures", "ReportPaths", "report_figures", "write_report"]

NAN = float("nan")
FAILED_LABEL = "failed round (no model update)"
OPEN_LABEL = "unfinished round"
WITHHELD_TEXT = "withheld under client-level DP\n(it depends on how many sites took part)"


@dataclass(frozen=True, slots=True)
class ReportPaths:
    """The files a report consists of."""

    html: Path
    accuracy_png: Path
    epsilon_png: Path
    energy_png: Path


@dataclass(frozen=True, slots=True)
class ReportFigures:
    """The report's figures, before they are saved (the caller closes them)."""

    metrics: Figure  # accuracy, loss, sites, seconds: one axes each
    epsilon: Figure  # record-level and client-level ε: one axes each
    energy: Figure  # kWh per round

    def close(self) -> None:
        for fig in (self.metrics, self.epsilon, self.energy):
            plt.close(fig)


def _number(value: object) -> float:
    """``value`` as a float, or NaN (a gap) unless it is a finite real number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return NAN
    return float(value) if math.isfinite(value) else NAN


def _mark_rounds(ax: Axes, rounds: list[RoundInfo]) -> None:
    """Shade the rounds that produced no model (failed, or never closed), one legend entry each kind."""
    for status, label, color in (
        ("failed", FAILED_LABEL, "tab:red"),
        ("started", OPEN_LABEL, "tab:gray"),
    ):
        first = True
        for r in rounds:
            if r.status != status:
                continue
            ax.axvspan(
                r.round - 0.4,
                r.round + 0.4,
                color=color,
                alpha=0.15,
                label=label if first else "_nolegend_",
            )
            first = False


def _finish_axes(ax: Axes, title: str, ylabel: str, rounds: list[RoundInfo]) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if rounds:
        ax.set_xlim(min(r.round for r in rounds) - 0.6, max(r.round for r in rounds) + 0.6)
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7)


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def _metric_axes(
    ax: Axes,
    rounds: list[RoundInfo],
    key: str,
    label: str,
    color: str,
    *,
    released: bool,
    marker: str = "o",
    linestyle: str = "-",
) -> bool:
    """Plot one recorded metric per round, NaN (a gap) where a round has none; whether any was.

    ``released``: the metric describes the model a round released (accuracy,
    loss), so only a finished round has it; otherwise it is a fact about the
    round itself (sites, seconds), true of a failed round too.
    """
    ys = [
        _number(r.metrics.get(key)) if r.status == "finished" or not released else NAN
        for r in rounds
    ]
    if all(math.isnan(y) for y in ys):
        return False
    ax.plot(
        [r.round for r in rounds],
        ys,
        marker=marker,
        markersize=9 if marker != "o" else 6,
        markerfacecolor="none" if marker != "o" else color,
        linestyle=linestyle,
        label=label,
        color=color,
    )
    return True


def _metrics_figure(rounds: list[RoundInfo], client_level: bool) -> Figure:
    fig, axes = plt.subplots(2, 2, figsize=(9, 6))
    ax_acc, ax_loss, ax_sites, ax_secs = axes.flat

    if not _metric_axes(ax_acc, rounds, "accuracy", "accuracy", "tab:blue", released=True):
        _empty(ax_acc, "no accuracy recorded")
    ax_acc.set_ylim(0.0, 1.0)
    _mark_rounds(ax_acc, rounds)
    _finish_axes(ax_acc, "Accuracy of the global model", "accuracy (fraction, 0-1)", rounds)

    if not _metric_axes(ax_loss, rounds, "loss", "loss", "tab:orange", released=True):
        _empty(ax_loss, "no loss recorded")
    _mark_rounds(ax_loss, rounds)
    _finish_axes(ax_loss, "Loss of the global model", "cross-entropy loss (nats)", rounds)

    if client_level:
        _empty(ax_sites, WITHHELD_TEXT)
    else:
        sampled = _metric_axes(
            ax_sites,
            rounds,
            "sampled",
            "sampled",
            "tab:gray",
            released=False,
            marker="s",
            linestyle="--",
        )
        accepted = _metric_axes(
            ax_sites, rounds, "participants", "accepted (participants)", "tab:green", released=False
        )
        if not (sampled or accepted):
            _empty(ax_sites, "no site counts recorded")
    ax_sites.set_ylim(bottom=0)
    ax_sites.yaxis.set_major_locator(MaxNLocator(integer=True))
    _mark_rounds(ax_sites, rounds)
    _finish_axes(ax_sites, "Sites per round", "sites (count)", rounds)

    if client_level:
        _empty(ax_secs, WITHHELD_TEXT)
    elif not _metric_axes(
        ax_secs, rounds, "seconds", "round duration", "tab:purple", released=False
    ):
        _empty(ax_secs, "no durations recorded")
    ax_secs.set_ylim(bottom=0)
    _mark_rounds(ax_secs, rounds)
    _finish_axes(ax_secs, "Round duration (wall clock)", "seconds (s)", rounds)

    fig.suptitle("Global model and rounds", fontsize=10)
    fig.tight_layout()
    return fig


def _delta_text(privacy: list[PrivacyEntry], level: str) -> str:
    deltas = sorted({p.delta for p in privacy if p.level == level})
    return f", δ={deltas[0]:g}" if len(deltas) == 1 else ""


def _epsilon_figure(
    rounds: list[RoundInfo], versions: list[ModelVersion], privacy: list[PrivacyEntry]
) -> Figure:
    by_round = {v.round: v for v in versions}  # a round has at most one version
    xs = sorted({r.round for r in rounds} | set(by_round))
    fig, (ax_r, ax_c) = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, attr, level, title, ylabel in (
        (
            ax_r,
            "record_level_epsilon",
            "record",
            "Record-level ε (DP-SGD, largest site)",
            "ε per training record",
        ),
        (
            ax_c,
            "client_level_epsilon",
            "client",
            "Client-level ε (DP-FedAvg over sites)",
            "ε per site",
        ),
    ):
        ys = [_number(getattr(by_round[x], attr)) if x in by_round else NAN for x in xs]
        if any(not math.isnan(y) for y in ys):
            ax.plot(xs, ys, marker="o", label=f"{level}-level ε so far")
        else:
            _empty(ax, "not applied")
        ax.set_ylim(bottom=0)
        _mark_rounds(ax, rounds)
        _finish_axes(ax, title, ylabel + _delta_text(privacy, level), rounds)
    fig.suptitle("Privacy spent (different units: never added)", fontsize=10)
    fig.tight_layout()
    return fig


def _energy_figure(
    rounds: list[RoundInfo], record: SqlRecord, run_id: str, client_level: bool
) -> Figure:
    per_round: dict[int, float] = defaultdict(float)
    estimated_rounds: set[int] = set()
    for e in [] if client_level else record.energy(run_id):
        per_round[e.round] += e.energy_kwh
        if e.estimated:
            estimated_rounds.add(e.round)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = sorted(per_round)
    if client_level:
        _empty(ax, WITHHELD_TEXT)
    elif xs:
        bars = ax.bar(xs, [per_round[x] for x in xs], color="tab:green", label="kWh (all sites)")
        for x, bar in zip(xs, bars, strict=True):
            if x in estimated_rounds:
                bar.set_hatch("//")
    else:
        _empty(ax, "no energy reported")
    _mark_rounds(ax, rounds)
    _finish_axes(
        ax,
        "Energy per round (sum over sites; hatched = includes estimates)",
        "energy (kWh)",
        rounds,
    )
    fig.tight_layout()
    return fig


def report_figures(record: SqlRecord, run_id: str) -> ReportFigures:
    """The run's figures, built from its record (not saved; call ``close()`` when done).

    Raises
    ------
    RecordError
        If the run is unknown or the record cannot be read.
    """
    client_level = _client_level_dp(record, run_id)
    rounds = record.rounds(run_id)
    versions = record.list_versions(run_id)
    return ReportFigures(
        metrics=_metrics_figure(rounds, client_level),
        epsilon=_epsilon_figure(rounds, versions, record.privacy(run_id)),
        energy=_energy_figure(rounds, record, run_id, client_level),
    )


def _mechanisms(config: dict[str, Any]) -> str:
    """Which DP mechanisms the run's recorded configuration ran, in words."""
    parts = []
    if config.get("dp"):
        parts.append("record-level DP-SGD at the sites (Opacus)")
    if config.get("distributed_dp"):
        parts.append(
            "distributed client-level DP (distributed-skellam: each site adds Skellam noise "
            "before secure aggregation's masking; the coordinator adds none; accountant "
            "rdp-skellam)"
        )
    elif config.get("central_dp"):
        parts.append(
            "central client-level DP (DP-FedAvg: Gaussian noise added by the coordinator; "
            f"accountant {config.get('accountant', 'pld')})"
        )
    return "; ".join(parts) if parts else "none"


def _client_level_dp(record: SqlRecord, run_id: str) -> bool:
    """Whether the run released under client-level DP (its recorded ``central_dp``)."""
    return bool(record.get_run(run_id).config.get("central_dp"))


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def write_report(record: SqlRecord, run_id: str, out_dir: Path) -> ReportPaths:
    """Write the run's plots and HTML summary into ``out_dir``; return their paths.

    Raises
    ------
    RecordError
        If the run is unknown or the record cannot be read.
    """
    run = record.get_run(run_id)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    all_rounds = record.rounds(run_id)
    rounds = [r for r in all_rounds if r.status == "finished"]
    failed = [r for r in all_rounds if r.status == "failed"]
    versions = record.list_versions(run_id)
    energy = record.energy(run_id)
    estimated = any(e.estimated for e in energy)

    figures = report_figures(record, run_id)
    try:
        accuracy_png = _save(figures.metrics, out_dir / "accuracy.png")
        epsilon_png = _save(figures.epsilon, out_dir / "epsilon.png")
        energy_png = _save(figures.energy, out_dir / "energy.png")
    finally:
        figures.close()

    def img(path: Path) -> str:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'<img alt="{path.stem}" src="data:image/png;base64,{data}">'

    report = record.verify_trusting_stored_key()
    last = versions[-1] if versions else None
    rows = "".join(
        f"<tr><td>{v.version}</td><td>{v.round}</td><td><code>{v.sha256[:16]}</code></td>"
        f"<td>{v.record_level_epsilon if v.record_level_epsilon is not None else '-'}</td>"
        f"<td>{v.client_level_epsilon if v.client_level_epsilon is not None else '-'}</td>"
        f"<td>{v.energy_kwh if v.energy_kwh is not None else '-'}</td>"
        f"<td>{html.escape(', '.join(v.tags))}</td></tr>"
        for v in versions
    )
    failed_text = (
        f" Failed rounds (no model update): {', '.join(str(r.round) for r in failed)}."
        if failed
        else ""
    )
    reports = (
        "over the run (per-round figures withheld under client-level DP)"
        if _client_level_dp(record, run_id)
        else f"from {len(energy)} site reports"
    )
    total_kwh = sum(e.energy_kwh for e in energy)
    total_co2 = sum(e.co2eq_g for e in energy)
    body = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fedseal run {html.escape(run_id)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{padding:.2em .6em;border-bottom:1px solid #ddd}}img{{max-width:100%}}</style>
</head><body>
<h1>fedseal run <code>{html.escape(run_id)}</code></h1>
<p>Status: {html.escape(run.status)}; created {html.escape(run.created_at)};
finished {html.escape(run.finished_at or "-")}. Rounds completed: {len(rounds)}.{failed_text}
Model versions: {len(versions)}{f" (latest {last.version}, sha256 <code>{last.sha256}</code>)" if last else ""}.</p>
<p>Audit log: <strong>{html.escape(report.summary())}</strong>
(checked against the key stored in the record; verify with the trusted key using
<code>fedseal-server audit verify --public-key</code>).</p>
<p>Energy: {total_kwh:.6g} kWh, {total_co2:.6g} gCO2eq {reports}
({"includes estimates" if estimated else "all measured"}).</p>
<h2>Metrics</h2>{img(accuracy_png)}
<h2>Privacy</h2><p>Record-level ε (per training record at a site) and client-level ε
(per site's participation) protect different units and are never added.</p>
<p>Mechanisms: {html.escape(_mechanisms(record.get_run(run_id).config))}.</p>{img(epsilon_png)}
<h2>Energy</h2>{img(energy_png)}
<h2>Model versions</h2>
<table><tr><th>version</th><th>round</th><th>sha256</th><th>ε record</th><th>ε client</th><th>kWh so far</th><th>tags</th></tr>{rows}</table>
</body></html>
"""
    html_path = out_dir / "report.html"
    html_path.write_text(body, encoding="utf-8")
    return ReportPaths(html_path, accuracy_png, epsilon_png, energy_png)
