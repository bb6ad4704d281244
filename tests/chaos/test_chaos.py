"""The chaos suite: a deployment on loopback under the faults any real federation sees.

Each case runs the command lines a user types (``fedseal-server start``/``resume``,
``fedseal-client start``) as subprocesses, breaks something (kill -9 of a site, of the
coordinator's process tree, of its command line only; a restarted site; a site with bad
data; sites up before the coordinator; a full disk under the record), and then checks
what the issue asks of every case:

* the run completes, or fails the round and goes on, as designed;
* the audit chain verifies under the trusted key;
* each site's release log holds each round at most once;
* no process and no bound port is left behind.

Marked ``deployment`` and ``chaos``: the default test run skips ``chaos``; CI runs the
suite as its own step (``pytest -m chaos tests/chaos``). Every wait is bounded.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from deployment import (
    BIN,
    Federation,
    free_port,
    kill_tree,
    make_federation,
    node_id,
    stop_all,
    versions,
    wait_for,
)

from client.ledger import SiteLedger
from server.record import SqlRecord
from server.record.keys import load_public_key

pytestmark = [pytest.mark.deployment, pytest.mark.chaos]

RUN_TIMEOUT_S = 420


@pytest.fixture()
def fed3(tmp_path: Path) -> Iterator[Federation]:
    fed = make_federation(tmp_path, 3)
    try:
        yield fed
    finally:
        stop_all(fed)
        _assert_nothing_left(tmp_path)


@pytest.fixture()
def fed4(tmp_path: Path) -> Iterator[Federation]:
    fed = make_federation(tmp_path, 4)
    try:
        yield fed
    finally:
        stop_all(fed)
        _assert_nothing_left(tmp_path)


# ----------------------------------------------------------------------------- checks
def _ours(root: Path) -> list[tuple[int, str]]:
    """Live processes started for this test: their command line or FLWR_HOME names ``root``."""
    mine, found = str(root), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (entry / "environ").read_bytes().decode("utf-8", "replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            continue  # a zombie holds nothing; its parent (if ours) is listed itself
        if mine in cmdline or f"FLWR_HOME={mine}" in environ:
            found.append((int(entry.name), cmdline[:200]))
    return found


def _assert_nothing_left(root: Path, within_s: float = 15.0) -> None:
    deadline = time.monotonic() + within_s
    while (left := _ours(root)) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not left, f"processes left behind: {left}"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _record(fed: Federation) -> SqlRecord:
    return SqlRecord(f"sqlite:///{fed.root / 'srv' / 'record.db'}", create=False)


def _assert_verifies(fed: Federation) -> str:
    """The record's audit chain verifies under the trusted key; the (one) run's id."""
    with _record(fed) as record:
        report = record.verify(load_public_key(fed.keys / "audit.pub"))
        assert report.ok, report.summary()
        (run,) = record.list_runs()
        return run.run_id


def _crashed_run(fed: Federation) -> str:
    """The one run of a record whose coordinator was killed: not finished; its id."""
    with _record(fed) as record:
        (run,) = record.list_runs()
        assert run.status == "running", run.status
        return run.run_id


def _assert_each_round_released_once(fed: Federation, sites: list[int]) -> None:
    for i in sites:
        path = fed.root / f"site{i}" / "site" / "ledger.db"
        if not path.exists():
            continue  # a site that never took part
        with SiteLedger(path) as ledger:
            released = [(r.run_id, r.round) for r in ledger.releases() if not r.refused]
        twice = [k for k, n in collections.Counter(released).items() if n > 1]
        assert not twice, f"site {i} released {twice} more than once"


def _finish(fed: Federation, server: subprocess.Popen[bytes]) -> dict[str, object]:
    code = server.wait(timeout=RUN_TIMEOUT_S)
    log = (fed.root / "server.log").read_text()
    assert code == 0, log[-4000:]
    doc: dict[str, object] = json.loads((fed.root / "out" / "result.json").read_text())
    return doc


def _plain_policy(fed: Federation, i: int) -> Path:
    return fed.site_policy(i, require_dp=False, require_secure_aggregation=False, min_cohort_size=2)


def _secure_policy(fed: Federation, i: int) -> Path:
    return fed.site_policy(i, require_dp=False, require_secure_aggregation=True)


def _wait_round(fed: Federation, server: subprocess.Popen[bytes], n: int, timeout_s: float) -> None:
    """Until ``n`` model versions are in the record (round ``n`` is done)."""
    db, deadline = fed.root / "srv" / "record.db", time.monotonic() + timeout_s
    while versions(db) < n:
        assert server.poll() is None, (fed.root / "server.log").read_text()[-4000:]
        assert time.monotonic() < deadline, f"round {n} not done in time"
        time.sleep(0.2)


# ------------------------------------------------------------------------------ cases
def test_kill9_one_of_four_sites_mid_round_the_secure_rounds_complete(fed4: Federation) -> None:
    """SecAgg+ over 4 sites tolerates one loss (t = 2 of k = 3): the lost site is a dropout."""
    fed, port = fed4, free_port()
    server = fed.server(
        port, "--rounds", "3", "--min-sites", "3", "--round-timeout", "40", "--no-dp", "--secagg"
    )
    sites = [fed.site(i, port, _secure_policy(fed, i), key=fed.site_key(i)) for i in range(4)]
    wait_for(fed.root / "site3.log", "Receiving: ", sites[3], 240)  # its first message
    _wait_round(fed, server, 1, 240)
    kill_tree(sites[3])  # kill -9, mid-run: its SuperNode and everything below it
    doc = _finish(fed, server)
    rounds = doc["rounds"]
    assert isinstance(rounds, list) and [r["round"] for r in rounds] == [1, 2, 3]
    assert not any(r["failed"] for r in rounds), [r["failure"] for r in rounds]
    assert [r["participants"] for r in rounds][1:] == [3, 3]
    _assert_verifies(fed)
    _assert_each_round_released_once(fed, [0, 1, 2, 3])
    assert _port_free(port)


def test_site_restarted_mid_run_rejoins_and_never_releases_a_round_twice(
    fed3: Federation,
) -> None:
    fed, port = fed3, free_port()
    server = fed.server(
        port, "--rounds", "4", "--min-sites", "2", "--round-timeout", "40", "--no-dp", "--no-secagg"
    )
    sites = [fed.site(i, port, _plain_policy(fed, i), key=fed.site_key(i)) for i in range(3)]
    _wait_round(fed, server, 1, 240)
    before = node_id(fed.root / "site1.log")
    sites[1].send_signal(signal.SIGTERM)  # a graceful stop of one site
    assert sites[1].wait(timeout=10) == 0
    fed.site(1, port, _plain_policy(fed, 1), key=fed.site_key(1), log="site1-again.log")
    doc = _finish(fed, server)
    rounds = doc["rounds"]
    assert isinstance(rounds, list) and len(rounds) == 4
    assert sum(not r["failed"] for r in rounds) >= 3, [r["failure"] for r in rounds]
    # node authentication binds the node id to the site's key: the same node id comes back
    assert node_id(fed.root / "site1-again.log") == before
    assert rounds[-1]["participants"] == 3  # and it took part again
    _assert_verifies(fed)
    _assert_each_round_released_once(fed, [0, 1, 2])


def test_coordinator_tree_killed_then_resumed_completes(fed3: Federation) -> None:
    fed, port = fed3, free_port()
    args = ("--rounds", "3", "--min-sites", "2", "--round-timeout", "40", "--no-dp", "--no-secagg")
    server = fed.server(port, *args)
    for i in range(3):
        fed.site(i, port, _plain_policy(fed, i), key=fed.site_key(i), log=f"site{i}.log")
    _wait_round(fed, server, 1, 240)
    kill_tree(server)  # SuperLink, ServerApp, `flwr run` and the CLI: nothing cleans up
    run_id = _crashed_run(fed)  # its tail after the last round's seal is sealed by resume
    resumed = fed.resume(port, run_id)
    assert resumed.wait(timeout=RUN_TIMEOUT_S) == 0, (fed.root / "resume.log").read_text()[-4000:]
    with _record(fed) as record:
        assert record.get_run(run_id).status == "finished"
        rounds = record.rounds(run_id)
        # the round cut off by the kill may have been released already: then the sites refuse
        # it again (one release per round) and it is booked failed; the run goes on after it
        assert [r.round for r in rounds] == [1, 2, 3]
        assert len(record.list_versions(run_id)) == sum(r.status != "failed" for r in rounds) >= 2
    _assert_verifies(fed)
    _assert_each_round_released_once(fed, [0, 1, 2])


def test_coordinator_cli_killed_alone_takes_its_flower_processes_along(fed3: Federation) -> None:
    """kill -9 of `fedseal-server` only: the SuperLink, ServerApp and `flwr run` follow it,
    the port is free for `resume`, which completes the run."""
    fed, port = fed3, free_port()
    args = ("--rounds", "3", "--min-sites", "2", "--round-timeout", "40", "--no-dp", "--no-secagg")
    server = fed.server(port, *args)
    for i in range(3):
        fed.site(i, port, _plain_policy(fed, i), key=fed.site_key(i))
    _wait_round(fed, server, 1, 240)
    os.kill(server.pid, signal.SIGKILL)  # the command line alone
    server.wait(timeout=10)
    srv = fed.root / "srv"
    deadline = time.monotonic() + 15
    while any(str(srv) in c for _, c in _ours(fed.root)) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not [p for p in _ours(fed.root) if str(srv) in p[1]], "coordinator processes left"
    assert _port_free(port)
    run_id = _crashed_run(fed)
    resumed = fed.resume(port, run_id)
    assert resumed.wait(timeout=RUN_TIMEOUT_S) == 0, (fed.root / "resume.log").read_text()[-4000:]
    _assert_verifies(fed)
    _assert_each_round_released_once(fed, [0, 1, 2])


def test_bad_data_site_among_good_ones_is_refused_at_admission(fed4: Federation) -> None:
    fed, port = fed4, free_port()
    bad = fed.root / "site3.csv"
    lines = bad.read_text().splitlines()
    bad.write_text(  # 63 features: drop the first column
        "\n".join(",".join(line.split(",")[1:]) for line in lines) + "\n"
    )
    server = fed.server(
        port, "--rounds", "2", "--min-sites", "3", "--round-timeout", "40", "--no-dp", "--secagg"
    )
    for i in range(4):
        fed.site(i, port, _secure_policy(fed, i), key=fed.site_key(i))
    doc = _finish(fed, server)
    rounds = doc["rounds"]
    assert isinstance(rounds, list) and all(not r["failed"] for r in rounds)
    assert all(r["participants"] == 3 and r["sampled"] == 3 for r in rounds)
    with _record(fed) as record:
        (run,) = record.list_runs()
        refused = [
            e.payload()
            for e in record.events(run.run_id)
            if e.kind == "site_refused" and e.payload().get("stage") == "admission"
        ]
    assert [r["node_id"] for r in refused] == [node_id(fed.root / "site3.log")]
    assert "feature count" in refused[0]["reason"]
    _assert_verifies(fed)


def test_sites_up_before_the_coordinator_wait_and_the_run_waits_for_all_of_them(
    fed3: Federation,
) -> None:
    fed, port = fed3, free_port()
    early = [fed.site(i, port, _plain_policy(fed, i), key=fed.site_key(i)) for i in range(2)]
    wait_for(fed.root / "site0.log", "waiting for it: retry", early[0], 60)
    server = fed.server(
        port, "--rounds", "2", "--min-sites", "2", "--round-timeout", "40", "--no-dp", "--no-secagg"
    )
    time.sleep(2)
    fed.site(2, port, _plain_policy(fed, 2), key=fed.site_key(2))  # the late one
    doc = _finish(fed, server)
    rounds = doc["rounds"]
    assert isinstance(rounds, list) and all(r["sampled"] == 3 for r in rounds)  # not 2 of 3
    _assert_verifies(fed)
    _assert_each_round_released_once(fed, [0, 1, 2])


def test_full_disk_under_the_record_refused_up_front_or_resumed_after_space_is_freed(
    fed3: Federation,
) -> None:
    """A small tmpfs under ``--db``: too small is one line before anything starts; filled
    mid-run, the run stops with one line naming the cause, and `resume` finishes it once
    there is space again; the chain verifies."""
    fed, port = fed3, free_port()
    disk = fed.root / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"no small tmpfs here (mount: {mounted.stderr.decode().strip()[:120]})")
    db = disk / "record.db"
    args = ("--rounds", "3", "--min-sites", "2", "--round-timeout", "40", "--no-dp", "--no-secagg")
    try:
        refused = subprocess.run(
            [
                str(BIN / "fedseal-server"),
                "start",
                "--certs",
                str(fed.certs),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--state-dir",
                str(fed.root / "srv"),
                "--keys",
                str(fed.keys),
                "--db",
                str(db),
                *args,
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 2, refused.stdout + refused.stderr
        (line,) = [x for x in refused.stderr.splitlines() if x.startswith("error:")]
        assert "KiB free" in line and str(db) in line
        assert not db.exists() and _port_free(port)

        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        server = fed.server(port, *args, "--db", str(db))
        for i in range(3):
            fed.site(i, port, _plain_policy(fed, i), key=fed.site_key(i))
        deadline = time.monotonic() + 240
        while versions(db) < 1:
            assert server.poll() is None, (fed.root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "round 1 not done in time"
            time.sleep(0.2)
        filler = disk / "filler"
        with filler.open("wb") as fh:  # take every byte left
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
        code = server.wait(timeout=RUN_TIMEOUT_S)
        log = (fed.root / "server.log").read_text()
        assert code != 0, log[-3000:]
        errors = [x for x in log.splitlines() if x.startswith("error:")]
        assert len(errors) == 1, log[-3000:]
        assert "did not end" in errors[0] and "fedseal-server resume" in errors[0]
        assert "space" in errors[0].lower() or "full" in errors[0].lower(), errors[0]
        assert _port_free(port)
        filler.unlink()
        with SqlRecord(f"sqlite:///{db}", create=False) as record:
            (run,) = record.list_runs()
        resumed = fed.resume(port, run.run_id, "--db", str(db))
        assert resumed.wait(timeout=RUN_TIMEOUT_S) == 0, (fed.root / "resume.log").read_text()[
            -3000:
        ]
        with SqlRecord(f"sqlite:///{db}", create=False) as record:
            assert record.verify(load_public_key(fed.keys / "audit.pub")).ok
            assert record.get_run(run.run_id).status == "finished"
        _assert_each_round_released_once(fed, [0, 1, 2])
    finally:
        stop_all(fed)
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
