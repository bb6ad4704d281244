"""The coordinator's deployment: Flower's SuperLink plus the fedseal ServerApp submitted to it.

``fedseal-server start`` = start ``flower-superlink`` (TLS unless explicitly
insecure, node authentication when site keys are allow-listed), register the
allowed site keys, then ``flwr run`` the fedseal app against it and stream its
logs. ``start`` begins from an empty SuperLink state (the previous one is kept
as ``superlink-state.db.previous``), so the registered keys are exactly the
run's allow-list; ``resume`` reopens the crashed SuperLink's state, so the
sites' SuperNodes reconnect under their node ids by themselves, and checks
that it holds no registered key beyond the allow-list. The FAB (Flower app bundle) that ``flwr run`` submits is generated: a
``pyproject.toml`` naming ``server.app:app``/``client.app:app`` and carrying the
run configuration; the code itself is the installed fedseal package on the
coordinator and on every site.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from common.config import RunConfig
from common.errors import ConfigurationError, FedsealError
from common.pki import CertPaths, check_server_tls
from common.processes import (
    check_port_free,
    flower_env,
    flower_executable,
    run_group,
    start_group,
    stop_group,
    wait_for_port,
)

CONNECTION = "fedseal"


@dataclass(frozen=True, slots=True)
class LinkSettings:
    host: str
    port: int
    state_dir: Path
    certs: CertPaths | None  # None = insecure (explicitly requested)
    auth_keys: tuple[Path, ...] = ()
    startup_timeout_s: float = 60.0
    fresh_state: bool = True  # start: a new SuperLink state; resume: the crashed one's

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr"

    @property
    def database(self) -> Path:
        return self.state_dir / "superlink-state.db"


def _toml_value(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_app_dir(
    directory: Path, cfg: RunConfig, server_settings: dict[str, str] | None = None
) -> Path:
    """Write the FAB source directory: one pyproject.toml (no code)."""
    from importlib.metadata import version

    directory.mkdir(parents=True, exist_ok=True)
    values: dict[str, bool | int | float | str] = dict(cfg.to_flower())
    values.update(server_settings or {})
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "fedseal"',
        f'version = "{version("fedseal")}"',
        'description = "fedseal federated run"',
        'license = "Apache-2.0"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "fedseal"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "server.app:app"',
        'clientapp = "client.app:app"',
        "",
        "[tool.flwr.app.config]",
        *(f"{k} = {_toml_value(v)}" for k, v in values.items()),
        "",
    ]
    (directory / "pyproject.toml").write_text("\n".join(lines))
    return directory


def write_connection(settings: LinkSettings) -> None:
    """Write $FLWR_HOME/config.toml with one connection named :data:`CONNECTION`."""
    settings.flwr_home.mkdir(parents=True, exist_ok=True)
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host
    lines = [
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f'address = "{host}:{settings.port}"',
    ]
    if settings.certs is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{settings.certs.ca_cert.resolve()}"')
    (settings.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def _set_aside(database: Path) -> None:
    """Move a previous SuperLink state (and its SQLite side files) to ``*.previous``."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        path = database.with_name(database.name + suffix)
        if path.exists():
            path.replace(path.with_name(database.name + ".previous" + suffix))


def _json_object(text: str) -> dict[str, object]:
    """The JSON object ``flwr ... --format json`` printed (after any other output)."""
    start = text.find("{")
    try:
        value = json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise FedsealError(f"unexpected output from flwr: {text.strip()[-300:]}")
    return value


