"""The run's end at a site (client.run_end) and the SuperNode's exit explained (client.supernode).

Real site code: ``client.app.make_client_app`` with policies pinning the coordinator's audit
key, over the in-memory Grid. The final audit head marks the run finished only once it is
verified and witnessed: a head that fails (another key's signature) must not end a site.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fake_grid import FakeGrid, server_identity
from federation import federated_setup
from pinned_sites import echo_cfg, pinned_policies

from client.app import make_client_app
from client.run_end import RUN_FINISHED_FILE, clear_run_finished, finished_run, mark_run_finished
from client.supernode import AUDIT_HEAD_MESSAGE, explain_exit
from common.audit.instruction import InstructionSigner
from common.audit.seal import sign_head
from common.records import AUDIT_HEAD_ACTION
from server.aggregation.exchange import GridExchange

KEY = Ed25519PrivateKey.from_private_bytes(b"\x31" * 32)  # the coordinator's audit key
OTHER = Ed25519PrivateKey.from_private_bytes(b"\x32" * 32)
RUN_ID = "0000feed0002"


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with server_identity():
        yield


def _announce(tmp_path: Path, head_key: Ed25519PrivateKey) -> tuple[Path, int]:
    """Two pinned sites receive the run's final head (signed by ``head_key``); acks counted."""
    root = tmp_path / "sites"
    setup = federated_setup(root, 2, pinned_policies(tmp_path / "policies", KEY))
    grid = FakeGrid(make_client_app(setup), 2)
    head = sign_head(head_key, "record", 5, hashlib.sha256(b"record/5").hexdigest(), "t")
    exchange = GridExchange(
        grid, echo_cfg(2), RUN_ID, "code-hash", lambda: head, InstructionSigner(KEY)
    )
    return root, exchange.announce_head(1)


def test_final_audit_head_witnessed_marks_the_run_finished_at_every_site(tmp_path: Path) -> None:
    root, acked = _announce(tmp_path, KEY)
    assert acked == 2
    for i in range(2):
        assert finished_run(root / f"site-{i}") == RUN_ID


def test_final_audit_head_of_another_key_does_not_end_the_site(tmp_path: Path) -> None:
    """A head not signed by the pinned key is refused: no marker, the site stays."""
    root, acked = _announce(tmp_path, OTHER)
    assert acked == 0
    for i in range(2):
        assert not (root / f"site-{i}" / RUN_FINISHED_FILE).exists()


def test_run_finished_marker_round_trip_and_clear(tmp_path: Path) -> None:
    assert finished_run(tmp_path) is None
    mark_run_finished(tmp_path, "run-7")
    assert finished_run(tmp_path) == "run-7"
    clear_run_finished(tmp_path)
    assert finished_run(tmp_path) is None
    (tmp_path / RUN_FINISHED_FILE).write_text('{"run": 7}')
    assert finished_run(tmp_path) is None  # not a run id: not a marker


def _flower_exit(code: int, detail: str) -> str:
    return (
        f"INFO : SuperNode starting\nERROR :   Exit Code: {code}\n"
        f"Failed to initialize the connection to the SuperLink.\n{detail}\n"
        "\nFor more information, visit: <https://flower.ai/docs>\n"
    )


KEY_PATH = Path("/keys/site0")


def test_explain_exit_unregistered_only_when_the_superlink_said_so() -> None:
    refused = _flower_exit(305, "[code: 2004] Failed to activate SuperNode.")
    assert "public key is not registered" in explain_exit(1, refused, "h:1", KEY_PATH)
    keyless = _flower_exit(305, "[code: 2001] SuperNode authentication is enabled.")
    assert "gave none, so it is not registered" in explain_exit(1, keyless, "h:1", None)
    # The same Flower exit code for a connection that broke: not called unregistered.
    broken = _flower_exit(305, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    line = explain_exit(1, broken, "h:1", KEY_PATH)
    assert "registered" not in line and "could not connect to the SuperLink at h:1" in line
    assert "CERTIFICATE_VERIFY_FAILED" in line


def test_explain_exit_names_other_flower_exit_codes() -> None:
    bad_key = "ERROR :   Exit Code: 302\nNode authentication requires elliptic curve key.\n"
    assert "is not an elliptic-curve private key" in explain_exit(1, bad_key, "h:1", KEY_PATH)
    other = "ERROR :   Exit Code: 606\nSuperNode 1.41 vs SuperLink 1.30\n"
    assert "not compatible" in explain_exit(1, other, "h:1", KEY_PATH)
    assert explain_exit(3, "no exit code logged\n", "h:1", None) == (
        "the SuperNode exited with code 3"
    )


def test_supernode_watches_for_the_final_heads_message_type() -> None:
    assert AUDIT_HEAD_MESSAGE == f"query.{AUDIT_HEAD_ACTION} message"
