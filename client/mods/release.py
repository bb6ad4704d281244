"""A plain round's one release, as a Flower mod (:mod:`client.release`).

Sits right outside the clipping mod, so that what it stores and sends again
is the reply as it leaves the train path: the clipped update and its
metrics. The first request for a round runs the train path and stores the
reply (sealed); an identical later request gets the same bytes back without
training; any other is refused. The secure masked stage passes through: it
claims its release itself (:func:`client.secure.handle_masked`), where the
round's secure-aggregation setup is known.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod

from client.agent import SiteContext
from client.mods import MASKED_STAGE
from client.site_policy import SiteSetup


def release_mod(setup: SiteSetup) -> Mod:
    """The mod holding each plain round to one release, for the sites ``setup`` describes."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type == MASKED_STAGE:
            return call_next(msg, context)
        from client.release import release_once  # its ledger (SQLAlchemy) only when training

        site = SiteContext.of(msg, context, setup)
        return release_once(site, msg, lambda: call_next(msg, context))

    return mod
