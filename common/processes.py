"""Starting and stopping Flower's own processes (SuperLink, SuperNode, flwr CLI).

fedseal never implements a transport: it launches Flower's executables from
the same environment, each under a small supervisor (:mod:`common.supervisor`)
leading its own process group, so that it and every child it spawns
(superexec, serverapp, clientapp processes) are stopped together: on request,
and when the fedseal command that started them dies, even by SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from common.env import SAFE_FLOWER_ENV
from common.errors import ConfigurationError, FedsealError

DEFAULT_GRACE_S = 5.0


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
    argv: Sequence[str],
    env: Mapping[str, str],
    log_path: Path | None = None,
    *,
    capture: bool = False,
    split_stderr: bool = False,
    grace_s: float = DEFAULT_GRACE_S,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` under a supervisor (:mod:`common.supervisor`) leading a new session.

    The supervisor stops ``argv`` and every process below it when this process
    dies (even by SIGKILL), when it is sent SIGTERM (:func:`stop_group`), or
    when ``argv`` exits; stopping is SIGTERM, ``grace_s`` seconds, SIGKILL.
    The returned process is the supervisor: its exit code is ``argv``'s.

    Output goes to ``log_path`` (appended), to a pipe (``capture``: stdout and
    stderr merged on ``proc.stdout``, or apart with ``split_stderr``) or is
    inherited.
    """
    out = open(log_path, "ab") if log_path else None  # noqa: SIM115 - lives as long as the child
    supervised = [
        sys.executable,
        "-P",  # never this directory's own `common`: the installed fedseal's supervisor
        "-m",
        "common.supervisor",
        "--parent",
        str(os.getpid()),
        "--grace",
        str(grace_s),
        "--",
        *argv,
    ]
    stdout: int | IO[bytes] | None = subprocess.PIPE if capture else out
    stderr: int | None = subprocess.STDOUT if (out or capture) else None
    if capture and split_stderr:
        stderr = subprocess.PIPE
    try:
        return subprocess.Popen(
            supervised,
            env=dict(env),
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
    finally:
        if out:
            out.close()


def run_group(
    argv: Sequence[str], env: Mapping[str, str], *, capture: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to its end under a supervisor (:func:`start_group`); never left behind.

    With ``capture``, stdout and stderr are returned; otherwise they are
    inherited (e.g. ``flwr run --stream``).
    Whatever interrupts the wait (Ctrl-C, SIGTERM turned into SystemExit)
    stops the process group before it propagates.
    """
    proc = start_group(argv, env, capture=capture, split_stderr=True)
    try:
        out, err = proc.communicate()
    except BaseException:
        stop_group(proc)
        raise
    return subprocess.CompletedProcess(list(argv), proc.returncode, _text(out), _text(err))


def _text(data: bytes | None) -> str:
    return data.decode("utf-8", "replace") if data is not None else ""


def stop_group(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """Stop a group started by :func:`start_group`; SIGKILL it if not gone in ``timeout_s``.

    The supervisor is sent SIGTERM (it stops its tree with its own grace
    period); should it not have exited within ``timeout_s``, the whole group
    is killed.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    if _group_alive(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout_s)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
