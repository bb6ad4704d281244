"""A hostile coordinator (or whoever sits between its signing code and the sites) against sites
that pin the coordinator's key: every instruction is signed, and the sites verify it.

Real site code throughout: ``client.app.make_client_app`` with a ``SitePolicies`` pinning the
coordinator's Ed25519 audit key (``trust.server_key``), over the in-memory Grid; only training
is faked (a fixed update, every call recorded). The attacker either tampers with messages on
their way (the Grid's ``on_deliver`` hook, after signing) or holds the key and signs what it
likes (a ``GridExchange`` with the key).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fake_grid import FIRST_NODE_ID, FakeGrid, server_identity
from federation import federated_setup
from flwr.app import Array, Message
from pinned_sites import echo_cfg, pinned_policies

from client.agent import LocalUpdate, SiteContext
from client.app import make_client_app
from client.state import WITNESS_FILE
from client.witness import read_heads
from common.audit.instruction import InstructionSignature, InstructionSigner
from common.audit.seal import SignedHead, sign_head
from common.audit.witness import check_witness
from common.record_digest import read_signature, signed_copy
from common.records import (
    KEY_ARRAYS,
    KEY_AUDIT_HEAD,
    KEY_COHORT_SIZE,
    KEY_CONFIG,
    KEY_INSTRUCTION_SIGNATURE,
    KEY_VECTOR,
    vector_to_record,
)
from policies import SitePolicies
from server.aggregation.exchange import GridExchange
from server.aggregation.replies import refusal_reason
from server.book import RunBook
from server.record import SqlRecord
from server.rounds import FederatedRun

D = 16
KEY = Ed25519PrivateKey.from_private_bytes(b"\x21" * 32)  # the coordinator's audit key
RAW = KEY.public_key().public_bytes_raw()
OTHER = Ed25519PrivateKey.from_private_bytes(b"\x22" * 32)  # someone else's
RUN_ID = "0000feed0001"
RECORD = "record-of-this-run"
OLD_RECORD = "record-of-long-ago"
NODE, PEER = FIRST_NODE_ID, FIRST_NODE_ID + 1


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with server_identity():
        yield


def pinned(tmp_path: Path) -> SitePolicies:
    return pinned_policies(tmp_path / "site-policies", KEY)


@dataclass
class Trainer:
    """A fixed update per site; every (node, round) it trained for is recorded."""

    calls: list[tuple[int, int]] = field(default_factory=list)

    def __call__(self, site: SiteContext, arrays: object) -> LocalUpdate:
        self.calls.append((site.context.node_id, site.server_round))
        return LocalUpdate(np.full(D, 0.01, dtype=np.float32), 1, {"train-seconds": 0.0})


@dataclass
class Sites:
    """Pinned sites over the in-memory Grid; ``tamper(msg)`` runs on every delivered message."""

    grid: FakeGrid
    trainer: Trainer
    root: Path
    tamper: Callable[[Message], None] | None = None

    def heads(self, node_id: int) -> list[SignedHead]:
        return read_heads(self.root / f"site-{node_id - FIRST_NODE_ID}" / WITNESS_FILE)


def sites(tmp_path: Path, num_sites: int = 2) -> Sites:
    trainer = Trainer()
    root = tmp_path / "sites"
    app = make_client_app(federated_setup(root, num_sites, pinned(tmp_path)), trainer=trainer)
    holder = Sites(FakeGrid(app, num_sites), trainer, root)

    def on_deliver(_: FakeGrid, msg: Message) -> None:
        if holder.tamper is not None:
            holder.tamper(msg)

    holder.grid.on_deliver = on_deliver
    return holder


def head_of(seq: int, record: str = RECORD, key: Ed25519PrivateKey = KEY) -> SignedHead:
    return sign_head(key, record, seq, hashlib.sha256(f"{record}/{seq}".encode()).hexdigest(), "t")


def coordinator(
    s: Sites,
    heads: list[SignedHead | None] | None = None,
    key: Ed25519PrivateKey | None = KEY,
    run_id: str = RUN_ID,
) -> GridExchange:
    """A coordinator's exchange: signs with ``key`` (None: unsigned), carries ``heads[-1]``."""
    carried = heads if heads is not None else [head_of(3)]
    return GridExchange(
        s.grid,
        echo_cfg(len(s.grid.contexts)),
        run_id,
        "code-hash",
        lambda: carried[-1],
        InstructionSigner(key) if key is not None else None,
    )


