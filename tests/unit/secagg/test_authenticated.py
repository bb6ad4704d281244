"""Authenticated SecAgg+ (protocol v3): what a malicious coordinator can no longer do.

Every test drives the real client and server state machines (every message
through its wire encoding) and plays the coordinator by hand where it
misbehaves. Each refusal is asserted with its specific error, and each test
is built so that it fails if the check it names were removed (the comment
says what would happen then). The split-view tests count the shares the
coordinator obtains per secret and include control runs, with the quorum
check bypassed or the configuration's identity binding ignored, which do
recover the victim's input.

Every configuration here binds node ``u`` to the fixed identity of site ``u``
(:func:`_site`) unless a test binds otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import itertools
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import common.secagg.client as client_module
from common.crypto import aead
from common.crypto.commitment import commit_seed, opens
from common.crypto.keys import generate_key_pair, key_pair_from_private_bytes
from common.crypto.prg import add_masks_inplace
from common.crypto.shamir import VALUE_SIZE, Share, combine_shares, decode_value
from common.errors import ConfigurationError, ProtocolAbort, ProtocolError
from common.rng import secure_bytes, seeded_generator
from common.secagg import SecAggClient, SecAggServer, make_config, signing
from common.secagg.client import (
    pairwise_mask_seed,
    self_mask_seed,
    share_associated_data,
    share_encryption_key,
)
from common.secagg.graph import neighbour_graph
from common.secagg.messages import (
    MESSAGE_TYPES,
    AdvertiseKeysReply,
    AdvertiseKeysRequest,
    Advertisement,
    Ciphertext,
    CollectMaskedReply,
    CollectMaskedRequest,
    ConsistencyReply,
    ConsistencyRequest,
    ShareKeysReply,
    ShareKeysRequest,
    Signed,
    UnmaskRequest,
)
from common.secagg.params import SecAggConfig
from common.secagg.quantize import lift_signed, quantize
from common.secagg.signing import (
    advertisement_message,
    consistency_message,
    graph_seed,
    public_bytes,
    quorum,
    sign,
)
from common.secagg.simulate import members_of
from common.secagg.stages import Stage

RUN, ROUND, D = 11, 4, 8
COHORT = (1, 2, 3, 4, 5)

_SITES: dict[Any, Ed25519PrivateKey] = {}


def _site(name: Any) -> Ed25519PrivateKey:
    """Site ``name``'s identity key: one fixed roster for every test here (node u is site u).

    Fixed (derived from the name) so that every configuration built by :func:`_config`
    binds the same key to the same node, as a pinned roster does from round to round.
    """
    if name not in _SITES:
        seed = hashlib.sha256(b"fedseal test site " + repr(name).encode()).digest()
        _SITES[name] = Ed25519PrivateKey.from_private_bytes(seed)
    return _SITES[name]


def _roster(names: Iterable[Any]) -> dict[Any, Ed25519PrivateKey]:
    return {name: _site(name) for name in names}


def _config(
    cohort: Sequence[int] = COHORT,
    *,
    threshold: int | float = 3,
    bind: Mapping[int, Any] | None = None,
    **kw: Any,
) -> SecAggConfig:
    """A configuration binding node ``u`` to site ``bind.get(u, u)``'s identity."""
    bind = bind or {}
    args: dict[str, Any] = {
        "run_id": RUN,
        "round": ROUND,
        "cohort": list(cohort),
        "identities": [public_bytes(_site(bind.get(u, u))) for u in cohort],
        "threshold": threshold,
        "value_bound": 1.0,
        "vector_length": D,
    }
    args.update(kw)
    return make_config(**args)


def _wire(message: Any, config: SecAggConfig) -> Any:
    return type(message).decode(message.encode(), config)


class Round:
    """An honest round stage by stage; tests take over the coordinator at any point."""

    def __init__(
        self,
        config: SecAggConfig,
        *,
        identities: Mapping[int, Ed25519PrivateKey] | None = None,
        min_verified: int = 2,
    ) -> None:
        self.config = config
        self.identities = dict(identities or _roster(config.cohort))
        self.members = members_of(self.identities)
        self.min_verified = min_verified
        self.clients = {
            u: SecAggClient(u, config, self.identities[u], self.members, min_verified=min_verified)
            for u in config.cohort
        }
        self.server = SecAggServer(config, self.members)
        rng = seeded_generator(config.round)
        self.inputs = {u: rng.uniform(-1.0, 1.0, config.vector_length) for u in config.cohort}

    def each(self, requests: Mapping[int, Any], act: Any, skip: Iterable[int] = ()) -> list[Any]:
        gone = set(skip)
        return [
            _wire(act(u, _wire(r, self.config)), self.config)
            for u, r in requests.items()
            if u not in gone
        ]

    def advertise(self, skip: Iterable[int] = ()) -> dict[int, ShareKeysRequest]:
        self.advertise_requests = self.server.start()
        self.keys = self.each(
            self.advertise_requests, lambda u, r: self.clients[u].advertise_keys(r), skip
        )
        self.share = self.server.receive_advertise_keys(self.keys)
        return self.share

    def share_keys(self, skip: Iterable[int] = ()) -> dict[int, CollectMaskedRequest]:
        self.shares = self.each(self.share, lambda u, r: self.clients[u].share_keys(r), skip)
        self.collect = self.server.receive_share_keys(self.shares)
        return self.collect

    def masked(self, skip: Iterable[int] = ()) -> dict[int, ConsistencyRequest]:
        self.masked_replies = self.each(
            self.collect,
            lambda u, r: self.clients[u].collect_masked(r, self.inputs[u], seeded_generator(u)),
            skip,
        )
        self.check = self.server.receive_masked(self.masked_replies)
        return self.check

    def consistency(self, skip: Iterable[int] = ()) -> dict[int, UnmaskRequest]:
        self.signed = self.each(self.check, lambda u, r: self.clients[u].consistency(r), skip)
        self.unmask_requests = self.server.receive_consistency(self.signed)
        return self.unmask_requests

    def unmask(self, skip: Iterable[int] = ()) -> Any:
        self.revealed = self.each(
            self.unmask_requests, lambda u, r: self.clients[u].unmask(r), skip
        )
        return self.server.receive_unmask(self.revealed)

    def expected(self, contributors: Iterable[int]) -> np.ndarray:
        return np.sum(
            [
                lift_signed(
                    quantize(self.inputs[u], self.config, seeded_generator(u)), self.config.bits
                )
                for u in contributors
            ],
            axis=0,
        )

    def fork(self, u: int) -> SecAggClient:
        """An independent copy of client ``u``'s current state (sealed and reopened)."""
        key = bytes(32)
        return SecAggClient.open(
            self.clients[u].seal(key),
            key,
            u,
            self.config,
            self.identities[u],
            self.members,
            min_verified=self.min_verified,
        )


def _signed_ad(
    config: SecAggConfig,
    node: int,
    identity: Ed25519PrivateKey,
    *,
    encryption_key: bytes | None = None,
    mask_key: bytes | None = None,
    commitment: bytes | None = None,
    signed_config: SecAggConfig | None = None,
) -> Advertisement:
    """An advertisement for ``node`` signed by ``identity`` (fresh keys unless given)."""
    enc = encryption_key or generate_key_pair().public_bytes
    mask = mask_key or generate_key_pair().public_bytes
    commit = commitment or commit_seed(
        secure_bytes(32), run_id=config.run_id, round=config.round, node_id=node
    )
    message = advertisement_message(signed_config or config, node, enc, mask, commit)
    return Advertisement(node, enc, mask, commit, public_bytes(identity), sign(identity, message))


def _with_ad(request: ShareKeysRequest, replacement: Advertisement) -> ShareKeysRequest:
    ads = {a.node_id: a for a in request.advertisements}
    ads[replacement.node_id] = replacement
    return dataclasses.replace(request, advertisements=tuple(ads[n] for n in sorted(ads)))


def _refuses_then_aborts(client: SecAggClient, request: ShareKeysRequest, match: str) -> None:
    """``client`` refuses ``request`` with ``match``, emits nothing and refuses the rest."""
    config = _config()
    with pytest.raises(ProtocolError, match=match) as refused:
        client.share_keys(_wire(request, config))
    assert type(refused.value) is ProtocolError  # a refusal, not a dropout-like abort
    assert client.stage is Stage.ADVERTISE_KEYS and client.neighbours == frozenset()
    assert client.graph_seed is None
    with pytest.raises(ProtocolAbort, match="already aborted"):
        client.collect_masked(
            CollectMaskedRequest(RUN, ROUND, client.node_id, ()), np.zeros(D), seeded_generator(0)
        )


