"""Server side of secure aggregation on Flower's Message API (no LegacyContext).

Drives :class:`common.secagg.SecAggServer` through its four stages with one
``Grid`` exchange each: :class:`SecureSetup` runs the keys and shares
exchanges, for one round or, when every round has the same cohort, for
several rounds at once (one bundle of per-round messages per site);
:class:`SecureRound` runs a prepared round's masked and unmask exchanges.
Every reply is checked on its own before the protocol
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
from flwr.app import ArrayRecord, Message, RecordDict

from common.config import RunConfig
from common.errors import FedsealError, ProtocolAbort, ProtocolError
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
    bundle_to_record,
    bytes_to_record,
    max_secagg_reply_bytes,
    record_to_bundle,
    record_to_bytes,
)
from common.rng import secure_bytes
from common.secagg import AggregateResult, SecAggConfig, SecAggServer, make_config
from common.secagg.messages import (
    AdvertiseKeysReply,
    CollectMaskedReply,
    ShareKeysReply,
    UnmaskReply,
)

# exchange(action, {node_id: content}, round the messages are grouped under) -> {node_id: reply}
Exchange = Callable[[str, Mapping[int, RecordDict], int], dict[int, Message]]
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
class PreparedRound:
    """One round whose keys and shares are in place: what its masked stage needs.

    ``rejected``/``refused``/``decisions``/``droppers`` carry what the setup
    learned about sites (they are out of this round from the start).
    """

    server: SecAggServer
    masked_requests: dict[int, Any]
    cohort: tuple[int, ...]
    rejected: dict[int, str] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)
    decisions: dict[int, dict[str, Any]] = field(default_factory=dict)
    droppers: frozenset[int] = frozenset()


def _encode_requests(requests: Mapping[int, Any], node_id: int, rounds: list[int]) -> list[bytes]:
    return [requests[r][node_id].encode() for r in rounds]


@dataclass(slots=True)
class SecureSetup:
    """The keys and shares exchanges that prepare one or more rounds over one cohort.

    Why several rounds can share one setup without weakening anything: every
    round still has its own configuration (round number, fresh public graph
    seed) and every client makes fresh key pairs and a fresh self-mask seed
    per round (:class:`common.secagg.SecAggClient`, one per round), so the
    rounds' secrets are independent, exactly as with one setup per round.
    Only the *messages* are batched: one keys exchange carries every round's
    AdvertiseKeys, one shares exchange every round's encrypted Shamir shares.
    A client's unrevealed secrets of later rounds wait in its sealed state
    (never in plaintext outside memory, never at the server); a site's
    answer for round r never involves another round's secrets, so the
    "never both shares for one neighbour" rule holds per round as before.
    What changes is *when* a site commits to a round: a site that is gone
    later simply drops out at that round's masked stage, which SecAgg+
    tolerates (its pairwise masks are removed from its reconstructed key).
    """

    cfg: RunConfig
    rounds: list[int]
    run_number: int
    cohort: list[int]
    vector_length: int
    exchange: Exchange
    base_content: Callable[[int], RecordDict]
    droppers: frozenset[int] = frozenset()  # silent at the setup's drop stage (injected)
    rejected: dict[int, str] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)
    decisions: dict[int, dict[str, Any]] = field(default_factory=dict)

    def run(self) -> dict[int, PreparedRound]:
        """Keys, then shares, for every round; ProtocolAbort if the first round cannot start.

        A later round whose protocol cannot go on (e.g. a neighbour graph that
        leaves some site below the threshold) ends the setup before it: those
        rounds get a setup of their own when their turn comes.
        """
        first = self.rounds[0]
        configs = {
            r: make_config(
                run_id=self.run_number,
                round=r,
                cohort=self.cohort,
                threshold=self.cfg.secagg_threshold_value,
                value_bound=self.cfg.clip_norm,
                vector_length=self.vector_length,
                bits=self.cfg.secagg_bits,
                graph_seed=secure_bytes(32),
            )
            for r in self.rounds
        }
        servers = {r: SecAggServer(c) for r, c in configs.items()}
        starts: dict[int, Mapping[int, Any]] = {r: servers[r].start() for r in self.rounds}
        config_bundle = bundle_to_record([configs[r].encode() for r in self.rounds])
        keys = self._exchange(
            ACTION_SECAGG_KEYS,
            {n: _encode_requests(starts, n, self.rounds) for n in starts[first]},
            self.rounds,
            configs,
            AdvertiseKeysReply,
            config_bundle,
        )
        rounds: list[int] = []
        share_requests: dict[int, Mapping[int, Any]] = {}
        for index, r in enumerate(self.rounds):
            try:
                share_requests[r] = servers[r].receive_advertise_keys(
                    [replies[index] for replies in keys.values()]
                )
            except ProtocolAbort:
                if r == first:
                    raise
                break
            rounds.append(r)
        # A site goes on only if every prepared round asks it for shares (consistent cohorts).
        asked = set.intersection(*(set(share_requests[r]) for r in rounds))
        shares = self._exchange(
            ACTION_SECAGG_SHARES,
            {n: _encode_requests(share_requests, n, rounds) for n in sorted(asked)},
            rounds,
            configs,
            ShareKeysReply,
            None,
        )
        prepared: dict[int, PreparedRound] = {}
        for i, r in enumerate(rounds):
            try:
                masked = servers[r].receive_share_keys([replies[i] for replies in shares.values()])
            except ProtocolAbort:
                if r == first:
                    raise
                break
            prepared[r] = PreparedRound(
                servers[r],
                dict(masked),
                tuple(self.cohort),
                rejected=dict(self.rejected),
                refused=dict(self.refused),
                decisions=dict(self.decisions) if r == first else {},
                droppers=self.droppers,
            )
        return prepared

    def _exchange(
        self,
        action: str,
        payloads: Mapping[int, list[bytes]],
        rounds: list[int],
        configs: Mapping[int, SecAggConfig],
        reply_type: Any,
        config_bundle: ArrayRecord | None,
    ) -> dict[int, list[Any]]:
        """One setup exchange; returns, per usable site, its decoded replies in round order."""
        stage_name = STAGE_OF_ACTION[action]
        contents: dict[int, RecordDict] = {}
        for node_id, items in payloads.items():
            content = self.base_content(self.rounds[0])
            content[KEY_SECAGG_MSG] = bundle_to_record(items)
            if config_bundle is not None:
                content[KEY_SECAGG_CONFIG] = config_bundle
            contents[node_id] = content
        replies = self.exchange(action, contents, self.rounds[0]) if contents else {}
        decoded: dict[int, list[Any]] = {}
        reply_cap = max_secagg_reply_bytes(len(self.cohort), 0)
        for node_id, items in payloads.items():
            reply = _usable_reply(
                replies,
                node_id,
                stage_name,
                silent=stage_name == self.cfg.drop_stage and node_id in self.droppers,
                may_refuse=action == ACTION_SECAGG_KEYS,  # declined before sharing keys
                rejected=self.rejected,
                refused=self.refused,
                decisions=self.decisions,
            )
            if reply is None:
                continue
            try:
                data = record_to_bundle(
                    reply.content.array_records.get(KEY_SECAGG_MSG), len(items), reply_cap
                )
                if len(data) != len(items):
                    raise ProtocolError(f"{len(data)} replies for {len(items)} rounds")
                msgs = []
                for raw, r in zip(data, rounds, strict=True):
                    msg = reply_type.decode(raw, configs[r])
                    if msg.node_id != node_id:
                        raise ProtocolError(f"reply claims node {msg.node_id}")
                    msgs.append(msg)
            except FedsealError as exc:
                self.rejected[node_id] = f"stage {stage_name}: {exc}"
                continue
            decoded[node_id] = msgs
        return decoded


@dataclass(slots=True)
class SecureRound:
    """The masked and unmask exchanges of one prepared round."""

    cfg: RunConfig
    server_round: int
    prepared: PreparedRound
    exchange: Exchange
    base_content: Callable[[int], RecordDict]
    global_arrays: Callable[[], Any]
    droppers: frozenset[int] = frozenset()
    rejected: dict[int, str] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)
    decisions: dict[int, dict[str, Any]] = field(default_factory=dict)
    site_metrics: dict[int, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rejected.update(self.prepared.rejected)
        self.refused.update(self.prepared.refused)
        self.decisions.update(self.prepared.decisions)

    def run(self) -> SecureRoundOutcome:
        server = self.prepared.server
        config = server.config
        reply_cap = max_secagg_reply_bytes(config.size, config.masked_size)

        def stage(action: str, requests: Mapping[int, Any], reply_type: Any) -> list[Any]:
            contents: dict[int, RecordDict] = {}
            # Built once per exchange and shared by every message (read-only once sent).
            model = self.global_arrays() if action == ACTION_SECAGG_MASKED else None
            for node_id, request in requests.items():
                content = self.base_content(self.server_round)
                content[KEY_SECAGG_MSG] = bytes_to_record(request.encode())
                if model is not None:
                    content[KEY_ARRAYS] = model
                contents[node_id] = content
            replies = self.exchange(action, contents, self.server_round) if contents else {}
            decoded = []
            stage_name = STAGE_OF_ACTION[action]
            for node_id in contents:
                reply = _usable_reply(
                    replies,
                    node_id,
                    stage_name,
                    silent=stage_name == self.cfg.drop_stage and node_id in self.droppers,
                    # a round after its setup's first: the site re-decides here (budget,
                    # policy); a refusal takes it out of this round, like a dropout
                    may_refuse=action == ACTION_SECAGG_MASKED,
                    rejected=self.rejected,
                    refused=self.refused,
                    decisions=self.decisions,
                )
                if reply is None:
                    continue
                try:
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
                    self.rejected[node_id] = f"stage {stage_name}: {exc}"
                    continue
                decoded.append(msg)
            return decoded

        requests = server.receive_masked(
            stage(ACTION_SECAGG_MASKED, self.prepared.masked_requests, CollectMaskedReply)
        )
        result = server.receive_unmask(stage(ACTION_SECAGG_UNMASK, requests, UnmaskReply))
        metrics = {n: m for n, m in self.site_metrics.items() if n in set(result.contributors)}
        # share holders the protocol caught with wrong unmask shares (contributors stay in the sum)
        rejected = {**result.rejected, **self.rejected}
        injected = self.droppers | self.prepared.droppers
        return SecureRoundOutcome(
            result, metrics, rejected, tuple(sorted(injected)), dict(self.refused)
        )


def _usable_reply(
    replies: Mapping[int, Message],
    node_id: int,
    stage_name: str,
    *,
    silent: bool,
    may_refuse: bool,
    rejected: dict[int, str],
    refused: dict[int, str],
    decisions: dict[int, dict[str, Any]],
) -> Message | None:
    """A site's reply if its payload should be decoded; otherwise records why not, returns None.

    ``silent``: an injected fault (the site goes quiet here). ``may_refuse``:
    the stage at which a site states its policy decisions and may decline.
    """
    if silent:
        return None
    reply = replies.get(node_id)
    if reply is None:
        rejected[node_id] = f"no reply at stage {stage_name}"
        return None
    if may_refuse:
        if (found := site_decisions(reply)) is not None:
            decisions[node_id] = found
        if (reason := refusal_reason(reply)) is not None:
            refused[node_id] = reason
            return None
    if reply.has_error():
        rejected[node_id] = f"stage {stage_name}: site error: {reply.error.reason}"
        return None
    return reply


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
