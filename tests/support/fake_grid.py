"""An in-memory Flower ``Grid`` that delivers messages to a real ClientApp, with fault hooks.

Ray-free stand-in for the Simulation Engine's ``InMemoryGrid``: it holds N
fake nodes, each with its own :class:`flwr.app.Context` (``node_id``,
``node_config`` with ``partition-id``/``num-partitions``, a persistent
``state``), and answers :meth:`FakeGrid.send_and_receive` by calling
``client_app(message, context)`` for each addressed node, as a SuperNode
does. What the transport does is reproduced where it matters to the server:

* every instruction gets a fresh ``message_id`` (so ``reply_to`` works) and
  must be a valid, unanswered instruction (checked as ``InMemoryGrid`` does);
* instructions and replies cross a protobuf round trip
  (``message_to_proto``/``message_from_proto``), so neither side shares
  objects with the other and only wire-encodable content survives;
* a ClientApp that raises yields an error reply
  (``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``) and its node state is left as it
  was before the call, like ``flwr-clientapp``;
* node state is round-tripped through protobuf after each call, as a
  SuperNode persisting its context would.

Fault hooks (:class:`Fault`) act on one node's reply to one message type:
drop it, or replace it (see the ``corrupt_*``/``error_reply``/``swap_payload``
helpers). ``order`` permutes the replies handed back to the server.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import (
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from common.records import KEY_PAYLOAD, KEY_SECAGG_MSG

FIRST_NODE_ID = 1_000  # well away from SUPERLINK_NODE_ID


@dataclass(frozen=True, slots=True)
class Exchange:
    """Everything one ``send_and_receive`` call saw (for assertions)."""

    message_types: dict[int, str]  # node -> message type it was sent
    replies: dict[int, Message]  # node -> the reply as the node produced it (before faults)
    delivered: tuple[int, ...]  # nodes whose (possibly altered) reply reached the server


# A reply rewriter: (instruction, reply as produced, every node's produced reply) -> new reply.
Rewrite = Callable[[Message, Message, Mapping[int, Message]], Message]


@dataclass(slots=True)
class Fault:
    """Alter node ``node_id``'s reply to messages of type ``message_type``.

    ``message_type`` is matched exactly (``"train.secagg_masked"``) or, when
    it has no dot after the category, as the action alone (``"secagg_masked"``).
    ``rewrite=None`` drops the reply (the node goes silent). ``deliver=False``
    also keeps the instruction from reaching the node (it is offline), so its
    state does not advance. ``server_round`` restricts the fault to messages of
    that round (their ``group_id``); ``times`` limits how often it fires.
    """

    node_id: int
    message_type: str
    rewrite: Rewrite | None = None
    deliver: bool = True
    server_round: int | None = None
    times: int | None = None
    fired: int = field(default=0, init=False)

    def matches(self, node_id: int, message_type: str, group_id: str) -> bool:
        if node_id != self.node_id or (self.times is not None and self.fired >= self.times):
            return False
        if self.server_round is not None and group_id != str(self.server_round):
            return False
        action = message_type.split(".", 1)[1] if "." in message_type else message_type
        return self.message_type in (message_type, action)


class FakeGrid(Grid):
    """A Grid over ``num_nodes`` in-process nodes running ``client_app``.

    Node ids are ``FIRST_NODE_ID + partition-id``. ``on_deliver(grid, msg)``
    runs just before a node handles ``msg`` (to tamper with its state).
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        run_id: int = 7,
        faults: Sequence[Fault] = (),
        order: Callable[[list[Message]], list[Message]] | None = None,
        on_deliver: Callable[[FakeGrid, Message], None] | None = None,
    ) -> None:
        self.client_app = client_app
        self.faults = list(faults)
        self.order = order
        self.on_deliver = on_deliver
        self.history: list[Exchange] = []
        self._run = Run.create_empty(run_id)
        self.contexts: dict[int, Context] = {}
        for partition in range(num_nodes):
            node_id = FIRST_NODE_ID + partition
            self.contexts[node_id] = Context(
                run_id=run_id,
                node_id=node_id,
                node_config={"partition-id": partition, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
        self._pending: dict[str, Message] = {}
        self._replies: dict[str, Message] = {}

    # ------------------------------------------------------------ Grid API
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [NodeInfo(node_id=n) for n in self.contexts]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            md = msg.metadata
            if md.reply_to_message_id != "" or md.ttl <= 0 or md.delivered_at != "":
                raise ValueError(f"invalid instruction: {md}")
            if md.dst_node_id not in self.contexts:
                raise ValueError(f"unknown node {md.dst_node_id}")
            md.__dict__["_message_id"] = uuid.uuid4().hex
            self._pending[md.message_id] = _wire(msg)
            ids.append(md.message_id)
        self._deliver(ids)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = [self._replies.pop(i) for i in list(message_ids) if i in self._replies]
        return self.order(out) if self.order is not None else out

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    # ------------------------------------------------------------ delivery
    def _deliver(self, message_ids: list[str]) -> None:
        produced: dict[int, tuple[str, Message, Message]] = {}
        types: dict[int, str] = {}
        for mid in message_ids:
            msg = self._pending.pop(mid)
            node_id, mtype = msg.metadata.dst_node_id, msg.metadata.message_type
            types[node_id] = mtype
            fault = self._fault(msg)
            if fault is not None and not fault.deliver:
                fault.fired += 1
                continue
            if self.on_deliver is not None:
                self.on_deliver(self, msg)
            produced[node_id] = (mid, msg, self._call_node(node_id, msg))
        replies = {n: r for n, (_, _, r) in produced.items()}
        delivered = []
        for node_id, (mid, msg, reply) in produced.items():
            fault = self._fault(msg)
            if fault is not None:
                fault.fired += 1
                if fault.rewrite is None:
                    continue
                reply = fault.rewrite(msg, reply, replies)
            self._replies[mid] = _wire(reply)
            delivered.append(node_id)
        self.history.append(Exchange(types, replies, tuple(delivered)))

    def _fault(self, msg: Message) -> Fault | None:
        md = msg.metadata
        return next(
            (f for f in self.faults if f.matches(md.dst_node_id, md.message_type, md.group_id)),
            None,
        )

    def _call_node(self, node_id: int, msg: Message) -> Message:
        context = self.contexts[node_id]
        before = recorddict_to_proto(context.state)
        try:
            reply = self.client_app(msg, context)
        except Exception as exc:  # noqa: BLE001 - a SuperNode turns any exception into an error reply
            context.state = recorddict_from_proto(before)
            return Message(
                Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc)}:<'{exc}'>"),
                reply_to=msg,
            )
        context.state = recorddict_from_proto(recorddict_to_proto(context.state))
        return reply


