"""The server side of a SecAgg+ round as a pure state machine.

Protocol v3 (authenticated, :mod:`common.secagg.signing`): the server relays
every verified, signed advertisement to every live site, derives the graph
from them as each site does, and runs the consistency round between the
masked inputs and unmasking. An honest server also filters what a faulty or
malicious *site* sends: an advertisement not signed by a distinct roster
member (``members``), colliding public keys, or a consistency signature that
does not verify takes only that site out of the round, named in
:attr:`SecAggServer.rejected` (the sites would otherwise refuse the round).

Guarantee: if every client follows the protocol, :meth:`SecAggServer.receive_unmask`
returns exactly ``sum_{u in U3} q_u (mod 2^b)``, the sum of the quantised
inputs of the clients whose masked vectors arrived (``U3``), lifted to signed
integers and dequantised (error bound in :mod:`common.secagg.quantize`). What
a server, honest or not, can learn is bounded by the *clients'* checks
(:mod:`common.secagg.client`, :mod:`common.secagg.signing`: at most ``t - 1``
colluding clients); this state machine is the honest server's side.

Dropout handling: a node with fewer than ``t`` live neighbours is excluded
before it shares or masks (its neighbours then never mask with it); after
masking, every survivor's self-mask seed and every dropped neighbour's mask
key must be reconstructable from ``t`` shares of responders, else the round
aborts with :class:`~common.errors.ProtocolAbort` naming the node. Fewer
than ``t`` participants at any stage aborts too.

Wrong shares (a faulty or lying share holder): every secret is verified
before use -- a self-mask seed must open the commitment its owner sent at
ADVERTISE_KEYS (:mod:`common.crypto.commitment`), a mask key must give the
public key its owner advertised -- and reconstructed by
:func:`~common.crypto.shamir.reconstruct_verified` from all the shares that
arrived (up to ``k``), so that wrong shares are outvoted and their holders
named in :attr:`AggregateResult.rejected`. The sum stays exact: only
verified secrets are expanded into masks. A holder named once is tried last
for every later secret. A reply that answers for other nodes than asked is
ignored (the holder is named). The round aborts with ProtocolAbort only if
some needed secret has no verifiable reconstruction within
:data:`RECONSTRUCTION_ATTEMPTS` ``t``-subsets. A named holder's own masked
input, if it arrived, stays in the sum: its self-mask seed is reconstructed
from the other holders' shares like anyone's.

Replies are validated (type, run, round, sender expected at this stage, no
duplicates, exact recipient sets) before any of their content is used; a
reply that fails raises :class:`~common.errors.ProtocolError` and the server
refuses further calls. Replies missing from a list are dropouts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from common.crypto.commitment import opens
from common.crypto.keys import KeyPair, key_pair_from_private_bytes
from common.crypto.prg import RingArray, add_masks_inplace
from common.crypto.shamir import Share, reconstruct_verified
from common.errors import (
    ConfigurationError,
    FedsealError,
    ProtocolAbort,
    ProtocolError,
)
from common.secagg.client import pairwise_mask_seed, self_mask_seed
from common.secagg.graph import neighbour_graph
from common.secagg.messages import (
    AdvertiseKeysReply,
    AdvertiseKeysRequest,
    Ciphertext,
    CollectMaskedReply,
    CollectMaskedRequest,
    ConsistencyReply,
    ConsistencyRequest,
    ShareKeysReply,
    ShareKeysRequest,
    Signed,
    UnmaskReply,
    UnmaskRequest,
)
from common.secagg.params import SecAggConfig
from common.secagg.quantize import dequantize_sum
from common.secagg.signing import (
    consistency_message,
    graph_seed,
    quorum,
    verifies,
    verify_advertisements,
)
from common.secagg.stages import Stage, check_transition

RECONSTRUCTION_ATTEMPTS = 1024
"""Bound on the ``t``-subsets tried per secret (reached only with several wrong shares)."""

_Reply = TypeVar(
    "_Reply",
    AdvertiseKeysReply,
    ShareKeysReply,
    CollectMaskedReply,
    ConsistencyReply,
    UnmaskReply,
)


@dataclass(frozen=True, slots=True, eq=False)
class AggregateResult:
    """The outcome of a completed secure-aggregation round.

    Attributes
    ----------
    sum : numpy.ndarray
        float64, the dequantised sum of the contributors' inputs.
    sum_int : numpy.ndarray
        int64, the exact integer sum of the contributors' quantised inputs.
    contributors : tuple[int, ...]
        Node ids whose masked inputs are in the sum.
    dropped : tuple[int, ...]
        Cohort node ids whose inputs are not in the sum.
    threshold : int
        ``t`` of the round.
    neighbours : int
        ``k`` of the round.
    rejected : dict[int, str]
        Share holders whose unmask reply was wrong (node -> reason): a share
        inconsistent with the verified secret, or shares for other nodes than
        asked. Their shares were not used; a holder that is also a contributor
        stays in the sum.
    """

    sum: npt.NDArray[np.float64]
    sum_int: npt.NDArray[np.int64]
    contributors: tuple[int, ...]
    dropped: tuple[int, ...]
    threshold: int
    neighbours: int
    rejected: dict[int, str] = field(default_factory=dict)

    @property
    def participants(self) -> int:
        """The number of invited clients (contributors + dropped)."""
        return len(self.contributors) + len(self.dropped)


class SecAggServer:
    """The server's state for one secure-aggregation round.

    Call, in order: :meth:`start`, :meth:`receive_advertise_keys`,
    :meth:`receive_share_keys`, :meth:`receive_masked`,
    :meth:`receive_consistency`, :meth:`receive_unmask`; each consumes the
    replies that arrived and returns the next per-node requests (the last
    returns the :class:`AggregateResult`). ``members`` are the roster's
    identity keys (None: advertisements are checked for a valid, distinct
    signature only; the sites still check the roster).
    """

    __slots__ = (
        "_config",
        "_failed",
        "_graph",
        "_identities",
        "_keys",
        "_live",
        "_masked_with",
        "_members",
        "_rejected",
        "_requested",
        "_seed",
        "_stage",
        "_sum",
        "_survivors",
        "_verified",
    )

    def __init__(self, config: SecAggConfig, members: frozenset[bytes] | None = None) -> None:
        if not isinstance(config, SecAggConfig):
            raise ConfigurationError("config must be a SecAggConfig")
        self._config = config
        self._members = members
        self._graph: dict[int, frozenset[int]] = {}
        self._seed: bytes | None = None
        self._stage = Stage.INIT
        self._failed = False
        self._requested: frozenset[int] = frozenset()
        self._keys: dict[int, AdvertiseKeysReply] = {}
        self._identities: dict[int, bytes] = {}
        self._verified: frozenset[int] = frozenset()
        self._live: frozenset[int] = frozenset()
        self._masked_with: dict[int, frozenset[int]] = {}
        self._sum: RingArray | None = None
        self._survivors: tuple[int, ...] = ()
        self._rejected: dict[int, str] = {}

    @property
    def config(self) -> SecAggConfig:
        """The round's configuration."""
        return self._config

    @property
    def graph(self) -> dict[int, frozenset[int]]:
        """The neighbour graph derived from the advertisements (a copy; empty before)."""
        return dict(self._graph)

    @property
    def graph_seed(self) -> bytes | None:
        """The graph seed derived from the advertisements (None before)."""
        return self._seed

    @property
    def rejected(self) -> dict[int, str]:
        """Sites this server took out of the round for what they sent, with the reason."""
        return dict(self._rejected)

    def _advance(self, following: Stage) -> None:
        if self._failed:
            raise ProtocolAbort("this secure-aggregation round already aborted")
        try:
            check_transition(self._stage, following)
        except FedsealError:
            self._failed = True
            raise
        self._stage = following

    def _collect(self, replies: Sequence[object], expected: type[_Reply]) -> dict[int, _Reply]:
        if self._failed:
            raise ProtocolAbort("this secure-aggregation round already aborted")
        if self._stage is not expected.STAGE:
            raise ProtocolError(f"not expecting {expected.__name__} at stage {self._stage.name}")
        received: dict[int, _Reply] = {}
        for reply in replies:
            if type(reply) is not expected:
                raise ProtocolError(
                    f"wrong stage: expected {expected.__name__}, got {type(reply).__name__}"
                )
            if (reply.run_id, reply.round) != (self._config.run_id, self._config.round):
                raise ProtocolError(f"reply for run {reply.run_id} round {reply.round}")
            if reply.node_id not in self._requested:
                raise ProtocolError(f"unexpected reply from node {reply.node_id}")
            if reply.node_id in received:
                raise ProtocolError(f"duplicate reply from node {reply.node_id}")
            received[reply.node_id] = reply
        return received

    def _guarded(self, replies: Sequence[object], expected: type[_Reply]) -> dict[int, _Reply]:
        try:
            return self._collect(replies, expected)
        except FedsealError:
            self._failed = True
            raise

    def _prune(self, alive: set[int], stage: str) -> frozenset[int]:
        t = self._config.threshold
        changed = True
        while changed:
            weak = {u for u in alive if len(self._graph[u] & alive) < t}
            changed = bool(weak)
            alive -= weak
        if len(alive) < t:
            raise ProtocolAbort(
                f"secure aggregation aborted at {stage}: {len(alive)} usable clients, "
                f"fewer than the threshold {t}"
            )
        return frozenset(alive)

    def start(self) -> dict[int, AdvertiseKeysRequest]:
        """Begin the round: one ADVERTISE_KEYS request per cohort node."""
        self._advance(Stage.ADVERTISE_KEYS)
        config = self._config
        self._requested = frozenset(config.cohort)
        return {u: AdvertiseKeysRequest(config.run_id, config.round, u) for u in config.cohort}

    def receive_advertise_keys(
        self, replies: Sequence[AdvertiseKeysReply]
    ) -> dict[int, ShareKeysRequest]:
        """Verify the signed advertisements, derive the graph, send every live node all of them.

        A site whose advertisement is not signed by a distinct roster member
        over this configuration, or whose public keys repeat another's, is
        left out (named in :attr:`rejected`); the graph seed is derived from
        the rest, as every site will derive it.

        Raises
        ------
        ProtocolError
            On an invalid reply.
        ProtocolAbort
            If fewer than ``t`` usable clients remain.
        """
        received = self._guarded(replies, AdvertiseKeysReply)
        config = self._config
        try:
            verified = verify_advertisements(
                config,
                {u: r.advertisement().fields() for u, r in received.items()},
                self._members,
            )
            self._rejected.update(verified.rejected)
            owners: dict[bytes, list[int]] = {}
            for u in verified.identities:
                for key in (received[u].encryption_key, received[u].mask_key):
                    owners.setdefault(key, []).append(u)
            clashing = {u for nodes in owners.values() if len(nodes) > 1 for u in nodes}
            for u in clashing:
                self._rejected[u] = "advertised a public key that another site advertised too"
            accepted = sorted(set(verified.identities) - clashing)
            self._seed = graph_seed(
                config, [received[u].advertisement().encode() for u in accepted]
            )
            self._graph = neighbour_graph(config, self._seed)
            self._verified = frozenset(accepted)
            self._identities = {u: verified.identities[u] for u in accepted}
            live = self._prune(set(accepted), "ADVERTISE_KEYS")
            self._advance(Stage.SHARE_KEYS)
        except FedsealError:
            self._failed = True
            raise
        self._keys = {u: received[u] for u in accepted}
        self._live = live
        self._requested = live
        ads = tuple(received[u].advertisement() for u in accepted)
        return {u: ShareKeysRequest(config.run_id, config.round, u, ads) for u in sorted(live)}

    def receive_share_keys(
        self, replies: Sequence[ShareKeysReply]
    ) -> dict[int, CollectMaskedRequest]:
        """Consume share ciphertexts; route each to its receiver.

        Raises
        ------
        ProtocolError
            If a reply's receivers are not exactly its verified neighbours.
        ProtocolAbort
            If fewer than ``t`` usable clients remain.
        """
        received = self._guarded(replies, ShareKeysReply)
        try:
            for u, reply in received.items():
                receivers = {c.node_id for c in reply.ciphertexts}
                if receivers != self._graph[u] & self._verified:
                    raise ProtocolError(f"node {u} sent shares to the wrong set of nodes")
            live = self._prune(set(received), "SHARE_KEYS")
            self._advance(Stage.COLLECT_MASKED)
        except FedsealError:
            self._failed = True
            raise
        routed: dict[int, dict[int, bytes]] = {u: {} for u in live}
        for v in live:
            for c in received[v].ciphertexts:
                if c.node_id in live:
                    routed[c.node_id][v] = c.data
        self._live = live
        self._requested = live
        self._masked_with = {u: frozenset(routed[u]) for u in live}
        config = self._config
        return {
            u: CollectMaskedRequest(
                config.run_id,
                config.round,
                u,
                tuple(Ciphertext(v, routed[u][v]) for v in sorted(routed[u])),
            )
            for u in sorted(live)
        }

    def receive_masked(
        self, replies: Sequence[CollectMaskedReply]
    ) -> dict[int, ConsistencyRequest]:
        """Consume masked vectors (summing them at once); ask survivors to sign ``U3``.

        Raises
        ------
        ProtocolError
            On a vector of the wrong length or type.
        ProtocolAbort
            If fewer masked vectors arrived than the threshold or the
            consistency quorum, or a survivor has fewer than ``t`` surviving
            neighbours (its self-mask could not be removed).
        """
        received = self._guarded(replies, CollectMaskedReply)
        config = self._config
        try:
            survivors = frozenset(received)
            if len(survivors) < quorum(config):  # the quorum is never below t
                raise ProtocolAbort(
                    f"secure aggregation aborted at COLLECT_MASKED: {len(survivors)} masked "
                    f"inputs, fewer than the threshold {config.threshold} or the consistency "
                    f"quorum {quorum(config)}"
                )
            for u in survivors:
                masked = received[u].masked
                if masked.shape != (config.vector_length,) or masked.dtype != config.dtype:
                    raise ProtocolError(f"node {u} sent a masked vector of the wrong shape or type")
                alive = self._masked_with[u] & survivors
                if len(alive) < config.threshold:
                    raise ProtocolAbort(
                        f"secure aggregation aborted: node {u} has {len(alive)} surviving "
                        f"neighbours, fewer than the threshold {config.threshold}"
                    )
            self._advance(Stage.CONSISTENCY)
        except FedsealError:
            self._failed = True
            raise
        total: RingArray = np.zeros(config.vector_length, dtype=config.dtype)
        for u in sorted(survivors):
            np.add(total, received[u].masked, out=total)
        self._sum = total
        self._live = survivors
        self._requested = survivors
        self._survivors = tuple(sorted(survivors))
        return {
            u: ConsistencyRequest(config.run_id, config.round, u, self._survivors)
            for u in self._survivors
        }

    def receive_consistency(self, replies: Sequence[ConsistencyReply]) -> dict[int, UnmaskRequest]:
        """Check the survivors' signatures over ``U3``; hand a quorum of them to every signer.

        A signature that does not verify takes only its sender out of the
        unmask stage (named in :attr:`rejected`); its masked input stays in
        the sum, its self-mask seed is reconstructed like any survivor's.

        Raises
        ------
        ProtocolAbort
            If fewer than the quorum of valid signatures arrived.
        """
        received = self._guarded(replies, ConsistencyReply)
        config = self._config
        try:
            if self._seed is None:
                raise ProtocolError("no graph seed")
            message = consistency_message(config, self._seed, self._survivors)
            valid: list[Signed] = []
            for u in sorted(received):
                if verifies(self._identities[u], message, received[u].signature):
                    valid.append(Signed(u, received[u].signature))
                else:
                    self._rejected[u] = "stage consistency: signature does not verify"
            needed = quorum(config)
            if len(valid) < needed:
                raise ProtocolAbort(
                    f"secure aggregation aborted at CONSISTENCY: {len(valid)} valid signatures, "
                    f"fewer than the quorum {needed}"
                )
            self._advance(Stage.UNMASK)
        except FedsealError:
            self._failed = True
            raise
        signers = frozenset(s.node_id for s in valid)
        self._requested = signers
        quorum_signatures = tuple(valid[:needed])  # each site checks exactly a quorum
        return {
            u: UnmaskRequest(config.run_id, config.round, u, self._survivors, quorum_signatures)
            for u in sorted(signers)
        }

    def receive_unmask(self, replies: Sequence[UnmaskReply]) -> AggregateResult:
        """Reconstruct seeds and dropped keys, remove every mask, return the sum.

        Raises
        ------
        ProtocolAbort
            If fewer than ``t`` shares arrived for a needed secret, or no
            ``t``-subset of them reconstructs a secret that opens its owner's
            commitment (self-mask seed) or gives its public key (mask key).
        """
        received = self._guarded(replies, UnmaskReply)
        try:
            result = self._unmask(received)
        except FedsealError:
            self._failed = True
            raise
        self._failed = True  # a round completes once; later calls are refused
        return result

    def _unmask(self, received: dict[int, UnmaskReply]) -> AggregateResult:
        config = self._config
        t = config.threshold
        rejected: dict[int, str] = {}
        holder_of: dict[int, int] = {}
        seed_shares: dict[int, list[Share]] = {u: [] for u in self._live}
        key_shares: dict[int, list[Share]] = {}
        for w, reply in received.items():
            held = self._masked_with[w]
            if tuple(s.owner for s in reply.seed_shares) != tuple(sorted(held & self._live)) or (
                tuple(s.owner for s in reply.key_shares) != tuple(sorted(held - self._live))
            ):
                rejected[w] = "stage unmask: answered shares for other nodes than asked"
                continue
            index = config.share_index(w)
            holder_of[index] = w
            for share in reply.seed_shares:
                seed_shares[share.owner].append(Share(index, share.value))
            for share in reply.key_shares:
                key_shares.setdefault(share.owner, []).append(Share(index, share.value))
        needed_keys = {x for u in self._live for x in self._masked_with[u] - self._live}
        for owner, shares in [
            *seed_shares.items(),
            *((x, key_shares.get(x, [])) for x in needed_keys),
        ]:
            if len(shares) < t:
                raise ProtocolAbort(
                    f"secure aggregation aborted at UNMASK: {len(shares)} shares for node "
                    f"{owner}, fewer than the threshold {t}"
                )
        if self._sum is None:
            raise ProtocolError("no masked inputs")
        total = self._sum

        def reconstruct(
            owner: int, shares: list[Share], what: str, verify: Callable[[bytes], bool]
        ) -> bytes:
            # holders already caught lying go last: the first t shares are then usually honest
            shares = sorted(shares, key=lambda s: (holder_of[s.index] in rejected, s.index))
            try:
                found = reconstruct_verified(
                    shares, threshold=t, verify=verify, max_attempts=RECONSTRUCTION_ATTEMPTS
                )
            except ProtocolAbort as exc:
                raise ProtocolAbort(
                    f"secure aggregation aborted at UNMASK: node {owner}'s {what} cannot be "
                    f"verifiably reconstructed from the {len(shares)} shares received ({exc})"
                ) from None
            for index in found.inconsistent:
                rejected.setdefault(
                    holder_of[index],
                    f"stage unmask: revealed a share of node {owner}'s {what} that is "
                    "inconsistent with the verified secret",
                )
            return found.secret

        # Reconstruct and verify every secret before any mask is expanded.
        masks: list[tuple[bytes, int]] = []
        for u in sorted(self._live):
            commitment = self._keys[u].commitment

            def seed_opens(seed: bytes, u: int = u, commitment: bytes = commitment) -> bool:
                return opens(commitment, seed, run_id=config.run_id, round=config.round, node_id=u)

            seed = reconstruct(u, seed_shares[u], "self-mask seed", seed_opens)
            masks.append((self_mask_seed(seed, config, u), -1))
        for x in sorted(needed_keys):
            public = self._keys[x].mask_key

            def key_matches(secret: bytes, public: bytes = public) -> bool:
                return key_pair_from_private_bytes(secret).public_bytes == public

            pair: KeyPair = key_pair_from_private_bytes(
                reconstruct(x, key_shares[x], "mask key", key_matches)
            )
            for u in sorted(self._live):
                if x in self._masked_with[u]:
                    seed = pairwise_mask_seed(pair, self._keys[u].mask_key, config, x, u)
                    # u added +mask if u < x, else -mask: remove it.
                    masks.append((seed, -1 if u < x else 1))
        add_masks_inplace(total, masks, config.bits)  # the server's own running sum
        sum_float, sum_int = dequantize_sum(total, config)
        self._sum = None
        return AggregateResult(
            sum=sum_float,
            sum_int=sum_int,
            contributors=tuple(sorted(self._live)),
            dropped=tuple(sorted(set(config.cohort) - self._live)),
            threshold=t,
            neighbours=config.neighbours,
            rejected=dict(sorted({**self._rejected, **rejected}.items())),
        )
