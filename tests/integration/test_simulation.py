"""A real federation on Flower's Simulation Engine, through the CLI, in a subprocess."""

import json
import os
import subprocess
import sys

import torch

from common.config import RunConfig
from common.evaluation import evaluate
from common.task import task_for
from server.evaluation import HeldOut


def _initial_accuracy(cfg: RunConfig) -> float:
    task = task_for(cfg)
    held = HeldOut(cfg, task)
    return evaluate(task.build(seed=cfg.seed), held.x, held.y, torch.device("cpu"))[1]


def test_simulation_three_sites_two_rounds_accuracy_improves(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "simulations.cli",
        "run",
        "--clients",
        "3",
        "--rounds",
        "2",
        "--json",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)  # stdout is exactly one JSON object
    assert set(doc) >= {"run_id", "config", "rounds"} and isinstance(doc["run_id"], str)
    rounds = doc["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert isinstance(r["accuracy"], float) and isinstance(r["loss"], float)
        assert r["participants"] == 3
    baseline = _initial_accuracy(RunConfig(num_sites=3, rounds=2))
    assert rounds[-1]["accuracy"] > baseline + 0.3
    assert rounds[-1]["loss"] < rounds[0]["loss"]
    assert json.loads((tmp_path / "result.json").read_text()) == doc
