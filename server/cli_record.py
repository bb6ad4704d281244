"""``fedseal-server audit|models|keys``: command-line access to the central record.

Mounted into ``fedseal-server`` by ``server.cli``::

    app.add_typer(audit_app, name="audit")
    app.add_typer(models_app, name="models")
    app.command("keys")(keys_cmd)

Exit codes: 0 success; 1 a check failed or the record cannot be used
(missing database, bad URL, newer schema, altered artifact); 2 bad
arguments or configuration. Errors are one line, never a traceback.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from common.errors import IntegrityError, RecordError
from policies.cli_errors import EXIT_FAILED, one_line_errors
from server.record import ModelVersion, SqlRecord
from server.record.keys import create_keypair, load_public_key

__all__ = ["audit_app", "keys_cmd", "models_app"]

audit_app = typer.Typer(
    help="The sealed audit log: verify the hash chain and seals, export it.",
    no_args_is_help=True,
    add_completion=False,
)
models_app = typer.Typer(
    help="The model registry: list, show, export and tag model versions.",
    no_args_is_help=True,
    add_completion=False,
)
out = Console(soft_wrap=True, highlight=False)

DbOption = Annotated[
    str,
    typer.Option("--db", help="The record: a SQLAlchemy URL, or a path to a SQLite file."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for machines.")]


def _open(db: str) -> SqlRecord:
    return SqlRecord(db, create=False)


def _write_text_atomic(dest: Path, text: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------- audit


@audit_app.command("verify")
@one_line_errors
def verify_cmd(
    db: DbOption,
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key",
            help="The server's audit public key (audit.pub) to check seal signatures with.",
        ),
    ] = None,
) -> None:
    """Recompute the audit hash chain and check every seal; exit 1 naming the first bad event."""
    key = load_public_key(public_key) if public_key is not None else None
    with _open(db) as record:
        report = record.verify(key)
    out.print(report.summary())
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)
    if key is None and report.n_seals:
        out.print(
            "note: seal signatures were checked against the key stored in the record; "
            "pass --public-key to check them against the key you trust",
            style="dim",
        )


@audit_app.command("export")
@one_line_errors
def export_cmd(
    db: DbOption,
    fmt: Annotated[str, typer.Option("--format", help="jsonl (verifiable) or csv.")] = "jsonl",
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Write here instead of standard output.")
    ] = None,
) -> None:
    """Export the audit log: JSON lines (events and seals, checkable offline) or CSV (events)."""
    if fmt not in ("jsonl", "csv"):
        raise typer.BadParameter("must be jsonl or csv", param_hint="--format")
    buffer = io.StringIO()
    with _open(db) as record:
        count = record.export_jsonl(buffer) if fmt == "jsonl" else record.export_csv(buffer)
    if out_file is None:
        sys.stdout.write(buffer.getvalue())
        return
    try:
        _write_text_atomic(out_file, buffer.getvalue())
    except OSError as exc:
        raise RecordError(f"cannot write {out_file}: {exc.strerror}") from None
    typer.echo(f"wrote {count} events to {out_file}", err=True)


# ----------------------------------------------------------------- models


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _artifact_intact(record: SqlRecord, version: ModelVersion) -> bool:
    try:
        record.load_version_bytes(version.version)
    except (IntegrityError, RecordError):
        return False
    return True


@models_app.command("list")
@one_line_errors
def list_cmd(
    db: DbOption,
    run_id: Annotated[str | None, typer.Option("--run", help="Only this run's versions.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List model versions with their hash, ε at both levels and energy so far."""
    with _open(db) as record:
        versions = record.list_versions(run_id)
        intact = {v.version: _artifact_intact(record, v) for v in versions}
    if as_json:
        rows = [{**v.to_dict(), "artifact_intact": intact[v.version]} for v in versions]
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="model versions")
    for name in ("version", "run", "round", "parent", "sha256", "ε record", "ε client", "kWh"):
        table.add_column(name)
    table.add_column("tags")
    for v in versions:
        digest = v.sha256[:12] + ("" if intact[v.version] else " ALTERED")
        table.add_row(
            str(v.version),
            v.run_id[:12],
            str(v.round),
            "-" if v.parent is None else str(v.parent),
            digest,
            _fmt(v.record_level_epsilon),
            _fmt(v.client_level_epsilon),
            _fmt(v.energy_kwh),
            ", ".join(v.tags),
        )
    out.print(table)


def _card(record: SqlRecord, v: ModelVersion) -> dict[str, Any]:
    energy = [e for e in record.energy(v.run_id) if e.round <= v.round]
    privacy = [p for p in record.privacy(v.run_id) if p.round <= v.round]
    deltas = {p.level: p.delta for p in privacy}
    return {
        **v.to_dict(),
        "artifact_intact": _artifact_intact(record, v),
        "privacy": {
            "record_level_epsilon": v.record_level_epsilon,
            "record_level_delta": deltas.get("record"),
            "record_level_unit": "one training record at a site (DP-SGD)",
            "client_level_epsilon": v.client_level_epsilon,
            "client_level_delta": deltas.get("client"),
            "client_level_unit": "one site's whole contribution (DP-FedAvg)",
        },
        "energy": {
            "kwh": v.energy_kwh,
            "co2eq_g": sum(e.co2eq_g for e in energy),
            "reports": len(energy),
            "estimated": any(e.estimated for e in energy),
        },
    }


