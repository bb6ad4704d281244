"""``fedseal-sim bench``: the benchmarks, side by side in one run.

Commands
--------
``secagg``
    Per-round time of plain FedAvg, fedseal's secure aggregation and Flower's
    own SecAgg+ on the Simulation Engine (:mod:`simulations.bench.secagg`).
``primitives``
    The secure-aggregation primitives alone against the ChaCha20 keystream
    ceiling (:mod:`simulations.bench.secagg_primitives`).
``dp``
    DP-SGD step time against non-private training by model size: Opacus'
    hooks and ghost clipping and fedseal's fast path, each with torch and
    ChaCha20 noise, and the noise draw alone (:mod:`simulations.bench.dp_sgd`,
    loaded only when asked for).
``deploy``
    Round time on Flower's Deployment Engine, 3 sites on loopback: Flower's
    minimal FedAvg app vs fedseal plain vs fedseal secure, with where each
    exchange's time goes (:mod:`simulations.bench.deploy`).

Tables go to stdout; with ``--json`` stdout carries exactly one JSON
document and everything Ray and Flower print is sent to stderr.
"""

from __future__ import annotations

import json
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from common.config import RunConfig
from common.errors import FedsealError
from server.run_options import SecaggSetupRounds
from simulations.bench.secagg import ratio

bench_app = typer.Typer(
    name="bench",
    help="Benchmarks: secure aggregation vs plain and vs Flower's SecAgg+, primitives, DP-SGD, "
    "deployment round time.",
    no_args_is_help=True,
    add_completion=False,
)
err = Console(stderr=True)


def parse_counts(text: str, option: str) -> list[int]:
    """Parse a comma-separated list of positive integers (``"10,50"``).

    Raises
    ------
    typer.BadParameter
        On an empty list, a non-integer or a value below 1.
    """
    values: list[int] = []
    for part in text.split(","):
        item = part.strip().replace("_", "")
        if not item.isdigit() or int(item) < 1:
            raise typer.BadParameter(
                f"expected comma-separated positive integers, got {text!r}", param_hint=option
            )
        values.append(int(item))
    return values


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _spread(spread: Any, spec: str) -> str:
    """``median (min-max)`` of a :class:`~simulations.bench.secagg.Spread`, or ``-``."""
    if spread is None:
        return "-"
    return f"{spread.median:{spec}} ({spread.low:{spec}}-{spread.high:{spec}})"


def _emit_json(doc: object) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