class SuperLink:
    """A running ``flower-superlink``; use as a context manager to always stop it."""

    def __init__(self, settings: LinkSettings) -> None:
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SuperLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def log_path(self) -> Path:
        return self.settings.state_dir / "superlink.log"

    def start(self) -> None:
        s = self.settings
        if s.certs is not None and (missing := s.certs.missing()):
            raise ConfigurationError(
                "missing TLS files: "
                + ", ".join(str(p) for p in missing)
                + " (create them with `fedseal-server certs DIR`, or pass --insecure explicitly)"
            )
        if s.certs is not None:
            check_server_tls(s.certs)  # expired, another CA's, or a key of another certificate
        if s.auth_keys and s.certs is None:
            raise ConfigurationError("node authentication needs TLS; drop --insecure")
        for key in s.auth_keys:
            if not key.is_file():
                raise ConfigurationError(f"site public key not found: {key}")
        check_port_free(s.host, s.port)
        s.state_dir.mkdir(parents=True, exist_ok=True)
        if s.fresh_state:
            _set_aside(s.database)
        write_connection(s)
        argv = self.argv()
        self.proc = start_group(argv, flower_env(s.flwr_home), self.log_path)
        probe_host = "127.0.0.1" if s.host in ("0.0.0.0", "") else s.host
        try:
            wait_for_port(probe_host, s.port, self.proc, s.startup_timeout_s, "the SuperLink")
        except FedsealError as exc:
            self.stop()
            raise FedsealError(f"{exc} (see {self.log_path})") from None
        try:
            self._register_keys()
        except BaseException:
            self.stop()
            raise

    def argv(self) -> list[str]:
        """The ``flower-superlink`` command line: TLS unless insecure, node auth with keys."""
        s = self.settings
        argv = [
            flower_executable("flower-superlink"),
            "--host",
            s.host,
            "--port",
            str(s.port),
            "--database",
            str(s.database),
            "--disable-runtime-dependency-installation",
        ]
        if s.certs is None:
            argv.append("--insecure")
        else:
            argv += [
                "--ssl-ca-certfile",
                str(s.certs.ca_cert),
                "--ssl-certfile",
                str(s.certs.server_cert),
                "--ssl-keyfile",
                str(s.certs.server_key),
            ]
        if s.auth_keys:
            argv.append("--enable-supernode-auth")
        return argv

    def _register_keys(self) -> None:
        """Register the allow-list; then no other key may be registered.

        A key the reopened state (resume) already holds is fine. Any registered
        node beyond the allow-list (a stale or foreign state directory, a key
        registered behind fedseal's back) would let a SuperNode outside the
        run's allow-list in, so the launch is refused.
        """
        keys = self.settings.auth_keys
        for key in keys:
            proc = self.flwr(["supernode", "register", str(key.resolve()), CONNECTION])
            if proc.returncode != 0:
                detail = ((proc.stdout or "") + (proc.stderr or "")).strip()
                if "already in use" not in detail:
                    raise FedsealError(f"`flwr supernode register` failed: {detail[-500:]}")
        if not keys:
            return
        listed = self.flwr(["supernode", "list", CONNECTION, "--format", "json"], check=True)
        nodes = _json_object(listed.stdout).get("nodes")
        if not isinstance(nodes, list):
            raise FedsealError(f"`flwr supernode list` gave no node list: {listed.stdout[-300:]}")
        registered = [
            n for n in nodes if not isinstance(n, dict) or n.get("status") != "unregistered"
        ]
        if len(registered) > len(keys):
            raise ConfigurationError(
                f"the SuperLink state {self.settings.database} holds {len(registered)} registered "
                f"SuperNodes but the run allow-lists {len(keys)} keys; it is not this run's state"
            )

    def flwr(
        self, args: list[str], *, check: bool = False, stream: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this SuperLink."""
        # Under a supervisor like the SuperLink: never left running if this process dies.
        proc = run_group(
            [flower_executable("flwr"), *args],
            flower_env(self.settings.flwr_home),
            capture=not stream,
        )
        if check and proc.returncode != 0:
            detail = (proc.stdout or "") + (proc.stderr or "")
            raise FedsealError(f"`flwr {' '.join(args[:2])}` failed: {detail.strip()[-500:]}")
        return proc

    @property
    def app_log_path(self) -> Path:
        """The ServerApp's streamed output, kept (:func:`app_error` reads its last error)."""
        return self.settings.state_dir / "serverapp.log"

    def run_app(self, app_dir: Path) -> int:
        """Submit the app and stream its logs until the run ends; returns flwr's exit code.

        The stream is echoed here and kept in :attr:`app_log_path`, so that a
        ServerApp that died can be explained in one line (:func:`app_error`).
        """
        argv = [flower_executable("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
        proc = start_group(argv, flower_env(self.settings.flwr_home), capture=True)
        try:
            with self.app_log_path.open("wb") as log:
                assert proc.stdout is not None
                for line in proc.stdout:
                    sys.stdout.buffer.write(line)
                    sys.stdout.flush()
                    log.write(line)
            return proc.wait()
        except BaseException:
            stop_group(proc)
            raise

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None


_APP_ERROR = re.compile(r"^(?:[a-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception|Abort|Violation)): (.+)$")


def app_error(state_dir: Path) -> str | None:
    """The last exception a ServerApp's kept output names (``Type: message``), if any."""
    path = state_dir / "serverapp.log"
    if not path.is_file():
        return None
    found = None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[-400:]:
        match = _APP_ERROR.match(line.strip())
        if match:
            found = f"{match.group(1)}: {match.group(2)}"
    return found
