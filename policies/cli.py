"""``policy`` commands, mounted by the lead into ``fedseal-server`` and ``fedseal-client``.

``policy check FILE [--kind server|site|auto]`` exits 0 and prints one line
summarising a valid policy (with its hash), or exits 2 and prints every
problem as ``FILE: field: problem`` on standard error.
``policy default server|site`` prints the shipped default policy file, a
documented starting point.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

import typer

from policies.cli_errors import report_policy_problems
from policies.loading import (
    PolicyFileError,
    PolicyKind,
    default_server_policy_path,
    default_site_policy_path,
    load_policy,
    policy_hash,
)
from policies.models import Policy, ServerPolicy

EXIT_INVALID = 2

policy_app = typer.Typer(
    name="policy",
    help="Check and show policy files (TOML).",
    no_args_is_help=True,
    add_completion=False,
)


class KindOption(StrEnum):
    """Which kind of policy a file holds."""

    auto = "auto"
    server = "server"
    site = "site"


class DefaultKind(StrEnum):
    """Which default policy to print."""

    server = "server"
    site = "site"


_KINDS: dict[KindOption, PolicyKind | Literal["auto"]] = {
    KindOption.auto: "auto",
    KindOption.server: "server",
    KindOption.site: "site",
}


@policy_app.callback()
def _policy_group() -> None:
    """Policies as code: validate files before a run uses them."""


def summarize(policy: Policy) -> str:
    """A one-line summary of a valid policy, with its hash."""
    digest = policy_hash(policy)[:16]
    if isinstance(policy, ServerPolicy):
        adm = policy.admission
        admission = (
            "open admission"
            if adm.mode == "open"
            else f"allow-list of {len(adm.node_ids)} node ids and {len(adm.public_keys)} keys"
        )
        sa = policy.secure_aggregation
        secagg = (
            f"secure aggregation required (threshold >= {sa.min_threshold})"
            if sa.required
            else "secure aggregation optional"
        )
        dp = policy.central_dp
        cap = (
            ""
            if dp.max_client_epsilon is None
            else f", client epsilon <= {dp.max_client_epsilon:g}"
        )
        central = ("central DP required" if dp.required else "central DP optional") + cap
        rounds = policy.rounds.max_rounds
        energy = policy.energy.max_kwh_per_run
        parts = [
            admission,
            secagg,
            central,
            f"min {policy.rounds.min_sites} sites/round",
            "no round limit" if rounds is None else f"max {rounds} rounds",
            "no energy budget" if energy is None else f"energy <= {energy:g} kWh",
        ]
        kind = "server"
    else:
        p, r, t = policy.privacy, policy.rounds, policy.trust
        parts = [
            f"record-level epsilon budget {p.epsilon_budget:g} at delta {p.delta:g}",
            "DP-SGD required" if p.require_dp else "DP-SGD optional",
            "secure aggregation required"
            if r.require_secure_aggregation
            else "secure aggregation optional",
            f"min cohort {r.min_cohort_size}",
            f"max {r.max_local_epochs} local epochs",
            "server key pinned" if t.server_key is not None else "no server key pinned",
            "roster authority pinned"
            if t.roster_authority is not None or t.roster_digest is not None
            else "no roster authority pinned",
        ]
        kind = "site"
    return f"OK: {kind} policy {policy.name!r} (sha256 {digest}...): " + "; ".join(parts)


@policy_app.command("check")
def check_command(
    file: Annotated[Path, typer.Argument(help="The policy file (TOML).")],
    kind: Annotated[
        KindOption, typer.Option("--kind", help="server, site, or auto (from the file).")
    ] = KindOption.auto,
) -> None:
    """Validate FILE: exit 0 with a summary, or exit 2 listing every problem."""
    try:
        policy = load_policy(file, _KINDS[kind])
    except PolicyFileError as exc:
        report_policy_problems(exc, str(file))
        raise typer.Exit(EXIT_INVALID) from None
    typer.echo(summarize(policy))


@policy_app.command("default")
def default_command(
    kind: Annotated[DefaultKind, typer.Argument(help="server or site.")],
) -> None:
    """Print the shipped default policy of KIND (a documented starting point)."""
    path = (
        default_server_policy_path() if kind is DefaultKind.server else default_site_policy_path()
    )
    typer.echo(path.read_text(encoding="utf-8"), nl=False)
