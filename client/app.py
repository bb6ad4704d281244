"""The fedseal ClientApp: the site agent's side of every round.

Actions (Flower message types):

* ``train`` — plain round: train on the site's own data, reply with the model
  *update* (new - global) as a flat float32 vector, plus metrics;
* ``train.secagg_*`` — the four secure-aggregation stages (:mod:`client.secure`);
* ``evaluate`` — score the global model on the site's local test split (refused
  under DP: those figures are outside any accountant);
* ``query.audit_head`` — the run's final signed audit head, sent after the
  run ended: verified, witnessed, acknowledged with an empty reply.

Every handler runs behind :func:`~client.mods.instruction.instruction_mod`:
the coordinator's signature on the message is checked (under the site's
pinned key) before anything else reads it (:mod:`client.instructions`).

Every train action runs one chain: the mods of :func:`train_mods` (secure
aggregation, the plain round's participation decision, clipping) around the
train step (:mod:`client.steps`), which calls the site's
:class:`~client.agent.Trainer`. A plain round and a secure round's masked
stage thus train and clip through the same code.

The run's settings arrive in each message's config record, written by the
server from its :class:`~common.config.RunConfig`.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod

from client import steps
from client.agent import SiteContext, Trainer, compute_update, load_global
from client.mods.clipping import clipping_mod
from client.mods.disclosure import disclosure_mod
from client.mods.instruction import instruction_mod
from client.mods.participation import participation_mod
from client.mods.release import release_mod
from client.mods.secagg import secagg_mod
from client.secure import handle_identity
from client.site_policy import SiteSetup
from common.records import AUDIT_HEAD_ACTION, KEY_ARRAYS, KEY_METRICS
from common.secagg.stages import IDENTITY_ACTION, WIRE_STAGES
from policies import SitePolicies

TRAIN_ACTIONS = (
    "default",  # the plain round: message type ``train``
    *(stage.action for stage in WIRE_STAGES),
)


def train_mods(setup: SiteSetup) -> list[Mod]:
    """The mods of every train action, outermost first: the one place their order is set.

    0. :func:`~client.mods.instruction.instruction_mod` checks the
       coordinator's signature before any other mod reads the message, and
       answers a refused one (every handler has it first);
    0b. :func:`~client.mods.disclosure.disclosure_mod` cuts every reply down
       to what :mod:`client.disclosure` declares public (every handler has
       it second): the masked input, the update, refusals and decisions,
       and under DP no metric beyond the record-level plan, epsilon and delta;
    1. :func:`~client.mods.secagg.secagg_mod` answers the secure stages; only
       the masked stage goes on inward, and it masks what comes back, so it
       must see the update after clipping;
    2. :func:`~client.mods.participation.participation_mod` decides a plain
       round before anything inside it touches data (a secure round decides
       in its own stages);
    3. :func:`~client.mods.release.release_mod` holds a plain round to one
       release (:mod:`client.release`): it claims the round before the data
       is touched and stores what comes back, clipped, before it leaves; a
       repeat gets the same bytes or a refusal (the masked stage claims its
       release in :func:`client.secure.handle_masked`, through the same function);
    4. :func:`~client.mods.clipping.clipping_mod` clips the train step's
       update to C, next to the step, so that every path out of the site
       (plain reply or masked input) carries the clipped update.

    The inner function is the train step (:func:`client.steps.train`).
    """
    return [
        instruction_mod(setup),
        disclosure_mod,
        secagg_mod(setup),
        participation_mod(setup),
        release_mod(setup),
        clipping_mod,
    ]


def train_step(setup: SiteSetup, trainer: Trainer) -> ClientAppCallable:
    """The inner train function: this site's ``trainer`` on the received global model."""

    def train(msg: Message, context: Context) -> Message:
        return steps.train(msg, SiteContext.of(msg, context, setup), trainer)

    return train


LOCAL_TEST_WITHHELD = (
    "local-test metrics are not released under DP (outside any accountant): "
    "the coordinator's own held-out evaluation is the metric of record"
)


def handle_evaluate(
    msg: Message, context: Context, site_root: SiteSetup | Path | None = None
) -> Message:
    """Score the global model on the site's local test split; under DP, refuse before scoring.

    The local-test loss, accuracy and count are computed on private records
    and no accountant covers them, so under either level of DP the site
    declines (:data:`LOCAL_TEST_WITHHELD`); otherwise what of the figures
    leaves is :mod:`client.disclosure`'s decision (no count under secure
    aggregation).
    """
    from client.disclosure import under_dp

    site = SiteContext.of(msg, context, site_root)
    cfg = site.cfg
    if under_dp(cfg):
        return steps.refusal(msg, LOCAL_TEST_WITHHELD)
    from client.training import select_device  # torch: only the handlers that use a model
    from common.evaluation import evaluate

    data = site.data()
    model, _, _ = load_global(site, msg.content[KEY_ARRAYS])
    device = select_device(cfg.device)
    loss, accuracy = evaluate(model.to(device), data.x_test, data.y_test, device)
    metrics = MetricRecord({"num-examples": len(data.y_test), "loss": loss, "accuracy": accuracy})
    return Message(content=RecordDict({KEY_METRICS: metrics}), reply_to=msg)


def handle_audit_head(
    msg: Message, context: Context, site_root: SiteSetup | Path | None = None
) -> Message:
    """The run's final head: verified and witnessed (:meth:`SiteContext.of`), then an empty ack.

    Witnessed, it marks the run finished in the site's state directory
    (:mod:`client.run_end`): ``fedseal-client start`` then stops the site.
    """
    site = SiteContext.of(msg, context, site_root)
    from client.run_end import mark_run_finished

    mark_run_finished(site.directory, site.run_id)
    return Message(content=RecordDict(), reply_to=msg)


def make_client_app(
    site_root: SiteSetup | Path | None = None,
    site_policies: SitePolicies | None = None,
    trainer: Trainer = compute_update,
) -> ClientApp:
    """Build the fedseal ClientApp.

    Parameters
    ----------
    site_root : SiteSetup, Path or None
        Where simulated sites keep their state directories (a whole
        :class:`~client.site_policy.SiteSetup`, e.g. with the simulated
        federation's roster, :func:`simulations.federation.prepare_federation`);
        deployed sites configure theirs through their node config.
    site_policies : SitePolicies or None
        The simulated sites' policies; deployed sites name their policy file
        in their node config.
    trainer : Trainer
        A site's training for one round (default :func:`client.agent.compute_update`).
    """
    if isinstance(site_root, SiteSetup):
        if site_policies is not None:
            raise TypeError("give the site policies inside the SiteSetup")
        setup = site_root
    else:
        setup = SiteSetup(site_root, site_policies)
    client_app = ClientApp()
    mods = train_mods(setup)
    train = train_step(setup, trainer)
    for action in TRAIN_ACTIONS:
        client_app.train(action, mods=mods)(train)

    checked = [instruction_mod(setup), disclosure_mod]

    @client_app.evaluate(mods=checked)
    def evaluate_(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, setup)

    @client_app.query(AUDIT_HEAD_ACTION, mods=checked)
    def audit_head_(msg: Message, context: Context) -> Message:
        return handle_audit_head(msg, context, setup)

    @client_app.query(IDENTITY_ACTION, mods=checked)
    def identity_(msg: Message, context: Context) -> Message:
        return handle_identity(msg, context, setup)

    return client_app


app = make_client_app()
