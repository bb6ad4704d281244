"""A pure in-memory driver for one SecAgg+ round, with injected dropouts.

Guarantee: :func:`run_round` runs the real client and server state machines
and (with ``wire=True``) sends every message through its ``encode``/``decode``
pair, exactly as a transport would. Client ``u`` (the ``i``-th cohort node
in ascending order) draws its rounding coins from ``rng.spawn(n)[i]``, so a
caller can reproduce every quantised input. No network, no Flower.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from common.errors import DataError, ProtocolError
from common.secagg.client import SecAggClient
from common.secagg.messages import (
    AdvertiseKeysReply,
    AdvertiseKeysRequest,
    CollectMaskedReply,
    CollectMaskedRequest,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
)
from common.secagg.params import SecAggConfig
from common.secagg.server import AggregateResult, SecAggServer
from common.secagg.stages import Stage

_PROTOCOL_STAGES = (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.COLLECT_MASKED, Stage.UNMASK)


def client_generators(
    config: SecAggConfig, rng: np.random.Generator
) -> dict[int, np.random.Generator]:
    """The rounding generator :func:`run_round` gives each cohort node."""
    return dict(zip(config.cohort, rng.spawn(config.size), strict=True))


def _wire(message: Any, config: SecAggConfig, enabled: bool) -> Any:
    return type(message).decode(message.encode(), config) if enabled else message


def run_round(
    inputs: Mapping[int, np.ndarray],
    config: SecAggConfig,
    drop: Mapping[Stage, set[int]],
    rng: np.random.Generator,
    *,
    wire: bool = True,
) -> AggregateResult:
    """Run one secure-aggregation round in memory.

    Parameters
    ----------
    inputs : Mapping[int, numpy.ndarray]
        One input per cohort node (exactly the cohort).
    config : SecAggConfig
        The round's configuration.
    drop : Mapping[Stage, set[int]]
        Nodes that do not answer the request of that stage (nor any later one).
    rng : numpy.random.Generator
        Parent of the clients' rounding generators (see :func:`client_generators`).
    wire : bool
        Encode and decode every message (default) or pass objects directly.

    Raises
    ------
    DataError
        If ``inputs`` does not cover exactly the cohort.
    ProtocolAbort
        If too few clients survive.
    """
    if set(inputs) != set(config.cohort):
        raise DataError("inputs must hold exactly one vector per cohort node")
    for stage, nodes in drop.items():
        if stage not in _PROTOCOL_STAGES or not set(nodes) <= set(config.cohort):
            raise ProtocolError(f"invalid dropout injection at {stage!r}")
    generators = client_generators(config, rng)
    clients = {u: SecAggClient(u, config) for u in config.cohort}
    server = SecAggServer(config)
    gone: set[int] = set()

    def answer(
        stage: Stage, requests: Mapping[int, Any], handle: Callable[[int, Any], Any]
    ) -> list[Any]:
        gone.update(drop.get(stage, set()))
        replies = []
        for u, request in requests.items():
            if u not in gone:
                reply = handle(u, _wire(request, config, wire))
                replies.append(_wire(reply, config, wire))
        return replies

    advertise: Mapping[int, AdvertiseKeysRequest] = server.start()
    keys: list[AdvertiseKeysReply] = answer(
        Stage.ADVERTISE_KEYS, advertise, lambda u, r: clients[u].advertise_keys(r)
    )
    share: Mapping[int, ShareKeysRequest] = server.receive_advertise_keys(keys)
    shares: list[ShareKeysReply] = answer(
        Stage.SHARE_KEYS, share, lambda u, r: clients[u].share_keys(r)
    )
    collect: Mapping[int, CollectMaskedRequest] = server.receive_share_keys(shares)
    masked: list[CollectMaskedReply] = answer(
        Stage.COLLECT_MASKED,
        collect,
        lambda u, r: clients[u].collect_masked(r, inputs[u], generators[u]),
    )
    unmask: Mapping[int, UnmaskRequest] = server.receive_masked(masked)
    revealed: list[UnmaskReply] = answer(Stage.UNMASK, unmask, lambda u, r: clients[u].unmask(r))
    return server.receive_unmask(revealed)
