"""Rejection properties of the client and server state machines and the wire format."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from common.errors import (
    ConfigurationError,
    IntegrityError,
    ProtocolAbort,
    ProtocolError,
)
from common.rng import secure_bytes, seeded_generator
from common.secagg import SecAggClient, SecAggServer, make_config
from common.secagg.graph import neighbour_graph
from common.secagg.messages import (
    MESSAGE_TYPES,
    AdvertiseKeysRequest,
    Ciphertext,
    CollectMaskedReply,
    CollectMaskedRequest,
    ConsistencyRequest,
    ShareKeysRequest,
    Signed,
    UnmaskReply,
    UnmaskRequest,
    decode_message,
)
from common.secagg.params import SecAggConfig
from common.secagg.signing import (
    advertisement_message,
    consistency_message,
    graph_seed,
    public_bytes,
    quorum,
    sign,
)
from common.secagg.simulate import make_identities, members_of

IDENTITIES = make_identities(range(1, 21))
"""The sites' identity keys: one roster for every test here, node ``u`` is site ``u``."""
MEMBERS = members_of(IDENTITIES)


def _bound(cohort: list[int]) -> list[bytes]:
    """The identities a configuration of ``cohort`` binds: site ``u``'s key to node ``u``."""
    return [public_bytes(IDENTITIES[u]) for u in cohort]


def _config(round_: int = 4, n: int = 5) -> SecAggConfig:
    return make_config(
        run_id=11,
        round=round_,
        cohort=list(range(1, n + 1)),
        identities=_bound(list(range(1, n + 1))),
        threshold=0.6,
        value_bound=1.0,
        vector_length=16,
    )


def _client(u: int, config: SecAggConfig) -> SecAggClient:
    return SecAggClient(u, config, IDENTITIES[u], MEMBERS)


class Round:
    """Drives clients and server stage by stage, keeping every message."""

    def __init__(self, config: SecAggConfig, skip: frozenset[int] = frozenset()) -> None:
        self.config = config
        self.clients = {u: _client(u, config) for u in config.cohort}
        self.server = SecAggServer(config, MEMBERS)
        self.advertise = self.server.start()
        self.keys = [
            self.clients[u].advertise_keys(r) for u, r in self.advertise.items() if u not in skip
        ]
        self.share = self.server.receive_advertise_keys(self.keys)
        self.shares = [self.clients[u].share_keys(r) for u, r in self.share.items()]
        self.collect = self.server.receive_share_keys(self.shares)

    def masked(self, skip: frozenset[int] = frozenset()) -> dict[int, ConsistencyRequest]:
        self.masked_replies = [
            self.clients[u].collect_masked(r, np.zeros(16), seeded_generator(u))
            for u, r in self.collect.items()
            if u not in skip
        ]
        self.check = self.server.receive_masked(self.masked_replies)
        return self.check

    def consistent(self, skip: frozenset[int] = frozenset()) -> dict[int, UnmaskRequest]:
        """Masked inputs (``skip`` drops there), then every survivor signs ``U3``."""
        self.masked(skip)
        self.signed = [self.clients[u].consistency(r) for u, r in self.check.items()]
        return self.server.receive_consistency(self.signed)


def test_client_not_in_cohort_raises() -> None:
    with pytest.raises(ConfigurationError):
        SecAggClient(99, _config(), IDENTITIES[1], MEMBERS)
    with pytest.raises(ConfigurationError, match="roster"):
        SecAggClient(1, _config(), IDENTITIES[1], frozenset())


def test_client_wrong_stage_message_rejected_and_client_aborts() -> None:
    config = _config()
    client = _client(1, config)
    with pytest.raises(ProtocolError, match="cannot follow"):
        client.collect_masked(CollectMaskedRequest(11, 4, 1, ()), np.zeros(16), seeded_generator(0))
    with pytest.raises(ProtocolAbort):
        client.advertise_keys(AdvertiseKeysRequest(11, 4, 1))


def test_client_message_of_other_type_rejected() -> None:
    client = _client(1, _config())
    with pytest.raises(ProtocolError, match="wrong stage"):
        client.share_keys(AdvertiseKeysRequest(11, 4, 1))  # type: ignore[arg-type]


def test_client_replayed_stage_rejected() -> None:
    r = Round(_config())
    with pytest.raises(ProtocolError):
        r.clients[1].advertise_keys(r.advertise[1])
    with pytest.raises(ProtocolAbort):
        r.clients[1].collect_masked(r.collect[1], np.zeros(16), seeded_generator(0))


