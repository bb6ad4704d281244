"""A hostile coordinator against authenticated SecAgg+ (protocol v3) on the real site code.

Each test runs real ClientApps of a simulated federation (identity keys in the
sites' private state directories, a roster signed by an authority the sites
pin: :func:`simulations.federation.prepare_federation`) over the in-memory
Grid, while the coordinator rewrites what it relays (``FakeGrid.on_deliver``
sees every message just before the site does; the sites of these tests pin
no coordinator key, so a rewrite is not caught as an altered instruction:
what stops it is the protocol itself). Each attack is refused with its
reason, which reaches the coordinator's audit log, and each test has a
control: the same attack with that one check switched off succeeds (so the
test can fail).

Attacks: key substitution (the coordinator's own X25519 keys in place of a
victim's neighbours'), a sybil node (an advertisement the coordinator signed
itself), an unmask request whose survivor set is not the one the site
signed, and a quorum cut short; the site's cohort floor counts verified
members only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fake_grid import FIRST_NODE_ID, FakeGrid, Fault, server_identity
from flwr.app import Message
from pinned_sites import echo_cfg

import common.secagg.client as secagg_client
import common.secagg.server as secagg_server
from client.app import make_client_app
from common.crypto import aead
from common.crypto.commitment import opens
from common.crypto.keys import KeyPair, generate_key_pair
from common.crypto.shamir import VALUE_SIZE, Share, decode_value, reconstruct_verified
from common.records import (
    KEY_SECAGG_CONFIG,
    KEY_SECAGG_MSG,
    bundle_to_record,
    bytes_to_record,
    record_to_bundle,
    record_to_bytes,
)
from common.secagg import SecAggConfig, make_config
from common.secagg.client import share_associated_data, share_encryption_key
from common.secagg.messages import (
    Advertisement,
    ShareKeysReply,
    ShareKeysRequest,
    Signed,
    UnmaskRequest,
)
from common.secagg.signing import Verified, advertisement_message, public_bytes
from policies import load_site_policies
from server.book import RunBook
from server.record import SqlRecord
from server.results import RoundResult
from server.rounds import FederatedRun
from simulations.federation import Federation, prepare_federation

D = 8
SHARES = "train.secagg_shares"
UNMASK = "train.secagg_unmask"
CAP = 1 << 24


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with server_identity():
        yield


def node(partition: int) -> int:
    return FIRST_NODE_ID + partition


class Coordinator:
    """A malicious coordinator's relay: remembers each round's configuration, rewrites messages."""

    def __init__(self) -> None:
        self.configs: dict[int, SecAggConfig] = {}
        self.rewrite: Callable[[Message], None] | None = None

    def __call__(self, _: FakeGrid, msg: Message) -> None:
        if KEY_SECAGG_CONFIG in msg.content.array_records:
            for raw in record_to_bundle(msg.content[KEY_SECAGG_CONFIG], 8, CAP):
                config = SecAggConfig.decode(raw)
                self.configs[config.round] = config
        if self.rewrite is not None:
            self.rewrite(msg)


def federation_run(
    tmp_path: Path, num_sites: int, coordinator: Coordinator, *, policies: str | None = None,
    faults: list[Fault] | None = None,
) -> tuple[FederatedRun, FakeGrid, SqlRecord, Federation]:  # fmt: skip
    fed = prepare_federation(tmp_path / "sites", num_sites, coordinator_key=None)
    site_policies = None
    if policies is not None:
        policy_dir = tmp_path / "policies"
        policy_dir.mkdir()
        (policy_dir / "default.toml").write_text(policies)
        site_policies = load_site_policies(policy_dir)
    app = make_client_app(fed.site_setup(site_policies))
    grid = FakeGrid(app, num_sites, on_deliver=coordinator, faults=faults or [])
    record = SqlRecord(f"sqlite:///{tmp_path / 'record.db'}")
    book = RunBook(record, Ed25519PrivateKey.generate(), "00000000beef")
    run = FederatedRun(echo_cfg(num_sites, num_features=D, secagg=True), grid, book=book)
    return run, grid, record, fed


def outcome(run: FederatedRun) -> RoundResult | None:
    try:
        (result,) = run.execute()
    except Exception:  # noqa: BLE001 - an aborted round: the audit log says why
        return None
    return result


def audit_reasons(record: SqlRecord) -> str:
    """Everything the coordinator's audit log says about secure-aggregation outcomes."""
    return "\n".join(
        str(e.payload())
        for e in record.events()
        if e.kind.startswith("secagg") or "refused" in e.kind
    )


