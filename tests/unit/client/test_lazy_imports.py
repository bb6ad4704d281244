"""The ClientApp's crypto-only stages import no torch, opacus or scikit-learn.

In the Deployment Engine every message is handled by a fresh ``flwr-clientapp``
process that imports ``client.app``: whatever its module graph imports at the
top is paid once per exchange. torch alone costs seconds, so only the handlers
that train or evaluate may load it. Each check runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HEAVY = ("torch", "opacus", "sklearn", "sqlalchemy", "sqlmodel", "pandas", "carbontracker")


# A server instruction as it reaches a site (the ServerApp's task identity, as in tests/support).
INSTRUCTION = """
import uuid

from flwr.app import Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from common.config import RunConfig
from common.records import KEY_CONFIG, KEY_RUN_ID, config_to_record

TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


def instruction(message_type, server_round):
    extra = {KEY_RUN_ID: "ab12cd34ef56"}
    content = RecordDict({KEY_CONFIG: config_to_record(RunConfig(dp=False), server_round, **extra)})
    msg = Message(content, 7, message_type, group_id=str(server_round))
    msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    return msg


def site_context(state_dir):
    return Context(
        run_id=1, node_id=7, node_config={"state-dir": state_dir}, state=RecordDict(), run_config={}
    )
"""


def _loaded_after(code: str, cwd: Path) -> list[str]:
    """The HEAVY modules present in ``sys.modules`` after running ``code`` in a fresh process."""
    probe = (
        INSTRUCTION
        + textwrap.dedent(code)
        + textwrap.dedent(
            f"""
        import json, sys
        print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
        """
        )
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=cwd
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded: list[str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return loaded


def test_importing_client_app_loads_no_heavy_module(tmp_path: Path) -> None:
    assert _loaded_after("import client.app", tmp_path) == []


@pytest.mark.parametrize("stage", ["shares", "consistency", "unmask"])
def test_crypto_only_stage_handler_runs_without_torch(tmp_path: Path, stage: str) -> None:
    """A secure stage that needs no model runs, and refuses, without importing torch.

    The node holds no secure-aggregation state, so the handler refuses the
    message (ProtocolError) after the instruction and state checks: the whole
    path a real message takes up to its crypto, run in a fresh process.
    """
    code = f"""
        import client.app
        from client import secure
        from common.errors import FedsealError

        msg = instruction("train.secagg_{stage}", 2)
        ctx = site_context({str(tmp_path / "site")!r})
        handler = getattr(secure, "handle_{stage}")
        try:
            handler(msg, ctx, None)
        except FedsealError:
            pass
        else:
            raise SystemExit("the handler accepted a message for a round it never prepared")
    """
    assert _loaded_after(code, tmp_path) == []


def test_identity_query_handler_runs_without_torch(tmp_path: Path) -> None:
    """The identity query reads the site's key and roster only: no model, no torch."""
    code = f"""
        import client.app
        from client.secure import handle_identity
        from common.errors import FedsealError

        msg = instruction("query.secagg_identity", 1)
        ctx = site_context({str(tmp_path / "site")!r})
        try:
            handle_identity(msg, ctx, None)
        except FedsealError:
            pass  # this site has no identity key: refused, after the same imports
    """
    assert _loaded_after(code, tmp_path) == []


def test_train_handler_still_loads_torch(tmp_path: Path) -> None:
    """The lazy imports are lazy, not missing: building the model brings torch in."""
    code = """
        import client.app
        from common.config import RunConfig
        from common.task import task_for

        task_for(RunConfig(dp=False)).build(seed=0)
    """
    assert "torch" in _loaded_after(code, tmp_path)
