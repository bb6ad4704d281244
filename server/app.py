"""The fedseal ServerApp (Flower Message API).

:func:`open_run` opens the record and loads the audit-signing key
(:func:`server.record.signing_key_for`): a missing key is a one-line
:class:`~common.errors.ConfigurationError` naming the path and
``fedseal-server keys DIR``, never a freshly created key. Without an explicit
key directory, a SQLite record's key is looked for in ``keys/`` beside it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import HttpGrid

from common.config import SERVER_ONLY_PREFIX, RunConfig
from common.errors import ConfigurationError, IntegrityError
from common.roster import Roster, key_fingerprint, load_roster
from policies import ServerPolicy, load_server_policy, policy_hash
from server.aggregation.exchange import PollingGrid
from server.book import RunBook, default_db_url
from server.policy_gate import PolicyGate
from server.record import SqlRecord, signing_key_for
from server.results import RoundObserver
from server.rounds import FederatedRun
from server.run_settings import (
    DeploymentSettings,
    RosterInForce,
    check_resume,
    check_roster_resume,
    recorded_roster,
    recorded_settings,
)

# Coordinator-only run_config keys (never sent to sites).
KEY_OUT_DIR = SERVER_ONLY_PREFIX + "out-dir"
KEY_DB_URL = SERVER_ONLY_PREFIX + "db-url"
KEY_KEY_DIR = SERVER_ONLY_PREFIX + "key-dir"
KEY_RESUME = SERVER_ONLY_PREFIX + "resume-run"
KEY_POLICY = SERVER_ONLY_PREFIX + "policy"
KEY_DEPLOYMENT = SERVER_ONLY_PREFIX + "deployment"
KEY_ROSTER = SERVER_ONLY_PREFIX + "roster"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Where the coordinator keeps its record and key, and whether it resumes a run.

    ``deployment`` is what ``fedseal-server start``/``resume`` launched the
    SuperLink with (:mod:`server.run_settings`); simulations have none.
    ``roster_path`` is the federation roster (:mod:`common.roster`) the run
    is held to (:func:`load_run_roster`).
    """

    db_url: str | None = None
    key_dir: Path | None = None
    out_dir: Path | None = None
    resume_run_id: str | None = None
    policy_path: Path | None = None
    deployment: DeploymentSettings | None = None
    roster_path: Path | None = None

    def to_flower(self) -> dict[str, str]:
        out = {}
        if self.policy_path:
            out[KEY_POLICY] = str(self.policy_path)
        if self.roster_path:
            out[KEY_ROSTER] = str(self.roster_path)
        if self.deployment is not None:
            out[KEY_DEPLOYMENT] = self.deployment.to_json()
        if self.db_url:
            out[KEY_DB_URL] = self.db_url
        if self.key_dir:
            out[KEY_KEY_DIR] = str(self.key_dir)
        if self.out_dir:
            out[KEY_OUT_DIR] = str(self.out_dir)
        if self.resume_run_id:
            out[KEY_RESUME] = self.resume_run_id
        return out

    @classmethod
    def from_flower(cls, run_config: Mapping[str, object]) -> ServerSettings:
        def text(key: str) -> str | None:
            value = run_config.get(key)
            return value if isinstance(value, str) and value else None

        key_dir, out_dir, policy = text(KEY_KEY_DIR), text(KEY_OUT_DIR), text(KEY_POLICY)
        deployment, roster = text(KEY_DEPLOYMENT), text(KEY_ROSTER)
        return cls(
            deployment=DeploymentSettings.from_json(deployment) if deployment else None,
            policy_path=Path(policy) if policy else None,
            roster_path=Path(roster) if roster else None,
            db_url=text(KEY_DB_URL),
            key_dir=Path(key_dir) if key_dir else None,
            out_dir=Path(out_dir) if out_dir else None,
            resume_run_id=text(KEY_RESUME),
        )


def load_run_roster(path: Path, audit_key: Ed25519PublicKey) -> Roster:
    """The federation roster a coordinator runs under: intact, and naming its own key.

    The coordinator pins no roster authority (the roster protects the sites
    against it, not the other way round): it checks that the file is a
    well-formed roster whose signature verifies under the authority it names,
    and, when the roster names a coordinator key, that this is the audit key
    the server signs with (otherwise every pinned site would refuse every
    instruction).

    Raises
    ------
    ConfigurationError
        Unreadable, malformed, badly signed, or naming another coordinator key.
    """
    try:
        roster = load_roster(path, authority_key=None)
    except IntegrityError as exc:
        raise ConfigurationError(str(exc)) from None
    own = audit_key.public_bytes_raw()
    if roster.coordinator_key is not None and roster.coordinator_key != own:
        raise ConfigurationError(
            f"roster {path} names coordinator key {key_fingerprint(roster.coordinator_key)}, "
            f"but this server signs with {key_fingerprint(own)}; re-sign the roster with "
            "--coordinator-key AUDIT.pub (or give this server its key)"
        )
    return roster


