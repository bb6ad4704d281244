"""The server's verified unmasking: wrong shares are outvoted and their holders named.

A round is driven stage by stage through the real client and server state
machines (messages through their wire encoding); a share holder then alters
shares in its UNMASK reply before the server sees it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.crypto import commitment
from common.crypto.shamir import PRIME
from common.errors import ProtocolAbort
from common.rng import seeded_generator
from common.secagg import AggregateResult, SecAggClient, SecAggServer, make_config
from common.secagg.messages import AdvertiseKeysReply, RevealedShare, UnmaskReply
from common.secagg.params import SecAggConfig
from common.secagg.quantize import lift_signed, quantize
from common.secagg.signing import advertisement_message, public_bytes, sign
from common.secagg.simulate import make_identities, members_of

D = 24
INCONSISTENT = "inconsistent with the verified secret"


IDENTITIES = make_identities([10 * (i + 1) for i in range(9)])
MEMBERS = members_of(IDENTITIES)


def _config(n: int) -> SecAggConfig:
    cohort = [10 * (i + 1) for i in range(n)]
    return make_config(
        run_id=3,
        round=7,
        cohort=cohort,
        identities=[public_bytes(IDENTITIES[u]) for u in cohort],
        threshold=0.6,
        value_bound=1.0,
        vector_length=D,
    )


class WrongCommitment(SecAggClient):
    """A faulty client: it signs and sends a commitment that its seed does not open."""

    def _own_advertisement(self) -> AdvertiseKeysReply:
        honest = super()._own_advertisement()
        config = self._config
        message = advertisement_message(
            config, self.node_id, honest.encryption_key, honest.mask_key, bytes(32)
        )
        return dataclasses.replace(
            honest, commitment=bytes(32), signature=sign(self._identity, message)
        )


@dataclasses.dataclass
class Unmasking:
    config: SecAggConfig
    server: SecAggServer
    replies: dict[int, UnmaskReply]
    expected: np.ndarray  # exact sum of the contributors' quantised inputs

    def finish(self, replies: dict[int, UnmaskReply] | None = None) -> AggregateResult:
        chosen = self.replies if replies is None else replies
        wire = [UnmaskReply.decode(r.encode(), self.config) for r in chosen.values()]
        return self.server.receive_unmask(wire)


def _wire(message: object, config: SecAggConfig) -> object:
    return type(message).decode(message.encode(), config)  # type: ignore[attr-defined]


def _round(
    n: int,
    *,
    drop_masked: frozenset[int] = frozenset(),
    bad_commitment: int | None = None,
    seed: int = 0,
) -> Unmasking:
    config = _config(n)
    rng = seeded_generator(seed)
    inputs = {u: rng.uniform(-1.0, 1.0, D) for u in config.cohort}
    clients = {
        u: (WrongCommitment if u == bad_commitment else SecAggClient)(
            u, config, IDENTITIES[u], MEMBERS
        )
        for u in config.cohort
    }
    server = SecAggServer(config, MEMBERS)
    keys = []
    for u, request in server.start().items():
        # a WrongCommitment client's commitment does not match its seed (validly signed)
        keys.append(_wire(clients[u].advertise_keys(request), config))
    share = server.receive_advertise_keys(keys)  # type: ignore[arg-type]
    shares = [_wire(clients[u].share_keys(r), config) for u, r in share.items()]
    collect = server.receive_share_keys(shares)  # type: ignore[arg-type]
    masked = [
        _wire(clients[u].collect_masked(r, inputs[u], seeded_generator(u)), config)
        for u, r in collect.items()
        if u not in drop_masked
    ]
    check = server.receive_masked(masked)  # type: ignore[arg-type]
    signed = [_wire(clients[u].consistency(r), config) for u, r in check.items()]
    unmask = server.receive_consistency(signed)  # type: ignore[arg-type]
    replies = {u: clients[u].unmask(_wire(r, config)) for u, r in unmask.items()}
    contributors = [u for u in config.cohort if u not in drop_masked]
    expected = np.sum(
        [
            lift_signed(quantize(inputs[u], config, seeded_generator(u)), config.bits)
            for u in contributors
        ],
        axis=0,
    )
    return Unmasking(config, server, replies, expected)


def _lie(
    reply: UnmaskReply, owners: set[int] | None = None, delta: int = 1, keys: bool = False
) -> UnmaskReply:
    """``reply`` with the revealed seed (or key) shares of ``owners`` (default: all) altered."""

    def alter(shares: tuple[RevealedShare, ...]) -> tuple[RevealedShare, ...]:
        return tuple(
            RevealedShare(s.owner, (s.value + delta) % PRIME)
            if owners is None or s.owner in owners
            else s
            for s in shares
        )

    if keys:
        return dataclasses.replace(reply, key_shares=alter(reply.key_shares))
    return dataclasses.replace(reply, seed_shares=alter(reply.seed_shares))


def test_unmask_honest_round_exact_sum_nobody_rejected() -> None:
    r = _round(7)
    result = r.finish()
    assert np.array_equal(result.sum_int, r.expected)
    assert result.rejected == {}


def test_unmask_one_corrupted_seed_share_exact_sum_and_holder_named() -> None:
    r = _round(7)  # k = 6, t = 5: every seed has 6 shares
    liar = r.config.cohort[0]  # smallest share index: its share is in the first t tried
    owner = r.replies[liar].seed_shares[0].owner
    replies = {**r.replies, liar: _lie(r.replies[liar], {owner})}
    result = r.finish(replies)
    assert np.array_equal(result.sum_int, r.expected)
    assert result.contributors == r.config.cohort  # the liar's own input stays in
    assert list(result.rejected) == [liar]
    assert f"node {owner}'s self-mask seed" in result.rejected[liar]
    assert INCONSISTENT in result.rejected[liar]


def test_unmask_liar_corrupting_every_share_named_once_exact_sum() -> None:
    r = _round(9, seed=1)
    liar = r.config.cohort[4]
    replies = {**r.replies, liar: _lie(r.replies[liar], delta=2**400)}
    result = r.finish(replies)
    assert np.array_equal(result.sum_int, r.expected)
    assert list(result.rejected) == [liar]


def test_unmask_corrupted_mask_key_share_of_dropped_node_exact_sum_and_holder_named() -> None:
    config = _config(8)
    dropped = config.cohort[3]
    r = _round(8, drop_masked=frozenset({dropped}))
    liar = next(u for u, reply in r.replies.items() if reply.key_shares)
    replies = {**r.replies, liar: _lie(r.replies[liar], keys=True)}
    result = r.finish(replies)
    assert np.array_equal(result.sum_int, r.expected)
    assert result.dropped == (dropped,)
    assert list(result.rejected) == [liar]
    assert f"node {dropped}'s mask key" in result.rejected[liar]


def test_unmask_corrupted_shares_from_too_many_holders_aborts() -> None:
    r = _round(5)  # k = 4, t = 3: two wrong of four shares leave two, fewer than t
    liars = r.config.cohort[:2]
    replies = dict(r.replies)
    for liar in liars:
        replies[liar] = _lie(replies[liar])
    with pytest.raises(ProtocolAbort, match="cannot be verifiably reconstructed"):
        r.finish(replies)
    with pytest.raises(ProtocolAbort, match="already aborted"):
        r.finish()


def test_unmask_commitment_mismatch_detected_round_aborts() -> None:
    config = _config(6)
    cheat = config.cohort[2]
    r = _round(6, bad_commitment=cheat)
    with pytest.raises(ProtocolAbort, match=f"node {cheat}'s self-mask seed"):
        r.finish()


def test_commitment_opens_only_its_own_seed_node_run_round() -> None:
    seed = bytes(range(32))
    c = commitment.commit_seed(seed, run_id=1, round=2, node_id=3)
    assert commitment.opens(c, seed, run_id=1, round=2, node_id=3)
    other = bytes([seed[0] ^ 1]) + seed[1:]
    assert not commitment.opens(c, other, run_id=1, round=2, node_id=3)
    assert not commitment.opens(c, seed, run_id=1, round=2, node_id=4)
    assert not commitment.opens(c, seed, run_id=1, round=3, node_id=3)
    assert not commitment.opens(c, seed, run_id=2, round=2, node_id=3)
    assert not commitment.opens(c, seed[:31], run_id=1, round=2, node_id=3)


def test_advertise_keys_reply_commits_to_the_clients_seed() -> None:
    config = _config(5)
    server = SecAggServer(config, MEMBERS)
    u = config.cohort[0]
    client = SecAggClient(u, config, IDENTITIES[u], MEMBERS)
    reply = client.advertise_keys(server.start()[u])
    assert isinstance(reply, AdvertiseKeysReply)
    decoded = AdvertiseKeysReply.decode(reply.encode(), config)
    assert decoded.commitment == reply.commitment
    # the sealed state carries the seed: it opens the advertised commitment
    restored = SecAggClient.open(
        client.seal(bytes(32)), bytes(32), u, config, IDENTITIES[u], MEMBERS
    )
    seed = restored._seed  # noqa: SLF001 - white-box check of the committed value
    assert seed is not None
    assert commitment.opens(reply.commitment, seed, run_id=3, round=7, node_id=u)


@settings(max_examples=15, deadline=None)
@given(
    liar_position=st.integers(0, 6),
    owner_choice=st.integers(0, 5),
    delta=st.integers(1, PRIME - 1),
)
def test_unmask_any_single_liar_any_share_exact_sum_and_only_liar_named(
    liar_position: int, owner_choice: int, delta: int
) -> None:
    r = _round(7, seed=2)
    liar = r.config.cohort[liar_position]
    reply = r.replies[liar]
    owner = reply.seed_shares[owner_choice % len(reply.seed_shares)].owner
    result = r.finish({**r.replies, liar: _lie(reply, {owner}, delta)})
    assert np.array_equal(result.sum_int, r.expected)
    assert list(result.rejected) == [liar]
    assert result.contributors == r.config.cohort
