"""The run's bookkeeping in the central record: what the round loop reports, sealed.

:class:`RunBook` is the one writer of the record during a run: run start
(configuration, policy hash, code hash), nodes seen and admitted, rounds,
the events an aggregator returns (refusals, rejected updates,
secure-aggregation outcomes, policy decisions), privacy spends, energy,
model versions, and the end of the run. Nothing else in the ServerApp calls
a writing method of the record: aggregators and the central-DP wrapper
return their facts as data (:class:`server.aggregation.base.Aggregate`) and
the round loop hands them here. After every round (and at the end) it seals
the audit head with the server's Ed25519 key; the signed head goes out with
the next round's instructions so the sites keep a witness copy. The same key
signs every instruction (``RunBook.key`` becomes the exchange's
:class:`~common.audit.instruction.InstructionSigner`), and the final head goes
to every site after the run ends (:meth:`server.aggregation.exchange.GridExchange.announce_head`).

The signing key it is given comes from
:func:`server.record.rotation.signing_key_for`, which never creates one and
refuses a key the record does not have in force.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.audit.seal import SignedHead
from common.config import RunConfig
from common.dp import PrivacyEvent, PrivacyLevel
from common.records import check_vector
from server.aggregation.base import Aggregate
from server.record import ModelVersion, SqlRecord
from server.record.values import CLOSED_ROUND_STATUSES
from server.results import RoundResult

CODE_PACKAGES = ("common", "client", "server", "policies")


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """SHA-256 over fedseal's installed Python sources (path and content, sorted)."""
    h = hashlib.sha256()
    for package in CODE_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(root.rglob("*.py")):
            h.update(f"{package}/{path.relative_to(root).as_posix()}\0".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def default_db_url() -> str:
    """Where a ServerApp started without a record URL keeps it (``$FLWR_HOME/fedseal``)."""
    home = Path(os.environ.get("FLWR_HOME") or Path.home() / ".fedseal")
    (home / "fedseal").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'fedseal' / 'record.db'}"


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where a resumed run goes on: what the record says was finished before the crash."""

    first_round: int
    results: list[RoundResult]
    global_vector: np.ndarray | None  # the last version's model; None when no round finished
    client_events: list[PrivacyEvent]  # client-level releases up to that version


class RunBook:
    """Writes one run into the central record and seals it."""

    def __init__(
        self,
        record: SqlRecord,
        signing_key: Ed25519PrivateKey,
        run_id: str,
        settings: Mapping[str, Any] | None = None,
        roster: Mapping[str, Any] | None = None,
    ) -> None:
        self.record = record
        self.key = signing_key
        self.run_id = run_id
        # A deployed run's settings (server.run_settings), recorded with its start or resume.
        self.settings = dict(settings) if settings is not None else None
        # The roster in force (server.run_settings.RosterInForce), recorded likewise.
        self.roster = dict(roster) if roster is not None else None
        self._nodes: set[int] = set()
        self.head: SignedHead | None = record.latest_seal()

    # ------------------------------------------------------------------ run
    def start(self, config: Mapping[str, Any], policy_hash: str | None) -> None:
        self.record.create_run(
            config, run_id=self.run_id, policy_hash=policy_hash, app_hash=code_hash()
        )
        self._record_settings(resumed=False)
        self.seal()

    def resume(self) -> ModelVersion | None:
        version = self.record.resume_run(self.run_id)
        self._record_settings(resumed=True)
        self.seal()
        return version

    def _record_settings(self, *, resumed: bool) -> None:
        if self.settings is not None:
            self.event("run_settings", {**self.settings, "resumed": resumed})
        if self.roster is not None:
            self.event("roster", {**self.roster, "resumed": resumed})

    def resume_point(self, vector_length: int) -> ResumePoint:
        """Reopen the run (audited, sealed) and read back where it stands.

        Only what the last model version covers counts as done, and the
        failed rounds right after it (closed as failed, they left the model
        as that version has it): later rounds (finished in the record but not
        versioned) and their client-level releases are redone from that version.
        """
        version = self.resume()
        versioned = version.round if version is not None else 0
        rounds = self.record.rounds(self.run_id)
        done = versioned
        failed = {info.round for info in rounds if info.status == "failed"}
        while done + 1 in failed:
            done += 1
        events = [
            PrivacyEvent(p.noise_multiplier, p.sample_rate, p.steps, PrivacyLevel.CLIENT)
            for p in self.record.privacy(self.run_id)
            if p.level == "client" and p.round <= versioned
        ]
        results = [
            RoundResult.from_json(info.metrics)
            for info in rounds
            if info.status in CLOSED_ROUND_STATUSES and info.metrics and info.round <= done
        ]
        if version is None:
            return ResumePoint(done + 1, results, None, events)
        data = self.record.load_version_bytes(version.version)
        vector = check_vector(
            np.frombuffer(data, dtype=np.float32).copy(), vector_length, what="resumed model"
        )
        return ResumePoint(done + 1, results, vector, events)

    def finish(self, status: str = "finished", reason: str | None = None) -> None:
        self.record.finish_run(self.run_id, status=status, reason=reason)
        self.seal()

    def seal(self) -> SignedHead:
        self.head = self.record.seal(self.key)
        return self.head

    # ---------------------------------------------------------------- rounds
    def nodes_seen(self, node_ids: Sequence[int]) -> None:
        new = list(dict.fromkeys(n for n in node_ids if n not in self._nodes))
        if new:
            self.record.record_nodes(self.run_id, new, True, "connected")  # one commit
            self._nodes.update(new)

    def node_admission(self, node_id: int, allowed: bool, reason: str) -> None:
        """A node's admission decision under the server policy (recorded once per node)."""
        self.record.record_node(self.run_id, node_id, allowed, reason)
        self._nodes.add(node_id)

    def round_started(self, server_round: int, cohort: Sequence[int]) -> None:
        self.record.start_round(self.run_id, server_round, cohort)

    def event(self, kind: str, payload: Mapping[str, Any]) -> None:
        self.record.append_event(self.run_id, kind, "server", dict(payload))

    def aggregated(self, server_round: int, agg: Aggregate, cfg: RunConfig) -> None:
        """What one round's aggregation produced, in the order it happened.

        The aggregator's events first; for a failed round nothing more (no
        spend, no energy: the round released nothing). Otherwise the round's
        client-level release (DP-FedAvg) and each accepted site's energy and
        record-level privacy figures.
        """
        for event in agg.events:
            self.event(event.kind, event.payload)
        if agg.failure is not None:
            return
        if agg.central is not None:
            self.record.record_privacy(
                self.run_id,
                server_round,
                level="client",
                epsilon=agg.central.epsilon,
                delta=cfg.delta,
                noise_multiplier=cfg.noise_multiplier,
                sample_rate=cfg.client_sample_rate,
                steps=1,
                accountant=agg.central.accountant or cfg.accountant,
            )
            self.event(
                "central_dp_applied"
                if agg.central.mechanism == "central-gaussian"
                else "client_level_dp_applied",
                {
                    "round": server_round,
                    "denominator": agg.central.denominator,
                    "sensitivity": agg.central.sensitivity,
                    "noise_std": agg.central.noise_std,
                    "mechanism": agg.central.mechanism,
                    "sampling": cfg.client_sampling,
                },
            )
        for site in agg.outcomes:
            if not site.accepted:
                continue
            if site.energy_kwh is not None:
                self.record.record_energy(
                    self.run_id,
                    server_round,
                    site.node_id,
                    site.energy_kwh,
                    site.co2eq_g or 0.0,
                    bool(site.energy_estimated),
                )
            if site.record_level_epsilon is not None:
                self.record.record_privacy(
                    self.run_id,
                    server_round,
                    level="record",
                    epsilon=site.record_level_epsilon,
                    # the site's own delta (its policy's), as it reported it with its epsilon
                    delta=site.record_level_delta or cfg.site_delta,
                    noise_multiplier=site.noise_multiplier or 0.0,
                    sample_rate=site.sample_rate or 1.0,
                    steps=site.steps or 1,
                    accountant=cfg.accountant,
                    node_id=site.node_id,
                )

    def round_done(
        self, result: RoundResult, model_bytes: bytes, released: RoundResult | None = None
    ) -> None:
        """A finished round: its result, the new model version, and a fresh seal.

        ``released`` is the round as it may leave the coordinator
        (:meth:`RoundResult.released`, default ``result``): it is what the
        round's metrics keep (reports and resumes read them) and its accepted
        sites are the version's participants, so under client-level DP the
        record's round rows and model cards carry no count.
        """
        public = released if released is not None else result
        self.round_finished(result.round, public.to_json())
        self.model_version(
            result.round,
            model_bytes,
            {"accuracy": result.accuracy, "loss": result.loss},
            [s.node_id for s in public.sites if s.accepted],
            record_level_epsilon=max(
                (
                    x.record_level_epsilon
                    for x in result.sites
                    if x.record_level_epsilon is not None
                ),
                default=None,
            ),
            client_level_epsilon=result.client_level_epsilon,
            energy_kwh=self.record.energy_total_kwh(self.run_id),
        )
        self.seal()

    def round_failed(self, result: RoundResult, released: RoundResult | None = None) -> None:
        """A failed round: closed as failed with its reason (``round_failed``), no version; sealed.

        The model stays as it was and nothing was released, so no spend,
        energy or model version is recorded for it (:meth:`aggregated` booked
        the aggregator's events, which say what went wrong). The audit event
        keeps the full reason; the round's metrics are ``released`` (as in
        :meth:`round_done`).
        """
        public = released if released is not None else result
        self.record.fail_round(
            self.run_id, result.round, result.failure or "failed", public.to_json()
        )
        self.seal()

    def round_finished(self, server_round: int, metrics: Mapping[str, Any]) -> None:
        self.record.finish_round(self.run_id, server_round, metrics)

    def model_version(
        self,
        server_round: int,
        vector_bytes: bytes,
        metrics: Mapping[str, Any],
        participants: Sequence[int],
        record_level_epsilon: float | None,
        client_level_epsilon: float | None,
        energy_kwh: float | None,
    ) -> ModelVersion:
        parent = self.record.latest_version(self.run_id)
        return self.record.add_model_version(
            self.run_id,
            server_round,
            parent.version if parent else None,
            vector_bytes,
            metrics,
            record_level_epsilon,
            client_level_epsilon,
            energy_kwh,
            participants,
        )
