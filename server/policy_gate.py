"""The coordinator's policy, enforced: run plan, admission, per-round budgets.

Every check returns decisions (allowed, rule, reason); each one, allow or
deny, is written to the audit log with the policy's hash. A run whose
configuration violates the policy is refused before any site is contacted;
a round that would exceed the client-level epsilon cap or the energy budget
is not started, and the run ends cleanly instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from common.config import RunConfig
from common.errors import PolicyViolation
from common.secagg.params import resolve_threshold
from policies import Decision, ServerPolicy, policy_hash
from policies.evaluate import (
    check_admission,
    check_energy,
    check_round_budget,
    check_run_plan,
    check_secagg_threshold,
)
from policies.plans import RunPlan
from server.aggregation.base import RoundEvent
from server.book import RunBook


def run_plan(cfg: RunConfig) -> RunPlan:
    """What the server's policy judges about a run configuration before any round.

    The secure-aggregation threshold here is the one the planned number of
    sites would get (:func:`common.secagg.params.resolve_threshold`, the same
    resolution every round uses); each round's actual, resolved value is
    judged again before its sites see it (:meth:`PolicyGate.judge_secagg`).
    """
    threshold: int | None = None
    if cfg.secagg:
        n = max(cfg.num_sites, cfg.min_sites, 2)
        threshold, _ = resolve_threshold(cfg.secagg_threshold_value, n)
    return RunPlan(
        rounds=cfg.rounds,
        fraction_train=cfg.fraction_train,
        min_sites=cfg.min_sites,
        secure_aggregation=cfg.secagg,
        secagg_threshold=threshold,
        central_dp=cfg.central_dp,
        central_noise_multiplier=cfg.noise_multiplier if cfg.central_dp else None,
        central_clip_norm=cfg.clip_norm if cfg.central_dp else None,
        central_delta=cfg.delta if cfg.central_dp else None,
    )


class PolicyGate:
    """Applies one :class:`ServerPolicy` to a run and records every decision."""

    def __init__(self, policy: ServerPolicy, book: RunBook | None) -> None:
        self.policy = policy
        self.hash = policy_hash(policy)
        self.book = book
        self._admitted: dict[int, bool] = {}

    def _events(
        self, scope: str, decisions: Sequence[Decision], **context: Any
    ) -> list[RoundEvent]:
        return [
            RoundEvent(
                "policy_decision",
                {"scope": scope, "policy_hash": self.hash, **d.to_payload(), **context},
            )
            for d in decisions
        ]

    def _record(self, scope: str, decisions: Sequence[Decision], **context: Any) -> None:
        if self.book is None:
            return
        for event in self._events(scope, decisions, **context):
            self.book.event(event.kind, event.payload)

    def judge_secagg(
        self, server_round: int, threshold: int
    ) -> tuple[list[RoundEvent], list[Decision]]:
        """The policy on a secure round's resolved threshold: (events to book, denials).

        Returned as data (the aggregator hands them back with its round); a
        denial means the round must not start.
        """
        decision = check_secagg_threshold(self.policy, threshold)
        events = self._events("secagg", [decision], round=server_round)
        return events, [] if decision.allowed else [decision]

    def check_run(self, cfg: RunConfig) -> None:
        """Record the run-plan decisions; PolicyViolation if any is a denial."""
        decisions = check_run_plan(self.policy, run_plan(cfg))
        self._record("run", decisions)
        denied = [d for d in decisions if not d.allowed]
        if denied:
            raise PolicyViolation(denied)

    def admit(self, node_ids: Sequence[int]) -> list[int]:
        """The admitted nodes among ``node_ids`` (each node's decision recorded once)."""
        for n in node_ids:
            if n not in self._admitted:
                decision = check_admission(self.policy, n, None)
                self._admitted[n] = decision.allowed
                self._record("admission", [decision], node_id=str(n))
                if self.book is not None:
                    self.book.node_admission(n, decision.allowed, decision.reason)
        return [n for n in node_ids if self._admitted[n]]

    def before_round(
        self,
        server_round: int,
        client_epsilon_after: float | None,
        kwh_so_far: float,
        kwh_next_estimate: float,
    ) -> Decision | None:
        """The denial that stops the run before ``server_round``, or None to go on."""
        decisions = [
            check_round_budget(self.policy, client_epsilon_after),
            check_energy(self.policy, kwh_so_far, kwh_next_estimate),
        ]
        self._record("round", decisions, round=server_round)
        return next((d for d in decisions if not d.allowed), None)
