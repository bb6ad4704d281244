"""Run reports from the central record: PNG plots and a self-contained HTML summary.

``write_report(record, run_id, out_dir)`` writes ``accuracy.png``,
``epsilon.png`` (record-level and client-level ε on separate axes: they
protect different units and are never added), ``energy.png`` (kWh per round,
estimated reports hatched) and ``report.html`` with the images embedded as
base64, so the HTML is one file an auditor can open offline.
"""

from __future__ import annotations

import base64
import html
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from server.record import SqlRecord  # noqa: E402

__all__ = ["ReportPaths", "write_report"]


@dataclass(frozen=True, slots=True)
class ReportPaths:
    """The files a report consists of."""

    html: Path
    accuracy_png: Path
    epsilon_png: Path
    energy_png: Path


def _save(fig: Figure, path: Path) -> Path:
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
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
    rounds = [r for r in record.rounds(run_id) if r.status == "finished"]
    versions = record.list_versions(run_id)
    energy = record.energy(run_id)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    metric_names = sorted(
        {k for r in rounds for k, v in r.metrics.items() if isinstance(v, int | float)}
    )
    for name in metric_names:
        pts = [
            (r.round, r.metrics[name])
            for r in rounds
            if isinstance(r.metrics.get(name), int | float)
        ]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set(title="Global model metrics per round", xlabel="round", ylabel="value")
    if metric_names:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no metrics recorded", ha="center", transform=ax.transAxes)
    accuracy_png = _save(fig, out_dir / "accuracy.png")

    fig, (ax_r, ax_c) = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, attr, title in (
        (ax_r, "record_level_epsilon", "record-level ε (DP-SGD, per record at a site)"),
        (ax_c, "client_level_epsilon", "client-level ε (DP-FedAvg, per site)"),
    ):
        pts = [(v.round, getattr(v, attr)) for v in versions if getattr(v, attr) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        else:
            ax.text(0.5, 0.5, "not applied", ha="center", transform=ax.transAxes)
        ax.set(title=title, xlabel="round", ylabel="ε so far")
        ax.title.set_fontsize(9)
    epsilon_png = _save(fig, out_dir / "epsilon.png")

    per_round: dict[int, float] = defaultdict(float)
    estimated_rounds: set[int] = set()
    for e in energy:
        per_round[e.round] += e.energy_kwh
        if e.estimated:
            estimated_rounds.add(e.round)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = sorted(per_round)
    bars = ax.bar(xs, [per_round[x] for x in xs], color="tab:green")
    for x, bar in zip(xs, bars, strict=True):
        if x in estimated_rounds:
            bar.set_hatch("//")
    ax.set(
        title="Energy per round (all sites; hatched = includes estimates)",
        xlabel="round",
        ylabel="kWh",
    )
    ax.title.set_fontsize(9)
    if not xs:
        ax.text(0.5, 0.5, "no energy reported", ha="center", transform=ax.transAxes)
    energy_png = _save(fig, out_dir / "energy.png")

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
    total_kwh = sum(e.energy_kwh for e in energy)
    total_co2 = sum(e.co2eq_g for e in energy)
    body = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fedseal run {html.escape(run_id)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{padding:.2em .6em;border-bottom:1px solid #ddd}}</style>
</head><body>
<h1>fedseal run <code>{html.escape(run_id)}</code></h1>
<p>Status: {html.escape(run.status)}; created {html.escape(run.created_at)};
finished {html.escape(run.finished_at or "-")}. Rounds completed: {len(rounds)}.
Model versions: {len(versions)}{f" (latest {last.version}, sha256 <code>{last.sha256}</code>)" if last else ""}.</p>
<p>Audit log: <strong>{html.escape(report.summary())}</strong>
(checked against the key stored in the record; verify with the trusted key using
<code>fedseal-server audit verify --public-key</code>).</p>
<p>Energy: {total_kwh:.6g} kWh, {total_co2:.6g} gCO2eq from {len(energy)} site reports
({"includes estimates" if estimated_rounds else "all measured"}).</p>
<h2>Metrics</h2>{img(accuracy_png)}
<h2>Privacy</h2><p>Record-level and client-level ε protect different units and are never added.</p>{img(epsilon_png)}
<h2>Energy</h2>{img(energy_png)}
<h2>Model versions</h2>
<table><tr><th>version</th><th>round</th><th>sha256</th><th>ε record</th><th>ε client</th><th>kWh so far</th><th>tags</th></tr>{rows}</table>
</body></html>
"""
    html_path = out_dir / "report.html"
    html_path.write_text(body, encoding="utf-8")
    return ReportPaths(html_path, accuracy_png, epsilon_png, energy_png)
