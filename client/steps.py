"""The client train path's steps, written once: decide, train (and the replies they make).

A round on a site is: decide whether to take part (:func:`decide_participation`,
before any data is touched) -> train (:func:`train`, the ClientApp's
:class:`~client.agent.Trainer`) -> clip (:mod:`client.mods.clipping`) ->
[mask, :mod:`client.mods.secagg`]. The plain ``train`` action and the secure
masked stage run the same train and clip steps (the ClientApp's mod chain,
:mod:`client.app`); both decide through :func:`decide_participation`: a plain
round in :mod:`client.mods.participation`, a secure round in its stages
(:mod:`client.secure`), where the stage's checks put the decision.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from client.agent import SiteContext, Trainer, dp_plan, site_budget
from client.site_policy import budget_decision, check_round, decisions_record
from client.state import LEDGER_FILE
from common.errors import PrivacyBudgetExceeded
from common.records import (
    KEY_ARRAYS,
    KEY_METRICS,
    KEY_REFUSAL,
    KEY_SITE_DECISIONS,
    KEY_VECTOR,
    vector_to_record,
)
from policies import Decision


def decide_participation(
    site: SiteContext,
    cohort_size: int,
    secagg_threshold: int | None,
    secagg_neighbours: int | None = None,
) -> tuple[str | None, ConfigRecord | None]:
    """Before touching data: (refusal reason or None, the site-policy decisions record).

    Checks the site's policy rules on the instruction and, with DP on, a dry
    run of the ledger (:meth:`~client.ledger.SiteLedger.would_spend`, the
    check :meth:`~client.ledger.SiteLedger.reserve` makes before it writes):
    the epsilon this round would bring the dataset to. A round already in the
    ledger (a redo) costs nothing new.

    Parameters
    ----------
    site : SiteContext
        The round's instruction as this site reads it.
    cohort_size : int
        Sites taking part in the round.
    secagg_threshold : int or None
        The secure-aggregation threshold (None for a plain round).
    secagg_neighbours : int or None
        The secure-aggregation neighbour degree ``k`` (None for a plain round).

    Returns
    -------
    tuple of (str or None, ConfigRecord or None)
        The refusal reason (every denied rule, else the budget's refusal) or
        None to take part; the decisions record when the site has a policy.
    """
    cfg = site.cfg
    policy = site.policy()
    decisions: list[Decision] = []
    budget_reason = None
    plan = None
    if cfg.dp and cfg.workload != "echo":
        from client.ledger import SiteLedger  # SQLAlchemy, loaded only with DP on

        data = site.data()
        plan = dp_plan(site, len(data.y_train))
        budget, delta = site_budget(site, data.dataset_id)
        with SiteLedger(site.directory / LEDGER_FILE) as ledger:
            spend = ledger.would_spend(
                data.dataset_id,
                site.run_id,
                site.server_round,
                plan.round_event(),
                delta,
                cfg.accountant,
                budget,
            )
        if spend.exceeds:
            budget_reason = str(spend.error())
        if policy is not None:
            decisions.append(budget_decision(policy, data.dataset_id, spend.spent, spend.would_be))
    if policy is not None:
        decisions += check_round(
            policy,
            cfg,
            site.server_round,
            cohort_size=cohort_size,
            secagg_threshold=secagg_threshold,
            secagg_neighbours=secagg_neighbours,
            noise_multiplier=plan.noise_multiplier if plan is not None else None,
            app_hash=site.app_hash,
            instruction=site.instruction,
        )
    denied = [str(d) for d in decisions if not d.allowed]
    reason = "; ".join(denied) if denied else budget_reason
    return reason, decisions_record(policy, decisions) if policy is not None else None


def train(msg: Message, site: SiteContext, trainer: Trainer) -> Message:
    """The train step: the trainer's update (unclipped) and metrics, as a reply to ``msg``.

    The ledger may still refuse the round when the trainer reserves its
    privacy cost (another process spent the budget since the dry run): that
    is a refusal, not an error.
    """
    try:
        local = trainer(site, msg.content[KEY_ARRAYS])
    except PrivacyBudgetExceeded as exc:
        return refusal(msg, str(exc))
    metrics = MetricRecord({"num-examples": local.num_examples, **local.metrics})
    content = RecordDict({KEY_ARRAYS: vector_to_record(local.update), KEY_METRICS: metrics})
    return Message(content=content, reply_to=msg)


def refusal(msg: Message, reason: str, decisions: ConfigRecord | None = None) -> Message:
    """A reply saying this site does not take part in the round, and why."""
    content = RecordDict(
        {KEY_METRICS: MetricRecord({"refused": 1}), KEY_REFUSAL: ConfigRecord({"reason": reason})}
    )
    return with_decisions(Message(content=content, reply_to=msg), decisions)


def is_refusal(reply: Message) -> bool:
    """Whether ``reply`` is a :func:`refusal`."""
    return not reply.has_error() and KEY_REFUSAL in reply.content


def with_decisions(reply: Message, decisions: ConfigRecord | None) -> Message:
    """``reply`` carrying the site's policy decisions (when it has a policy), last."""
    if decisions is not None and not reply.has_error():
        reply.content[KEY_SITE_DECISIONS] = decisions
    return reply


def reply_update(reply: Message) -> np.ndarray:
    """The update vector of a :func:`train` reply (the ClientApp's own, not a peer's)."""
    vector: np.ndarray = reply.content.array_records[KEY_ARRAYS][KEY_VECTOR].numpy()
    return vector