# --- ADVERTISE_KEYS: the configuration's identity binding is checked first ---------------


def _counting_key_makers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every key pair or seed the client module makes from here on."""
    made: list[str] = []
    real_pair, real_bytes = client_module.generate_key_pair, client_module.secure_bytes

    def pair() -> Any:
        made.append("key pair")
        return real_pair()

    def random(size: int) -> bytes:
        made.append("seed")
        return real_bytes(size)

    monkeypatch.setattr(client_module, "generate_key_pair", pair)
    monkeypatch.setattr(client_module, "secure_bytes", random)
    return made


def _refuses_before_making_keys(
    monkeypatch: pytest.MonkeyPatch, client: SecAggClient, match: str
) -> None:
    made = _counting_key_makers(monkeypatch)
    with pytest.raises(ProtocolError, match=match) as refused:
        client.advertise_keys(AdvertiseKeysRequest(RUN, ROUND, client.node_id))
    assert type(refused.value) is ProtocolError
    assert made == [] and client.stage is Stage.INIT
    assert client._encryption is None and client._seed is None  # noqa: SLF001
    with pytest.raises(ProtocolAbort, match="already aborted"):  # and refuses the rest
        client.advertise_keys(AdvertiseKeysRequest(RUN, ROUND, client.node_id))


@pytest.mark.parametrize("other", [2, "x", "stranger"], ids=["cohort-member", "roster", "none"])
def test_advertise_keys_refuses_config_binding_its_node_to_another_key(
    monkeypatch: pytest.MonkeyPatch, other: Any
) -> None:
    # node 1 bound to site 2 (itself bound to node 2: swap them), to roster member x outside
    # the cohort, or to a key in no roster; site 1's identity is then unbound or elsewhere
    bind = {1: 2, 2: 1} if other == 2 else {1: other}
    config = _config(bind=bind)
    members = members_of(_roster([*COHORT, "x"]))
    client = SecAggClient(1, config, _site(1), members)
    _refuses_before_making_keys(
        monkeypatch, client, "binds node 1 to another identity than this site's"
    )
    # the same site with the honest configuration goes ahead
    honest = SecAggClient(1, _config(), _site(1), members)
    assert honest.advertise_keys(AdvertiseKeysRequest(RUN, ROUND, 1)).identity_key == (
        public_bytes(_site(1))
    )


def test_advertise_keys_refuses_config_binding_another_node_to_a_non_roster_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # node 4 bound to a key the pinned roster does not hold (a sybil the coordinator made)
    config = _config(bind={4: "sybil", 5: "sybil too"})
    members = members_of(_roster(COHORT))
    client = SecAggClient(1, config, _site(1), members)
    _refuses_before_making_keys(
        monkeypatch, client, r"binds nodes \[4, 5\] to identities that are not in the roster"
    )
    # a roster member outside the cohort may be bound (the roster is larger than a cohort)
    config = _config(bind={4: "x"})
    client = SecAggClient(1, config, _site(1), members_of(_roster([*COHORT, "x"])))
    assert client.advertise_keys(AdvertiseKeysRequest(RUN, ROUND, 1)).node_id == 1


def test_check_bound_identities_directly() -> None:
    members = members_of(_roster(COHORT))
    config = _config()
    for u in COHORT:
        signing.check_bound_identities(config, u, public_bytes(_site(u)), members)
    with pytest.raises(ProtocolError, match="binds node 3 to another identity"):
        signing.check_bound_identities(config, 3, public_bytes(_site(2)), members)
    with pytest.raises(ProtocolError, match="not in the roster"):
        signing.check_bound_identities(
            config, 3, public_bytes(_site(3)), members - {public_bytes(_site(5))}
        )
    with pytest.raises(ConfigurationError, match="not in the cohort"):
        signing.check_bound_identities(config, 6, public_bytes(_site(3)), members)


# --- SHARE_KEYS: every advertisement is verified against the roster ----------------------


def test_client_construction_requires_its_identity_in_the_roster() -> None:
    config = _config()
    identities = _roster(config.cohort)
    members = members_of(identities)
    with pytest.raises(ConfigurationError, match="roster"):
        SecAggClient(1, config, Ed25519PrivateKey.generate(), members)
    with pytest.raises(ConfigurationError, match="roster"):
        SecAggClient(1, config, identities[1], set(members))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="Ed25519"):
        SecAggClient(1, config, bytes(32), members)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="min_verified"):
        SecAggClient(1, config, identities[1], members, min_verified=1)


def test_honest_round_every_site_verifies_every_advertisement() -> None:
    r = Round(_config())
    share = r.advertise()
    assert r.server.rejected == {}
    for request in share.values():
        assert [a.node_id for a in request.advertisements] == list(COHORT)  # own included
        assert {a.identity_key for a in request.advertisements} == r.members
    r.share_keys()
    r.masked()
    r.consistency()
    result = r.unmask()
    assert np.array_equal(result.sum_int, r.expected(COHORT))


def test_share_keys_refuses_advertisement_signed_by_non_member() -> None:
    r = Round(_config())
    share = r.advertise()
    outsider = Ed25519PrivateKey.generate()  # a valid signature, but not a roster identity
    forged = _signed_ad(r.config, 2, outsider)
    # the configuration binds node 2 to site 2, so the binding refuses it first; without
    # it (and the roster check) the signature verifies and the client would share with it
    _refuses_then_aborts(
        r.clients[1], _with_ad(share[1], forged), "node 2: .*another identity than the one bound"
    )
    # the roster check stands behind the binding: a configuration binding node 2 to the
    # outsider (which every site refuses at ADVERTISE_KEYS) still does not get it verified
    sybil_config = _config(bind={2: "outsider"})
    forged = _signed_ad(sybil_config, 2, _site("outsider"))
    verified = signing.verify_advertisements(
        sybil_config, {2: forged.fields()}, members_of(_roster(COHORT))
    )
    assert verified.identities == {} and "not in the roster" in verified.rejected[2]


def test_share_keys_refuses_bad_signature() -> None:
    r = Round(_config())
    share = r.advertise()
    genuine = next(a for a in share[1].advertisements if a.node_id == 2)
    flipped = genuine.signature[:5] + bytes([genuine.signature[5] ^ 1]) + genuine.signature[6:]
    bad = dataclasses.replace(genuine, signature=flipped)
    _refuses_then_aborts(r.clients[1], _with_ad(share[1], bad), "node 2: .*does not verify")
    # the signature covers every field: a genuine signature over another mask key fails too
    rekeyed = dataclasses.replace(genuine, mask_key=generate_key_pair().public_bytes)
    _refuses_then_aborts(r.clients[3], _with_ad(share[3], rekeyed), "node 2: .*does not verify")


@pytest.mark.parametrize(
    "other",
    [
        {"cohort": [1, 2, 3, 4, 5, 6]},  # another invited cohort
        {"threshold": 4},  # another t
        {"round": ROUND + 1},
        {"vector_length": D + 1},
        {"bind": {5: "x"}},  # another binding (node 5 to roster member x)
        {"bind": {4: 5, 5: 4}},  # the same keys, two nodes' swapped
    ],
    ids=["cohort", "threshold", "round", "vector-length", "identity", "swapped-identities"],
)
def test_share_keys_refuses_valid_signature_over_another_configuration(
    other: dict[str, Any],
) -> None:
    config = _config()
    other_config = _config(**other)
    assert other_config.digest() != config.digest()
    r = Round(config)
    share = r.advertise()
    genuine = next(a for a in share[1].advertisements if a.node_id == 2)
    # node 2's own identity signed these very keys, but for another round configuration
    replayed = _signed_ad(
        config,
        2,
        r.identities[2],
        encryption_key=genuine.encryption_key,
        mask_key=genuine.mask_key,
        commitment=genuine.commitment,
        signed_config=other_config,
    )
    assert signing.verifies(
        replayed.identity_key,
        advertisement_message(other_config, 2, *replayed.fields()[:3]),
        replayed.signature,
    )
    _refuses_then_aborts(r.clients[1], _with_ad(share[1], replayed), "node 2: .*does not verify")


def test_share_keys_refuses_advertisement_signed_by_another_roster_member() -> None:
    r = Round(_config())
    share = r.advertise()
    # roster member 3 (colluding) signs a second advertisement, for node 2 (a sybil): the
    # signature verifies under a roster key, but the configuration binds node 2 to site 2
    sybil = _signed_ad(r.config, 2, r.identities[3])
    request = _with_ad(share[1], sybil)
    verified = signing.verify_advertisements(
        r.config, {a.node_id: a.fields() for a in request.advertisements}, r.members
    )
    assert signing.verifies(
        sybil.identity_key, advertisement_message(r.config, 2, *sybil.fields()[:3]), sybil.signature
    )
    assert set(verified.rejected) == {2}  # node 3's own advertisement stays valid
    assert "another identity than the one bound" in verified.rejected[2]
    _refuses_then_aborts(
        r.clients[1], request, "node 2: advertisement signed by another identity than the one bound"
    )
    # a roster member outside the cohort, signing for a cohort node, is refused alike
    outside = _signed_ad(r.config, 4, _site("x"))
    members = members_of(_roster([*COHORT, "x"]))
    verified = signing.verify_advertisements(r.config, {4: outside.fields()}, members)
    assert "another identity than the one bound" in verified.rejected[4]


def test_verify_advertisements_one_identity_for_two_nodes_both_refused() -> None:
    """Defence in depth: the one-site-one-vote check behind the binding.

    :func:`make_config` refuses a configuration binding one key to two nodes, so this
    check is reachable only with a configuration built around it (the dataclass itself
    does not validate); it still refuses both node ids.
    """
    config = _config()
    shared = public_bytes(_site(3))
    unchecked = dataclasses.replace(
        config, identities=tuple(shared if u in (2, 3) else config.identity_of(u) for u in COHORT)
    )
    entries = {u: _signed_ad(unchecked, u, _site(3)).fields() for u in (2, 3)}
    verified = signing.verify_advertisements(unchecked, entries, members_of(_roster(COHORT)))
    assert verified.identities == {}
    assert all("one identity advertised for several" in why for why in verified.rejected.values())
    assert set(verified.rejected) == {2, 3}


def test_share_keys_refuses_own_advertisement_altered() -> None:
    r = Round(_config())
    share = r.advertise()
    # The coordinator swaps in another advertisement of node 1 that node 1's identity did
    # sign (a second session of the same site in this round): every signature verifies, so
    # only the comparison with what this client sent catches it.
    twin = SecAggClient(1, r.config, r.identities[1], r.members)
    other = twin.advertise_keys(AdvertiseKeysRequest(RUN, ROUND, 1)).advertisement()
    request = _with_ad(share[1], other)
    verified = signing.verify_advertisements(
        r.config, {a.node_id: a.fields() for a in request.advertisements}, r.members
    )
    assert verified.rejected == {}
    _refuses_then_aborts(r.clients[1], request, "altered this site's own key advertisement")


def test_share_keys_refuses_a_request_without_its_own_advertisement() -> None:
    r = Round(_config())
    share = r.advertise()
    others = tuple(a for a in share[1].advertisements if a.node_id != 1)
    # the message layer refuses such a request at construction and decoding ...
    with pytest.raises(ProtocolError, match="does not include the message's own node 1"):
        dataclasses.replace(share[1], advertisements=others)
    data = bytearray(ShareKeysRequest(RUN, ROUND, 2, others).encode())
    data[22:30] = (1).to_bytes(8, "big")  # the header's node id: now addressed to node 1
    with pytest.raises(ProtocolError, match="does not include the message's own node 1"):
        ShareKeysRequest.decode(bytes(data), r.config)
    # ... and the client on its own, for a request object built around those checks: the
    # other four advertisements all verify and node 1 would have 3 = t neighbours, but
    # without its own advertisement it cannot know that the view holds its keys
    short = dataclasses.replace(share[1])
    object.__setattr__(short, "advertisements", others)
    with pytest.raises(ProtocolError, match="left out this site's own key advertisement"):
        r.clients[1].share_keys(short)
    assert r.clients[1].stage is Stage.ADVERTISE_KEYS and r.clients[1].graph_seed is None
    with pytest.raises(ProtocolAbort, match="already aborted"):
        r.clients[1].share_keys(share[1])


def test_share_keys_fewer_than_min_verified_members_aborts() -> None:
    r = Round(_config(), min_verified=5)
    share = r.advertise()
    # the coordinator claims node 5 never advertised: 4 verified members remain, and node 1
    # still has 3 = t neighbours, so only the site's own floor refuses the round
    short = dataclasses.replace(
        share[1], advertisements=tuple(a for a in share[1].advertisements if a.node_id != 5)
    )
    with pytest.raises(ProtocolAbort, match="fewer than this site's minimum 5"):
        r.clients[1].share_keys(_wire(short, r.config))
    relaxed = Round(_config(), min_verified=4)
    share = relaxed.advertise()
    short = dataclasses.replace(
        share[1], advertisements=tuple(a for a in share[1].advertisements if a.node_id != 5)
    )
    reply = relaxed.clients[1].share_keys(_wire(short, relaxed.config))
    assert {c.node_id for c in reply.ciphertexts} == {2, 3, 4}


@pytest.mark.parametrize(
    ("case", "out", "reason"),
    [
        ("outsider", {6}, "another identity than the one bound to the node"),
        ("bad-signature", {6}, "does not verify"),
        ("sybil", {6}, "another identity than the one bound to the node"),
        ("collision", {5, 6}, "advertised a public key that another site advertised too"),
    ],
)
def test_server_filters_bad_advertisements_and_the_round_completes_without_them(
    case: str, out: set[int], reason: str
) -> None:
    r = Round(_config(range(1, 9), threshold=4))  # n = 8, k = 7, t = 4, quorum 6
    assert quorum(r.config) == 6
    replies = {u: r.clients[u].advertise_keys(q) for u, q in r.server.start().items()}
    if case == "outsider":
        ad = _signed_ad(r.config, 6, Ed25519PrivateKey.generate())
    elif case == "bad-signature":
        ad = dataclasses.replace(replies[6].advertisement(), signature=bytes(64))
    elif case == "sybil":  # roster member 5 also signs for node 6
        ad = _signed_ad(r.config, 6, r.identities[5])
    else:  # node 6 signs node 5's mask key as its own
        ad = _signed_ad(r.config, 6, r.identities[6], mask_key=replies[5].mask_key)
    replies[6] = AdvertiseKeysReply(RUN, ROUND, 6, *ad.fields())
    r.share = r.server.receive_advertise_keys([_wire(x, r.config) for x in replies.values()])
    assert set(r.server.rejected) == out
    assert all(reason in why for why in r.server.rejected.values())
    kept = [u for u in r.config.cohort if u not in out]
    assert sorted(r.share) == kept
    assert all([a.node_id for a in q.advertisements] == kept for q in r.share.values())
    r.share_keys()
    r.masked()
    r.consistency()
    result = r.unmask()
    assert set(result.dropped) == out
    assert np.array_equal(result.sum_int, r.expected(kept))


# --- key substitution, end to end ---------------------------------------------------------


def _substitute_keys(r: Round, victim: int, *, resign: bool) -> tuple[ShareKeysRequest, dict]:
    """The victim's share request with every neighbour's keys replaced by the coordinator's."""
    share = r.advertise()
    fake: dict[int, Any] = {}
    request = share[victim]
    coordinator = Ed25519PrivateKey.generate()
    for ad in share[victim].advertisements:
        if ad.node_id == victim:
            continue
        enc, mask = generate_key_pair(), generate_key_pair()
        fake[ad.node_id] = enc
        if resign:  # the coordinator signs with its own key: it holds no roster identity
            forged = _signed_ad(
                r.config,
                ad.node_id,
                coordinator,
                encryption_key=enc.public_bytes,
                mask_key=mask.public_bytes,
                commitment=ad.commitment,
            )
        else:  # or keeps the neighbour's identity and signature over the original keys
            forged = dataclasses.replace(
                ad, encryption_key=enc.public_bytes, mask_key=mask.public_bytes
            )
        request = _with_ad(request, forged)
    return request, fake


