"""Flower's Deployment Engine on loopback: fedseal-server (SuperLink + ServerApp, TLS) and sites.

The sites' own policies are in force (``fedseal-client start --policy``), and a
coordinator killed mid-run is resumed with the node authentication, allow-list,
server policy, signing key and roster it was started with. Every site has an
identity key (``fedseal-client identity init``) and the federation a roster made
with ``fedseal-server roster init/add/sign`` (as a user would, by subprocess); the
sites pin the roster authority in their policies and start with ``--roster``.
"""

from __future__ import annotations

import json
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

pytestmark = pytest.mark.deployment
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_site_csv(path: Path, start: int) -> None:
    d = load_digits()
    idx = np.arange(start, len(d.target), 2)[:500]
    rows = [",".join([f"f{j}" for j in range(64)] + ["label"])]
    rows += [",".join(str(v) for v in d.data[k]) + f",{d.target[k]}" for k in idx]
    path.write_text("\n".join(rows) + "\n")


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _make_audit_key(state_dir: Path) -> None:
    """The coordinator's signing key where `start` looks by default (it is never made implicitly)."""
    subprocess.run(
        [str(BIN / "fedseal-server"), "keys", str(state_dir / "keys")],
        check=True,
        capture_output=True,
    )


def _cli(*argv: str) -> str:
    """Run a fedseal command line (``fedseal-server ...``/``fedseal-client ...``); its stdout."""
    proc = subprocess.run(
        [str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _make_roster(
    root: Path, audit_pub: Path, sites: dict[str, tuple[Path, Path]]
) -> tuple[Path, str]:
    """Each site's identity (``identity init`` in its state dir), then the signed roster.

    ``sites`` maps a site's name to (its ``--state-dir``, its node-auth ``.pub``). Returns the
    roster file and the authority's public key (hex), which the sites pin.
    """
    roster, authority = root / "roster.json", root / "authority" / "roster-authority.key"
    authority.parent.mkdir()
    out = _cli(
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
        identity = _cli("fedseal-client", "identity", "init", "--state-dir", str(state_dir)).strip()
        _cli(
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
    _cli(
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


def _kill(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue


def _wait_for(path: Path, text: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in (path.read_text() if path.exists() else ""):
        assert proc.poll() is None, path.read_text()[-4000:]
        assert time.monotonic() < deadline, f"{text!r} not in {path.name} in time"
        time.sleep(0.3)


def _descendants(pid: int) -> list[int]:
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
    return found


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` and every process below it, by PID: a crash, no clean-up.

    The tree is frozen first (SIGSTOP, until no new descendant appears), so that
    nothing forks away from it between listing and killing.
    """
    tree = [proc.pid]
    while True:
        _signal(tree, signal.SIGSTOP)
        found = [proc.pid, *_descendants(proc.pid)]
        if set(found) == set(tree):
            break
        tree = found
    _signal(tree, signal.SIGKILL)
    proc.wait(timeout=30)


def _node_id(log: Path) -> str:
    found = re.findall(r"SuperNode ID: (\d+)", log.read_text())
    assert found, log.read_text()[-2000:]
    return found[-1]


def _versions(db: Path) -> int:
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

    def server(self, port: int, *args: str) -> subprocess.Popen[bytes]:
        proc = _start(
            [
                str(BIN / "fedseal-server"),
                "start",
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
                "--allow-no-dropout",  # two- and three-site secure runs tolerate no dropout
                *args,
            ],
            self.root / "server.log",
        )
        self.procs.append(proc)
        # "SuperLink listening" is printed once the SuperLink is up and site keys are registered.
        _wait_for(self.root / "server.log", "SuperLink listening", proc, 90)
        return proc

    def site(
        self, i: int, port: int, policy: Path, *, key: Path | None = None
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
            str(_free_port()),
            "--state-dir",
            str(self.root / f"site{i}"),
            "--policy",
            str(policy),
            "--roster",
            str(self.roster),
        ]
        if key is not None:
            argv += ["--auth-key", str(key)]
        proc = _start(argv, self.root / f"site{i}.log")
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
            str(_free_port()),
            "--state-dir",
            str(self.root / name),
            "--policy",
            str(policy),
        ]
        if key is not None:
            argv += ["--auth-key", str(key)]
        log = self.root / f"{name}.log"
        proc = _start(argv, log)
        self.procs.append(proc)
        code = proc.wait(timeout=120)
        return code, log.read_text()


@pytest.fixture()
def federation(tmp_path: Path) -> Iterator[Federation]:
    certs, keys, allowed = tmp_path / "certs", tmp_path / "keys", tmp_path / "allowed"
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
    for i in range(3):
        _, pub = make_node_key(tmp_path / f"site{i}.key")
        (allowed / f"site{i}.pub").write_bytes(pub.read_bytes())
        _write_site_csv(tmp_path / f"site{i}.csv", i)
    sites = {f"site-{i}": (tmp_path / f"site{i}", allowed / f"site{i}.pub") for i in range(3)}
    roster, authority = _make_roster(tmp_path, keys / "audit.pub", sites)
    fed = Federation(tmp_path, certs, keys, allowed, raw.hex(), roster, authority, [])
    try:
        yield fed
    finally:
        for proc in fed.procs:  # whatever still runs, with everything below it
            if proc.poll() is None:
                _kill_tree(proc)


def test_deployment_three_sites_own_policies_one_refuses_the_run_completes(
    federation: Federation, tmp_path: Path
) -> None:
    """TLS + node auth, DP-SGD, no secure aggregation; each site enforces its own policy file.

    Sites 0 and 1 allow rounds without secure aggregation; site 2 keeps the
    shipped default's ``require_secure_aggregation``, so its own policy refuses
    every round (the coordinator's settings do not decide for it).
    """
    port = _free_port()
    server = federation.server(
        port, "--rounds", "2", "--min-sites", "2", "--round-timeout", "150", "--dp", "--no-secagg"
    )
    refusing = 2
    for i in range(3):
        policy = federation.site_policy(i, require_secure_aggregation=i == refusing)
        federation.site(i, port, policy, key=federation.site_key(i))
    # A site whose key the coordinator never allow-listed is refused.
    stranger, _ = make_node_key(tmp_path / "stranger" / "site9")
    code, output = federation.intruder(port, "site9", key=stranger)
    assert code == 1 and "not registered" in output, output[-2000:]
    code = server.wait(timeout=300)
    log = (tmp_path / "server.log").read_text()
    assert code == 0, log[-4000:]
    doc = json.loads((tmp_path / "out" / "result.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    assert all(r["participants"] == 2 and r["sampled"] == 3 for r in doc["rounds"])
    eps = [s["record_level_epsilon"] for r in doc["rounds"] for s in r["sites"] if not s["refused"]]
    assert len(eps) == 4 and all(e is not None and 0 < e <= 8.0 for e in eps)  # DP-SGD ran
    assert doc["rounds"][-1]["accuracy"] > 0.5

    # Each site printed the policy and the roster in force (its own file, by hash) before connecting.
    for i in range(3):
        site_log = (tmp_path / f"site{i}.log").read_text()
        assert f"site policy in force: {tmp_path / f'site{i}-policy.toml'}, sha256 " in site_log
        assert "roster in force: federation 'loopback', version 1, 3 members" in site_log
        assert f"this site is 'site-{i}'" in site_log
    # The refusing site's own policy decided, and the coordinator's audit log names it.
    node = _node_id(tmp_path / f"site{refusing}.log")
    with SqlRecord(f"sqlite:///{tmp_path / 'srv' / 'record.db'}", create=False) as record:
        (run,) = record.list_runs()
        events = record.events(run.run_id)
        assert record.verify(load_public_key(federation.keys / "audit.pub")).ok
    refused = [e.payload() for e in events if e.kind == "site_refused"]
    assert {r["node_id"] for r in refused} == {node}
    assert len(refused) == 2 and all(
        "rounds.require_secure_aggregation" in r["reason"] for r in refused
    )
    decisions = [e.payload() for e in events if e.kind == "site_policy_decisions"]
    assert node in {d["node_id"] for d in decisions}
    # The start's deployment settings are sealed in the run's history.
    (settings,) = [e.payload() for e in events if e.kind == "run_settings"]
    assert settings["tls"] and settings["node_auth"] and len(settings["auth_keys"]) == 3
    assert settings["signing_key_sha256"] and not settings["resumed"]
    (roster,) = [e.payload() for e in events if e.kind == "roster"]
    assert roster["federation"] == "loopback" and roster["version"] == 1 and roster["members"] == 3


@pytest.mark.slow  # 2-3 minutes on two cores (every SecAgg+ stage is a new ClientApp process)
def test_killed_coordinator_resumes_with_node_auth_its_allow_list_and_policy(
    federation: Federation, tmp_path: Path
) -> None:
    """Kill the coordinator's whole process tree mid-run; `resume` restores what `start` set up.

    Two sites, SecAgg+ (no DP-SGD, to keep it short), a server policy requiring it.
    """
    port = _free_port()
    server_policy = tmp_path / "server-policy.toml"
    server_policy.write_text(  # two sites: SecAgg+'s threshold is 1
        'kind = "server"\nname = "resume test"\n[secure_aggregation]\nrequired = true\nmin_threshold = 1\n'
    )
    rounds = 2
    server = federation.server(
        port,
        "--rounds",
        str(rounds),
        "--min-sites",
        "2",
        "--round-timeout",
        "120",
        "--no-dp",
        "--secagg",
        "--policy",
        str(server_policy),
        "--wait-sites",
        "2",  # two of the roster's three members take part
    )
    # two sites: t = k = 1, below the default secure-aggregation floors, which these sites lower
    secure = {
        "require_dp": False,
        "require_secure_aggregation": True,
        "min_cohort_size": 2,
        "min_secagg_threshold": 1,
        "min_secagg_neighbours": 1,
    }
    for i in range(2):
        federation.site(i, port, federation.site_policy(i, **secure), key=federation.site_key(i))
    db = tmp_path / "srv" / "record.db"
    deadline = time.monotonic() + 240
    while _versions(db) < 1:
        assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "no model version in time"
        time.sleep(0.2)
    _kill_tree(server)  # SuperLink, its ServerApp and `flwr run` too: nothing cleans up
    with SqlRecord(f"sqlite:///{db}", create=False) as record:
        (run,) = record.list_runs()
        assert run.status != "finished"
        done_before = len(record.list_versions(run.run_id))
    assert 1 <= done_before < rounds

    # No --auth-keys, no --policy, no --roster: the allow-list and the paths come from the record.
    resumed = _start(
        [
            str(BIN / "fedseal-server"),
            "resume",
            run.run_id,
            "--certs",
            str(federation.certs),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--state-dir",
            str(tmp_path / "srv"),
            "--keys",
            str(federation.keys),
            "--out",
            str(tmp_path / "out2"),
        ],
        tmp_path / "resume.log",
    )
    federation.procs.append(resumed)
    _wait_for(tmp_path / "resume.log", "SuperLink listening", resumed, 90)
    assert "node authentication (3 allow-listed keys)" in (tmp_path / "resume.log").read_text()
    # A SuperNode with no key at all is refused by the resumed SuperLink.
    code, output = federation.intruder(port, "keyless", key=None)
    assert code == 1 and "not registered" in output, output[-2000:]
    code = resumed.wait(timeout=300)
    assert code == 0, (tmp_path / "resume.log").read_text()[-4000:]

    doc = json.loads((tmp_path / "out2" / "result.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == list(range(1, rounds + 1))
    assert all(r["participants"] == 2 and r["secagg"]["participants"] == 2 for r in doc["rounds"])
    with SqlRecord(f"sqlite:///{db}", create=False) as record:
        assert [v.round for v in record.list_versions(run.run_id)] == list(range(1, rounds + 1))
        events = record.events(run.run_id)
        assert record.verify(load_public_key(federation.keys / "audit.pub")).ok
    kinds = [e.kind for e in events]
    after = len(kinds) - kinds[::-1].index("run_resumed")
    # The server policy is in force again: its decisions are recorded after the resume.
    assert "policy_decision" in kinds[after:] and kinds[-1] == "run_finished"
    # The settings it resumed with are sealed right after `run_resumed`, equal to the start's.
    start_settings, resume_settings = [e.payload() for e in events if e.kind == "run_settings"]
    assert kinds[after] == "run_settings" and resume_settings["resumed"]
    for field in (
        "tls",
        "ca_cert_sha256",
        "server_cert_sha256",
        "node_auth",
        "auth_keys",
        "policy_sha256",
        "signing_key_sha256",
    ):
        assert resume_settings[field] == start_settings[field], field
    start_roster, resume_roster = [e.payload() for e in events if e.kind == "roster"]
    assert resume_roster["resumed"] and resume_roster["sha256"] == start_roster["sha256"]
    # Only allow-listed sites ever trained: the keyless SuperNode never got a node id in.
    trained = {str(s["node_id"]) for r in doc["rounds"] for s in r["sites"]}
    assert trained == {_node_id(tmp_path / f"site{i}.log") for i in range(2)}


def test_deployment_tls_node_auth_two_sites_two_rounds_complete(tmp_path: Path) -> None:
    """SecAgg+ and DP-SGD over TLS and node authentication, every instruction signed and checked.

    The sites pin no coordinator key themselves: their policy pins the roster authority,
    and the verified roster names the coordinator's key, which every instruction must carry.
    """
    certs = tmp_path / "certs"
    subprocess.run(
        [str(BIN / "fedseal-server"), "certs", str(certs)], check=True, capture_output=True
    )
    assert oct((certs / "server.key").stat().st_mode & 0o777) == "0o600"
    keys, stranger = tmp_path / "allowed", tmp_path / "stranger"
    for stem in (keys / "site0", keys / "site1", stranger / "site9"):
        subprocess.run(
            [str(BIN / "fedseal-client"), "keys", str(stem)], check=True, capture_output=True
        )
    for i in range(2):
        _write_site_csv(tmp_path / f"site{i}.csv", i)
    # the coordinator's audit key, made beforehand so that the sites can pin it
    audit_keys = tmp_path / "audit-keys"
    subprocess.run(
        [str(BIN / "fedseal-server"), "keys", str(audit_keys)], check=True, capture_output=True
    )
    roster, authority = _make_roster(
        tmp_path,
        audit_keys / "audit.pub",
        {f"site-{i}": (tmp_path / f"site{i}", keys / f"site{i}.pub") for i in range(2)},
    )
    # Two sites are below the shipped default policy's cohort and threshold floors: a site
    # that accepts two-site secure rounds says so in its own policy.
    site_policy = tmp_path / "two-site-policy.toml"
    site_policy.write_text(
        'kind = "site"\n[rounds]\nmin_cohort_size = 2\nmin_secagg_threshold = 1\n'
        f'min_secagg_neighbours = 1\n[trust]\nroster_authority = "{authority}"\n'
    )
    port = _free_port()
    out = tmp_path / "out"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        server = _start(
            [
                str(BIN / "fedseal-server"),
                "start",
                "--certs",
                str(certs),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--rounds",
                "2",
                "--min-sites",
                "2",
                "--round-timeout",
                "150",
                "--state-dir",
                str(tmp_path / "srv"),
                "--out",
                str(out),
                "--auth-keys",
                str(keys),
                "--keys",
                str(audit_keys),
                "--roster",
                str(roster),
                "--dp",
                "--secagg",
                "--allow-no-dropout",
            ],
            tmp_path / "server.log",
        )
        procs.append(server)
        # "SuperLink listening" is printed once the SuperLink is up and site keys are registered.
        deadline = time.monotonic() + 90
        while "SuperLink listening" not in (tmp_path / "server.log").read_text():
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "SuperLink did not come up"
            time.sleep(0.3)
        for i in range(2):
            procs.append(
                _start(
                    [
                        str(BIN / "fedseal-client"),
                        "start",
                        "--data",
                        str(tmp_path / f"site{i}.csv"),
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--ca",
                        str(certs / "ca.crt"),
                        "--port",
                        str(_free_port()),
                        "--state-dir",
                        str(tmp_path / f"site{i}"),
                        "--auth-key",
                        str(keys / f"site{i}"),
                        "--roster",
                        str(roster),
                        "--policy",
                        str(site_policy),
                    ],
                    tmp_path / f"site{i}.log",
                )
            )
        # A site whose key the coordinator never allow-listed is refused.
        intruder = subprocess.run(
            [
                str(BIN / "fedseal-client"),
                "start",
                "--data",
                str(tmp_path / "site0.csv"),
                "--superlink",
                f"127.0.0.1:{port}",
                "--ca",
                str(certs / "ca.crt"),
                "--port",
                str(_free_port()),
                "--state-dir",
                str(tmp_path / "site9"),
                "--auth-key",
                str(stranger / "site9"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert intruder.returncode == 1
        assert "not registered" in intruder.stderr, intruder.stderr[-2000:]
        code = server.wait(timeout=240)
        log = (tmp_path / "server.log").read_text()
        assert code == 0, log[-4000:]
        doc = json.loads((out / "result.json").read_text())
        assert [r["round"] for r in doc["rounds"]] == [1, 2]
        assert all(r["participants"] == 2 for r in doc["rounds"])
        assert all(r["secagg"]["participants"] == 2 for r in doc["rounds"])
        eps = [s["record_level_epsilon"] for r in doc["rounds"] for s in r["sites"]]
        assert all(e is not None and 0 < e <= 8.0 for e in eps)  # DP-SGD ran at both sites
        assert doc["rounds"][-1]["accuracy"] > 0.5
        verify = subprocess.run(
            [
                str(BIN / "fedseal-server"),
                "audit",
                "verify",
                "--db",
                str(tmp_path / "srv" / "record.db"),
                "--public-key",
                str(audit_keys / "audit.pub"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert verify.returncode == 0 and verify.stdout.startswith("OK:"), (
            verify.stdout + verify.stderr
        )
        # every message (each in a fresh ClientApp process) was verified under the key the
        # roster names, and the final signed head reached both sites after the run ended
        from client.witness import read_heads

        seq_files = [tmp_path / f"site{i}" / "site" / "instruction-seq.json" for i in range(2)]
        assert all(f.is_file() for f in seq_files)
        from server.record import SqlRecord

        with SqlRecord(f"sqlite:///{tmp_path / 'srv' / 'record.db'}", create=False) as record:
            final, last = record.latest_seal(), record.events()[-1]
        assert final is not None and last.kind == "run_finished" and final.seq == last.seq
        for i in range(2):
            assert read_heads(tmp_path / f"site{i}" / "site" / "witnessed-heads.jsonl")[-1] == final
    finally:
        for p in procs:
            _kill(p)


def test_server_start_missing_certs_one_clear_line(tmp_path: Path) -> None:
    _make_audit_key(tmp_path / "srv")
    proc = subprocess.run(
        [
            str(BIN / "fedseal-server"),
            "start",
            "--certs",
            str(tmp_path / "none"),
            "--port",
            str(_free_port()),
            "--state-dir",
            str(tmp_path / "srv"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "missing TLS files" in proc.stderr and "Traceback" not in proc.stderr


def test_server_start_port_in_use_one_clear_line(tmp_path: Path) -> None:
    subprocess.run(
        [str(BIN / "fedseal-server"), "certs", str(tmp_path / "c")], check=True, capture_output=True
    )
    _make_audit_key(tmp_path / "srv")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(
            [
                str(BIN / "fedseal-server"),
                "start",
                "--certs",
                str(tmp_path / "c"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--state-dir",
                str(tmp_path / "srv"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr


def test_server_start_without_audit_key_one_clear_line_and_no_key_made(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            str(BIN / "fedseal-server"),
            "start",
            "--insecure",
            "--port",
            str(_free_port()),
            "--state-dir",
            str(tmp_path / "srv"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert f"fedseal-server keys {tmp_path / 'srv' / 'keys'}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "srv" / "keys").exists()


def test_client_start_unreachable_superlink_one_clear_line(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("a,label\n1,0\n")
    proc = subprocess.run(
        [
            str(BIN / "fedseal-client"),
            "start",
            "--data",
            str(data),
            "--superlink",
            f"127.0.0.1:{_free_port()}",
            "--insecure",
            "--port",
            str(_free_port()),
            "--state-dir",
            str(tmp_path / "s"),
            "--max-retries",  # the default (0) waits for the SuperLink forever
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "cannot reach the SuperLink" in proc.stderr and "Traceback" not in proc.stderr


def test_server_start_without_tls_choice_refused(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(BIN / "fedseal-server"), "start", "--state-dir", str(tmp_path / "srv")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--insecure" in proc.stderr
