"""The server's round driver: sample sites, send instructions, validate replies, aggregate.

Flower's ``Strategy.start`` drives one train exchange per round; fedseal's
rounds also need refusals recorded, and (with secure aggregation) several
exchanges per round, so this driver talks to Flower's ``Grid`` directly
(``send_and_receive``), which is Flower's own transport and scheduling.
Aggregation is FedAvg. Plain rounds weight each update by its site's
example count. When updates are clipped for privacy (secure aggregation or
central DP), every contributor weighs the same: the server never learns a
site's example count under secure aggregation, and DP-FedAvg's sensitivity
(C on the sum) assumes unit weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common.config import RunConfig
from common.data import load_builtin, scaler_for, split_holdout_stratified
from common.dp import ClientLevelAccountant, PrivacyEvent, PrivacyLevel, clip_l2, noise_aggregate
from common.errors import DataError, FedsealError, ProtocolAbort
from common.evaluation import evaluate as evaluate_model
from common.records import (
    KEY_APP_HASH,
    KEY_ARRAYS,
    KEY_AUDIT_HEAD,
    KEY_COHORT_SIZE,
    KEY_CONFIG,
    KEY_METRICS,
    KEY_RUN_ID,
    ModelSpec,
    check_vector,
    config_to_record,
    record_to_vector,
    state_dict_to_vector,
    vector_to_record,
    vector_to_state_dict,
)
from common.rng import secure_generator, seeded_generator
from common.task import TaskSpec, task_for
from server.book import RunBook, code_hash
from server.policy_gate import PolicyGate
from server.results import NullObserver, RoundObserver, RoundResult, SiteOutcome
from server.secure import PreparedRound, refusal_reason, site_decisions

log = logging.getLogger("flwr.fedseal.server")

NODE_WAIT_POLL_S = 1.0
FAST_PULL_INTERVAL_S = 0.01


@dataclass(frozen=True, slots=True)
class SiteUpdate:
    node_id: int
    update: np.ndarray
    num_examples: int
    train_seconds: float
    metrics: dict[str, Any]


@dataclass(slots=True)
class Aggregate:
    """A round's aggregation before the server's own steps (central noise, averaging).

    ``total`` is the (weighted) sum of the contributors' updates and ``weight``
    what it must be divided by: the example count for plain FedAvg, the number
    of contributors when updates are clipped and summed unweighted.
    """

    total: np.ndarray
    weight: float
    contributors: list[int]
    outcomes: list[SiteOutcome]
    secagg: dict[str, int] | None = None


class HeldOut:
    """The server's own evaluation split of an embedded dataset (scaled on itself)."""

    def __init__(self, cfg: RunConfig, task: TaskSpec) -> None:
        _, holdout = split_holdout_stratified(
            load_builtin(cfg.dataset), cfg.test_fraction, cfg.seed
        )
        scaler = scaler_for(holdout, private=cfg.dp)
        self.x = task.shape_examples(scaler.transform(holdout.x))
        self.y = holdout.y


def sample_cohort(node_ids: list[int], cfg: RunConfig, server_round: int) -> list[int]:
    """Choose this round's sites.

    ``fixed``: ``max(min_sites, ceil(fraction_train * n))`` sites uniformly without
    replacement (reproducible from the run seed). ``poisson``: each site
    independently with probability ``fraction_train``, from OS entropy, as
    privacy amplification by sampling assumes.
    """
    nodes = sorted(node_ids)
    if cfg.sampling == "poisson":
        rng = secure_generator()
        return [n for n in nodes if rng.random() < cfg.fraction_train]
    k = min(len(nodes), max(cfg.min_sites, math.ceil(cfg.fraction_train * len(nodes))))
    rng = seeded_generator(cfg.seed * 1_000_003 + server_round)
    picked = rng.choice(len(nodes), size=k, replace=False)  # indices: node ids exceed int64
    return sorted(nodes[int(i)] for i in picked)