@models_app.command("show")
@one_line_errors
def show_cmd(
    version: Annotated[int, typer.Argument(help="Version number.")],
    db: DbOption,
    as_json: JsonOption = False,
) -> None:
    """Show one version's card: provenance, metrics, privacy (both levels) and energy."""
    with _open(db) as record:
        card = _card(record, record.get_version(version))
    if as_json:
        typer.echo(json.dumps(card, indent=2))
        return
    p, e = card["privacy"], card["energy"]
    out.print(f"[bold]model version {card['version']}[/bold]")
    out.print(f"  run          {card['run_id']}  round {card['round']}  parent {card['parent']}")
    intact = "intact" if card["artifact_intact"] else "ALTERED OR MISSING"
    out.print(f"  artifact     sha256 {card['sha256']} ({card['size_bytes']} bytes, {intact})")
    out.print(f"  created      {card['created_at']}")
    out.print(f"  participants {', '.join(str(n) for n in card['participants']) or '-'}")
    out.print(f"  tags         {', '.join(card['tags']) or '-'}")
    metrics = ", ".join(f"{k}={v}" for k, v in sorted(card["metrics"].items()))
    out.print(f"  metrics      {metrics or '-'}")
    out.print("[bold]privacy[/bold] (the two levels protect different units and are never added)")
    out.print(
        f"  record-level ε {_fmt(p['record_level_epsilon'])}  δ {_fmt(p['record_level_delta'])}"
        f"  per {p['record_level_unit']}"
    )
    out.print(
        f"  client-level ε {_fmt(p['client_level_epsilon'])}  δ {_fmt(p['client_level_delta'])}"
        f"  per {p['client_level_unit']}"
    )
    flag = " (includes estimates)" if e["estimated"] else ""
    out.print("[bold]energy[/bold] (run so far, up to this round)")
    out.print(
        f"  {_fmt(e['kwh'])} kWh, {_fmt(e['co2eq_g'])} gCO2eq from {e['reports']} site reports{flag}"
    )


@models_app.command("export")
@one_line_errors
def export_model_cmd(
    version: Annotated[int, typer.Argument(help="Version number.")],
    db: DbOption,
    out_file: Annotated[Path, typer.Option("--out", help="Where to write the model bytes.")],
    policy: Annotated[
        Path | None,
        typer.Option(
            help="Coordinator policy whose release gate (max epsilon, min metrics) applies."
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Export despite a release-gate denial (recorded in the audit log)."
        ),
    ] = False,
    keys: Annotated[
        Path | None, typer.Option(help="Audit key directory, to seal the recorded decision.")
    ] = None,
) -> None:
    """Write a version's model bytes after verifying their SHA-256 (refuses a mismatch).

    With --policy, the release gate decides first; every decision is recorded
    in the audit log, and a denial stops the export unless --force is given
    (the override is recorded too).
    """
    from common.errors import PolicyViolation
    from policies import check_release, load_server_policy, policy_hash

    with _open(db) as record:
        v = record.get_version(version)
        if policy is not None:
            gate = load_server_policy(policy)
            decisions = check_release(
                gate,
                {"client_level": v.client_level_epsilon, "record_level": v.record_level_epsilon},
                {k: float(x) for k, x in v.metrics.items() if isinstance(x, int | float)},
            )
            digest = policy_hash(gate)
            for d in decisions:
                record.append_event(
                    v.run_id,
                    "policy_decision",
                    "operator",
                    {
                        "scope": "release",
                        "version": version,
                        "policy_hash": digest,
                        **d.to_payload(),
                    },
                )
            denied = [d for d in decisions if not d.allowed]
            if denied and not force:
                _seal_if_possible(record, keys)
                raise PolicyViolation(denied)
            if denied:
                record.append_event(
                    v.run_id,
                    "release_override",
                    "operator",
                    {
                        "version": version,
                        "policy_hash": digest,
                        "denials": [d.to_payload() for d in denied],
                    },
                )
            _seal_if_possible(record, keys)
        record.export_version(version, out_file)
    out.print(f"wrote {out_file} (sha256 {v.sha256}, verified)")


def _seal_if_possible(record: SqlRecord, keys: Path | None) -> None:
    """Seal the new events with the coordinator's key when it is given (else verify reports them unsealed)."""
    if keys is None:
        return
    from server.record import KeyPaths, load_private_key

    record.seal(load_private_key(KeyPaths.in_dir(keys).private_key))


@models_app.command("tag")
@one_line_errors
def tag_cmd(
    version: Annotated[int, typer.Argument(help="Version number.")],
    tag: Annotated[str, typer.Argument(help="Tag to add, e.g. released.")],
    db: DbOption,
) -> None:
    """Add a tag to a version (recorded in the audit log)."""
    with _open(db) as record:
        v = record.tag_version(version, tag)
    out.print(f"version {v.version}: tags {', '.join(v.tags)}")


# ----------------------------------------------------------------- keys


@one_line_errors
def keys_cmd(
    directory: Annotated[Path, typer.Argument(help="Where to write audit.key and audit.pub.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key pair.")] = False,
) -> None:
    """Create the server's Ed25519 audit-signing key pair (private key mode 0600)."""
    paths = create_keypair(directory, force=force)
    out.print(f"private key {paths.private_key} (0600, keep it on the server)")
    out.print(f"public key  {paths.public_key} (give it to sites and auditors)")
