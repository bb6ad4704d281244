"""Plain FedAvg: one train exchange, each usable update weighted by its example count.

The server sees every site's update in the clear; use it only where that is
acceptable (or under central DP, see :mod:`server.privacy`, which asks for
unit weights and clipped updates instead). Under record-level DP the sites
state no example count (their dataset sizes are private): every
contributor then weighs the same. Each site's update is already an average
over its own records, so this is FedAvg for equal-sized sites and an
average that gives no site more pull than another otherwise.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import MessageType

from common.dp import clip_l2
from common.errors import FedsealError
from common.records import KEY_ARRAYS, KEY_COHORT_SIZE, vector_to_record
from server.aggregation.base import Aggregate, RoundInput
from server.aggregation.exchange import Exchange
from server.aggregation.replies import (
    SiteUpdate,
    parse_train_reply,
    refusal_reason,
    site_decisions,
    site_outcome,
)
from server.results import SiteOutcome

log = logging.getLogger("flwr.fedseal.server")


class PlainAggregator:
    """FedAvg over one ``train`` exchange.

    ``clip_norm`` set: every update is re-clipped to L2 ``clip_norm`` by the
    server and all contributors weigh the same (DP-FedAvg's sensitivity
    assumes both); otherwise updates are weighted by their example counts
    when every contributor states one, and the same when any does not.
    """

    def __init__(self, vector_length: int, clip_norm: float | None = None) -> None:
        self.vector_length = vector_length
        self.clip_norm = clip_norm

    @property
    def clipped_to(self) -> float | None:
        """Every contribution's L2 bound in the sum (unit weights), or None when unclipped."""
        return self.clip_norm

    def aggregate(self, round_input: RoundInput, exchange: Exchange) -> Aggregate:
        server_round, cohort = round_input.server_round, round_input.cohort
        agg = Aggregate(np.zeros(self.vector_length), 1.0, [], [])
        replies = {}
        if cohort:
            content = exchange.instruction(server_round, **{KEY_COHORT_SIZE: len(cohort)})
            content[KEY_ARRAYS] = vector_to_record(round_input.global_vector)
            replies = exchange.send({n: (content, MessageType.TRAIN) for n in cohort}, server_round)
        updates: list[SiteUpdate] = []
        for node_id in cohort:
            reply = replies.get(node_id)
            if reply is None:
                agg.outcomes.append(
                    SiteOutcome(node_id, False, "no reply before the round timeout")
                )
                continue
            if (found := site_decisions(reply)) is not None:
                agg.event(
                    "site_policy_decisions",
                    {"round": server_round, "node_id": str(node_id), **found},
                )
            if (reason := refusal_reason(reply)) is not None:
                agg.outcomes.append(SiteOutcome(node_id, False, reason, refused=True))
                agg.event(
                    "site_refused",
                    {"round": server_round, "node_id": str(node_id), "reason": reason},
                )
                continue
            try:
                u = parse_train_reply(reply, self.vector_length)
            except FedsealError as exc:
                agg.outcomes.append(SiteOutcome(node_id, False, str(exc)))
                agg.event(
                    "update_rejected",
                    {"round": server_round, "node_id": str(node_id), "reason": str(exc)},
                )
                log.warning(
                    "round %d: update from node %d rejected: %s", server_round, node_id, exc
                )
                continue
            updates.append(u)
            agg.outcomes.append(site_outcome(node_id, u.metrics))
        agg.contributors = [u.node_id for u in updates]
        if not updates:
            return agg
        total = np.zeros(self.vector_length, dtype=np.float64)
        if self.clip_norm is not None:
            # Sensitivity C needs every update clipped: the server re-clips what it can see.
            for u in updates:
                total += clip_l2(u.update, self.clip_norm)[0]
            agg.total, agg.weight = total, float(len(updates))
            return agg
        stated = [u.num_examples for u in updates if u.num_examples is not None]
        weights = stated if len(stated) == len(updates) else [1] * len(updates)
        for u, weight in zip(updates, weights, strict=True):
            scaled = u.update.astype(np.float64)  # one temporary per update, scaled in place
            scaled *= weight
            total += scaled
        agg.total, agg.weight = total, float(sum(weights))
        return agg
