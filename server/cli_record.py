"""``fedseal-server audit|models|keys``: command-line access to the central record.

Mounted into ``fedseal-server`` by ``server.cli``::

    app.add_typer(audit_app, name="audit")
    app.add_typer(models_app, name="models")
    app.command("keys")(keys_cmd)

Exit codes: 0 success; 1 a check failed or the record cannot be used
(missing database, bad URL, newer schema, altered artifact); 2 bad
arguments or configuration. Errors are one line, never a traceback.

The coordinator is not trusted, so neither is anything the record says
about itself:

* ``audit verify`` needs the verifier's own copy of the key
  (``--public-key``); checking against the key stored in the record takes
  an explicit ``--trust-stored-key`` and prints a warning. ``--witness``
  adds the heads sites witnessed, which is what catches a tail cut.
* Every command that appends to the audit log (``models tag``, ``models
  export --policy``, ``audit rotate-key``) seals what it appends with the
  record's key in force (``--keys DIR``), or refuses in one line before
  writing anything, to the record or to any key directory: an unsealed tail,
  or one sealed by another key, would make every later ``audit verify`` fail.
* ``audit rotate-key`` is the only way to change the signing key
  (:mod:`server.record.rotation`).
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
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from rich.console import Console
from rich.table import Table

from common.audit.seal import SignedHead, VerifyReport, public_key_from_hex
from common.audit.witness import WITNESS_FILE, parse_witness_lines, verify_with_witnesses
from common.errors import ConfigurationError, IntegrityError, RecordError
from policies.cli_errors import EXIT_FAILED, err_console, one_line_errors
from server.record import ModelVersion, SqlRecord, rotate_signing_key, signing_key_for
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
KeysOption = Annotated[
    Path | None,
    typer.Option(
        "--keys",
        help="The audit-signing key directory (audit.key): what this command appends is sealed.",
    ),
]


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


def _read_witness(path: Path) -> list[SignedHead]:
    """The heads in a site's witness file (or the one in a site state directory)."""
    file = path / WITNESS_FILE if path.is_dir() else path
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigurationError(f"cannot read witness file {file}: {exc.strerror}") from None
    heads = parse_witness_lines(lines, str(file))
    if not heads:
        raise ConfigurationError(f"no witnessed heads in {file}")
    return heads


def _check_witnessed(
    record: SqlRecord,
    report: VerifyReport,
    heads: list[SignedHead],
    key: Ed25519PublicKey | None,
) -> VerifyReport:
    """Fold the sites' witnessed heads into a passing verdict (a tail cut shows here)."""
    if not report.ok or not heads:
        return report
    if key is None:  # no seal in the record at all, yet sites were sent heads
        newest = max(h.seq for h in heads)
        return VerifyReport(
            False,
            report.n_events,
            report.n_seals,
            min(report.n_events + 1, newest),
            f"tampered: sites witnessed heads up to seq {newest}, but the record has no seal",
        )
    return verify_with_witnesses(record.events(), record.seals(), heads, key, record.record_id)


@audit_app.command("verify")
@one_line_errors
def verify_cmd(
    db: DbOption,
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key",
            help="The server's audit public key as you received it (audit.pub); rotations "
            "recorded in the log are followed from it.",
        ),
    ] = None,
    trust_stored_key: Annotated[
        bool,
        typer.Option(
            "--trust-stored-key",
            help="Check seals against the key stored in the record itself (the coordinator's "
            "own copy; catches corruption, not a forger). Prints a warning.",
        ),
    ] = False,
    witness: Annotated[
        list[Path] | None,
        typer.Option(
            "--witness",
            help="A site's witnessed-heads.jsonl (or its state directory); repeatable. A record "
            "shorter than, or different from, any witnessed head fails.",
        ),
    ] = None,
) -> None:
    """Recompute the audit hash chain and check every seal; exit 1 naming the first bad event.

    Needs the trusted key (--public-key), or --trust-stored-key explicitly.
    """
    if public_key is not None and trust_stored_key:
        raise ConfigurationError("--public-key and --trust-stored-key exclude each other")
    if public_key is None and not trust_stored_key:
        raise ConfigurationError(
            "audit verify needs the trusted key: pass --public-key audit.pub (your own copy), "
            "or --trust-stored-key to trust the record's copy of it"
        )
    key = load_public_key(public_key) if public_key is not None else None
    heads = [h for path in witness or [] for h in _read_witness(path)]
    with _open(db) as record:
        if key is not None:
            report = record.verify(key)
        else:
            err_console.print(
                "[bold red]WARNING:[/bold red] --trust-stored-key checks the seals against the "
                "coordinator's own copy of its key, stored in the record being checked: whoever "
                "can rewrite the record can replace it too; pass --public-key to rule that out",
                highlight=False,
                soft_wrap=True,
            )
            report = record.verify_trusting_stored_key()
            stored = record.stored_public_keys()
            key = public_key_from_hex(stored[0]) if stored and report.ok else None
        report = _check_witnessed(record, report, heads, key)
    out.print(report.summary())
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)
    if heads:
        out.print(
            f"witnessed: all {len(heads)} heads from {len(witness or [])} site file(s) "
            f"are in the record (up to seq {max(h.seq for h in heads)})"
        )