@bench_app.command("secagg")
def secagg_cmd(
    clients: Annotated[
        str, typer.Option("--clients", help="Comma-separated numbers of sites.")
    ] = "10,50",
    params: Annotated[
        str, typer.Option("--params", help="Comma-separated parameter-vector lengths.")
    ] = "100000,1000000",
    rounds: Annotated[
        int,
        typer.Option(
            "--rounds", min=2, help="Rounds per variant; the median is taken after the first."
        ),
    ] = 4,
    flower: Annotated[
        bool, typer.Option("--flower/--no-flower", help="Also time Flower's own SecAgg+.")
    ] = True,
    setup_rounds: SecaggSetupRounds = RunConfig().secagg_setup_rounds,
    repeats: Annotated[
        int,
        typer.Option(
            "--repeats",
            min=1,
            help="Runs per cell, variants interleaved; ratios are reported as the median "
            "and min-max over the runs.",
        ),
    ] = 3,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")
    ] = False,
) -> None:
    """Time a round of plain FedAvg, fedseal SecAgg+ and Flower's SecAgg+ (clients do no training).

    With the default ``--setup-rounds`` the rounds after the first reuse the
    first round's setup (three exchanges each: masked, consistency, unmask);
    ``--setup-rounds 1`` times the protocol with its keys and shares exchanges
    in every round. Each cell runs ``--repeats`` times (plain, fedseal, Flower,
    plain, ...): one run on a shared machine is not a figure.
    """
    from simulations.bench.secagg import Sample, run_bench
    from simulations.engine import stdout_to_stderr

    client_counts = parse_counts(clients, "--clients")
    lengths = parse_counts(params, "--params")

    def announce(n: int, m: int, repeat: int, sample: Sample) -> None:
        err.print(
            f"[dim]{n} clients x {m:,} params, run {repeat}/{repeats}: plain "
            f"{sample.plain_s:.3f} s, fedseal {_fmt(sample.fedseal_s, '.3f')} s, "
            f"flower {_fmt(sample.flower_secaggplus_s, '.3f')} s[/dim]"
        )

    try:
        with stdout_to_stderr():
            rows = run_bench(
                client_counts,
                lengths,
                rounds,
                include_flower=flower,
                setup_rounds=setup_rounds,
                repeats=repeats,
                on_sample=announce,
            )
    except FedsealError as exc:
        err.print(f"[red]benchmark failed:[/red] {exc}")
        raise typer.Exit(1) from None
    except RuntimeError as exc:  # Flower wraps ServerApp failures
        err.print(f"[red]benchmark failed:[/red] {exc.__cause__ or exc}")
        raise typer.Exit(1) from None
    if json_out:
        _emit_json({"rows": [row.to_json() for row in rows]})
        return
    table = Table(
        title=f"Secure aggregation round time: median of rounds 2..{rounds} per run, "
        f"median (min-max) over {repeats} interleaved runs; clients do no training"
    )
    for title in (
        "clients",
        "params",
        "plain s",
        "fedseal s",
        "flower SecAgg+ s",
        "fedseal / plain",
        "flower / fedseal",
    ):
        table.add_column(title, justify="right")
    for row in rows:
        table.add_row(
            str(row.clients),
            f"{row.params:,}",
            f"{row.plain_s:.3f}",
            _fmt(row.fedseal_s, ".3f"),
            _fmt(row.flower_secaggplus_s, ".3f"),
            _spread(row.fedseal_over_plain, ".2f"),
            _spread(row.flower_over_fedseal, ".1f"),
        )
    Console().print(table)


@bench_app.command("primitives")
def primitives_cmd(
    params: Annotated[
        str, typer.Option("--params", help="Comma-separated vector lengths.")
    ] = "100000,1000000",
    clients: Annotated[
        int, typer.Option("--clients", min=2, help="Clients in the in-memory round.")
    ] = 50,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timings per median.")] = 5,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")
    ] = False,
) -> None:
    """Time mask expansion, quantisation, masking and unmasking against the keystream ceiling."""
    from simulations.bench.secagg_primitives import COLUMNS, bench_primitives

    rows = bench_primitives(parse_counts(params, "--params"), clients=clients, repeats=repeats)
    if json_out:
        _emit_json({"rows": rows})
        return
    table = Table(title="fedseal secure-aggregation primitives (ChaCha20 PRG, uint32 ring)")
    for title, _, _ in COLUMNS:
        table.add_column(title, justify="right")
    table.add_column("expand / ceiling", justify="right")
    for row in rows:
        cells = [fmt.format(row[key]) for _, key, fmt in COLUMNS]
        cells.append(_fmt(ratio(row["mask_expand_mb_s"], row["keystream_mb_s"]), ".0%"))
        table.add_row(*cells)
    Console().print(table)


def _load_dp_bench() -> tuple[Callable[..., Sequence[dict[str, Any]]], ...]:
    try:
        from simulations.bench import dp_sgd
    except ImportError as exc:
        raise typer.BadParameter(f"the DP-SGD benchmark is not available: {exc}") from None
    benches = (getattr(dp_sgd, "bench_dp_sgd", None), getattr(dp_sgd, "bench_noise_draw", None))
    if not all(callable(b) for b in benches):
        raise typer.BadParameter(
            "the DP-SGD benchmark is not available: simulations.bench.dp_sgd has no "
            "bench_dp_sgd or bench_noise_draw"
        )
    return benches  # type: ignore[return-value]


def _spread_json(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.to_json() if hasattr(v, "to_json") else v for k, v in row.items()}