def train_round(
    ex: GridExchange, server_round: int = 1, nodes: tuple[int, ...] = (NODE, PEER)
) -> dict[int, Message]:
    content = ex.instruction(server_round, **{KEY_COHORT_SIZE: len(nodes)})
    content[KEY_ARRAYS] = vector_to_record(np.zeros(D, dtype=np.float32))
    return ex.send({n: (content, "train") for n in nodes}, server_round)


def refused(reply: Message, *needles: str) -> bool:
    reason = refusal_reason(reply)
    return reason is not None and all(n in reason for n in ("trust.server_key", *needles))


def only(node_id: int, edit: Callable[[Message], None]) -> Callable[[Message], None]:
    def tamper(msg: Message) -> None:
        if msg.metadata.dst_node_id == node_id:
            edit(msg)

    return tamper


# ------------------------------------------------------------------ (a) unsigned
def test_unsigned_instruction_refused_even_with_a_valid_old_head_attached(tmp_path: Path) -> None:
    """The old attack: a public head, signed long ago for another record, on any instruction."""
    s = sites(tmp_path)
    replies = train_round(coordinator(s, heads=[head_of(40, OLD_RECORD)], key=None))
    assert refused(replies[NODE], "not signed") and refused(replies[PEER], "not signed")
    assert s.trainer.calls == [] and s.heads(NODE) == []
    # the same instruction signed is taken
    replies = train_round(coordinator(s))
    assert refusal_reason(replies[NODE]) is None and sorted(s.trainer.calls) == [
        (NODE, 1),
        (PEER, 1),
    ]


def test_signature_record_stripped_on_the_way_refused(tmp_path: Path) -> None:
    s = sites(tmp_path)
    s.tamper = only(NODE, lambda msg: msg.content.__delitem__(KEY_INSTRUCTION_SIGNATURE))
    replies = train_round(coordinator(s))
    assert refused(replies[NODE], "not signed") and refusal_reason(replies[PEER]) is None
    assert s.trainer.calls == [(PEER, 1)]


# ------------------------------------------------------------------ (b) altered after signing
def _flip_array_byte(msg: Message) -> None:
    if KEY_ARRAYS not in msg.content.array_records:
        return  # e.g. the admission query, which carries no model
    record = msg.content.array_records[KEY_ARRAYS]
    arr = record[KEY_VECTOR]
    data = bytearray(arr.data)
    data[-1] ^= 0x01
    record[KEY_VECTOR] = Array(arr.dtype, tuple(arr.shape), arr.stype, bytes(data))


def _config(key: str, value: object) -> Callable[[Message], None]:
    def edit(msg: Message) -> None:
        msg.content.config_records[KEY_CONFIG][key] = value  # type: ignore[assignment]

    return edit


def _flip_config_byte(msg: Message) -> None:
    config = msg.content.config_records[KEY_CONFIG]
    text = str(config["app-hash"])
    config["app-hash"] = text[:-1] + chr(ord(text[-1]) ^ 0x01)


ALTERATIONS: dict[str, Callable[[Message], None]] = {
    "config-byte": _flip_config_byte,
    "config-local-epochs": _config("local-epochs", 5),
    "config-round": _config("server-round", 2),
    "model-array-byte": _flip_array_byte,
    "message-type": lambda msg: setattr(msg.metadata, "message_type", "evaluate"),
    "round-group-id": lambda msg: setattr(msg.metadata, "group_id", "2"),
}


