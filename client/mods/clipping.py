"""Client-side clipping of the update, as a Flower mod (after Flower's ``fixedclipping_mod``).

The inner train path replies with the site's raw update (new - global); this
mod clips its L2 norm to the run's ``clip_norm`` and reports the norm before
clipping as the ``update-norm`` metric. It clips when the run says updates
are clipped (central DP or secure aggregation, ``RunConfig.clips_updates``)
and, whatever the instruction's run configuration says, for the secure masked
stage: the masked input must lie within the protocol's value bound, C, and
the server's central DP noise is calibrated to that sensitivity. The clipped
update is what leaves the site (plain round) or what is masked (secure round).
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from client.mods import MASKED_STAGE
from client.steps import is_refusal, reply_update
from common.config import RunConfig
from common.dp import clip_l2
from common.records import (
    KEY_ARRAYS,
    KEY_CONFIG,
    KEY_METRICS,
    record_to_config,
    vector_to_record,
)


def clips(msg: Message, cfg: RunConfig) -> bool:
    """Whether the reply to ``msg`` carries a clipped update."""
    return cfg.clips_updates or msg.metadata.message_type == MASKED_STAGE


def clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip the inner train reply's update to ``cfg.clip_norm``; add ``update-norm``.

    A refusal or an error reply goes back as it came.
    """
    cfg, _, _ = record_to_config(msg.content[KEY_CONFIG])
    reply = call_next(msg, context)
    if reply.has_error() or is_refusal(reply) or not clips(msg, cfg):
        return reply
    update, norm = clip_l2(reply_update(reply), cfg.clip_norm)
    metrics = reply.content.metric_records[KEY_METRICS]
    reply.content[KEY_ARRAYS] = vector_to_record(update)
    reply.content[KEY_METRICS] = MetricRecord({**metrics, "update-norm": norm})
    return reply