def open_run(
    cfg: RunConfig | None,
    settings: ServerSettings,
    run_config: Mapping[str, object],
    policy: ServerPolicy | None = None,
) -> tuple[RunConfig, RunBook, Roster | None]:
    """Open the record and the signing key; for a resume, the run's own configuration.

    A deployed run (``settings.deployment``) gets its settings completed with
    the loaded policy's hash and the signing key's fingerprint, to be recorded
    with its start or resume (``run_settings``). A resume of a run that was
    started deployed is held to the settings recorded then
    (:func:`server.run_settings.check_resume`, here with the key actually
    loaded): it stops a relaunch that drops node authentication, the server
    policy, TLS, or signs on under another key.

    Raises
    ------
    ConfigurationError
        If the signing key is missing (it is never created here) or is not
        the record's key in force, the run to resume is finished, or a
        resume does not match the recorded deployment settings.
    """
    db_url = settings.db_url or default_db_url()
    record = SqlRecord(db_url)
    try:
        key_dir = settings.key_dir or _default_key_dir(db_url)
        key = signing_key_for(record, key_dir)
        deployed = _deployed_settings(settings, policy, key.public_key())
        path = settings.roster_path
        roster = load_run_roster(path, key.public_key()) if path is not None else None
        in_force = RosterInForce.of(roster, path) if roster is not None else None
        summary = in_force.to_payload() if in_force is not None else None
        if settings.resume_run_id:
            run_id = settings.resume_run_id
            info = record.get_run(run_id)
            if info.status == "finished":
                raise ConfigurationError(f"run {run_id} already finished; nothing to resume")
            events = record.events(run_id)
            recorded = recorded_settings(events)
            if recorded is not None or deployed is not None:
                check_resume(run_id, recorded, deployed)
            check_roster_resume(run_id, recorded_roster(events), in_force)
            run_cfg = RunConfig.from_record(info.config)
            book = RunBook(record, key, run_id, _payload(deployed), roster=summary)
            return run_cfg, book, roster
        run_cfg = cfg if cfg is not None else RunConfig.from_flower(run_config)
        book = RunBook(record, key, uuid.uuid4().hex[:12], _payload(deployed), roster=summary)
        return run_cfg, book, roster
    except BaseException:
        record.close()
        raise


def _deployed_settings(
    settings: ServerSettings, policy: ServerPolicy | None, public_key: Ed25519PublicKey
) -> DeploymentSettings | None:
    deployed = settings.deployment
    if deployed is None:
        return None
    loaded = policy_hash(policy) if policy is not None else None
    if loaded != deployed.policy_sha256:
        raise ConfigurationError(
            f"the server policy loaded (sha256 {loaded}) is not the one the command line "
            f"checked (sha256 {deployed.policy_sha256}); was {settings.policy_path} changed?"
        )
    return deployed.with_signing_key(public_key)


def _payload(deployed: DeploymentSettings | None) -> dict[str, object] | None:
    return deployed.to_payload() if deployed is not None else None


def _default_key_dir(db_url: str) -> Path:
    if db_url.startswith("sqlite:///"):
        return Path(db_url.removeprefix("sqlite:///")).parent / "keys"
    raise ConfigurationError("a record that is not a SQLite file needs an explicit key directory")


def make_server_app(
    cfg: RunConfig | None = None,
    observer: RoundObserver | None = None,
    settings: ServerSettings | None = None,
    wrap_grid: Callable[[Grid], Grid] | None = None,
) -> ServerApp:
    """Build the ServerApp.

    ``cfg``/``settings`` given: use them (simulations pass their options this
    way); otherwise read Flower's ``context.run_config`` (``flwr run``,
    deployments), whose ``server-*`` keys configure the coordinator only.
    ``wrap_grid`` lets a simulation put its network (e.g. sites that go silent,
    :mod:`simulations.faults`) between the run and Flower's Grid.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = dict(context.run_config)
        chosen = settings if settings is not None else ServerSettings.from_flower(run_config)
        # A broken policy file fails here, before anything is recorded (PolicyFileError names it).
        policy = load_server_policy(chosen.policy_path) if chosen.policy_path else None
        run_cfg, book, roster = open_run(cfg, chosen, run_config, policy)
        if isinstance(grid, HttpGrid):  # deployed: pull replies sooner than Flower's 3 s
            grid = PollingGrid(grid)
        try:
            FederatedRun(
                run_cfg,
                wrap_grid(grid) if wrap_grid is not None else grid,
                observer,
                chosen.out_dir,
                book,
                resume=chosen.resume_run_id is not None,
                gate=PolicyGate(policy, book) if policy is not None else None,
                roster=roster,
            ).execute()
        finally:
            book.record.close()

    return server_app


app = make_server_app()
