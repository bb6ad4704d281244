"""``fedseal-sim``: local federated simulations on Flower's Simulation Engine."""

from __future__ import annotations

import json
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.config import RunConfig
from common.errors import ConfigurationError, FedsealError
from common.secagg.stages import STAGE_LABELS
from policies.cli_errors import one_line_errors
from server.results import RoundResult
from server.run_options import RUN_PANEL, SIMULATION_OPTIONS, with_run_options
from simulations.faults import DEFAULT_DROP_STAGE, FaultPlan

app = typer.Typer(
    name="fedseal-sim",
    help="Run fedseal federations locally: N virtual sites on Flower's Simulation Engine.",
    no_args_is_help=True,
    add_completion=False,
)
err = Console(stderr=True)
_D = RunConfig()  # defaults live in one place


# The secure-aggregation stages, as common.secagg.stages names them.
DropStage = StrEnum("DropStage", {label: label for label in STAGE_LABELS})  # type: ignore[misc]


class ProgressObserver:
    """A rich progress bar over rounds (on stderr, so --json stdout stays clean)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: Any = None

    def on_start(self, run_id: str, total_rounds: int) -> None:
        self.task = self.progress.add_task(f"run {run_id}", total=total_rounds, acc="")

    def on_round(self, result: RoundResult) -> None:
        acc = "" if result.accuracy is None else f"acc {result.accuracy:.3f}"
        self.progress.update(self.task, advance=1, acc=acc)

    def on_finish(self, results: list[RoundResult]) -> None:
        pass


from simulations.bench.cli import bench_app  # noqa: E402

app.add_typer(
    bench_app, name="bench", help="Benchmarks against the named peers (ratios in one run)."
)

from simulations.privacy_audit.cli import audit_privacy_cmd  # noqa: E402

app.command("audit-privacy")(audit_privacy_cmd)


@app.callback()
def _root() -> None:
    """fedseal simulations: `run` a federation, `bench` the protocols."""


@app.command("run")
@with_run_options(SIMULATION_OPTIONS)
def run_cmd(
    clients: Annotated[
        int,
        typer.Option("--clients", "-n", help="Number of virtual sites.", rich_help_panel=RUN_PANEL),
    ] = _D.num_sites,
    *,
    run_config: RunConfig,
    drop_rate: Annotated[
        float, typer.Option(help="Fault injection: fraction of sampled sites that drop out.")
    ] = 0.0,
    drop_stage: Annotated[
        DropStage, typer.Option(help="Secure-aggregation stage at which those sites drop out.")
    ] = DropStage(DEFAULT_DROP_STAGE),
    out: Annotated[
        Path | None,
        typer.Option(
            help="Run directory: record.db, keys/, sites/, result.json, report (default runs/<time>)."
        ),
    ] = None,
    server_policy: Annotated[
        Path | None,
        typer.Option(help="The coordinator's policy (TOML); a violating run is refused."),
    ] = None,
    site_policy: Annotated[
        Path | None,
        typer.Option(
            help="Site policy for every virtual site (TOML), or a directory of site-<i>.toml files."
        ),
    ] = None,
    resume: Annotated[
        str | None, typer.Option(help="Resume this run id from the record in --out after a crash.")
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")
    ] = False,
    cpus_per_client: Annotated[
        float, typer.Option(help="Ray CPUs reserved per virtual site.")
    ] = 1.0,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show Flower and Ray logs.")
    ] = False,
) -> None:
    """Run a federated simulation and report accuracy and loss per round."""
    cfg, faults = _simulation_config(run_config, clients, drop_rate, drop_stage)
    _say_client_level_noise(cfg)

    from simulations.engine import run_simulation, stdout_to_stderr

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[acc]}"),
        TimeElapsedColumn(),
        console=err,
        transient=json_out,
    )

    def fail(message: str, code: int) -> typer.Exit:
        """Report a failure on one line (and, with --json, as the one JSON object on stdout)."""
        err.print(
            f"[red]{'error' if code == 2 else 'run failed'}:[/red] {message}", highlight=False
        )
        if json_out:
            sys.stdout.write(json.dumps({"error": message, "exit_code": code}) + "\n")
            sys.stdout.flush()
        return typer.Exit(code)

    if resume and out is None:
        raise fail("--resume needs --out, the directory of the run's record", 2)
    if out is None:
        out = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if (problem := _unwritable(out)) is not None:  # found before the run, not after it
        raise fail(problem, 2)
    from policies import PolicyFileError, load_server_policy, load_site_policies

    try:
        if server_policy is not None:
            load_server_policy(server_policy)  # fail before starting anything
        site_policies = load_site_policies(site_policy) if site_policy is not None else None
    except PolicyFileError as exc:
        for v in exc.violations:
            err.print(str(v), highlight=False)
        raise fail(f"{len(exc.violations)} problem(s) in a policy file", 2) from None
    try:
        with progress, stdout_to_stderr():
            run_id, results = run_simulation(
                cfg,
                out_dir=out,
                resume_run_id=resume,
                server_policy=server_policy,
                site_policies=site_policies,
                observer=ProgressObserver(progress),
                cpus_per_site=cpus_per_client,
                verbose=verbose,
                faults=faults,
            )
    except FedsealError as exc:
        raise fail(str(exc), 1) from None
    except RuntimeError as exc:  # Flower wraps ServerApp failures
        raise fail(str(exc.__cause__ or exc), 1) from None

    doc = json.loads((out / "result.json").read_text())
    report_html = _write_report(out, run_id)
    if json_out:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()
        return
    table = Table(title=f"fedseal run {run_id}")
    for col in (
        "round",
        "accuracy",
        "loss",
        "participants",
        "max site ε (its δ)",
        "client ε",
        "refused",
        "seconds",
    ):
        table.add_column(col, justify="right")
    for r in doc["rounds"]:
        table.add_row(
            str(r["round"]),
            _accuracy_cell(r),
            "n/a" if r["loss"] is None else f"{r['loss']:.4f}",
            "withheld" if r["participants"] is None else f"{r['participants']}/{r['sampled']}",
            _site_epsilon_cell(r),
            "-" if r["client_level_epsilon"] is None else f"{r['client_level_epsilon']:.3f}",
            "-" if r["participants"] is None else str(sum(1 for s in r["sites"] if s["refused"])),
            "-" if r["seconds"] is None else f"{r['seconds']:.2f}",
        )
    Console().print(table)
    if (note := doc.get("evaluation", {}).get("note")) is not None:
        Console().print(f"evaluation: {note}")
    Console().print(f"run directory: {out} (record.db, result.json); report: {report_html}")


@app.command("federation")
@one_line_errors
def federation_cmd(
    sites: Annotated[
        int, typer.Option("--sites", min=1, help="Simulated sites (Flower's num-supernodes).")
    ] = 4,
    flwr_home: Annotated[
        Path | None,
        typer.Option(
            "--flwr-home",
            help="Flower's home (default: $FLWR_HOME): sites' state in fedseal-sites/, "
            "the roster and its authority in fedseal/federation/.",
        ),
    ] = None,
) -> None:
    """Make the federation of a local `flwr run` simulation: site identities and a roster.

    Run once after `fedseal-server keys $FLWR_HOME/fedseal/keys` and before
    `flwr run .`: each simulated site (`site-<i>`) gets an identity key in its
    private state directory, a roster authority (kept in
    `fedseal/federation/`) signs a roster naming them and the coordinator's
    audit key, and every site's state directory pins that authority. Secure
    aggregation needs it: a site without a roster cannot authenticate its
    neighbours and takes no part. (`fedseal-sim run` makes its own federation.)
    """
    import os

    from client.site_roster import install_local_roster
    from common.audit.seal import load_public_key_pem
    from simulations.federation import prepare_federation

    home = flwr_home or (Path(os.environ["FLWR_HOME"]) if os.environ.get("FLWR_HOME") else None)
    if home is None:
        raise ConfigurationError("set FLWR_HOME or --flwr-home: where `flwr run` keeps its state")
    audit_pub = home / "fedseal" / "keys" / "audit.pub"
    if not audit_pub.is_file():
        raise ConfigurationError(
            f"no audit key at {audit_pub}: run `fedseal-server keys {audit_pub.parent}` first"
        )
    coordinator = load_public_key_pem(audit_pub.read_bytes()).public_bytes_raw()
    fed = prepare_federation(
        home / "fedseal-sites",
        sites,
        coordinator_key=coordinator,
        directory=home / "fedseal" / "federation",
        federation="local",
    )
    for i in range(sites):
        install_local_roster(fed.site_directory(i), fed.roster, fed.authority_public)
    err.print(
        f"federation 'local': {sites} sites, roster version {fed.roster.version} "
        f"(sha256 {fed.roster.digest().hex()[:16]}...), pinned in each site's state directory"
    )


def _unwritable(out: Path) -> str | None:
    """Why the run directory ``out`` cannot hold a run (None: it can), checked by writing."""
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as exc:
        return f"run directory {out} is not writable: {exc.strerror or exc}"
    return None


def _site_epsilon_cell(r: dict[str, Any]) -> str:
    """The round's largest record-level ε, at the δ that site reported (its own policy's)."""
    reported = [s for s in r["sites"] if s.get("record_level_epsilon") is not None]
    if not reported:
        return "-"
    top = max(reported, key=lambda s: s["record_level_epsilon"])
    delta = top.get("record_level_delta")
    at = f" (δ={delta:g})" if delta is not None else ""
    return f"{top['record_level_epsilon']:.3f}{at}"


def _accuracy_cell(r: dict[str, Any]) -> str:
    """A round's accuracy for the results table; a failed round says so."""
    if r.get("failed"):
        return "failed"
    return "n/a" if r["accuracy"] is None else f"{r['accuracy']:.4f}"


