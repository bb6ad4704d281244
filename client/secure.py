"""Client side of secure aggregation on Flower's Message API: the five SecAgg+ v3 stages.

Flower may run every message in a fresh process (Deployment Engine), so a
client's round state cannot live in memory between stages. It is kept in the
node's ``context.state`` only as an AEAD ciphertext (:meth:`SecAggClient.seal`)
under the site's own state key (:mod:`client.state`), bound to this node and
this round's configuration; it is deleted after the unmask stage. The server
never sees it; a stale or foreign blob fails authentication.

Order on the client: (keys) advertise, signed with the site's identity key
-> (shares) verify every advertisement against the site's pinned roster,
derive the graph, share -> (masked) train, clip to C, quantise, mask ->
(consistency) sign the survivor set -> (unmask) reveal shares once a quorum
signed that same set (protocol v3, :mod:`common.secagg.signing`). The
update is clipped here, by the client, so that the server only ever sees the
masked sum. The identity key and the roster are the site's own
(:meth:`client.agent.SiteContext.identity`, :meth:`~client.agent.SiteContext.roster`);
a site without them takes no part in a secure round.

These stages run inside the ClientApp's secure-aggregation mod
(:mod:`client.mods.secagg`); the masked stage trains and clips through the
inner train path, ``train`` (the same steps as a plain round,
:mod:`client.steps`), and masks what comes back. Whether the site takes part
is decided by :func:`~client.steps.decide_participation`, at the keys stage
and at the masked stage of a later prepared round, each time after the
stage's checks and before any secret is used.

One setup (keys + shares) may prepare several consecutive rounds over one
cohort (see :class:`server.aggregation.secure.SecAggAggregator`): the node then holds one
sealed state per prepared round (``config.<r>``/``sealed.<r>`` in its
record), each opened only by that round's masked and unmask stages and
erased after its unmask stage, its refusal, or the next setup.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from client.agent import SiteContext
from client.site_policy import SiteSetup
from client.state import state_key
from client.steps import (
    decide_participation,
    is_refusal,
    refusal,
    reply_update,
    with_decisions,
)
from common.config import MAX_SECAGG_SETUP_ROUNDS
from common.data import PRIVATE_SCALING_REFUSED
from common.errors import ConfigurationError, DataError, ProtocolError
from common.records import (
    KEY_METRICS,
    KEY_SECAGG_CONFIG,
    KEY_SECAGG_MSG,
    MAX_SECAGG_CONFIG_BYTES,
    bundle_to_record,
    bytes_to_record,
    max_secagg_request_bytes,
    record_to_bundle,
    record_to_bytes,
)
from common.rng import secure_generator
from common.secagg import SecAggClient, SecAggConfig
from common.secagg.messages import (
    AdvertiseKeysRequest,
    CollectMaskedRequest,
    ConsistencyRequest,
    ShareKeysRequest,
    UnmaskRequest,
    peek_round,
)
from common.secagg.signing import identity_message, public_bytes, sign

log = logging.getLogger("flwr.fedseal.site")

STATE_RECORD = "fedseal.secagg"


def _state(context: Context) -> ConfigRecord:
    record = context.state.config_records.get(STATE_RECORD)
    if record is None:
        raise ProtocolError("no secure-aggregation state on this site")
    return record


def _rounds(record: ConfigRecord) -> list[int]:
    rounds = record.get("rounds")
    if not isinstance(rounds, list) or not all(
        isinstance(r, int) and not isinstance(r, bool) for r in rounds
    ):
        raise ProtocolError("secure-aggregation state is malformed")
    return list(rounds)


def _load(context: Context, server_round: int) -> tuple[SecAggConfig, bytes]:
    record = context.state.config_records.get(STATE_RECORD)
    if record is None or server_round not in _rounds(record):
        raise ProtocolError(f"no secure-aggregation state for round {server_round} on this site")
    config_bytes, sealed = (
        record.get(f"config.{server_round}"),
        record.get(f"sealed.{server_round}"),
    )
    if not isinstance(config_bytes, bytes) or not isinstance(sealed, bytes):
        raise ProtocolError("secure-aggregation state is malformed")
    return SecAggConfig.decode(config_bytes), sealed


def _save(
    context: Context, config: SecAggConfig, client: SecAggClient, key: bytes, *, first: int = 0
) -> None:
    """Seal one round's client state into the node's record (added to the rounds it holds).

    ``first`` (the setup's first round) is stored when the record is created.
    """
    record = context.state.config_records.get(STATE_RECORD)
    if record is None:
        record = ConfigRecord({"rounds": [], "first": first})
        context.state[STATE_RECORD] = record
    rounds = _rounds(record)
    if config.round not in rounds:
        record["rounds"] = sorted([*rounds, config.round])
    record[f"config.{config.round}"] = config.encode()
    record[f"sealed.{config.round}"] = client.seal(key)


def _drop(context: Context, server_round: int) -> None:
    """Forget one round's secrets; the record goes when no round is left."""
    record = context.state.config_records.get(STATE_RECORD)
    if record is None:
        return
    rounds = [r for r in _rounds(record) if r != server_round]
    for name in (f"config.{server_round}", f"sealed.{server_round}"):
        if name in record:
            del record[name]
    if rounds:
        record["rounds"] = rounds
    else:
        del context.state[STATE_RECORD]


def _clear(context: Context) -> None:
    if STATE_RECORD in context.state.config_records:
        del context.state[STATE_RECORD]


def _reply(
    msg: Message,
    payload: bytes | Sequence[bytes | memoryview],
    metrics: MetricRecord | None = None,
) -> Message:
    content = RecordDict({KEY_SECAGG_MSG: bytes_to_record(payload)})
    if metrics is not None:
        content[KEY_METRICS] = metrics
    return Message(content=content, reply_to=msg)


def _bundle_reply(msg: Message, payloads: list[bytes]) -> Message:
    return Message(content=RecordDict({KEY_SECAGG_MSG: bundle_to_record(payloads)}), reply_to=msg)


def _federation(site: SiteContext) -> tuple[Ed25519PrivateKey, frozenset[bytes], int]:
    """This site's identity key, its roster's identity keys and its floor on verified members.

    The floor is the site policy's ``rounds.min_cohort_size`` (at least 2),
    now counted over members whose signed advertisements this site verified,
    not over the cohort the coordinator claims.

    Raises
    ------
    ConfigurationError
        The site has no identity key or no verified roster.
    """
    policy = site.policy()
    floor = max(2, policy.rounds.min_cohort_size) if policy is not None else 2
    return site.identity(), site.roster().identity_keys(), floor


def _open(
    site: SiteContext, context: Context, config: SecAggConfig, sealed: bytes, key: bytes
) -> SecAggClient:
    identity, members, floor = _federation(site)
    return SecAggClient.open(
        sealed, key, context.node_id, config, identity, members, min_verified=floor
    )


def _participation(
    site: SiteContext, config: SecAggConfig
) -> tuple[str | None, ConfigRecord | None]:
    """Whether the site takes part in the round ``config`` describes (keys and masked stages).

    The site's policy judges the coordinator-chosen cohort size, threshold and
    neighbour degree of this very configuration before any key exists.
    """
    return decide_participation(site, config.size, config.threshold, config.neighbours)


def handle_identity(
    msg: Message, context: Context, site_root: SiteSetup | Path | None = None
) -> Message:
    """The coordinator's admission query, once per site and run, before any cohort is drawn.

    (:mod:`server.aggregation.admission`.) First the site's own check that its data fits
    the run's task (:func:`data_misfit`): if not, a refusal in one fixed
    category, the details logged here only. Then, under secure aggregation,
    this site's identity key and its signature over (run, node id), so the
    coordinator can bind the node to the identity in the next configuration;
    a plain run gets an empty acknowledgement. Nothing secret leaves the
    site; the site trusts the binding only after checking the configuration
    itself.
    """
    site = SiteContext.of(msg, context, site_root)
    if (reason := data_misfit(site)) is not None:
        return refusal(msg, reason)
    if not site.cfg.secagg:
        return Message(content=RecordDict(), reply_to=msg)
    identity, members, _ = _federation(site)
    own = public_bytes(identity)
    if own not in members:
        raise ConfigurationError("this site's identity is not in the roster it pins")
    signature = sign(identity, identity_message(int(site.run_id, 16), context.node_id))
    return _reply(msg, own + signature)


def data_misfit(site: SiteContext) -> str | None:
    """Why this site's data cannot serve the run's task (a fixed category), or None if it can.

    The full reason (file, counts, line numbers) goes to this site's log
    only: the category is all the coordinator learns, one bit about the
    site's file (:mod:`server.aggregation.admission` says why that bit is acceptable).
    """
    if site.cfg.workload == "echo":
        return None  # the benchmarks' echo workload reads no data
    try:
        site.data()
    except (DataError, ConfigurationError) as exc:
        text = str(exc)
        log.warning("this site's data does not fit the run's task: %s", text)
        if "features per example" in text:
            return "data: the site's feature count differs from the run's task"
        if "labels must lie" in text:
            return "data: the site's labels fall outside the run's task's classes"
        if text == PRIVATE_SCALING_REFUSED:
            return "data: the site declares no public feature bounds for record-level DP"
        return "data: the site's data file is unusable for this run (see the site's log)"
    return None


def handle_keys(msg: Message, context: Context, site_root: SiteSetup | Path | None) -> Message:
    """Setup, stage 1: check every prepared round's public configuration, make keys, advertise.

    One message may prepare several consecutive rounds (one configuration and
    one request each, same cohort); each round gets its own fresh key pairs
    and self-mask seed, sealed in this node's state until that round is done.
    """
    site = SiteContext.of(msg, context, site_root)
    cfg, server_round = site.cfg, site.server_round
    raw_configs = record_to_bundle(
        msg.content[KEY_SECAGG_CONFIG], MAX_SECAGG_SETUP_ROUNDS, MAX_SECAGG_CONFIG_BYTES
    )
    configs = [SecAggConfig.decode(raw) for raw in raw_configs]
    expected = site.task.parameter_count()
    if cfg.distributed_dp:  # the rotation pads the update to a power of two
        from common.dp.skellam import padded_length

        expected = padded_length(expected)
    for i, config in enumerate(configs):
        if config.round != server_round + i:
            raise ProtocolError(
                f"secure-aggregation config is for round {config.round}, not {server_round + i}"
            )
        if i and (config.cohort != configs[0].cohort or config.run_id != configs[0].run_id):
            raise ProtocolError("prepared rounds must share one run and one cohort")
        if config.value_bound != cfg.clip_norm:
            raise ProtocolError("secure-aggregation value bound differs from the run's clip norm")
        if cfg.distributed_dp and config.bits != cfg.secagg_bits:
            raise ProtocolError("secure-aggregation ring bits differ from the run's secagg_bits")
        if config.vector_length != expected:
            raise ProtocolError(
                f"secure-aggregation vector length {config.vector_length} != model size {expected}"
            )
    _clear(context)  # a new setup discards whatever an earlier one left
    first = configs[0]
    reason, decisions = _participation(site, first)
    if reason is None and cfg.distributed_dp:
        reason = distributed_noise_refusal(site)
    if reason is not None:
        return refusal(msg, reason, decisions)
    requests = record_to_bundle(
        msg.content[KEY_SECAGG_MSG], len(configs), max_secagg_request_bytes(first.size)
    )
    if len(requests) != len(configs):
        raise ProtocolError(f"{len(requests)} key requests for {len(configs)} rounds")
    key = state_key(site.directory)
    identity, members, floor = _federation(site)
    replies = []
    for raw, config in zip(requests, configs, strict=True):
        client = SecAggClient(context.node_id, config, identity, members, min_verified=floor)
        replies.append(client.advertise_keys(AdvertiseKeysRequest.decode(raw, config)).encode())
        _save(context, config, client, key, first=server_round)
    return with_decisions(_bundle_reply(msg, replies), decisions)


def _resume(site: SiteContext, context: Context) -> tuple[SecAggConfig, SecAggClient, bytes]:
    """Open this round's sealed state; a prepared round that has already passed (the
    server moved on without this node) is erased first, its secrets never used."""
    record = context.state.config_records.get(STATE_RECORD)
    if record is not None:
        for past in [r for r in _rounds(record) if r < site.server_round]:
            _drop(context, past)
    config, sealed = _load(context, site.server_round)
    key = state_key(site.directory)
    return config, _open(site, context, config, sealed, key), key


def handle_shares(msg: Message, context: Context, site_root: SiteSetup | Path | None) -> Message:
    """Setup, stage 2: Shamir-share each prepared round's mask key and self-mask seed.

    The bundle names the rounds the server goes on with (each message's
    header carries its round); a prepared round it leaves out is forgotten.
    """
    site = SiteContext.of(msg, context, site_root)
    held = _rounds(_state(context))
    if not held:
        raise ProtocolError("no prepared secure-aggregation round on this site")
    cohort_size = _load(context, held[0])[0].size  # every prepared round has this cohort
    requests = record_to_bundle(
        msg.content[KEY_SECAGG_MSG], len(held), max_secagg_request_bytes(cohort_size)
    )
    key = state_key(site.directory)
    replies: list[bytes] = []
    kept: list[int] = []
    for raw in requests:
        server_round = peek_round(raw)
        if server_round not in held or server_round in kept:
            raise ProtocolError(f"share request for round {server_round}, which is not prepared")
        config, sealed = _load(context, server_round)
        client = _open(site, context, config, sealed, key)
        replies.append(client.share_keys(ShareKeysRequest.decode(raw, config)).encode())
        _save(context, config, client, key)
        kept.append(server_round)
    for server_round in held:
        if server_round not in kept:
            _drop(context, server_round)
    return _bundle_reply(msg, replies)


def handle_masked(
    msg: Message,
    context: Context,
    site_root: SiteSetup | Path | None,
    train: ClientAppCallable,
) -> Message:
    """Stage 3: train and clip the update to C (the inner train path ``train``), quantise, mask.

    In a round after its setup's first, the site decides here whether it
    takes part (its policy and privacy budget now); a refusal drops it from
    this round only, like a dropout, and its secrets for the round are erased.
    So does a refusal from the train path itself (the ledger refusing the
    round's privacy cost when it is reserved).
    """
    site = SiteContext.of(msg, context, site_root)
    server_round = site.server_round
    config, client, key = _resume(site, context)
    request = CollectMaskedRequest.decode(
        record_to_bytes(msg.content[KEY_SECAGG_MSG], max_secagg_request_bytes(config.size)), config
    )
    decisions = None
    if _state(context).get("first") != server_round:
        reason, decisions = _participation(site, config)
        if reason is not None:
            _drop(context, server_round)
            return refusal(msg, reason, decisions)
    from client.release import release_once  # its ledger (SQLAlchemy): the masked stage only

    # one release per round (client.release): a repeat is refused, never trained again
    trained = release_once(site, msg, lambda: train(msg, context), setup=config.digest())
    if is_refusal(trained):
        _drop(context, server_round)
        return with_decisions(trained, decisions)
    metrics = trained.content.metric_records[KEY_METRICS]
    if "update-norm" not in metrics:  # only a clipped update may be masked: |x| <= C
        raise ConfigurationError("the train path did not clip the update to be masked")
    if site.cfg.distributed_dp:
        reply = client.collect_masked(
            request,
            _distributed_encoding(site, config, reply_update(trained)),
            secure_generator(),
            encoded=True,
        )
    else:
        reply = client.collect_masked(request, reply_update(trained), secure_generator())
    _save(context, config, client, key)
    # The train path's metrics go with the masked input as far as the disclosure mod
    # (client.mods.disclosure): the norm and the example count never leave this site.
    return with_decisions(_reply(msg, reply.encode_parts(), metrics), decisions)


def distributed_noise_refusal(site: SiteContext) -> str | None:
    """Why this site will not add noise for the run's distributed DP, or None.

    The run settings come from the coordinator, so the site holds them to
    its own policy's floor on the noise multiplier
    (``rounds.min_distributed_noise_multiplier``) and to their own claim (the
    noise must give the ``client_epsilon`` the settings state,
    :func:`common.dp.distributed.check_run_noise`), at the keys stage, before
    any key exists.
    """
    from common.dp.distributed import check_run_noise

    policy = site.policy()
    floor = policy.rounds.min_distributed_noise_multiplier if policy is not None else 0.0
    z = site.cfg.noise_multiplier
    if z < floor:
        return (
            f"policy: distributed DP noise multiplier {z:g} is below this site's floor "
            f"{floor:g} (rounds.min_distributed_noise_multiplier)"
        )
    try:
        check_run_noise(site.cfg, site.task.parameter_count())
    except ConfigurationError as exc:
        return f"policy: {exc}"
    return None


def _distributed_encoding(
    site: SiteContext, config: SecAggConfig, update: np.ndarray
) -> np.ndarray:
    """Distributed DP (:mod:`common.dp.skellam`): this site's noised ring vector for the round.

    The noise parameters come from the run settings this site holds
    (:func:`common.dp.distributed.check_run_noise`, which also refuses a noise
    multiplier below the run's own client-level epsilon target) and the
    round's threshold from the configuration this site checked; the rotation
    from that configuration's public bytes. Nothing in the coordinator's
    request sets the noise.
    """
    from common.dp.distributed import check_run_noise
    from common.dp.skellam import encode_update, rotation_key

    params = check_run_noise(site.cfg, site.task.parameter_count())
    return encode_update(
        np.asarray(update),
        params,
        rotation_key(config.encode()),
        config.threshold,
        secure_generator(),
    )


def handle_consistency(
    msg: Message, context: Context, site_root: SiteSetup | Path | None
) -> Message:
    """Stage 4: sign the survivor set the coordinator says it summed (once per round)."""
    site = SiteContext.of(msg, context, site_root)
    config, client, key = _resume(site, context)
    request = ConsistencyRequest.decode(
        record_to_bytes(msg.content[KEY_SECAGG_MSG], max_secagg_request_bytes(config.size)), config
    )
    reply = client.consistency(request)  # a refusal raises: the node state stays as it was
    _save(context, config, client, key)
    return _reply(msg, reply.encode())


def handle_unmask(msg: Message, context: Context, site_root: SiteSetup | Path | None) -> Message:
    """Stage 5: with a quorum over the signed survivor set, reveal one share per neighbour:
    the self-mask share (survivor) or the mask-key share (dropped)."""
    site = SiteContext.of(msg, context, site_root)
    config, client, _ = _resume(site, context)
    request = UnmaskRequest.decode(
        record_to_bytes(msg.content[KEY_SECAGG_MSG], max_secagg_request_bytes(config.size)), config
    )
    try:
        reply = client.unmask(request)
    finally:
        _drop(context, site.server_round)  # the round's secrets are gone whatever happens
    return _reply(msg, reply.encode())
