"""The client side of a SecAgg+ round as a pure state machine (protocol v3, authenticated).

Guarantee (a *malicious* server colluding with at most ``t - 1`` clients;
Bonawitz et al. CCS 2017 §4 actively secure variant, over Bell et al.'s
CCS 2020 sparse graph; the v3 reasoning is in :mod:`common.secagg.signing`):
what this client sends reveals nothing about its input beyond what the sum
of the survivors' inputs reveals, because its masked vector is
``q + PRG(b) + sum_v +-PRG(s_uv)`` with a self-mask seed ``b`` and pairwise
X25519 keys agreed only with neighbours whose keys were signed by a roster
identity, and it reveals, per neighbour, *either* the share of that
neighbour's seed ``b`` (neighbour survived) *or* of its mask key (neighbour
dropped), never both, and only once, according to a survivor set that a
quorum of the cohort signed. Besides its two public keys and identity
signature it publishes only ``H(label, run, round, node, b)``
(:mod:`common.crypto.commitment`; hiding for a uniform 32-byte ``b`` with
SHA-256 as a random oracle), which lets the server reject a wrongly
reconstructed ``b``.

Fail-closed checks before any secret is used: every request must be of the
type the stage table allows next (:func:`~common.secagg.stages.check_transition`),
for this run, round and node; at SHARE_KEYS every advertisement must be
signed by a distinct roster member over this very configuration, this
client's own must be the one it sent, and at least ``min_verified`` members
must be present; the graph seed is recomputed from them, and keys and shares
come only from neighbours in that graph; the consistency request's survivor
set must include this client and only verified members; at UNMASK the
survivor set must be the one this client signed, with valid signatures of a
quorum of verified members over it. After any rejected request the client
refuses every further request of the round (:class:`~common.errors.ProtocolAbort`).

Secrets live in this object's memory for one round; they leave it only as
Shamir shares encrypted for a neighbour, or sealed under a caller-held key
(:meth:`SecAggClient.seal`). The client's own keys and seed are erased from
the state as soon as the masked input is computed. The identity key is the
caller's (it is never sealed here).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.crypto import aead
from common.crypto.commitment import commit_seed
from common.crypto.kdf import (
    LABEL_CLIENT_STATE,
    LABEL_PAIRWISE_MASK,
    LABEL_SELF_MASK,
    LABEL_SHARE_ENCRYPTION,
    derive_node_key,
    derive_pair_key,
)
from common.crypto.keys import (
    KEY_SIZE,
    KeyPair,
    agree,
    generate_key_pair,
    key_pair_from_private_bytes,
    private_bytes,
)
from common.crypto.prg import SEED_SIZE, RingArray, add_masks_inplace, expand_seed
from common.crypto.shamir import VALUE_SIZE, decode_value, encode_value, split_secret
from common.errors import (
    ConfigurationError,
    DataError,
    FedsealError,
    IntegrityError,
    ProtocolAbort,
    ProtocolError,
)
from common.rng import RandomSource, secure_bytes
from common.secagg.graph import neighbour_graph
from common.secagg.messages import (
    AdvertiseKeysReply,
    AdvertiseKeysRequest,
    Ciphertext,
    CollectMaskedReply,
    CollectMaskedRequest,
    ConsistencyReply,
    ConsistencyRequest,
    PeerKeys,
    RevealedShare,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
)
from common.secagg.params import SecAggConfig
from common.secagg.quantize import quantize
from common.secagg.signing import (
    IDENTITY_KEY_SIZE,
    advertisement_message,
    check_bound_identities,
    consistency_message,
    graph_seed,
    public_bytes,
    quorum,
    sign,
    verifies,
    verify_advertisements,
)
from common.secagg.stages import Stage, check_transition

_Request = TypeVar(
    "_Request",
    AdvertiseKeysRequest,
    ShareKeysRequest,
    CollectMaskedRequest,
    ConsistencyRequest,
    UnmaskRequest,
)
_Reply = TypeVar("_Reply", ShareKeysReply, CollectMaskedReply, ConsistencyReply, UnmaskReply, None)
_STATE_HEAD = struct.Struct(">BBBB")
_STATE_MEMBER = struct.Struct(f">Q{IDENTITY_KEY_SIZE}s")
_STATE_PEER = struct.Struct(f">Q{KEY_SIZE}s{KEY_SIZE}s")
_STATE_HELD = struct.Struct(f">Q{VALUE_SIZE}s{VALUE_SIZE}s")
_U32 = struct.Struct(">I")


def share_encryption_key(
    private: KeyPair, peer_public: bytes, config: SecAggConfig, node_a: int, node_b: int
) -> bytes:
    """AEAD key for share messages between two nodes: HKDF(X25519, share-encryption label)."""
    return derive_pair_key(
        agree(private.private_key, peer_public),
        LABEL_SHARE_ENCRYPTION,
        run_id=config.run_id,
        round=config.round,
        node_a=node_a,
        node_b=node_b,
    )


def pairwise_mask_seed(
    private: KeyPair, peer_public: bytes, config: SecAggConfig, node_a: int, node_b: int
) -> bytes:
    """The PRG seed of the mask two neighbours share: HKDF(X25519, pairwise label)."""
    return derive_pair_key(
        agree(private.private_key, peer_public),
        LABEL_PAIRWISE_MASK,
        run_id=config.run_id,
        round=config.round,
        node_a=node_a,
        node_b=node_b,
    )


def pairwise_mask(
    private: KeyPair, peer_public: bytes, config: SecAggConfig, node_a: int, node_b: int
) -> RingArray:
    """The mask two neighbours share: PRG(HKDF(X25519, pairwise label)) in Z_{2^b}^d."""
    seed = pairwise_mask_seed(private, peer_public, config, node_a, node_b)
    return expand_seed(seed, config.vector_length, config.bits)


def self_mask_seed(seed: bytes, config: SecAggConfig, node_id: int) -> bytes:
    """The PRG seed of a node's own mask: HKDF(b, self-mask label, run, round, node)."""
    return derive_node_key(
        seed, LABEL_SELF_MASK, run_id=config.run_id, round=config.round, node_id=node_id
    )