def parse_param_counts(text: str, option: str) -> list[int]:
    """Parse comma-separated parameter counts, ``1e6`` notation allowed (``"1e5,2_000_000"``).

    Raises
    ------
    typer.BadParameter
        On an empty list, a value that is not a whole number, or one below 1.
    """
    values: list[int] = []
    for part in text.split(","):
        item = part.strip().replace("_", "").lower()
        try:
            value = float(item) if "e" in item else int(item)
        except ValueError:
            value = 0
        if not (isinstance(value, int) or value.is_integer()) or value < 1:
            raise typer.BadParameter(
                f"expected comma-separated positive counts such as 1e5,1e6, got {text!r}",
                param_hint=option,
            )
        values.append(int(value))
    return values


@bench_app.command("dp")
def dp_cmd(
    params: Annotated[
        str,
        typer.Option(
            "--params",
            help="Parameter counts to reach by widening each model, e.g. 1e5,1e6,1e7 "
            "(the cnn stops at 2e6, hooks mode above --hooks-max-params).",
        ),
    ] = "1e5,1e6",
    models: Annotated[
        str, typer.Option("--models", help="Comma-separated models: mlp, cnn.")
    ] = "mlp,cnn",
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    steps: Annotated[
        int, typer.Option("--steps", min=1, help="Timed steps per variant and repeat.")
    ] = 10,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed steps first.")] = 3,
    repeats: Annotated[
        int,
        typer.Option(
            "--repeats",
            min=1,
            help="Repeats, variants interleaved; ratios are taken within each repeat and "
            "reported as the median and min-max.",
        ),
    ] = 3,
    hooks_max_params: Annotated[
        str,
        typer.Option(
            "--hooks-max-params",
            help="Skip Opacus hooks mode (batch x params per-sample gradients) above this size.",
        ),
    ] = "2e6",
    clock: Annotated[
        str,
        typer.Option(
            "--clock",
            help="wall (elapsed) or cpu (process CPU time: steadier on a shared machine; "
            "CPU devices only).",
        ),
    ] = "wall",
    threads: Annotated[
        int,
        typer.Option("--threads", min=0, help="torch CPU threads (0: torch's default)."),
    ] = 0,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")
    ] = False,
) -> None:
    """Time a DP-SGD step against a non-private one: Opacus hooks, ghost, fedseal fast.

    Each private mode runs with no noise (z = 0: the clipping cost alone, not
    private), torch noise (Opacus' generator, for comparison) and ChaCha20 noise
    (fedseal's production stream); "x ghost" compares the fast path with Opacus
    ghost clipping on the same noise in the same repeat.
    """
    if device not in ("cpu", "cuda"):
        raise typer.BadParameter(f"expected cpu or cuda, got {device!r}", param_hint="--device")
    sizes = tuple(parse_param_counts(params, "--params"))
    (hooks_cap,) = parse_param_counts(hooks_max_params, "--hooks-max-params")
    model_names = tuple(m.strip() for m in models.split(",") if m.strip())
    if not model_names or any(m not in ("mlp", "cnn") for m in model_names):
        raise typer.BadParameter(f"expected mlp and/or cnn, got {models!r}", param_hint="--models")
    if clock not in ("wall", "cpu"):
        raise typer.BadParameter(f"expected wall or cpu, got {clock!r}", param_hint="--clock")
    if clock == "cpu" and device == "cuda":
        raise typer.BadParameter("CPU time misses the GPU's work: use --clock wall on cuda")
    bench, draw_bench = _load_dp_bench()
    if threads:
        import torch

        torch.set_num_threads(threads)
    # Opacus' ghost clipping warns on every step that the inputs need no grad.
    warnings.filterwarnings("ignore", category=UserWarning, module="opacus")
    warnings.filterwarnings("ignore", message="Full backward hook", category=UserWarning)
    warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
    rows = list(
        bench(
            device,
            batch_size=batch_size,
            steps=steps,
            warmup=warmup,
            repeats=repeats,
            models=model_names,
            params=sizes,
            hooks_max_params=hooks_cap,
            clock=clock,
        )
    )
    draws = list(draw_bench(device, repeats=repeats))
    if json_out:
        _emit_json(
            {
                "rows": [_spread_json(r) for r in rows],
                "noise_draw": [_spread_json(r) for r in draws],
            }
        )
        return
    threads_used = rows[0].get("threads") if rows else None
    table = Table(
        title=f"DP-SGD step time ({device}, batch {batch_size}, {steps} steps, {clock} clock, "
        f"{threads_used} threads): median (min-max) over {repeats} interleaved repeats"
    )
    columns = (
        "model",
        "params",
        "mode",
        "noise",
        "step ms",
        "x non-private",
        "x torch noise",
        "x ghost",
        "note",
    )
    for title in columns:
        table.add_column(
            title,
            justify="right" if title in ("params", "step ms") else "left",
            no_wrap=title != "note",
        )
    for row in rows:
        table.add_row(
            str(row.get("model", "")),
            f"{row['params']:,}" if isinstance(row.get("params"), int) else "",
            str(row.get("mode", "")),
            str(row.get("noise", "")),
            _spread(row.get("step_ms"), ".2f"),
            _spread(row.get("ratio_vs_non_private"), ".2f"),
            _spread(row.get("ratio_vs_torch_noise"), ".2f"),
            _spread(row.get("ratio_vs_ghost"), ".2f"),
            str(row.get("error") or ""),
        )
    console = Console(width=max(Console().width, 150))  # ten columns of spreads
    console.print(table)
    draw_table = Table(title=f"One float32 noise draw on {device}: median (min-max) ms")
    for title in ("values", "noise", "draw ms", "x torch noise"):
        draw_table.add_column(title, justify="right")
    for row in draws:
        draw_table.add_row(
            str(row["size"]),
            str(row["noise"]),
            _spread(row["draw_ms"], ".3f"),
            _spread(row["ratio_vs_torch_noise"], ".2f"),
        )
    console.print(draw_table)


