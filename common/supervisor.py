"""A tiny supervisor: every Flower process fedseal starts dies with the command that started it.

``python -m common.supervisor --parent PID --grace S -- ARGV...`` runs ``ARGV``
as its child, in the process group (and session) the supervisor leads, and
stops that child and everything below it when

* its parent (the fedseal command line, ``PID``) dies, even by SIGKILL:
  Linux delivers ``PR_SET_PDEATHSIG`` at once, and the parent id is polled
  every 0.1 s as the portable fallback; the id is re-checked right after the
  ``prctl`` call, which closes the race with a parent that died before it;
* it receives SIGTERM, SIGINT or SIGHUP (a requested stop);
* the child exits by itself (whatever it left behind is stopped too).

Stopping is SIGTERM to every process of the tree, ``S`` seconds of grace, then
SIGKILL to whatever is left. Flower starts some helpers in sessions of their
own (the SuperLink's ``flower-superexec``), so on Linux the supervisor is a
child subreaper (``PR_SET_CHILD_SUBREAPER``): orphans of the tree are
reparented to it instead of init, and the tree is found from ``/proc``; on
other systems the process group is signalled.

The supervisor exits with the child's exit code (128 + N for signal N).
Standard library only: it starts in tens of milliseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
POLL_S = 0.1
STOP_POLL_S = 0.05
KILL_ROUNDS = 20
PARENT_DEATH_SIGNAL = signal.SIGUSR1  # distinct from a requested stop: re-checked on arrival
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _prctl(option: int, value: int) -> bool:
    """``prctl(option, value)``; False where unavailable (not Linux) or refused."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return bool(libc.prctl(option, value, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _descendants() -> list[int]:
    """Live (non-zombie) processes below this one, from ``/proc``; [] where there is none."""
    children: dict[int, list[int]] = {}
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return []
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


class Supervisor:
    """One supervised child and the tree below it."""

    def __init__(self, parent: int, grace_s: float) -> None:
        self.parent = parent
        self.grace_s = grace_s
        self.stop_requested = 0
        self.child = 0
        self.code: int | None = None
        self.tree_visible = False  # True where /proc shows the whole tree (subreaper)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == PARENT_DEATH_SIGNAL and os.getppid() == self.parent:
            return  # the parent's starting thread ended; the parent itself lives on
        self.stop_requested = self.stop_requested or signum

    def parent_gone(self) -> bool:
        return os.getppid() != self.parent

    def reap(self) -> None:
        """Collect every exited child (adopted orphans too); keep the child's code."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.child:
                self.code = _exit_code(status)

    def run(self, argv: Sequence[str]) -> int:
        for sig in (*STOP_SIGNALS, PARENT_DEATH_SIGNAL):
            signal.signal(sig, self._on_signal)
        _prctl(PR_SET_PDEATHSIG, PARENT_DEATH_SIGNAL)
        self.tree_visible = _prctl(PR_SET_CHILD_SUBREAPER, 1) and Path("/proc/self").exists()
        if self.parent_gone():  # died before the prctl: nothing may start
            return 128 + signal.SIGTERM
        # Python ignores SIGPIPE and SIGXFSZ; the child gets the defaults back (as Popen does).
        restored = tuple(getattr(signal, n) for n in ("SIGPIPE", "SIGXFSZ") if hasattr(signal, n))
        self.child = os.posix_spawnp(argv[0], list(argv), os.environ, setsigdef=restored)
        while True:
            self.reap()
            if self.code is not None or self.stop_requested or self.parent_gone():
                break
            time.sleep(POLL_S)
        self.stop_tree()
        if self.code is None:
            self.code = 128 + int(self.stop_requested or signal.SIGTERM)
        return self.code

    def _alive(self) -> list[int]:
        self.reap()
        if self.tree_visible:
            return _descendants()
        return [] if self.code is not None else [self.child]

    def _signal_all(self, sig: signal.Signals) -> None:
        targets = self._alive()
        for pid in targets:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        if not self.tree_visible and sig != signal.SIGKILL:
            # Our own handler only notes the signal; the whole group gets it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpgrp(), sig)

    def stop_tree(self) -> None:
        """SIGTERM the tree, wait up to the grace period, SIGKILL what is left."""
        if not self._alive():
            return
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline:
            if not self._alive():
                return
            time.sleep(STOP_POLL_S)
        for _ in range(KILL_ROUNDS):
            if not self._alive():
                return
            self._signal_all(signal.SIGKILL)
            time.sleep(STOP_POLL_S)
        if not self.tree_visible:
            self.reap()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.killpg(os.getpgrp(), signal.SIGKILL)  # the group, this supervisor included


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``--parent PID --grace S -- ARGV...`` and supervise ARGV."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        split = args.index("--")
        options = dict(zip(args[:split:2], args[1:split:2], strict=True))
        parent, grace_s = int(options["--parent"]), float(options["--grace"])
        command = args[split + 1 :]
    except (ValueError, KeyError):
        command = []
    if not command:
        sys.stderr.write("usage: python -m common.supervisor --parent PID --grace S -- ARGV...\n")
        return 2
    return Supervisor(parent, grace_s).run(command)


if __name__ == "__main__":
    sys.exit(main())