def _share_request(msg: Message, coordinator: Coordinator) -> list[tuple[ShareKeysRequest, bytes]]:
    raws = record_to_bundle(msg.content[KEY_SECAGG_MSG], 8, CAP)
    out = []
    for raw in raws:
        from common.secagg.messages import peek_round

        config = coordinator.configs[peek_round(raw)]
        out.append((ShareKeysRequest.decode(raw, config), raw))
    return out


def _set_share_requests(msg: Message, requests: list[ShareKeysRequest]) -> None:
    msg.content[KEY_SECAGG_MSG] = bundle_to_record([r.encode() for r in requests])


# ------------------------------------------------------------------ key substitution
def _substitute_keys(
    coordinator: Coordinator, victim: int, made: dict[int, KeyPair]
) -> Callable[[Message], None]:
    """At the shares stage, hand the victim the coordinator's own keys for every neighbour."""

    def rewrite(msg: Message) -> None:
        md = msg.metadata
        if md.message_type != SHARES or md.dst_node_id != victim:
            return
        requests = []
        for request, _ in _share_request(msg, coordinator):
            ads = []
            for ad in request.advertisements:
                if ad.node_id != victim:
                    pair = made.setdefault(ad.node_id, generate_key_pair())
                    ad = Advertisement(
                        ad.node_id, pair.public_bytes, ad.mask_key, ad.commitment,
                        ad.identity_key, ad.signature,
                    )  # fmt: skip
                ads.append(ad)
            requests.append(
                ShareKeysRequest(request.run_id, request.round, request.node_id, tuple(ads))
            )
        _set_share_requests(msg, requests)

    return rewrite


def _recover_seed(
    grid: FakeGrid, coordinator: Coordinator, victim: int, made: dict[int, KeyPair]
) -> bytes | None:
    """What the coordinator gets from the victim's share ciphertexts with its substituted keys:
    the victim's self-mask seed, verified against the victim's own commitment (None: nothing)."""
    config = coordinator.configs[1]
    exchange = next(e for e in grid.history if e.message_types.get(victim) == SHARES)
    reply = exchange.replies[victim]
    if reply.has_error():
        return None
    (raw,) = record_to_bundle(reply.content[KEY_SECAGG_MSG], 8, CAP)
    sent = ShareKeysReply.decode(raw, config)
    keys_exchange = next(
        e for e in grid.history if e.message_types.get(victim) == "train.secagg_keys"
    )
    (ad_raw,) = record_to_bundle(keys_exchange.replies[victim].content[KEY_SECAGG_MSG], 8, CAP)
    from common.secagg.messages import AdvertiseKeysReply

    advert = AdvertiseKeysReply.decode(ad_raw, config)
    shares = []
    for c in sent.ciphertexts:
        key = share_encryption_key(
            made[c.node_id], advert.encryption_key, config, victim, c.node_id
        )
        plain = aead.decrypt(key, c.data, share_associated_data(config, victim, c.node_id))
        shares.append(Share(config.share_index(c.node_id), decode_value(plain[VALUE_SIZE:])))

    def seed_opens(seed: bytes) -> bool:
        return opens(
            advert.commitment, seed, run_id=config.run_id, round=config.round, node_id=victim
        )

    found = reconstruct_verified(
        shares, threshold=config.threshold, verify=seed_opens, max_attempts=64
    )
    return found.secret


def test_key_substitution_is_refused_and_reaches_the_audit_log(tmp_path: Path) -> None:
    coordinator, made = Coordinator(), {}
    victim = node(2)
    coordinator.rewrite = _substitute_keys(coordinator, victim, made)
    run, grid, record, _ = federation_run(tmp_path, 5, coordinator)
    result = outcome(run)
    assert made, "the attack never ran"
    # the victim verified every neighbour's key against its roster and encrypted nothing
    assert _recover_seed(grid, coordinator, victim, made) is None
    assert "advertisement signature does not verify" in audit_reasons(record)
    if result is not None:
        assert victim not in {s.node_id for s in result.sites if s.accepted}