@pytest.mark.parametrize("alteration", sorted(ALTERATIONS))
def test_instruction_altered_after_signing_refused(tmp_path: Path, alteration: str) -> None:
    s = sites(tmp_path)
    s.tamper = only(NODE, ALTERATIONS[alteration])
    replies = train_round(coordinator(s))
    assert refused(replies[NODE]), refusal_reason(replies[NODE])
    assert refusal_reason(replies[PEER]) is None  # the untouched site trains
    assert s.trainer.calls == [(PEER, 1)]


def _signed_for(ex: GridExchange, node_id: int) -> Message:
    content = ex.instruction(1, **{KEY_COHORT_SIZE: 1})
    content[KEY_ARRAYS] = vector_to_record(np.zeros(D, dtype=np.float32))
    (msg,) = ex.messages({node_id: (content, "train")}, 1)
    return msg


def test_instruction_redirected_to_another_node_refused(tmp_path: Path) -> None:
    s = sites(tmp_path)
    ex = coordinator(s)
    signed = _signed_for(ex, NODE)
    # re-addressed to the peer: the signed destination no longer matches
    (reply,) = s.grid.send_and_receive(
        [Message(signed.content, PEER, "train", group_id=signed.metadata.group_id)]
    )
    assert refused(reply, "does not verify")
    # handed to the peer as it is (still addressed to NODE): not for this node
    handed = s.grid.client_app(signed, s.grid.contexts[PEER])
    assert refused(handed, "addressed to node")
    assert s.trainer.calls == []


def test_altered_instruction_refusal_reaches_the_coordinators_audit_log(tmp_path: Path) -> None:
    s = sites(tmp_path, num_sites=3)
    s.tamper = only(NODE, _flip_array_byte)
    record = SqlRecord(f"sqlite:///{tmp_path / 'record.db'}")
    run = FederatedRun(echo_cfg(3, rounds=2), s.grid, book=RunBook(record, KEY, RUN_ID))
    results = run.execute()
    assert [r.participants for r in results] == [2, 2]
    events = record.events(RUN_ID)
    refusals = [e.payload() for e in events if e.kind == "site_refused"]
    assert [p["node_id"] for p in refusals] == [str(NODE)] * 2
    assert all(
        "trust.server_key" in p["reason"] and "does not verify" in p["reason"] for p in refusals
    )
    denied = [
        d for e in events if e.kind == "site_policy_decisions" and e.payload()["node_id"] == str(NODE)
        for d in e.payload()["decisions"]
    ]  # fmt: skip
    assert denied and all(d["rule"] == "trust.server_key" and not d["allowed"] for d in denied)
    record.close()


@pytest.mark.parametrize(
    "stage", ["secagg_keys", "secagg_shares", "secagg_masked", "secagg_unmask"]
)
def test_altered_secure_stage_instruction_refused(tmp_path: Path, stage: str) -> None:
    """Keys and masked stages answer with a refusal; shares and unmask, which cannot be
    declined, with a site error naming the check. The other sites finish the round."""
    s = sites(tmp_path, num_sites=4)

    def edit(msg: Message) -> None:
        if msg.metadata.message_type == f"train.{stage}":
            _flip_config_byte(msg)

    s.tamper = only(NODE, edit)
    record = SqlRecord(f"sqlite:///{tmp_path / 'record.db'}")
    (result,) = FederatedRun(
        echo_cfg(4, secagg=True), s.grid, book=RunBook(record, KEY, RUN_ID)
    ).execute()
    record.close()
    site = next(o for o in result.sites if o.node_id == NODE)
    assert (
        site.reason is not None
        and "trust.server_key" in site.reason
        and "does not verify" in site.reason
    )
    if stage != "secagg_unmask":  # after unmask, its masked input is already in the sum
        assert not site.accepted and result.participants == 3


# ------------------------------------------------------------------ (c) replay, (d) order
def _replay(s: Sites, msg: Message) -> Message:
    """Deliver ``msg``'s signed content again, as it was (a fresh Flower message)."""
    md = msg.metadata
    again = Message(msg.content, md.dst_node_id, md.message_type, group_id=md.group_id)
    (reply,) = s.grid.send_and_receive([again])
    return reply