@pytest.mark.parametrize("resign", [False, True], ids=["kept-signature", "coordinator-signed"])
def test_key_substitution_victim_refuses_and_never_emits_a_ciphertext(resign: bool) -> None:
    r = Round(_config())
    victim = 1
    request, _ = _substitute_keys(r, victim, resign=resign)
    reason = "another identity than the one bound" if resign else "does not verify"
    _refuses_then_aborts(r.clients[victim], request, f"node 2: .*{reason}")
    # the other sites got the honest view and go on; the victim's secrets never left it
    # even the honest request is refused now: the victim's secrets never leave it this round
    with pytest.raises(ProtocolAbort, match="already aborted"):
        r.clients[victim].share_keys(r.share[victim])
    assert r.clients[victim].stage is Stage.ADVERTISE_KEYS


def test_key_substitution_control_without_verification_the_coordinator_learns_both_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Control: with advertisement verification switched off, the same attack succeeds."""
    r = Round(_config())
    victim = 1
    request, fake = _substitute_keys(r, victim, resign=True)
    accept_all = lambda config, entries, members: signing.Verified(  # noqa: E731
        {node: fields[3] for node, fields in entries.items()}, {}
    )
    monkeypatch.setattr(client_module, "verify_advertisements", accept_all)
    reply = r.clients[victim].share_keys(_wire(request, r.config))
    own = next(a for a in request.advertisements if a.node_id == victim)
    key_shares, seed_shares = [], []
    for c in reply.ciphertexts:  # the coordinator holds every "neighbour's" private key
        key = share_encryption_key(fake[c.node_id], own.encryption_key, r.config, c.node_id, victim)
        plain = aead.decrypt(key, c.data, share_associated_data(r.config, victim, c.node_id))
        index = r.config.share_index(c.node_id)
        key_shares.append(Share(index, decode_value(plain[:VALUE_SIZE])))
        seed_shares.append(Share(index, decode_value(plain[VALUE_SIZE:])))
    t = r.config.threshold
    mask_key = combine_shares(key_shares, threshold=t)
    seed = combine_shares(seed_shares, threshold=t)
    assert key_pair_from_private_bytes(mask_key).public_bytes == own.mask_key
    assert opens(own.commitment, seed, run_id=RUN, round=ROUND, node_id=victim)


# --- the graph seed -----------------------------------------------------------------------


def test_graph_seed_is_derived_from_the_advertisements_on_both_sides() -> None:
    config = _config(range(1, 21), threshold=0.6)  # sparse: k = 14 of 19
    assert config.neighbours < config.size - 1
    r = Round(config)
    share = r.advertise()
    r.share_keys()
    ads = share[1].advertisements
    assert all(q.advertisements == ads for q in share.values())  # everyone's one view
    seed = graph_seed(config, [a.encode() for a in ads])
    graph = neighbour_graph(config, seed)
    assert r.server.graph_seed == seed and r.server.graph == graph
    for u, client in r.clients.items():
        assert client.graph_seed == seed
        assert client.neighbours == graph[u]
    for reply in r.shares:
        assert {c.node_id for c in reply.ciphertexts} == graph[reply.node_id]


def test_graph_seed_changes_with_any_one_advertisement() -> None:
    config = _config(range(1, 21), threshold=0.6)
    r = Round(config)
    ads = list(r.advertise()[1].advertisements)
    base = graph_seed(config, [a.encode() for a in ads])
    seeds = {base}
    for i, ad in enumerate(ads):
        for field in ("encryption_key", "mask_key", "commitment", "identity_key", "signature"):
            value = getattr(ad, field)
            changed = dataclasses.replace(ad, **{field: bytes([value[0] ^ 1]) + value[1:]})
            entries = [a.encode() for a in ads[:i]] + [changed.encode()]
            entries += [a.encode() for a in ads[i + 1 :]]
            seeds.add(graph_seed(config, entries))
        seeds.add(graph_seed(config, [a.encode() for a in ads[:i] + ads[i + 1 :]]))  # left out
    assert len(seeds) == 1 + len(ads) * 6
    # and the graph follows the seed
    assert neighbour_graph(config, base) != neighbour_graph(config, bytes(32))
    # fresh keys every round: the same configuration twice gives two seeds
    again = Round(config)
    again.advertise()
    assert again.server.graph_seed != r.server.graph_seed


def test_graph_seed_cannot_be_chosen_by_the_coordinator() -> None:
    names = {f.name for f in dataclasses.fields(SecAggConfig)}
    assert not any("seed" in name or "graph" in name for name in names)
    for function in (make_config, SecAggServer.__init__, SecAggClient.__init__):
        params = inspect.signature(function).parameters
        assert not any("seed" in p or "graph" in p for p in params), function
    with pytest.raises(TypeError, match="graph_seed"):
        make_config(  # type: ignore[call-arg]
            run_id=1,
            round=1,
            cohort=[1, 2, 3],
            identities=[public_bytes(_site(u)) for u in (1, 2, 3)],
            threshold=2,
            value_bound=1.0,
            vector_length=1,
            graph_seed=bytes(32),
        )
    for message in MESSAGE_TYPES:
        fields = {f.name for f in dataclasses.fields(message)}
        assert not any(name.endswith("seed") or "graph" in name for name in fields), message
    # the encoded configuration has no room for one: its size is the documented layout
    config = _config(range(1, 21), threshold=0.6)
    assert len(config.encode()) == (4 + 1 + 8 + 8 + 4) + (8 + 32) * 20 + (4 + 4 + 4 + 8 + 1 + 8)


# --- the consistency round ----------------------------------------------------------------


def _consistent(n: int = 5, skip_masked: Iterable[int] = ()) -> Round:
    r = Round(_config(range(1, n + 1)))
    r.advertise()
    r.share_keys()
    r.masked(skip_masked)
    r.consistency()
    return r


def _signatures(r: Round, nodes: Iterable[int], survivors: tuple[int, ...]) -> tuple[Signed, ...]:
    """Valid signatures of ``nodes`` over ``survivors`` (as colluding signers could make)."""
    seed = r.server.graph_seed
    assert seed is not None
    message = consistency_message(r.config, seed, survivors)
    return tuple(Signed(u, sign(r.identities[u], message)) for u in sorted(nodes))


def test_consistency_honest_round_signatures_cover_config_seed_and_u3() -> None:
    r = _consistent(5, skip_masked=[5])
    assert r.check[1].survivors == (1, 2, 3, 4)
    message = consistency_message(r.config, r.clients[1].graph_seed, (1, 2, 3, 4))
    for reply in r.signed:
        assert signing.verifies(public_bytes(r.identities[reply.node_id]), message, reply.signature)
    request = r.unmask_requests[1]
    assert request.survivors == (1, 2, 3, 4) and len(request.signatures) == quorum(r.config) == 4
    result = r.unmask()
    assert result.dropped == (5,)
    assert np.array_equal(result.sum_int, r.expected((1, 2, 3, 4)))


def test_unmask_refuses_survivor_set_other_than_the_signed_one() -> None:
    r = _consistent(5)
    signed = r.unmask_requests[1]
    assert signed.survivors == COHORT
    for other in ((1, 2, 3, 4), (1, 2, 3, 5)):
        client = r.fork(1)
        # the signatures are valid over the set node 1 signed; without the comparison node 1
        # would reveal by that set while the coordinator claims another
        with pytest.raises(ProtocolError, match="not the one this site signed"):
            client.unmask(dataclasses.replace(signed, survivors=other))
        with pytest.raises(ProtocolAbort, match="already aborted"):
            client.unmask(signed)
    assert r.clients[1].unmask(signed).seed_shares  # the genuine request is answered


def test_unmask_refuses_forged_or_invalid_signature() -> None:
    r = _consistent(5)
    signed = r.unmask_requests[1]
    assert len(signed.signatures) == 4
    first = signed.signatures[1]
    u = first.node_id
    message_other = consistency_message(r.config, r.server.graph_seed, (1, 2, 3, 4))
    forgeries = {
        "flipped bit": first.signature[:9] + bytes([first.signature[9] ^ 4]) + first.signature[10:],
        "other survivor set": sign(r.identities[u], message_other),
        "other member's key": sign(
            r.identities[next(v for v in COHORT if v != u)],
            consistency_message(r.config, r.server.graph_seed, signed.survivors),
        ),
        "other graph seed": sign(
            r.identities[u], consistency_message(r.config, bytes(32), signed.survivors)
        ),
    }
    for name, forged in forgeries.items():
        signatures = tuple(
            Signed(s.node_id, forged) if s.node_id == u else s for s in signed.signatures
        )
        client = r.fork(1)
        with pytest.raises(ProtocolError, match=f"node {u} does not verify") as refused:
            client.unmask(_wire(dataclasses.replace(signed, signatures=signatures), r.config))
        assert type(refused.value) is ProtocolError, name


def test_unmask_refuses_signature_from_a_non_survivor() -> None:
    r = _consistent(5, skip_masked=[5])  # U3 = (1, 2, 3, 4)
    signed = r.unmask_requests[1]
    # node 5 is a verified member (its advertisement was accepted) and a colluder signs
    # with its identity; with 2, 3, 4 that makes 4 = quorum valid signatures, so without
    # the survivor check node 1 would reveal
    signatures = _signatures(r, [2, 3, 4], signed.survivors) + _signatures(r, [5], signed.survivors)
    with pytest.raises(ProtocolError, match="node 5, not a survivor"):
        r.fork(1).unmask(_wire(dataclasses.replace(signed, signatures=signatures), r.config))


def test_unmask_fewer_than_quorum_signatures_aborts() -> None:
    r = _consistent(5)
    signed = r.unmask_requests[1]
    needed = quorum(r.config)
    assert needed == 4 > r.config.threshold == 3
    for count in range(needed):
        client = r.fork(1)
        short = dataclasses.replace(signed, signatures=signed.signatures[:count])
        with pytest.raises(ProtocolAbort, match=f"{count} consistency signatures, fewer than"):
            client.unmask(_wire(short, r.config))
    assert r.fork(1).unmask(signed).seed_shares


def test_unmask_request_duplicated_signer_refused_at_construct_and_decode() -> None:
    r = _consistent(5)
    signed = r.unmask_requests[1]
    twice = (signed.signatures[0], signed.signatures[0], *signed.signatures[1:])
    with pytest.raises(ProtocolError, match="no duplicates"):
        dataclasses.replace(signed, signatures=twice)
    data = bytearray(signed.encode())
    entry = 8 + 64
    start = 30 + 8 + 8 * len(signed.survivors)
    data[start + entry : start + 2 * entry] = data[start : start + entry]  # repeat the first
    with pytest.raises(ProtocolError, match="no duplicates"):
        UnmaskRequest.decode(bytes(data), r.config)
    with pytest.raises(ProtocolError, match="no duplicates"):
        UnmaskRequest(RUN, ROUND, 1, (1, 2), (Signed(3, bytes(64)), Signed(2, bytes(64))))


def test_consistency_signed_once_per_round() -> None:
    r = Round(_config())
    r.advertise()
    r.share_keys()
    # no signature before the masked inputs
    early = ConsistencyRequest(RUN, ROUND, 1, COHORT)
    with pytest.raises(ProtocolError, match="CONSISTENCY cannot follow SHARE_KEYS"):
        r.fork(1).consistency(early)
    r.masked()
    first = r.check[1]
    r.clients[1].consistency(first)
    for again in (first, ConsistencyRequest(RUN, ROUND, 1, (1, 2, 3, 4))):
        client = r.fork(1)
        with pytest.raises(ProtocolError, match="CONSISTENCY cannot follow CONSISTENCY"):
            client.consistency(again)
        with pytest.raises(ProtocolAbort, match="already aborted"):
            client.unmask(UnmaskRequest(RUN, ROUND, 1, COHORT, ()))


def test_consistency_refuses_unverified_nodes_and_sets_below_quorum() -> None:
    r = Round(_config(range(1, 7)))  # n = 6, k = 5, t = 3, quorum 5
    r.advertise(skip=[6])  # node 6 never advertised: no site verified it
    r.share_keys()
    r.masked()
    assert r.check[1].survivors == (1, 2, 3, 4, 5)
    with pytest.raises(ProtocolError, match=r"unverified nodes \[6\]"):
        r.fork(1).consistency(ConsistencyRequest(RUN, ROUND, 1, (1, 2, 3, 4, 5, 6)))
    with pytest.raises(ProtocolAbort, match="cannot reach the consistency quorum 5"):
        r.fork(1).consistency(ConsistencyRequest(RUN, ROUND, 1, (1, 2, 3, 4)))
    with pytest.raises(ProtocolAbort, match="fewer than the threshold"):
        r.fork(1).consistency(ConsistencyRequest(RUN, ROUND, 1, (1, 2, 3)))


def test_server_consistency_bad_signature_names_site_round_completes_or_aborts() -> None:
    r = Round(_config(range(1, 7)))  # n = 6, quorum 5
    r.advertise()
    r.share_keys()
    r.masked()
    signed = [r.clients[u].consistency(_wire(q, r.config)) for u, q in r.check.items()]
    bad = dataclasses.replace(signed[2], signature=bytes(64))
    unmask = r.server.receive_consistency([*signed[:2], bad, *signed[3:]])
    assert r.server.rejected == {3: "stage consistency: signature does not verify"}
    assert set(unmask) == {1, 2, 4, 5, 6}  # node 3 reveals nothing; its input stays in
    assert all(3 not in {s.node_id for s in q.signatures} for q in unmask.values())
    r.unmask_requests = unmask
    result = r.unmask()
    assert result.contributors == tuple(range(1, 7))
    assert np.array_equal(result.sum_int, r.expected(range(1, 7)))

    r = Round(_config(range(1, 7)))
    r.advertise()
    r.share_keys()
    r.masked()
    signed = [r.clients[u].consistency(_wire(q, r.config)) for u, q in r.check.items()]
    two_bad = [
        dataclasses.replace(s, signature=bytes(64)) if s.node_id in (2, 5) else s for s in signed
    ]
    with pytest.raises(ProtocolAbort, match="4 valid signatures, fewer than the quorum 5"):
        r.server.receive_consistency(two_bad)


def test_quorum_any_two_quorums_share_an_honest_site() -> None:
    for n in range(2, 80):
        for t in range(1, n):
            q = quorum(_QuorumOnly(n, t))  # type: ignore[arg-type]
            assert t <= q <= n
            assert 2 * q - n >= t  # two quorums in the cohort overlap in > t - 1 colluders
    assert quorum(_config()) == 4


@dataclasses.dataclass
class _QuorumOnly:
    size: int
    threshold: int


# --- the split-view attack ----------------------------------------------------------------

VICTIM, COLLUDERS, HONEST = 1, (4, 5), (2, 3)
U3_SURVIVED = COHORT  # "the victim survived": reveal its self-mask seed shares
U3_DROPPED = (2, 3, 4, 5)  # "the victim dropped": reveal its mask-key shares


@dataclasses.dataclass
class Attack:
    """What the coordinator holds of the victim's two secrets after a split-view attempt."""

    seed_shares: dict[int, int]  # holder -> share of the victim's self-mask seed b
    key_shares: dict[int, int]  # holder -> share of the victim's mask private key
    refused: dict[int, str]  # honest site -> why it refused

    def recovered(self, r: Round) -> dict[str, bytes]:
        """The victim's secrets the coordinator can verifiably reconstruct."""
        t, config = r.config.threshold, r.config
        victim_ad = next(a for a in r.share[VICTIM].advertisements if a.node_id == VICTIM)
        found: dict[str, bytes] = {}
        for name, held in (("seed", self.seed_shares), ("key", self.key_shares)):
            if len(held) < t:
                continue
            shares = [Share(config.share_index(h), v) for h, v in held.items()]
            secret = combine_shares(shares, threshold=t)
            if name == "seed":
                assert opens(victim_ad.commitment, secret, run_id=RUN, round=ROUND, node_id=VICTIM)
            else:
                assert key_pair_from_private_bytes(secret).public_bytes == victim_ad.mask_key
            found[name] = secret
        return found


