"""The scale benchmark: one ``fedseal-sim run`` of many sites, timed, its memory sampled.

``fedseal-sim bench scale`` runs ``fedseal-sim run`` as a child process (the
same command a user types, so the figure is that command's) and samples, a
few times a second, the memory of the child's whole process tree: the
ServerApp's process and everything under it (Ray's GCS, raylet, every
worker actor, their helpers). The peak of the *sum* is the figure:

- **PSS** (proportional set size, ``/proc/<pid>/smaps_rollup``) where the
  kernel offers it: a page shared by k processes counts 1/k in each, so the
  sum is the memory the tree really occupies (shared libraries and Ray's
  shared-memory object store counted once);
- **RSS** (``/proc/<pid>/status`` ``VmRSS``) beside it: the sum
  over-counts shared pages (an upper bound), and is the only figure where
  PSS is unreadable.

It also keeps each process's CPU time (user + system) as last seen: their
sum is the work the run did on all cores together, which on a shared
machine says more than the wall time (``cpu_s / cores`` is the wall time
the same work needs at best on an idle machine of that many cores).

Linux only (it reads ``/proc``); a sampler period of 0.2 s misses peaks
shorter than that. Nothing here touches the run's privacy: it reads
process memory sizes and the run's own ``result.json``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from common.errors import ConfigurationError

PROC = Path("/proc")
SAMPLE_PERIOD_S = 0.2
RESULT_FILE = "scale.json"


@dataclass(frozen=True, slots=True)
class TreeMemory:
    """One sample of a process tree: summed PSS and RSS in bytes, how many processes, and
    each one's CPU seconds so far (user + system, ``/proc/<pid>/stat``)."""

    pss_bytes: int | None  # None: some process's PSS was unreadable
    rss_bytes: int
    processes: int
    cpu_s: dict[int, float] = field(default_factory=dict)


