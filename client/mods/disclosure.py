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

from flwr.app import Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from client.disclosure import REFUSAL, disclose, evaluate_metrics, train_metrics
from client.instructions import InstructionRefused
from client.mods import MASKED_STAGE
from common.errors import FedsealError
from common.records import KEY_CONFIG, KEY_METRICS, record_to_config

log = logging.getLogger("flwr.fedseal.site")
MAX_REASON_CHARS = 300


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


def _private_run(msg: Message) -> bool:
    """Whether ``msg`` is of a DP run (or its config is unreadable: then treated as one)."""
    try:
        cfg, _, _ = record_to_config(msg.content[KEY_CONFIG])
    except (FedsealError, KeyError, TypeError, ValueError):
        return True
    return bool(cfg.dp or cfg.central_dp)


def error_reason(exc: BaseException, private: bool) -> str:
    """What the coordinator learns of a site's failure: its kind, and fedseal's text only without DP.

    An exception's text can quote the data it failed on (a parser's cell, a
    library's shapes, a count), so it stays in the site's log. Under DP only
    the class name leaves; without DP fedseal's own errors (which name rules)
    keep their text, any other exception only its class.
    """
    kind = type(exc).__name__
    if not private and isinstance(exc, FedsealError):
        return f"{kind}: {exc}"[:MAX_REASON_CHARS]
    return f"{kind} at the site (the text stays in the site's log)"


def disclosure_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The inner reply with only its declared-public content; a failure as its kind only.

    Flower's own error reply would carry ``str(exc)`` to the coordinator: a
    failure inside is logged here, whole, and answered with
    :func:`error_reason`.
    """
    try:
        reply = call_next(msg, context)
    except InstructionRefused:
        raise  # the instruction check outside answers it with its rule (a refusal, no data)
    except Exception as exc:
        log.error("the site's handler failed (the coordinator gets its kind only)", exc_info=exc)
        reason = error_reason(exc, _private_run(msg))
        return Message(
            Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg
        )
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
