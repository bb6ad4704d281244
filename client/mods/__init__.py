"""The fedseal ClientApp's Flower mods (``(message, context, call_next) -> reply``).

Their order on the train actions is written once, in :func:`client.app.train_mods`.
"""

from __future__ import annotations

from flwr.app import MessageType

from common.secagg.stages import Stage


def train_message_type(action: str) -> str:
    """The Flower message type of the train action ``action`` (``train.<action>``)."""
    return f"{MessageType.TRAIN}.{action}"


MASKED_STAGE = train_message_type(Stage.COLLECT_MASKED.action)
"""The secure masked stage's message type: the one secure stage that trains."""
