"""Secure aggregation (SecAgg+) on Flower's Message API: the server learns only the sum.

Drives :class:`common.secagg.SecAggServer` through its five stages (protocol
v3, authenticated: :mod:`common.secagg.signing`), one Grid exchange each, one
method per stage (as Flower's ``SecAggPlusWorkflow`` does):
:meth:`SecAggAggregator._advertise_keys` and
:meth:`SecAggAggregator._share_keys` form the *setup*, for one round or, when
every round has the same cohort, for several rounds at once (one bundle of
per-round messages per site); :meth:`SecAggAggregator._collect_masked`,
:meth:`SecAggAggregator._consistency` and :meth:`SecAggAggregator._unmask`
finish a prepared round. The coordinator holds the federation's roster
(public) and filters advertisements and consistency signatures that do not
verify, so one faulty site cannot make every honest site refuse the round;
the sites check everything again themselves.

Every reply is checked on its own before the protocol sees it
(:class:`server.aggregation.replies.SiteFacts`): a Flower error, an
undecodable or oversized payload, or a reply for another node, round or run
removes only that site (as a dropout, with the reason recorded); the
protocol then decides whether enough sites remain. Below the threshold the
round fails with ProtocolAbort and the global model stays as it was. A site
whose unmask reply carries a wrong share is outvoted by the other share
holders and named in the outcome (its own masked input, already in the sum,
stays there).

Why several rounds can share one setup without weakening anything: every
round still has its own configuration (round number; its graph seed derived
from that round's own advertisements) and every client makes fresh key pairs and a fresh self-mask seed per
round (:class:`common.secagg.SecAggClient`, one per round), so the rounds'
secrets are independent, exactly as with one setup per round. Only the
*messages* are batched: one keys exchange carries every round's
AdvertiseKeys, one shares exchange every round's encrypted Shamir shares. A
client's unrevealed secrets of later rounds wait in its sealed state (never
in plaintext outside memory, never at the server); a site's answer for round
r never involves another round's secrets, so the "never both shares for one
neighbour" rule holds per round as before. What changes is *when* a site
commits to a round: a site that is gone later simply drops out at that
round's masked stage, which SecAgg+ tolerates (its pairwise masks are
removed from its reconstructed key).

The secure-aggregation parameters (threshold, neighbours, bits) are resolved
here, once per setup, from the actual cohort (:func:`common.secagg.make_config`),
and that resolved configuration is what the coordinator's policy judges
(``judge``) before any site sees it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType, RecordDict

from common.config import RunConfig
from common.errors import FedsealError, PolicyViolation, ProtocolAbort, ProtocolError
from common.records import (
    KEY_ARRAYS,
    KEY_SECAGG_CONFIG,
    KEY_SECAGG_MSG,
    bundle_to_record,
    bytes_to_record,
    max_secagg_reply_bytes,
    record_to_bundle,
    record_to_bytes,
    vector_to_record,
)
from common.roster import Roster
from common.secagg import AggregateResult, SecAggConfig, SecAggServer, make_config
from common.secagg.messages import (
    AdvertiseKeysReply,
    CollectMaskedReply,
    ConsistencyReply,
    ShareKeysReply,
    UnmaskReply,
)
from common.secagg.stages import Stage
from server.aggregation.admission import SiteAdmission
from server.aggregation.base import Aggregate, RoundEvent, RoundInput
from server.aggregation.exchange import Exchange
from server.aggregation.replies import SiteFacts, masked_metrics, site_outcome
from server.results import SiteOutcome

# judge(first round of a setup, its resolved configuration) -> (audit events, denials)
Judge = Callable[[int, SecAggConfig], tuple[list[RoundEvent], list[Any]]]


@dataclass(slots=True)
class PreparedRound:
    """One round whose keys and shares are in place: what its masked stage needs.

    ``facts`` carries what the setup learned about sites (they are out of
    this round from the start); policy decisions only in the setup's first round.
    """

    server: SecAggServer
    masked_requests: dict[int, Any]
    cohort: tuple[int, ...]
    facts: SiteFacts = field(default_factory=SiteFacts)


@dataclass(slots=True)
class _Unmasked:
    """A completed round: the protocol's result and what the stages learned about sites."""

    result: AggregateResult
    facts: SiteFacts
    site_metrics: dict[int, dict[str, Any]]


