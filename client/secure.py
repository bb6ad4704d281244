"""Client side of secure aggregation on Flower's Message API: the four SecAgg+ stages.

Flower may run every message in a fresh process (Deployment Engine), so a
client's round state cannot live in memory between stages. It is kept in the
node's ``context.state`` only as an AEAD ciphertext (:meth:`SecAggClient.seal`)
under the site's own state key (:mod:`client.state`), bound to this node and
this round's configuration; it is deleted after the unmask stage. The server
never sees it; a stale or foreign blob fails authentication.

Order on the client: (keys) advertise -> (shares) share -> (masked) train,
clip to C, quantise, mask -> (unmask) reveal shares. The update is clipped
here, by the client, so that the server only ever sees the masked sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.agent import SiteContext, compute_update, decide_participation, refusal
from client.site_policy import SiteSetup
from client.state import state_key
from common.dp import clip_l2
from common.errors import ProtocolError
from common.records import (
    KEY_ARRAYS,
    KEY_METRICS,
    KEY_SECAGG_CONFIG,
    KEY_SECAGG_MSG,
    KEY_SITE_DECISIONS,
    MAX_SECAGG_CONFIG_BYTES,
    bytes_to_record,
    max_secagg_request_bytes,
    record_to_bytes,
)
from common.rng import secure_generator
from common.secagg import SecAggClient, SecAggConfig
from common.secagg.messages import (
    AdvertiseKeysRequest,
    CollectMaskedRequest,
    ShareKeysRequest,
    UnmaskRequest,
)

STATE_RECORD = "fedseal.secagg"


def _load(context: Context, server_round: int) -> tuple[SecAggConfig, bytes]:
    record = context.state.config_records.get(STATE_RECORD)
    if record is None or record.get("round") != server_round:
        raise ProtocolError(f"no secure-aggregation state for round {server_round} on this site")
    config_bytes, sealed = record.get("config"), record.get("sealed")
    if not isinstance(config_bytes, bytes) or not isinstance(sealed, bytes):
        raise ProtocolError("secure-aggregation state is malformed")
    return SecAggConfig.decode(config_bytes), sealed


def _save(
    context: Context, server_round: int, config: SecAggConfig, client: SecAggClient, key: bytes
) -> None:
    context.state[STATE_RECORD] = ConfigRecord(
        {"round": server_round, "config": config.encode(), "sealed": client.seal(key)}
    )


def _clear(context: Context) -> None:
    if STATE_RECORD in context.state.config_records:
        del context.state[STATE_RECORD]


def _reply(
    msg: Message,
    payload: bytes | Sequence[bytes | memoryview],
    metrics: dict[str, float | int] | None = None,
) -> Message:
    content = RecordDict({KEY_SECAGG_MSG: bytes_to_record(payload)})
    if metrics is not None:
        content[KEY_METRICS] = MetricRecord(metrics)
    return Message(content=content, reply_to=msg)


def handle_keys(msg: Message, context: Context, site_root: SiteSetup | Path | None) -> Message:
    """Stage 1: check the round's public configuration, make keys, advertise them."""
    site = SiteContext.of(msg, context, site_root)
    cfg, server_round = site.cfg, site.server_round
    config = SecAggConfig.decode(
        record_to_bytes(msg.content[KEY_SECAGG_CONFIG], MAX_SECAGG_CONFIG_BYTES)
    )
    if config.round != server_round:
        raise ProtocolError(
            f"secure-aggregation config is for round {config.round}, not {server_round}"
        )
    if config.value_bound != cfg.clip_norm:
        raise ProtocolError("secure-aggregation value bound differs from the run's clip norm")
    model_size = site.task.build(seed=cfg.seed)
    expected = sum(p.numel() for p in model_size.parameters())
    if config.vector_length != expected:
        raise ProtocolError(
            f"secure-aggregation vector length {config.vector_length} != model size {expected}"
        )
    _clear(context)  # a new round discards whatever an aborted one left
    reason, decisions = decide_participation(site, config.size, config.threshold)
    if reason is not None:
        return refusal(msg, reason, decisions)
    request = AdvertiseKeysRequest.decode(
        record_to_bytes(msg.content[KEY_SECAGG_MSG], max_secagg_request_bytes(config.size)), config
    )
    client = SecAggClient(context.node_id, config)
    reply = client.advertise_keys(request)
    _save(context, server_round, config, client, state_key(site.directory))
    answer = _reply(msg, reply.encode())
    if decisions is not None:
        answer.content[KEY_SITE_DECISIONS] = decisions
    return answer


def _resume(
    msg: Message, context: Context, site_root: SiteSetup | Path | None
) -> tuple[SiteContext, SecAggConfig, SecAggClient, bytes]:
    site = SiteContext.of(msg, context, site_root)
    config, sealed = _load(context, site.server_round)
    key = state_key(site.directory)
    client = SecAggClient.open(sealed, key, context.node_id, config)
    return site, config, client, key


def handle_shares(msg: Message, context: Context, site_root: SiteSetup | Path | None) -> Message:
    """Stage 2: Shamir-share the mask key and self-mask seed among the neighbours."""
    site, config, client, key = _resume(msg, context, site_root)
    request = ShareKeysRequest.decode(
        record_to_bytes(msg.content[KEY_SECAGG_MSG], max_secagg_request_bytes(config.size)), config
    )
    reply = client.share_keys(request)
    _save(context, site.server_round, config, client, key)
    return _reply(msg, reply.encode())


def handle_masked(msg: Message, context: Context, site_root: SiteSetup | Path | None) -> Message:
    """Stage 3: train, clip the update to C, quantise and mask it."""
    site, config, client, key = _resume(msg, context, site_root)
    request = CollectMaskedRequest.decode(
        record_to_bytes(msg.content[KEY_SECAGG_MSG], max_secagg_request_bytes(config.size)), config
    )
    local = compute_update(site, msg.content[KEY_ARRAYS])
    clipped, norm = clip_l2(local.update, site.cfg.clip_norm)
    reply = client.collect_masked(request, clipped, secure_generator())
    _save(context, site.server_round, config, client, key)
    metrics = {"num-examples": local.num_examples, "update-norm": norm, **local.metrics}
    return _reply(msg, reply.encode_parts(), metrics)


def handle_unmask(msg: Message, context: Context, site_root: SiteSetup | Path | None) -> Message:
    """Stage 4: reveal, per neighbour, the self-mask share (survivor) or key share (dropped)."""
    _, config, client, _ = _resume(msg, context, site_root)
    request = UnmaskRequest.decode(
        record_to_bytes(msg.content[KEY_SECAGG_MSG], max_secagg_request_bytes(config.size)), config
    )
    try:
        reply = client.unmask(request)
    finally:
        _clear(context)  # the round's secrets are gone whatever happens
    return _reply(msg, reply.encode())
