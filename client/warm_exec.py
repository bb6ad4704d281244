"""Warm ClientApp processes: Flower's SuperExec, with each task forked from a preloaded template.

Why: in Flower 1.41 a SuperNode runs every message in a new ``flwr-clientapp``
process (:mod:`flwr.supernode.runtime.run_clientapp` handles one message and
exits), started by its SuperExec through
:class:`~flwr.supercore.superexec.executor.SubprocessExecutor`. Each message thus
pays a process start plus Flower's imports (~1.5 s here), and a training stage
also torch's (~1.2 s) and torch's compiler stack, which ``torch.optim``'s first
call imports (~1.1 s): on 2 cores with 3 sites, more than a whole Flower
round of its own.

What this module changes, and only this: *how the task process is created*.
:class:`ForkserverExecutor` is an implementation of Flower's own executor seam
(:class:`flwr.supercore.superexec.executor.Executor`, the protocol its
subprocess and Kubernetes executors implement), handed to Flower's unchanged
SuperExec loop (:func:`flwr.supercore.superexec.run_superexec.run_superexec`).
It starts each ``flwr-clientapp`` task as a fork of a template process
(:mod:`multiprocessing`'s *forkserver*) that has already imported Flower's
ClientApp runtime, torch and fedseal's ClientApp, and runs Flower's own
``flwr-clientapp`` entry point in it with the same arguments the subprocess
executor would pass. Transport, scheduling, task acquisition, the FAB
install, app loading, the message, its reply and the exit path are all
Flower's.

Isolation is unchanged: still one fresh process per message. The template
holds imported modules only — it never sees a message, a node config, a key
or site data — so a task starts from exactly the state a fresh
``flwr-clientapp`` has after its imports, and nothing a task does reaches the
next one (each is its own forked address space).

Randomness after fork: every secret fedseal draws (masks, keys, seeds, DP
noise) comes from the kernel (``os.urandom``/``secrets``) or from OpenSSL
through ``cryptography``, and both are fork-safe (the kernel per call;
OpenSSL 3 reseeds its DRBGs in a process whose fork id changed). The template
draws nothing. ``tests/unit/client/test_warm_exec.py`` checks that two tasks
forked from one template draw different keys and bytes.

``fedseal-client start`` puts this SuperExec in front of Flower's (see
:func:`install_superexec`); ``--cold-clientapp`` keeps Flower's own.
"""

from __future__ import annotations

import multiprocessing
import os
import stat
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multiprocessing.context import ForkServerContext
    from multiprocessing.process import BaseProcess

    from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult

# What a task would import first thing anyway: Flower's ClientApp runtime, then
# fedseal's ClientApp and what its train, DP and ledger paths load. A module
# that fails to import here is simply imported by the task (multiprocessing
# ignores preload errors), so the list is a speed-up, never a requirement.
PRELOAD = (
    "flwr.supernode.cli.flwr_clientapp",
    "torch",
    "torch._dynamo",
    "torch.optim",
    "client.app",
    "client.agent",
    "client.training",
    "client.privacy",
    "client.dp_noise",
    "client.ledger",
    "dp_accounting",
)

# Flower's SubprocessExecutor starts the SuperExec as this command, by name
# (flwr.supernode.start_client_internal, subprocess isolation).
SUPEREXEC_COMMAND = "flower-superexec"