def wait_for_nodes(grid: Grid, minimum: int, timeout_s: float) -> list[int]:
    """Block until ``minimum`` nodes are connected; ProtocolAbort after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() > deadline:
            raise ProtocolAbort(
                f"only {len(nodes)} site(s) connected after {timeout_s:.0f} s; need {minimum}"
            )
        time.sleep(NODE_WAIT_POLL_S)


def parse_train_reply(reply: Message, size: int) -> SiteUpdate:
    """Validate one site's train reply; DataError says why it is unusable."""
    node_id = reply.metadata.src_node_id
    if reply.has_error():
        raise DataError(f"site error: {reply.error.reason}")
    content = reply.content
    if KEY_ARRAYS not in content.array_records or KEY_METRICS not in content.metric_records:
        raise DataError("reply lacks the update or its metrics")
    metrics = content.metric_records[KEY_METRICS]
    n = metrics.get("num-examples")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(f"num-examples must be a positive integer, got {n!r}")
    seconds = metrics.get("train-seconds", 0.0)
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
    ):
        raise DataError("train-seconds must be a finite number")
    update = record_to_vector(content.array_records[KEY_ARRAYS], size, what="update")
    return SiteUpdate(node_id, update, n, float(seconds), dict(metrics.items()))


def site_outcome(node_id: int, metrics: Mapping[str, Any]) -> SiteOutcome:
    """An accepted site's line in the round result, with its record-level privacy figures."""

    def num(key: str) -> float | None:
        value = metrics.get(key)
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else None

    steps = metrics.get("dp-steps")
    return SiteOutcome(
        node_id,
        True,
        "",
        int(metrics.get("num-examples", 0)),
        num("train-seconds") or 0.0,
        record_level_epsilon=num("record-level-epsilon"),
        noise_multiplier=num("noise-multiplier"),
        sample_rate=num("sample-rate"),
        steps=steps if isinstance(steps, int) and not isinstance(steps, bool) else None,
        energy_kwh=num("energy-kwh"),
        co2eq_g=num("co2eq-g"),
        energy_estimated=None
        if "energy-estimated" not in metrics
        else bool(metrics["energy-estimated"]),
    )


def round_energy(
    sites: tuple[SiteOutcome, ...] | list[SiteOutcome],
) -> dict[str, float | bool] | None:
    """Energy of a round: the sum over the sites that reported it; estimated if any part is."""
    reported = [s for s in sites if s.energy_kwh is not None]
    if not reported:
        return None
    return {
        "kwh": sum(s.energy_kwh or 0.0 for s in reported),
        "co2eq_g": sum(s.co2eq_g or 0.0 for s in reported),
        "estimated": any(bool(s.energy_estimated) for s in reported),
    }


