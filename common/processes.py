"""Starting and stopping Flower's own processes (SuperLink, SuperNode, flwr CLI).

fedseal never implements a transport: it launches Flower's executables from
the same environment, each in its own process group so that it and every
child it spawns (superexec, serverapp, clientapp processes) can be stopped
together.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from common.env import SAFE_FLOWER_ENV
from common.errors import ConfigurationError, FedsealError


def flower_executable(name: str) -> str:
    """Path of a Flower console script installed next to this Python."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FedsealError(f"Flower executable {name!r} not found next to {sys.executable}")
    return str(path)


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower processes: safe defaults and a private FLWR_HOME."""
    env = dict(os.environ)
    for key, value in SAFE_FLOWER_ENV.items():
        env.setdefault(key, value)
    env["FLWR_HOME"] = str(flwr_home)
    # Flower starts its helpers (flower-superexec, flwr-serverapp, flwr-clientapp)
    # by name: make sure they resolve to this environment's copies.
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    if extra:
        env.update(extra)
    return env


def check_port_free(host: str, port: int) -> None:
    """ConfigurationError with one clear line if ``host:port`` cannot be bound.

    Probed as Flower's servers bind (``SO_REUSEADDR``, as uvicorn does): a port
    another process listens on is refused, while one that only has connections
    in TIME_WAIT, e.g. right after a crashed coordinator, is free to reuse.
    """
    if not (0 < port < 65536):
        raise ConfigurationError(f"port {port} is outside 1..65535")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigurationError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """FedsealError with one clear line if nothing accepts TCP connections at ``host:port``."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigurationError(f"SuperLink address must be HOST:PORT, got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise FedsealError(
            f"cannot reach the SuperLink at {address}: {exc.strerror or exc}"
        ) from None


def wait_for_port(
    host: str, port: int, proc: subprocess.Popen[bytes], timeout_s: float, what: str
) -> None:
    """Wait until ``proc`` listens on ``host:port``; FedsealError if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedsealError(f"{what} exited with code {proc.returncode} during start-up")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise FedsealError(f"{what} did not listen on {host}:{port} within {timeout_s:.0f} s")


def start_group(
    argv: Sequence[str], env: Mapping[str, str], log_path: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new process group, output to ``log_path`` (or inherited)."""
    out = open(log_path, "ab") if log_path else None  # noqa: SIM115 - lives as long as the child
    try:
        return subprocess.Popen(
            list(argv),
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
        )
    finally:
        if out:
            out.close()


def stop_group(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM the process group of ``proc``, then SIGKILL whatever is left."""
    if proc.poll() is None or _group_alive(proc.pid):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                continue
            if not _group_alive(proc.pid):
                break
            time.sleep(0.5)
            if not _group_alive(proc.pid):
                break


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
