"""``fedseal-client ledger``: read the site privacy ledger."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from client.ledger import SiteLedger
from common.errors import ConfigurationError
from policies.cli_errors import one_line_errors

ledger_app = typer.Typer(
    name="ledger",
    help="The site privacy ledger: every DP-SGD application and each dataset's record-level epsilon.",
    no_args_is_help=True,
    add_completion=False,
)
out = Console()


@ledger_app.callback()
def ledger_main() -> None:
    """The site privacy ledger (record-level epsilon per dataset)."""


@ledger_app.command("show")
@one_line_errors
def show_cmd(
    db: Annotated[Path, typer.Option(help="The site's ledger database file.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON object with 'entries' and 'totals'.")
    ] = False,
    delta: Annotated[
        float | None,
        typer.Option(help="Delta for the totals (default: each dataset's latest entry's)."),
    ] = None,
    accountant: Annotated[
        str | None,
        typer.Option(
            help="pld, prv or rdp for the totals (default: each dataset's latest entry's)."
        ),
    ] = None,
) -> None:
    """List the ledger's history and per-dataset record-level epsilon totals."""
    if not db.is_file():
        raise ConfigurationError(f"no privacy ledger at {db}")
    with SiteLedger(db) as ledger:
        entries = ledger.history()
        totals = ledger.summary(delta=delta, accountant=accountant)
        exposure = ledger.client_exposure()
    if as_json:
        payload = {
            "unit": "record-level",
            "entries": [e.to_json() for e in entries],
            "totals": [t.to_json() for t in totals],
            # the rounds this site contributed to under client-level DP, per run (never added
            # to the record-level figures)
            "client_level": [x.to_json() for x in exposure],
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    history = Table(title=f"privacy ledger {db}")
    for column in (
        "id",
        "dataset",
        "run",
        "round",
        "z",
        "sample rate",
        "steps",
        "delta",
        "acct",
        "state",
        "created",
    ):
        history.add_column(column)
    for e in entries:
        history.add_row(
            str(e.id),
            e.dataset_id,
            e.run_id,
            str(e.round),
            f"{e.noise_multiplier:.4g}",
            f"{e.sample_rate:.4g}",
            str(e.steps),
            f"{e.delta:.3g}",
            e.accountant,
            e.state,
            e.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    summary = Table(title="record-level epsilon per dataset (recomputed from the full history)")
    for column in (
        "dataset",
        "entries",
        "reserved",
        "confirmed",
        "steps",
        "delta",
        "acct",
        "epsilon",
    ):
        summary.add_column(column)
    for t in totals:
        summary.add_row(
            t.dataset_id,
            str(t.entries),
            str(t.reserved),
            str(t.confirmed),
            str(t.steps),
            f"{t.delta:.3g}",
            t.accountant,
            f"{t.record_level_epsilon:.4f}",
        )
    out.print(history)
    out.print(summary)
    if exposure:
        client = Table(title="client-level exposure per run (rounds contributed, no amplification)")
        for column in ("dataset", "run", "rounds", "z", "q (run)", "delta", "epsilon"):
            client.add_column(column)
        for x in exposure:
            client.add_row(
                *(x.dataset_id, x.run_id, str(x.rounds), f"{x.noise_multiplier:.4g}"),
                *(f"{x.sample_rate:.4g}", f"{x.delta:.3g}", f"{x.client_level_epsilon:.4f}"),
            )
        out.print(client)
