"""The site's pinned key, its sequence store and its witness checks, unit by unit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.instructions import InstructionRefused, advance_sequence, pinned_server_key
from client.state import SEQUENCE_FILE, WITNESS_FILE, WITNESS_INDEX_FILE
from client.witness import HeadRefused, read_heads, witness_head
from common.audit.seal import sign_head
from common.errors import ConfigurationError
from policies import SitePolicy
from policies.models import TrustRules

KEY = Ed25519PrivateKey.from_private_bytes(b"\x09" * 32)
RAW = KEY.public_key().public_bytes_raw()
OTHER = Ed25519PrivateKey.from_private_bytes(b"\x0a" * 32)
KID = bytes(32)


def _policy(raw: bytes | None) -> SitePolicy:
    return SitePolicy(trust=TrustRules(server_key=raw.hex() if raw else None))


def test_pinned_key_from_policy_node_config_or_both_agreeing() -> None:
    assert pinned_server_key({}, None) is None
    assert pinned_server_key({}, _policy(None)) is None
    assert pinned_server_key({}, _policy(RAW)) == RAW
    assert pinned_server_key({"server-key": RAW.hex()}, None) == RAW
    assert pinned_server_key({"server-key": RAW.hex()}, _policy(RAW)) == RAW
    other = OTHER.public_key().public_bytes_raw()
    with pytest.raises(ConfigurationError, match="differ"):
        pinned_server_key({"server-key": other.hex()}, _policy(RAW))
    with pytest.raises(ConfigurationError):
        pinned_server_key({"server-key": "not a key"}, None)


def test_sequence_store_accepts_only_increasing_numbers_per_run(tmp_path: Path) -> None:
    assert advance_sequence(tmp_path, KID, "run-a", 5) is None
    assert advance_sequence(tmp_path, KID, "run-a", 9) == 5
    for stale in (9, 8, 1):
        with pytest.raises(InstructionRefused, match="not above 9"):
            advance_sequence(tmp_path, KID, "run-a", stale)
    assert advance_sequence(tmp_path, KID, "run-b", 1) is None  # another run has its own
    assert advance_sequence(tmp_path, bytes([1]) * 32, "run-a", 1) is None  # another key too
    doc = json.loads((tmp_path / SEQUENCE_FILE).read_text())
    assert doc["last"][f"{KID.hex()}/run-a"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instruction-seq.json", "site.lock"]


def test_unreadable_sequence_store_refuses_fail_closed(tmp_path: Path) -> None:
    (tmp_path / SEQUENCE_FILE).write_text("{not json")
    with pytest.raises(InstructionRefused, match="unreadable"):
        advance_sequence(tmp_path, KID, "run-a", 5)
    (tmp_path / SEQUENCE_FILE).write_text(json.dumps({"v": 1, "last": {"x": "5"}}))
    with pytest.raises(InstructionRefused, match="unreadable"):
        advance_sequence(tmp_path, KID, "run-a", 5)


def _head(seq: int, record: str = "rec", key: Ed25519PrivateKey = KEY, h: str = "a") -> bytes:
    return sign_head(key, record, seq, h * 64, "t").encode()


def test_witness_verifies_under_the_pinned_key_and_stores_nothing_that_fails(
    tmp_path: Path,
) -> None:
    path = tmp_path / WITNESS_FILE
    with pytest.raises(HeadRefused, match="not signed by the trusted server key"):
        witness_head(path, _head(3, key=OTHER), run_id="r", trusted_key=RAW)
    assert read_heads(path) == []
    witness_head(path, _head(3), run_id="r", trusted_key=RAW)
    witness_head(path, _head(3), run_id="r", trusted_key=RAW)  # the same head: kept once
    witness_head(path, _head(4, key=OTHER), run_id="r")  # no pin: not verified
    assert [h.seq for h in read_heads(path)] == [3, 4]


def test_witness_refuses_heads_going_back_conflicting_or_of_another_record(tmp_path: Path) -> None:
    path = tmp_path / WITNESS_FILE
    witness_head(path, _head(5), run_id="r1")
    with pytest.raises(HeadRefused, match="older than seq 5"):
        witness_head(path, _head(4), run_id="r2")
    with pytest.raises(HeadRefused, match="another hash"):
        witness_head(path, _head(5, h="b"), run_id="r1")
    with pytest.raises(HeadRefused, match="run r1's heads are for record rec"):
        witness_head(path, _head(9, record="other"), run_id="r1")
    witness_head(path, _head(2, record="other"), run_id="r3")  # a new run on another record
    assert [(h.record_id, h.seq) for h in read_heads(path)] == [("rec", 5), ("other", 2)]


def test_witness_index_is_rebuilt_when_missing_or_stale(tmp_path: Path) -> None:
    path = tmp_path / WITNESS_FILE
    witness_head(path, _head(5), run_id="r1")
    (tmp_path / WITNESS_INDEX_FILE).unlink()
    with pytest.raises(HeadRefused, match="older"):
        witness_head(path, _head(4), run_id="r1")
    # a crash between the append and the index update: the file is newer than the index
    with path.open("a") as fh:
        fh.write(json.dumps({"head": _head(8).hex(), "run": "r1"}) + "\n")
    with pytest.raises(HeadRefused, match="older than seq 8"):
        witness_head(path, _head(6), run_id="r1")


def test_client_start_pins_the_key_and_policy_in_node_config(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    from client.cli import _trust_config

    pub = tmp_path / "audit.pub"
    pub.write_bytes(
        KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    from policies import default_site_policy_path

    assert _trust_config(default_site_policy_path(), pub) == {"server-key": RAW.hex()}
    policy = tmp_path / "site.toml"
    policy.write_text(f'kind = "site"\n[trust]\nserver_key = "{RAW.hex()}"\n')
    assert _trust_config(policy, pub) == {"server-key": RAW.hex()}
    assert _trust_config(policy, None) == {}  # the policy's own pin travels in the policy copy
    policy.write_text(
        f'kind = "site"\n[trust]\nserver_key = "{OTHER.public_key().public_bytes_raw().hex()}"\n'
    )
    with pytest.raises(ConfigurationError, match="differ"):
        _trust_config(policy, pub)
    with pytest.raises(ConfigurationError, match="not found"):
        _trust_config(policy, tmp_path / "missing.pub")
