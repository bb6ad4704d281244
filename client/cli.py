"""``fedseal-client``: the site agent's command line."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from common.env import apply_safe_flower_env
from common.errors import ConfigurationError
from policies.cli_errors import one_line_errors

if TYPE_CHECKING:
    from common.data import Dataset

app = typer.Typer(
    name="fedseal-client",
    help="The fedseal site agent: joins a coordinator's federation with this site's data.",
    no_args_is_help=True,
    add_completion=False,
)
out = Console()

from client.cli_ledger import ledger_app  # noqa: E402
from policies.cli import policy_app  # noqa: E402

app.add_typer(ledger_app, name="ledger", help="This site's privacy ledger.")
app.add_typer(policy_app, name="policy", help="Check policy files.")
identity_app = typer.Typer(
    help="This site's Ed25519 identity key (its public half goes into the federation roster).",
    no_args_is_help=True,
)
app.add_typer(identity_app, name="identity")
SiteStateDir = Annotated[
    Path,
    typer.Option(
        help="The site agent's state directory (as for `start`); the key is in its site/ folder."
    ),
]


@app.command("keys")
@one_line_errors
def keys_cmd(
    path: Annotated[
        Path, typer.Argument(help="Private key file to create; the public key gets .pub.")
    ],
    force: Annotated[bool, typer.Option(help="Replace existing files.")] = False,
) -> None:
    """Create this site's node-authentication key pair (send the .pub file to the coordinator)."""
    from common.pki import make_node_key

    priv, pub = make_node_key(path, force=force)
    out.print(f"private key {priv} (0600, stays here); public key {pub} (give to the coordinator)")


@identity_app.command("init")
@one_line_errors
def identity_init_cmd(state_dir: SiteStateDir = Path(".fedseal-site")) -> None:
    """Make this site's identity key (0600, never replaced); print the public key for the roster."""
    from client.identity import create_site_identity

    _, site_state = _site_state(state_dir)
    public = create_site_identity(site_state)
    typer.echo(
        f"site identity key created in {site_state} (0600, never leaves this site)", err=True
    )
    typer.echo("give the roster authority this public key (`roster add --identity-key`):", err=True)
    typer.echo(public.hex())


@identity_app.command("show")
@one_line_errors
def identity_show_cmd(state_dir: SiteStateDir = Path(".fedseal-site")) -> None:
    """Print this site's identity public key (64 hex digits; its fingerprint on stderr)."""
    from client.identity import identity_public_bytes, load_site_identity
    from common.roster import key_fingerprint

    _, site_state = _site_state(state_dir)
    public = identity_public_bytes(load_site_identity(site_state))
    typer.echo(public.hex())
    typer.echo(f"fingerprint {key_fingerprint(public)}", err=True)