def test_client_wrong_round_or_node_rejected() -> None:
    client = _client(1, _config())
    with pytest.raises(ProtocolError, match="round"):
        client.advertise_keys(AdvertiseKeysRequest(11, 5, 1))
    other = _client(2, _config())
    with pytest.raises(ProtocolError, match="node"):
        other.advertise_keys(AdvertiseKeysRequest(11, 4, 1))


def test_client_tampered_ciphertext_rejected() -> None:
    r = Round(_config())
    request = r.collect[1]
    first = request.ciphertexts[0]
    flipped = first.data[:20] + bytes([first.data[20] ^ 1]) + first.data[21:]
    bad = dataclasses.replace(
        request, ciphertexts=(Ciphertext(first.node_id, flipped),) + request.ciphertexts[1:]
    )
    with pytest.raises(IntegrityError):
        r.clients[1].collect_masked(bad, np.zeros(16), seeded_generator(0))


def test_client_ciphertext_relabelled_sender_rejected() -> None:
    r = Round(_config())
    request = r.collect[1]
    a, b = request.ciphertexts[0], request.ciphertexts[1]
    swapped = (Ciphertext(a.node_id, b.data), Ciphertext(b.node_id, a.data)) + request.ciphertexts[
        2:
    ]
    with pytest.raises(IntegrityError):
        r.clients[1].collect_masked(
            dataclasses.replace(request, ciphertexts=swapped), np.zeros(16), seeded_generator(0)
        )


def test_client_ciphertext_replayed_from_other_round_rejected() -> None:
    old, new = Round(_config(round_=4)), Round(_config(round_=5))
    request = new.collect[1]
    replayed = tuple(
        Ciphertext(
            c.node_id, next(o.data for o in old.collect[1].ciphertexts if o.node_id == c.node_id)
        )
        for c in request.ciphertexts
    )
    with pytest.raises(IntegrityError):
        new.clients[1].collect_masked(
            dataclasses.replace(request, ciphertexts=replayed), np.zeros(16), seeded_generator(0)
        )


def test_client_shares_only_with_its_graph_neighbours_and_refuses_strangers() -> None:
    # v2 checked a neighbour list the server chose; in v3 each client derives its neighbours
    # from the signed advertisements and takes shares from them alone
    config = make_config(
        run_id=1,
        round=1,
        cohort=list(range(1, 21)),
        identities=_bound(list(range(1, 21))),
        threshold=0.6,
        value_bound=1.0,
        vector_length=4,
    )
    r = Round(config)
    ads = r.share[1].advertisements
    graph = neighbour_graph(config, graph_seed(config, [a.encode() for a in ads]))
    for reply in r.shares:
        assert r.clients[reply.node_id].neighbours == graph[reply.node_id]
        assert {c.node_id for c in reply.ciphertexts} == graph[reply.node_id]
    u = config.cohort[0]
    stranger = next(v for v in config.cohort if v != u and v not in r.clients[u].neighbours)
    request = r.collect[u]
    foreign = Ciphertext(stranger, request.ciphertexts[0].data)
    entries = sorted((foreign, *request.ciphertexts[1:]), key=lambda c: c.node_id)
    with pytest.raises(ProtocolError, match="not live neighbours"):
        r.clients[u].collect_masked(
            dataclasses.replace(request, ciphertexts=tuple(entries)),
            np.zeros(4),
            seeded_generator(0),
        )


def test_client_share_keys_duplicate_keys_rejected() -> None:
    config = _config()
    server = SecAggServer(config, MEMBERS)
    clients = {u: _client(u, config) for u in config.cohort}
    keys = [clients[u].advertise_keys(r) for u, r in server.start().items()]
    share = server.receive_advertise_keys(keys)
    ads = share[2].advertisements
    # site 3 signs an advertisement that re-uses site 4's mask key: every signature
    # verifies, only the distinctness check refuses it
    a3, a4 = ads[2], ads[3]
    message = advertisement_message(config, 3, a3.encryption_key, a4.mask_key, a3.commitment)
    twin = dataclasses.replace(a3, mask_key=a4.mask_key, signature=sign(IDENTITIES[3], message))
    with pytest.raises(ProtocolError, match="distinct"):
        clients[2].share_keys(
            dataclasses.replace(share[2], advertisements=(*ads[:2], twin, *ads[3:]))
        )


