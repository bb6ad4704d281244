"""Process groups under a supervisor (common.processes, common.supervisor) and port checks.

Every process fedseal starts must die with the command that started it, even when that
command is SIGKILLed, including helpers Flower starts in sessions of their own (the
SuperLink's ``flower-superexec``): here played by ``setsid sleep``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.errors import ConfigurationError
from common.processes import check_port_free, start_group, stop_group

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc"
)
# a shell that ignores SIGTERM, with one child in its own session and one that ignores it too
STUBBORN_TREE = "trap '' TERM; setsid sleep 300 & sleep 300 & wait"


def _alive(pid: int) -> bool:
    """Running (a zombie counts as dead: its parent may simply not have reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _wait_for_tree(pid: int, count: int, timeout_s: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while len(tree := _descendants(pid)) < count:
        assert time.monotonic() < deadline, f"only {tree} below {pid}"
        time.sleep(0.05)
    return tree


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_start_group_parent_sigkilled_every_process_below_dies(tmp_path: Path) -> None:
    """kill -9 of the command that started a group: nothing it started survives (within 5 s)."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import os, sys, time\n"
        "from common.processes import start_group\n"
        f"p = start_group(['/bin/sh', '-c', {STUBBORN_TREE!r}], dict(os.environ), grace_s=0.5)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE)
    tree: list[int] = []
    try:
        assert parent.stdout is not None
        parent.stdout.readline()
        # supervisor, shell, the setsid'd sleep and the plain one
        tree = _wait_for_tree(parent.pid, 4)
        parent.kill()
        parent.wait(timeout=10)
        left = _wait_gone(tree, 5.0)
        assert left == [], f"still running after the parent's SIGKILL: {left}"
    finally:
        parent.kill()
        _kill_all(tree)


def test_stop_group_sigterm_ignored_and_new_session_killed_after_grace() -> None:
    """A requested stop: SIGTERM, the grace period, then SIGKILL for the whole tree."""
    proc = start_group(["/bin/sh", "-c", STUBBORN_TREE], dict(os.environ), grace_s=0.5)
    tree = _wait_for_tree(proc.pid, 3)
    try:
        started = time.monotonic()
        stop_group(proc, timeout_s=3.0)
        took = time.monotonic() - started
        assert _wait_gone(tree, 1.0) == []
        assert 0.4 <= took < 3.0, took  # it waited for the grace, and not for the fallback
        assert proc.returncode == 128 + signal.SIGKILL  # the shell ignored SIGTERM
    finally:
        _kill_all(tree)


def test_start_group_child_exit_code_passes_and_leftovers_are_stopped() -> None:
    """The supervisor exits with its child's code, once what the child left running is gone."""
    proc = start_group(["/bin/sh", "-c", "setsid sleep 300 & exit 7"], dict(os.environ))
    tree = _wait_for_tree(proc.pid, 1)
    try:
        assert proc.wait(timeout=10) == 7
        assert _wait_gone(tree, 1.0) == []
    finally:
        _kill_all(tree)


def _time_wait_port(listener_reuse: bool) -> int:
    """A port whose only sockets are in TIME_WAIT: the listener closed first, then went away.

    ``listener_reuse``: the listener had SO_REUSEADDR, as uvicorn's (asyncio's) has; Linux
    copies it to the accepted sockets, and so to their TIME_WAIT remains.
    """
    with socket.socket() as listener:
        if listener_reuse:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = int(listener.getsockname()[1])
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = listener.accept()
        conn.close()  # the server side closes first: it is the one left in TIME_WAIT
        client.recv(1)
        client.close()
    assert _time_wait_on(port)
    return port


def _time_wait_on(port: int) -> bool:
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(
        int(f[1].split(":")[1], 16) == port and f[3] == "06" for f in (ln.split() for ln in lines)
    )


def _uvicorn_binds(port: int) -> bool:
    """Whether uvicorn could listen there: it binds through asyncio's create_server."""

    async def bind() -> None:
        server = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", port)
        server.close()
        await server.wait_closed()

    try:
        asyncio.run(bind())
    except OSError:
        return False
    return True


def test_check_port_free_accepts_a_port_with_only_time_wait_connections() -> None:
    """Right after a killed coordinator (its SuperLink listened as uvicorn does) the port is free."""
    port = _time_wait_port(listener_reuse=True)
    # Without SO_REUSEADDR the port would look taken (what this check must not do) ...
    with socket.socket() as plain, pytest.raises(OSError) as taken:
        plain.bind(("127.0.0.1", port))
    assert taken.value.errno == errno.EADDRINUSE
    check_port_free("127.0.0.1", port)
    assert _uvicorn_binds(port)  # ... and the SuperLink's own bind succeeds


@pytest.mark.parametrize("listener_reuse", [True, False])
def test_check_port_free_agrees_with_uvicorns_bind_on_time_wait(listener_reuse: bool) -> None:
    port = _time_wait_port(listener_reuse)
    try:
        check_port_free("127.0.0.1", port)
        free = True
    except ConfigurationError:
        free = False
    assert free == _uvicorn_binds(port) == listener_reuse


def test_check_port_free_refuses_a_listening_port() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = int(listener.getsockname()[1])
        with pytest.raises(ConfigurationError, match=f"cannot listen on 127.0.0.1:{port}"):
            check_port_free("127.0.0.1", port)