@app.command("start")
@one_line_errors
def start_cmd(
    data: Annotated[
        Path, typer.Option(help="This site's data: CSV (header, label column) or NPZ.")
    ],
    superlink: Annotated[
        str, typer.Option(help="Coordinator SuperLink HOST:PORT.")
    ] = "127.0.0.1:9092",
    ca: Annotated[Path | None, typer.Option(help="Coordinator CA certificate (ca.crt).")] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Connect WITHOUT TLS (testing only).")
    ] = False,
    auth_key: Annotated[
        Path | None, typer.Option(help="Node-authentication private key (see `keys`).")
    ] = None,
    label_column: Annotated[str, typer.Option(help="Name of the label column.")] = "label",
    dataset_id: Annotated[
        str | None,
        typer.Option(
            help="This dataset's identity, which its lifetime privacy budget is bound to "
            "(1-64 of A-Z a-z 0-9 . _ -): keep it when the file is edited or moved, change it "
            "only for other data. Without it the id is the file's name and content hash, so "
            "any edit would start a new budget: DP rounds are then refused, and `start` "
            "refuses a policy that requires DP."
        ),
    ] = None,
    feature_bounds: Annotated[
        str | None,
        typer.Option(
            help="Public bounds of the features, for scaling without a leak: LOW:HIGH for "
            "every feature, L1:H1,L2:H2,... one pair per feature, or a file of LOW:HIGH "
            "lines. Under DP a site file needs them, unless the site policy sets "
            "privacy.allow_private_scaling (then standardised on the site's own records, "
            "outside the accountant, and the run says so)."
        ),
    ] = None,
    dp_size_noise: Annotated[
        float | None,
        typer.Option(
            help="Std of the noise on this dataset's size, released once (charged to its "
            "budget) so DP plans never depend on the true count. Default 20: eps 0.16 "
            "alone, about +0.01 on a DP-SGD history (PLD, delta 1e-5).",
            min=0.01,
        ),
    ] = None,
    port: Annotated[
        int, typer.Option(help="Local port of the SuperNode's ClientAppIo API.")
    ] = 9094,
    state_dir: Annotated[Path, typer.Option(help="SuperNode state and logs.")] = Path(
        ".fedseal-site"
    ),
    max_retries: Annotated[
        int,
        typer.Option(
            min=0,
            help="Connection retries, waiting for the SuperLink at start and when it is lost "
            "(0 = forever).",
        ),
    ] = 0,
    max_wait_time: Annotated[
        float,
        typer.Option(min=0.0, help="Give up connecting after this many seconds (0 = no limit)."),
    ] = 0.0,
    keep_running: Annotated[
        bool,
        typer.Option(
            "--keep-running",
            help="Stay connected for further runs (default: exit 0 when the run ends).",
        ),
    ] = False,
    policy: Annotated[
        Path | None,
        typer.Option(
            help="This site's policy (TOML): budget, cohort, trusted server key... "
            "(default: the shipped default site policy, `fedseal-client policy default site`)."
        ),
    ] = None,
    server_key: Annotated[
        Path | None,
        typer.Option(
            help="The coordinator's audit public key (audit.pub, PEM or hex) to pin: "
            "every instruction must be signed by it."
        ),
    ] = None,
    roster: Annotated[
        Path | None,
        typer.Option(
            help="The federation roster (from the roster authority): verified under the "
            "policy's trust.roster_authority (or trust.roster_digest), never older than the "
            "one installed before; it must list this site's identity key."
        ),
    ] = None,
    cold_clientapp: Annotated[
        bool,
        typer.Option(
            "--cold-clientapp",
            help="Start every message's ClientApp as a new flwr-clientapp process (Flower's "
            "own way) instead of forking it from a template with its imports done "
            "(default: forked, seconds faster per message; still one process per message).",
        ),
    ] = False,
) -> None:
    """Start a Flower SuperNode whose fedseal ClientApp trains on --data.

    The site's policy (--policy, else the shipped default) is validated and put
    in force before anything connects; one line names it and its hash. With a
    pinned coordinator key (--server-key, or trust.server_key in the policy, or
    the coordinator key the verified --roster names) the site refuses every
    instruction not signed by it. With --roster, the roster is verified and put
    in force likewise (one line names federation, version and digest).

    TLS is on unless --insecure is given: one TLS handshake under --ca (chain
    and host name checked) comes first, and a failure is one line naming its
    cause. A SuperLink that is not up yet is waited for (--max-retries,
    --max-wait-time). Each message's ClientApp is a fresh process forked from a
    template that has its imports done (client.warm_exec; --cold-clientapp for
    Flower's own process start). The site exits 0 when its run ends (after the run's
    final audit head is witnessed) unless --keep-running is given, and on
    SIGTERM or Ctrl-C (its SuperNode is stopped within about a second).
    """
    apply_safe_flower_env()
    from client.link_probe import load_ca, wait_for_superlink
    from client.site_policy import install_site_policy
    from client.supernode import run_supernode
    from common.processes import check_port_free, flower_env, flower_executable

    if ca is None and not insecure:
        raise typer.BadParameter("give --ca (the coordinator's ca.crt) or --insecure explicitly")
    tls = load_ca(ca) if ca is not None else None  # an unreadable CA: one line, at once
    if not data.is_file():
        raise ConfigurationError(f"site data file not found: {data}")
    if auth_key is not None and not auth_key.is_file():
        raise ConfigurationError(f"node key not found: {auth_key}")
    state_dir, site_state = _site_state(state_dir)
    # A broken policy fails here (every problem listed, as `policy check`), before any connection.
    installed = install_site_policy(policy, site_state)
    typer.echo(installed.summary())
    dataset = _check_site_data(data, label_column, site_state)
    data_config = _data_config(dataset, dataset_id, feature_bounds, installed.path)
    roster_config = _roster_config(roster, site_state, installed.path)
    check_port_free("127.0.0.1", port)
    node_config = node_config_text(
        {
            "data-path": str(data.resolve()),
            "label-column": label_column,
            "state-dir": str(site_state),
            "policy-path": str(installed.path),
            "policy-hash": installed.hash,
            **data_config,
            **({} if dp_size_noise is None else {"dp-size-noise": str(dp_size_noise)}),
            **roster_config,
            **_trust_config(installed.path, server_key),
        }
    )
    argv = [
        flower_executable("flower-supernode"),
        "--superlink",
        superlink,
        "--node-config",
        node_config,
        "--port",
        str(port),
    ]
    if max_retries:
        argv += ["--max-retries", str(max_retries)]
    if max_wait_time:
        argv += ["--max-wait-time", str(max_wait_time)]
    argv += ["--insecure"] if ca is None else ["--root-certificates", str(ca.resolve())]
    if auth_key is not None:
        argv += ["--auth-supernode-private-key", str(auth_key.resolve())]

    with _stop_requests() as requested:
        reached = wait_for_superlink(
            superlink,
            tls,
            ca,
            max_retries=max_retries,
            max_wait_s=max_wait_time,
            progress=lambda line: typer.echo(line, err=True),
            stopped=lambda: bool(requested),
        )
        ending = None
        if reached:
            checked = f"TLS verified under {ca}" if ca is not None else "INSECURE, no TLS"
            typer.echo(f"SuperLink at {superlink} answers ({checked})")
            env = flower_env(state_dir / "flwr")
            if not cold_clientapp:
                from client.warm_exec import warm_env

                env = warm_env(env, state_dir / "flwr" / "bin")
            ending = run_supernode(
                argv,
                env,
                site_state=site_state,
                superlink=superlink,
                auth_key=auth_key,
                keep_running=keep_running,
                stopped=lambda: bool(requested),
                started=lambda pid: out.print(
                    f"SuperNode started (pid {pid}), connecting to {superlink}; Ctrl-C to stop"
                ),
            )
    if ending is not None and ending.reason == "run-finished":
        typer.echo(
            f"run {ending.run_id} ended: SuperNode stopped, site exits "
            "(start it again for the next run, or use --keep-running)"
        )
        return
    if ending is not None and ending.reason == "exited":
        typer.echo("the SuperNode exited")
        return
    typer.echo("stopped on request")
    # The SuperNode and everything below it are gone. What is left is the interpreter's
    # teardown of the modules the policy checks imported (torch among them): seconds that
    # hold nothing, while a requested stop is due within 2 s.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextlib.contextmanager
