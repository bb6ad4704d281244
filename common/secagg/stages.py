"""Protocol stages and the one table of allowed transitions.

This module is also the one place that names the stages: their wire codes,
their short labels (``keys``, ``shares``, ``masked``, ``consistency``, ``unmask``) and the
ClientApp actions that run them (``secagg_<label>``).

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
    CONSISTENCY = 5
    """Survivors sign the survivor set (protocol v3); between COLLECT_MASKED and UNMASK."""

    @property
    def label(self) -> str:
        """The stage's short name (``keys``, ``shares``, ``masked``, ``consistency``, ``unmask``)."""
        return _LABELS[self]

    @property
    def action(self) -> str:
        """The ClientApp action (Flower message type ``train.<action>``) that runs this stage."""
        return f"{ACTION_PREFIX}{_LABELS[self]}"

    @classmethod
    def from_label(cls, label: str) -> Stage:
        """The stage called ``label``; ProtocolError for any other name."""
        for stage in WIRE_STAGES:
            if _LABELS[stage] == label:
                return stage
        raise ProtocolError(f"unknown secure-aggregation stage {label!r}")

    @classmethod
    def from_action(cls, action: str) -> Stage | None:
        """The stage a ClientApp action runs, or None when it is no secure-aggregation stage."""
        for stage in WIRE_STAGES:
            if stage.action == action:
                return stage
        return None


ACTION_PREFIX = "secagg_"
"""Every secure-aggregation ClientApp action is ``secagg_<label>``."""
IDENTITY_ACTION = f"{ACTION_PREFIX}identity"
"""The query action (``query.secagg_identity``) by which the coordinator learns, once per
site and run, which roster identity speaks for a node id (before any configuration names it)."""

_LABELS: dict[Stage, str] = {
    Stage.INIT: "init",
    Stage.ADVERTISE_KEYS: "keys",
    Stage.SHARE_KEYS: "shares",
    Stage.COLLECT_MASKED: "masked",
    Stage.CONSISTENCY: "consistency",
    Stage.UNMASK: "unmask",
}

WIRE_STAGES: tuple[Stage, ...] = (
    Stage.ADVERTISE_KEYS,
    Stage.SHARE_KEYS,
    Stage.COLLECT_MASKED,
    Stage.CONSISTENCY,
    Stage.UNMASK,
)
"""The five stages that travel as messages, in protocol order."""

STAGE_LABELS: tuple[str, ...] = tuple(_LABELS[s] for s in WIRE_STAGES)
"""Their short names, in protocol order (the one list CLIs and fault plans offer)."""


TRANSITIONS: frozenset[tuple[Stage, Stage]] = frozenset(
    {
        (Stage.INIT, Stage.ADVERTISE_KEYS),
        (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS),
        (Stage.SHARE_KEYS, Stage.COLLECT_MASKED),
        (Stage.COLLECT_MASKED, Stage.CONSISTENCY),
        (Stage.CONSISTENCY, Stage.UNMASK),
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
