"""The instruction check as a Flower mod: the outermost one of every fedseal handler.

Before any other mod or handler reads a message, the site checks its
signature under the pinned coordinator key (:mod:`client.instructions`).
A refused instruction is answered with a refusal (its reason, and the
``trust.server_key`` decision when the site has a policy) where the
coordinator reads refusals: a plain round, the secure keys and masked
stages, evaluation and the final audit head; at the other secure stages
(shares, unmask), which cannot be declined, the refusal is raised, and the
coordinator sees a site error naming it. The same refusal comes back when a
handler's own look at the message (:meth:`client.agent.SiteContext.of`)
refuses it, e.g. for an audit head that fails the witness checks.
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod

from client.instructions import InstructionRefused, check_instruction
from client.mods import MASKED_STAGE, train_message_type
from client.site_policy import SiteSetup, decisions_record, site_policy
from client.steps import refusal
from common.records import AUDIT_HEAD_ACTION
from common.secagg.stages import IDENTITY_ACTION, Stage
from policies import Decision

AUDIT_HEAD_MESSAGE = f"{MessageType.QUERY}.{AUDIT_HEAD_ACTION}"

REFUSABLE = frozenset(
    {
        MessageType.TRAIN,
        train_message_type(Stage.ADVERTISE_KEYS.action),
        MASKED_STAGE,
        MessageType.EVALUATE,
        AUDIT_HEAD_MESSAGE,
        f"{MessageType.QUERY}.{IDENTITY_ACTION}",
    }
)
"""Message types whose replies the coordinator reads as refusals."""


def instruction_mod(setup: SiteSetup) -> Mod:
    """The mod checking every message for the sites ``setup`` describes."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        try:
            check_instruction(msg, context, setup)
            return call_next(msg, context)
        except InstructionRefused as exc:
            if msg.metadata.message_type not in REFUSABLE:
                raise
            policy = site_policy(context.node_config, setup.policies)
            decisions = None
            if policy is not None and exc.rule is not None:
                decisions = decisions_record(policy, [Decision(False, exc.rule, exc.reason)])
            return refusal(msg, str(exc), decisions)

    return mod