def _split_view_round() -> Round:
    config = _config(threshold=3, neighbours=4)  # n = 5, k = 4, t = 3: 2t - k = 2 colluders
    assert (config.size, config.neighbours, config.threshold) == (5, 4, 3)
    r = Round(config)
    r.advertise()
    r.share_keys()
    r.masked()  # every site, the victim included, sent its masked input
    return r


def _split_view(r: Round, views: Mapping[int, tuple[int, ...] | None]) -> Attack:
    """The coordinator gives each honest site ``views[site]`` to sign (None: nothing).

    It then asks every honest site to unmask with every valid signature it holds over that
    site's set: the honest ones it collected plus the colluders', who sign anything. The
    colluders' own shares of the victim's secrets are the coordinator's anyway.
    """
    attack = Attack(
        seed_shares={c: r.clients[c]._held[VICTIM][1] for c in COLLUDERS},  # noqa: SLF001
        key_shares={c: r.clients[c]._held[VICTIM][0] for c in COLLUDERS},  # noqa: SLF001
        refused={},
    )
    clients = {h: r.fork(h) for h in views}  # fresh honest state machines per attempt
    pool: dict[tuple[int, ...], list[Signed]] = {}
    for h, survivors in views.items():
        if survivors is None:
            continue
        try:
            reply = clients[h].consistency(ConsistencyRequest(RUN, ROUND, h, survivors))
        except ProtocolError as exc:
            attack.refused[h] = str(exc)
            continue
        pool.setdefault(survivors, []).append(Signed(h, reply.signature))
    for survivors in pool:
        pool[survivors] += _signatures(r, [c for c in COLLUDERS if c in survivors], survivors)
    for h, survivors in views.items():
        if survivors is None or h == VICTIM or h in attack.refused:
            continue
        signatures = tuple(sorted(pool[survivors], key=lambda s: s.node_id))
        request = UnmaskRequest(RUN, ROUND, h, survivors, signatures)
        try:
            reply = clients[h].unmask(_wire(request, r.config))
        except ProtocolError as exc:
            attack.refused[h] = str(exc)
            continue
        for share in reply.seed_shares:
            if share.owner == VICTIM:
                attack.seed_shares[h] = share.value
        for share in reply.key_shares:
            if share.owner == VICTIM:
                attack.key_shares[h] = share.value
    return attack


