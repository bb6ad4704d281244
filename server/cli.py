"""``fedseal-server``: the coordinator's command line."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from common.config import RunConfig
from common.env import apply_safe_flower_env
from common.errors import ConfigurationError
from common.pki import CertPaths, make_certs
from policies.cli_errors import one_line_errors
from server.run_options import COORDINATOR_OPTIONS, with_run_options

if TYPE_CHECKING:
    from server.app import ServerSettings
    from server.deploy import LinkSettings
    from server.run_settings import DeploymentSettings, RosterInForce

app = typer.Typer(
    name="fedseal-server",
    help="The fedseal coordinator: TLS material, the SuperLink and the fedseal ServerApp.",
    no_args_is_help=True,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

# Options of `start` and `resume`, the two commands that run a SuperLink.
DEFAULT_STATE_DIR = Path(".fedseal-server")
CertsDir = Annotated[Path | None, typer.Option(help="Directory made by `fedseal-server certs`.")]
Insecure = Annotated[bool, typer.Option("--insecure", help="Run WITHOUT TLS (testing only).")]
ListenHost = Annotated[str, typer.Option(help="Address the SuperLink listens on.")]
StateDir = Annotated[Path, typer.Option(help="SuperLink state, logs and Flower home.")]
ResultDir = Annotated[Path | None, typer.Option("--out", help="Write result.json here.")]

# Sub-commands that live with their subject.
from policies.cli import policy_app  # noqa: E402
from server.cli_record import audit_app, keys_cmd, models_app  # noqa: E402
from server.cli_roster import roster_app  # noqa: E402

app.add_typer(audit_app, name="audit", help="Verify or export the tamper-evident audit log.")
app.add_typer(models_app, name="models", help="The model registry: list, show, export, tag.")
app.add_typer(policy_app, name="policy", help="Check policy files.")
app.add_typer(
    roster_app,
    name="roster",
    help="The federation roster: site identities, signed by its authority.",
)
app.command("keys", help="Create the coordinator's Ed25519 audit-signing key pair.")(keys_cmd)


@app.command("certs")
@one_line_errors
def certs_cmd(
    directory: Annotated[
        Path, typer.Argument(help="Where to write ca.crt/ca.key/server.crt/server.key.")
    ],
    host: Annotated[
        list[str], typer.Option("--host", help="DNS name or IP the sites dial (repeatable).")
    ] = ["localhost", "127.0.0.1"],  # noqa: B006 - typer needs a literal default
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
    force: Annotated[bool, typer.Option(help="Replace existing files.")] = False,
) -> None:
    """Create a private CA and a SuperLink server certificate (ECDSA P-384)."""
    paths = make_certs(directory, host, days=days, force=force)
    out.print(f"CA certificate   {paths.ca_cert}  (give this to the sites)")
    out.print(f"server cert/key  {paths.server_cert}, {paths.server_key} (0600)")


@app.command("start")
@one_line_errors
@with_run_options(COORDINATOR_OPTIONS)
def start_cmd(
    certs: CertsDir = None,
    insecure: Insecure = False,
    host: ListenHost = "0.0.0.0",
    port: Annotated[
        int, typer.Option(help="SuperLink port (Fleet, Control and ServerAppIo APIs).")
    ] = 9092,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    out_dir: ResultDir = None,
    db: Annotated[
        str | None,
        typer.Option(
            help="Central record: SQLAlchemy URL or SQLite path (default STATE_DIR/record.db)."
        ),
    ] = None,
    keys: Annotated[
        Path | None,
        typer.Option(
            help="Audit-signing key directory (default STATE_DIR/keys); make it first with "
            "`fedseal-server keys DIR`, it is never created implicitly."
        ),
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option(help="Coordinator policy (TOML); a run that violates it is refused."),
    ] = None,
    auth_keys: Annotated[
        Path | None,
        typer.Option(
            help="Directory of allowed site public keys (*.pub); enables node authentication."
        ),
    ] = None,
    roster: Annotated[
        Path | None,
        typer.Option(
            help="The federation roster (`fedseal-server roster sign`); it must verify and name "
            "this server's audit key, if it names one. Recorded with the run's start."
        ),
    ] = None,
    allow_no_dropout: Annotated[
        bool,
        typer.Option(
            "--allow-no-dropout",
            help="Run secure aggregation even when the expected cohort tolerates no dropout "
            "(e.g. 3 sites: one lost site then fails the round).",
        ),
    ] = False,
    *,
    run_config: RunConfig,
) -> None:
    """Start Flower's SuperLink and run the fedseal ServerApp on it until the run ends.

    TLS is on unless --insecure is given. Sites connect with `fedseal-client start`.
    The run configuration options are shared with `fedseal-sim run`; the sites bring
    their own data files. The deployment settings (TLS and certificate fingerprints,
    the node-key allow-list, the server policy's hash, the signing key) are recorded
    with the run's start (`run_settings`): `fedseal-server resume` is held to them.
    """
    apply_safe_flower_env()
    from server.app import ServerSettings
    from server.deploy import LinkSettings
    from server.preflight import check_record_db

    if certs is None and not insecure:
        raise typer.BadParameter(
            "give --certs DIR (see `fedseal-server certs`) or --insecure explicitly"
        )
    if certs is not None and insecure:
        raise typer.BadParameter("--certs and --insecure exclude each other")
    check_record_db(db, state_dir=state_dir)  # an unwritable --db: refused before any launch
    state = state_dir.resolve()
    deployment = _deployment(certs, auth_keys, policy)
    settings = LinkSettings(
        host=host,
        port=port,
        state_dir=state,
        certs=CertPaths.in_dir(certs) if certs is not None else None,
        auth_keys=_write_allow_list(deployment, state),
    )
    result_dir = (out_dir or state_dir / "runs").resolve()
    key_dir = (keys or settings.state_dir / "keys").resolve()
    server_settings = ServerSettings(
        db_url=_db_url(db, settings.state_dir),
        key_dir=key_dir,
        out_dir=result_dir,
        policy_path=policy.resolve() if policy is not None else None,
        deployment=deployment,
        roster_path=roster.resolve() if roster is not None else None,
    )
    out.print(f"run settings: {deployment.describe()}", soft_wrap=True, highlight=False)
    members = _print_roster(server_settings)
    if members and not run_config.wait_sites:
        run_config = dataclasses.replace(run_config, wait_sites=members)
    run_config = _planned_sites(run_config)
    if run_config.wait_sites:
        out.print(
            f"round 1 starts when {run_config.wait_sites} sites are connected "
            f"(--wait-sites; at most {run_config.wait_timeout_s:.0f} s, --wait-timeout)",
            highlight=False,
        )
    _check_dropout_tolerance(run_config, allow_no_dropout)
    before = set(_run_ids(server_settings.db_url))
    code = serve(settings, run_config, server_settings)
    _report_run_end(server_settings.db_url, before, code, result_dir, settings.state_dir)


#: ``fedseal-server start``'s exit codes beyond 0 (finished), 1 (error) and 2 (usage).
EXIT_RUN_ABORTED = 3  # the run ended aborted (failed rounds, a policy refusal at start, ...)
EXIT_RUN_UNFINISHED = 4  # the ServerApp stopped without ending its run (a crash)


def _run_ids(db_url: str | None) -> list[str]:
    """The run ids the record holds now, oldest first (none when there is no record yet)."""
    from common.errors import RecordError
    from server.record import SqlRecord

    if db_url is None:
        return []
    try:
        record = SqlRecord(db_url, create=False)
    except RecordError:
        return []
    with record:
        return [r.run_id for r in record.list_runs()]


def _report_run_end(
    db_url: str | None, before: set[str], code: int, result_dir: Path, state_dir: Path
) -> None:
    """Say how the run this ``start`` launched ended, from the record; exit accordingly.

    ``flwr run`` exits 0 even when the ServerApp failed, so the record is the
    judge: ``finished`` (exit 0; failed rounds listed), ``aborted`` (exit
    :data:`EXIT_RUN_ABORTED`, with the recorded reason), still ``running``
    (the ServerApp died: exit :data:`EXIT_RUN_UNFINISHED`; `resume` continues it),
    or no run at all (exit 1).
    """
    new = [run_id for run_id in _run_ids(db_url) if run_id not in before]
    if not new or db_url is None:
        from common.errors import FedsealError

        raise FedsealError(
            f"the ServerApp started no run (flwr exit code {code}): {_app_cause(state_dir)}"
        )
    _report_run(db_url, new[-1], code, result_dir, state_dir)


def _app_cause(state_dir: Path) -> str:
    """What stopped the ServerApp, from its kept output; else where to look."""
    from server.deploy import app_error

    cause = app_error(state_dir)
    return cause if cause is not None else f"see {state_dir / 'serverapp.log'}"


def _report_run(db_url: str, run_id: str, code: int, result_dir: Path, state_dir: Path) -> None:
    """How run ``run_id`` ended, from the record (see :func:`_report_run_end`); exits unless 0."""
    from server.record import SqlRecord

    with SqlRecord(db_url, create=False) as record:
        run = record.get_run(run_id)
        reason = next(
            (
                e.payload().get("reason")
                for e in reversed(record.events(run_id))
                if e.kind in ("run_finished", "run_aborted")
            ),
            None,
        )
    if run.status == "running":
        err.print(
            f"error: run {run.run_id} did not end (the ServerApp stopped: {_app_cause(state_dir)});"
            f" continue it with `fedseal-server resume {run.run_id}`",
            soft_wrap=True,
            highlight=False,
        )
        raise typer.Exit(EXIT_RUN_UNFINISHED)
    result = result_dir / "result.json"
    if result.is_file():
        doc = json.loads(result.read_text())
        if doc.get("run_id") == run.run_id:
            for r in doc["rounds"]:
                if r.get("failed"):
                    out.print(f"round {r['round']}: failed: {r['failure']}", soft_wrap=True)
                    continue
                counts = "" if r["participants"] is None else f" participants={r['participants']}"
                out.print(f"round {r['round']}: accuracy={r['accuracy']} loss={r['loss']}{counts}")
            out.print(f"results: {result}")
    if run.status != "finished":
        err.print(
            f"error: run {run.run_id} aborted: {reason or 'no reason recorded'}",
            soft_wrap=True,
            highlight=False,
        )
        raise typer.Exit(EXIT_RUN_ABORTED)
    out.print(
        f"run {run.run_id} finished" + (f" ({reason})" if reason else ""),
        soft_wrap=True,
        highlight=False,
    )


@app.command("report")
@one_line_errors
def report_cmd(
    run_id: Annotated[str, typer.Argument(help="The run to report on.")],
    db: Annotated[str, typer.Option(help="Central record: SQLAlchemy URL or SQLite path.")],
    out_dir: Annotated[
        Path, typer.Option("--out", help="Directory for the PNG plots and report.html.")
    ],
) -> None:
    """Write PNG plots (accuracy, epsilon, kWh per round) and a self-contained HTML summary."""
    from server.record import SqlRecord
    from server.report import write_report

    with SqlRecord(_db_url(db, Path.cwd()), create=False) as record:
        paths = write_report(record, run_id, out_dir)
    out.print(f"report written to {paths.html}")


@app.command("resume")
@one_line_errors
def resume_cmd(
    run_id: Annotated[
        str, typer.Argument(help="The interrupted run's id (see `fedseal-server models list`).")
    ],
    certs: CertsDir = None,
    insecure: Insecure = False,
    host: ListenHost = "0.0.0.0",
    port: Annotated[int, typer.Option(help="SuperLink port.")] = 9092,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    db: Annotated[
        str | None, typer.Option(help="Central record (default STATE_DIR/record.db).")
    ] = None,
    keys: Annotated[
        Path | None,
        typer.Option(help="Audit key directory (default STATE_DIR/keys); the run's existing key."),
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option(
            help="Coordinator policy; must be the run's (same hash). Default: the recorded path."
        ),
    ] = None,
    auth_keys: Annotated[
        Path | None,
        typer.Option(
            help="Allowed site public keys (*.pub); must be the run's allow-list. "
            "Default: the keys recorded at the run's start."
        ),
    ] = None,
    roster: Annotated[
        Path | None,
        typer.Option(
            help="The federation roster; must be the run's (same digest). Default: the recorded path."
        ),
    ] = None,
    out_dir: ResultDir = None,
) -> None:
    """Continue a run after the coordinator crashed: from its last model version, with its
    privacy accountant restored from the record and the audit chain continued (`resumed`).

    The run is relaunched with the settings recorded at its start: TLS with the same CA
    and server certificate, node authentication with the same allow-list, the same
    server policy (its decisions are recorded again) and the same audit-signing key.
    Anything missing or different is refused, in one line naming it, before any process
    starts.
    """
    apply_safe_flower_env()
    from server.app import ServerSettings
    from server.deploy import LinkSettings
    from server.preflight import check_record_db
    from server.record import KeyPaths, SqlRecord
    from server.record.keys import load_public_key
    from server.run_settings import (
        differences,
        recorded_roster,
        recorded_settings,
        require_recorded,
        signing_key_fingerprint,
    )

    if (certs is None) == (not insecure):
        raise typer.BadParameter("give exactly one of --certs DIR or --insecure")
    check_record_db(db, must_exist=True)  # before the record is opened or anything launches
    state = state_dir.resolve()
    db_url = _db_url(db, state)
    with SqlRecord(db_url, create=False) as record:
        info = record.get_run(run_id)
        events = record.events(run_id)
        recorded = recorded_settings(events)
        recorded_run_roster = recorded_roster(events)
    if info.status == "finished":
        raise ConfigurationError(f"run {run_id} already finished; nothing to resume")
    recorded = require_recorded(run_id, recorded)
    cfg = RunConfig(**info.config)
    if policy is None and recorded.policy_path is not None:
        if Path(recorded.policy_path).is_file():
            policy = Path(recorded.policy_path)
    if roster is None and recorded_run_roster is not None and recorded_run_roster.path:
        if Path(recorded_run_roster.path).is_file():
            roster = Path(recorded_run_roster.path)
    key_dir = (keys or state / "keys").resolve()
    public = KeyPaths.in_dir(key_dir).public_key
    problems = []
    signing = None
    if public.is_file():
        signing = signing_key_fingerprint(load_public_key(public))
    else:
        problems.append(
            f"audit signing key: {public} not found (the run is sealed with sha256 "
            f"{(recorded.signing_key_sha256 or '')[:16]}...); give --keys DIR"
        )
    offered = dataclasses.replace(
        _deployment(certs, auth_keys, policy, recorded if auth_keys is None else None),
        signing_key_sha256=signing,
        resumed=True,
    )
    problems += differences(recorded, offered)
    if problems:
        raise ConfigurationError(f"cannot resume run {run_id}: " + "; ".join(problems))
    roster_path = roster.resolve() if roster is not None else None
    _check_roster_resume(run_id, recorded_run_roster, roster_path, key_dir)
    settings = LinkSettings(
        host=host,
        port=port,
        state_dir=state,
        certs=CertPaths.in_dir(certs) if certs else None,
        auth_keys=_write_allow_list(offered, state),
        fresh_state=False,
    )
    result_dir = (out_dir or state / "runs").resolve()
    server_settings = ServerSettings(
        db_url=db_url,
        key_dir=key_dir,
        out_dir=result_dir,
        resume_run_id=run_id,
        policy_path=policy.resolve() if policy is not None else None,
        deployment=offered,
        roster_path=roster_path,
    )
    out.print(
        f"resuming run {run_id} with its recorded settings: {offered.describe()}",
        soft_wrap=True,
        highlight=False,
    )
    _print_roster(server_settings)
    code = serve(settings, cfg, server_settings)
    # `flwr run` may exit 0 when the ServerApp failed: the record says whether the run ended.
    _report_run(db_url, run_id, code, result_dir, settings.state_dir)


def _deployment(
    certs: Path | None,
    auth_keys: Path | None,
    policy: Path | None,
    recorded: DeploymentSettings | None = None,
) -> DeploymentSettings:
    """The deployment settings a launch is about to use (``server.run_settings``).

    The allow-list is the ``*.pub`` keys of ``auth_keys`` and the server policy's
    admission keys (they become Flower node authentication: unlisted SuperNodes are
    refused by the SuperLink itself, before any message); with ``recorded`` given
    (a resume without --auth-keys) it is the recorded allow-list.
    """
    from policies import load_server_policy, policy_hash
    from server.run_settings import (
        DeploymentSettings,
        node_key,
        node_keys_in,
        tls_fingerprints,
    )

    policy_sha: str | None = None
    policy_keys: tuple[str, ...] = ()
    if policy is not None:
        loaded = load_server_policy(policy)  # a broken file fails here, naming each bad field
        policy_sha = policy_hash(loaded)
        if loaded.admission.mode == "allowlist":
            policy_keys = loaded.admission.public_keys
    if recorded is not None:
        found = {k.fingerprint: k for k in recorded.auth_keys}
        keys_dir = recorded.auth_keys_dir
    else:
        site_keys = tuple(sorted(auth_keys.glob("*.pub"))) if auth_keys is not None else ()
        if auth_keys is not None and not site_keys:
            raise typer.BadParameter(f"no *.pub site keys in {auth_keys}")
        found = {k.fingerprint: k for k in node_keys_in(site_keys)}
        keys_dir = str(auth_keys.resolve()) if auth_keys is not None else None
    for line in policy_keys:
        key = node_key(line)
        found[key.fingerprint] = key
    ca_fp, server_fp = (None, None)
    if certs is not None:
        ca_fp, server_fp = tls_fingerprints(CertPaths.in_dir(certs))
    return DeploymentSettings(
        tls=certs is not None,
        ca_cert_sha256=ca_fp,
        server_cert_sha256=server_fp,
        node_auth=bool(found),
        auth_keys_dir=keys_dir,
        auth_keys=tuple(sorted(found.values())),
        policy_path=str(policy.resolve()) if policy is not None else None,
        policy_sha256=policy_sha,
    )


def _print_roster(server_settings: ServerSettings) -> int:
    """Check the roster now (intact, naming this server's key), print it; its member count."""
    from server.app import load_run_roster
    from server.record import load_signing_key

    if server_settings.roster_path is None or server_settings.key_dir is None:
        return 0
    # A missing key is the usual one line naming `fedseal-server keys DIR` (never made here).
    public = load_signing_key(server_settings.key_dir).public_key()
    loaded = load_run_roster(server_settings.roster_path, public)
    out.print(f"{loaded.summary()} ({server_settings.roster_path})", highlight=False)
    return len(loaded.members)


def _check_roster_resume(
    run_id: str, recorded: RosterInForce | None, path: Path | None, key_dir: Path
) -> None:
    """Refuse, before anything starts, a resume under another roster than the run's (or none)."""
    from server.app import load_run_roster
    from server.record import KeyPaths
    from server.record.keys import load_public_key
    from server.run_settings import RosterInForce, check_roster_resume

    offered = None
    if path is not None:
        public = load_public_key(KeyPaths.in_dir(key_dir).public_key)
        offered = RosterInForce.of(load_run_roster(path, public), path)
    check_roster_resume(run_id, recorded, offered)


def _write_allow_list(deployment: DeploymentSettings, state_dir: Path) -> tuple[Path, ...]:
    """Write the allow-list's keys as ``STATE_DIR/admission-keys/*.pub`` for registration.

    Older ``*.pub`` files there are removed first: the SuperLink registers exactly
    the keys of this launch's allow-list.
    """
    key_dir = state_dir / "admission-keys"
    if key_dir.is_dir():
        for old in key_dir.glob("*.pub"):
            old.unlink()
    if not deployment.auth_keys:
        return ()
    key_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, key in enumerate(deployment.auth_keys):
        path = key_dir / f"key-{i:03d}.pub"
        path.write_text(key.key + "\n")
        paths.append(path)
    return tuple(paths)


def serve(link_settings: LinkSettings, cfg: RunConfig, server_settings: ServerSettings) -> int:
    """Run the SuperLink, submit the fedseal app to it and stream until the run ends.

    The one place ``start`` and ``resume`` hand their ``RunConfig`` over.

    Parameters
    ----------
    link_settings
        Where and how the SuperLink listens.
    cfg
        The run's configuration, sent to the sites.
    server_settings
        The coordinator's record, keys, output directory and resume target.

    Returns
    -------
    int
        ``flwr run``'s exit code.
    """
    from server.deploy import SuperLink, write_app_dir

    _check_signing_key(server_settings)
    # SIGTERM unwinds like Ctrl-C, so the SuperLink (its own process group) is stopped too.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with tempfile.TemporaryDirectory(prefix="fedseal-app-") as tmp:
        app_dir = write_app_dir(Path(tmp), cfg, server_settings.to_flower())
        with SuperLink(link_settings) as link:
            tls = "TLS" if link_settings.certs is not None else "INSECURE"
            out.print(
                f"SuperLink listening on {link_settings.host}:{link_settings.port} ({tls}); "
                f"log: {link.log_path}"
            )
            return link.run_app(app_dir)


def _check_signing_key(server_settings: ServerSettings) -> None:
    """Refuse to start without the audit-signing key, before any process is started.

    The ServerApp makes the same check (it never creates a key); doing it
    here first turns a missing key into one actionable line on this terminal
    instead of a failure in Flower's logs. Where the record exists, the key
    must also be the one it has in force.
    """
    from common.errors import RecordError
    from server.record import SqlRecord, load_signing_key, signing_key_for

    if server_settings.key_dir is None:
        return
    load_signing_key(server_settings.key_dir)
    if server_settings.db_url is None:
        return
    try:
        record = SqlRecord(server_settings.db_url, create=False)
    except RecordError:
        return  # no record yet (the run creates it) or unreachable (the ServerApp will say)
    with record:
        signing_key_for(record, server_settings.key_dir)


def _planned_sites(cfg: RunConfig) -> RunConfig:
    """Under client-level DP, ``num_sites`` (the ``N`` of the fixed denominator q*N) from --wait-sites.

    ``--wait-sites`` defaults to the roster's members; without either the
    coordinator cannot know ``N`` and refuses, since dividing by the sites
    that happen to take part would publish their number.
    """
    if not cfg.central_dp:
        return cfg
    if not cfg.wait_sites:
        from common.errors import ConfigurationError

        raise ConfigurationError(
            "--central-dp divides each round's noised sum by q*N with N the planned sites: "
            "give --wait-sites N or --roster"
        )
    planned = dataclasses.replace(cfg, num_sites=cfg.wait_sites)
    if planned.distributed_dp:  # the wrap bound (and so gamma and z) depends on N
        from common.dp.distributed import calibrate_run_noise
        from common.task import task_for

        return calibrate_run_noise(planned, task_for(planned).parameter_count())
    return planned


def _check_dropout_tolerance(cfg: RunConfig, allowed: bool) -> None:
    """Refuse a secure run whose expected cohort cannot lose a single site, unless ``allowed``."""
    from server.cohort import secure_dropout_tolerance

    if not cfg.secagg:
        return
    tolerated, n, t, k = secure_dropout_tolerance(cfg)
    if tolerated > 0:
        return
    why = (
        f"secure aggregation over a cohort of {n} sites (threshold t={t} of k={k} neighbours) "
        "tolerates no dropout: one lost site fails the round"
    )
    if allowed:
        out.print(f"warning: {why} (--allow-no-dropout)", highlight=False)
        return
    from common.errors import ConfigurationError

    raise ConfigurationError(
        f"{why}; expect more sites (--wait-sites, --min-sites >= 4) or pass --allow-no-dropout"
    )


def _db_url(db: str | None, state_dir: Path) -> str:
    if db is None:
        return f"sqlite:///{(state_dir / 'record.db').resolve()}"
    if "://" in db:
        return db
    return f"sqlite:///{Path(db).resolve()}"


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    app()


if __name__ == "__main__":
    main()
