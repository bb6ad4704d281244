"""The server's round loop: sample, aggregate, server-side steps, evaluate, book.

Flower's ``Strategy.start`` drives one train exchange per round; fedseal's
rounds also need refusals recorded and (with secure aggregation) several
exchanges per round, so the loop talks to Flower's ``Grid`` through an
:class:`~server.aggregation.exchange.Exchange` and leaves each round's
protocol to an :class:`~server.aggregation.base.Aggregator` (plain FedAvg,
SecAgg+, either under central DP: :mod:`server.pipeline`). Plain rounds
weight each update by its site's example count; when updates are clipped
for privacy (secure aggregation or central DP) every contributor weighs the
same: the server never learns a site's example count under secure
aggregation, and DP-FedAvg's sensitivity (C on the sum) assumes unit weights.

Aggregators return what happened as data; :class:`server.book.RunBook`, the
record's one writer, books it.

Under client-level DP (:class:`server.privacy.CentralDP`) every cohort is
released, however small: the realised count decides nothing the released
outputs show. ``min_sites`` then bounds the connected sites, not the
contributors; more admitted sites than the planned ``N`` fail the round (the
fixed denominator and the rounding slack assume at most ``N``); the round's
result leaves the coordinator only as :meth:`~server.results.RoundResult.released`
(no counts, per-site outcomes, energy or duration) in ``result.json``, the
record's round metrics and model versions, and the log.

A failed round ends the round, not the run (DESIGN.md §7): the aggregator's
events are booked, the round is closed as failed with its reason
(``round_failed``), the global model stays as it was, nothing is released
(the central-DP wrapper adds no noise and spends nothing for it), and the
run goes on with the next round. The run aborts only after
``max_failed_rounds`` failed rounds in a row; a run in which every round
that ran failed ends aborted, saying so.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from flwr.serverapp import Grid

from common.audit.instruction import InstructionSigner
from common.config import RunConfig
from common.errors import FedsealError, ProtocolAbort
from common.records import ModelSpec, state_dict_to_vector
from common.roster import Roster
from common.secagg import SecAggConfig
from common.task import task_for
from server.aggregation.admission import SiteAdmission
from server.aggregation.base import Aggregator, RoundEvent, RoundInput, require_contributors
from server.aggregation.exchange import GridExchange
from server.book import RunBook, code_hash
from server.cohort import sample_cohort, wait_for_nodes, wait_for_sites
from server.distributed import DistributedDP
from server.evaluation import Evaluator
from server.pipeline import aggregator_for
from server.policy_gate import PolicyGate
from server.privacy import CentralDP
from server.results import (
    NullObserver,
    RoundObserver,
    RoundResult,
    result_document,
    round_energy,
)

log = logging.getLogger("flwr.fedseal.server")

FAST_PULL_INTERVAL_S = 0.01


class FederatedRun:
    """One run of R rounds over the sites connected to ``grid``.

    ``aggregator`` defaults to what ``cfg`` asks for (:func:`server.pipeline.aggregator_for`).
    """

    def __init__(
        self,
        cfg: RunConfig,
        grid: Grid,
        observer: RoundObserver | None = None,
        out_dir: Path | None = None,
        book: RunBook | None = None,
        resume: bool = False,
        gate: PolicyGate | None = None,
        aggregator: Aggregator | None = None,
        roster: Roster | None = None,
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
        task = task_for(cfg)
        model = task.build(seed=cfg.seed)
        self.spec = ModelSpec.of(model.state_dict())
        self.global_vector = state_dict_to_vector(model.state_dict())
        self.evaluator = Evaluator(cfg, task, model, self.spec)
        self.results: list[RoundResult] = []
        self.first_round = 1
        self.reached = 0  # the last round run_round started
        self.gate = gate
        self.stopped: str | None = None  # why a policy ended the run early
        self.exchange = GridExchange(
            grid,
            cfg,
            self.run_id,
            code_hash(),
            lambda: book.head if book is not None else None,
            InstructionSigner(book.key) if book is not None else None,
        )
        # Who may be sampled, asked once per site and run before any cohort (server.admission).
        self.admission = SiteAdmission(int(self.run_id, 16), cfg.secagg, roster)
        self.aggregator = aggregator or aggregator_for(
            cfg,
            self.run_id,
            self.spec.size,
            self._judge_secagg if gate is not None else None,
            roster=roster,
            admission=self.admission,
        )
        self.privacy = (
            self.aggregator if isinstance(self.aggregator, CentralDP | DistributedDP) else None
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
            self._wait_for_sites()
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
                released = self._released(result)
                if self.book is not None:
                    if result.failed:
                        self.book.round_failed(result, released)
                    else:
                        model = self.global_vector.astype(np.float32).tobytes()
                        self.book.round_done(result, model, released)
                self.observer.on_round(result)
                _log_round(released)
                self._check_failed_rounds()
            if self.results and all(r.failed for r in self.results):
                raise ProtocolAbort(
                    f"no round of run {self.run_id} succeeded ({len(self.results)} failed); "
                    f"last: {self._released(self.results[-1]).failure}"
                )
        except FedsealError as exc:
            if self.book is not None:
                self.book.finish("aborted", str(exc))
                self.exchange.announce_head(self._last_round())
            raise
        if self.book is not None:
            self.book.finish(
                "finished", None if self.stopped is None else f"stopped by policy: {self.stopped}"
            )
            self.exchange.announce_head(self._last_round())
        self.observer.on_finish(self.results)
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "result.json").write_text(
                json.dumps(self.result_doc(), indent=2) + "\n"
            )
        return self.results

    def _released(self, result: RoundResult) -> RoundResult:
        """``result`` as it may leave the coordinator (counts withheld under client-level DP)."""
        return result.released(self.privacy is not None)

    def _last_round(self) -> int:
        """The last round the run reached (0 before the first): the final head's group id."""
        return max(self.first_round - 1, self.reached)

    def _check_failed_rounds(self) -> None:
        """Abort the run once its last ``max_failed_rounds`` rounds all failed."""
        limit = self.cfg.max_failed_rounds
        tail = self.results[-limit:]
        if len(tail) == limit and all(r.failed for r in tail):
            raise ProtocolAbort(
                f"{limit} failed rounds in a row (max_failed_rounds={limit}); "
                f"last: {self._released(tail[-1]).failure}"
            )

    def run_round(self, server_round: int) -> RoundResult:
        """Sample, aggregate, apply the update, evaluate; a failed round's result says so.

        A failed aggregate (``Aggregate.failure``) leaves the model as it was
        and yields a result with ``failed`` set and the reason; nothing is
        evaluated or released.
        """
        self.reached = server_round
        start = time.perf_counter()
        try:
            nodes = wait_for_nodes(self.grid, self.cfg.min_sites, self.cfg.round_timeout_s)
        except ProtocolAbort as exc:  # too few sites connected: this round fails, the run goes on
            return self._unfilled(server_round, start, f"round {server_round}: {exc}")
        if self.gate is not None:
            nodes = self.gate.admit(nodes)  # sample only among admitted sites
        elif self.book is not None:
            self.book.nodes_seen(nodes)
        nodes, events = self.admission.admit(nodes, server_round, self.exchange)
        if self.book is not None:
            for event in events:
                self.book.event(event.kind, event.payload)
        if len(nodes) < self.cfg.min_sites:
            return self._unfilled(
                server_round,
                start,
                f"round {server_round}: {len(nodes)} admitted site(s) connected, the run needs "
                f"at least {self.cfg.min_sites} (see the site_refused events); "
                "the global model is unchanged",
            )
        if self.privacy is not None and len(nodes) > self.privacy.population:
            return self._unfilled(
                server_round,
                start,
                f"round {server_round}: {len(nodes)} admitted sites connected, more than the "
                f"{self.privacy.population} the run is planned for (num_sites; --wait-sites or "
                "the roster in a deployment): client-level DP's fixed denominator and noise "
                "assume at most that many; the global model is unchanged",
            )
        cohort = sample_cohort(nodes, self.cfg, server_round)
        if self.book is not None:
            self.book.round_started(server_round, cohort)
        agg = self.aggregator.aggregate(
            RoundInput(server_round, cohort, self.global_vector), self.exchange
        )
        if self.privacy is None:  # under client-level DP every cohort is released
            require_contributors(agg, self.cfg.min_sites, server_round, len(cohort))
        if self.book is not None:
            self.book.aggregated(server_round, agg, self.cfg)
        failed = agg.failure is not None
        loss = accuracy = None
        how = "none"
        if not failed:
            self.global_vector = self.global_vector + agg.mean()
            loss, accuracy, how = self.evaluator.evaluate(
                server_round, self.global_vector, self.grid, self.exchange
            )
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
            client_level_epsilon=agg.central.epsilon if agg.central is not None else None,
            energy=None if failed else round_energy(agg.outcomes),
            failed=failed,
            failure=str(agg.failure) if failed else None,
        )

    def _wait_for_sites(self) -> None:
        """Before the first round: wait for ``wait_sites`` sites (``wait_timeout_s`` at most).

        Rounds start as soon as ``min_sites`` are connected otherwise, which
        in a deployment whose sites come up one by one is usually too early
        (a cohort of the first few). The wait and its outcome are audited.
        """
        expected = self.cfg.wait_sites
        if expected <= 0:
            return
        nodes, waited = wait_for_sites(self.grid, expected, self.cfg.wait_timeout_s)
        if len(nodes) < expected:
            log.warning(
                "only %d of %d expected sites connected after %.0f s; starting with them",
                len(nodes),
                expected,
                waited,
            )
        else:
            log.info("%d sites connected (expected %d) after %.0f s", len(nodes), expected, waited)
        if self.book is not None:
            self.book.event(
                "sites_waited",
                {"expected": expected, "connected": len(nodes), "seconds": round(waited, 1)},
            )

    def _unfilled(self, server_round: int, start: float, reason: str) -> RoundResult:
        """A round that could not draw a cohort: failed (no model change, nothing released)."""
        if self.book is not None:
            self.book.round_started(server_round, [])
        return RoundResult(
            round=server_round,
            accuracy=None,
            loss=None,
            participants=0,
            sampled=0,
            seconds=time.perf_counter() - start,
            evaluation="none",
            failed=True,
            failure=reason,
        )

    # ----------------------------------------------------------- server steps
    def _policy_stop(self, server_round: int) -> Any:
        """The server policy's denial of the next round (client-level epsilon cap, energy), if any."""
        if self.gate is None:
            return None
        eps_after = self.privacy.epsilon_after_next() if self.privacy is not None else None
        kwh = [r.energy["kwh"] for r in self.results if r.energy]
        kwh_next = float(kwh[-1]) if kwh else 0.0  # the last round's energy predicts the next
        return self.gate.before_round(server_round, eps_after, float(sum(kwh)), kwh_next)

    def _judge_secagg(
        self, server_round: int, config: SecAggConfig
    ) -> tuple[list[RoundEvent], list[Any]]:
        """The server policy on a secure round's resolved parameters (before sites see them)."""
        if self.gate is None:
            return [], []
        return self.gate.judge_secagg(server_round, config.threshold)

    def _open_book(self) -> None:
        book = self.book
        if book is None:
            return
        if not self.resume:
            book.start(
                asdict(self.cfg), policy_hash=self.gate.hash if self.gate is not None else None
            )
            return
        point = book.resume_point(self.spec.size)
        if self.privacy is not None:
            self.privacy.restore(point.client_events)
        self.results = point.results
        if point.global_vector is not None:
            self.global_vector = point.global_vector
        self.first_round = point.first_round
        log.info("resuming run %s at round %d", self.run_id, self.first_round)

    def result_doc(self) -> dict[str, Any]:
        """The run's results as the JSON document fedseal prints and writes."""
        outlook = self.privacy.outlook.to_json() if self.privacy is not None else None
        released = [self._released(r) for r in self.results]
        return result_document(self.run_id, self.cfg, released, self.stopped, outlook)


def _log_round(result: RoundResult) -> None:
    """The round's log line, from its released view (no counts under client-level DP)."""
    if result.failed:
        log.warning("round %d failed: %s", result.round, result.failure)
        return
    counts = (
        ""
        if result.participants is None
        else f" participants={result.participants}/{result.sampled}"
    )
    log.info(
        "round %d: accuracy=%s loss=%s%s",
        result.round,
        _fmt(result.accuracy),
        _fmt(result.loss),
        counts,
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