class FederatedRun:
    """One run of R rounds over the sites connected to ``grid``."""

    def __init__(
        self,
        cfg: RunConfig,
        grid: Grid,
        observer: RoundObserver | None = None,
        out_dir: Path | None = None,
        book: RunBook | None = None,
        resume: bool = False,
        gate: PolicyGate | None = None,
    ) -> None:
        self.cfg = cfg
        self.out_dir = out_dir
        self.grid = grid
        if hasattr(grid, "pull_interval"):
            # Flower's in-memory grid (Simulation Engine) sleeps this long between pulls;
            # a secure round makes two to four exchanges, so 0.1 s each is a visible cost.
            grid.pull_interval = FAST_PULL_INTERVAL_S
        self.observer = observer or NullObserver()
        self.book = book
        self.resume = resume
        self.run_id = book.run_id if book is not None else uuid.uuid4().hex[:12]
        self.task = task_for(cfg)
        model = self.task.build(seed=cfg.seed)
        self.spec = ModelSpec.of(model.state_dict())
        self.global_vector = state_dict_to_vector(model.state_dict())
        self.model = model
        self.heldout = (
            HeldOut(cfg, self.task) if cfg.dataset != "custom" and cfg.workload == "train" else None
        )
        self.results: list[RoundResult] = []
        self.first_round = 1
        self.gate = gate
        self.app_hash = code_hash()
        self.stopped: str | None = None  # why a policy ended the run early
        # secure-aggregation rounds whose keys and shares are already exchanged
        self._prepared: dict[int, PreparedRound] = {}
        self.client_accountant = (
            ClientLevelAccountant(cfg.client_sampling, cfg.client_sample_rate, cfg.accountant)
            if cfg.central_dp
            else None
        )

    # ------------------------------------------------------------------ rounds
    def execute(self) -> list[RoundResult]:
        if self.book is not None:
            self._open_book()
        self.observer.on_start(self.run_id, self.cfg.rounds)
        for done in self.results:
            self.observer.on_round(done)
        log.info(
            "fedseal run %s: %d rounds, dataset %s", self.run_id, self.cfg.rounds, self.cfg.dataset
        )
        try:
            if self.gate is not None:
                self.gate.check_run(self.cfg)
            for server_round in range(self.first_round, self.cfg.rounds + 1):
                if (denial := self._policy_stop(server_round)) is not None:
                    self.stopped = f"{denial.rule}: {denial.reason}"
                    log.info(
                        "run %s stopped before round %d: %s",
                        self.run_id,
                        server_round,
                        self.stopped,
                    )
                    break
                result = self.run_round(server_round)
                self.results.append(result)
                self._book_round(result)
                self.observer.on_round(result)
                log.info(
                    "round %d: accuracy=%s loss=%s participants=%d/%d",
                    server_round,
                    _fmt(result.accuracy),
                    _fmt(result.loss),
                    result.participants,
                    result.sampled,
                )
        except FedsealError as exc:
            if self.book is not None:
                self.book.finish("aborted", str(exc))
            raise
        if self.book is not None:
            self.book.finish(
                "finished", None if self.stopped is None else f"stopped by policy: {self.stopped}"
            )
        self.observer.on_finish(self.results)
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "result.json").write_text(
                json.dumps(self.result_doc(), indent=2) + "\n"
            )
        return self.results

    def _policy_stop(self, server_round: int) -> Any:
        """The server policy's denial of the next round (client-level epsilon cap, energy), if any."""
        if self.gate is None:
            return None
        eps_after = None
        if self.client_accountant is not None:
            event = self.client_accountant.event_for_round(self.cfg.noise_multiplier)
            eps_after = self.client_accountant.epsilon_if(event, self.cfg.delta)
        kwh = [r.energy["kwh"] for r in self.results if r.energy]
        kwh_next = float(kwh[-1]) if kwh else 0.0  # the last round's energy predicts the next
        return self.gate.before_round(server_round, eps_after, float(sum(kwh)), kwh_next)

    def _open_book(self) -> None:
        book = self.book
        if book is None:
            return
        if not self.resume:
            book.start(
                asdict(self.cfg), policy_hash=self.gate.hash if self.gate is not None else None
            )
            return
        version = book.resume()
        if self.client_accountant is not None:
            done = version.round if version is not None else 0
            events = [
                PrivacyEvent(p.noise_multiplier, p.sample_rate, p.steps, PrivacyLevel.CLIENT)
                for p in book.record.privacy(self.run_id)
                if p.level == "client" and p.round <= done
            ]
            self.client_accountant = ClientLevelAccountant(
                self.cfg.client_sampling, self.cfg.client_sample_rate, self.cfg.accountant, events
            )
        for info in book.record.rounds(self.run_id):
            if info.status == "finished" and info.metrics:
                self.results.append(RoundResult.from_json(info.metrics))
        if version is not None:
            data = book.record.load_version_bytes(version.version)
            self.global_vector = check_vector(
                np.frombuffer(data, dtype=np.float32).copy(), self.spec.size, what="resumed model"
            )
            self.first_round = version.round + 1
            self.results = [r for r in self.results if r.round <= version.round]
        log.info("resuming run %s at round %d", self.run_id, self.first_round)

    def _book_round(self, result: RoundResult) -> None:
        book = self.book
        if book is None:
            return
        doc = result.to_json()
        book.round_finished(result.round, doc)
        book.model_version(
            result.round,
            self.global_vector.astype(np.float32).tobytes(),
            {"accuracy": result.accuracy, "loss": result.loss},
            [s.node_id for s in result.sites if s.accepted],
            record_level_epsilon=max(
                (
                    x.record_level_epsilon
                    for x in result.sites
                    if x.record_level_epsilon is not None
                ),
                default=None,
            ),
            client_level_epsilon=result.client_level_epsilon,
            energy_kwh=book.record.energy_total_kwh(self.run_id),
        )
        book.seal()

    def _extra(self) -> dict[str, bytes | str]:
        """Values every instruction carries besides the run config: run id, signed audit head."""
        extra: dict[str, bytes | str] = {KEY_RUN_ID: self.run_id, KEY_APP_HASH: self.app_hash}
        if self.book is not None and self.book.head is not None:
            extra[KEY_AUDIT_HEAD] = self.book.head.encode()
        return extra

    def result_doc(self) -> dict[str, Any]:
        """The run's results as the JSON document fedseal prints and writes."""
        return {
            "run_id": self.run_id,
            "config": asdict(self.cfg),
            "rounds": [r.to_json() for r in self.results],
            "stopped": self.stopped,
            "privacy": {
                "site_dp": self.cfg.dp,
                "site_delta": self.cfg.site_delta,
                "central_dp": self.cfg.central_dp,
                "delta": self.cfg.delta,
                "accountant": self.cfg.accountant,
                "client_level_sampling": (
                    f"poisson(q={self.cfg.client_sample_rate})"
                    if self.cfg.client_sampling == "poisson"
                    else "fixed cohort: accounted without amplification (q=1)"
                ),
                "units": {
                    "record_level_epsilon": "per site dataset, DP-SGD (example-level), lifetime total from the site ledger",
                    "client_level_epsilon": "per run, DP-FedAvg (site-level)",
                },
            },
        }

    def run_round(self, server_round: int) -> RoundResult:
        start = time.perf_counter()
        nodes = wait_for_nodes(self.grid, self.cfg.min_sites, self.cfg.round_timeout_s)
        if self.gate is not None:
            nodes = self.gate.admit(nodes)  # sample only among admitted sites
        elif self.book is not None:
            self.book.nodes_seen(nodes)
        cohort = sample_cohort(nodes, self.cfg, server_round)
        if self.book is not None:
            self.book.round_started(server_round, cohort)
        agg = (
            self._secure_round(server_round, cohort)
            if self.cfg.secagg
            else self._plain_round(server_round, cohort)
        )
        self._require_min(server_round, len(agg.contributors), len(cohort))
        client_epsilon = None
        if self.client_accountant is not None:
            central = noise_aggregate(
                [agg.total],
                len(agg.contributors),
                noise_multiplier=self.cfg.noise_multiplier,
                clip_norm=self.cfg.clip_norm,
                rng=secure_generator(),
                sample_rate=self.cfg.client_sample_rate,
            )
            mean_update = np.asarray(central.mean[0], dtype=np.float32)
            self.client_accountant.record(central.event)
            client_epsilon = self.client_accountant.epsilon(self.cfg.delta)
            if self.book is not None:
                self.book.record.record_privacy(
                    self.run_id,
                    server_round,
                    level="client",
                    epsilon=client_epsilon,
                    delta=self.cfg.delta,
                    noise_multiplier=self.cfg.noise_multiplier,
                    sample_rate=self.cfg.client_sample_rate,
                    steps=1,
                    accountant=self.cfg.accountant,
                )
                self._event(
                    "central_dp_applied",
                    {
                        "round": server_round,
                        "contributors": len(agg.contributors),
                        "noise_std": central.noise_std,
                        "sampling": self.cfg.client_sampling,
                    },
                )
        else:
            mean_update = (agg.total / agg.weight).astype(np.float32)
        for site in agg.outcomes:
            if site.accepted and site.energy_kwh is not None and self.book is not None:
                self.book.record.record_energy(
                    self.run_id,
                    server_round,
                    site.node_id,
                    site.energy_kwh,
                    site.co2eq_g or 0.0,
                    bool(site.energy_estimated),
                )
            if site.accepted and site.record_level_epsilon is not None and self.book is not None:
                self.book.record.record_privacy(
                    self.run_id,
                    server_round,
                    level="record",
                    epsilon=site.record_level_epsilon,
                    delta=self.cfg.site_delta,
                    noise_multiplier=site.noise_multiplier or 0.0,
                    sample_rate=site.sample_rate or 1.0,
                    steps=site.steps or 1,
                    accountant=self.cfg.accountant,
                    node_id=site.node_id,
                )
        self.global_vector = self.global_vector + mean_update
        loss, accuracy, how = self.evaluate(server_round)
        return RoundResult(
            round=server_round,
            accuracy=accuracy,
            loss=loss,
            participants=len(agg.contributors),
            sampled=len(cohort),
            seconds=time.perf_counter() - start,
            sites=tuple(agg.outcomes),
            evaluation=how,
            secagg=agg.secagg,
            client_level_epsilon=client_epsilon,
            energy=round_energy(agg.outcomes),
        )

    def _site_decisions(
        self, server_round: int, node_id: int, found: dict[str, Any] | None
    ) -> None:
        if found is not None:
            self._event(
                "site_policy_decisions", {"round": server_round, "node_id": str(node_id), **found}
            )

    def _event(self, kind: str, payload: dict[str, Any]) -> None:
        if self.book is not None:
            self.book.event(kind, payload)

    def _require_min(self, server_round: int, usable: int, sampled: int) -> None:
        if usable < self.cfg.min_sites:
            raise ProtocolAbort(
                f"round {server_round}: {usable} usable update(s) from {sampled} sampled "
                f"site(s); the run needs at least {self.cfg.min_sites}. The global model is unchanged."
            )

    def _plain_round(self, server_round: int, cohort: list[int]) -> Aggregate:
        outcomes: list[SiteOutcome] = []
        updates: list[SiteUpdate] = []
        replies = (
            self._exchange(cohort, MessageType.TRAIN, server_round, with_model=True)
            if cohort
            else {}
        )
        for node_id in cohort:
            reply = replies.get(node_id)
            if reply is None:
                outcomes.append(SiteOutcome(node_id, False, "no reply before the round timeout"))
                continue
            self._site_decisions(server_round, node_id, site_decisions(reply))
            if (reason := refusal_reason(reply)) is not None:
                outcomes.append(SiteOutcome(node_id, False, reason, refused=True))
                self._event(
                    "site_refused",
                    {"round": server_round, "node_id": str(node_id), "reason": reason},
                )
                continue
            try:
                u = parse_train_reply(reply, self.spec.size)
            except FedsealError as exc:
                outcomes.append(SiteOutcome(node_id, False, str(exc)))
                self._event(
                    "update_rejected",
                    {"round": server_round, "node_id": str(node_id), "reason": str(exc)},
                )
                log.warning(
                    "round %d: update from node %d rejected: %s", server_round, node_id, exc
                )
                continue
            updates.append(u)
            outcomes.append(site_outcome(node_id, u.metrics))
        contributors = [u.node_id for u in updates]
        if not updates:
            return Aggregate(np.zeros(self.spec.size), 1.0, contributors, outcomes)
        total = np.zeros(self.spec.size, dtype=np.float64)
        if self.cfg.central_dp:
            # Sensitivity C needs every update clipped: the server re-clips what it can see.
            for u in updates:
                total += clip_l2(u.update, self.cfg.clip_norm)[0]
            return Aggregate(total, float(len(updates)), contributors, outcomes)
        for u in updates:
            total += u.num_examples * u.update.astype(np.float64)
        return Aggregate(total, float(sum(u.num_examples for u in updates)), contributors, outcomes)

    def _setup_rounds(self, server_round: int) -> list[int]:
        """The rounds one secure-aggregation setup prepares, starting at ``server_round``.

        Several only when every round's cohort is known now and the same: all
        admitted sites every round (fixed sampling, ``fraction_train`` 1). A
        site that joins later waits for the next setup; Poisson or partial
        sampling draws a new cohort each round, so it gets a setup each round.
        """
        full = self.cfg.sampling == "fixed" and self.cfg.fraction_train >= 1.0
        count = self.cfg.secagg_setup_rounds if full else 1
        return list(range(server_round, min(server_round + count, self.cfg.rounds + 1)))

    def _secure_round(self, server_round: int, cohort: list[int]) -> Aggregate:
        from server.secure import SecureRound, SecureSetup

        if len(cohort) < 2:
            raise ProtocolAbort(
                f"round {server_round}: secure aggregation needs at least 2 sampled sites"
            )

        def droppers_for(r: int) -> frozenset[int]:
            if self.cfg.drop_rate <= 0:
                return frozenset()
            rng = seeded_generator(self.cfg.seed * 7_919 + r)
            k = int(round(self.cfg.drop_rate * len(cohort)))
            return frozenset(cohort[int(i)] for i in rng.choice(len(cohort), size=k, replace=False))

        def exchange(
            action: str, contents: Mapping[int, RecordDict], group: int
        ) -> dict[int, Message]:
            return self._send(
                {n: (c, f"{MessageType.TRAIN}.{action}") for n, c in contents.items()}, group
            )

        def content(r: int) -> RecordDict:
            return RecordDict({KEY_CONFIG: config_to_record(self.cfg, r, **self._extra())})

        prepared = self._prepared.pop(server_round, None)
        if prepared is None or list(prepared.cohort) != cohort:
            self._prepared.clear()
            rounds = self._setup_rounds(server_round)
            setup = SecureSetup(
                cfg=self.cfg,
                rounds=rounds,
                run_number=int(self.run_id, 16),
                cohort=cohort,
                vector_length=self.spec.size,
                exchange=exchange,
                base_content=content,
                droppers=(
                    droppers_for(server_round)
                    if self.cfg.drop_stage in ("keys", "shares")
                    else frozenset()
                ),
            )
            try:
                self._prepared = setup.run()
            except FedsealError as exc:
                self._event(
                    "secagg_outcome",
                    {
                        "round": server_round,
                        "status": "aborted",
                        "reason": str(exc),
                        "rejected": _str_keys(setup.rejected),
                    },
                )
                raise
            self._event(
                "secagg_setup",
                {
                    "round": server_round,
                    "rounds": sorted(self._prepared),
                    "cohort": [str(n) for n in cohort],
                    "rejected": _str_keys(setup.rejected),
                    "refused": _str_keys(setup.refused),
                },
            )
            prepared = self._prepared.pop(server_round)
        secure = SecureRound(
            cfg=self.cfg,
            server_round=server_round,
            prepared=prepared,
            exchange=exchange,
            base_content=content,
            global_arrays=lambda: vector_to_record(self.global_vector),
            droppers=(
                droppers_for(server_round)
                if self.cfg.drop_stage in ("masked", "unmask")
                else frozenset()
            ),
        )
        try:
            outcome = secure.run()
        except FedsealError as exc:  # abort, or a failed integrity check while unmasking
            self._prepared.clear()  # later rounds get a fresh setup
            self._event(
                "secagg_outcome",
                {
                    "round": server_round,
                    "status": "aborted",
                    "reason": str(exc),
                    "rejected": _str_keys(secure.rejected),
                },
            )
            raise
        result = outcome.result
        self._event(
            "secagg_outcome",
            {
                "round": server_round,
                "status": "completed",
                "contributors": [str(n) for n in result.contributors],
                "dropped": [str(n) for n in result.dropped],
                "threshold": result.threshold,
                "neighbours": result.neighbours,
                "rejected": _str_keys(outcome.rejected),
            },
        )
        for node_id, found in secure.decisions.items():
            self._site_decisions(server_round, node_id, found)
        for node_id, reason in outcome.refused.items():
            self._event(
                "site_refused", {"round": server_round, "node_id": str(node_id), "reason": reason}
            )
        contributors = set(result.contributors)
        outcomes = []
        for node_id in cohort:
            if node_id in contributors:
                site = site_outcome(node_id, outcome.site_metrics.get(node_id, {}))
                if (
                    node_id in outcome.rejected
                ):  # a wrong unmask share; its own input stays in the sum
                    site = dataclasses.replace(site, reason=outcome.rejected[node_id])
                    self._event(
                        "secagg_share_rejected",
                        {
                            "round": server_round,
                            "node_id": str(node_id),
                            "reason": outcome.rejected[node_id],
                        },
                    )
                outcomes.append(site)
            elif node_id in outcome.refused:
                outcomes.append(SiteOutcome(node_id, False, outcome.refused[node_id], refused=True))
            else:
                why = outcome.rejected.get(node_id) or (
                    "dropped out (injected)" if node_id in outcome.injected_drops else "dropped out"
                )
                outcomes.append(SiteOutcome(node_id, False, why))
        info = {
            "participants": result.participants,
            "dropouts": len(result.dropped),
            "threshold": result.threshold,
            "neighbours": result.neighbours,
        }
        return Aggregate(
            result.sum, float(max(len(contributors), 1)), list(result.contributors), outcomes, info
        )

    def _exchange(
        self, cohort: list[int], message_type: str, server_round: int, *, with_model: bool
    ) -> dict[int, Message]:
        extra: dict[str, Any] = {**self._extra(), KEY_COHORT_SIZE: len(cohort)}
        content = RecordDict({KEY_CONFIG: config_to_record(self.cfg, server_round, **extra)})
        if with_model:
            content[KEY_ARRAYS] = vector_to_record(self.global_vector)
        return self._send({n: (content, message_type) for n in cohort}, server_round)

    def _send(
        self, outgoing: Mapping[int, tuple[RecordDict, str]], server_round: int
    ) -> dict[int, Message]:
        """One Grid exchange; returns the first reply from each addressed node."""
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

    # ------------------------------------------------------------- evaluation
    def evaluate(self, server_round: int) -> tuple[float | None, float | None, str]:
        """Central evaluation on the held-out split, or federated evaluation on the sites."""
        if self.cfg.workload == "echo":
            return None, None, "none"
        if self.heldout is not None:
            self.model.load_state_dict(vector_to_state_dict(self.global_vector, self.spec))
            loss, accuracy = evaluate_model(
                self.model, self.heldout.x, self.heldout.y, torch.device("cpu")
            )
            return loss, accuracy, "central"
        nodes = list(self.grid.get_node_ids())
        replies = self._exchange(nodes, MessageType.EVALUATE, server_round, with_model=True)
        total, loss_sum, acc_sum = 0, 0.0, 0.0
        for reply in replies.values():
            if reply.has_error() or KEY_METRICS not in reply.content.metric_records:
                continue
            m = reply.content.metric_records[KEY_METRICS]
            n, loss, acc = m.get("num-examples"), m.get("loss"), m.get("accuracy")
            if not (isinstance(n, int) and n > 0 and _finite(loss) and _finite(acc)):
                continue
            total += n
            loss_sum += n * float(loss)  # type: ignore[arg-type]
            acc_sum += n * float(acc)  # type: ignore[arg-type]
        if total == 0:
            return None, None, "federated"
        return loss_sum / total, acc_sum / total, "federated"


def _str_keys(mapping: Mapping[int, str]) -> dict[str, str]:
    return {str(k): v for k, v in mapping.items()}


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
