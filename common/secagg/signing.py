"""Identity signatures of authenticated SecAgg+ (protocol v3), and what is derived from them.

Why (the attacks this closes, against a *malicious* coordinator that relays
every message): in SecAgg+ as an honest-but-curious protocol (v2) nothing
binds a site's X25519 keys to the site, so the coordinator can hand a victim
keys it made itself, decrypt the victim's Shamir shares and remove every mask
(key substitution); it can invent node ids (sybils) to pad a cohort; it chose
the neighbour-graph seed; and it could tell one neighbour "the victim
dropped" and another "the victim survived", collecting ``t`` shares of both
of the victim's secrets with only ``2t - k`` colluding neighbours (split
views). Version 3 follows the actively secure variant of Bonawitz et al.
(CCS 2017, §4, rounds 0-4 with signatures and the consistency check) over
the SecAgg+ graph (Bell et al., CCS 2020):

* **Identities bound in the configuration.** The round's configuration
  names, for every invited node id, the roster identity key (Ed25519; its
  private key never leaves the site; the roster is signed by an authority the
  site pins, :mod:`common.roster`) that speaks for it, all distinct. A site
  refuses a configuration that binds its own node id to another key, or
  names a key outside its roster.
* **Signed advertisements.** Each site signs, with its identity key, the
  message :func:`advertisement_message`: the round's full configuration
  digest (run, round, invited cohort *and its identities*, ``t``, ``k``,
  bits, ``d``, bound, scale), its node id, both public keys and its seed
  commitment. Every site verifies every advertisement it is given before it
  encrypts anything (:func:`verify_advertisements`): it must be signed by
  the identity the configuration binds to that node id, over this very
  configuration. So a key the coordinator made is never used, a node id
  counts only with its own roster member's signature, and all honest sites
  that exchange shares hold *the same* configuration (the digest is signed),
  in particular the same invited cohort ``C`` and the same node-to-identity
  binding. (Without the binding in the configuration, a colluding roster
  member outside the cohort could sign as one node id in one site's view and
  the coordinator's honest node could hold that id in another's, and the
  quorum argument below, which counts node ids, would fail.)
* **A graph seed the coordinator does not choose.** The neighbour graph's
  seed is :func:`graph_seed`, a hash of the configuration and of every
  verified advertisement the site was given (each with fresh keys the
  coordinator cannot predict); each site recomputes it. The coordinator's
  remaining freedom is *which* verified advertisements to leave out (claiming
  those sites dropped); the privacy claim below does not depend on the graph.
* **Signed consistency round.** After the masked inputs, every survivor signs
  :func:`consistency_message`: the configuration digest, the graph seed and
  the survivor set ``U3`` it was given. A site reveals shares only after it
  holds valid signatures from at least :func:`quorum` distinct, verified
  members of the cohort over *the identical message* it signed itself.

Why the quorum is ``max(t, floor((n + t - 1) / 2) + 1)`` and not ``t``
(``n = |C|``, the invited cohort that every honest neighbour of a victim
shares with the same identities, ``t - 1`` the most colluding sites
claimed): a split view needs one quorum over ``U3`` and another over
``U3'``, both signed over the same configuration digest; both are subsets of
``C``, so with quorum ``q`` they overlap in at least ``2q - n >= t`` node ids,
each bound to one identity, more than the ``t - 1`` colluders, hence in an
honest site, which signs one consistency message per round (it releases one
masked input per round, :mod:`client.releases`, and signs only after it). With ``q = t`` alone, a sparse graph (``k << n``) lets the coordinator
feed two disjoint groups of honest sites two different survivor sets, so
``t`` signatures prove nothing. The price: more than half of the invited
cohort must survive to the consistency round.

Every signature is domain-separated by a versioned label (no signature here
verifies as an audit head, an instruction or another stage's message), and
every signed field has a fixed size after its label.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.errors import ProtocolError
from common.secagg.params import SecAggConfig

IDENTITY_KEY_SIZE = 32
"""Raw Ed25519 public key bytes."""
SIGNATURE_SIZE = 64
"""An Ed25519 signature (RFC 8032)."""

LABEL_ADVERTISEMENT = b"fedseal/secagg/v3/advertisement\x00"
LABEL_CONSISTENCY = b"fedseal/secagg/v3/consistency\x00"
LABEL_GRAPH_SEED = b"fedseal/secagg/v3/graph-seed\x00"
LABEL_IDENTITY = b"fedseal/secagg/v3/identity\x00"
IDENTITY_CLAIM_SIZE = IDENTITY_KEY_SIZE + SIGNATURE_SIZE
"""A site's answer to the coordinator's identity query: its key and a signature."""
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")


def quorum(config: SecAggConfig) -> int:
    """Consistency signatures a site needs before it reveals: ``max(t, floor((n+t-1)/2)+1)``.

    See the module docstring: any two quorums of this size within the
    invited cohort share at least ``t`` members, so at least one honest site
    when at most ``t - 1`` sites collude with the coordinator.
    """
    return quorum_size(config.size, config.threshold)


def quorum_size(n: int, t: int) -> int:
    """:func:`quorum` for a cohort of ``n`` with threshold ``t``."""
    return max(t, (n + t - 1) // 2 + 1)


def tolerated_dropouts(n: int, t: int, k: int) -> int:
    """How many sites may vanish after the keys stage while the round still completes.

    Worst case over which sites vanish: every survivor needs ``t`` of its
    ``k`` neighbours alive (their shares remove its masks), so ``k - t``
    losses around one site are the most it survives; and the consistency
    stage needs :func:`quorum_size` survivors. A cohort of 3 with the
    smallest threshold that keeps a site's two secrets apart (``t = 2`` of
    ``k = 2``) tolerates none: one lost site fails the round.
    """
    return max(0, min(k - t, n - quorum_size(n, t)))


def advertisement_message(
    config: SecAggConfig, node_id: int, encryption_key: bytes, mask_key: bytes, commitment: bytes
) -> bytes:
    """What a site signs at ADVERTISE_KEYS (fixed sizes after the label)."""
    return b"".join(
        (
            LABEL_ADVERTISEMENT,
            config.digest(),
            _U64.pack(node_id),
            encryption_key,
            mask_key,
            commitment,
        )
    )


def consistency_message(config: SecAggConfig, seed: bytes, survivors: Sequence[int]) -> bytes:
    """What a survivor signs in the consistency round: configuration, graph seed, ``U3``."""
    return b"".join(
        (
            LABEL_CONSISTENCY,
            config.digest(),
            seed,
            _U32.pack(len(survivors)),
            struct.pack(f">{len(survivors)}Q", *survivors),
        )
    )


def identity_message(run_number: int, node_id: int) -> bytes:
    """What a site signs to tell the coordinator which roster identity speaks for its node id.

    Only the coordinator uses this (to fill in a configuration's identities
    and keep a site from claiming another's key); a site trusts the binding
    only through the configuration every advertisement signs.
    """
    return LABEL_IDENTITY + _U64.pack(run_number) + _U64.pack(node_id)


def graph_seed(config: SecAggConfig, advertisements: Sequence[bytes]) -> bytes:
    """The neighbour-graph seed: SHA-256 over the configuration and every advertisement entry.

    ``advertisements`` are the encoded entries (node id, keys, commitment,
    identity, signature) in ascending node order, exactly as every site
    receives them; each holds 64 bytes of fresh public keys, so nobody can
    steer the hash without leaving advertisements out.
    """
    digest = hashlib.sha256(LABEL_GRAPH_SEED)
    digest.update(config.digest())
    digest.update(_U32.pack(len(advertisements)))
    for entry in advertisements:
        digest.update(entry)
    return digest.digest()


class _Keys:
    """Parsed Ed25519 public keys, parsed once per process (parsing costs about a signature check)."""

    _cache: dict[bytes, Ed25519PublicKey] = {}

    @classmethod
    def get(cls, raw: bytes) -> Ed25519PublicKey:
        key = cls._cache.get(raw)
        if key is None:
            try:
                key = Ed25519PublicKey.from_public_bytes(raw)
            except ValueError:
                raise ProtocolError("an identity key is not a valid Ed25519 public key") from None
            if len(cls._cache) > 65_536:
                cls._cache.clear()
            cls._cache[raw] = key
        return key


def sign(identity: Ed25519PrivateKey, message: bytes) -> bytes:
    """Ed25519 signature of ``message`` under the site's identity key."""
    if not isinstance(identity, Ed25519PrivateKey):
        raise ProtocolError("a site identity must be an Ed25519 private key")
    return identity.sign(message)


def verifies(identity_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``message`` under ``identity_key``."""
    if len(identity_key) != IDENTITY_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        _Keys.get(identity_key).verify(signature, message)
    except (InvalidSignature, ProtocolError):
        return False
    return True


def check_bound_identities(
    config: SecAggConfig, node_id: int, own: bytes, members: frozenset[bytes]
) -> None:
    """A site's check of the configuration's identities, before it makes any key.

    Raises
    ------
    ProtocolError
        If the configuration binds this site's node id to another key, or
        binds any node to a key outside the roster (a sybil).
    """
    if len(set(config.identities)) != len(config.identities):
        raise ProtocolError("the configuration binds one identity to several nodes")
    if config.identity_of(node_id) != own:
        raise ProtocolError(
            f"the configuration binds node {node_id} to another identity than this site's"
        )
    strangers = [
        n for n, key in zip(config.cohort, config.identities, strict=True) if key not in members
    ]
    if strangers:
        raise ProtocolError(
            f"the configuration binds nodes {strangers[:5]} to identities that are not in the roster"
        )


def public_bytes(identity: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key of a site identity."""
    return identity.public_key().public_bytes_raw()


@dataclass(frozen=True, slots=True)
class Verified:
    """Advertisements that passed :func:`verify_advertisements`, by node id."""

    identities: dict[int, bytes]
    """Node id -> the roster identity key that signed its advertisement."""
    rejected: dict[int, str]
    """Node id -> why its advertisement was not accepted."""


def verify_advertisements(
    config: SecAggConfig,
    entries: Mapping[int, tuple[bytes, bytes, bytes, bytes, bytes]],
    members: frozenset[bytes] | None,
) -> Verified:
    """Check each (encryption key, mask key, commitment, identity key, signature) by node id.

    An entry is accepted when its node is in the cohort, its identity is the
    one the configuration binds to the node and is in ``members`` (the pinned
    roster's identity keys; None: not checked against a roster, which only a
    coordinator filtering for liveness may do), and its signature verifies
    over :func:`advertisement_message` for *this* configuration. Two node
    ids with one identity are both rejected (one site, one vote).
    """
    identities: dict[int, bytes] = {}
    rejected: dict[int, str] = {}
    for node, (enc, mask, commitment, identity, signature) in entries.items():
        if not config.contains(node):
            rejected[node] = "advertisement for a node outside the cohort"
        elif identity != config.identity_of(node):
            rejected[node] = (
                "advertisement signed by another identity than the one bound to the node"
            )
        elif members is not None and identity not in members:
            rejected[node] = "advertisement signed by an identity that is not in the roster"
        elif not verifies(
            identity, advertisement_message(config, node, enc, mask, commitment), signature
        ):
            rejected[node] = "advertisement signature does not verify"
        else:
            identities[node] = identity
    owners: dict[bytes, list[int]] = {}
    for node, identity in identities.items():
        owners.setdefault(identity, []).append(node)
    for nodes in owners.values():
        if len(nodes) > 1:
            for node in nodes:
                del identities[node]
                rejected[node] = f"one identity advertised for several nodes {sorted(nodes)}"
    return Verified(identities, rejected)
