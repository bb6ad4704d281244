"""Where a secure round's time goes: each stage's CPU work, in one process, without Ray.

The same code paths as a simulated round (the aggregators of
:mod:`server.aggregation` on the server, the fedseal ClientApp, :func:`client.app.make_client_app`, on
the sites: its secure-aggregation mod and train path) are driven through an
in-process loopback instead of Flower's Simulation Engine: each message goes
through one pickle round trip (what Ray does to a Message between the
ServerApp and a ClientApp actor), then to the site's ClientApp. A plain
FedAvg round is timed the same way.

What is reported per stage: the server's work before the exchange (building
requests), all sites' handler time (summed over sites: the CPU seconds the
sites spend, which a 2-core Simulation Engine runs two at a time), the
pickle time of requests and replies, and the server's work on the replies.
What is *not* in these figures is the Simulation Engine's scheduling: Flower
polls for new instructions and for replies every 0.1 s, which a real round
pays once per exchange (a plain round has one exchange; a secure round five, three
after a setup; plus, once per site and run, the identity query).
"""

from __future__ import annotations

import pickle
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from common.config import RunConfig
from common.records import (
    KEY_APP_HASH,
    KEY_CONFIG,
    KEY_RUN_ID,
    config_to_record,
)
from simulations.bench.secagg import echo_config

SERVER_NODE_ID = 1
RUN_ID = "0123456789ab"


@dataclass(slots=True)
class StageTiming:
    """Seconds spent in one exchange (one Grid round trip) of a round."""

    action: str
    server_before_s: float = 0.0
    pickle_s: float = 0.0
    sites_s: float = 0.0
    site_max_s: float = 0.0
    server_after_s: float = 0.0
    request_bytes: int = 0
    reply_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "server_before_s": self.server_before_s,
            "pickle_s": self.pickle_s,
            "sites_s": self.sites_s,
            "site_max_s": self.site_max_s,
            "server_after_s": self.server_after_s,
            "request_mb": self.request_bytes / 1e6,
            "reply_mb": self.reply_bytes / 1e6,
        }


@dataclass(slots=True)
class Loopback:
    """Delivers messages to in-process sites, timing every part of each exchange."""

    client_app: ClientApp
    contexts: dict[int, Context]
    cfg: RunConfig
    stages: list[StageTiming] = field(default_factory=list)
    _mark: float = 0.0

    def start(self) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        # Outside Flower's runtime a Message needs this process's task identity.
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, SERVER_NODE_ID
        self._mark = time.perf_counter()

    def exchange(self, outgoing: Mapping[int, tuple[RecordDict, str]]) -> dict[int, Message]:
        now = time.perf_counter()
        action = next(iter(outgoing.values()))[1] if outgoing else "none"
        stage = StageTiming(action, server_before_s=now - self._mark)
        replies: dict[int, Message] = {}
        for node_id, (content, message_type) in outgoing.items():
            msg = Message(content=content, dst_node_id=node_id, message_type=message_type)
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            msg.metadata.__dict__["_src_node_id"] = SERVER_NODE_ID
            t0 = time.perf_counter()
            wire = pickle.dumps(msg, protocol=5)
            delivered = pickle.loads(wire)
            t1 = time.perf_counter()
            reply = self.client_app(delivered, self.contexts[node_id])
            t2 = time.perf_counter()
            back = pickle.dumps(reply, protocol=5)
            replies[node_id] = pickle.loads(back)
            t3 = time.perf_counter()
            stage.pickle_s += (t1 - t0) + (t3 - t2)
            stage.sites_s += t2 - t1
            stage.site_max_s = max(stage.site_max_s, t2 - t1)
            stage.request_bytes += len(wire)
            stage.reply_bytes += len(back)
        self.stages.append(stage)
        self._mark = time.perf_counter()
        return replies

    # The Exchange seam (server.aggregation.exchange): the aggregators talk to this loopback.
    def instruction(self, server_round: int, **extra: Any) -> RecordDict:
        ids = {KEY_RUN_ID: RUN_ID, KEY_APP_HASH: "bench"}
        return RecordDict({KEY_CONFIG: config_to_record(self.cfg, server_round, **ids, **extra)})

    def send(
        self, outgoing: Mapping[int, tuple[RecordDict, str]], server_round: int
    ) -> dict[int, Message]:
        return self.exchange(outgoing)

    def finish(self) -> None:
        if self.stages:
            self.stages[-1].server_after_s = time.perf_counter() - self._mark


def _contexts(cfg: RunConfig) -> dict[int, Context]:
    return {
        node_id: Context(
            run_id=1,
            node_id=node_id,
            node_config={"partition-id": i, "num-partitions": cfg.num_sites},
            state=RecordDict(),
            run_config={},
        )
        for i, node_id in enumerate(range(100, 100 + cfg.num_sites))
    }


def time_round_stages(
    clients: int, params: int, *, secagg: bool, server_round: int = 1
) -> tuple[float, list[StageTiming]]:
    """One round in process; returns (total seconds, per-exchange timings)."""
    from client.app import make_client_app
    from server.aggregation import PlainAggregator, RoundInput, SecAggAggregator
    from simulations.federation import prepare_federation

    cfg = echo_config(clients, params, 1, secagg=secagg)
    global_vector = np.zeros(params, dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="fedseal-bench-") as root:
        federation = prepare_federation(Path(root), cfg.num_sites, coordinator_key=None)
        loop = Loopback(make_client_app(federation.site_setup()), _contexts(cfg), cfg)
        cohort = sorted(loop.contexts)
        aggregator = (
            SecAggAggregator(cfg, int(RUN_ID, 16), params, roster=federation.roster)
            if secagg
            else PlainAggregator(params)
        )
        start = time.perf_counter()
        loop.start()
        agg = aggregator.aggregate(RoundInput(server_round, cohort, global_vector), loop)
        if agg.failure is not None:
            raise agg.failure
        loop.finish()
        return time.perf_counter() - start, loop.stages


def bench_stages(clients: int, params: int) -> dict[str, Any]:
    """Plain vs secure round, in process, with a per-exchange breakdown (after one warm-up)."""
    for secagg in (False, True):  # imports and caches outside the timed rounds
        time_round_stages(min(clients, 3), min(params, 1000), secagg=secagg)
    plain_s, plain = time_round_stages(clients, params, secagg=False)
    secure_s, secure = time_round_stages(clients, params, secagg=True)
    return {
        "clients": clients,
        "params": params,
        "plain_s": plain_s,
        "secure_s": secure_s,
        "plain": [s.to_json() for s in plain],
        "secure": [s.to_json() for s in secure],
    }
