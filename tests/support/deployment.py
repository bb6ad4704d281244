"""Deployments on loopback for tests: certificates, keys, a roster, the coordinator and sites.

Everything runs through the command lines a user types (``fedseal-server``,
``fedseal-client``) as subprocesses, each in its own process group; a
:class:`Federation` remembers what it started and the ``federation`` fixture
kills whatever is left, with everything below it. Shared by
``tests/integration/test_deployment.py`` and the chaos suite (``tests/chaos``).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from sklearn.datasets import load_digits

from common.pki import make_node_key
from server.record import SqlRecord
from server.record.keys import create_keypair, load_public_key

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_site_csv(path: Path, start: int) -> None:
    d = load_digits()
    idx = np.arange(start, len(d.target), 2)[:500]
    rows = [",".join([f"f{j}" for j in range(64)] + ["label"])]
    rows += [",".join(str(v) for v in d.data[k]) + f",{d.target[k]}" for k in idx]
    path.write_text("\n".join(rows) + "\n")


def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def make_audit_key(state_dir: Path) -> None:
    """The coordinator's signing key where `start` looks by default (it is never made implicitly)."""
    subprocess.run(
        [str(BIN / "fedseal-server"), "keys", str(state_dir / "keys")],
        check=True,
        capture_output=True,
    )


