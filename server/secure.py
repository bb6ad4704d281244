"""Server side of secure aggregation on Flower's Message API (no LegacyContext).

Drives :class:`common.secagg.SecAggServer` through its four stages with one
``Grid`` exchange each. Every reply is checked on its own before the protocol
sees it: a Flower error, an undecodable or oversized payload, or a reply for
another node, round or run removes only that site (as a dropout, with the
reason recorded); the protocol then decides whether enough sites remain.
Below the threshold the round aborts with ProtocolAbort and the caller keeps
the global model as it was. A site whose unmask reply carries a wrong share is
outvoted by the other share holders and named in the outcome's ``rejected``
(its own masked input, already in the sum, stays there).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message, RecordDict

from common.config import RunConfig
from common.errors import FedsealError, ProtocolError
from common.records import (
    ACTION_SECAGG_KEYS,
    ACTION_SECAGG_MASKED,
    ACTION_SECAGG_SHARES,
    ACTION_SECAGG_UNMASK,
    KEY_ARRAYS,
    KEY_METRICS,
    KEY_REFUSAL,
    KEY_SECAGG_CONFIG,
    KEY_SECAGG_MSG,
    KEY_SITE_DECISIONS,
    bytes_to_record,
    max_secagg_reply_bytes,
    record_to_bytes,
)
from common.rng import secure_bytes
from common.secagg import AggregateResult, SecAggServer, make_config
from common.secagg.messages import (
    AdvertiseKeysReply,
    CollectMaskedReply,
    ShareKeysReply,
    UnmaskReply,
)

# exchange(action, {node_id: content}) -> {node_id: reply}
Exchange = Callable[[str, Mapping[int, RecordDict]], dict[int, Message]]
STAGE_OF_ACTION = {
    ACTION_SECAGG_KEYS: "keys",
    ACTION_SECAGG_SHARES: "shares",
    ACTION_SECAGG_MASKED: "masked",
    ACTION_SECAGG_UNMASK: "unmask",
}


@dataclass(slots=True)
class SecureRoundOutcome:
    """A completed secure round: the sum of clipped updates and who is in it."""

    result: AggregateResult
    site_metrics: dict[int, dict[str, Any]] = field(default_factory=dict)
    # node -> why its reply was unusable; includes AggregateResult.rejected (wrong unmask
    # shares), whose nodes may also be contributors
    rejected: dict[int, str] = field(default_factory=dict)
    injected_drops: tuple[int, ...] = ()
    refused: dict[int, str] = field(default_factory=dict)  # node -> the site's own reason


@dataclass(slots=True)
class SecureRound:
    """One secure-aggregation round over ``cohort``."""

    cfg: RunConfig
    server_round: int
    run_number: int
    cohort: list[int]
    vector_length: int
    exchange: Exchange
    base_content: Callable[[], RecordDict]
    global_arrays: Callable[[], Any]
    droppers: frozenset[int] = frozenset()
    rejected: dict[int, str] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)
    decisions: dict[int, dict[str, Any]] = field(default_factory=dict)
    site_metrics: dict[int, dict[str, Any]] = field(default_factory=dict)

    def run(self) -> SecureRoundOutcome:
        config = make_config(
            run_id=self.run_number,
            round=self.server_round,
            cohort=self.cohort,
            threshold=self.cfg.secagg_threshold_value,
            value_bound=self.cfg.clip_norm,
            vector_length=self.vector_length,
            bits=self.cfg.secagg_bits,
            graph_seed=secure_bytes(32),
        )
        server = SecAggServer(config)
        reply_cap = max_secagg_reply_bytes(config.size, config.masked_size)

        def stage(
            action: str, requests: Mapping[int, Any], reply_type: Any, *, first: bool = False
        ) -> list[Any]:
            contents: dict[int, RecordDict] = {}
            # Built once per exchange and shared by every message (read-only once sent).
            shared_config = bytes_to_record(config.encode()) if first else None
            model = self.global_arrays() if action == ACTION_SECAGG_MASKED else None
            for node_id, request in requests.items():
                content = self.base_content()
                content[KEY_SECAGG_MSG] = bytes_to_record(request.encode())
                if shared_config is not None:
                    content[KEY_SECAGG_CONFIG] = shared_config
                if model is not None:
                    content[KEY_ARRAYS] = model
                contents[node_id] = content
            replies = self.exchange(action, contents)
            decoded = []
            for node_id in contents:
                if STAGE_OF_ACTION[action] == self.cfg.drop_stage and node_id in self.droppers:
                    continue  # injected fault: this site goes silent here
                reply = replies.get(node_id)
                if reply is None:
                    self.rejected[node_id] = f"no reply at stage {STAGE_OF_ACTION[action]}"
                    continue
                if first and (found := site_decisions(reply)) is not None:
                    self.decisions[node_id] = found
                if first and (reason := refusal_reason(reply)) is not None:
                    self.refused[node_id] = reason  # declined before sharing keys
                    continue
                try:
                    if reply.has_error():
                        raise ProtocolError(f"site error: {reply.error.reason}")
                    data = record_to_bytes(
                        reply.content.array_records.get(KEY_SECAGG_MSG),
                        reply_cap,
                        copy=action != ACTION_SECAGG_MASKED,  # masked vectors: zero-copy
                    )
                    msg = reply_type.decode(data, config)
                    if msg.node_id != node_id:
                        raise ProtocolError(f"reply claims node {msg.node_id}")
                    if action == ACTION_SECAGG_MASKED:
                        self.site_metrics[node_id] = _metrics(reply)
                except FedsealError as exc:
                    self.rejected[node_id] = f"stage {STAGE_OF_ACTION[action]}: {exc}"
                    continue
                decoded.append(msg)
            return decoded

        requests: Mapping[int, Any] = server.start()
        requests = server.receive_advertise_keys(
            stage(ACTION_SECAGG_KEYS, requests, AdvertiseKeysReply, first=True)
        )
        requests = server.receive_share_keys(stage(ACTION_SECAGG_SHARES, requests, ShareKeysReply))
        requests = server.receive_masked(stage(ACTION_SECAGG_MASKED, requests, CollectMaskedReply))
        result = server.receive_unmask(stage(ACTION_SECAGG_UNMASK, requests, UnmaskReply))
        metrics = {n: m for n, m in self.site_metrics.items() if n in set(result.contributors)}
        # share holders the protocol caught with wrong unmask shares (contributors stay in the sum)
        rejected = {**result.rejected, **self.rejected}
        return SecureRoundOutcome(
            result, metrics, rejected, tuple(sorted(self.droppers)), dict(self.refused)
        )


MAX_DECISIONS_BYTES = 64 * 1024


def site_decisions(reply: Message) -> dict[str, Any] | None:
    """A site's policy decisions carried in its reply (policy hash + decisions), if any.

    Bounded and parsed defensively: a malformed record is reported as such,
    never trusted and never a crash.
    """
    if reply.has_error():
        return None
    record = reply.content.config_records.get(KEY_SITE_DECISIONS)
    if record is None:
        return None
    policy_hash, raw = record.get("policy-hash"), record.get("decisions")
    if (
        not isinstance(policy_hash, str)
        or not isinstance(raw, str)
        or len(raw) > MAX_DECISIONS_BYTES
    ):
        return {"malformed": True}
    try:
        decisions = json.loads(raw)
    except ValueError:
        return {"malformed": True}
    if not isinstance(decisions, list):
        return {"malformed": True}
    return {"policy_hash": policy_hash[:128], "decisions": decisions}


def refusal_reason(reply: Message) -> str | None:
    """The site's reason if ``reply`` declines the round (metrics ``refused`` = 1), else None."""
    if reply.has_error():
        return None
    metrics = reply.content.metric_records.get(KEY_METRICS)
    if metrics is None or metrics.get("refused") != 1:
        return None
    record = reply.content.config_records.get(KEY_REFUSAL)
    reason = record.get("reason") if record is not None else None
    return reason[:500] if isinstance(reason, str) and reason else "refused (no reason given)"


def _metrics(reply: Message) -> dict[str, Any]:
    record = reply.content.metric_records.get(KEY_METRICS)
    if record is None:
        raise ProtocolError("masked reply lacks its metrics")
    out = dict(record.items())
    n = out.get("num-examples")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ProtocolError(f"num-examples must be a positive integer, got {n!r}")
    for key, value in out.items():
        if isinstance(value, float) and not np.isfinite(value):
            raise ProtocolError(f"metric {key!r} is not finite")
    return out
