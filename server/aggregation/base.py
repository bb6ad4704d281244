"""What every aggregator takes and returns: the round's input, the aggregate, events as data.

An :class:`Aggregator` runs one round's exchanges with the sampled sites and
returns an :class:`Aggregate`: the (weighted) sum of the contributors'
updates, what it must be divided by, who is in it, each sampled site's
outcome, and the audit events the round produced, in the order they
happened. Aggregators never write the central record and never raise for a
failed round: a protocol abort, too few contributors or a policy denial is
returned as ``failure`` next to the events that led to it, so the round loop
books everything (server.book.RunBook, the record's one writer) and then
ends the round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from common.errors import FedsealError, ProtocolAbort
from server.aggregation.exchange import Exchange
from server.results import SiteOutcome


@dataclass(frozen=True, slots=True)
class RoundEvent:
    """One audit event a round produced: its kind and JSON-able payload."""

    kind: str
    payload: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class RoundInput:
    """What an aggregator needs to run round ``server_round`` over ``cohort``."""

    server_round: int
    cohort: list[int]
    global_vector: np.ndarray


@dataclass(frozen=True, slots=True)
class ClientLevelRelease:
    """A round's client-level DP release (DP-FedAvg), as the central-DP wrapper made it.

    ``noise_std`` is the noise on the sum (``z * sensitivity``), ``denominator``
    the fixed ``D`` the noised sum was divided by; none of it depends on how
    many sites took part.
    """

    epsilon: float
    noise_std: float
    denominator: float
    sensitivity: float
    mechanism: str = "central-gaussian"
    accountant: str | None = None  # None: the run's accountant


@dataclass(slots=True)
class Aggregate:
    """A round's aggregation before the model update.

    ``total`` is the (weighted) sum of the contributors' updates and
    ``weight`` what it must be divided by: the example count for plain
    FedAvg, the number of contributors when updates are clipped and summed
    unweighted. ``mean_update`` (set by the central-DP wrapper) replaces
    ``total / weight`` when noise was added. ``failure`` set means the round
    failed: the model must not change.
    """

    total: np.ndarray
    weight: float
    contributors: list[int]
    outcomes: list[SiteOutcome]
    events: list[RoundEvent] = field(default_factory=list)
    secagg: dict[str, int] | None = None
    failure: FedsealError | None = None
    mean_update: np.ndarray | None = None
    central: ClientLevelRelease | None = None
    # secure aggregation's exact signed integer sum and the round's encoded configuration
    # (distributed DP decodes them: server.distributed)
    unmasked: tuple[np.ndarray, bytes, int] | None = None

    def event(self, kind: str, payload: Mapping[str, Any]) -> None:
        self.events.append(RoundEvent(kind, dict(payload)))

    def mean(self) -> np.ndarray:
        """The update to add to the global model (float32)."""
        if self.mean_update is not None:
            return self.mean_update
        return (self.total / self.weight).astype(np.float32)


class Aggregator(Protocol):
    """Runs one round's exchanges with ``round_input.cohort`` and aggregates their updates."""

    def aggregate(self, round_input: RoundInput, exchange: Exchange) -> Aggregate: ...


def require_contributors(
    agg: Aggregate, minimum: int, server_round: int, sampled: int
) -> Aggregate:
    """``agg``, failed with ProtocolAbort if it has fewer than ``minimum`` contributors.

    The one place the run's ``min_sites`` rule is applied to an aggregate
    (the round loop and the central-DP wrapper, which must not add noise to
    a round that will not be released, both call it).
    """
    if agg.failure is None and len(agg.contributors) < minimum:
        agg.failure = ProtocolAbort(
            f"round {server_round}: {len(agg.contributors)} usable update(s) from {sampled} "
            f"sampled site(s); the run needs at least {minimum}. The global model is unchanged."
        )
    return agg