def _stop_requests() -> Iterator[list[int]]:
    """SIGTERM and SIGINT noted in the yielded list (the loops act on it); handlers restored after.

    A handler only appends: stopping the SuperNode from inside a signal handler
    could interrupt the very code that starts or waits for it.
    """
    requested: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: requested.append(signum))
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


#: Labels are checked against the run's classes when a run asks; at start only that they
#: are non-negative integers (the task is not known yet).
ANY_LABEL = 2**31


def _data_config(
    dataset: Dataset, dataset_id: str | None, bounds: str | None, policy_path: Path
) -> dict[str, str]:
    """The node-config entries declaring the dataset's identity and public feature bounds.

    Checked now, in one line each: an id outside its alphabet, bounds that
    do not parse or do not match the file's feature count, and no id under
    a policy that requires DP (its budget would restart with every edit).
    """
    from client.site import (
        NODE_CONFIG_DATASET_ID,
        NODE_CONFIG_FEATURE_BOUNDS,
        check_dataset_id,
    )
    from common.data import FeatureBounds
    from policies import load_site_policy

    node: dict[str, str] = {}
    if dataset_id is not None:
        node[NODE_CONFIG_DATASET_ID] = check_dataset_id(dataset_id)
    elif load_site_policy(policy_path).privacy.require_dp:
        raise ConfigurationError(
            "the site policy requires DP: give --dataset-id NAME, the identity this data's "
            "lifetime privacy budget is bound to (the file's content hash changes with every edit)"
        )
    else:
        typer.echo(
            "warning: no --dataset-id: the dataset id is the file's name and content hash, so an "
            "edit of the file would start a new privacy budget; this site refuses DP rounds",
            err=True,
        )
    if bounds is not None:
        source = Path(bounds)
        text = source.read_text(encoding="utf-8") if source.is_file() else bounds
        lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
        parsed = FeatureBounds.parse(",".join(ln for ln in lines if ln))
        parsed.for_features(dataset.num_features)  # per-feature bounds: one pair per column
        node[NODE_CONFIG_FEATURE_BOUNDS] = parsed.text()
    return node


def _check_site_data(data: Path, label_column: str, site_state: Path) -> Dataset:
    """Parse the site's file now, into the cache its ClientApp processes map (one line if bad).

    A malformed file (no label column, non-numeric cells, NaN, ragged rows)
    is found here, before anything connects, so nothing about it ever
    reaches the coordinator; the run's own checks (feature count, label
    range) come at admission. The summary line stays on this terminal.
    """
    from client.state import DATA_CACHE_DIR, private_dir
    from common.data_cache import load_site_file_cached

    dataset = load_site_file_cached(
        data,
        cache_root=private_dir(site_state / DATA_CACHE_DIR),
        num_classes=ANY_LABEL,
        label_column=label_column,
    )
    typer.echo(
        f"site data: {data} ({len(dataset)} rows, {dataset.num_features} features, "
        f"labels {int(dataset.y.min())}..{int(dataset.y.max())}; parsed once, cached privately)",
        err=True,
    )
    return dataset