def _wire(msg: Message) -> Message:
    """A protobuf round trip: what the other side of a real transport receives."""
    return message_from_proto(message_to_proto(msg))


@contextlib.contextmanager
def server_identity(run_id: int = 7) -> Iterator[None]:
    """Run the block as the ServerApp process does: TaskIdentity set, restored afterwards."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


# ---------------------------------------------------------------- reply rewriters
def _payload(reply: Message) -> bytes:
    return bytes(reply.content.array_records[KEY_SECAGG_MSG][KEY_PAYLOAD].numpy().tobytes())


def _with_payload(msg: Message, reply: Message, data: bytes) -> Message:
    content = RecordDict(dict(reply.content.items()))
    content[KEY_SECAGG_MSG] = ArrayRecord({KEY_PAYLOAD: Array(np.frombuffer(data, np.uint8))})
    return Message(content, reply_to=msg)


def flip_payload_byte(offset: int = -1) -> Rewrite:
    """Flip every bit of one byte of the SecAgg payload (default: the last one)."""

    def rewrite(msg: Message, reply: Message, _: Mapping[int, Message]) -> Message:
        data = bytearray(_payload(reply))
        data[offset] ^= 0xFF
        return _with_payload(msg, reply, bytes(data))

    return rewrite


def swap_payload(source_node: int) -> Rewrite:
    """Replace the SecAgg payload with the one ``source_node`` sent in the same exchange."""

    def rewrite(msg: Message, reply: Message, replies: Mapping[int, Message]) -> Message:
        return _with_payload(msg, reply, _payload(replies[source_node]))

    return rewrite


def oversize_payload(extra_bytes: int) -> Rewrite:
    """Append ``extra_bytes`` zero bytes to the SecAgg payload."""

    def rewrite(msg: Message, reply: Message, _: Mapping[int, Message]) -> Message:
        return _with_payload(msg, reply, _payload(reply) + bytes(extra_bytes))

    return rewrite


def error_reply(reason: str = "injected failure") -> Rewrite:
    """Answer with a Flower error instead of content."""

    def rewrite(msg: Message, _: Message, __: Mapping[int, Message]) -> Message:
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)

    return rewrite


def reverse_order(replies: list[Message]) -> list[Message]:
    """Hand replies to the server last-node-first."""
    return sorted(replies, key=lambda m: m.metadata.src_node_id, reverse=True)


def admitting_app(app: ClientApp | None = None) -> ClientApp:
    """``app`` (default: a new empty one) answering the admission query with a plain ack.

    What a site with fitting data replies in a plain run (:mod:`server.aggregation.admission`); the
    round loop asks every site once before it draws a cohort.
    """
    from common.secagg.stages import IDENTITY_ACTION

    app = app or ClientApp()

    @app.query(IDENTITY_ACTION)
    def admission(msg: Message, context: Context) -> Message:
        return Message(RecordDict(), reply_to=msg)

    return app