def self_mask(seed: bytes, config: SecAggConfig, node_id: int) -> RingArray:
    """A node's own mask: PRG(HKDF(b, self-mask label, run, round, node)) in Z_{2^b}^d."""
    return expand_seed(self_mask_seed(seed, config, node_id), config.vector_length, config.bits)


def share_associated_data(config: SecAggConfig, sender: int, receiver: int) -> bytes:
    """AEAD associated data of a share message from ``sender`` to ``receiver``."""
    return aead.associated_data(
        version=config.version,
        run_id=config.run_id,
        round=config.round,
        sender=sender,
        receiver=receiver,
        stage=int(Stage.SHARE_KEYS),
    )


class SecAggClient:
    """One client's state for one secure-aggregation round.

    Parameters
    ----------
    node_id : int
        This client's node id; must be in ``config.cohort``.
    config : SecAggConfig
        The round's public configuration (as received from the server).
    identity : Ed25519PrivateKey
        This site's identity key (its public key is in the roster).
    members : frozenset[bytes]
        The identity public keys of the pinned roster's members.
    min_verified : int
        The fewest verified members (this client included) the site accepts
        in a round (its policy's minimum cohort; at least 2).

    Raises
    ------
    ConfigurationError
        If ``node_id`` is not in the cohort, the identity is not an Ed25519
        key in ``members``, or ``min_verified`` is below 2.
    """

    __slots__ = (
        "_config",
        "_encryption",
        "_failed",
        "_held",
        "_identity",
        "_identities",
        "_mask",
        "_members",
        "_min_verified",
        "_neighbours",
        "_node_id",
        "_peers",
        "_seed",
        "_graph_seed",
        "_stage",
        "_survivors",
    )

    def __init__(
        self,
        node_id: int,
        config: SecAggConfig,
        identity: Ed25519PrivateKey,
        members: frozenset[bytes],
        *,
        min_verified: int = 2,
    ) -> None:
        if not isinstance(config, SecAggConfig):
            raise ConfigurationError("config must be a SecAggConfig")
        if not config.contains(node_id):
            raise ConfigurationError(f"node {node_id!r} is not in the round's cohort")
        if not isinstance(identity, Ed25519PrivateKey):
            raise ConfigurationError("a site identity must be an Ed25519 private key")
        if not isinstance(members, frozenset) or public_bytes(identity) not in members:
            raise ConfigurationError("this site's identity is not in the roster it pins")
        if type(min_verified) is not int or min_verified < 2:
            raise ConfigurationError(f"min_verified must be an int >= 2, got {min_verified!r}")
        self._node_id = node_id
        self._config = config
        self._identity = identity
        self._members = members
        self._min_verified = min_verified
        self._neighbours: frozenset[int] = frozenset()
        self._stage = Stage.INIT
        self._failed = False
        self._encryption: KeyPair | None = None
        self._mask: KeyPair | None = None
        self._seed: bytes | None = None
        self._graph_seed: bytes | None = None
        self._identities: dict[int, bytes] = {}
        self._peers: dict[int, PeerKeys] = {}
        self._held: dict[int, tuple[int, int]] = {}
        self._survivors: tuple[int, ...] = ()

    @property
    def node_id(self) -> int:
        """This client's node id."""
        return self._node_id

    @property
    def stage(self) -> Stage:
        """The last stage this client completed."""
        return self._stage

    @property
    def neighbours(self) -> frozenset[int]:
        """This client's verified neighbours in the round's graph (empty before SHARE_KEYS)."""
        return self._neighbours

    @property
    def graph_seed(self) -> bytes | None:
        """The graph seed this client derived from the advertisements (None before SHARE_KEYS)."""
        return self._graph_seed

    def _enter(self, request: object, expected: type[_Request]) -> _Request:
        if self._failed:
            raise ProtocolAbort(f"node {self._node_id} already aborted this round")
        try:
            if type(request) is not expected:
                raise ProtocolError(
                    f"wrong stage: expected {expected.__name__}, got {type(request).__name__}"
                )
            if (request.run_id, request.round) != (self._config.run_id, self._config.round):
                raise ProtocolError(
                    f"message for run {request.run_id} round {request.round}, expected "
                    f"run {self._config.run_id} round {self._config.round}"
                )
            if request.node_id != self._node_id:
                raise ProtocolError(f"message for node {request.node_id}, not {self._node_id}")
            check_transition(self._stage, expected.STAGE)
        except FedsealError:
            self._failed = True
            raise
        return request

    def _guard(self, step: Callable[[], _Reply]) -> _Reply:
        try:
            return step()
        except FedsealError:
            self._failed = True
            raise

    def advertise_keys(self, request: AdvertiseKeysRequest) -> AdvertiseKeysReply:
        """Stage ADVERTISE_KEYS: make two X25519 key pairs and a self-mask seed ``b``; sign.

        The reply carries both public keys, a commitment to ``b``
        (:func:`~common.crypto.commitment.commit_seed`), which lets the server
        tell a correctly reconstructed ``b`` from one built with a wrong share,
        and this site's identity signature over all of it and the round's
        configuration digest (:func:`~common.secagg.signing.advertisement_message`).

        Raises
        ------
        ProtocolError
            On a wrong-stage, wrong-round or wrong-node request.
        """
        self._enter(request, AdvertiseKeysRequest)
        self._guard(
            lambda: check_bound_identities(
                self._config, self._node_id, public_bytes(self._identity), self._members
            )
        )
        self._encryption = generate_key_pair()
        self._mask = generate_key_pair()
        self._seed = secure_bytes(SEED_SIZE)
        self._stage = Stage.ADVERTISE_KEYS
        return self._own_advertisement()

    def _own_advertisement(self) -> AdvertiseKeysReply:
        if self._encryption is None or self._mask is None or self._seed is None:
            raise ProtocolError("client has no keys")
        config = self._config
        enc, mask = self._encryption.public_bytes, self._mask.public_bytes
        commitment = commit_seed(
            self._seed, run_id=config.run_id, round=config.round, node_id=self._node_id
        )
        signature = sign(
            self._identity, advertisement_message(config, self._node_id, enc, mask, commitment)
        )
        return AdvertiseKeysReply(
            config.run_id,
            config.round,
            self._node_id,
            enc,
            mask,
            commitment,
            public_bytes(self._identity),
            signature,
        )

    def share_keys(self, request: ShareKeysRequest) -> ShareKeysReply:
        """Stage SHARE_KEYS: verify every advertisement, derive the graph, share with neighbours.

        Each neighbour ``v`` receives ``AEAD(key_uv, share(mask_sk) || share(b))``
        with associated data (version, run, round, sender, receiver, stage).

        Raises
        ------
        ProtocolError
            If an advertisement is unsigned by a distinct roster member, for
            another configuration, or this client's own was altered; or public
            keys repeat.
        ProtocolAbort
            If fewer than ``min_verified`` members or ``t`` neighbours are present.
        IntegrityError
            If a peer's public key is a low-order point.
        """
        self._enter(request, ShareKeysRequest)
        return self._guard(lambda: self._share_keys(request))

    def _share_keys(self, request: ShareKeysRequest) -> ShareKeysReply:
        config = self._config
        if self._encryption is None or self._mask is None or self._seed is None:
            raise ProtocolError("client has no keys")
        ads = {a.node_id: a for a in request.advertisements}
        if self._node_id not in ads:
            raise ProtocolError("the server left out this site's own key advertisement")
        if ads[self._node_id] != self._own_advertisement().advertisement():
            raise ProtocolError("the server altered this site's own key advertisement")
        verified = verify_advertisements(
            config, {node: a.fields() for node, a in ads.items()}, self._members
        )
        if verified.rejected:
            node, reason = min(verified.rejected.items())
            raise ProtocolError(f"node {node}: {reason}")
        if len(ads) < self._min_verified:
            raise ProtocolAbort(
                f"only {len(ads)} verified roster members in the round, fewer than this "
                f"site's minimum {self._min_verified}"
            )
        keys = [k for a in ads.values() for k in (a.encryption_key, a.mask_key)]
        if len(set(keys)) != len(keys):
            raise ProtocolError("advertised public keys are not all distinct")
        seed = graph_seed(config, [a.encode() for a in request.advertisements])
        neighbours = neighbour_graph(config, seed)[self._node_id] & set(ads)
        if len(neighbours) < config.threshold:
            raise ProtocolAbort(
                f"node {self._node_id} has {len(neighbours)} live neighbours, fewer than the "
                f"threshold {config.threshold}"
            )
        ids = sorted(neighbours)
        indices = [config.share_index(node) for node in ids]
        key_shares = split_secret(
            private_bytes(self._mask), threshold=config.threshold, indices=indices
        )
        seed_shares = split_secret(self._seed, threshold=config.threshold, indices=indices)
        ciphertexts = []
        for node, key_share, seed_share in zip(ids, key_shares, seed_shares, strict=True):
            key = share_encryption_key(
                self._encryption, ads[node].encryption_key, config, self._node_id, node
            )
            plaintext = encode_value(key_share.value) + encode_value(seed_share.value)
            associated = share_associated_data(config, self._node_id, node)
            ciphertexts.append(Ciphertext(node, aead.encrypt(key, plaintext, associated)))
        self._peers = {n: PeerKeys(n, ads[n].encryption_key, ads[n].mask_key) for n in ids}
        self._identities = verified.identities
        self._graph_seed = seed
        self._neighbours = frozenset(neighbours)
        self._stage = Stage.SHARE_KEYS
        return ShareKeysReply(config.run_id, config.round, self._node_id, tuple(ciphertexts))

    def collect_masked(
        self,
        request: CollectMaskedRequest,
        update: np.ndarray,
        rng: RandomSource,
        *,
        encoded: bool = False,
    ) -> CollectMaskedReply:
        """Stage COLLECT_MASKED: store neighbours' shares; send the masked quantised input.

        Parameters
        ----------
        request : CollectMaskedRequest
            Share ciphertexts addressed to this client.
        update : numpy.ndarray
            The (already clipped) input, shape ``(vector_length,)``, ``|x| <= value_bound``.
        rng : ChaCha20Random or numpy.random.Generator
            Coins for stochastic rounding (:func:`common.rng.secure_generator` in production).
        encoded : bool
            ``update`` is already a vector of ring words in ``[0, 2^b)`` (distributed DP,
            :func:`common.dp.skellam.encode_update`): it is masked as it is.

        Raises
        ------
        ProtocolError
            If a sender is not a live neighbour from the previous stage.
        ProtocolAbort
            If fewer than ``t`` neighbours sent shares.
        DataError
            On an invalid input vector.
        IntegrityError
            If any ciphertext fails to authenticate (tampered, replayed, re-labelled).
        """
        self._enter(request, CollectMaskedRequest)
        return self._guard(lambda: self._collect_masked(request, update, rng, encoded))

    def _collect_masked(
        self, request: CollectMaskedRequest, update: np.ndarray, rng: RandomSource, encoded: bool
    ) -> CollectMaskedReply:
        config = self._config
        if self._encryption is None or self._mask is None or self._seed is None:
            raise ProtocolError("client has no keys")
        senders = [c.node_id for c in request.ciphertexts]
        unknown = set(senders) - set(self._peers)
        if unknown:
            raise ProtocolError(
                f"shares from nodes that are not live neighbours: {sorted(unknown)}"
            )
        if len(senders) < config.threshold:
            raise ProtocolAbort(
                f"node {self._node_id} received shares from {len(senders)} neighbours, fewer "
                f"than the threshold {config.threshold}"
            )
        masked = _check_encoded(update, config) if encoded else quantize(update, config, rng)
        held: dict[int, tuple[int, int]] = {}
        for entry in request.ciphertexts:
            peer = self._peers[entry.node_id]
            key = share_encryption_key(
                self._encryption, peer.encryption_key, config, self._node_id, peer.node_id
            )
            plaintext = aead.decrypt(
                key, entry.data, share_associated_data(config, peer.node_id, self._node_id)
            )
            if len(plaintext) != 2 * VALUE_SIZE:
                raise IntegrityError("authenticated decryption failed")
            held[peer.node_id] = (
                decode_value(plaintext[:VALUE_SIZE]),
                decode_value(plaintext[VALUE_SIZE:]),
            )
        # q + PRG(b) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv), streamed in one pass.
        masks = [(self_mask_seed(self._seed, config, self._node_id), 1)]
        for node in senders:
            seed = pairwise_mask_seed(
                self._mask, self._peers[node].mask_key, config, self._node_id, node
            )
            masks.append((seed, 1 if self._node_id < node else -1))
        add_masks_inplace(masked, masks, config.bits)  # ``masked`` is this call's own array
        self._held = held
        self._encryption = self._mask = None
        self._seed = None
        self._peers = {}
        self._stage = Stage.COLLECT_MASKED
        return CollectMaskedReply(config.run_id, config.round, self._node_id, masked)

    def consistency(self, request: ConsistencyRequest) -> ConsistencyReply:
        """Stage CONSISTENCY: sign the survivor set ``U3`` the server says it summed.

        A client signs one survivor set per round (this state machine moves
        on), so two quorums over different sets cannot both contain it.

        Raises
        ------
        ProtocolError
            If ``U3`` names nodes whose advertisements this client did not verify.
        ProtocolAbort
            If fewer than ``t`` of the neighbours it holds shares from survived
            (it could not help unmask anyway), or ``U3`` is smaller than the quorum.
        """
        self._enter(request, ConsistencyRequest)
        return self._guard(lambda: self._consistency(request))

    def _consistency(self, request: ConsistencyRequest) -> ConsistencyReply:
        config = self._config
        survivors = request.survivors
        strangers = set(survivors) - set(self._identities)
        if strangers:
            raise ProtocolError(f"survivor set names unverified nodes {sorted(strangers)}")
        alive = set(self._held) & set(survivors)
        if len(alive) < config.threshold:
            raise ProtocolAbort(
                f"only {len(alive)} surviving neighbours named, fewer than the threshold "
                f"{config.threshold}; refusing to sign"
            )
        if len(survivors) < quorum(config):
            raise ProtocolAbort(
                f"{len(survivors)} survivors cannot reach the consistency quorum {quorum(config)}"
            )
        if self._graph_seed is None:
            raise ProtocolError("client has no graph seed")
        signature = sign(self._identity, consistency_message(config, self._graph_seed, survivors))
        self._survivors = survivors
        self._stage = Stage.CONSISTENCY
        return ConsistencyReply(config.run_id, config.round, self._node_id, signature)

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Stage UNMASK: with a quorum over the signed ``U3``, reveal one share per neighbour.

        For each neighbour it holds shares from: the self-mask seed share if
        the neighbour is in ``U3`` (survived), else the mask-key share.

        Raises
        ------
        ProtocolError
            If the survivor set differs from the one this client signed, or a
            signature is invalid, repeated or from a node outside ``U3``.
        ProtocolAbort
            If fewer than :func:`~common.secagg.signing.quorum` valid signatures arrive.
        """
        self._enter(request, UnmaskRequest)
        return self._guard(lambda: self._unmask(request))

    def _unmask(self, request: UnmaskRequest) -> UnmaskReply:
        config = self._config
        if request.survivors != self._survivors or self._graph_seed is None:
            raise ProtocolError("unmask request's survivor set is not the one this site signed")
        message = consistency_message(config, self._graph_seed, self._survivors)
        members = set(self._survivors)
        for signed in request.signatures:
            if signed.node_id not in members:
                raise ProtocolError(
                    f"consistency signature from node {signed.node_id}, not a survivor"
                )
            if not verifies(self._identities[signed.node_id], message, signed.signature):
                raise ProtocolError(
                    f"consistency signature of node {signed.node_id} does not verify"
                )
        needed = quorum(config)
        if len(request.signatures) < needed:
            raise ProtocolAbort(
                f"{len(request.signatures)} consistency signatures, fewer than the quorum "
                f"{needed}; refusing to unmask"
            )
        survivors = sorted(set(self._held) & members)
        dropped = sorted(set(self._held) - members)
        seed_shares = tuple(RevealedShare(v, self._held[v][1]) for v in survivors)
        key_shares = tuple(RevealedShare(v, self._held[v][0]) for v in dropped)
        self._held = {}
        self._stage = Stage.UNMASK
        return UnmaskReply(config.run_id, config.round, self._node_id, seed_shares, key_shares)

    def seal(self, key: bytes) -> bytes:
        """AEAD-seal this client's whole round state under a caller-held 32-byte key.

        The sealing key is HKDF(key, client-state label, run, round, node) and
        the associated data binds the configuration digest and node id, so a
        blob opens only for the same node and the same round configuration.
        The identity key is not in it (the site holds it).

        Raises
        ------
        ConfigurationError
            If ``key`` is not 32 bytes.
        """
        secrets = self._encryption is not None and self._mask is not None and self._seed is not None
        header = _STATE_HEAD.pack(
            int(self._stage), int(self._failed), int(secrets), int(self._graph_seed is not None)
        )
        parts = [header]
        if self._encryption is not None and self._mask is not None and self._seed is not None:
            parts += [private_bytes(self._encryption), private_bytes(self._mask), self._seed]
        if self._graph_seed is not None:
            parts.append(self._graph_seed)
        parts.append(_U32.pack(len(self._identities)))
        parts += [_STATE_MEMBER.pack(n, i) for n, i in sorted(self._identities.items())]
        parts.append(_U32.pack(len(self._peers)))
        parts += [
            _STATE_PEER.pack(p.node_id, p.encryption_key, p.mask_key) for p in self._peers.values()
        ]
        parts.append(_U32.pack(len(self._held)))
        parts += [
            _STATE_HELD.pack(node, encode_value(k), encode_value(s))
            for node, (k, s) in self._held.items()
        ]
        parts.append(_U32.pack(len(self._survivors)))
        parts.append(struct.pack(f">{len(self._survivors)}Q", *self._survivors))
        return aead.encrypt(
            _state_key(key, self._config, self._node_id),
            b"".join(parts),
            _state_associated_data(self._config, self._node_id),
        )

    @classmethod
    def open(
        cls,
        blob: bytes,
        key: bytes,
        node_id: int,
        config: SecAggConfig,
        identity: Ed25519PrivateKey,
        members: frozenset[bytes],
        *,
        min_verified: int = 2,
    ) -> SecAggClient:
        """Restore a client sealed by :meth:`seal` (with the site's identity and roster).

        Raises
        ------
        IntegrityError
            If the blob does not authenticate under this key, node and
            configuration, or its content is malformed.
        """
        client = cls(node_id, config, identity, members, min_verified=min_verified)
        plaintext = aead.decrypt(
            _state_key(key, config, node_id), blob, _state_associated_data(config, node_id)
        )
        try:
            client._restore(plaintext)
        except (FedsealError, ValueError, struct.error):
            raise IntegrityError("sealed client state is malformed") from None
        return client

    def _restore(self, data: bytes) -> None:
        stage, failed, has_secrets, has_graph = _STATE_HEAD.unpack_from(data)
        offset = _STATE_HEAD.size
        self._stage = Stage(stage)
        self._failed = bool(failed)
        if has_secrets:
            self._encryption = key_pair_from_private_bytes(data[offset : offset + KEY_SIZE])
            self._mask = key_pair_from_private_bytes(
                data[offset + KEY_SIZE : offset + 2 * KEY_SIZE]
            )
            self._seed = data[offset + 2 * KEY_SIZE : offset + 2 * KEY_SIZE + SEED_SIZE]
            offset += 2 * KEY_SIZE + SEED_SIZE
        if has_graph:
            self._graph_seed = data[offset : offset + SEED_SIZE]
            offset += SEED_SIZE
        (count,) = _U32.unpack_from(data, offset)
        offset += _U32.size
        for _ in range(count):
            node, identity = _STATE_MEMBER.unpack_from(data, offset)
            self._identities[node] = identity
            offset += _STATE_MEMBER.size
        (count,) = _U32.unpack_from(data, offset)
        offset += _U32.size
        for _ in range(count):
            peer = PeerKeys(*_STATE_PEER.unpack_from(data, offset))
            self._peers[peer.node_id] = peer
            offset += _STATE_PEER.size
        (count,) = _U32.unpack_from(data, offset)
        offset += _U32.size
        for _ in range(count):
            node, k, s = _STATE_HELD.unpack_from(data, offset)
            self._held[node] = (decode_value(k), decode_value(s))
            offset += _STATE_HELD.size
        (count,) = _U32.unpack_from(data, offset)
        offset += _U32.size
        self._survivors = tuple(struct.unpack_from(f">{count}Q", data, offset))
        offset += 8 * count
        if offset != len(data):
            raise ValueError("trailing bytes")
        if self._graph_seed is not None:
            graph = neighbour_graph(self._config, self._graph_seed)
            self._neighbours = graph[self._node_id] & frozenset(self._identities)


def _state_key(key: bytes, config: SecAggConfig, node_id: int) -> bytes:
    if type(key) is not bytes or len(key) != aead.KEY_SIZE:
        raise ConfigurationError("the state-sealing key must be exactly 32 bytes")
    return derive_node_key(
        key, LABEL_CLIENT_STATE, run_id=config.run_id, round=config.round, node_id=node_id
    )


def _state_associated_data(config: SecAggConfig, node_id: int) -> bytes:
    return LABEL_CLIENT_STATE + config.digest() + struct.pack(">Q", node_id)


def _check_encoded(words: object, config: SecAggConfig) -> np.ndarray:
    """An already-encoded input: ``vector_length`` ring words below ``2^bits``, copied.

    Raises
    ------
    DataError
        Otherwise.
    """
    if (
        not isinstance(words, np.ndarray)
        or words.shape != (config.vector_length,)
        or words.dtype.kind != "u"
    ):
        raise DataError(f"an encoded input must be {config.vector_length} unsigned ring words")
    if words.size and int(words.max()) >= 1 << config.bits:
        raise DataError(f"an encoded input has words outside Z_2^{config.bits}")
    return words.astype(config.dtype)