def test_key_substitution_control_recovers_the_victims_seed_without_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same attack with the roster signature check switched off: the coordinator
    decrypts the victim's shares and reconstructs its self-mask seed (so the test above can fail)."""
    real = secagg_client.verify_advertisements

    def accept_all(config: SecAggConfig, entries: Any, members: Any) -> Any:
        verified = real(config, entries, None)
        identities = {n: e[3] for n, e in entries.items()}
        return type(verified)(identities, {})

    monkeypatch.setattr(secagg_client, "verify_advertisements", accept_all)
    coordinator, made = Coordinator(), {}
    victim = node(2)
    coordinator.rewrite = _substitute_keys(coordinator, victim, made)
    _, grid, _, _ = run_and(tmp_path, coordinator)
    assert _recover_seed(grid, coordinator, victim, made) is not None


def run_and(
    tmp_path: Path, coordinator: Coordinator
) -> tuple[RoundResult | None, FakeGrid, SqlRecord, Federation]:
    run, grid, record, fed = federation_run(tmp_path, 5, coordinator)
    return outcome(run), grid, record, fed


# ------------------------------------------------------------------ sybil
SYBIL = FIRST_NODE_ID + 99  # a node id no site holds


def _sybil_config(config: SecAggConfig, key: Ed25519PrivateKey) -> SecAggConfig:
    """The round's configuration with one more member: the sybil, bound to the coordinator's key."""
    return make_config(
        run_id=config.run_id, round=config.round, cohort=[*config.cohort, SYBIL],
        identities=[*config.identities, public_bytes(key)], threshold=config.threshold + 1,
        neighbours=config.size, value_bound=config.value_bound,
        vector_length=config.vector_length, bits=config.bits,
    )  # fmt: skip


def _insert_sybil(coordinator: Coordinator, key: Ed25519PrivateKey) -> Callable[[Message], None]:
    """The coordinator invents a member: it is in the configuration every site is sent, and
    the coordinator advertises for it at the shares stage (signed with its own key)."""

    def rewrite(msg: Message) -> None:
        md = msg.metadata
        if md.message_type == "train.secagg_keys":
            raws = record_to_bundle(msg.content[KEY_SECAGG_CONFIG], 8, CAP)
            forged = [_sybil_config(SecAggConfig.decode(raw), key) for raw in raws]
            for config in forged:
                coordinator.configs[config.round] = config
            msg.content[KEY_SECAGG_CONFIG] = bundle_to_record([c.encode() for c in forged])
        elif md.message_type == SHARES:
            requests = []
            for request, _ in _share_request(msg, coordinator):
                config = coordinator.configs[request.round]
                enc, mask = generate_key_pair().public_bytes, generate_key_pair().public_bytes
                commitment = bytes(32)
                signature = key.sign(advertisement_message(config, SYBIL, enc, mask, commitment))
                fake = Advertisement(SYBIL, enc, mask, commitment, public_bytes(key), signature)
                ads = tuple(sorted([*request.advertisements, fake], key=lambda a: a.node_id))
                requests.append(
                    ShareKeysRequest(request.run_id, request.round, request.node_id, ads)
                )
            _set_share_requests(msg, requests)

    return rewrite


class _SybilAware(Coordinator):
    """Keeps the forged configurations (the honest ones arrive first, then are rewritten)."""

    def __call__(self, grid: FakeGrid, msg: Message) -> None:
        if self.rewrite is not None:
            self.rewrite(msg)


def test_sybil_member_bound_to_the_coordinators_key_is_refused_by_every_site(
    tmp_path: Path,
) -> None:
    coordinator = _SybilAware()
    coordinator.rewrite = _insert_sybil(coordinator, Ed25519PrivateKey.generate())
    run, grid, record, _ = federation_run(tmp_path, 6, coordinator)
    assert outcome(run) is None  # no site makes a key for a round with a member it cannot know
    assert "identities that are not in the roster" in audit_reasons(record)
    keys = next(e for e in grid.history if "train.secagg_keys" in e.message_types.values())
    assert all(r.has_error() for r in keys.replies.values())


