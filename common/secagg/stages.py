"""Protocol stages and the one table of allowed transitions.

Guarantee: a state machine that calls :func:`check_transition` before acting
on a message processes the stages of one round exactly once each and in
order; every other (previous, next) pair raises
:class:`~common.errors.ProtocolError` before any secret is touched. A round
never restarts: a new round needs a new state machine.
"""

from __future__ import annotations

import enum

from common.errors import ProtocolError


class Stage(enum.IntEnum):
    """The stages of one SecAgg+ round (the value is the wire code)."""

    INIT = 0
    """A fresh state machine; no message handled yet."""
    ADVERTISE_KEYS = 1
    """Clients make two X25519 key pairs and a self-mask seed; send public keys."""
    SHARE_KEYS = 2
    """Clients Shamir-share their mask key and seed, encrypted for each neighbour."""
    COLLECT_MASKED = 3
    """Clients receive their neighbours' shares and send their masked input."""
    UNMASK = 4
    """Clients reveal seed shares of survivors and key shares of dropped neighbours."""


TRANSITIONS: frozenset[tuple[Stage, Stage]] = frozenset(
    {
        (Stage.INIT, Stage.ADVERTISE_KEYS),
        (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS),
        (Stage.SHARE_KEYS, Stage.COLLECT_MASKED),
        (Stage.COLLECT_MASKED, Stage.UNMASK),
    }
)
"""Every allowed (previous, next) pair; all others are rejected."""


def check_transition(previous: Stage, following: Stage) -> None:
    """Raise unless ``previous -> following`` is in :data:`TRANSITIONS`.

    Raises
    ------
    ProtocolError
        If either argument is not a :class:`Stage` or the pair is not allowed.
    """
    if not isinstance(previous, Stage) or not isinstance(following, Stage):
        raise ProtocolError("stages must be Stage members")
    if (previous, following) not in TRANSITIONS:
        raise ProtocolError(
            f"stage {following.name} cannot follow {previous.name} in a secure-aggregation round"
        )
