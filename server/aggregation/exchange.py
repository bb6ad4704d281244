"""The transport seam between aggregators and Flower's ``Grid``.

An aggregator builds instructions and sends them through an
:class:`Exchange`; it never sees the Grid, the run's bookkeeping or the
audit head. :class:`GridExchange` is the real one: every instruction carries
the run configuration, the run id, the coordinator's code hash and the latest
signed audit head (so sites keep a witness copy), and one call is one
``Grid.send_and_receive``. Tests and benchmarks pass their own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from common.audit.seal import SignedHead
from common.config import RunConfig
from common.records import KEY_APP_HASH, KEY_AUDIT_HEAD, KEY_CONFIG, KEY_RUN_ID, config_to_record

# node_id -> (content, message type)
Outgoing = Mapping[int, tuple[RecordDict, str]]


class Exchange(Protocol):
    """Builds instructions for one run and sends them to sites."""

    def instruction(self, server_round: int, **extra: Any) -> RecordDict:
        """A fresh instruction content for ``server_round`` (config record plus ``extra``)."""
        ...

    def send(self, outgoing: Outgoing, server_round: int) -> dict[int, Message]:
        """One exchange; the first reply from each addressed node that answered in time."""
        ...


class GridExchange:
    """:class:`Exchange` over a Flower ``Grid``."""

    def __init__(
        self,
        grid: Grid,
        cfg: RunConfig,
        run_id: str,
        app_hash: str,
        head: Callable[[], SignedHead | None] = lambda: None,
    ) -> None:
        self.grid = grid
        self.cfg = cfg
        self.run_id = run_id
        self.app_hash = app_hash
        self.head = head

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

    def send(self, outgoing: Outgoing, server_round: int) -> dict[int, Message]:
        messages = [
            Message(content=content, dst_node_id=n, message_type=mtype, group_id=str(server_round))
            for n, (content, mtype) in outgoing.items()
        ]
        replies = self.grid.send_and_receive(messages, timeout=self.cfg.round_timeout_s)
        by_node: dict[int, Message] = {}
        for r in replies:
            src = r.metadata.src_node_id
            if src in outgoing and src not in by_node:
                by_node[src] = r
        return by_node