class SecAggAggregator:
    """SecAgg+ over one run's rounds; keeps the rounds a setup prepared between calls.

    ``run_number`` is the run id as the protocol's 64-bit run number,
    ``vector_length`` the model size; ``judge`` (optional) is the
    coordinator's policy on the resolved configuration.
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_number: int,
        vector_length: int,
        judge: Judge | None = None,
        *,
        roster: Roster | None = None,
        admission: SiteAdmission | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_number = run_number
        self.vector_length = vector_length
        self.judge = judge
        self.roster = roster  # the federation roster the sites' identities are checked against
        self._prepared: dict[int, PreparedRound] = {}
        # Who proved which roster identity, this run (shared with the round loop's admission).
        self.admission = admission or SiteAdmission(run_number, True, roster)

    @property
    def clipped_to(self) -> float:
        """Sites clip their update to L2 ``clip_norm`` before masking; unit weights."""
        return self.cfg.clip_norm

    # -------------------------------------------------------------------- round
    def aggregate(self, round_input: RoundInput, exchange: Exchange) -> Aggregate:
        server_round, cohort = round_input.server_round, round_input.cohort
        agg = Aggregate(np.zeros(self.vector_length), 1.0, [], [])
        if len(cohort) < 2:
            agg.failure = ProtocolAbort(
                f"round {server_round}: secure aggregation needs at least 2 sampled sites"
            )
            return agg
        prepared = self._prepared.pop(server_round, None)
        if prepared is None or list(prepared.cohort) != cohort:
            self._prepared.clear()
            rounds = self._setup_rounds(server_round)
            facts = SiteFacts()
            try:
                self._prepared = self._setup(rounds, cohort, exchange, facts, agg)
            except FedsealError as exc:
                self._abort(agg, server_round, exc, facts)
                return agg
            agg.event(
                "secagg_setup",
                {
                    "round": server_round,
                    "rounds": sorted(self._prepared),
                    "cohort": [str(n) for n in cohort],
                    "rejected": _str_keys(facts.rejected),
                    "refused": _str_keys(facts.refused),
                },
            )
            prepared = self._prepared.pop(server_round)
        facts = prepared.facts
        try:
            done = self._finish(server_round, prepared, exchange, round_input.global_vector)
        except FedsealError as exc:  # abort, or a failed integrity check while unmasking
            self._prepared.clear()  # later rounds get a fresh setup
            self._abort(agg, server_round, exc, facts)
            return agg
        self._book_outcome(agg, server_round, cohort, done)
        config = prepared.server.config
        agg.unmasked = (done.result.sum_int, config.encode(), config.threshold)
        return agg

    def _setup_rounds(self, server_round: int) -> list[int]:
        """The rounds one setup prepares, starting at ``server_round``.

        Several only when every round's cohort is known now and the same: all
        admitted sites every round (fixed sampling, ``fraction_train`` 1). A
        site that joins later waits for the next setup; Poisson or partial
        sampling draws a new cohort each round, so it gets a setup each round.
        """
        full = self.cfg.sampling == "fixed" and self.cfg.fraction_train >= 1.0
        count = self.cfg.secagg_setup_rounds if full else 1
        return list(range(server_round, min(server_round + count, self.cfg.rounds + 1)))

    @staticmethod
    def _abort(agg: Aggregate, server_round: int, exc: FedsealError, facts: SiteFacts) -> None:
        agg.event(
            "secagg_outcome",
            {
                "round": server_round,
                "status": "aborted",
                "reason": str(exc),
                "rejected": _str_keys(facts.rejected),
                "refused": _str_keys(facts.refused),  # e.g. a round already released
            },
        )
        # A refusal that helped sink the round is still the site's decision: named on its own,
        # as in a completed round, with the site's outcome.
        _site_decisions(agg, server_round, facts)
        for node_id, reason in facts.refused.items():
            agg.outcomes.append(SiteOutcome(node_id, False, reason, refused=True))
        for node_id, reason in facts.rejected.items():
            if node_id not in facts.refused:
                agg.outcomes.append(SiteOutcome(node_id, False, reason))
        agg.failure = exc

    def _book_outcome(
        self, agg: Aggregate, server_round: int, cohort: list[int], done: _Unmasked
    ) -> None:
        """The completed round's events, per-site outcomes and the sum, into ``agg``."""
        result, facts = done.result, done.facts
        agg.event(
            "secagg_outcome",
            {
                "round": server_round,
                "status": "completed",
                "contributors": [str(n) for n in result.contributors],
                "dropped": [str(n) for n in result.dropped],
                "threshold": result.threshold,
                "neighbours": result.neighbours,
                "rejected": _str_keys(facts.rejected),
            },
        )
        _site_decisions(agg, server_round, facts)
        contributors = set(result.contributors)
        for node_id in cohort:
            if node_id in contributors:
                site = site_outcome(node_id, done.site_metrics.get(node_id, {}))
                if (
                    node_id in facts.rejected
                ):  # a wrong unmask share; its own input stays in the sum
                    site = replace(site, reason=facts.rejected[node_id])
                    agg.event(
                        "secagg_share_rejected",
                        {
                            "round": server_round,
                            "node_id": str(node_id),
                            "reason": facts.rejected[node_id],
                        },
                    )
                agg.outcomes.append(site)
            elif node_id in facts.refused:
                agg.outcomes.append(
                    SiteOutcome(node_id, False, facts.refused[node_id], refused=True)
                )
            else:
                agg.outcomes.append(
                    SiteOutcome(node_id, False, facts.rejected.get(node_id) or "dropped out")
                )
        agg.total = result.sum
        agg.weight = float(max(len(contributors), 1))
        agg.contributors = list(result.contributors)
        agg.secagg = {
            "participants": result.participants,
            "dropouts": len(result.dropped),
            "threshold": result.threshold,
            "neighbours": result.neighbours,
        }

    # -------------------------------------------------------------------- setup
    def _configs(self, rounds: list[int], cohort: list[int]) -> dict[int, SecAggConfig]:
        """Each prepared round's configuration, resolved from the actual cohort."""
        return {
            r: make_config(
                run_id=self.run_number,
                round=r,
                cohort=cohort,
                identities=[self.admission.identities[n] for n in cohort],
                threshold=self.cfg.secagg_threshold_value,
                value_bound=self.cfg.clip_norm,
                vector_length=self.vector_length,
                bits=self.cfg.secagg_bits,
            )
            for r in rounds
        }

    def _bind_identities(
        self, first: int, cohort: list[int], exchange: Exchange, facts: SiteFacts, agg: Aggregate
    ) -> list[int]:
        """The cohort members admitted with a proved roster identity (:mod:`server.aggregation.admission`).

        The round loop admits sites before it draws the cohort, so this asks
        no one there; called on its own (tests, one-off rounds) it asks the
        sites not asked yet in this run. An excluded site is named in the
        setup's facts.
        """
        admitted, events = self.admission.admit(cohort, first, exchange)
        agg.events.extend(events)
        for node_id in cohort:
            reason = self.admission.excluded.get(node_id)
            if reason is not None and node_id not in facts.refused:
                facts.rejected.setdefault(node_id, reason)
        return admitted

    def _setup(
        self,
        rounds: list[int],
        cohort: list[int],
        exchange: Exchange,
        facts: SiteFacts,
        agg: Aggregate,
    ) -> dict[int, PreparedRound]:
        """Identities (once per site and run), keys, then shares, for every round; raises if
        the first round cannot start.

        A later round whose protocol cannot go on (e.g. a neighbour graph that
        leaves some site below the threshold) ends the setup before it: those
        rounds get a setup of their own when their turn comes.
        """
        first = rounds[0]
        sampled = cohort
        cohort = self._bind_identities(first, cohort, exchange, facts, agg)
        if len(cohort) < 2:
            raise ProtocolAbort(
                f"round {first}: {len(cohort)} sites proved a roster identity, fewer than 2"
            )
        configs = self._configs(rounds, cohort)
        if self.judge is not None:
            events, denied = self.judge(first, configs[first])
            agg.events.extend(events)
            if denied:
                raise PolicyViolation(denied)
        members = self.roster.identity_keys() if self.roster is not None else None
        servers = {r: SecAggServer(c, members) for r, c in configs.items()}
        share_requests = self._advertise_keys(rounds, cohort, servers, configs, exchange, facts)
        prepared_rounds = [r for r in rounds if r in share_requests]
        masked = self._share_keys(
            prepared_rounds, cohort, servers, configs, share_requests, exchange, facts
        )
        return {
            r: PreparedRound(
                servers[r], dict(masked[r]), tuple(sampled), facts.copy(with_decisions=r == first)
            )
            for r in prepared_rounds
            if r in masked
        }

    def _advertise_keys(
        self,
        rounds: list[int],
        cohort: list[int],
        servers: Mapping[int, SecAggServer],
        configs: Mapping[int, SecAggConfig],
        exchange: Exchange,
        facts: SiteFacts,
    ) -> dict[int, Mapping[int, Any]]:
        """Stage 1: every site advertises its per-round public keys (and may refuse here).

        Returns the share-keys requests of the rounds that can go on, a prefix of ``rounds``.
        """
        first = rounds[0]
        starts: dict[int, Mapping[int, Any]] = {r: servers[r].start() for r in rounds}
        config_bundle = bundle_to_record([configs[r].encode() for r in rounds])
        keys = self._setup_exchange(
            Stage.ADVERTISE_KEYS,
            {n: [starts[r][n].encode() for r in rounds] for n in starts[first]},
            rounds,
            cohort,
            configs,
            AdvertiseKeysReply,
            config_bundle,
            exchange,
            facts,
        )
        share_requests: dict[int, Mapping[int, Any]] = {}
        for index, r in enumerate(rounds):
            try:
                share_requests[r] = servers[r].receive_advertise_keys(
                    [replies[index] for replies in keys.values()]
                )
            except ProtocolAbort:
                if r == first:
                    raise
                break
            finally:  # sites whose advertisements did not verify are out, with the reason
                for node_id, reason in servers[r].rejected.items():
                    facts.rejected.setdefault(node_id, f"stage keys: {reason}")
        return share_requests

    def _share_keys(
        self,
        rounds: list[int],
        cohort: list[int],
        servers: Mapping[int, SecAggServer],
        configs: Mapping[int, SecAggConfig],
        share_requests: Mapping[int, Mapping[int, Any]],
        exchange: Exchange,
        facts: SiteFacts,
    ) -> dict[int, Mapping[int, Any]]:
        """Stage 2: sites exchange encrypted Shamir shares; returns the masked-stage requests.

        A site goes on only if every prepared round asks it for shares (one cohort).
        """
        first = rounds[0]
        asked = set.intersection(*(set(share_requests[r]) for r in rounds))
        shares = self._setup_exchange(
            Stage.SHARE_KEYS,
            {n: [share_requests[r][n].encode() for r in rounds] for n in sorted(asked)},
            rounds,
            cohort,
            configs,
            ShareKeysReply,
            None,
            exchange,
            facts,
        )
        masked: dict[int, Mapping[int, Any]] = {}
        for i, r in enumerate(rounds):
            try:
                masked[r] = servers[r].receive_share_keys(
                    [replies[i] for replies in shares.values()]
                )
            except ProtocolAbort:
                if r == first:
                    raise
                break
        return masked

    def _setup_exchange(
        self,
        stage: Stage,
        payloads: Mapping[int, list[bytes]],
        rounds: list[int],
        cohort: list[int],
        configs: Mapping[int, SecAggConfig],
        reply_type: Any,
        config_bundle: ArrayRecord | None,
        exchange: Exchange,
        facts: SiteFacts,
    ) -> dict[int, list[Any]]:
        """One setup exchange; returns, per usable site, its decoded replies in round order."""
        first = rounds[0]
        outgoing: dict[int, tuple[RecordDict, str]] = {}
        for node_id, items in payloads.items():
            content = exchange.instruction(first)
            content[KEY_SECAGG_MSG] = bundle_to_record(items)
            if config_bundle is not None:
                content[KEY_SECAGG_CONFIG] = config_bundle
            outgoing[node_id] = (content, _message_type(stage))
        replies = exchange.send(outgoing, first) if outgoing else {}
        decoded: dict[int, list[Any]] = {}
        reply_cap = max_secagg_reply_bytes(len(cohort), 0)
        for node_id, items in payloads.items():
            # sites decline before sharing keys, at the keys stage
            reply = facts.usable(
                replies, node_id, stage.label, may_refuse=stage is Stage.ADVERTISE_KEYS
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
                facts.rejected[node_id] = f"stage {stage.label}: {exc}"
                continue
            decoded[node_id] = msgs
        return decoded

    # -------------------------------------------------------- masked and unmask
    def _finish(
        self,
        server_round: int,
        prepared: PreparedRound,
        exchange: Exchange,
        global_vector: np.ndarray,
    ) -> _Unmasked:
        """Stages 3 to 5 of a prepared round."""
        site_metrics: dict[int, dict[str, Any]] = {}
        consistency_requests = self._collect_masked(
            server_round, prepared, exchange, global_vector, site_metrics
        )
        unmask_requests = self._consistency(server_round, prepared, exchange, consistency_requests)
        result = self._unmask(server_round, prepared, exchange, unmask_requests)
        # share holders the protocol caught with wrong unmask shares (contributors stay in the sum)
        facts = prepared.facts
        facts.rejected = {**result.rejected, **facts.rejected}
        contributors = set(result.contributors)
        metrics = {n: m for n, m in site_metrics.items() if n in contributors}
        return _Unmasked(result, facts, metrics)

    def _collect_masked(
        self,
        server_round: int,
        prepared: PreparedRound,
        exchange: Exchange,
        global_vector: np.ndarray,
        site_metrics: dict[int, dict[str, Any]],
    ) -> Mapping[int, Any]:
        """Stage 3: sites train, clip, quantise and mask; returns the consistency requests.

        In a round after its setup's first, a site re-decides here (budget,
        policy); a refusal takes it out of this round, like a dropout.
        """
        # Built once per exchange and shared by every message (read-only once sent).
        model = vector_to_record(global_vector)
        replies = self._round_exchange(
            Stage.COLLECT_MASKED, server_round, prepared.masked_requests, exchange, model
        )
        msgs = self._decode(
            Stage.COLLECT_MASKED, replies, prepared, CollectMaskedReply, site_metrics
        )
        return prepared.server.receive_masked(msgs)

    def _consistency(
        self,
        server_round: int,
        prepared: PreparedRound,
        exchange: Exchange,
        requests: Mapping[int, Any],
    ) -> Mapping[int, Any]:
        """Stage 4: survivors sign the survivor set; returns the unmask requests (with a quorum)."""
        replies = self._round_exchange(Stage.CONSISTENCY, server_round, requests, exchange, None)
        return prepared.server.receive_consistency(
            self._decode(Stage.CONSISTENCY, replies, prepared, ConsistencyReply, None)
        )

    def _unmask(
        self,
        server_round: int,
        prepared: PreparedRound,
        exchange: Exchange,
        requests: Mapping[int, Any],
    ) -> AggregateResult:
        """Stage 5: signers reveal the shares that remove every mask; the sum comes out."""
        replies = self._round_exchange(Stage.UNMASK, server_round, requests, exchange, None)
        return prepared.server.receive_unmask(
            self._decode(Stage.UNMASK, replies, prepared, UnmaskReply, None)
        )

    @staticmethod
    def _round_exchange(
        stage: Stage,
        server_round: int,
        requests: Mapping[int, Any],
        exchange: Exchange,
        model: ArrayRecord | None,
    ) -> tuple[Sequence[int], dict[int, Message]]:
        outgoing: dict[int, tuple[RecordDict, str]] = {}
        for node_id, request in requests.items():
            content = exchange.instruction(server_round)
            content[KEY_SECAGG_MSG] = bytes_to_record(request.encode())
            if model is not None:
                content[KEY_ARRAYS] = model
            outgoing[node_id] = (content, _message_type(stage))
        return list(outgoing), (exchange.send(outgoing, server_round) if outgoing else {})

    @staticmethod
    def _decode(
        stage: Stage,
        sent: tuple[Sequence[int], dict[int, Message]],
        prepared: PreparedRound,
        reply_type: Any,
        site_metrics: dict[int, dict[str, Any]] | None,
    ) -> list[Any]:
        """The usable replies of one round exchange, decoded; the others recorded in the facts."""
        config = prepared.server.config
        reply_cap = max_secagg_reply_bytes(config.size, config.masked_size)
        masked = stage is Stage.COLLECT_MASKED
        addressed, replies = sent
        decoded = []
        for node_id in addressed:
            reply = prepared.facts.usable(replies, node_id, stage.label, may_refuse=masked)
            if reply is None:
                continue
            try:
                data = record_to_bytes(
                    reply.content.array_records.get(KEY_SECAGG_MSG),
                    reply_cap,
                    copy=not masked,  # masked vectors: zero-copy
                )
                msg = reply_type.decode(data, config)
                if msg.node_id != node_id:
                    raise ProtocolError(f"reply claims node {msg.node_id}")
                if site_metrics is not None:
                    site_metrics[node_id] = masked_metrics(reply)
            except FedsealError as exc:
                prepared.facts.rejected[node_id] = f"stage {stage.label}: {exc}"
                continue
            decoded.append(msg)
        return decoded


def _message_type(stage: Stage) -> str:
    return f"{MessageType.TRAIN}.{stage.action}"


def _site_decisions(agg: Aggregate, server_round: int, facts: SiteFacts) -> None:
    """Each site's policy decisions and refusals of the round, one event each."""
    for node_id, found in facts.decisions.items():
        agg.event(
            "site_policy_decisions", {"round": server_round, "node_id": str(node_id), **found}
        )
    for node_id, reason in facts.refused.items():
        agg.event(
            "site_refused", {"round": server_round, "node_id": str(node_id), "reason": reason}
        )


def _str_keys(mapping: Mapping[int, str]) -> dict[str, str]:
    return {str(k): v for k, v in mapping.items()}
