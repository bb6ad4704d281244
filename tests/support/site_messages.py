"""A site's messages, made by hand: instructions as they reach a site, a site's context, replies.

For ClientApp tests that drive the app message by message (``import site_messages``);
``FakeTrainer`` stands in for a site's training with fixed, per-site updates.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np
from fake_grid import FIRST_NODE_ID
from flwr.app import Context, Message, MetricRecord, RecordDict

from client.agent import LocalUpdate, SiteContext
from common.config import RunConfig
from common.errors import PrivacyBudgetExceeded
from common.records import (
    KEY_ARRAYS,
    KEY_COHORT_SIZE,
    KEY_CONFIG,
    KEY_METRICS,
    KEY_REFUSAL,
    KEY_RUN_ID,
    config_to_record,
    vector_to_record,
)
from common.rng import seeded_generator

D = 16  # coordinates of the "vector" model
RUN_ID = "0123456789ab"


def update_of(partition: int) -> np.ndarray:
    """A fixed update per site, L2 norm 0.5 + 0.5 * partition."""
    v = seeded_generator(77 + partition).standard_normal(D)
    return (v * ((0.5 + 0.5 * partition) / np.linalg.norm(v))).astype(np.float32)


@dataclass
class FakeTrainer:
    """Returns ``update_of(partition)``; records every call; refuses the (partition, round)s
    in ``refuse`` as the ledger does at reserve time."""

    refuse: set[tuple[int, int]] = field(default_factory=set)
    calls: list[tuple[int, int]] = field(default_factory=list)

    def __call__(self, site: SiteContext, arrays: object) -> LocalUpdate:
        partition = int(site.context.node_config["partition-id"])
        self.calls.append((partition, site.server_round))
        if (partition, site.server_round) in self.refuse:
            raise PrivacyBudgetExceeded(3.0, 4.0, 5.0)
        return LocalUpdate(update_of(partition), partition + 1, {"train-seconds": 0.0})


def vector_cfg(num_sites: int = 3, **changes: object) -> RunConfig:
    """A plain run of the ``vector`` model (``D`` coordinates) whose sites echo, clipped at 1."""
    return RunConfig(
        dataset="custom", model="vector", workload="echo", num_features=D, num_classes=2,
        num_sites=num_sites, rounds=1, device="cpu", secagg=False, clip_norm=1.0,
    ).replace(**changes)  # fmt: skip


def instruction(
    cfg: RunConfig, server_round: int = 1, message_type: str = "train", node_id: int = FIRST_NODE_ID
) -> Message:
    """A server instruction as it reaches the site."""
    extra = {KEY_RUN_ID: RUN_ID, KEY_COHORT_SIZE: cfg.num_sites}
    content = RecordDict({KEY_CONFIG: config_to_record(cfg, server_round, **extra)})
    content[KEY_ARRAYS] = vector_to_record(np.zeros(D, dtype=np.float32))
    msg = Message(content, node_id, message_type, group_id=str(server_round))
    msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    return msg


def site_context(partition: int = 0, num_sites: int = 3) -> Context:
    return Context(
        run_id=7,
        node_id=FIRST_NODE_ID + partition,
        node_config={"partition-id": partition, "num-partitions": num_sites},
        state=RecordDict(),
        run_config={},
    )


def metrics_of(reply: Message) -> MetricRecord:
    metrics: MetricRecord = reply.content.metric_records[KEY_METRICS]
    return metrics


def reason_of(reply: Message) -> str:
    reason = reply.content.config_records[KEY_REFUSAL]["reason"]
    assert isinstance(reason, str)
    return reason
