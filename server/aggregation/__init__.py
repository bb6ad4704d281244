"""Aggregators: one round's exchanges with the sampled sites, and the sum they yield.

:mod:`.base` (the ``Aggregator`` protocol, ``Aggregate``, events as data),
:mod:`.exchange` (the transport seam over Flower's Grid), :mod:`.replies`
(reply checks shared by every aggregator), :mod:`.plain` (FedAvg) and
:mod:`.secure` (SecAgg+, one method per protocol stage).
"""

from server.aggregation.base import (
    Aggregate,
    Aggregator,
    ClientLevelRelease,
    RoundEvent,
    RoundInput,
    require_contributors,
)
from server.aggregation.exchange import Exchange, GridExchange
from server.aggregation.plain import PlainAggregator
from server.aggregation.secure import PreparedRound, SecAggAggregator

__all__ = [
    "Aggregate",
    "Aggregator",
    "ClientLevelRelease",
    "Exchange",
    "GridExchange",
    "PlainAggregator",
    "PreparedRound",
    "RoundEvent",
    "RoundInput",
    "SecAggAggregator",
    "require_contributors",
]