@audit_app.command("rotate-key")
@one_line_errors
def rotate_key_cmd(
    db: DbOption,
    keys: Annotated[
        Path | None,
        typer.Option("--keys", help="The audit-signing key directory (audit.key) to rotate."),
    ] = None,
) -> None:
    """Rotate the audit-signing key: a key_rotated event sealed by the old key, then the new key.

    The old pair is kept as audit.key.<n>/audit.pub.<n>. Verifiers keep the key
    they trust; `audit verify` follows the rotation from it. An interrupted
    rotation is finished by running the command again.
    """
    if keys is None:
        raise ConfigurationError(
            "audit rotate-key appends key_rotated, sealed by the retiring key: pass --keys DIR "
            "(the directory holding the record's audit-signing key in force)"
        )
    with _open(db) as record:
        rotation = rotate_signing_key(record, keys)
    where = (
        f"retired pair kept as {rotation.archived.private_key.name}/"
        f"{rotation.archived.public_key.name}"
        if rotation.archived is not None
        else "retired pair already archived"
    )
    done = "finished an interrupted rotation: " if rotation.completed_earlier_attempt else ""
    out.print(
        f"{done}key_rotated at seq {rotation.seq}, sealed by the retiring key; new key "
        f"{keys / 'audit.pub'} ({rotation.new_key_hex[:16]}...), {where}"
    )
    out.print(
        "verifiers keep the key they already trust: `audit verify` follows the rotation from it"
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
            # how many site-rounds trained: withheld under client-level DP (server.results)
            "reports": None if v.client_level_epsilon is not None else len(energy),
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
    source = "" if e["reports"] is None else f" from {e['reports']} site reports"
    out.print(f"  {_fmt(e['kwh'])} kWh, {_fmt(e['co2eq_g'])} gCO2eq{source}{flag}")


def _sealing_key(record: SqlRecord, keys: Path | None, what: str) -> Ed25519PrivateKey:
    """The key that seals what ``what`` appends; refuses before anything is written.

    Defends the record against **commands that break it**: an event appended
    without a seal leaves an unsealed tail that fails every later
    ``audit verify``, and one sealed with a key the record does not have in
    force fails it too (:func:`server.record.signing_key_for`).
    """
    if keys is None:
        raise ConfigurationError(
            f"{what} appends to the audit log, which must be sealed: pass --keys DIR "
            "(the audit-signing key directory)"
        )
    return signing_key_for(record, keys)


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
    keys: KeysOption = None,
) -> None:
    """Write a version's model bytes after verifying their SHA-256 (refuses a mismatch).

    With --policy, the release gate decides first; every decision is recorded
    in the audit log and sealed (--keys is required), and a denial stops the
    export unless --force is given (the override is recorded too).
    """
    from common.errors import PolicyViolation
    from policies import check_release, load_server_policy, policy_hash

    with _open(db) as record:
        v = record.get_version(version)
        if policy is not None:
            gate = load_server_policy(policy)
            key = _sealing_key(record, keys, "models export --policy")
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
            if denied and force:
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
            record.seal(key)
            if denied and not force:
                raise PolicyViolation(denied)
        record.export_version(version, out_file)
    out.print(f"wrote {out_file} (sha256 {v.sha256}, verified)")


@models_app.command("tag")
@one_line_errors
def tag_cmd(
    version: Annotated[int, typer.Argument(help="Version number.")],
    tag: Annotated[str, typer.Argument(help="Tag to add, e.g. released.")],
    db: DbOption,
    keys: KeysOption = None,
) -> None:
    """Add a tag to a version (recorded in the audit log and sealed; --keys is required)."""
    with _open(db) as record:
        key = _sealing_key(record, keys, "models tag")
        v = record.tag_version(version, tag, actor="operator")
        record.seal(key)
    out.print(f"version {v.version}: tags {', '.join(v.tags)}")


# ----------------------------------------------------------------- keys


@one_line_errors
def keys_cmd(
    directory: Annotated[Path, typer.Argument(help="Where to write audit.key and audit.pub.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key pair.")] = False,
) -> None:
    """Create the server's Ed25519 audit-signing key pair (private key mode 0600).

    To change the key of a record that already has seals, use `audit rotate-key`.
    """
    paths = create_keypair(directory, force=force)
    out.print(f"private key {paths.private_key} (0600, keep it on the server)")
    out.print(f"public key  {paths.public_key} (give it to sites and auditors)")
