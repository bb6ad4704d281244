"""The transport seam between aggregators and Flower's ``Grid``.

An aggregator builds instructions and sends them through an
:class:`Exchange`; it never sees the Grid, the run's bookkeeping or the
audit head. :class:`GridExchange` is the real one: every instruction carries
the run configuration, the run id, the coordinator's code hash and the latest
signed audit head (so sites keep a witness copy), and one call is one
``Grid.send_and_receive``. Tests and benchmarks pass their own. In a
deployment the Grid is Flower's HTTP Grid, which waits 3 s between pulls for
replies; :class:`PollingGrid` makes the same calls at a shorter interval
(a secure round makes several exchanges, each paying that wait).

With a ``signer`` (the coordinator's audit-signing key) every message it
sends is signed (:mod:`common.audit.instruction`): its type, run id, round,
destination node, a per-run sequence number and a digest of every record it
carries (:mod:`common.record_digest`). Records shared by several messages
(the round's model) are hashed once per exchange; each message gets its own
signature record, its other records are shared, never copied.
:meth:`GridExchange.announce_head` sends the run's final signed head to
every connected site once the run has ended.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from flwr.app import Message, MessageType, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from common.audit.instruction import (
    InstructionHeader,
    InstructionSignature,
    InstructionSigner,
    next_sequence,
)
from common.audit.seal import SignedHead
from common.config import RunConfig
from common.record_digest import DigestCache, content_digest, signed_copy
from common.records import (
    AUDIT_HEAD_ACTION,
    KEY_APP_HASH,
    KEY_AUDIT_HEAD,
    KEY_CONFIG,
    KEY_REFUSAL,
    KEY_RUN_ID,
    config_to_record,
)

log = logging.getLogger("flwr.fedseal.server")

AUDIT_HEAD_MESSAGE = f"{MessageType.QUERY}.{AUDIT_HEAD_ACTION}"
"""The message carrying the run's final signed head to every site (ack: an empty reply)."""
ANNOUNCE_TIMEOUT_S = 30.0

# node_id -> (content, message type)
Outgoing = Mapping[int, tuple[RecordDict, str]]

DEPLOYED_PULL_INTERVAL_S = 0.2
"""How often the ServerApp asks the SuperLink for replies (Flower's HTTP Grid: every 3 s).

A pull is one loopback HTTP request that the SuperLink answers from its state
database; five a second while an exchange is outstanding cost little, and a
reply now waits 0.1 s on average for the ServerApp instead of 1.5 s.
"""


