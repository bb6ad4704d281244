"""The scale benchmark's memory sampler: it sums the whole process tree, grandchildren too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.errors import ConfigurationError
from simulations.bench.scale import PeakSampler, process_tree, run_scale, tree_memory

MIB = 1024**2
# A child that starts a grandchild; each touches ALLOC_MIB of memory, then both wait.
ALLOC_MIB = 64
HOLDER = (
    "import subprocess, sys, time\n"
    f"block = bytearray({ALLOC_MIB} * {MIB})\n"
    "for i in range(0, len(block), 4096): block[i] = 1\n"
    "if sys.argv[1] == 'parent':\n"
    "    kid = subprocess.Popen([sys.executable, '-c', sys.argv[2], 'kid', sys.argv[2]])\n"
    "print('ready', flush=True)\n"
    "time.sleep(30)\n"
)


def _wait_for(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_sampler_sums_a_child_and_its_grandchild() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", HOLDER, "parent", HOLDER],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _wait_for(lambda: len(process_tree(parent.pid)) >= 2)
        _wait_for(lambda: tree_memory(parent.pid).rss_bytes >= 2 * ALLOC_MIB * MIB)
        with PeakSampler(parent.pid, period_s=0.05) as sampler:
            time.sleep(0.3)
        assert sampler.peak_processes >= 2
        assert sampler.peak_rss_bytes >= 2 * ALLOC_MIB * MIB  # one process alone is not enough
        if sampler.peak_pss_bytes is not None:
            assert sampler.peak_pss_bytes >= 2 * ALLOC_MIB * MIB * 0.9
        assert sampler.samples >= 2
        assert set(sampler.cpu_s) >= set(process_tree(parent.pid))
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()


def test_sampler_of_a_process_outside_the_tree_does_not_count_it() -> None:
    other = subprocess.Popen([sys.executable, "-c", HOLDER, "kid", HOLDER], stdout=subprocess.PIPE)
    try:
        _wait_for(lambda: tree_memory(other.pid).rss_bytes >= ALLOC_MIB * MIB)
        sleeper = subprocess.Popen(["sleep", "5"])
        try:
            mine = tree_memory(sleeper.pid)
        finally:
            sleeper.kill()
            sleeper.wait()
        assert mine.processes == 1 and mine.rss_bytes < ALLOC_MIB * MIB
    finally:
        other.kill()
        other.wait()


def test_run_scale_refuses_a_used_directory(tmp_path: Path) -> None:
    (tmp_path / "record.db").write_text("")
    with pytest.raises(ConfigurationError, match="fresh directory"):
        run_scale(["--clients", "2"], tmp_path, timeout_s=1)
