"""A pure in-memory driver for one SecAgg+ round, with injected dropouts.

Guarantee: :func:`run_round` runs the real client and server state machines
and (with ``wire=True``) sends every message through its ``encode``/``decode``
pair, exactly as a transport would. Client ``u`` (the ``i``-th cohort node
in ascending order) draws its rounding coins from ``rng.spawn(n)[i]``, so a
caller can reproduce every quantised input. No network, no Flower.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.errors import ConfigurationError, DataError, ProtocolError
from common.secagg.client import SecAggClient
from common.secagg.messages import (
    AdvertiseKeysReply,
    AdvertiseKeysRequest,
    CollectMaskedReply,
    CollectMaskedRequest,
    ConsistencyReply,
    ConsistencyRequest,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
)
from common.secagg.params import SecAggConfig, make_config
from common.secagg.server import AggregateResult, SecAggServer
from common.secagg.signing import public_bytes
from common.secagg.stages import WIRE_STAGES, Stage

_PROTOCOL_STAGES = WIRE_STAGES


def make_identities(cohort: Sequence[int]) -> dict[int, Ed25519PrivateKey]:
    """A fresh Ed25519 identity per node (the roster of an in-memory round)."""
    return {u: Ed25519PrivateKey.generate() for u in cohort}


def members_of(identities: Mapping[int, Ed25519PrivateKey]) -> frozenset[bytes]:
    """The roster's identity public keys."""
    return frozenset(public_bytes(key) for key in identities.values())


def federated_config(
    **fields: Any,
) -> tuple[SecAggConfig, dict[int, Ed25519PrivateKey]]:
    """A configuration (``make_config(**fields)``, without ``identities``) binding a fresh
    identity to each cohort node, and those identities (an in-memory round's roster)."""
    if "cohort" not in fields:
        raise ConfigurationError("federated_config needs the cohort")
    keys = make_identities(list(fields["cohort"]))
    config = make_config(identities=[public_bytes(keys[u]) for u in fields["cohort"]], **fields)
    return config, keys


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
    identities: Mapping[int, Ed25519PrivateKey],
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
    identities : Mapping[int, Ed25519PrivateKey]
        Each node's identity key (their public keys form the roster both
        sides check; :func:`federated_config` makes keys and a configuration
        that binds them). Keys other than the ones ``config`` binds run the
        sites into their own refusal (ProtocolError), as in a real round.

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
    if set(identities) != set(config.cohort):
        raise DataError("identities must hold exactly one key per cohort node")
    generators = client_generators(config, rng)
    members = members_of(identities)
    clients = {u: SecAggClient(u, config, identities[u], members) for u in config.cohort}
    server = SecAggServer(config, members)
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
    check: Mapping[int, ConsistencyRequest] = server.receive_masked(masked)
    signed: list[ConsistencyReply] = answer(
        Stage.CONSISTENCY, check, lambda u, r: clients[u].consistency(r)
    )
    unmask: Mapping[int, UnmaskRequest] = server.receive_consistency(signed)
    revealed: list[UnmaskReply] = answer(Stage.UNMASK, unmask, lambda u, r: clients[u].unmask(r))
    return server.receive_unmask(revealed)
