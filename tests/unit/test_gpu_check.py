"""The GPU check script and the energy meter's NVML path.

The script must say, in one line and with a non-zero exit, that there is no
CUDA device rather than record nothing as if it had run (this machine has
none). The NVML test runs only on a CUDA machine (marker ``gpu``, run by the
script itself).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "simulations" / "bench" / "gpu_check.sh"


def test_gpu_check_without_a_device_says_so_and_runs_nothing(tmp_path: Path) -> None:
    results = SCRIPT.parent / "RESULTS.md"
    before = results.read_bytes()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert "no CUDA device visible" in done.stderr and "nothing run" in done.stderr
    assert results.read_bytes() == before  # no figures recorded for a run that did not happen


@pytest.mark.gpu
def test_energy_meter_reads_the_gpu_through_nvml_under_load() -> None:
    import torch

    from common.energy import EnergyConfig, make_meter, open_carbontracker_sources

    labels = [f"{s.label}({s.component})" for s in open_carbontracker_sources()]
    assert any(label.startswith("nvml") for label in labels), labels
    meter = make_meter(EnergyConfig(sample_interval_s=0.1))
    meter.start()
    x = torch.randn(4096, 4096, device="cuda")
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        x = torch.tanh(x @ x)
    torch.cuda.synchronize()
    reading = meter.stop()
    assert "nvml(gpu)" in reading.source and not reading.estimated
    assert reading.kwh > 0
