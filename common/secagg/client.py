"""The client side of a SecAgg+ round as a pure state machine.

Guarantee (honest-but-curious server colluding with at most ``t - 1``
clients; Bell et al. CCS 2020, Bonawitz et al. CCS 2017): what this client
sends reveals nothing about its input beyond what the sum of the survivors'
inputs reveals, because its masked vector is ``q + PRG(b) + sum_v +-PRG(s_uv)``
with a self-mask seed ``b`` and pairwise X25519 keys, and it reveals, per
neighbour, *either* the share of that neighbour's seed ``b`` (neighbour
survived) *or* of its mask key (neighbour dropped), never both, and only once.
Besides its two public keys it publishes only ``H(label, run, round, node, b)``
(:mod:`common.crypto.commitment`; hiding for a uniform 32-byte ``b`` with
SHA-256 as a random oracle), which lets the server reject a wrongly
reconstructed ``b``.

Fail-closed checks before any secret is used: every request must be of the
type the stage table allows next (:func:`~common.secagg.stages.check_transition`),
for this run, round and node; keys and shares come only from neighbours in the
public graph; at most one unmask answer, and only if the survivor and dropped
sets are disjoint, exactly cover the neighbours this client masked with, and
name at least ``t`` survivors. After any rejected request the client refuses
every further request of the round (:class:`~common.errors.ProtocolAbort`).

Secrets live in this object's memory for one round; they leave it only as
Shamir shares encrypted for a neighbour, or sealed under a caller-held key
(:meth:`SecAggClient.seal`). The client's own keys and seed are erased from
the state as soon as the masked input is computed.
"""

from __future__ import annotations

import struct
from typing import TypeVar

import numpy as np

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
    FedsealError,
    IntegrityError,
    ProtocolAbort,
    ProtocolError,
)
from common.rng import secure_bytes
from common.secagg.graph import neighbour_graph
from common.secagg.messages import (
    AdvertiseKeysReply,
    AdvertiseKeysRequest,
    Ciphertext,
    CollectMaskedReply,
    CollectMaskedRequest,
    PeerKeys,
    RevealedShare,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
)
from common.secagg.params import SecAggConfig
from common.secagg.quantize import quantize
from common.secagg.stages import Stage, check_transition

