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

from client.agent import RoundRefused, SiteContext, Trainer, round_plan
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

    Checks the site's policy rules on the instruction and, with DP on, the
    round's plan (:func:`client.agent.round_plan`: a declared dataset id,
    ``delta < 1/n``, room left in the budget after the dataset's history)
    and a dry run of the ledger (:meth:`~client.ledger.SiteLedger.would_spend`,
    the check :meth:`~client.ledger.SiteLedger.reserve` makes before it
    writes): the epsilon this round would bring the dataset to. A round
    already in the ledger (a redo) costs nothing new.

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
        The refusal reason (every denied rule, else the plan's or the
        budget's refusal) or None to take part; the decisions record when
        the site has a policy.
    """
    cfg = site.cfg
    policy = site.policy()
    decisions: list[Decision] = []
    budget_reason = None
    plan = None
    if cfg.dp and cfg.workload != "echo":
        from client.ledger import SiteLedger  # SQLAlchemy, loaded only with DP on

        data = site.data()
        with SiteLedger(site.directory / LEDGER_FILE) as ledger:
            try:
                planned = round_plan(site, data, ledger)
            except RoundRefused as exc:
                budget_reason = str(exc)
                if exc.rule is not None:
                    decisions.append(Decision(False, exc.rule, str(exc)))
            except PrivacyBudgetExceeded as exc:
                budget_reason = str(exc)
            else:
                plan = planned.plan
                spend = planned.would_spend(ledger)
                if spend.exceeds:
                    budget_reason = str(spend.error())
                if policy is not None:
                    decisions.append(
                        budget_decision(policy, data.dataset_id, spend.spent, spend.would_be)
                    )
    if policy is not None and plan is None and budget_reason is not None:
        # the round's plan refused it: there is no mechanism for the other rules to judge
        return budget_reason, decisions_record(policy, decisions)
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
    privacy cost (another process spent the budget since the dry run), or
    the round's plan refuse it: that is a refusal, not an error. The reply
    carries everything the site knows about its training; what of it
    leaves the site is :mod:`client.mods.disclosure`'s decision. Under
    client-level DP the site's ledger records its contribution to the round
    (:func:`record_client_level`) before the update can leave.
    """
    try:
        local = trainer(site, msg.content[KEY_ARRAYS])
    except (PrivacyBudgetExceeded, RoundRefused) as exc:
        return refusal(msg, str(exc))
    if site.cfg.central_dp:
        record_client_level(site)
    metrics = MetricRecord({"num-examples": local.num_examples, **local.metrics})
    content = RecordDict({KEY_ARRAYS: vector_to_record(local.update), KEY_METRICS: metrics})
    return Message(content=content, reply_to=msg)


def record_client_level(site: SiteContext) -> None:
    """Record in the site's ledger that it contributes to this round under client-level DP.

    The row holds the run's client-level event (the coordinator's noise
    multiplier and client sampling rate, one step) at the run's delta, so
    the site sees its own client-level exposure
    (:meth:`client.ledger.SiteLedger.client_exposure`) without trusting the
    coordinator's record. Idempotent per (dataset, run, round).
    """
    from client.ledger import SiteLedger
    from client.site import site_dataset_id
    from common.dp.events import PrivacyEvent, PrivacyLevel

    cfg = site.cfg
    event = PrivacyEvent(cfg.noise_multiplier, cfg.client_sample_rate, 1, PrivacyLevel.CLIENT)
    with SiteLedger(site.directory / LEDGER_FILE) as ledger:
        ledger.record_participation(
            event,
            site_dataset_id(cfg, site.context.node_config),
            site.run_id,
            site.server_round,
            delta=cfg.delta,
            accountant=cfg.accountant,
        )


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
