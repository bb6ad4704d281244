"""``fedseal-sim audit-privacy``: the one-run privacy audit as a command.

Heavy imports (torch, Flower, Ray) wait until the command runs, so that
``fedseal-sim --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.config import ACCOUNTANTS
from common.errors import ConfigurationError, FedsealError

if TYPE_CHECKING:
    from server.results import RoundResult
    from simulations.privacy_audit.audit import AuditResult

err = Console(stderr=True)
AUDIT_PANEL = "Audit"
RUN_PANEL = "Audited run"

Accountant = StrEnum("Accountant", {a: a for a in ACCOUNTANTS})  # type: ignore[misc]


class Level(StrEnum):
    """Which DP guarantee the audit tests."""

    record = "record"
    client = "client"


DEFAULT_CANARIES = {Level.record: 200, Level.client: 64}


class _RoundProgress:
    """Advances a rich progress task once per round of the audited run."""

    def __init__(self, progress: Progress, task: Any) -> None:
        self.progress, self.task = progress, task

    def on_start(self, run_id: str, total_rounds: int) -> None:
        self.progress.update(self.task, description=f"training (run {run_id})", total=total_rounds)

    def on_round(self, result: RoundResult) -> None:
        self.progress.advance(self.task)

    def on_finish(self, results: list[RoundResult]) -> None:
        pass


def _guesses(what: str) -> Any:
    """The option of one of the two guess counts (fixed before the run, default m/4)."""
    return typer.Option(min=0, help=f"{what} (default m/4).", rich_help_panel=AUDIT_PANEL)


def audit_privacy_cmd(
    level: Annotated[
        Level,
        typer.Option(
            help="record: canaries are records at site 0 (site DP-SGD). "
            "client: canaries are whole sites (DP-FedAvg, central DP).",
            rich_help_panel=AUDIT_PANEL,
        ),
    ] = Level.record,
    canaries: Annotated[
        int | None,
        typer.Option(
            "--canaries",
            "-m",
            min=2,
            help="m: canaries, each included with probability 1/2 (one model input each; "
            "default 200 records, or 64 sites).",
            rich_help_panel=AUDIT_PANEL,
        ),
    ] = None,
    guesses_in: Annotated[int | None, _guesses("k+: highest scores guessed 'in'")] = None,
    guesses_out: Annotated[int | None, _guesses("k-: lowest scores guessed 'out'")] = None,
    confidence: Annotated[
        float,
        typer.Option(
            help="Confidence of the lower bound, in (0, 1).",
            rich_help_panel=AUDIT_PANEL,
        ),
    ] = 0.95,
    site_epsilon: Annotated[
        float,
        typer.Option(
            min=1e-6,
            help="Target epsilon the noise is calibrated to (record-level at each site, "
            "or client-level at the server).",
            rich_help_panel=RUN_PANEL,
        ),
    ] = 1.0,
    site_delta: Annotated[
        float,
        typer.Option(min=1e-12, max=0.1, help="Record-level delta.", rich_help_panel=RUN_PANEL),
    ] = 1e-5,
    clients: Annotated[
        int,
        typer.Option(
            "--clients",
            "-n",
            min=1,
            help="Sites with real data (record: site 0 also holds the canaries; "
            "client: the canary sites come on top).",
            rich_help_panel=RUN_PANEL,
        ),
    ] = 3,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds.", rich_help_panel=RUN_PANEL)] = 3,
    dp_local_epochs: Annotated[
        int,
        typer.Option(
            min=1,
            help="Record level: DP-SGD epochs per round (full batch: one step each).",
            rich_help_panel=RUN_PANEL,
        ),
    ] = 5,
    dp_learning_rate: Annotated[
        float,
        typer.Option(
            min=1e-9, help="Record level: DP-SGD learning rate.", rich_help_panel=RUN_PANEL
        ),
    ] = 4.0,
    max_grad_norm: Annotated[
        float,
        typer.Option(
            min=1e-9, help="Record level: per-sample clipping bound C.", rich_help_panel=RUN_PANEL
        ),
    ] = 1.0,
    accountant: Annotated[
        Accountant, typer.Option(help="Privacy accountant.", rich_help_panel=RUN_PANEL)
    ] = Accountant("pld"),
    secagg: Annotated[
        bool | None,
        typer.Option(
            help="Secure aggregation of the sites' updates (default: on for record, off for "
            "client, which then audits DP-FedAvg's central noise on a plain sum).",
            rich_help_panel=RUN_PANEL,
        ),
    ] = None,
    seed: Annotated[
        int,
        typer.Option(min=0, help="Model initialisation and data split.", rich_help_panel=RUN_PANEL),
    ] = 0,
    out: Annotated[
        Path | None,
        typer.Option(
            help="A fresh run directory (default runs/audit-<time>); audit.json lands there."
        ),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show Flower and Ray logs.")
    ] = False,
) -> None:
    """Audit a run's DP empirically (record or client level): canaries, one run, an epsilon lower bound.

    Follows Steinke, Nasr & Jagielski, "Privacy Auditing with One (1)
    Training Run" (NeurIPS 2023). m canary records, each included at site 0
    independently with probability 1/2 (OS-keyed coins), train once through
    the simulation engine with every site's real DP-SGD and ledger; score
    each canary on the final global model, guess 'in' for the k+ highest and
    'out' for the k- lowest, and turn the correct guesses into a lower bound
    on epsilon at the stated confidence. The bound is printed beside the
    epsilon the canary site's ledger claims for the run: a bound above the
    claim, at that confidence, means the run leaked more than it says.

    --level client audits client-level DP (DP-FedAvg, --central-dp) the same
    way with whole sites as canaries: m canary sites beside the data sites,
    each holding its canary record when included and refusing every round
    (its own site policy) when not; the claim is the run's client-level
    epsilon.

    The audited run is a custom-dataset run: the digits rows of each site
    plus one feature per canary, which only that canary touches (see
    simulations/privacy_audit/canaries.py for the design).
    """

    def fail(message: str, code: int) -> typer.Exit:
        err.print(
            f"[red]{'error' if code == 2 else 'audit failed'}:[/red] {message}",
            highlight=False,
            soft_wrap=True,
        )
        if json_out:
            sys.stdout.write(json.dumps({"error": message, "exit_code": code}) + "\n")
            sys.stdout.flush()
        return typer.Exit(code)

    m = canaries if canaries is not None else DEFAULT_CANARIES[level]
    from simulations.privacy_audit.bound import epsilon_lower_bound

    try:
        epsilon_lower_bound(m, 0, 0, 0.0, confidence)  # the confidence's domain, before any work
    except FedsealError as exc:
        raise fail(str(exc), 2) from None
    k_in = m // 4 if guesses_in is None else guesses_in
    k_out = m // 4 if guesses_out is None else guesses_out
    if out is None:
        out = Path("runs") / time.strftime("audit-%Y%m%d-%H%M%S")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise fail(f"{out} is not an empty directory: an audit needs a fresh run directory", 2)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fail(f"run directory {out} cannot be made: {exc.strerror or exc}", 2) from None

    from common.rng import secure_generator
    from simulations.engine import stdout_to_stderr
    from simulations.privacy_audit.audit import AUDIT_FILE, audit_run_config, run_audit

    try:
        cfg = audit_run_config(
            m,
            level=level.value,
            sites=clients,
            rounds=rounds,
            site_epsilon=site_epsilon,
            site_delta=site_delta,
            dp_local_epochs=dp_local_epochs,
            dp_learning_rate=dp_learning_rate,
            max_grad_norm=max_grad_norm,
            accountant=accountant.value,
            secagg=secagg if secagg is not None else level is Level.record,
            seed=seed,
        )
    except FedsealError as exc:
        raise fail(str(exc), 2) from None
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=json_out,
    )
    try:
        with progress, stdout_to_stderr():
            task = progress.add_task("planting canaries, starting the run", total=rounds)
            result = run_audit(
                cfg,
                out_dir=out.resolve(),
                inclusion_rng=secure_generator(),
                guesses_in=k_in,
                guesses_out=k_out,
                confidence=confidence,
                observer=_RoundProgress(progress, task),
                verbose=verbose,
            )
            progress.update(task, description="scored the canaries")
    except FedsealError as exc:
        raise fail(str(exc), 2 if isinstance(exc, ConfigurationError) else 1) from None
    except RuntimeError as exc:  # Flower wraps ServerApp failures
        raise fail(str(exc.__cause__ or exc), 1) from None
    doc = result.to_json()
    (out / AUDIT_FILE).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if json_out:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()
        return
    Console().print(result_table(result))
    Console().print(f"run directory: {out} (audit.json, record.db, result.json)")


def result_table(result: AuditResult) -> Table:
    """The audit's figures as a two-column table."""
    table = Table(title=f"privacy audit of run {result.run_id} ({result.level}-level)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    verdict = (
        "[green]bound <= claim: no violation found[/green]"
        if result.consistent
        else "[red]bound > claim: the run leaks more than it claims[/red]"
    )
    rows = [
        (
            "claimed epsilon ("
            + ("canary site's ledger" if result.level == "record" else "run's client-level")
            + ")",
            f"{result.claimed_epsilon:.4f}",
        ),
        ("delta", f"{result.delta:g}"),
        (
            f"empirical lower bound ({result.confidence:.0%} confidence)",
            f"{result.epsilon_lower_bound:.4f}",
        ),
        ("p-value of the claim", f"{result.p_value_at_claimed:.3g}"),
        ("canaries m (included)", f"{result.canaries} ({result.included})"),
        ("guesses k+ / k-", f"{result.guesses_in} / {result.guesses_out}"),
        ("correct (in + out)", f"{result.correct} ({result.correct_in} + {result.correct_out})"),
        (
            "noise multiplier, sampling rate, "
            + ("steps" if result.level == "record" else "rounds"),
            f"{result.noise_multiplier:.4g}, {result.sample_rate:g}, {result.steps}",
        ),
        ("held-out accuracy", f"{result.held_out_accuracy:.4f}"),
        ("verdict", verdict),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table
