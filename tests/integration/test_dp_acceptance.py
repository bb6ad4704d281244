"""Issue 3's acceptance run (slow, and non-deterministic: DP noise comes from OS entropy)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_dp_epsilon_3_ten_rounds_reaches_080_within_budget(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulations.cli",
            "run",
            "--dp",
            "--site-epsilon",
            "3",
            "--site-delta",
            "1e-5",
            "--rounds",
            "10",
            "--json",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["rounds"][-1]["accuracy"] >= 0.80
    eps = [s["record_level_epsilon"] for r in doc["rounds"] for s in r["sites"] if s["accepted"]]
    assert eps and max(eps) <= 3.0