@one_line_errors
def _simulation_config(
    run_config: RunConfig, clients: int, drop_rate: float, drop_stage: DropStage
) -> tuple[RunConfig, FaultPlan | None]:
    """The run options' ``RunConfig`` completed for ``clients`` virtual sites, and the faults.

    A round never waits for more sites than there are. The drop options (the
    only place they are read) become a :class:`simulations.faults.FaultPlan`
    for the simulated network; they never reach the configuration sites see.

    Raises
    ------
    typer.Exit
        With code 2 after one ``error:`` line when a value is invalid.
    """
    try:
        cfg = run_config.replace(num_sites=clients, min_sites=min(run_config.min_sites, clients))
        faults = FaultPlan(drop_rate, drop_stage.value, seed=cfg.seed) if drop_rate > 0 else None
    except FedsealError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    return cfg, faults


@one_line_errors
def _say_client_level_noise(cfg: RunConfig) -> None:
    """Under client-level DP: the calibrated noise multiplier, and a warning when it drowns learning.

    The warning compares the noise std on the mean update per coordinate,
    ``z * Delta / D`` (:func:`server.privacy.client_level_outlook`), with
    ``C / sqrt(d)``, the typical coordinate of an update clipped to ``C``.

    Raises
    ------
    typer.Exit
        With code 2 after one ``error:`` line when the configuration cannot be
        calibrated (e.g. too few secure-aggregation bits for the sites).
    """
    if not cfg.central_dp:
        return
    from common.records import ModelSpec
    from common.task import task_for
    from server.privacy import client_level_outlook

    if cfg.client_epsilon > 0:
        err.print(
            f"client-level epsilon {cfg.client_epsilon:g} (delta {cfg.delta:g}) over "
            f"{cfg.rounds} rounds at sampling rate {cfg.client_sample_rate:g}: "
            f"noise multiplier z = {cfg.noise_multiplier:.4g}",
            highlight=False,
            soft_wrap=True,
        )
    size = ModelSpec.of(task_for(cfg).build(seed=cfg.seed).state_dict()).size
    if cfg.distributed_dp:  # the sites' Skellam noise (server.distributed)
        from common.dp.distributed import check_run_noise
        from common.dp.skellam import MECHANISM

        params = check_run_noise(cfg, size)
        err.print(
            f"{MECHANISM}: {cfg.secagg_bits} ring bits, gamma {params.gamma:.4g}, target "
            f"noise std {params.noise_std(params.threshold):.3g} on the sum (at least "
            f"{params.threshold} survivors), each site adds 1/t of it",
            highlight=False,
            soft_wrap=True,
        )
        return
    warning = client_level_outlook(cfg, size).warning()
    if warning is not None:
        err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)


def _write_report(out: Path, run_id: str) -> Path:
    """The run's PNG plots and HTML summary, from its record, into ``out/report``."""
    from server.record import SqlRecord
    from server.report import write_report

    with SqlRecord(f"sqlite:///{(out / 'record.db').resolve()}", create=False) as record:
        return write_report(record, run_id, out / "report").html


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