@bench_app.command("deploy")
def deploy_cmd(
    rounds: Annotated[
        int,
        typer.Option(
            "--rounds", min=2, help="Rounds per run; the median is taken after the first."
        ),
    ] = 4,
    repeats: Annotated[
        int,
        typer.Option(
            "--repeats",
            min=1,
            help="Runs per variant, variants interleaved; ratios to Flower's app are taken "
            "within each repeat and reported as the median and min-max.",
        ),
    ] = 3,
    variants: Annotated[
        str,
        typer.Option("--variants", help="Comma-separated subset of flower,plain,secure."),
    ] = "flower,plain,secure",
    keep: Annotated[
        Path | None,
        typer.Option("--keep", help="Keep every run's state and logs in this directory."),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")
    ] = False,
) -> None:
    """Round time on Flower's Deployment Engine, 3 sites on loopback: Flower's minimal
    FedAvg app vs fedseal plain vs fedseal secure (all WITHOUT TLS; see
    :mod:`simulations.bench.deploy`)."""
    from simulations.bench.deploy import VARIANTS, RunSample, run_bench

    chosen = [v.strip() for v in variants.split(",") if v.strip()]
    if not chosen or any(v not in VARIANTS for v in chosen):
        raise typer.BadParameter(
            f"expected a subset of {','.join(VARIANTS)}, got {variants!r}", param_hint="--variants"
        )

    def announce(sample: RunSample) -> None:
        rounds_s = ", ".join(f"{p:.2f}" for p in sample.periods)
        err.print(
            f"[dim]{sample.variant} run {sample.repeat}/{repeats}: rounds {rounds_s} s; "
            f"exchanges/round {_fmt(sample.exchanges, '.0f')}[/dim]"
        )

    # A stopped benchmark still stops the deployments it started (run_bench's clean-up).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        report = run_bench(repeats, rounds, chosen, keep=keep, on_sample=announce)
    except FedsealError as exc:
        err.print(f"[red]benchmark failed:[/red] {exc}")
        raise typer.Exit(1) from None
    if json_out:
        _emit_json(report.to_json())
        return
    console = Console()
    console.print(deploy_table(report.rows(), rounds, repeats, report.loaded))
    console.print(breakdown_table(report))


