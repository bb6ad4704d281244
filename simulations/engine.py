"""Running fedseal on Flower's Simulation Engine (Ray), in this process.

The run directory's audit-signing key is made here, explicitly and before
the run starts (:func:`prepare_signing_key`), never by the ServerApp: a fresh
directory gets a fresh key (and says so on stderr); a directory that already
holds a record, and a resumed run, need the key they were sealed with.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from common.config import RunConfig
from common.env import apply_safe_flower_env
from common.errors import RecordError
from policies import SitePolicies
from server.results import RoundObserver, RoundResult
from simulations.faults import FaultPlan, SilencingGrid

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp


class _Collector:
    """Keeps the round results and forwards them to an optional observer."""

    def __init__(self, inner: RoundObserver | None) -> None:
        self.inner = inner
        self.run_id = ""
        self.results: list[RoundResult] = []

    def on_start(self, run_id: str, total_rounds: int) -> None:
        self.run_id = run_id
        if self.inner:
            self.inner.on_start(run_id, total_rounds)

    def on_round(self, result: RoundResult) -> None:
        self.results.append(result)
        if self.inner:
            self.inner.on_round(result)

    def on_finish(self, results: list[RoundResult]) -> None:
        if self.inner:
            self.inner.on_finish(results)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to fd 1 (Ray, Flower, workers) to fd 2 meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def prepare_signing_key(out_dir: Path, *, resume: bool) -> Path:
    """The audit-signing key directory of a run directory, made only for a fresh one.

    Defends against a **deleted-key reset**: a run directory whose record
    exists (or a resumed run) never gets a new key. If its key is missing the
    run is refused instead of sealing the old history's continuation with a
    key nobody trusts.

    Where the directory holds a record, its key must be the record's key in
    force (:func:`server.record.signing_key_for`), checked here, before the
    federation's roster (which names the key) or anything else is rewritten.

    Raises
    ------
    ConfigurationError
        If the key is missing for an existing record or a resume, or is refused.
    """
    from server.record import KeyPaths, SqlRecord, create_keypair, load_signing_key, signing_key_for

    key_dir = out_dir / "keys"
    paths = KeyPaths.in_dir(key_dir)
    if not paths.private_key.exists() and not resume and not (out_dir / "record.db").exists():
        create_keypair(key_dir)
        print(
            f"fedseal: new run directory: created the audit-signing key {paths.private_key} "
            f"(public key {paths.public_key})",
            file=sys.stderr,
            flush=True,
        )
    load_signing_key(key_dir)  # missing for an existing record, or unusable: one line, and stop
    if (out_dir / "record.db").exists():
        # The record's key in force, checked before anything in the directory is rewritten
        # (the federation's roster names this key): a wrong key is refused here, not later.
        try:
            record = SqlRecord(f"sqlite:///{(out_dir / 'record.db').resolve()}", create=False)
        except RecordError:
            return key_dir  # no record in it yet (the run makes one), or the ServerApp will say
        with record:
            signing_key_for(record, key_dir)
    return key_dir


def run_simulation(
    cfg: RunConfig,
    *,
    out_dir: Path | None = None,
    resume_run_id: str | None = None,
    server_policy: Path | None = None,
    site_policies: SitePolicies | None = None,
    observer: RoundObserver | None = None,
    cpus_per_site: float = 1.0,
    gpus_per_site: float = 0.0,
    total_cpus: int | None = None,
    verbose: bool = False,
    faults: FaultPlan | None = None,
    wrap_client_app: Callable[[ClientApp], ClientApp] | None = None,
) -> tuple[str, list[RoundResult]]:
    """Run ``cfg.num_sites`` virtual sites for ``cfg.rounds`` rounds; return (run id, results).

    Everything the run keeps lands under ``out_dir`` (a temporary directory if
    None): the central record ``record.db`` with its model artifacts, the
    server's audit key in ``keys/`` (made up front for a fresh directory,
    :func:`prepare_signing_key`), each site's state (ledger, witnessed
    heads, identity key) in ``sites/site-<i>/``, the federation's roster
    authority and signed roster in ``federation/``
    (:func:`simulations.federation.prepare_federation`; it names the audit
    key, which every simulated site therefore pins), and ``result.json``. The ServerApp runs in
    a thread of this process and the ClientApps in Ray actors; Ray is shut
    down before returning, also on error. ``faults`` silences sites at a
    secure-aggregation stage (:mod:`simulations.faults`). ``wrap_client_app``
    wraps the sites' ClientApp from outside (the privacy audit gives its sites
    their data files this way, :mod:`simulations.privacy_audit`); no command
    line reaches it.
    """
    apply_safe_flower_env()
    from flwr.simulation import run_simulation as flwr_run_simulation

    from client.app import make_client_app
    from server.app import ServerSettings, make_server_app
    from server.record import KeyPaths
    from server.record.keys import load_public_key
    from simulations.federation import prepare_federation

    if out_dir is None:
        out_dir = Path(tempfile.mkdtemp(prefix="fedseal-sim-"))
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    key_dir = prepare_signing_key(out_dir, resume=resume_run_id is not None)
    federation = prepare_federation(
        out_dir / "sites",
        cfg.num_sites,
        coordinator_key=load_public_key(KeyPaths.in_dir(key_dir).public_key).public_bytes_raw(),
        directory=out_dir / "federation",
    )
    settings = ServerSettings(
        db_url=f"sqlite:///{out_dir / 'record.db'}",
        key_dir=key_dir,
        out_dir=out_dir,
        resume_run_id=resume_run_id,
        policy_path=server_policy.resolve() if server_policy is not None else None,
        roster_path=federation.path,
    )

    client_app = make_client_app(federation.site_setup(site_policies))
    if wrap_client_app is not None:
        client_app = wrap_client_app(client_app)
    collector = _Collector(observer)
    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.ERROR)
    logging.getLogger("flwr.fedseal").setLevel(level)
    init_args: dict[str, object] = {
        "include_dashboard": False,
        "logging_level": "INFO" if verbose else "ERROR",
        "log_to_driver": verbose,
    }
    init_args["num_cpus"] = total_cpus or os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": cpus_per_site, "num_gpus": gpus_per_site},
        "init_args": init_args,
    }
    try:
        flwr_run_simulation(
            server_app=make_server_app(
                None if resume_run_id else cfg,
                collector,
                settings,
                wrap_grid=(lambda grid: SilencingGrid(grid, faults))
                if faults is not None
                else None,
            ),
            client_app=client_app,
            num_supernodes=cfg.num_sites,
            backend_config=backend_config,  # type: ignore[arg-type]
        )
    finally:
        _shutdown_ray()
    return collector.run_id, collector.results


def _shutdown_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # shutting down is best effort; the run's outcome is already known
        logging.getLogger("flwr.fedseal").debug("ray shutdown failed", exc_info=True)