def _signatures(r: Round, survivors: tuple[int, ...]) -> tuple[Signed, ...]:
    """Valid consistency signatures of every node in ``survivors`` over that set."""
    seed = r.server.graph_seed
    assert seed is not None
    message = consistency_message(r.config, seed, survivors)
    return tuple(Signed(u, sign(IDENTITIES[u], message)) for u in survivors)


def test_client_derives_survivors_and_dropped_from_u3_never_both() -> None:
    # v2 refused per-node lists naming a neighbour both survived and dropped; v3 has no such
    # lists: the client splits its neighbours by the signed U3 itself
    r = Round(_config(n=7))  # k = 6, t = 4, quorum 6
    requests = r.consistent(frozenset({7}))
    assert requests[1].survivors == (1, 2, 3, 4, 5, 6)
    reply = r.clients[1].unmask(requests[1])
    assert [s.owner for s in reply.seed_shares] == [2, 3, 4, 5, 6]
    assert [s.owner for s in reply.key_shares] == [7]
    with pytest.raises(ProtocolError, match="never revealed together"):
        UnmaskReply(11, 4, 1, reply.seed_shares, (reply.seed_shares[0], *reply.key_shares))


def test_client_consistency_unverified_node_or_unmask_other_set_rejected() -> None:
    # v2: survivor lists naming non-neighbours or leaving a neighbour out; v3: U3 names only
    # verified members, and unmasking needs exactly the set this client signed
    r = Round(_config(n=7), skip=frozenset({7}))  # node 7 never advertised
    requests = r.masked()
    assert requests[1].survivors == (1, 2, 3, 4, 5, 6)
    with pytest.raises(ProtocolError, match="unverified"):
        r.clients[1].consistency(ConsistencyRequest(11, 4, 1, tuple(range(1, 8))))
    r.clients[2].consistency(requests[2])
    other = (1, 2, 3, 4, 5)
    with pytest.raises(ProtocolError, match="not the one this site signed"):
        r.clients[2].unmask(UnmaskRequest(11, 4, 2, other, _signatures(r, other)))


def test_client_unmask_too_few_survivors_aborts() -> None:
    r = Round(_config(n=7))  # k = 6, t = 4
    r.masked()
    with pytest.raises(ProtocolAbort, match="threshold"):
        r.clients[1].consistency(ConsistencyRequest(11, 4, 1, (1, 2, 3, 4)))
    with pytest.raises(ProtocolAbort, match="already aborted"):
        r.clients[1].unmask(UnmaskRequest(11, 4, 1, (1, 2, 3, 4), ()))


def test_client_unmask_answers_once_and_never_both_shares() -> None:
    r = Round(_config(n=7))
    requests = r.consistent()
    assert len(requests[1].signatures) == quorum(r.config)
    reply = r.clients[1].unmask(requests[1])
    owners_seed = {s.owner for s in reply.seed_shares}
    owners_key = {s.owner for s in reply.key_shares}
    assert not owners_seed & owners_key
    with pytest.raises(ProtocolError):
        r.clients[1].unmask(requests[1])


def test_server_rejects_duplicate_foreign_and_wrong_type_replies() -> None:
    r = Round(_config())
    server = SecAggServer(r.config, MEMBERS)
    server.start()
    with pytest.raises(ProtocolError, match="duplicate"):
        server.receive_advertise_keys([r.keys[0], r.keys[0]])
    server = SecAggServer(r.config, MEMBERS)
    server.start()
    with pytest.raises(ProtocolError, match="wrong stage"):
        server.receive_advertise_keys(r.shares)  # type: ignore[arg-type]
    with pytest.raises(ProtocolAbort):
        server.receive_advertise_keys(r.keys)


def test_server_share_answered_for_other_node_ignored_and_holder_named() -> None:
    r = Round(_config(n=7))  # k = 6 shares per secret, t = 4: one reply can be spared
    requests = r.consistent()
    replies = [r.clients[u].unmask(q) for u, q in requests.items()]
    first = replies[0]
    forged = UnmaskReply(
        first.run_id, first.round, first.node_id, first.seed_shares[1:], first.seed_shares[:1]
    )
    result = r.server.receive_unmask([forged, *replies[1:]])
    assert result.rejected == {
        first.node_id: "stage unmask: answered shares for other nodes than asked"
    }
    assert result.contributors == r.config.cohort  # its masked input stays in the sum
    assert not np.any(result.sum_int)  # every input was zero: no mask residue