def test_replayed_instruction_refused(tmp_path: Path) -> None:
    s = sites(tmp_path)
    ex = coordinator(s)
    content = ex.instruction(1, **{KEY_COHORT_SIZE: 1})
    content[KEY_ARRAYS] = vector_to_record(np.zeros(D, dtype=np.float32))
    (first,) = ex.messages({NODE: (content, "train")}, 1)
    (reply,) = s.grid.send_and_receive([first])
    assert refusal_reason(reply) is None and s.trainer.calls == [(NODE, 1)]
    assert refused(_replay(s, first), "not above", "replayed")  # the latest one, again
    (second,) = ex.messages({NODE: (content, "train")}, 1)
    (reply,) = s.grid.send_and_receive([second])
    assert refusal_reason(reply) is None  # signed anew: answered (with the round's one release)
    assert refused(_replay(s, first), "not above")  # an earlier one
    assert s.trainer.calls == [(NODE, 1)]  # tests/adversary/test_repeated_rounds.py


def test_instructions_delivered_out_of_order_refused(tmp_path: Path) -> None:
    s = sites(tmp_path)
    ex = coordinator(s)
    older = ex.messages({NODE: (ex.instruction(1, **{KEY_COHORT_SIZE: 1}), "evaluate")}, 1)
    content = ex.instruction(2, **{KEY_COHORT_SIZE: 1})
    content[KEY_ARRAYS] = vector_to_record(np.zeros(D, dtype=np.float32))
    newer = ex.messages({NODE: (content, "train")}, 2)
    (reply,) = s.grid.send_and_receive(newer)
    assert refusal_reason(reply) is None and s.trainer.calls == [(NODE, 2)]
    (reply,) = s.grid.send_and_receive(older)
    assert refused(reply, "not above", "out of order")


# ------------------------------------------------------------------ (e) another key
def test_instruction_signed_with_another_key_refused(tmp_path: Path) -> None:
    s = sites(tmp_path)
    replies = train_round(coordinator(s, key=OTHER))
    assert refused(replies[NODE], "not by the trusted server key")
    assert s.trainer.calls == []


def test_instruction_signed_with_another_key_claiming_the_trusted_one_refused(
    tmp_path: Path,
) -> None:
    s = sites(tmp_path)
    trusted_id = InstructionSigner(KEY).key_id

    def claim(msg: Message) -> None:  # re-label the other key's signature with the trusted key id
        sig = read_signature(msg.content)
        assert sig is not None
        relabelled = signed_copy(
            msg.content, InstructionSignature(sig.seq, trusted_id, sig.signature)
        )
        msg.content[KEY_INSTRUCTION_SIGNATURE] = relabelled[KEY_INSTRUCTION_SIGNATURE]

    s.tamper = claim
    replies = train_round(coordinator(s, key=OTHER))
    assert refused(replies[NODE], "does not verify") and s.trainer.calls == []


# ------------------------------------------------------------------ (f) old heads
def test_old_head_of_another_record_swapped_in_on_the_way_not_witnessed(tmp_path: Path) -> None:
    s = sites(tmp_path)
    old = head_of(40, OLD_RECORD).encode()
    s.tamper = only(NODE, _config(KEY_AUDIT_HEAD, old))
    replies = train_round(coordinator(s))
    assert refused(replies[NODE], "does not verify")
    assert s.heads(NODE) == [] and [h.seq for h in s.heads(PEER)] == [3]


def test_old_head_of_another_record_signed_in_mid_run_not_witnessed(tmp_path: Path) -> None:
    """The key holder itself attaches a valid old head of another record to a later instruction."""
    s = sites(tmp_path)
    heads: list[SignedHead | None] = [head_of(3)]
    ex = coordinator(s, heads)
    assert refusal_reason(train_round(ex, 1)[NODE]) is None
    heads.append(head_of(40, OLD_RECORD))
    reply = train_round(ex, 2)[NODE]
    reason = refusal_reason(reply)
    assert reason is not None and "audit head not witnessed" in reason and OLD_RECORD in reason
    assert [(h.record_id, h.seq) for h in s.heads(NODE)] == [(RECORD, 3)]
    assert s.trainer.calls.count((NODE, 2)) == 0