def _site_state(state_dir: Path) -> tuple[Path, Path]:
    """The SuperNode's state dir and the site's private state inside it (``site/``), both 0700."""
    from client.state import private_dir

    top = private_dir(state_dir.resolve())  # 0700; refused if shared or another user's
    return top, private_dir(top / "site")


def _roster_config(roster: Path | None, site_state: Path, policy_path: Path) -> dict[str, str]:
    """Put ``roster`` in force (verified, version checked) and name it in the node config.

    The site's identity key must be in the roster: a site that is not a
    member (or whose key was swapped) would fail every protocol-v3 round.
    """
    if roster is None:
        return {}
    from client.identity import identity_public_bytes, load_site_identity
    from client.site_roster import (
        NODE_CONFIG_ROSTER_HASH,
        NODE_CONFIG_ROSTER_PATH,
        install_site_roster,
    )
    from policies import load_site_policy

    if not roster.is_file():
        raise ConfigurationError(f"roster not found: {roster}")
    identity = identity_public_bytes(load_site_identity(site_state))
    installed = install_site_roster(roster, site_state, load_site_policy(policy_path), identity)
    member = installed.roster.member_by_identity(identity)
    typer.echo(f"{installed.summary()}; this site is {member.name if member else '?'!r}")
    return {
        NODE_CONFIG_ROSTER_PATH: str(installed.path),
        NODE_CONFIG_ROSTER_HASH: installed.roster.digest().hex(),
    }


def _trust_config(policy: Path, server_key: Path | None) -> dict[str, str]:
    """The node-config entry pinning the coordinator key, when given (checked now).

    The pin from ``--server-key`` and the policy's ``trust.server_key``, when
    both are given, must agree.
    """
    from client.instructions import NODE_CONFIG_SERVER_KEY, pinned_server_key
    from policies import load_site_policy
    from policies.models import canonical_server_key

    node: dict[str, str] = {}
    if server_key is not None:
        if not server_key.is_file():
            raise ConfigurationError(f"coordinator key not found: {server_key}")
        node[NODE_CONFIG_SERVER_KEY] = canonical_server_key(server_key.read_text(encoding="ascii"))
    pinned_server_key(node, load_site_policy(policy))
    return node


def node_config_text(values: dict[str, str]) -> str:
    """The SuperNode's ``--node-config`` string: ``key="value"`` pairs, one space apart.

    Flower reads each value as a TOML basic string between double quotes, so a
    value holding a double quote or a backslash could not arrive as written:
    it is refused rather than mangled (a policy path that silently became
    another path would leave the site under a policy it did not choose).
    """
    for key, value in values.items():
        if '"' in value or "\\" in value or "\n" in value:
            raise ConfigurationError(
                f"{key} {value!r} holds a double quote, backslash or newline; "
                "use a path without them"
            )
    return " ".join(f'{key}="{value}"' for key, value in values.items())


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()


audit_app = typer.Typer(
    help="Check the coordinator's audit history against what this site witnessed."
)
app.add_typer(audit_app, name="audit")


@audit_app.command("check")
@one_line_errors
def audit_check_cmd(
    record: Annotated[
        Path,
        typer.Option(
            help="The coordinator's export (`fedseal-server audit export --format jsonl`)."
        ),
    ],
    public_key: Annotated[
        Path, typer.Option(help="The coordinator's audit public key (audit.pub) this site trusts.")
    ],
    state_dir: Annotated[
        Path, typer.Option(help="This site's state directory (holds witnessed-heads.jsonl).")
    ] = Path(".fedseal-site") / "site",
) -> None:
    """Exit 0 if the export verifies under the trusted key and contains every head this site received.

    The whole exported history is checked (hash chain, every seal, key
    rotations followed from --public-key; the key in the export's header is
    ignored), then every witnessed head: a history cut before the newest head
    this site holds, or rewritten under it, fails, naming the seq.
    """
    from client.state import WITNESS_FILE
    from client.witness import read_heads
    from common.audit.export import parse_export
    from common.audit.seal import load_public_key_pem
    from common.audit.witness import verify_with_witnesses

    if not record.is_file():
        raise ConfigurationError(f"export not found: {record}")
    if not public_key.is_file():
        raise ConfigurationError(f"public key not found: {public_key}")
    trusted = load_public_key_pem(public_key.read_bytes())
    heads = read_heads(state_dir / WITNESS_FILE)
    if not heads:
        raise ConfigurationError(f"no witnessed heads in {state_dir / WITNESS_FILE}")
    export = parse_export(record.read_text(encoding="utf-8").splitlines())
    report = verify_with_witnesses(export.events, export.seals, heads, trusted, export.record_id)
    out.print(report.summary(), highlight=False)
    if not report.ok:
        raise typer.Exit(1)
    out.print(
        f"witnessed: all {len(heads)} heads this site received are in the history "
        f"(up to seq {max(h.seq for h in heads)})",
        highlight=False,
    )