def test_client_seal_open_roundtrip_and_wrong_key_rejected() -> None:
    r = Round(_config())
    key = secure_bytes(32)
    blob = r.clients[1].seal(key)
    restored = SecAggClient.open(blob, key, 1, r.config, IDENTITIES[1], MEMBERS)
    reply = restored.collect_masked(r.collect[1], np.zeros(16), seeded_generator(1))
    original = r.clients[1].collect_masked(r.collect[1], np.zeros(16), seeded_generator(1))
    assert np.array_equal(reply.masked, original.masked)
    with pytest.raises(IntegrityError):
        SecAggClient.open(blob, secure_bytes(32), 1, r.config, IDENTITIES[1], MEMBERS)
    with pytest.raises(IntegrityError):
        SecAggClient.open(blob, key, 2, r.config, IDENTITIES[2], MEMBERS)
    with pytest.raises(IntegrityError):
        SecAggClient.open(blob, key, 1, _config(round_=5), IDENTITIES[1], MEMBERS)
    with pytest.raises(IntegrityError):
        SecAggClient.open(
            blob[:-1] + bytes([blob[-1] ^ 1]), key, 1, r.config, IDENTITIES[1], MEMBERS
        )


def test_messages_roundtrip_through_wire() -> None:
    r = Round(_config(n=7))
    requests = r.consistent()
    replies = [r.clients[u].unmask(q) for u, q in requests.items()]
    messages: list[Any] = [
        *r.advertise.values(),
        *r.keys,
        *r.share.values(),
        *r.shares,
        *r.collect.values(),
        *r.check.values(),
        *r.signed,
        *requests.values(),
        *replies,
    ]
    for message in messages:
        assert type(message).decode(message.encode(), r.config) == message
        assert decode_message(message.encode(), r.config) == message
    masked = r.masked_replies[0]
    decoded = CollectMaskedReply.decode(masked.encode(), r.config)
    assert np.array_equal(decoded.masked, masked.masked)
    assert {cls.KIND for cls in MESSAGE_TYPES} == set(range(1, 11))


def test_messages_wrong_size_stage_round_rejected() -> None:
    r = Round(_config())
    data = r.share[1].encode()
    for bad in (data[:-1], data + b"\x00", data[:10], b"", bytearray(data)):
        with pytest.raises(ProtocolError):
            ShareKeysRequest.decode(bad, r.config)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="wrong stage"):
        CollectMaskedRequest.decode(data, r.config)
    with pytest.raises(ProtocolError, match="round"):
        ShareKeysRequest.decode(data, _config(round_=5))
    inflated = data[:30] + (10**6).to_bytes(4, "big") + data[34:]
    with pytest.raises(ProtocolError, match="exceed"):
        ShareKeysRequest.decode(inflated, r.config)
    masked = CollectMaskedReply(11, 4, 1, np.zeros(15, dtype=np.uint32)).encode()
    with pytest.raises(ProtocolError):
        CollectMaskedReply.decode(masked, r.config)


def test_masked_reply_zero_copy_view_checked_like_bytes() -> None:
    r = Round(_config())
    r.masked()
    reply = r.masked_replies[0]
    header, body = reply.encode_parts()
    data = header + body
    assert data == reply.encode()
    view = memoryview(data)
    decoded = CollectMaskedReply.decode(view, r.config)
    assert np.array_equal(decoded.masked, reply.masked) and decoded.node_id == reply.node_id
    wide = memoryview(data[: len(data) // 4 * 4]).cast("I")
    for bad in (view[:-1], memoryview(data + b"\x00"), view[:10], wide):
        with pytest.raises(ProtocolError):
            CollectMaskedReply.decode(bad, r.config)
    with pytest.raises(ProtocolError, match="round"):
        CollectMaskedReply.decode(view, _config(round_=5))


def test_messages_bool_and_duplicate_ids_rejected() -> None:
    with pytest.raises(ProtocolError):
        AdvertiseKeysRequest(11, True, 1)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        UnmaskRequest(11, 4, 1, (1, 2, 2), ())
    with pytest.raises(ProtocolError):
        UnmaskRequest(11, 4, 1, (1, 3, 2), ())
    with pytest.raises(ProtocolError, match="own node"):
        UnmaskRequest(11, 4, 1, (2, 3), ())  # U3 always includes the node asked to unmask
    with pytest.raises(ProtocolError, match="no duplicates"):
        UnmaskRequest(11, 4, 1, (1, 2), (Signed(2, bytes(64)), Signed(2, bytes(64))))
    with pytest.raises(ProtocolError):
        Signed(True, bytes(64))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="own node"):
        ConsistencyRequest(11, 4, 1, (2, 3))