def _unmask_victim(r: Round, seed: bytes, mask_key: bytes) -> np.ndarray:
    """The victim's quantised input, from its masked vector and both of its secrets."""
    masked = next(m for m in r.masked_replies if m.node_id == VICTIM).masked.copy()
    pair = key_pair_from_private_bytes(mask_key)
    ads = {a.node_id: a for a in r.share[VICTIM].advertisements}
    masks = [(self_mask_seed(seed, r.config, VICTIM), -1)]
    for v in sorted(r.clients[VICTIM].neighbours):
        pair_seed = pairwise_mask_seed(pair, ads[v].mask_key, r.config, VICTIM, v)
        masks.append((pair_seed, -1 if VICTIM < v else 1))
    add_masks_inplace(masked, masks, r.config.bits)
    return masked


HEADLINE = {VICTIM: U3_SURVIVED, 2: U3_SURVIVED, 3: U3_DROPPED}


def test_split_view_attack_headline_honest_sites_refuse_without_a_quorum() -> None:
    r = _split_view_round()
    q = quorum(r.config)
    assert q == 4 and len(COLLUDERS) == 2 < q
    attack = _split_view(r, HEADLINE)
    # node 2 holds V, 2 and both colluders over "V survived": a quorum, so it reveals b's share
    assert set(attack.seed_shares) == {2, *COLLUDERS}
    # node 3 holds only itself and the colluders over "V dropped": 3 < 4, it refuses
    assert set(attack.refused) == {3} and "fewer than the quorum 4" in attack.refused[3]
    assert set(attack.key_shares) == set(COLLUDERS)
    assert len(attack.key_shares) < r.config.threshold
    assert set(attack.recovered(r)) == {"seed"}  # what an honest unmasking reveals anyway