def test_old_head_older_than_one_witnessed_for_its_record_not_witnessed(tmp_path: Path) -> None:
    """A new run's first instruction carries a validly signed head older than one the site holds."""
    s = sites(tmp_path)
    assert (
        refusal_reason(
            train_round(coordinator(s, [head_of(50, OLD_RECORD)], run_id="run-old"))[NODE]
        )
        is None
    )
    reply = train_round(coordinator(s, [head_of(40, OLD_RECORD)]))[NODE]
    reason = refusal_reason(reply)
    assert reason is not None and "older than seq 50" in reason
    assert [(h.record_id, h.seq) for h in s.heads(NODE)] == [(OLD_RECORD, 50)]


def test_head_not_signed_by_the_pinned_key_not_witnessed(tmp_path: Path) -> None:
    s = sites(tmp_path)
    reply = train_round(coordinator(s, [head_of(3, key=OTHER)]))[NODE]
    reason = refusal_reason(reply)
    assert reason is not None and "not signed by the trusted server key" in reason
    assert s.heads(NODE) == []


# ------------------------------------------------------------------ honest run
@pytest.mark.parametrize("secagg", [False, True], ids=["plain", "secure"])
def test_honest_run_with_pinned_key_completes_and_every_site_holds_the_final_head(
    tmp_path: Path, secagg: bool
) -> None:
    s = sites(tmp_path, num_sites=3)
    record = SqlRecord(f"sqlite:///{tmp_path / 'record.db'}")
    results = FederatedRun(
        echo_cfg(3, rounds=2, secagg=secagg), s.grid, book=RunBook(record, KEY, RUN_ID)
    ).execute()
    assert [r.participants for r in results] == [3, 3]
    final = record.latest_seal()
    events = record.events()
    assert final is not None and events[-1].kind == "run_finished" and final.seq == events[-1].seq
    for node_id in s.grid.contexts:
        heads = s.heads(node_id)
        assert heads[-1] == final  # the run_finished seal reached every site
        assert check_witness(heads, events, KEY.public_key(), record.record_id).ok
    decisions = [
        d for e in record.events(RUN_ID) if e.kind == "site_policy_decisions"
        for d in e.payload()["decisions"] if d["rule"] == "trust.server_key"
    ]  # fmt: skip
    assert decisions and all(
        d["allowed"] and "signed by the trusted server key" in d["reason"] for d in decisions
    )
    record.close()


def test_resumed_run_is_accepted_by_pinned_sites_after_a_coordinator_crash(tmp_path: Path) -> None:
    """A new coordinator process numbers from scratch, but above everything the crashed one
    sent: the sites take the resumed run's instructions and refuse none as replays."""
    s = sites(tmp_path)

    def crash(msg: Message) -> None:  # round 2 reached NODE, then the coordinator dies
        if msg.metadata.group_id == "2" and msg.metadata.dst_node_id == PEER:
            raise RuntimeError("coordinator killed")

    s.tamper = crash
    record = SqlRecord(f"sqlite:///{tmp_path / 'record.db'}")
    with pytest.raises(RuntimeError, match="killed"):
        FederatedRun(echo_cfg(rounds=3), s.grid, book=RunBook(record, KEY, RUN_ID)).execute()
    assert (NODE, 2) in s.trainer.calls
    s.tamper = None
    resumed = FederatedRun(
        echo_cfg(rounds=3), s.grid, book=RunBook(record, KEY, RUN_ID), resume=True
    )
    results = resumed.execute()
    assert [(r.round, r.participants) for r in results] == [(1, 2), (2, 2), (3, 2)]
    # round 2 redone from the record: NODE answers with its stored release, without training
    assert s.trainer.calls.count((NODE, 2)) == 1
    assert s.heads(NODE)[-1] == record.latest_seal()
    record.close()
