"""The fedseal ClientApp: the site agent's side of every round.

Actions (Flower message types):

* ``train`` — plain round: train on the site's own data, reply with the model
  *update* (new - global) as a flat float32 vector, plus metrics;
* ``train.secagg_*`` — the four secure-aggregation stages (:mod:`client.secure`);
* ``evaluate`` — score the global model on the site's local test split.

The run's settings arrive in each message's config record, written by the
server from its :class:`~common.config.RunConfig`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.agent import SiteContext, compute_update, decide_participation, load_global, refusal
from client.site_policy import SiteSetup
from client.training import select_device
from common.dp import clip_l2
from common.errors import PrivacyBudgetExceeded
from common.evaluation import evaluate
from common.records import (
    KEY_ARRAYS,
    KEY_METRICS,
    KEY_SITE_DECISIONS,
    vector_to_record,
)
from common.secagg.stages import Stage
from policies import SitePolicies


def handle_train(
    msg: Message, context: Context, site_root: SiteSetup | Path | None = None
) -> Message:
    site = SiteContext.of(msg, context, site_root)
    cfg = site.cfg
    cohort = site.cohort_size if isinstance(site.cohort_size, int) else 1
    reason, decisions = decide_participation(site, cohort, None)
    if reason is not None:
        return refusal(msg, reason, decisions)
    try:
        local = compute_update(site, msg.content[KEY_ARRAYS])
    except PrivacyBudgetExceeded as exc:
        return refusal(msg, str(exc), decisions)
    update, norm = local.update, None
    if cfg.clips_updates:
        update, norm = clip_l2(update, cfg.clip_norm)
    extra = {} if norm is None else {"update-norm": norm}
    metrics = MetricRecord({"num-examples": local.num_examples, **local.metrics, **extra})
    content = RecordDict({KEY_ARRAYS: vector_to_record(update), KEY_METRICS: metrics})
    if decisions is not None:
        content[KEY_SITE_DECISIONS] = decisions
    return Message(content=content, reply_to=msg)


def handle_evaluate(
    msg: Message, context: Context, site_root: SiteSetup | Path | None = None
) -> Message:
    site = SiteContext.of(msg, context, site_root)
    cfg = site.cfg
    data = site.data()
    model, _, _ = load_global(site, msg.content[KEY_ARRAYS])
    device = select_device(cfg.device)
    loss, accuracy = evaluate(model.to(device), data.x_test, data.y_test, device)
    metrics = MetricRecord({"num-examples": len(data.y_test), "loss": loss, "accuracy": accuracy})
    return Message(content=RecordDict({KEY_METRICS: metrics}), reply_to=msg)


def _bind(
    handler: Callable[[Message, Context, SiteSetup], Message], setup: SiteSetup
) -> Callable[[Message, Context], Message]:
    def bound(msg: Message, context: Context) -> Message:
        return handler(msg, context, setup)

    return bound


def make_client_app(
    site_root: Path | None = None, site_policies: SitePolicies | None = None
) -> ClientApp:
    """Build the fedseal ClientApp.

    ``site_root`` holds simulated sites' state directories and ``site_policies``
    their policies; deployed sites configure both through their node config.
    """
    setup = SiteSetup(site_root, site_policies)
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, setup)

    from client import secure

    for stage, handler in (
        (Stage.ADVERTISE_KEYS, secure.handle_keys),
        (Stage.SHARE_KEYS, secure.handle_shares),
        (Stage.COLLECT_MASKED, secure.handle_masked),
        (Stage.UNMASK, secure.handle_unmask),
    ):
        client_app.train(stage.action)(_bind(handler, setup))

    @client_app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, setup)

    return client_app


app = make_client_app()
