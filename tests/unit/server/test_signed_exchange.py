"""The coordinator signs every instruction it sends, and announces the final head."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fake_grid import FIRST_NODE_ID, FakeGrid, server_identity
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

import common.record_digest as rd
from common.audit.instruction import InstructionHeader, InstructionSigner, verify_instruction
from common.audit.seal import SignedHead
from common.config import RunConfig
from common.records import KEY_ARRAYS, vector_to_record
from server.aggregation.exchange import AUDIT_HEAD_MESSAGE, GridExchange

SIGNER = InstructionSigner(Ed25519PrivateKey.from_private_bytes(b"\x07" * 32))
RUN_ID = "00000000abcd"


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with server_identity():
        yield


def cfg() -> RunConfig:
    return RunConfig(
        dataset="custom", model="vector", workload="echo", num_features=4, num_classes=2,
        num_sites=3, rounds=1, min_sites=2, device="cpu", secagg=False, clip_norm=1.0,
    )  # fmt: skip


def head_at(seq: int) -> SignedHead:
    return SignedHead("rec", seq, "a" * 64, "t", bytes(64))


def test_every_message_is_signed_with_its_own_sequence_and_verifies() -> None:
    head = [head_at(3)]
    exchange = GridExchange(
        FakeGrid(ClientApp(), 3), cfg(), RUN_ID, "hash", lambda: head[0], SIGNER
    )
    content = exchange.instruction(2)
    content[KEY_ARRAYS] = vector_to_record(np.zeros(4, dtype=np.float32))
    nodes = [FIRST_NODE_ID + i for i in range(3)]
    first = exchange.messages({n: (content, "train") for n in nodes}, 2)
    head[0] = head_at(4)  # a seal between two exchanges raises the epoch
    second = exchange.messages({n: (content, "train") for n in nodes}, 2)
    seqs = []
    for msg in first + second:
        sig = rd.read_signature(msg.content)
        assert sig is not None and sig.key_id == SIGNER.key_id
        md = msg.metadata
        hdr = InstructionHeader(
            md.message_type, RUN_ID, md.group_id, md.dst_node_id, sig.seq, sig.key_id
        )
        assert verify_instruction(
            SIGNER.public_key, hdr.message(rd.content_digest(msg.content)), sig.signature
        )
        assert msg.content[KEY_ARRAYS] is content[KEY_ARRAYS]  # the model is shared, not copied
        seqs.append(sig.seq)
    assert seqs == sorted(set(seqs)) and seqs[0] == 3 << 32 and seqs[3] == 4 << 32
    assert rd.KEY_INSTRUCTION_SIGNATURE not in content  # the caller's content is left alone


def test_without_a_signer_nothing_is_signed() -> None:
    exchange = GridExchange(FakeGrid(ClientApp(), 1), cfg(), RUN_ID, "hash")
    (msg,) = exchange.messages({FIRST_NODE_ID: (exchange.instruction(1), "train")}, 1)
    assert rd.read_signature(msg.content) is None


def test_shared_model_is_hashed_once_per_exchange(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = rd._array_digest
    monkeypatch.setattr(rd, "_array_digest", lambda r: calls.append(1) or real(r))
    exchange = GridExchange(FakeGrid(ClientApp(), 50), cfg(), RUN_ID, "hash", signer=SIGNER)
    content = exchange.instruction(1)
    content[KEY_ARRAYS] = vector_to_record(np.zeros(1000, dtype=np.float32))
    exchange.messages({FIRST_NODE_ID + i: (content, "train") for i in range(50)}, 1)
    assert len(calls) == 1


def test_announce_head_reaches_every_node_and_never_raises() -> None:
    seen: list[tuple[int, str]] = []
    app = ClientApp()

    @app.query("audit_head")
    def ack(msg: Message, context: Context) -> Message:
        seen.append((context.node_id, msg.metadata.message_type))
        return Message(RecordDict(), reply_to=msg)

    head = head_at(5)
    exchange = GridExchange(FakeGrid(app, 3), cfg(), RUN_ID, "hash", lambda: head, SIGNER)
    assert exchange.announce_head(1) == 3
    assert sorted(seen) == [(FIRST_NODE_ID + i, AUDIT_HEAD_MESSAGE) for i in range(3)]
    # sites without a handler answer with errors: counted out, nothing raised
    silent = GridExchange(FakeGrid(ClientApp(), 3), cfg(), RUN_ID, "hash", lambda: head, SIGNER)
    assert silent.announce_head(1) == 0
    # no head (no record): nothing to announce
    assert GridExchange(FakeGrid(app, 3), cfg(), RUN_ID, "hash").announce_head(1) == 0
