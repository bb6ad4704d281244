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
import socket
import subprocess
import time
from pathlib import Path

import pytest
from deployment import (
    BIN,
    Federation,
    free_port,
    kill,
    kill_tree,
    make_audit_key,
    make_roster,
    node_id,
    start,
    versions,
    wait_for,
    write_site_csv,
)

from common.pki import make_node_key
from server.record import SqlRecord
from server.record.keys import load_public_key

pytestmark = pytest.mark.deployment


@pytest.mark.e2e  # minutes: CI's own step, with the chaos suite
def test_deployment_three_sites_own_policies_one_refuses_the_run_completes(
    federation: Federation, tmp_path: Path
) -> None:
    """TLS + node auth, DP-SGD, no secure aggregation; each site enforces its own policy file.

    Sites 0 and 1 allow rounds without secure aggregation; site 2 keeps the
    shipped default's ``require_secure_aggregation``, so its own policy refuses
    every round (the coordinator's settings do not decide for it).
    """
    port = free_port()
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
    node = node_id(tmp_path / f"site{refusing}.log")
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
    port = free_port()
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
    while versions(db) < 1:
        assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "no model version in time"
        time.sleep(0.2)
    kill_tree(server)  # SuperLink, its ServerApp and `flwr run` too: nothing cleans up
    with SqlRecord(f"sqlite:///{db}", create=False) as record:
        (run,) = record.list_runs()
        assert run.status != "finished"
        done_before = len(record.list_versions(run.run_id))
    assert 1 <= done_before < rounds

    # No --auth-keys, no --policy, no --roster: the allow-list and the paths come from the record.
    resumed = start(
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
    wait_for(tmp_path / "resume.log", "SuperLink listening", resumed, 90)
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
    assert trained == {node_id(tmp_path / f"site{i}.log") for i in range(2)}


@pytest.mark.e2e  # minutes: CI's own step, with the chaos suite
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
        write_site_csv(tmp_path / f"site{i}.csv", i)
    # the coordinator's audit key, made beforehand so that the sites can pin it
    audit_keys = tmp_path / "audit-keys"
    subprocess.run(
        [str(BIN / "fedseal-server"), "keys", str(audit_keys)], check=True, capture_output=True
    )
    roster, authority = make_roster(
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
    port = free_port()
    out = tmp_path / "out"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        server = start(
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
                start(
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
                        str(free_port()),
                        "--state-dir",
                        str(tmp_path / f"site{i}"),
                        "--auth-key",
                        str(keys / f"site{i}"),
                        "--roster",
                        str(roster),
                        "--policy",
                        str(site_policy),
                        "--dataset-id",
                        f"digits-site{i}",
                        "--feature-bounds",
                        "0:16",
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
                str(free_port()),
                "--state-dir",
                str(tmp_path / "site9"),
                "--auth-key",
                str(stranger / "site9"),
                "--dataset-id",
                "site9",
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
            kill(p)


def test_server_start_missing_certs_one_clear_line(tmp_path: Path) -> None:
    make_audit_key(tmp_path / "srv")
    proc = subprocess.run(
        [
            str(BIN / "fedseal-server"),
            "start",
            "--no-secagg",  # the cohort check comes first for a two-site secure run
            "--certs",
            str(tmp_path / "none"),
            "--port",
            str(free_port()),
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
    make_audit_key(tmp_path / "srv")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(
            [
                str(BIN / "fedseal-server"),
                "start",
                "--no-secagg",  # the cohort check comes first for a two-site secure run
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
            "--no-secagg",  # the cohort check comes first for a two-site secure run
            "--insecure",
            "--port",
            str(free_port()),
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
            f"127.0.0.1:{free_port()}",
            "--insecure",
            "--port",
            str(free_port()),
            "--state-dir",
            str(tmp_path / "s"),
            "--max-retries",  # the default (0) waits for the SuperLink forever
            "1",
            "--dataset-id",
            "d",
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