class ForkserverExecutor:
    """Flower's executor protocol: ClientApp tasks forked from a preloaded template.

    Other task types (a SuperNode runs none today) go to Flower's own
    :class:`~flwr.supercore.superexec.executor.SubprocessExecutor`.
    """

    def __init__(self, preload: Sequence[str] = PRELOAD) -> None:
        from flwr.supercore.superexec.executor import SubprocessExecutor

        self._ctx: ForkServerContext = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(list(preload))
        self._fallback = SubprocessExecutor()
        self._running: list[BaseProcess] = []
        # Start the template now: its imports run while the SuperNode connects,
        # not when the first message is waiting.
        from multiprocessing import forkserver

        forkserver.ensure_running()

    def get_eligible_capacity(
        self,
        supported_task_types: set,  # type: ignore[type-arg]
        *,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> tuple[set, set[str]]:  # type: ignore[type-arg]
        """Every task type, at once: forks have no capacity gate (as subprocesses)."""
        del insecure, root_certificates_path
        return supported_task_types, set()

    def wait_for_capacity(self, task_type: object = None, **_: object) -> None:
        """Return at once, as Flower's subprocess executor does."""

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Start the task described by ``spec``: a fork for a ClientApp, else a subprocess."""
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self._fallback.launch(spec)
        proc = self._ctx.Process(
            target=run_task,
            args=(clientapp_argv(spec), spec.suppress_output),
            name=f"flwr-clientapp-{spec.task_id}",
        )
        try:
            proc.start()
        except OSError as exc:
            return LaunchResult.failed(f"could not fork a ClientApp task: {exc}")
        self._running.append(proc)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Forget finished tasks (``is_alive`` collects their exit status)."""
        self._running = [proc for proc in self._running if proc.is_alive()]

    def close(self) -> None:
        """Nothing to release: running tasks exit with the SuperExec (Flower's parent-pid check)."""
        self._fallback.close()


def clientapp_argv(spec: ExecutionSpec) -> list[str]:
    """The ``flwr-clientapp`` command line Flower's subprocess executor builds for ``spec``."""
    from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND

    argv = [
        TASK_TYPE_TO_COMMAND[spec.task_type],
        TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
        spec.runtime_api_address,
        "--token",
        spec.token,
    ]
    if spec.insecure:
        argv.append("--insecure")
    elif spec.root_certificates_path is not None:
        argv += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        argv += ["--parent-pid", str(spec.parent_pid)]
    if spec.runtime_dependency_install:
        argv.append("--allow-runtime-dependency-installation")
    return argv


def run_task(argv: list[str], suppress_output: bool) -> None:
    """In the forked task: Flower's ``flwr-clientapp`` entry point, with ``argv`` as its command line."""
    if suppress_output:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    sys.argv = argv  # argv[0] is "flwr-clientapp", as Flower's exit path expects
    flwr_clientapp()


def main() -> None:
    """``flower-superexec``'s command line and loop, with :class:`ForkserverExecutor` for its tasks."""
    import flwr.supercore.superexec.run_superexec as superexec
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.constant import ExecutorType

    flower_get_executor = superexec.get_executor

    def get_executor(executor_type: ExecutorType, *args: object, **kwargs: object) -> object:
        if executor_type == ExecutorType.SUBPROCESS:
            return ForkserverExecutor()
        return flower_get_executor(executor_type, *args, **kwargs)  # type: ignore[arg-type]

    superexec.get_executor = get_executor  # type: ignore[assignment]
    flower_superexec()


def warm_env(env: Mapping[str, str], bin_dir: Path) -> dict[str, str]:
    """``env`` for a SuperNode whose SuperExec is this module's (installed into ``bin_dir``)."""
    out = dict(env)
    out["PATH"] = str(install_superexec(bin_dir)) + os.pathsep + out.get("PATH", "")
    return out


def install_superexec(bin_dir: Path) -> Path:
    """Write a ``flower-superexec`` command into ``bin_dir`` that runs :func:`main`; return the dir.

    A SuperNode in subprocess isolation starts its SuperExec by that name from
    its ``PATH`` (with ``--runtime-api-address``, ``--parent-pid`` and its TLS
    arguments); ``fedseal-client start`` puts ``bin_dir`` (inside the site's
    private state directory) first on the SuperNode's ``PATH``, so the
    SuperNode starts this one, with the same arguments, and its lifecycle
    stays Flower's (it dies with the SuperNode).
    """
    bin_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    script = bin_dir / SUPEREXEC_COMMAND
    # The guard matters: each forked task re-runs the main script under another name
    # (multiprocessing's "safe importing of the main module").
    text = (
        f"#!{sys.executable}\n"
        'if __name__ == "__main__":\n'
        "    from client.warm_exec import main\n\n"
        "    main()\n"
    )
    if not script.is_file() or script.read_text() != text:
        tmp = script.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.chmod(stat.S_IRWXU)
        tmp.replace(script)
    return bin_dir


if __name__ == "__main__":
    main()