class GridWrapper(Grid):
    """A Flower ``Grid`` that hands every call to ``inner``; subclasses override what they change."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)


class PollingGrid(GridWrapper):
    """Flower's deployed (HTTP) Grid, its ``send_and_receive`` pulling every ``interval_s``.

    Everything is delegated to ``inner``; ``send_and_receive`` makes the same
    calls as Flower's own loop (``push_messages``, then ``pull_messages``
    until every pushed message has its reply or ``timeout`` passes), only
    the pause between pulls is shorter than Flower's fixed 3 s. The
    Simulation Engine's in-memory Grid has its own ``pull_interval`` and is
    not wrapped (:func:`server.app.make_server_app`).
    """

    def __init__(self, inner: Grid, interval_s: float = DEPLOYED_PULL_INTERVAL_S) -> None:
        if not interval_s > 0:
            raise ValueError(f"the pull interval must be positive, got {interval_s!r}")
        super().__init__(inner)
        self.interval_s = interval_s

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        deadline = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while timeout is None or time.monotonic() < deadline:
            pulled = list(self.pull_messages(pending))
            replies.extend(pulled)
            pending.difference_update(r.metadata.reply_to_message_id for r in pulled)
            if not pending:
                break
            time.sleep(self.interval_s)
        return replies


class Exchange(Protocol):
    """Builds instructions for one run and sends them to sites."""

    def instruction(self, server_round: int, **extra: Any) -> RecordDict:
        """A fresh instruction content for ``server_round`` (config record plus ``extra``)."""
        ...

    def send(self, outgoing: Outgoing, server_round: int) -> dict[int, Message]:
        """One exchange; the first reply from each addressed node that answered in time."""
        ...


class GridExchange:
    """:class:`Exchange` over a Flower ``Grid``, signing every message when given a ``signer``."""

    def __init__(
        self,
        grid: Grid,
        cfg: RunConfig,
        run_id: str,
        app_hash: str,
        head: Callable[[], SignedHead | None] = lambda: None,
        signer: InstructionSigner | None = None,
    ) -> None:
        self.grid = grid
        self.cfg = cfg
        self.run_id = run_id
        self.app_hash = app_hash
        self.head = head
        self.signer = signer
        self.seq = 0  # the last sequence number this exchange signed

    def extra(self) -> dict[str, bytes | str]:
        """Values every instruction carries besides the run config: run id, code hash, head."""
        extra: dict[str, bytes | str] = {KEY_RUN_ID: self.run_id, KEY_APP_HASH: self.app_hash}
        head = self.head()
        if head is not None:
            extra[KEY_AUDIT_HEAD] = head.encode()
        return extra

    def instruction(self, server_round: int, **extra: Any) -> RecordDict:
        record = config_to_record(self.cfg, server_round, **self.extra(), **extra)
        return RecordDict({KEY_CONFIG: record})

    def messages(self, outgoing: Outgoing, server_round: int) -> list[Message]:
        """The Flower messages of one exchange, each signed when there is a signer.

        The sequence number is :func:`~common.audit.instruction.next_sequence`
        of the last one and the current audit head's seq (the epoch), so it
        keeps growing when a resumed run's new process takes over.
        """
        group = str(server_round)
        cache: DigestCache = {}  # one hash per shared record object (the model) per exchange
        out = []
        for node_id, (content, mtype) in outgoing.items():
            if self.signer is not None:
                content = self._signed(content, mtype, group, node_id, cache)
            out.append(
                Message(content=content, dst_node_id=node_id, message_type=mtype, group_id=group)
            )
        return out

    def _signed(
        self, content: RecordDict, mtype: str, group: str, node_id: int, cache: DigestCache
    ) -> RecordDict:
        signer = self.signer
        if signer is None:
            return content
        head = self.head()
        self.seq = next_sequence(self.seq, head.seq if head is not None else 0)
        header = InstructionHeader(mtype, self.run_id, group, node_id, self.seq, signer.key_id)
        signature = signer.sign(header, content_digest(content, cache))
        return signed_copy(content, InstructionSignature(self.seq, signer.key_id, signature))

    def send(self, outgoing: Outgoing, server_round: int) -> dict[int, Message]:
        return self._send(outgoing, server_round, self.cfg.round_timeout_s)

    def _send(self, outgoing: Outgoing, server_round: int, timeout: float) -> dict[int, Message]:
        replies = self.grid.send_and_receive(self.messages(outgoing, server_round), timeout=timeout)
        by_node: dict[int, Message] = {}
        for r in replies:
            src = r.metadata.src_node_id
            if src in outgoing and src not in by_node:
                by_node[src] = r
        return by_node

    def announce_head(self, server_round: int) -> int:
        """Send the current (final) signed head to every connected node; how many acknowledged.

        Best effort, after the run has ended (its ``run_finished`` or
        ``run_aborted`` event sealed): without it, the events after the last
        round's instructions would be covered by no site's witness copy. The
        wait is bounded (the round timeout, at most :data:`ANNOUNCE_TIMEOUT_S`);
        nothing is written to the record (it is sealed and closed), failures
        are logged, never raised.
        """
        if self.head() is None:
            return 0
        try:
            nodes = list(self.grid.get_node_ids())
            if not nodes:
                return 0
            content = self.instruction(server_round)
            replies = self._send(
                {n: (content, AUDIT_HEAD_MESSAGE) for n in nodes},
                server_round,
                min(self.cfg.round_timeout_s, ANNOUNCE_TIMEOUT_S),
            )
        except Exception as exc:  # noqa: BLE001 - the run is over; this must not mask its outcome
            log.warning("run %s: final audit head not sent: %s", self.run_id, exc)
            return 0
        acked = sum(
            1 for r in replies.values() if not r.has_error() and KEY_REFUSAL not in r.content
        )
        log.info(
            "run %s: final audit head acknowledged by %d of %d sites",
            self.run_id,
            acked,
            len(nodes),
        )
        return acked
