"""Running this site's Flower SuperNode for ``fedseal-client start``: watch it, stop it, explain it.

The SuperNode runs under a supervisor (:func:`common.processes.start_group`):
it and every process it starts die with ``fedseal-client``, even on SIGKILL.
The command stays until one of:

* a requested stop (SIGTERM, SIGINT/Ctrl-C): the SuperNode group is sent
  SIGTERM, given :data:`STOP_GRACE_S`, then SIGKILLed; exit 0;
* the run ended (:mod:`client.run_end`; polled every :data:`MARKER_POLL_S`),
  unless ``keep_running``: the site's acknowledgement of the final audit head
  is let reach the coordinator first (:func:`_await_ack`, bounded), then the
  SuperNode is stopped; exit 0 with one line naming the run;
* the SuperNode exits by itself: a failure is explained in one line from
  Flower's exit code and error code (:func:`explain_exit`).
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from client.run_end import clear_run_finished, finished_run
from common.errors import FedsealError
from common.processes import start_group, stop_group

STOP_GRACE_S = 0.8
POLL_S = 0.1
MARKER_POLL_S = 0.5
ACK_WAIT_S = 10.0
# A site up before its coordinator may be refused while the coordinator registers the
# allowed keys (right after its SuperLink listens): for this long it tries again.
UNREGISTERED_GRACE_S = 20.0
UNREGISTERED_RETRY_S = 2.0
# The SuperLink answers "node unavailable" instead of a stored reply once its node is
# deactivated, so the SuperNode stays connected this long after the acknowledgement left:
# enough for fedseal's ServerApp (it pulls every 0.2 s, server.aggregation.exchange's
# DEPLOYED_PULL_INTERVAL_S) and for Flower's own Grid (every 3 s) alike.
ACK_PULL_S = 5.0
TAIL_LINES = 200

# flower-supernode's own exit codes (flwr.supercore.exit.ExitCode), printed as "Exit Code: N"
SUPERNODE_NODE_AUTH_KEY_INVALID = 302
SUPERNODE_CONNECTION_ERROR = 305
RUNTIME_VERSION_INCOMPATIBLE = 606
# the SuperLink's API error codes (flwr.supercore.error.ApiErrorCode), printed as "[code: N]"
FLEET_SUPERNODE_REGISTRATION_DISABLED = 2001  # node auth on: a keyless SuperNode is refused
FLEET_NODE_ACTIVATION_FAILED = 2004  # "No SuperNode found with the given public key"
# what flower-supernode logs as a message comes in, and once its reply left
# (start_client_internal: _pull_and_store_message, _push_messages)
MESSAGE_RECEIVING = "Receiving: "
# the final head's message type (query.<common.records.AUDIT_HEAD_ACTION>), written out:
# common.records imports torch, which this module keeps out of the command line's start
AUDIT_HEAD_MESSAGE = "query.audit_head message"
REPLY_SENT = ("Sent successfully", "Ignoring reply message", "Failed to send message")


def explain_exit(code: int, output: str, superlink: str, auth_key: Path | None) -> str:
    """One line: why the SuperNode exited with ``code``, from its ``output`` (Flower's log).

    The site's key is only called unregistered when the SuperLink said so
    (error 2004 while activating the node, or 2001 for a site without a key);
    every other failure is named for what it is.
    """
    exit_code = re.findall(r"Exit Code: (\d+)\n([^\n]*)(?:\n([^\n]*))?", output)
    if not exit_code:
        return f"the SuperNode exited with code {code}"
    flower, first, second = exit_code[-1]
    detail = " ".join(part.strip() for part in (first, second) if part.strip())
    api = re.findall(r"\[code: (\d+)\]", detail)
    api_code = int(api[-1]) if api else None
    if int(flower) == SUPERNODE_CONNECTION_ERROR:
        if api_code == FLEET_NODE_ACTIVATION_FAILED:
            return (
                "the SuperLink refused this site: its public key is not registered with the "
                f"coordinator (send it {auth_key}.pub for its --auth-keys)"
            )
        if api_code == FLEET_SUPERNODE_REGISTRATION_DISABLED:
            return (
                "the SuperLink refused this site: it admits only registered node keys and this "
                "site gave none, so it is not registered (make one with `fedseal-client keys`, "
                "give --auth-key, and have the coordinator allow-list its .pub)"
            )
        return f"the SuperNode could not connect to the SuperLink at {superlink}: {detail}"
    if int(flower) == SUPERNODE_NODE_AUTH_KEY_INVALID:
        return (
            f"node key {auth_key} is not an elliptic-curve private key; make one with "
            "`fedseal-client keys`"
        )
    if int(flower) == RUNTIME_VERSION_INCOMPATIBLE:
        return f"this site's Flower is not compatible with the SuperLink's: {detail}"
    return f"the SuperNode exited with Flower exit code {flower}: {detail}"


@dataclass
class _Output:
    """The SuperNode's output, echoed to our stderr; a tail kept to explain failures."""

    tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=TAIL_LINES)
    )
    reply_pending: bool = False  # a message came in and its reply has not left yet
    head_ack_sent: bool = False  # the reply to the final audit head left
    receiving: str = ""  # the message type last received

    def follow(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.stdout is None:
            return
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace")
            self.tail.append(line)
            if MESSAGE_RECEIVING in line:
                self.reply_pending = True
                self.receiving = line
            elif any(text in line for text in REPLY_SENT):
                self.reply_pending = False
                self.head_ack_sent = self.head_ack_sent or AUDIT_HEAD_MESSAGE in self.receiving
            sys.stderr.write(line)
            sys.stderr.flush()


@dataclass(frozen=True, slots=True)
class Ending:
    """How the session ended: ``"stopped"`` (requested), ``"run-finished"`` (with its run id)."""

    reason: str
    run_id: str | None = None


def run_supernode(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    site_state: Path,
    superlink: str,
    auth_key: Path | None,
    keep_running: bool,
    stopped: Callable[[], bool],
    started: Callable[[int], None] = lambda pid: None,
) -> Ending:
    """Run the SuperNode until a requested stop or the run's end (see the module docstring).

    Raises
    ------
    FedsealError
        The SuperNode exited by itself with a failure (one line, :func:`explain_exit`).
    """
    if not keep_running:
        clear_run_finished(site_state)
    first = time.monotonic()
    while True:
        ending, code, output = _run_once(argv, env, site_state, keep_running, stopped, started)
        if ending is not None:
            return ending
        if code == 0:
            return Ending("exited")
        text = "".join(output.tail)
        if (
            _key_unknown(code, text)
            and time.monotonic() - first < UNREGISTERED_GRACE_S
            and not stopped()
        ):
            # A coordinator registers the allowed keys right after its SuperLink starts
            # listening: a site that came up first can be refused in that moment.
            sys.stderr.write(
                "the SuperLink does not know this site's key yet (the coordinator may be "
                f"registering keys); trying again in {UNREGISTERED_RETRY_S:.0f} s\n"
            )
            time.sleep(UNREGISTERED_RETRY_S)
            continue
        raise FedsealError(explain_exit(code, text, superlink, auth_key))


def _key_unknown(code: int, output: str) -> bool:
    """Whether the SuperNode exited because the SuperLink knows no such key (error 2004)."""
    return code != 0 and f"[code: {FLEET_NODE_ACTIVATION_FAILED}]" in output


def _run_once(
    argv: Sequence[str],
    env: Mapping[str, str],
    site_state: Path,
    keep_running: bool,
    stopped: Callable[[], bool],
    started: Callable[[int], None],
) -> tuple[Ending | None, int, _Output]:
    """One SuperNode process, until a stop, the run's end or its own exit (with its code)."""
    proc = start_group(argv, env, capture=True, grace_s=STOP_GRACE_S)
    started(proc.pid)
    output = _Output()
    reader = threading.Thread(target=output.follow, args=(proc,), daemon=True)
    reader.start()
    ending: Ending | None = None
    next_marker = time.monotonic()
    try:
        while proc.poll() is None:
            if stopped():
                ending = Ending("stopped")
                break
            if not keep_running and time.monotonic() >= next_marker:
                next_marker = time.monotonic() + MARKER_POLL_S
                run_id = finished_run(site_state)
                if run_id is not None:
                    _await_ack(proc, output, stopped)
                    ending = Ending("run-finished", run_id)
                    break
            time.sleep(POLL_S)
    finally:
        stop_group(proc, timeout_s=STOP_GRACE_S + 1.0)
    reader.join(timeout=2)
    return ending, proc.returncode or 0, output


def _await_ack(proc: subprocess.Popen[bytes], output: _Output, stopped: Callable[[], bool]) -> None:
    """Let the final head's acknowledgement reach the coordinator before stopping (bounded).

    The marker is written before that reply leaves, and the coordinator only
    counts it if it pulls it while this node is still connected: wait for the
    reply to leave (at most :data:`ACK_WAIT_S`), then, once it left,
    :data:`ACK_PULL_S`.
    """
    deadline = time.monotonic() + ACK_WAIT_S
    while output.reply_pending and time.monotonic() < deadline:
        if proc.poll() is not None or stopped():
            return
        time.sleep(POLL_S)
    linger = time.monotonic() + (ACK_PULL_S if output.head_ack_sent else 0.0)
    while time.monotonic() < linger:
        if proc.poll() is not None or stopped():
            return
        time.sleep(POLL_S)