def test_split_view_attack_every_assignment_never_recovers_both_secrets() -> None:
    """Every choice of which set each honest site signs: at most one secret per victim."""
    r = _split_view_round()
    options: dict[int, list[tuple[int, ...] | None]] = {}
    for h in (VICTIM, *HONEST):
        sets = [s for s in _sets_containing(h) if len(s) >= quorum(r.config)]
        options[h] = [None, *sets]
    tried = 0
    for choice in itertools.product(*options.values()):
        views = dict(zip(options, choice, strict=True))
        attack = _split_view(r, views)
        tried += 1
        got = attack.recovered(r)
        assert len(got) <= 1, (views, attack)
        # never both shares from one honest holder either
        assert not set(attack.seed_shares) & set(attack.key_shares) - set(COLLUDERS)
    assert tried == 6**3


def _sets_containing(node: int) -> list[tuple[int, ...]]:
    return [
        s
        for size in range(1, len(COHORT) + 1)
        for s in itertools.combinations(COHORT, size)
        if node in s
    ]


def test_split_view_attack_control_without_quorum_recovers_the_victims_input(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Control: the same attack with the client's quorum check bypassed breaks privacy."""
    r = _split_view_round()
    monkeypatch.setattr(client_module, "quorum", lambda config: 1)
    attack = _split_view(r, HEADLINE)
    assert attack.refused == {}
    assert set(attack.seed_shares) == {2, *COLLUDERS}
    assert set(attack.key_shares) == {3, *COLLUDERS}
    got = attack.recovered(r)
    assert set(got) == {"seed", "key"}
    quantised = quantize(r.inputs[VICTIM], r.config, seeded_generator(VICTIM))
    assert np.array_equal(_unmask_victim(r, got["seed"], got["key"]), quantised)


# --- split views with colluders outside the cohort: closed by the identity binding ---------
#
# The previous engineer's finding (it was an xfail(strict) here): without the binding, two
# colluding roster members that are *not* in the cohort sign advertisements for cohort node
# ids, and the coordinator gives two groups of honest sites two views (two graph seeds)
# in which the colluders stand in for different honest sites. Each view then holds its own
# quorum, and no honest site signs twice. The configuration now binds every node id to
# one roster identity and every advertisement signs it, which closes it (see the docstring
# of the test below). The control runs the same script with the binding checks off.

OUTSIDERS = ("x", "y")  # the two colluders: roster members, not invited to the round
VIEW_A = {1: 1, 2: 2, 3: 3, 4: "xA", 5: "yA"}  # the victim 1 and node 2: x, y as nodes 4, 5
VIEW_C = {1: 1, 2: "xC", 3: 3, 4: 4, 5: 5}  # nodes 3, 4, 5: x as node 2
IN_VIEW_A = frozenset({1, 2, "xA", "yA"})  # who is shown view A (everyone else: view C)
OUTSIDE_SETS: dict[Any, tuple[int, ...]] = {
    **dict.fromkeys((1, 2, "xA", "yA"), U3_SURVIVED),
    **dict.fromkeys((3, 4, 5, "xC"), U3_DROPPED),
}


def _verify_without_binding(
    config: SecAggConfig,
    entries: Mapping[int, tuple[bytes, bytes, bytes, bytes, bytes]],
    members: frozenset[bytes] | None,
) -> signing.Verified:
    """:func:`signing.verify_advertisements` as it was before the binding (for the control).

    Everything but the check that the identity is the one the configuration binds to the
    node: cohort node, roster member, signature over this configuration, one node per
    identity.
    """
    identities: dict[int, bytes] = {}
    rejected: dict[int, str] = {}
    for node, (enc, mask, commitment, identity, signature) in entries.items():
        message = advertisement_message(config, node, enc, mask, commitment)
        if not config.contains(node):
            rejected[node] = "advertisement for a node outside the cohort"
        elif members is not None and identity not in members:
            rejected[node] = "advertisement signed by an identity that is not in the roster"
        elif not signing.verifies(identity, message, signature):
            rejected[node] = "advertisement signature does not verify"
        else:
            identities[node] = identity
    for identity in set(identities.values()):
        nodes = [n for n, i in identities.items() if i == identity]
        if len(nodes) > 1:
            for node in nodes:
                del identities[node]
                rejected[node] = "one identity advertised for several nodes"
    return signing.Verified(identities, rejected)


def _without_binding(patch: pytest.MonkeyPatch) -> None:
    """Switch off both binding checks of the client (what a colluder's machine skips)."""
    patch.setattr(client_module, "check_bound_identities", lambda *args: None)
    patch.setattr(client_module, "verify_advertisements", _verify_without_binding)


@dataclasses.dataclass
class OutsideAttack:
    """The split-view script's outcome (parties: honest node ids, colluder state names)."""

    config: SecAggConfig
    parties: dict[Any, SecAggClient]
    ads: dict[Any, Advertisement]
    masked: dict[Any, CollectMaskedReply]
    revealed: dict[str, dict[Any, int]]  # "seed"/"key" -> holder -> share of the victim's
    refused: dict[Any, str]  # party -> why it stopped

    def honest_refusals(self) -> dict[int, str]:
        return {p: why for p, why in self.refused.items() if p in COHORT}

    def recovered(self) -> dict[str, bytes]:
        """The victim's secrets reconstructable from ``t`` shares, checked against its ad."""
        t, found = self.config.threshold, {}
        victim = self.ads[VICTIM]
        for name, held in self.revealed.items():
            if len(held) < t:
                continue
            shares = [Share(self.parties[p].node_id, v) for p, v in held.items()]  # index = id
            secret = combine_shares(shares, threshold=t)
            if name == "seed":
                assert opens(victim.commitment, secret, run_id=RUN, round=ROUND, node_id=VICTIM)
            else:
                assert key_pair_from_private_bytes(secret).public_bytes == victim.mask_key
            found[name] = secret
        return found

    def victim_input(self, seed: bytes, mask_key: bytes) -> np.ndarray:
        """The victim's quantised input: its masked vector with every mask removed."""
        masked = self.masked[VICTIM].masked.copy()
        pair = key_pair_from_private_bytes(mask_key)
        masks = [(self_mask_seed(seed, self.config, VICTIM), -1)]
        for node, party in VIEW_A.items():  # the victim masked with every other party it saw
            if node != VICTIM:
                pair_seed = pairwise_mask_seed(
                    pair, self.ads[party].mask_key, self.config, VICTIM, node
                )
                masks.append((pair_seed, -1 if VICTIM < node else 1))
        add_masks_inplace(masked, masks, self.config.bits)
        return masked


def _victim_update() -> np.ndarray:
    return seeded_generator(2024).uniform(-1.0, 1.0, D)


def _outside_colluders_attack(monkeypatch: pytest.MonkeyPatch) -> OutsideAttack:
    """The coordinator's script: views A and C over one configuration, x and y colluding.

    Honest sites run the real client (whatever checks the caller left in place); the
    colluders' state machines are the coordinator's and run with every binding check off
    (they sign for whatever node id the coordinator assigns).
    """
    config = _config(threshold=3, neighbours=4)  # n = 5, k = 4, t = 3, quorum 4
    members = members_of(_roster([*COHORT, *OUTSIDERS]))
    honest = {u: SecAggClient(u, config, _site(u), members) for u in COHORT}
    fake = {
        "xA": SecAggClient(4, config, _site("x"), members),
        "yA": SecAggClient(5, config, _site("y"), members),
        "xC": SecAggClient(2, config, _site("x"), members),
    }
    parties: dict[Any, SecAggClient] = {**honest, **fake}
    view_of = {p: VIEW_A if p in IN_VIEW_A else VIEW_C for p in parties}
    refused: dict[Any, str] = {}

    def step(p: Any, act: Any) -> Any:
        """``act()`` for party ``p``; a refusal is recorded (None); a colluder checks nothing."""
        try:
            if p in fake:
                with monkeypatch.context() as colluding:
                    _without_binding(colluding)
                    return act()
            return act()
        except ProtocolError as exc:
            refused[p] = f"{type(exc).__name__}: {exc}"
            return None

    ads: dict[Any, Advertisement] = {}
    for p, c in parties.items():
        reply = step(p, lambda c=c: c.advertise_keys(AdvertiseKeysRequest(RUN, ROUND, c.node_id)))
        if reply is not None:
            ads[p] = reply.advertisement()
    shares: dict[Any, ShareKeysReply] = {}
    for p, c in parties.items():
        view = view_of[p]
        if p in refused or any(view[n] not in ads for n in COHORT):
            continue
        request = ShareKeysRequest(RUN, ROUND, c.node_id, tuple(ads[view[n]] for n in COHORT))
        reply = step(p, lambda c=c, request=request: c.share_keys(_wire(request, config)))
        if reply is not None:
            shares[p] = reply
    masked: dict[Any, CollectMaskedReply] = {}
    for p in shares:
        c = parties[p]
        incoming = [  # deliver a ciphertext only where sender and receiver see each other
            Ciphertext(parties[s].node_id, x.data)
            for s in shares
            if s != p and view_of[p][parties[s].node_id] == s
            for x in shares[s].ciphertexts
            if x.node_id == c.node_id and view_of[s][c.node_id] == p
        ]
        request = CollectMaskedRequest(
            RUN, ROUND, c.node_id, tuple(sorted(incoming, key=lambda x: x.node_id))
        )
        update = _victim_update() if p == VICTIM else np.zeros(D)
        reply = step(
            p,
            lambda c=c, request=request, update=update: c.collect_masked(
                _wire(request, config), update, seeded_generator(VICTIM)
            ),
        )
        if reply is not None:
            masked[p] = reply
    signed: dict[Any, ConsistencyReply] = {}
    for p in masked:
        c = parties[p]
        request = ConsistencyRequest(RUN, ROUND, c.node_id, OUTSIDE_SETS[p])
        reply = step(p, lambda c=c, request=request: c.consistency(request))
        if reply is not None:
            signed[p] = reply
    revealed: dict[str, dict[Any, int]] = {"seed": {}, "key": {}}
    for p in ("xA", "yA"):  # the colluders' shares of the victim are the coordinator's
        if p in masked and VICTIM in fake[p]._held:  # noqa: SLF001
            revealed["key"][p], revealed["seed"][p] = fake[p]._held[VICTIM]  # noqa: SLF001
    for p in (2, 3):  # the honest holders the coordinator asks to unmask, one per view
        if p not in signed:
            continue
        quorum_of = sorted(
            (
                Signed(parties[s].node_id, signed[s].signature)
                for s in signed
                if OUTSIDE_SETS[s] == OUTSIDE_SETS[p]
            ),
            key=lambda s: s.node_id,
        )
        request = UnmaskRequest(RUN, ROUND, p, OUTSIDE_SETS[p], tuple(quorum_of))
        reply = step(p, lambda p=p, request=request: honest[p].unmask(_wire(request, config)))
        if reply is None:
            continue
        for share in reply.seed_shares:
            if share.owner == VICTIM:
                revealed["seed"][p] = share.value
        for share in reply.key_shares:
            if share.owner == VICTIM:
                revealed["key"][p] = share.value
    return OutsideAttack(config, parties, ads, masked, revealed, refused)


def test_split_view_attack_with_colluders_outside_the_cohort(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Defended: every honest site refuses the views before any of its secrets leaves it.

    The attack needs, in view A, node ids 4 and 5 to count for x and y, and in view C node
    id 2 to count for x, while the real nodes 4, 5 (view C) and 2 (view A) count too, all
    over *one* configuration: honest node 3 is in both views (it holds a share of the
    victim's secrets and must sign "the victim dropped"), and it accepts only
    advertisements signed over the configuration it holds. The configuration now names,
    for each node id, the one roster identity that may speak for it, and every
    advertisement signs its digest; so in a configuration that binds node 4 to site 4,
    x's advertisement for node 4 is refused by every honest site that is shown it, and a
    configuration that binds node 4 to x is refused by the real node 4 (it checks its own
    binding before it makes keys). Node ids and identities are then one-to-one across all
    views of one configuration, which is what the quorum-intersection argument in
    :mod:`common.secagg.signing` counts: two quorums over ``U3`` and ``U3'`` share ``t``
    node ids, hence ``t`` distinct identities, one of them honest, and it signs once.
    """
    attack = _outside_colluders_attack(monkeypatch)
    refusals = attack.honest_refusals()
    assert set(refusals) == set(COHORT)  # nobody honest gets past SHARE_KEYS
    for node in (VICTIM, 2):  # shown x, y as nodes 4 and 5
        assert refusals[node] == (
            "ProtocolError: node 4: advertisement signed by another identity than the one "
            "bound to the node"
        )
    for node in (3, 4, 5):  # shown x as node 2
        assert refusals[node] == (
            "ProtocolError: node 2: advertisement signed by another identity than the one "
            "bound to the node"
        )
    for node in COHORT:
        assert attack.parties[node].stage is Stage.ADVERTISE_KEYS
        assert attack.parties[node].neighbours == frozenset()
    # the victim refused before it encrypted a share: the coordinator holds none of them
    assert attack.revealed == {"seed": {}, "key": {}}
    assert not set(attack.masked) & set(COHORT)
    assert attack.recovered() == {}


def test_split_view_with_colluders_outside_the_cohort_per_view_configurations_refused() -> None:
    """The coordinator cannot move the stand-ins into the configuration either.

    View A would need a configuration binding nodes 4, 5 to x, y; view C one binding node
    2 to x. The real nodes bound to a colluder refuse such a configuration at
    ADVERTISE_KEYS, before they make any key; and the honest node 3 that the attack needs
    in both views holds one configuration, so the other view's advertisements (signed over
    the other digest) do not verify for it, nor its advertisement for the other view.
    """
    members = members_of(_roster([*COHORT, *OUTSIDERS]))
    config = _config(threshold=3, neighbours=4)
    config_a = _config(threshold=3, neighbours=4, bind={4: "x", 5: "y"})
    config_c = _config(threshold=3, neighbours=4, bind={2: "x"})
    assert len({config.digest(), config_a.digest(), config_c.digest()}) == 3
    for node, view in ((4, config_a), (5, config_a), (2, config_c)):
        client = SecAggClient(node, view, _site(node), members)
        with pytest.raises(ProtocolError, match=f"binds node {node} to another identity"):
            client.advertise_keys(AdvertiseKeysRequest(RUN, ROUND, node))
        assert client.stage is Stage.INIT  # no key made
        with pytest.raises(ProtocolAbort, match="already aborted"):
            client.advertise_keys(AdvertiseKeysRequest(RUN, ROUND, node))
    # the victim in view A (config_a) and node 3 in view C (config_c): each refuses the other
    victim = SecAggClient(VICTIM, config_a, _site(VICTIM), members)
    third = SecAggClient(3, config_c, _site(3), members)
    victim_ad = victim.advertise_keys(AdvertiseKeysRequest(RUN, ROUND, VICTIM)).advertisement()
    third_ad = third.advertise_keys(AdvertiseKeysRequest(RUN, ROUND, 3)).advertisement()
    view_a = {VICTIM: victim_ad, 3: third_ad}
    for u in (2, 4, 5):
        view_a[u] = _signed_ad(config_a, u, _site({4: "x", 5: "y"}.get(u, u)))
    request = ShareKeysRequest(RUN, ROUND, VICTIM, tuple(view_a[u] for u in COHORT))
    with pytest.raises(ProtocolError, match="node 3: advertisement signature does not verify"):
        victim.share_keys(_wire(request, config_a))
    view_c = {VICTIM: victim_ad, 3: third_ad}
    for u in (2, 4, 5):
        view_c[u] = _signed_ad(config_c, u, _site({2: "x"}.get(u, u)))
    request = ShareKeysRequest(RUN, ROUND, 3, tuple(view_c[u] for u in COHORT))
    with pytest.raises(ProtocolError, match="node 1: advertisement signature does not verify"):
        third.share_keys(_wire(request, config_c))


def test_split_view_with_colluders_outside_the_cohort_control_without_the_binding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Control: the same script with the binding check off recovers the victim's input.

    Only the honest sites' advertisement check loses its binding test
    (:func:`_verify_without_binding`: advertisements accepted from any distinct roster
    member, as before the fix; the configuration still binds every honest node to itself,
    so their own check at ADVERTISE_KEYS passes either way). Then every honest site
    accepts its view, each view holds its own quorum of 4 signatures, node 2 reveals the
    victim's seed share and node 3 its mask-key share, and with x's and y's shares the
    coordinator holds t = 3 of each: both secrets, hence the victim's input.
    """
    monkeypatch.setattr(client_module, "verify_advertisements", _verify_without_binding)
    attack = _outside_colluders_attack(monkeypatch)
    assert attack.honest_refusals() == {}
    assert set(attack.revealed["seed"]) == {2, "xA", "yA"}
    assert set(attack.revealed["key"]) == {3, "xA", "yA"}
    got = attack.recovered()
    assert set(got) == {"seed", "key"}
    quantised = quantize(_victim_update(), attack.config, seeded_generator(VICTIM))
    assert np.array_equal(attack.victim_input(got["seed"], got["key"]), quantised)
    # the victim itself only signed its view's survivor set: it revealed nothing, yet lost
    # its input
    assert attack.parties[VICTIM].stage is Stage.CONSISTENCY


# --- sealed state at every stage ----------------------------------------------------------


@pytest.mark.parametrize(
    "after",
    [
        Stage.INIT,
        Stage.ADVERTISE_KEYS,
        Stage.SHARE_KEYS,
        Stage.COLLECT_MASKED,
        Stage.CONSISTENCY,
    ],
)
def test_sealed_state_roundtrip_at_every_stage_gives_the_same_sum(after: Stage) -> None:
    r = Round(_config(range(1, 7)))  # n = 6, k = 5, t = 3, quorum 5
    steps = [r.advertise, r.share_keys, lambda: r.masked(skip=[6]), r.consistency]
    order = [Stage.INIT, Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.COLLECT_MASKED]
    for stage, step in zip(order, steps, strict=True):
        if stage is after:
            _reseal_everyone(r, after)
        step()
    if after is Stage.CONSISTENCY:
        _reseal_everyone(r, after)
        for u in range(1, 6):  # the signed set survives sealing: another one is still refused
            other = dataclasses.replace(r.unmask_requests[u], survivors=tuple(range(1, 7)))
            with pytest.raises(ProtocolError, match="not the one this site signed"):
                r.fork(u).unmask(other)
    result = r.unmask()
    assert result.dropped == (6,)
    assert np.array_equal(result.sum_int, r.expected(range(1, 6)))


def _reseal_everyone(r: Round, stage: Stage) -> None:
    for u, client in list(r.clients.items()):
        before = (client.stage, client.neighbours, client.graph_seed)
        key = secure_bytes(32)
        restored = SecAggClient.open(client.seal(key), key, u, r.config, r.identities[u], r.members)
        assert restored is not client
        assert (restored.stage, restored.neighbours, restored.graph_seed) == before
        if u != 6:  # node 6 drops at the masked-input stage
            assert restored.stage is stage
        r.clients[u] = restored


def test_sealed_state_after_unmask_refuses_a_replay_and_never_reveals_twice() -> None:
    r = _consistent(5)
    request = r.unmask_requests[1]
    reply = r.clients[1].unmask(request)
    assert reply.seed_shares
    restored = r.fork(1)
    assert restored.stage is Stage.UNMASK
    with pytest.raises(ProtocolError, match="UNMASK cannot follow UNMASK"):
        restored.unmask(request)


def test_sealed_state_needs_the_same_identity_and_roster() -> None:
    r = _consistent(5)
    key = bytes(32)
    blob = r.clients[1].seal(key)
    with pytest.raises(ConfigurationError, match="roster"):
        SecAggClient.open(blob, key, 1, r.config, Ed25519PrivateKey.generate(), r.members)
    restored = SecAggClient.open(blob, key, 1, r.config, r.identities[1], r.members)
    assert restored.unmask(r.unmask_requests[1]).seed_shares


def test_wire_sizes_of_the_v3_messages() -> None:
    r = _consistent(5)
    n, header = 5, 30
    ad = 8 + 32 + 32 + 32 + 32 + 64
    assert len(r.keys[0].encode()) == AdvertiseKeysReply.SIZE == header + 192
    assert len(r.share[1].encode()) == header + 4 + n * ad
    assert len(r.check[1].encode()) == header + 4 + 8 * n
    assert len(r.signed[0].encode()) == ConsistencyReply.SIZE == header + 64
    request = r.unmask_requests[1]
    assert len(request.encode()) == header + 8 + 8 * n + len(request.signatures) * (8 + 64)
    assert {cls.KIND for cls in MESSAGE_TYPES} == set(range(1, 11))
    assert struct.unpack_from(">B", request.encode(), 4)[0] == 3  # the version byte
