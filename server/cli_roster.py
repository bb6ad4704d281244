"""``fedseal-server roster``: the roster authority's commands (make, edit, sign, show a roster).

The roster authority need not be the coordinator: these commands run
wherever its key is kept. The workflow::

    fedseal-server roster init --authority-key authority.key --federation demo --roster roster.json
    fedseal-server roster add --roster roster.json --name site-a --identity-key HEX \\
        --node-auth-key site-a.pub
    fedseal-server roster sign --roster roster.json --authority-key authority.key \\
        --coordinator-key keys/audit.pub
    fedseal-server roster show --roster roster.json

``add`` and ``remove`` leave an **unsigned draft** (which no site accepts);
``sign`` is always an explicit step and gives the next version. Each site
pins the authority's public key (printed by ``init``, kept as
``AUTHORITY.pub``) as ``trust.roster_authority`` in its policy.
``auth-keys`` writes the members' node-authentication keys as ``*.pub``
files for ``fedseal-server start --auth-keys DIR`` (Flower 1.41 registers
node keys one by one; its CSV allow-list option is deprecated).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from common.errors import ConfigurationError
from common.roster import (
    Roster,
    RosterDraft,
    RosterMember,
    key_fingerprint,
    load_roster,
    load_roster_draft,
)
from policies.cli_errors import one_line_errors
from policies.keys import canonical_node_key, parse_ed25519_public_key

__all__ = ["roster_app"]

roster_app = typer.Typer(
    help="The federation roster: site identities signed by the roster authority.",
    no_args_is_help=True,
    add_completion=False,
)
out = Console(soft_wrap=True, highlight=False)

RosterFile = Annotated[Path, typer.Option("--roster", help="The roster file (JSON).")]
AuthorityKey = Annotated[
    Path,
    typer.Option(
        "--authority-key",
        help="The roster authority's private key (PEM, 0600; AUTHORITY.pub beside it).",
    ),
]


def _public_path(private: Path) -> Path:
    return private.with_name(private.name + ".pub")


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"cannot write {path}: {exc.strerror or exc}") from None


def _read_public_key(path: Path, what: str) -> bytes:
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read {what} {path}: {exc}") from None
    try:
        return parse_ed25519_public_key(text)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{what} {path}: {exc}") from None


@roster_app.command("init")
@one_line_errors
def init_cmd(
    authority_key: AuthorityKey,
    federation: Annotated[str, typer.Option(help="The federation's name.")],
    roster: Annotated[
        Path, typer.Option("--roster", help="The draft roster to create (no members yet).")
    ] = Path("roster.json"),
) -> None:
    """Make the roster authority's Ed25519 key pair and an empty draft roster.

    Refuses to overwrite an existing key or roster. Prints the authority's
    public key: every site pins it as trust.roster_authority in its policy.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from server.record.keys import KeyPaths, write_keypair

    if roster.exists():
        raise ConfigurationError(f"{roster} already exists; refusing to overwrite it")
    draft = RosterDraft(federation)  # a bad name fails before any key is made
    key = Ed25519PrivateKey.generate()
    write_keypair(KeyPaths(authority_key, _public_path(authority_key)), key)
    _write(roster, draft.to_json())
    raw = key.public_key().public_bytes_raw()
    out.print(f"roster authority key {authority_key} (0600, keep it away from the coordinator)")
    out.print(f"draft roster {roster} for federation {federation!r}")
    typer.echo(f'sites pin, in their policy [trust]: roster_authority = "{raw.hex()}"')


@roster_app.command("add")
@one_line_errors
def add_cmd(
    roster: RosterFile,
    name: Annotated[str, typer.Option(help="The site's name in the roster.")],
    identity_key: Annotated[
        str,
        typer.Option(
            help="The site's identity public key, 64 hex digits (`fedseal-client identity show`)."
        ),
    ],
    node_auth_key: Annotated[
        Path | None,
        typer.Option(
            help="The site's node-authentication public key file (`fedseal-client keys`, .pub)."
        ),
    ] = None,
) -> None:
    """Add a site to the roster; the result is an unsigned draft until `roster sign`."""
    draft = load_roster_draft(roster)
    try:
        identity = parse_ed25519_public_key(identity_key)
    except ConfigurationError as exc:
        raise ConfigurationError(f"--identity-key: {exc}") from None
    auth = None
    if node_auth_key is not None:
        try:
            auth = canonical_node_key(node_auth_key.read_bytes())
        except OSError as exc:
            raise ConfigurationError(f"cannot read {node_auth_key}: {exc.strerror}") from None
        except ConfigurationError as exc:
            raise ConfigurationError(f"{node_auth_key}: {exc}") from None
    draft = draft.with_member(RosterMember(name, identity, auth))
    _write(roster, draft.to_json())
    out.print(
        f"added {name} (identity {key_fingerprint(identity)}) to {roster}: "
        f"{len(draft.members)} members, UNSIGNED draft (run `fedseal-server roster sign`)"
    )


