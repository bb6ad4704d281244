"""Distributed DP through ``fedseal-sim run``: sites noise, the coordinator decodes, accounts.

Flower's Simulation Engine in a subprocess (4 sites, 2 rounds, secure
aggregation at 20 ring bits, a client-level epsilon target): every round is
released with the Skellam accountant's epsilon, below the target, and the
privacy block names the mechanism.
"""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_distributed_dp_simulation_releases_every_round_within_the_target(tmp_path):
    target = 5.0
    cmd = [
        sys.executable, "-m", "simulations.cli", "run",
        "--clients", "4", "--rounds", "2", "--distributed-dp", "--secagg-bits", "20",
        "--client-epsilon", str(target), "--dataset", "breast_cancer", "--model", "linear",
        "--local-epochs", "1", "--cpus-per-client", "2",
        "--json", "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["failed_rounds"] == []
    eps = [r["client_level_epsilon"] for r in doc["rounds"]]
    assert all(e is not None for e in eps) and eps[0] < eps[1] <= target
    block = doc["privacy"]["client_level"]
    assert block["mechanism"] == "distributed-skellam"
    assert block["accountant"] == "rdp-skellam"
    assert block["bits"] == 20 and block["padded_length"] >= block["vector_length"]
    for r in doc["rounds"]:  # counts withheld, as under central client-level DP
        assert r["participants"] is None and r["sites"] == []
    assert "distributed-skellam" in proc.stderr
    # the HTML report names the mechanism too
    assert "distributed-skellam" in (tmp_path / "report" / "report.html").read_text()