def test_sybil_control_without_the_roster_checks_the_sites_share_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = secagg_client.verify_advertisements
    monkeypatch.setattr(secagg_client, "check_bound_identities", lambda *args: None)
    monkeypatch.setattr(secagg_client, "verify_advertisements", lambda c, e, m: real(c, e, None))
    # the coordinator's own relay takes the advertisements signed over its forged configuration
    monkeypatch.setattr(
        secagg_server,
        "verify_advertisements",
        lambda c, e, m: Verified({n: f[3] for n, f in e.items()}, {}),
    )
    coordinator = _SybilAware()
    coordinator.rewrite = _insert_sybil(coordinator, Ed25519PrivateKey.generate())
    run, grid, _, _ = federation_run(tmp_path, 6, coordinator)
    outcome(run)
    exchange = next(e for e in grid.history if SHARES in e.message_types.values())
    sent_to_sybil = 0
    for reply in exchange.replies.values():
        if reply.has_error():
            continue
        (raw,) = record_to_bundle(reply.content[KEY_SECAGG_MSG], 8, CAP)
        shares = ShareKeysReply.decode(raw, coordinator.configs[1])
        sent_to_sybil += any(c.node_id == SYBIL for c in shares.ciphertexts)
    assert sent_to_sybil > 0


# ------------------------------------------------------------------ consistency
def _edit_unmask(
    victim: int, edit: Callable[[UnmaskRequest], UnmaskRequest], coordinator: Coordinator
) -> Callable[[Message], None]:
    def rewrite(msg: Message) -> None:
        md = msg.metadata
        if md.message_type != UNMASK or md.dst_node_id != victim:
            return
        config = coordinator.configs[1]
        request = UnmaskRequest.decode(record_to_bytes(msg.content[KEY_SECAGG_MSG], CAP), config)
        msg.content[KEY_SECAGG_MSG] = bytes_to_record(edit(request).encode())

    return rewrite


def _revealed(grid: FakeGrid, victim: int) -> bool:
    exchange = next(e for e in grid.history if e.message_types.get(victim) == UNMASK)
    return not exchange.replies[victim].has_error()


def test_unmask_with_another_survivor_set_than_the_signed_one_is_refused(tmp_path: Path) -> None:
    victim, claimed_dropped = node(0), node(3)
    coordinator = Coordinator()

    def other_view(request: UnmaskRequest) -> UnmaskRequest:
        survivors = tuple(n for n in request.survivors if n != claimed_dropped)
        return UnmaskRequest(
            request.run_id, request.round, request.node_id, survivors, request.signatures
        )

    coordinator.rewrite = _edit_unmask(victim, other_view, coordinator)
    run, grid, record, _ = federation_run(tmp_path, 6, coordinator)
    outcome(run)
    assert not _revealed(grid, victim)
    assert "not the one this site signed" in audit_reasons(record)


def test_unmask_without_a_quorum_of_signatures_is_refused_and_control(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = node(0)
    coordinator = Coordinator()

    def cut(request: UnmaskRequest) -> UnmaskRequest:
        kept: tuple[Signed, ...] = request.signatures[:2]  # the quorum of 6 sites, t = 3, is 5
        return UnmaskRequest(
            request.run_id, request.round, request.node_id, request.survivors, kept
        )

    coordinator.rewrite = _edit_unmask(victim, cut, coordinator)
    run, grid, record, _ = federation_run(tmp_path / "on", 6, coordinator)
    outcome(run)
    assert not _revealed(grid, victim)
    assert "fewer than the quorum" in audit_reasons(record)
    # control: with the quorum check down to one signature the victim reveals its shares
    monkeypatch.setattr(secagg_client, "quorum", lambda config: 1)
    coordinator = Coordinator()
    coordinator.rewrite = _edit_unmask(victim, cut, coordinator)
    run, grid, _, _ = federation_run(tmp_path / "off", 6, coordinator)
    outcome(run)
    assert _revealed(grid, victim)


# ------------------------------------------------------------------ floors over verified members
STRICT = """
kind = "site"
[privacy]
require_dp = false
[rounds]
min_cohort_size = 6
min_secagg_threshold = 1
min_secagg_threshold_fraction = 0.5
min_secagg_neighbours = 1
"""


def test_cohort_floor_counts_verified_members_not_the_invited_cohort(tmp_path: Path) -> None:
    """Six invited (the floor), one silent at keys: five verified members, below the floor."""
    coordinator = Coordinator()
    run, grid, record, _ = federation_run(
        tmp_path, 6, coordinator, policies=STRICT, faults=[Fault(node(5), "train.secagg_keys")]
    )
    assert outcome(run) is None
    assert "fewer than this site's minimum 6" in audit_reasons(record)
    exchange = next(e for e in grid.history if SHARES in e.message_types.values())
    assert all(r.has_error() for r in exchange.replies.values())
