"""What leaves the site, as a Flower mod: every reply cut down to what is declared public.

Second of every handler's mods, right inside the instruction check
(:mod:`client.mods.instruction`): whatever the handler and the mods inside
it put into a reply, only the records and metric keys
:mod:`client.disclosure` declares public for the message's kind and the
run's settings reach the coordinator. The inner mods (the release cache
among them) keep their full replies on the site.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from client.disclosure import REFUSAL, disclose, evaluate_metrics, train_metrics
from client.mods import MASKED_STAGE
from common.errors import FedsealError
from common.records import KEY_CONFIG, KEY_METRICS, record_to_config

log = logging.getLogger("flwr.fedseal.site")


def _allowed(msg: Message) -> frozenset[str] | None:
    """The metric keys a reply to ``msg`` may carry; only a refusal's if the config is unreadable."""
    try:
        cfg, _, _ = record_to_config(msg.content[KEY_CONFIG])
    except (FedsealError, KeyError, TypeError, ValueError):
        return REFUSAL
    message_type = msg.metadata.message_type
    category = message_type.split(".", 1)[0]
    if category == MessageType.TRAIN:
        return train_metrics(cfg, secure=cfg.secagg or message_type == MASKED_STAGE)
    if category == MessageType.EVALUATE:
        return evaluate_metrics(cfg)
    return REFUSAL


def disclosure_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The inner reply with only its declared-public content (an error reply as it came)."""
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    allowed = _allowed(msg)
    content = disclose(reply.content, allowed)
    if log.isEnabledFor(logging.DEBUG):
        withheld = [n for n in reply.content.keys() if n not in content.keys()]
        if KEY_METRICS in reply.content and allowed is not None:
            withheld += [
                k for k in reply.content.metric_records[KEY_METRICS].keys() if k not in allowed
            ]
        if withheld:
            log.debug("withheld from the coordinator (not declared public): %s", withheld)
    return Message(content=content, reply_to=msg)