def _process_table() -> tuple[dict[int, list[int]], dict[int, int]]:
    """Parent pid -> child pids, and pid -> session id, for every process /proc lists now."""
    children: dict[int, list[int]] = {}
    sessions: dict[int, int] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # pid (comm) state ppid pgrp session ...: comm may hold spaces or parentheses
        fields = stat[stat.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        sessions[int(entry.name)] = int(fields[3])
    return children, sessions


def process_tree(root: int) -> list[int]:
    """``root``, every process below it, and every process of the session ``root`` leads.

    The session catches processes that left the tree: a Ray worker whose
    parent exited is adopted by init but stays in the session of the run
    that started it (:func:`run_scale` starts the run as a session leader).
    """
    children, sessions = _process_table()
    tree = {root} | {pid for pid, sid in sessions.items() if sid == root}
    todo = list(tree)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in tree:
                tree.add(child)
                todo.append(child)
    return sorted(tree)


def _kib_field(path: Path, name: str) -> int | None:
    """The ``name:  <n> kB`` value of a /proc status-like file, in bytes (None: unreadable)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    return None


_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds ``pid`` has used so far (None: it is gone)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S  # utime, stime


def tree_memory(root: int) -> TreeMemory:
    """The summed PSS and RSS of ``root``'s process tree now, and each process's CPU time."""
    pss_total: int | None = 0
    rss_total = 0
    count = 0
    cpu: dict[int, float] = {}
    for pid in process_tree(root):
        rss = _kib_field(PROC / str(pid) / "status", "VmRSS")
        if rss is None:
            continue  # exited, or a kernel thread
        count += 1
        rss_total += rss
        pss = _kib_field(PROC / str(pid) / "smaps_rollup", "Pss")
        pss_total = None if pss is None or pss_total is None else pss_total + pss
        if (used := _cpu_seconds(pid)) is not None:
            cpu[pid] = used
    return TreeMemory(pss_total, rss_total, count, cpu)


@dataclass(slots=True)
class PeakSampler:
    """Samples :func:`tree_memory` of ``root`` in a thread; keeps the peaks.

    Use as a context manager around the work; :attr:`peak_pss_bytes` is None
    when PSS was unreadable in some sample (then only the RSS peak stands).
    """

    root: int
    period_s: float = SAMPLE_PERIOD_S
    peak_pss_bytes: int | None = 0
    peak_rss_bytes: int = 0
    peak_processes: int = 0
    samples: int = 0
    cpu_s: dict[int, float] = field(default_factory=dict)  # each process's last-seen CPU time
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        """Take one sample now."""
        now = tree_memory(self.root)
        self.samples += 1
        self.peak_rss_bytes = max(self.peak_rss_bytes, now.rss_bytes)
        self.peak_processes = max(self.peak_processes, now.processes)
        self.cpu_s.update(now.cpu_s)
        if now.pss_bytes is None or self.peak_pss_bytes is None:
            self.peak_pss_bytes = None
        else:
            self.peak_pss_bytes = max(self.peak_pss_bytes, now.pss_bytes)

    @property
    def total_cpu_s(self) -> float:
        """CPU seconds the tree used, as last seen of each process (a process's last
        :attr:`period_s` before it exited is missed)."""
        return sum(self.cpu_s.values())

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def __enter__(self) -> PeakSampler:
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@dataclass(frozen=True, slots=True)
class ScaleResult:
    """What one scale run measured (also written to ``<out>/scale.json``)."""

    command: str
    started_utc: str
    exit_code: int
    wall_s: float
    peak_pss_mib: float | None
    peak_rss_mib: float
    peak_processes: int
    samples: int
    cpu_s: float  # user + system seconds of every process of the run (all cores together)
    load_average_before: tuple[float, float, float]
    load_average_after: tuple[float, float, float]
    cpus: int
    rounds_completed: int
    participants_per_round: list[int | None]
    max_record_level_epsilon: float | None

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _run_summary(out: Path) -> tuple[int, list[int | None], float | None]:
    """Rounds, participants per round and the largest site ε, from the run's ``result.json``."""
    try:
        doc = json.loads((out / "result.json").read_text())
    except (OSError, ValueError):
        return 0, [], None
    rounds = doc.get("rounds", [])
    eps = [
        s["record_level_epsilon"]
        for r in rounds
        for s in r.get("sites", [])
        if isinstance(s.get("record_level_epsilon"), int | float)
    ]
    done = [r for r in rounds if not r.get("failed")]
    return len(done), [r.get("participants") for r in rounds], max(eps) if eps else None


def run_scale(
    run_args: Sequence[str], out: Path, *, timeout_s: float, period_s: float = SAMPLE_PERIOD_S
) -> ScaleResult:
    """Run ``fedseal-sim run <run_args> --out <out>`` as a child; time it and sample its memory.

    The child's stdout and stderr go to ``<out>/run.log``. A child still
    running after ``timeout_s`` is killed with its process group, and the
    result says so (exit code -9).

    Raises
    ------
    ConfigurationError
        ``out`` exists and is not empty (a run directory is a fresh one), or
        ``/proc`` is not readable (not Linux).
    """
    if not (PROC / str(os.getpid()) / "status").exists():
        raise ConfigurationError("the scale benchmark samples /proc: Linux only")
    if out.exists() and any(out.iterdir()):
        raise ConfigurationError(f"{out} is not empty: the scale benchmark needs a fresh directory")
    out.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "simulations.cli", "run", *run_args, "--out", str(out)]
    command = "fedseal-sim run " + shlex.join([*run_args, "--out", str(out)])
    load_before = os.getloadavg()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    with (out / "run.log").open("wb") as log:
        child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        with PeakSampler(child.pid, period_s) as sampler:
            try:
                code = child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, 9)
                child.wait()
                code = -9
    wall = time.perf_counter() - t0
    rounds, participants, eps = _run_summary(out)
    mib = 1024.0**2
    result = ScaleResult(
        command=command,
        started_utc=started,
        exit_code=code,
        wall_s=round(wall, 1),
        peak_pss_mib=None
        if sampler.peak_pss_bytes is None
        else round(sampler.peak_pss_bytes / mib),
        peak_rss_mib=round(sampler.peak_rss_bytes / mib),
        peak_processes=sampler.peak_processes,
        samples=sampler.samples,
        cpu_s=round(sampler.total_cpu_s, 1),
        load_average_before=load_before,
        load_average_after=os.getloadavg(),
        cpus=os.cpu_count() or 1,
        rounds_completed=rounds,
        participants_per_round=participants,
        max_record_level_epsilon=eps,
    )
    (out / RESULT_FILE).write_text(json.dumps(result.to_json(), indent=1) + "\n")
    return result
