"""Secure aggregation on the site, as a Flower mod (after Flower's ``secaggplus_mod``).

The mod owns the five SecAgg+ stages (:mod:`client.secure`): it answers the
keys, shares, consistency and unmask stages itself, never calling the inner train path;
for the masked stage it opens the round's sealed state and checks the
request, calls the inner train path (``call_next``: train, then clip to C),
and quantises and masks the clipped update it gets back. Every other train
message (a plain round) goes to the inner path untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod

from client import secure
from client.mods import MASKED_STAGE, train_message_type
from client.site_policy import SiteSetup
from common.secagg.stages import Stage as SecAggStage

Stage = Callable[[Message, Context, SiteSetup | Path | None], Message]

_STAGES: dict[str, Stage] = {
    train_message_type(SecAggStage.ADVERTISE_KEYS.action): secure.handle_keys,
    train_message_type(SecAggStage.SHARE_KEYS.action): secure.handle_shares,
    train_message_type(SecAggStage.CONSISTENCY.action): secure.handle_consistency,
    train_message_type(SecAggStage.UNMASK.action): secure.handle_unmask,
}  # the stages that never train


def secagg_mod(setup: SiteSetup) -> Mod:
    """The secure-aggregation mod for the sites ``setup`` describes."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        message_type = msg.metadata.message_type
        if message_type == MASKED_STAGE:
            return secure.handle_masked(msg, context, setup, call_next)
        stage = _STAGES.get(message_type)
        if stage is None:
            return call_next(msg, context)
        return stage(msg, context, setup)

    return mod