def deploy_table(rows: Sequence[dict[str, Any]], rounds: int, repeats: int, load: str) -> Table:
    """The ``bench deploy`` table: one row per variant (:meth:`DeployReport.rows`)."""
    table = Table(
        title=f"Deployment round time, 3 sites on loopback, insecure: median of rounds "
        f"2..{rounds} per run, median (min-max) over {repeats} interleaved runs"
        + (f"; {load}" if load else "")
    )
    for title in (
        "variant",
        "round s",
        "round 1 s",
        "exchanges/round (E)",
        "x flower",
        "bound",
        "met",
    ):
        table.add_column(title, justify="right")
    for row in rows:
        met = row["met"]
        table.add_row(
            row["variant"],
            _spread(row["round_s"], ".2f"),
            _spread(row["first_round_s"], ".1f"),
            _fmt(row["exchanges"], ".0f"),
            _spread(row["over_flower"], ".2f"),
            _fmt(row["limit"], ".2f"),
            "-" if met is None else ("yes" if met else "no"),
        )
    return table


def breakdown_table(report: Any) -> Table:
    """Where one exchange's time goes at a site, per variant and message type (medians, s)."""
    from simulations.bench.deploy import PHASES

    table = Table(
        title="One exchange at one site, seconds: median over sites and messages, then over runs"
    )
    table.add_column("variant")
    table.add_column("message")
    for name, _ in PHASES:
        table.add_column(name, justify="right")
    for variant in ("flower", "plain", "secure"):
        for kind, phases in report.breakdown(variant).items():
            table.add_row(
                variant,
                kind,
                *(_fmt(p.median if (p := phases.get(name)) else None, ".2f") for name, _ in PHASES),
            )
    return table


@bench_app.command("scale")
def scale_cmd(
    out: Annotated[
        Path, typer.Option("--out", help="Fresh run directory (the run's, plus scale.json).")
    ],
    clients: Annotated[int, typer.Option("--clients", min=2, help="Virtual sites.")] = 1000,
    fraction: Annotated[float, typer.Option("--fraction", help="Sites sampled per round.")] = 0.1,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Rounds.")] = 10,
    dp: Annotated[bool, typer.Option("--dp/--no-dp", help="Record-level DP-SGD.")] = True,
    timeout_s: Annotated[
        float, typer.Option("--timeout", help="Seconds before the run is killed.")
    ] = 3600.0,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")
    ] = False,
) -> None:
    """One `fedseal-sim run --dataset synthetic` of many sites (secure aggregation on): wall
    time and the peak memory summed over all its processes, Ray's included
    (:mod:`simulations.bench.scale`)."""
    from simulations.bench.scale import run_scale

    args = [
        "--dataset",
        "synthetic",
        "--clients",
        str(clients),
        "--fraction",
        str(fraction),
        "--rounds",
        str(rounds),
        "--dp" if dp else "--no-dp",
        "--secagg",
    ]
    try:
        result = run_scale(args, out, timeout_s=timeout_s)
    except FedsealError as exc:
        err.print(f"[red]benchmark failed:[/red] {exc}")
        raise typer.Exit(1) from None
    if json_out:
        _emit_json(result.to_json())
    else:
        table = Table(title=f"fedseal-sim run at scale ({result.started_utc})")
        for col in ("sites", "rounds done", "wall s", "peak PSS MiB", "peak RSS MiB", "load 1m"):
            table.add_column(col, justify="right")
        table.add_row(
            str(clients),
            f"{result.rounds_completed}/{rounds}",
            f"{result.wall_s:.0f}",
            _fmt(result.peak_pss_mib, ".0f"),
            f"{result.peak_rss_mib:.0f}",
            f"{result.load_average_before[0]:.1f}-{result.load_average_after[0]:.1f}",
        )
        Console().print(table)
        Console().print(f"{result.command}; figures in {out / 'scale.json'}, log in run.log")
    if result.exit_code != 0:
        err.print(f"[red]the run failed (exit {result.exit_code}); see {out / 'run.log'}[/red]")
        raise typer.Exit(1)