@roster_app.command("remove")
@one_line_errors
def remove_cmd(
    roster: RosterFile,
    name: Annotated[str, typer.Option(help="The site to remove.")],
) -> None:
    """Remove a site from the roster; the result is an unsigned draft until `roster sign`."""
    draft = load_roster_draft(roster).without_member(name)
    _write(roster, draft.to_json())
    out.print(f"removed {name} from {roster}: UNSIGNED draft (run `fedseal-server roster sign`)")


@roster_app.command("sign")
@one_line_errors
def sign_cmd(
    roster: RosterFile,
    authority_key: AuthorityKey,
    coordinator_key: Annotated[
        Path | None,
        typer.Option(
            help="The coordinator's audit public key (audit.pub, PEM or hex) for the roster to "
            "name; sites without trust.server_key then pin it. Default: the one already named."
        ),
    ] = None,
) -> None:
    """Sign the roster with the authority's key, as the next version (the file is replaced)."""
    from server.record.keys import load_private_key

    key = load_private_key(authority_key)
    coordinator = _read_public_key(coordinator_key, "coordinator key") if coordinator_key else None
    signed = load_roster_draft(roster).sign(key, coordinator_key=coordinator)
    _write(roster, signed.to_json())
    out.print(f"signed {roster}: {signed.summary()}")


@roster_app.command("show")
@one_line_errors
def show_cmd(
    roster: RosterFile,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the roster file as JSON.")
    ] = False,
) -> None:
    """Show the roster: federation, version, digest, and each member's key fingerprints.

    A signed roster is checked against the authority it names (intact and
    self-consistent; sites check it against the authority they pin).
    """
    signed: Roster | None = None
    try:
        signed = load_roster(roster, authority_key=None)
        draft = RosterDraft.of(signed)
    except ConfigurationError:
        draft = load_roster_draft(roster)  # a draft, or a broken file (which fails here)
    if json_out:
        typer.echo((signed or draft).to_json(), nl=False)
        return
    table = Table(title=f"federation {draft.federation!r}")
    table.add_column("site")
    table.add_column("identity key (sha256)")
    table.add_column("node-auth key")
    for m in draft.members:
        auth = "-" if m.node_auth_key is None else m.node_auth_key.split()[0]
        if m.node_auth_key is not None:
            auth += " " + key_fingerprint(m.node_auth_key.encode())
        table.add_row(m.name, key_fingerprint(m.identity_key), auth)
    out.print(table)
    coordinator = (
        key_fingerprint(draft.coordinator_key) if draft.coordinator_key is not None else "none"
    )
    if signed is None:
        out.print(
            f"UNSIGNED draft (last signed version {draft.version}); coordinator key {coordinator}"
        )
        return
    out.print(f"version {signed.version}; coordinator key {coordinator}")
    out.print(f"signed by authority {signed.authority_key.hex()}")
    out.print(f"sha256 {signed.digest().hex()}")


@roster_app.command("auth-keys")
@one_line_errors
def auth_keys_cmd(
    roster: RosterFile,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Directory for <site>.pub (for `start --auth-keys DIR`).")
    ],
) -> None:
    """Write each member's node-authentication key as OUT/<site>.pub: the SuperLink allow-list."""
    signed = load_roster(roster, authority_key=None)
    keyed = [m for m in signed.members if m.node_auth_key is not None]
    if not keyed:
        raise ConfigurationError(f"roster {roster} lists no node-authentication keys")
    out_dir.mkdir(parents=True, exist_ok=True)
    for m in keyed:
        _write(out_dir / f"{m.name}.pub", f"{m.node_auth_key}\n")
    out.print(
        f"wrote {len(keyed)} node keys to {out_dir} (give it to `fedseal-server start --auth-keys`)"
    )