def cli(*argv: str) -> str:
    """Run a fedseal command line (``fedseal-server ...``/``fedseal-client ...``); its stdout."""
    proc = subprocess.run(
        [str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def make_roster(
    root: Path, audit_pub: Path, sites: dict[str, tuple[Path, Path]]
) -> tuple[Path, str]:
    """Each site's identity (``identity init`` in its state dir), then the signed roster.

    ``sites`` maps a site's name to (its ``--state-dir``, its node-auth ``.pub``). Returns the
    roster file and the authority's public key (hex), which the sites pin.
    """
    roster, authority = root / "roster.json", root / "authority" / "roster-authority.key"
    authority.parent.mkdir()
    out = cli(
        "fedseal-server",
        "roster",
        "init",
        "--authority-key",
        str(authority),
        "--federation",
        "loopback",
        "--roster",
        str(roster),
    )
    (pinned,) = re.findall(r'roster_authority = "([0-9a-f]{64})"', out)
    for name, (state_dir, node_pub) in sites.items():
        identity = cli("fedseal-client", "identity", "init", "--state-dir", str(state_dir)).strip()
        cli(
            "fedseal-server",
            "roster",
            "add",
            "--roster",
            str(roster),
            "--name",
            name,
            "--identity-key",
            identity,
            "--node-auth-key",
            str(node_pub),
        )
    cli(
        "fedseal-server",
        "roster",
        "sign",
        "--roster",
        str(roster),
        "--authority-key",
        str(authority),
        "--coordinator-key",
        str(audit_pub),
    )
    return roster, pinned


def kill(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue


def wait_for(path: Path, text: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in (path.read_text() if path.exists() else ""):
        assert proc.poll() is None, path.read_text()[-4000:]
        assert time.monotonic() < deadline, f"{text!r} not in {path.name} in time"
        time.sleep(0.3)


def alive(pid: int) -> bool:
    """Running (a zombie counts as dead: its parent may simply not have reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), children first found first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return [p for p in found if alive(p)]


def signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` and every process below it, by PID: a crash, no clean-up.

    The tree is frozen first (SIGSTOP, until no new descendant appears), so that
    nothing forks away from it between listing and killing.
    """
    tree = [proc.pid]
    while True:
        signal_all(tree, signal.SIGSTOP)
        found = [proc.pid, *descendants(proc.pid)]
        if set(found) == set(tree):
            break
        tree = found
    signal_all(tree, signal.SIGKILL)
    proc.wait(timeout=30)


def node_id(log: Path) -> str:
    found = re.findall(r"SuperNode ID: (\d+)", log.read_text())
    assert found, log.read_text()[-2000:]
    return found[-1]


def versions(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with SqlRecord(f"sqlite:///{db}", create=False) as record:
            return len(record.list_versions())
    except Exception:  # the run may be creating the schema right now
        return 0


@dataclass
class Federation:
    """Certificates, the coordinator's signing key and node keys made once per test."""

    root: Path
    certs: Path
    keys: Path  # the audit-signing key directory
    allowed: Path  # the allow-listed site public keys (*.pub)
    server_key_hex: str  # what the sites pin (trust.server_key)
    roster: Path  # the signed roster (sites 0-2, coordinator key = the audit key)
    authority_hex: str  # what the sites pin (trust.roster_authority)
    procs: list[subprocess.Popen[bytes]]

    def site_key(self, i: int) -> Path:
        """Site ``i``'s node-authentication private key (its .pub is in ``allowed``)."""
        return self.root / f"site{i}.key"

    def site_policy(self, i: int, file: str | None = None, **rules: object) -> Path:
        """Site ``i``'s own policy file: the server key pinned, ``rules`` over the defaults."""
        values: dict[str, object] = {
            "require_dp": True,
            "require_secure_aggregation": True,
            "min_cohort_size": 3,
            "min_secagg_threshold": 2,
            "min_secagg_neighbours": 2,
            **rules,
        }
        text = (
            f'kind = "site"\nname = "site {i}"\n[privacy]\nrequire_dp = {str(values["require_dp"]).lower()}\n'
            f"epsilon_budget = 8.0\n[rounds]\n"
            f"require_secure_aggregation = {str(values['require_secure_aggregation']).lower()}\n"
            f"min_cohort_size = {values['min_cohort_size']}\n"
            f"min_secagg_threshold = {values['min_secagg_threshold']}\n"
            f"min_secagg_neighbours = {values['min_secagg_neighbours']}\n"
            f'[trust]\nserver_key = "{self.server_key_hex}"\nroster_authority = "{self.authority_hex}"\n'
        )
        path = self.root / f"{file or f'site{i}'}-policy.toml"
        path.write_text(text)
        return path

    def coordinator_argv(self, command: list[str], port: int) -> list[str]:
        """``fedseal-server COMMAND...`` with this federation's TLS, keys, allow-list, roster."""
        return [
            str(BIN / "fedseal-server"),
            *command,
            "--certs",
            str(self.certs),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--state-dir",
            str(self.root / "srv"),
            "--keys",
            str(self.keys),
            "--out",
            str(self.root / "out"),
            "--auth-keys",
            str(self.allowed),
            "--roster",
            str(self.roster),
        ]

    def server(self, port: int, *args: str) -> subprocess.Popen[bytes]:
        proc = start(
            [
                *self.coordinator_argv(["start"], port),
                "--allow-no-dropout",  # two- and three-site secure runs tolerate no dropout
                *args,
            ],
            self.root / "server.log",
        )
        self.procs.append(proc)
        # "SuperLink listening" is printed once the SuperLink is up and site keys are registered.
        wait_for(self.root / "server.log", "SuperLink listening", proc, 90)
        return proc

    def resume(self, port: int, run_id: str, *args: str) -> subprocess.Popen[bytes]:
        """``fedseal-server resume RUN_ID`` with the same settings (not waited for)."""
        proc = start(
            [*self.coordinator_argv(["resume", run_id], port), *args], self.root / "resume.log"
        )
        self.procs.append(proc)
        return proc

    def site(
        self, i: int, port: int, policy: Path, *, key: Path | None = None, log: str | None = None
    ) -> subprocess.Popen[bytes]:
        argv = [
            str(BIN / "fedseal-client"),
            "start",
            "--data",
            str(self.root / f"site{i}.csv"),
            "--superlink",
            f"127.0.0.1:{port}",
            "--ca",
            str(self.certs / "ca.crt"),
            "--port",
            str(free_port()),
            "--state-dir",
            str(self.root / f"site{i}"),
            "--policy",
            str(policy),
            "--roster",
            str(self.roster),
            "--dataset-id",  # the identity its lifetime budget is bound to
            f"digits-site{i}",
            "--feature-bounds",  # the digits' public grey-level range: scaling without a leak
            "0:16",
        ]
        if key is not None:
            argv += ["--auth-key", str(key)]
        proc = start(argv, self.root / (log or f"site{i}.log"))
        self.procs.append(proc)
        return proc

    def intruder(self, port: int, name: str, *, key: Path | None) -> tuple[int, str]:
        """A SuperNode outside the allow-list (``key`` unknown, or none): exit code, output."""
        policy = self.site_policy(
            9, name, require_dp=False, require_secure_aggregation=False, min_cohort_size=2
        )
        argv = [
            str(BIN / "fedseal-client"),
            "start",
            "--data",
            str(self.root / "site0.csv"),
            "--superlink",
            f"127.0.0.1:{port}",
            "--ca",
            str(self.certs / "ca.crt"),
            "--port",
            str(free_port()),
            "--state-dir",
            str(self.root / name),
            "--policy",
            str(policy),
        ]
        if key is not None:
            argv += ["--auth-key", str(key)]
        log = self.root / f"{name}.log"
        proc = start(argv, log)
        self.procs.append(proc)
        code = proc.wait(timeout=120)
        return code, log.read_text()


def make_federation(root: Path, num_sites: int = 3) -> Federation:
    """Certificates, the audit key, ``num_sites`` node keys, site files and the signed roster."""
    certs, keys, allowed = root / "certs", root / "keys", root / "allowed"
    subprocess.run(
        [str(BIN / "fedseal-server"), "certs", str(certs)], check=True, capture_output=True
    )
    assert oct((certs / "server.key").stat().st_mode & 0o777) == "0o600"
    # The keys are made in-process (what `fedseal-server keys` / `fedseal-client keys` call).
    create_keypair(keys)
    raw = load_public_key(keys / "audit.pub").public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    allowed.mkdir()
    for i in range(num_sites):
        _, pub = make_node_key(root / f"site{i}.key")
        (allowed / f"site{i}.pub").write_bytes(pub.read_bytes())
        write_site_csv(root / f"site{i}.csv", i)
    sites = {f"site-{i}": (root / f"site{i}", allowed / f"site{i}.pub") for i in range(num_sites)}
    roster, authority = make_roster(root, keys / "audit.pub", sites)
    return Federation(root, certs, keys, allowed, raw.hex(), roster, authority, [])


def stop_all(fed: Federation) -> None:
    """Kill whatever ``fed`` started that still runs, with everything below it."""
    for proc in fed.procs:
        if proc.poll() is None:
            kill_tree(proc)


@pytest.fixture()
def federation(tmp_path: Path) -> Iterator[Federation]:
    fed = make_federation(tmp_path)
    try:
        yield fed
    finally:
        stop_all(fed)