_Request = TypeVar(
    "_Request", AdvertiseKeysRequest, ShareKeysRequest, CollectMaskedRequest, UnmaskRequest
)
_STATE_HEAD = struct.Struct(">BBB")
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

    Raises
    ------
    ConfigurationError
        If ``node_id`` is not in the cohort.
    """

    __slots__ = (
        "_config",
        "_encryption",
        "_failed",
        "_held",
        "_mask",
        "_neighbours",
        "_node_id",
        "_peers",
        "_seed",
        "_stage",
    )

    def __init__(self, node_id: int, config: SecAggConfig) -> None:
        if not isinstance(config, SecAggConfig):
            raise ConfigurationError("config must be a SecAggConfig")
        if not config.contains(node_id):
            raise ConfigurationError(f"node {node_id!r} is not in the round's cohort")
        self._node_id = node_id
        self._config = config
        self._neighbours = neighbour_graph(config)[node_id]
        self._stage = Stage.INIT
        self._failed = False
        self._encryption: KeyPair | None = None
        self._mask: KeyPair | None = None
        self._seed: bytes | None = None
        self._peers: dict[int, PeerKeys] = {}
        self._held: dict[int, tuple[int, int]] = {}

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
        """This client's neighbours in the public graph."""
        return self._neighbours

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

    def advertise_keys(self, request: AdvertiseKeysRequest) -> AdvertiseKeysReply:
        """Stage ADVERTISE_KEYS: make two X25519 key pairs and a self-mask seed ``b``.

        The reply carries both public keys and a commitment to ``b``
        (:func:`~common.crypto.commitment.commit_seed`), which lets the server
        tell a correctly reconstructed ``b`` from one built with a wrong share.

        Raises
        ------
        ProtocolError
            On a wrong-stage, wrong-round or wrong-node request.
        """
        self._enter(request, AdvertiseKeysRequest)
        self._encryption = generate_key_pair()
        self._mask = generate_key_pair()
        self._seed = secure_bytes(SEED_SIZE)
        self._stage = Stage.ADVERTISE_KEYS
        config = self._config
        return AdvertiseKeysReply(
            config.run_id,
            config.round,
            self._node_id,
            self._encryption.public_bytes,
            self._mask.public_bytes,
            commit_seed(
                self._seed, run_id=config.run_id, round=config.round, node_id=self._node_id
            ),
        )

    def share_keys(self, request: ShareKeysRequest) -> ShareKeysReply:
        """Stage SHARE_KEYS: Shamir-share the mask key and seed among live neighbours.

        Each neighbour ``v`` receives ``AEAD(key_uv, share(mask_sk) || share(b))``
        with associated data (version, run, round, sender, receiver, stage).

        Raises
        ------
        ProtocolError
            If a listed peer is not a neighbour or public keys repeat.
        ProtocolAbort
            If fewer than ``t`` neighbours are live.
        IntegrityError
            If a peer's public key is a low-order point.
        """
        self._enter(request, ShareKeysRequest)
        try:
            return self._share_keys(request)
        except FedsealError:
            self._failed = True
            raise

    def _share_keys(self, request: ShareKeysRequest) -> ShareKeysReply:
        config = self._config
        if self._encryption is None or self._mask is None or self._seed is None:
            raise ProtocolError("client has no keys")
        ids = [peer.node_id for peer in request.peers]
        strangers = set(ids) - self._neighbours
        if strangers:
            raise ProtocolError(f"keys offered for non-neighbours {sorted(strangers)}")
        if len(ids) < config.threshold:
            raise ProtocolAbort(
                f"node {self._node_id} has {len(ids)} live neighbours, fewer than the "
                f"threshold {config.threshold}"
            )
        keys = [self._encryption.public_bytes, self._mask.public_bytes]
        for peer in request.peers:
            keys += [peer.encryption_key, peer.mask_key]
        if len(set(keys)) != len(keys):
            raise ProtocolError("advertised public keys are not all distinct")
        indices = [config.share_index(node) for node in ids]
        key_shares = split_secret(
            private_bytes(self._mask), threshold=config.threshold, indices=indices
        )
        seed_shares = split_secret(self._seed, threshold=config.threshold, indices=indices)
        ciphertexts = []
        for peer, key_share, seed_share in zip(request.peers, key_shares, seed_shares, strict=True):
            key = share_encryption_key(
                self._encryption, peer.encryption_key, config, self._node_id, peer.node_id
            )
            plaintext = encode_value(key_share.value) + encode_value(seed_share.value)
            associated = share_associated_data(config, self._node_id, peer.node_id)
            ciphertexts.append(Ciphertext(peer.node_id, aead.encrypt(key, plaintext, associated)))
        self._peers = {peer.node_id: peer for peer in request.peers}
        self._stage = Stage.SHARE_KEYS
        return ShareKeysReply(config.run_id, config.round, self._node_id, tuple(ciphertexts))

    def collect_masked(
        self, request: CollectMaskedRequest, update: np.ndarray, rng: np.random.Generator
    ) -> CollectMaskedReply:
        """Stage COLLECT_MASKED: store neighbours' shares; send the masked quantised input.

        Parameters
        ----------
        request : CollectMaskedRequest
            Share ciphertexts addressed to this client.
        update : numpy.ndarray
            The (already clipped) input, shape ``(vector_length,)``, ``|x| <= value_bound``.
        rng : numpy.random.Generator
            Coins for stochastic rounding.

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
        try:
            return self._collect_masked(request, update, rng)
        except FedsealError:
            self._failed = True
            raise

    def _collect_masked(
        self, request: CollectMaskedRequest, update: np.ndarray, rng: np.random.Generator
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
        masked = quantize(update, config, rng)
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

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Stage UNMASK: reveal seed shares of survivors and key shares of dropped neighbours.

        Raises
        ------
        ProtocolError
            If the sets overlap, name non-neighbours, or do not account for
            exactly the neighbours this client masked with.
        ProtocolAbort
            If fewer than ``t`` survivors are named.
        """
        self._enter(request, UnmaskRequest)
        try:
            return self._unmask(request)
        except FedsealError:
            self._failed = True
            raise

    def _unmask(self, request: UnmaskRequest) -> UnmaskReply:
        config = self._config
        survivors, dropped = set(request.survivors), set(request.dropped)
        strangers = (survivors | dropped) - self._neighbours
        if strangers:
            raise ProtocolError(f"unmask request names non-neighbours {sorted(strangers)}")
        if survivors & dropped:
            raise ProtocolError(
                f"unmask request names nodes both survived and dropped: {sorted(survivors & dropped)}"
            )
        if survivors | dropped != set(self._held):
            raise ProtocolError(
                "unmask request does not account for exactly the neighbours this client masked with"
            )
        if len(survivors) < config.threshold:
            raise ProtocolAbort(
                f"only {len(survivors)} surviving neighbours named, fewer than the threshold "
                f"{config.threshold}; refusing to unmask"
            )
        seed_shares = tuple(RevealedShare(v, self._held[v][1]) for v in request.survivors)
        key_shares = tuple(RevealedShare(v, self._held[v][0]) for v in request.dropped)
        self._held = {}
        self._stage = Stage.UNMASK
        return UnmaskReply(config.run_id, config.round, self._node_id, seed_shares, key_shares)

    def seal(self, key: bytes) -> bytes:
        """AEAD-seal this client's whole round state under a caller-held 32-byte key.

        The sealing key is HKDF(key, client-state label, run, round, node) and
        the associated data binds the configuration digest and node id, so a
        blob opens only for the same node and the same round configuration.

        Raises
        ------
        ConfigurationError
            If ``key`` is not 32 bytes.
        """
        header = _STATE_HEAD.pack(int(self._stage), int(self._failed), int(self._seed is not None))
        parts = [header]
        if self._encryption is not None and self._mask is not None and self._seed is not None:
            parts += [private_bytes(self._encryption), private_bytes(self._mask), self._seed]
        parts.append(_U32.pack(len(self._peers)))
        parts += [
            _STATE_PEER.pack(p.node_id, p.encryption_key, p.mask_key) for p in self._peers.values()
        ]
        parts.append(_U32.pack(len(self._held)))
        parts += [
            _STATE_HELD.pack(node, encode_value(k), encode_value(s))
            for node, (k, s) in self._held.items()
        ]
        return aead.encrypt(
            _state_key(key, self._config, self._node_id),
            b"".join(parts),
            _state_associated_data(self._config, self._node_id),
        )

    @classmethod
    def open(cls, blob: bytes, key: bytes, node_id: int, config: SecAggConfig) -> SecAggClient:
        """Restore a client sealed by :meth:`seal`.

        Raises
        ------
        IntegrityError
            If the blob does not authenticate under this key, node and
            configuration, or its content is malformed.
        """
        client = cls(node_id, config)
        plaintext = aead.decrypt(
            _state_key(key, config, node_id), blob, _state_associated_data(config, node_id)
        )
        try:
            client._restore(plaintext)
        except (FedsealError, ValueError, struct.error):
            raise IntegrityError("sealed client state is malformed") from None
        return client

    def _restore(self, data: bytes) -> None:
        stage, failed, has_secrets = _STATE_HEAD.unpack_from(data)
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
        if offset != len(data):
            raise ValueError("trailing bytes")


def _state_key(key: bytes, config: SecAggConfig, node_id: int) -> bytes:
    if type(key) is not bytes or len(key) != aead.KEY_SIZE:
        raise ConfigurationError("the state-sealing key must be exactly 32 bytes")
    return derive_node_key(
        key, LABEL_CLIENT_STATE, run_id=config.run_id, round=config.round, node_id=node_id
    )


def _state_associated_data(config: SecAggConfig, node_id: int) -> bytes:
    return LABEL_CLIENT_STATE + config.digest() + struct.pack(">Q", node_id)
