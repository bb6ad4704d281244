"""A plain round's participation decision, as a Flower mod.

Before the inner train path touches any data, the site decides whether it
takes part (:func:`client.steps.decide_participation`: its policy on the
instruction and, with DP on, a dry run of its privacy ledger); a refusal
answers the server without training. The decisions record rides on the
reply, whatever it is, so that the coordinator's audit log records it.

A secure round's participation is decided by its own stages
(:mod:`client.secure`: the keys stage, and the masked stage of a later
prepared round), through the same decision step, at the point of the stage's
order where every check has been made and no secret used: this mod lets the
masked stage through.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod

from client.agent import SiteContext
from client.mods import MASKED_STAGE
from client.site_policy import SiteSetup
from client.steps import decide_participation, refusal, with_decisions


def participation_mod(setup: SiteSetup) -> Mod:
    """The mod deciding a plain round for the sites ``setup`` describes."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type == MASKED_STAGE:
            return call_next(msg, context)
        site = SiteContext.of(msg, context, setup)
        cohort = site.cohort_size if isinstance(site.cohort_size, int) else 1
        reason, decisions = decide_participation(site, cohort, None)
        if reason is not None:
            return refusal(msg, reason, decisions)
        return with_decisions(call_next(msg, context), decisions)

    return mod
