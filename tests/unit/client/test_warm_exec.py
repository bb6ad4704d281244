"""The warm SuperExec (client.warm_exec): Flower's task command line, fresh randomness per fork."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, SubprocessExecutor

from client import warm_exec


def _spec(**overrides: object) -> ExecutionSpec:
    fields: dict[str, object] = {
        "task_type": TaskType.CLIENT_APP,
        "runtime_api_address": "127.0.0.1:9094",
        "token": "tok",
        "insecure": False,
        "root_certificates_path": "/certs/ca.crt",
        "runtime_dependency_install": False,
        "parent_pid": 4242,
        "suppress_output": False,
        "task_id": 7,
    }
    fields.update(overrides)
    return ExecutionSpec(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"insecure": True, "root_certificates_path": None},
        {"parent_pid": None, "runtime_dependency_install": True},
    ],
)
def test_task_command_line_is_flowers_own(
    monkeypatch: pytest.MonkeyPatch, overrides: dict[str, object]
) -> None:
    """The forked task runs flwr-clientapp with exactly the arguments Flower's executor passes."""
    seen: list[list[str]] = []

    class Popen:
        def __init__(self, args: list[str], **_: object) -> None:
            seen.append(list(args))

    monkeypatch.setattr(subprocess, "Popen", Popen)
    spec = _spec(**overrides)
    SubprocessExecutor().launch(spec)
    assert seen == [warm_exec.clientapp_argv(spec)]
    assert seen[0][0] == "flwr-clientapp"  # Flower's exit path keys on argv[0]


def test_supernode_finds_the_warm_superexec_first(tmp_path: Path) -> None:
    env = warm_exec.warm_env({"PATH": str(Path(sys.executable).parent)}, tmp_path / "bin")
    found = shutil.which(warm_exec.SUPEREXEC_COMMAND, path=env["PATH"])
    assert found == str(tmp_path / "bin" / warm_exec.SUPEREXEC_COMMAND)
    assert os.stat(found).st_mode & 0o777 == 0o700
    # idempotent, and the script only runs main() as the main program
    warm_exec.install_superexec(tmp_path / "bin")
    text = Path(found).read_text()
    assert text.startswith(f"#!{sys.executable}\n")
    assert 'if __name__ == "__main__":' in text


CHILD = r"""
import json, multiprocessing, os, sys

from client import warm_exec


def draw(path):
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives import serialization
    import secrets
    key = X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    with open(path, "w") as fh:
        json.dump({"pid": os.getpid(), "key": key.hex(), "token": secrets.token_hex(16),
                   "urandom": os.urandom(16).hex()}, fh)


if __name__ == "__main__":
    out = sys.argv[1]
    executor = warm_exec.ForkserverExecutor(preload=("cryptography.hazmat.primitives.asymmetric.x25519",))
    ctx = executor._ctx
    procs = [ctx.Process(target=draw, args=(f"{out}/{i}.json",)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    print(json.dumps([p.exitcode for p in procs]))
"""


def test_forked_tasks_draw_independent_secrets(tmp_path: Path) -> None:
    """Tasks forked from one template get distinct keys and bytes (kernel and OpenSSL RNGs).

    Fails if the template's state decided a task's secrets: e.g. a key drawn
    from a generator seeded before the fork.
    """
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [0, 0, 0]
    draws = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(3)]
    assert len({d["pid"] for d in draws}) == 3
    for field in ("key", "token", "urandom"):
        assert len({d[field] for d in draws}) == 3, field
