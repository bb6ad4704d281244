"""Flower's own `flwr run .` (local simulation) runs the fedseal app as the README says."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.deployment


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kill_local_superlink(flwr_home: Path) -> None:
    """`flwr run` leaves its :local: SuperLink running: stop it by PID."""
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-superlink" in cmdline and str(flwr_home) in cmdline:
            try:
                os.kill(int(pid_dir.name), signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.mark.skipif(not (REPO / "pyproject.toml").is_file(), reason="needs the source tree")
@pytest.mark.e2e  # a whole `flwr run` (about a minute): CI's own step, with the chaos suite
def test_flwr_run_local_simulation_completes(tmp_path: Path) -> None:
    flwr_home = tmp_path / "flwr-home"
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()),
        PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
    )
    bin_dir = Path(sys.executable).parent
    keys = flwr_home / "fedseal" / "keys"  # where the ServerApp looks beside its default record
    made = subprocess.run([str(bin_dir / "fedseal-server"), "keys", str(keys)], capture_output=True)
    assert made.returncode == 0, made.stderr
    # the local federation: site identities and a roster (secure aggregation needs one)
    made = subprocess.run(
        [str(bin_dir / "fedseal-sim"), "federation", "--sites", "3"], capture_output=True, env=env
    )
    assert made.returncode == 0, made.stderr
    assert b"federation 'local': 3 sites" in made.stderr
    try:
        proc = subprocess.run(
            [
                str(bin_dir / "flwr"),
                "run",
                ".",
                "--stream",
                "--run-config",
                "rounds=2",
                "--federation-config",
                "num-supernodes=3 client-resources-num-cpus=1",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        _kill_local_superlink(flwr_home)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "round 2: accuracy=" in output, output[-3000:]
    assert "participants=3/3" in output
    verify = subprocess.run(
        [
            str(bin_dir / "fedseal-server"),
            "audit",
            "verify",
            "--db",
            str(flwr_home / "fedseal" / "record.db"),
            "--public-key",
            str(keys / "audit.pub"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0 and verify.stdout.startswith("OK:"), verify.stdout + verify.stderr
    sites = sorted((flwr_home / "fedseal-sites").iterdir())
    assert len(sites) == 3 and all(s.stat().st_mode & 0o077 == 0 for s in sites)
