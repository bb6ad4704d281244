"""Crash-resume: a simulation killed with SIGKILL mid-run resumes from the record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.ledger import PUBLIC_SIZE_RUN, SiteLedger
from server.record import SqlRecord, load_public_key

ROUNDS = 4


def _versions(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with SqlRecord(f"sqlite:///{db}", create=False) as record:
            return len(record.list_versions())
    except Exception:  # the run may be creating the schema right now
        return 0


@pytest.mark.e2e  # a whole run (about 45 s): CI's chaos step runs it
def test_killed_simulation_resumes_without_counting_twice(tmp_path: Path) -> None:
    out = tmp_path / "run"
    base = [
        sys.executable,
        "-m",
        "simulations.cli",
        "run",
        "--clients",
        "3",
        "--rounds",
        str(ROUNDS),
        "--dp",
        "--site-epsilon",
        "8",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(
        base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while _versions(out / "record.db") < 2:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no second model version in time"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the coordinator and its Ray workers, no clean-up
        proc.wait()

    with SqlRecord(f"sqlite:///{out / 'record.db'}", create=False) as record:
        (run,) = record.list_runs()
        assert run.status != "finished"
        done_before = len(record.list_versions(run.run_id))
    assert 2 <= done_before < ROUNDS

    resumed = subprocess.run(
        [*base, "--resume", run.run_id, "--json"], capture_output=True, text=True, timeout=400
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    doc = json.loads(resumed.stdout)
    assert doc["run_id"] == run.run_id
    assert [r["round"] for r in doc["rounds"]] == list(range(1, ROUNDS + 1))
    # A secure round whose masked inputs left the sites before the kill is never redone (each
    # site releases a round once): the resumed run books it failed and goes on.
    succeeded = [r["round"] for r in doc["rounds"] if not r["failed"]]
    assert set(doc["failed_rounds"]) <= {done_before + 1}

    with SqlRecord(f"sqlite:///{out / 'record.db'}", create=False) as record:
        versions = record.list_versions(run.run_id)
        assert [v.round for v in versions] == succeeded  # no round twice
        failed = [
            e.payload()["round"] for e in record.events(run.run_id) if e.kind == "round_failed"
        ]
        assert failed == doc["failed_rounds"]
        kinds = [e.kind for e in record.events(run.run_id)]
        assert "run_resumed" in kinds and kinds[-1] == "run_finished"
        report = record.verify(load_public_key(out / "keys" / "audit.pub"))
        assert report.ok, report
        energy_rounds = sorted({(e.round, e.node_id) for e in record.energy(run.run_id)})
        assert len(energy_rounds) == len(record.energy(run.run_id))  # energy never counted twice

    for site in sorted((out / "sites").iterdir()):
        with SiteLedger(site / "ledger.db") as ledger:
            rounds = [(e.run_id, e.round) for e in ledger.history() if e.run_id != PUBLIC_SIZE_RUN]
            released = [(e.run_id, e.round) for e in ledger.releases()]
        # every round charged once; the interrupted one may be charged without a model from it
        charged = {(run.run_id, r) for r in succeeded}
        assert charged <= set(rounds) <= {(run.run_id, r) for r in range(1, ROUNDS + 1)}, site.name
        assert len(rounds) == len(set(rounds)) and len(released) == len(set(released)), site.name
    verify = subprocess.run(
        [
            str(Path(sys.executable).parent / "fedseal-server"),
            "audit",
            "verify",
            "--db",
            str(out / "record.db"),
            "--public-key",
            str(out / "keys" / "audit.pub"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0 and verify.stdout.startswith("OK:"), verify.stdout + verify.stderr
