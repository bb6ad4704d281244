"""Secure aggregation through the real ServerApp/ClientApp code paths, Ray-free.

``FederatedRun`` (server.rounds) drives the SecAgg+ aggregator (server.aggregation.secure) over an
in-memory Grid (tests/support/fake_grid.py) whose nodes run the real ClientApp
(client.app / client.secure) with their own Flower ``Context``. Messages cross
a protobuf round trip, node state persists between messages, and fault hooks
drop, tamper with, or reorder replies.

Most tests use the protocol-benchmark model ("vector" model, "echo" workload,
a few coordinates) with ``compute_update`` replaced by a node-specific update
(different norms, some above the clip norm), so that the aggregate names
exactly which sites are in it; one test trains on digits for real.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import fake_grid
import numpy as np
import pytest
from fake_grid import (
    FIRST_NODE_ID,
    FakeGrid,
    Fault,
    error_reply,
    flip_payload_byte,
    oversize_payload,
    reverse_order,
    server_identity,
    swap_payload,
)
from federation import federated_setup
from flwr.app import ConfigRecord, Message, RecordDict

import client.secure as client_secure
from client.agent import LocalUpdate
from client.app import make_client_app
from client.identity import load_site_identity
from client.secure import STATE_RECORD
from client.state import site_dir, state_key
from common.config import RunConfig
from common.dp import clip_l2
from common.errors import IntegrityError, ProtocolAbort
from common.records import KEY_ARRAYS, KEY_METRICS, max_secagg_reply_bytes, record_to_vector
from common.rng import seeded_generator
from common.secagg import SecAggClient, SecAggConfig, make_config
from common.secagg.quantize import error_bound
from server.aggregation import Aggregate, Exchange, RoundInput
from server.pipeline import aggregator_for
from server.results import RoundResult
from server.rounds import FederatedRun
from simulations.faults import FaultPlan, SilencingGrid

D = 16  # coordinates of the "vector" model
CLIP = 1.0
STAGES = ("keys", "shares", "masked", "consistency", "unmask")


def node(partition: int) -> int:
    node_id: int = FIRST_NODE_ID + partition
    return node_id


def node_update(partition: int) -> np.ndarray:
    """A fixed update per site, L2 norm 0.5 + 0.25 * partition (sites >= 3 exceed CLIP)."""
    v = seeded_generator(4_242 + partition).standard_normal(D)
    return (v * ((0.5 + 0.25 * partition) / np.linalg.norm(v))).astype(np.float32)


def clipped(partition: int, clip_norm: float = CLIP) -> np.ndarray:
    return clip_l2(node_update(partition), clip_norm)[0].astype(np.float64)


def vector_cfg(num_sites: int, **changes: Any) -> RunConfig:
    base: dict[str, Any] = dict(
        dataset="custom",
        model="vector",
        workload="echo",
        num_features=D,
        num_classes=2,
        num_sites=num_sites,
        rounds=1,
        device="cpu",
        clip_norm=CLIP,
    )
    base.update(changes)
    return RunConfig(**base)


@pytest.fixture(autouse=True)
def _server_identity() -> Iterator[None]:
    with server_identity():
        yield


@pytest.fixture
def distinct_updates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each site sends ``node_update(partition-id)`` with ``partition-id + 1`` examples.

    The fake trainer is injected through ``make_client_app(trainer=...)``: this
    module's ``federation`` builds its ClientApps with it.
    """

    def fake_trainer(site: Any, arrays: object) -> LocalUpdate:
        partition = int(site.context.node_config["partition-id"])
        return LocalUpdate(node_update(partition), partition + 1, {"train-seconds": 0.0})

    monkeypatch.setitem(
        globals(), "make_client_app", partial(make_client_app, trainer=fake_trainer)
    )


def federation(
    cfg: RunConfig, site_root: Path, **grid_options: Any
) -> tuple[FederatedRun, FakeGrid]:
    grid = FakeGrid(
        make_client_app(federated_setup(site_root, cfg.num_sites)), cfg.num_sites, **grid_options
    )
    return FederatedRun(cfg, grid), grid


IDENTITY_QUERY = "query.secagg_identity"


def stage_history(grid: FakeGrid) -> list[fake_grid.Exchange]:
    """The secure-aggregation stage exchanges, without the once-per-site identity query."""
    return [e for e in grid.history if IDENTITY_QUERY not in e.message_types.values()]


def placeholder_identities(n: int) -> list[bytes]:
    """Distinct 32-byte keys for a configuration built only to compute an error bound."""
    return [i.to_bytes(32, "big") for i in range(1, n + 1)]


def quantisation_tolerance(cfg: RunConfig, contributors: int, magnitude: float) -> float:
    """Bound on |secure mean - exact mean| per coordinate: quantisation, then float32 storage."""
    config = make_config(
        run_id=1,
        round=1,
        cohort=[node(i) for i in range(cfg.num_sites)],
        identities=placeholder_identities(cfg.num_sites),
        threshold=cfg.secagg_threshold_value,
        value_bound=cfg.clip_norm,
        vector_length=D,
        bits=cfg.secagg_bits,
    )
    float32_rounding = 2 * float(np.finfo(np.float32).eps) * max(1.0, magnitude)
    return error_bound(config, contributors) / contributors + float32_rounding


def assert_mean_of(
    run: FederatedRun, before: np.ndarray, partitions: list[int], cfg: RunConfig
) -> None:
    expected = np.mean([clipped(p, cfg.clip_norm) for p in partitions], axis=0)
    delta = run.global_vector.astype(np.float64) - before.astype(np.float64)
    tol = quantisation_tolerance(cfg, len(partitions), float(np.max(np.abs(run.global_vector))))
    np.testing.assert_allclose(delta, expected, rtol=0, atol=tol)


def accepted(result: RoundResult) -> set[int]:
    return {s.node_id for s in result.sites if s.accepted}


def reasons(result: RoundResult) -> dict[int, str]:
    return {s.node_id: s.reason for s in result.sites if not s.accepted}


# ------------------------------------------------------------------ (a) agreement
def test_secure_round_echo_equals_plain_fedavg_within_quantisation_bound(tmp_path: Path) -> None:
    cfg = vector_cfg(5, clip_norm=0.01)  # echo updates (1e-3 per coordinate) lie within C
    plain_run, _ = federation(cfg.replace(secagg=False), tmp_path / "plain")
    secure_run, _ = federation(cfg, tmp_path / "secure")
    before = secure_run.global_vector.copy()
    np.testing.assert_array_equal(before, plain_run.global_vector)  # same seed, same model
    plain = plain_run.execute()[0]
    secure = secure_run.execute()[0]
    assert plain.secagg is None and secure.secagg is not None
    assert secure.participants == plain.participants == 5
    tol = quantisation_tolerance(cfg, 5, float(np.max(np.abs(plain_run.global_vector))))
    np.testing.assert_allclose(secure_run.global_vector, plain_run.global_vector, rtol=0, atol=tol)
    # the update is 1e-3 per coordinate: a tolerance this tight sees any mask residue
    assert tol < 1e-5
    assert not np.array_equal(secure_run.global_vector, before)


def test_secure_round_distinct_updates_equals_mean_of_clipped_updates(
    tmp_path: Path, distinct_updates: None
) -> None:
    cfg = vector_cfg(6)
    run, grid = federation(cfg, tmp_path, order=reverse_order)
    before = run.global_vector.copy()
    result = run.execute()[0]
    assert accepted(result) == {node(i) for i in range(6)}
    assert result.secagg == {"participants": 6, "dropouts": 0, "threshold": 3, "neighbours": 5}
    assert_mean_of(run, before, list(range(6)), cfg)
    # sites 3..5 were above C: without clipping on the client the mean would differ
    unclipped = np.mean([node_update(p) for p in range(6)], axis=0)
    assert np.max(np.abs(run.global_vector - before - unclipped)) > 1e-3
    # every node answered the five stages, in order, once each
    assert [set(e.message_types.values()) for e in stage_history(grid)] == [
        {f"train.secagg_{s}"} for s in STAGES
    ]


def test_secure_round_digits_equals_plain_average_of_same_clipped_updates(tmp_path: Path) -> None:
    # record-level DP off: DP-SGD noise would make the two runs' updates differ
    cfg = RunConfig(dataset="digits", num_sites=3, rounds=1, local_epochs=1, device="cpu", dp=False)
    plain_run, plain_grid = federation(cfg.replace(secagg=False), tmp_path / "plain")
    secure_run, _ = federation(cfg, tmp_path / "secure")
    before = secure_run.global_vector.copy()
    plain_run.execute()
    secure = secure_run.execute()[0]
    assert secure.participants == 3 and secure.accuracy is not None
    size = secure_run.spec.size
    updates = [
        record_to_vector(reply.content[KEY_ARRAYS], size, what="update")
        for reply in plain_grid.history[1].replies.values()  # [0]: the admission query
    ]
    expected = np.mean([clip_l2(u, cfg.clip_norm)[0].astype(np.float64) for u in updates], 0)
    delta = secure_run.global_vector.astype(np.float64) - before.astype(np.float64)
    config = make_config(
        run_id=1,
        round=1,
        cohort=[1, 2, 3],
        identities=placeholder_identities(3),
        threshold=cfg.secagg_threshold_value,
        value_bound=cfg.clip_norm,
        vector_length=size,
        bits=cfg.secagg_bits,
    )
    float32_rounding = 2 * float(np.finfo(np.float32).eps) * float(np.max(np.abs(before)) + 1)
    np.testing.assert_allclose(
        delta, expected, rtol=0, atol=error_bound(config, 3) / 3 + float32_rounding
    )


def test_secure_round_unequal_example_counts_averages_uniformly(
    tmp_path: Path, distinct_updates: None
) -> None:
    """By design a secure round weights every contributor equally: a site's example
    count is not revealed to the server, and DP-FedAvg's sensitivity C/n assumes it."""
    cfg = vector_cfg(4, clip_norm=10.0)  # nothing is clipped: only the weighting can differ
    secure_run, _ = federation(cfg, tmp_path / "secure")
    before = secure_run.global_vector.copy()
    secure_run.execute()
    assert_mean_of(secure_run, before, [0, 1, 2, 3], cfg)


# ------------------------------------------------------------------ (b) dropouts
@pytest.mark.parametrize("stage", STAGES)
def test_secure_round_one_dropout_at_stage_completes_with_survivors(
    tmp_path: Path, distinct_updates: None, stage: str
) -> None:
    cfg = vector_cfg(6)
    dropper = node(4)
    run, grid = federation(cfg, tmp_path, faults=[Fault(dropper, f"secagg_{stage}")])
    before = run.global_vector.copy()
    result = run.execute()[0]
    if stage in ("consistency", "unmask"):
        # its masked input is already in the sum; the others reconstruct its self-mask
        assert accepted(result) == {node(i) for i in range(6)}
        assert result.secagg is not None and result.secagg["dropouts"] == 0
        assert_mean_of(run, before, list(range(6)), cfg)
    else:
        assert accepted(result) == {node(i) for i in range(6)} - {dropper}
        assert result.secagg == {"participants": 6, "dropouts": 1, "threshold": 3, "neighbours": 5}
        assert reasons(result) == {dropper: f"no reply at stage {stage}"}
        assert_mean_of(run, before, [0, 1, 2, 3, 5], cfg)
        # a site that dropped is asked nothing after that stage
        later = stage_history(grid)[STAGES.index(stage) + 1 :]
        assert all(dropper not in e.message_types for e in later)
    assert result.participants == len(accepted(result))


def test_secure_round_dropouts_across_stages_exact_sum_of_survivors(
    tmp_path: Path, distinct_updates: None
) -> None:
    cfg = vector_cfg(10)  # k = 9, t = 6, consistency quorum 8
    faults = [Fault(node(1), "secagg_shares"), Fault(node(6), "secagg_masked", deliver=False)]
    run, _ = federation(cfg, tmp_path, faults=faults, order=reverse_order)
    before = run.global_vector.copy()
    result = run.execute()[0]
    assert result.secagg == {"participants": 10, "dropouts": 2, "threshold": 6, "neighbours": 9}
    assert set(reasons(result)) == {node(1), node(6)}
    assert_mean_of(run, before, [0, 2, 3, 4, 5, 7, 8, 9], cfg)


def test_secure_round_twenty_percent_drop_at_masked_completes(
    tmp_path: Path, distinct_updates: None
) -> None:
    # k = 9, t = 6: 2 of 10 silent at the masked stage leaves 8, the consistency quorum
    # max(t, floor((n + t - 1) / 2) + 1) = 8 (common.secagg.signing.quorum)
    cfg = vector_cfg(10)
    silent = [2, 9]
    run, _ = federation(cfg, tmp_path, faults=[Fault(node(p), "secagg_masked") for p in silent])
    before = run.global_vector.copy()
    result = run.execute()[0]
    assert result.secagg is not None and result.secagg["dropouts"] == 2
    survivors = [p for p in range(10) if p not in silent]
    assert accepted(result) == {node(p) for p in survivors}
    assert_mean_of(run, before, survivors, cfg)


def test_secure_round_below_the_consistency_quorum_aborts(
    tmp_path: Path, distinct_updates: None
) -> None:
    # 3 of 10 silent at the masked stage leaves 7: every survivor still has t = 6
    # live neighbours, but 7 signers cannot be a quorum (8) over one survivor set,
    # so no site would reveal; the coordinator stops before asking.
    cfg = vector_cfg(10)
    faults = [Fault(node(p), "secagg_masked") for p in (2, 5, 9)]
    run, _ = federation(cfg, tmp_path, faults=faults)
    with pytest.raises(ProtocolAbort, match="consistency quorum 8"):
        run.execute()


def test_secure_round_silent_site_rejoins_next_round(
    tmp_path: Path, distinct_updates: None
) -> None:
    cfg = vector_cfg(5, rounds=2)
    # silent at masked in round 1 (its sealed state stays behind), fine in round 2
    fault = Fault(node(0), "secagg_masked", server_round=1, deliver=False)
    run, grid = federation(cfg, tmp_path, faults=[fault])
    first, second = run.execute()
    assert node(0) not in accepted(first)
    assert accepted(second) == {node(i) for i in range(5)}
    assert all(STATE_RECORD not in c.state.config_records for c in grid.contexts.values())


# ------------------------------------------------------------------ (c) abort
@pytest.mark.parametrize(
    ("stage", "silent"),
    [("keys", [0, 1, 2]), ("shares", [0, 1, 2]), ("masked", [1, 3, 4]), ("unmask", [1, 2])],
)
def test_secure_round_below_threshold_fails_the_round_model_unchanged_run_goes_on(
    tmp_path: Path, distinct_updates: None, stage: str, silent: list[int]
) -> None:
    # 5 sites, k = 4, t = 3. At unmask two silent sites leave each other survivor
    # with two responding neighbours: fewer than t shares of its self-mask seed.
    cfg = vector_cfg(5, rounds=3, secagg_setup_rounds=1)  # keys and shares again every round
    faults = [Fault(node(p), f"secagg_{stage}", server_round=2) for p in silent]
    run, _ = federation(cfg, tmp_path, faults=faults)
    models: dict[int, np.ndarray] = {}
    original_round = run.run_round

    def spy(server_round: int) -> RoundResult:
        models[server_round] = run.global_vector.copy()  # the model each round starts from
        return original_round(server_round)

    run.run_round = spy  # type: ignore[method-assign]
    results = run.execute()  # a failed round ends the round, not the run
    assert [r.failed for r in results] == [False, True, False]
    assert "threshold" in (results[1].failure or "")
    np.testing.assert_array_equal(models[3], models[2])  # the failed round changed nothing
    assert results[2].participants == 5


def test_secure_round_two_site_cohort_too_small_fails_and_no_round_succeeds(tmp_path: Path) -> None:
    cfg = vector_cfg(3, min_sites=3)
    run, _ = federation(cfg, tmp_path, faults=[Fault(node(0), "secagg_keys")])
    before = run.global_vector.copy()
    with pytest.raises(ProtocolAbort, match="no round of run .* succeeded"):
        run.execute()
    (result,) = run.results
    assert result.failed and "secure aggregation aborted" in (result.failure or "")
    np.testing.assert_array_equal(run.global_vector, before)


# ------------------------------------------------------------------ (d) bad replies
def _reply_cap(num_sites: int) -> int:
    return max_secagg_reply_bytes(num_sites, D * 4)


@pytest.mark.parametrize(
    ("stage", "rewrite", "why"),
    [
        ("keys", flip_payload_byte(0), "unknown message format"),
        ("shares", flip_payload_byte(0), "unknown message format"),
        ("masked", flip_payload_byte(0), "unknown message format"),
        ("keys", swap_payload(node(0)), f"claims node {node(0)}"),
        ("masked", swap_payload(node(0)), f"claims node {node(0)}"),
        ("masked", oversize_payload(_reply_cap(6) + 1), "exceeds the limit"),
        ("masked", oversize_payload(4), "expected exactly"),
        ("shares", error_reply("disk on fire"), "site error: disk on fire"),
        ("masked", error_reply("disk on fire"), "site error: disk on fire"),
    ],
    ids=["keys-tamper", "shares-tamper", "masked-tamper", "keys-claims-other",
         "masked-claims-other", "oversized", "wrong-size", "shares-error", "masked-error"],
)  # fmt: skip
def test_secure_round_bad_reply_removes_only_that_site(
    tmp_path: Path, distinct_updates: None, stage: str, rewrite: fake_grid.Rewrite, why: str
) -> None:
    cfg = vector_cfg(6)
    culprit = node(3)
    run, _ = federation(cfg, tmp_path, faults=[Fault(culprit, f"secagg_{stage}", rewrite)])
    before = run.global_vector.copy()
    result = run.execute()[0]
    assert accepted(result) == {node(i) for i in range(6)} - {culprit}
    assert list(reasons(result)) == [culprit]
    assert reasons(result)[culprit].startswith(f"stage {stage}:")
    assert why in reasons(result)[culprit]
    assert result.secagg is not None and result.secagg["dropouts"] == 1
    assert_mean_of(run, before, [0, 1, 2, 4, 5], cfg)


def _without_metrics(msg: Message, reply: Message, _: Mapping[int, Message]) -> Message:
    content = RecordDict({k: v for k, v in reply.content.items() if k != KEY_METRICS})
    return Message(content, reply_to=msg)


def test_secure_round_masked_reply_without_metrics_still_counts(
    tmp_path: Path, distinct_updates: None
) -> None:
    # a masked input needs no metrics (under secure aggregation a site states no count or norm)
    cfg = vector_cfg(6)
    culprit = node(0)
    run, _ = federation(cfg, tmp_path, faults=[Fault(culprit, "secagg_masked", _without_metrics)])
    before = run.global_vector.copy()
    result = run.execute()[0]
    assert reasons(result) == {}
    assert_mean_of(run, before, [0, 1, 2, 3, 4, 5], cfg)


@pytest.mark.parametrize("offset", [-1, -40])
def test_secure_round_tampered_unmask_share_removes_only_that_site(
    tmp_path: Path, distinct_updates: None, offset: int
) -> None:
    # 6 sites, t = 3: every secret has 5 shares, so one bad share is outvoted. The flipped
    # byte lies in the culprit's last revealed share (a survivor's self-mask seed share).
    cfg = vector_cfg(6)
    culprit = node(2)
    aggregates: list[Aggregate] = []
    fault = Fault(culprit, "secagg_unmask", flip_payload_byte(offset))
    grid = FakeGrid(
        make_client_app(federated_setup(tmp_path, cfg.num_sites)), cfg.num_sites, faults=[fault]
    )
    run = FederatedRun(cfg, grid)
    secure = aggregator_for(cfg, run.run_id, run.spec.size)

    class Recording:
        def aggregate(self, round_input: RoundInput, exchange: Exchange) -> Aggregate:
            aggregates.append(secure.aggregate(round_input, exchange))
            return aggregates[-1]

    run.aggregator = Recording()
    before = run.global_vector.copy()
    result = run.execute()[0]
    # its masked input is in the sum already: the round keeps every site, and the mean is exact
    assert_mean_of(run, before, list(range(6)), cfg)
    assert accepted(result) == {node(i) for i in range(6)}
    assert result.secagg == {"participants": 6, "dropouts": 0, "threshold": 3, "neighbours": 5}
    # the lying share holder is named by the protocol and in the aggregate's events
    (agg,) = aggregates
    assert agg.contributors == [node(i) for i in range(6)]
    events = {e.kind: e.payload for e in agg.events}
    assert events["secagg_share_rejected"]["node_id"] == str(culprit)
    rejected = events["secagg_outcome"]["rejected"]
    assert list(rejected) == [str(culprit)]
    assert rejected[str(culprit)].startswith("stage unmask: revealed a share of node ")
    assert "inconsistent with the verified secret" in rejected[str(culprit)]


def test_secure_round_tampered_share_ciphertext_fails_closed_at_receiver(
    tmp_path: Path, distinct_updates: None
) -> None:
    # A share ciphertext is opaque to the server; its receiver's AEAD check fails,
    # so the receiver (not the sender) cannot mask and leaves the round. The
    # sender's last ciphertext goes to its highest neighbour.
    cfg = vector_cfg(6)
    sender, receiver = node(1), node(5)
    run, _ = federation(cfg, tmp_path, faults=[Fault(sender, "secagg_shares", flip_payload_byte())])
    before = run.global_vector.copy()
    result = run.execute()[0]
    assert set(reasons(result)) == {receiver}
    assert "IntegrityError" in reasons(result)[receiver]
    assert_mean_of(run, before, [0, 1, 2, 3, 4], cfg)


def test_secure_round_replies_in_any_order_same_aggregate(
    tmp_path: Path, distinct_updates: None
) -> None:
    cfg = vector_cfg(6)
    shuffle_rng = seeded_generator(99)

    def shuffled(replies: list[Message]) -> list[Message]:
        return [replies[int(i)] for i in shuffle_rng.permutation(len(replies))]

    run, _ = federation(cfg, tmp_path, order=shuffled, faults=[Fault(node(2), "secagg_masked")])
    before = run.global_vector.copy()
    run.execute()
    assert_mean_of(run, before, [0, 1, 3, 4, 5], cfg)


# ------------------------------------------------------------------ (e) sealed state
def _state(grid: FakeGrid, node_id: int) -> ConfigRecord:
    record: ConfigRecord = grid.contexts[node_id].state.config_records[STATE_RECORD]
    return record


def test_sealed_state_cleared_after_unmask(tmp_path: Path, distinct_updates: None) -> None:
    cfg = vector_cfg(5)
    seen: list[int] = []

    def check(grid: FakeGrid, msg: Message) -> None:
        if msg.metadata.message_type == "train.secagg_unmask":
            record = _state(grid, msg.metadata.dst_node_id)  # present until unmask
            assert isinstance(record["sealed.1"], bytes) and record["rounds"] == [1]
            seen.append(msg.metadata.dst_node_id)

    run, grid = federation(cfg, tmp_path, on_deliver=check)
    run.execute()
    assert sorted(seen) == [node(i) for i in range(5)]
    for context in grid.contexts.values():
        assert STATE_RECORD not in context.state.config_records


def test_sealed_state_from_another_node_fails_to_open(
    tmp_path: Path, distinct_updates: None
) -> None:
    cfg = vector_cfg(6)
    thief, victim = node(2), node(4)
    captured: dict[str, Any] = {}

    def swap_state(grid: FakeGrid, msg: Message) -> None:
        if msg.metadata.message_type == "train.secagg_masked" and "done" not in captured:
            captured["done"] = True
            record = _state(grid, victim)
            captured["record"] = record
            grid.contexts[thief].state[STATE_RECORD] = ConfigRecord(dict(record.items()))

    run, grid = federation(cfg, tmp_path, on_deliver=swap_state)
    result = run.execute()[0]
    assert set(reasons(result)) == {thief}
    assert "IntegrityError" in reasons(result)[thief]
    # directly: the victim's blob opens under the victim's key and id only
    record = captured["record"]
    config = SecAggConfig.decode(record["config.1"])
    victim_dir = site_dir(grid.contexts[victim].node_config, victim, tmp_path)
    thief_dir = site_dir(grid.contexts[thief].node_config, thief, tmp_path)
    victim_key, thief_key = state_key(victim_dir), state_key(thief_dir)
    members = frozenset(config.identities)
    as_victim = (load_site_identity(victim_dir), members)
    as_thief = (load_site_identity(thief_dir), members)
    SecAggClient.open(record["sealed.1"], victim_key, victim, config, *as_victim)
    with pytest.raises(IntegrityError):
        SecAggClient.open(record["sealed.1"], thief_key, thief, config, *as_thief)
    with pytest.raises(IntegrityError):
        SecAggClient.open(record["sealed.1"], thief_key, victim, config, *as_victim)


@pytest.mark.parametrize("setup_rounds", [1, 2])
def test_sealed_state_from_previous_round_fails_to_open(
    tmp_path: Path, distinct_updates: None, setup_rounds: int
) -> None:
    cfg = vector_cfg(6, rounds=2, secagg_setup_rounds=setup_rounds)
    replayer = node(1)
    saved: dict[int, ConfigRecord] = {}

    def replay(grid: FakeGrid, msg: Message) -> None:
        md = msg.metadata
        if md.message_type != "train.secagg_masked" or md.dst_node_id != replayer:
            return
        current = _state(grid, replayer)
        if md.group_id == "1":
            saved[1] = ConfigRecord(dict(current.items()))
            return
        # round 2: keep this round's public config and round number, put back round 1's blob
        forged = ConfigRecord(dict(current.items()))
        forged["sealed.2"] = saved[1]["sealed.1"]
        grid.contexts[replayer].state[STATE_RECORD] = forged

    run, _ = federation(cfg, tmp_path, on_deliver=replay)
    first, second = run.execute()
    assert replayer in accepted(first)
    assert set(reasons(second)) == {replayer}
    assert "IntegrityError" in reasons(second)[replayer]


# ------------------------------------------------------------------ (f) simulated faults
def silenced_federation(
    cfg: RunConfig, site_root: Path, plan: FaultPlan
) -> tuple[FederatedRun, SilencingGrid]:
    app = make_client_app(federated_setup(site_root, cfg.num_sites))
    grid = SilencingGrid(FakeGrid(app, cfg.num_sites), plan)
    return FederatedRun(cfg, grid), grid


@pytest.mark.parametrize("stage", STAGES)
def test_drop_rate_injects_dropouts_at_drop_stage(
    tmp_path: Path, distinct_updates: None, stage: str
) -> None:
    cfg = vector_cfg(8)  # k = 7, t = 5, consistency quorum 7
    plan = FaultPlan(0.13, stage, seed=cfg.seed)  # round(0.13 * 8) = 1 site
    run, grid = silenced_federation(cfg, tmp_path, plan)
    before = run.global_vector.copy()
    result = run.execute()[0]
    assert result.sampled == 8 and result.secagg is not None
    assert len(grid.silenced[1]) == 1
    contributors = sorted(n - FIRST_NODE_ID for n in accepted(result))
    if stage in ("consistency", "unmask"):
        # silent after masking: still in the sum, unmasked by the others
        assert result.secagg["dropouts"] == 0 and contributors == list(range(8))
    else:
        assert result.secagg["dropouts"] == 1 and len(contributors) == 7
        # the server cannot tell an injected silence from a real one
        assert reasons(result) == {n: f"no reply at stage {stage}" for n in grid.silenced[1]}
    assert_mean_of(run, before, contributors, cfg)


def test_drop_rate_zero_injects_nothing(tmp_path: Path, distinct_updates: None) -> None:
    run, grid = silenced_federation(vector_cfg(4), tmp_path, FaultPlan(0.0, "keys"))
    result = run.execute()[0]
    assert result.secagg is not None and result.secagg["dropouts"] == 0
    assert len(accepted(result)) == 4 and grid.silenced == {}


# ------------------------------------------------------------------ (g) one setup, several rounds
def _actions(grid: FakeGrid) -> list[str]:
    return [next(iter(e.message_types.values())).split(".")[-1] for e in stage_history(grid)]


def test_one_setup_prepares_every_round_each_round_exact(
    tmp_path: Path, distinct_updates: None
) -> None:
    cfg = vector_cfg(5, rounds=3)  # default: one setup for up to 8 rounds
    held: list[list[int]] = []

    def spy(grid: FakeGrid, msg: Message) -> None:
        if msg.metadata.message_type == "train.secagg_masked" and msg.metadata.dst_node_id == node(
            0
        ):
            held.append(list(_state(grid, node(0))["rounds"]))

    run, grid = federation(cfg, tmp_path, on_deliver=spy)
    before = run.global_vector.copy()
    results = run.execute()
    assert _actions(grid) == [
        "secagg_keys", "secagg_shares",
        "secagg_masked", "secagg_consistency", "secagg_unmask",
        "secagg_masked", "secagg_consistency", "secagg_unmask",
        "secagg_masked", "secagg_consistency", "secagg_unmask",
    ]  # fmt: skip
    # a round's secrets are erased after its unmask stage; later rounds' wait sealed
    assert held == [[1, 2, 3], [2, 3], [3]]
    # the coordinator asked each site for its identity once, before the first setup
    queries = [e for e in grid.history if IDENTITY_QUERY in e.message_types.values()]
    assert grid.history[0] is queries[0] and len(queries) == 1
    assert sorted(queries[0].message_types) == [node(i) for i in range(5)]
    for result in results:
        assert accepted(result) == {node(i) for i in range(5)}
        assert result.secagg == {"participants": 5, "dropouts": 0, "threshold": 3, "neighbours": 4}
    # the same clipped updates each round: the model moved by three exact means
    expected = 3 * np.mean([clipped(p) for p in range(5)], axis=0)
    tol = 3 * quantisation_tolerance(cfg, 5, float(np.max(np.abs(run.global_vector))))
    np.testing.assert_allclose(run.global_vector - before, expected, rtol=0, atol=tol)
    assert all(STATE_RECORD not in c.state.config_records for c in grid.contexts.values())


def test_one_setup_dropout_in_a_later_round_exact_sum_of_survivors(
    tmp_path: Path, distinct_updates: None
) -> None:
    cfg = vector_cfg(6, rounds=2)
    gone = node(2)
    run, grid = federation(cfg, tmp_path, faults=[Fault(gone, "secagg_masked", server_round=2)])
    first = run.execute()[0]
    second = run.results[1]
    assert _actions(grid).count("secagg_keys") == 1
    assert accepted(first) == {node(i) for i in range(6)}
    assert accepted(second) == {node(i) for i in range(6)} - {gone}
    assert reasons(second) == {gone: "no reply at stage masked"}
    assert second.secagg is not None and second.secagg["dropouts"] == 1


def test_one_setup_silent_at_keys_is_out_of_every_prepared_round(
    tmp_path: Path, distinct_updates: None
) -> None:
    cfg = vector_cfg(6, rounds=2)
    silent = node(5)
    run, grid = federation(cfg, tmp_path, faults=[Fault(silent, "secagg_keys")])
    before = run.global_vector.copy()
    results = run.execute()
    for result in results:
        assert reasons(result) == {silent: "no reply at stage keys"}
        assert result.secagg is not None and result.secagg["dropouts"] == 1
    later = stage_history(grid)[1:]
    assert all(silent not in e.message_types for e in later)
    expected = 2 * np.mean([clipped(p) for p in range(5)], axis=0)
    tol = 2 * quantisation_tolerance(cfg, 5, float(np.max(np.abs(run.global_vector))))
    np.testing.assert_allclose(run.global_vector - before, expected, rtol=0, atol=tol)


def test_one_setup_site_refusing_a_later_round_is_out_of_that_round_only(
    tmp_path: Path, distinct_updates: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = vector_cfg(5, rounds=3)
    refuser = node(3)
    original = client_secure.decide_participation

    def decide(site: Any, cohort_size: int, threshold: Any, *rest: Any) -> Any:
        if site.context.node_id == refuser and site.server_round == 2:
            return "privacy budget spent (test)", None
        return original(site, cohort_size, threshold, *rest)

    monkeypatch.setattr(client_secure, "decide_participation", decide)
    run, grid = federation(cfg, tmp_path)
    first, second, third = run.execute()
    assert refuser in accepted(first) and refuser in accepted(third)
    assert refuser not in accepted(second)
    refused = {s.node_id: s for s in second.sites if s.refused}
    assert set(refused) == {refuser} and refused[refuser].reason == "privacy budget spent (test)"
    assert _actions(grid).count("secagg_keys") == 1


@pytest.mark.parametrize(
    ("field_name", "expected_error"),
    [("round", "is for round 3, not 2"), ("cohort", "share one run and one cohort")],
)
def test_setup_bundle_with_inconsistent_round_configs_is_refused_by_the_site(
    tmp_path: Path, distinct_updates: None, field_name: str, expected_error: str
) -> None:
    from common.records import KEY_SECAGG_CONFIG, bundle_to_record, record_to_bundle

    cfg = vector_cfg(6, rounds=2)
    victim = node(4)

    def forge(grid: FakeGrid, msg: Message) -> None:
        md = msg.metadata
        if md.message_type != "train.secagg_keys" or md.dst_node_id != victim:
            return
        raw = record_to_bundle(msg.content[KEY_SECAGG_CONFIG], 8, 1 << 20)
        configs = [SecAggConfig.decode(r) for r in raw]
        second = configs[1]
        forged = make_config(
            run_id=second.run_id,
            round=second.round + 1 if field_name == "round" else second.round,
            cohort=list(second.cohort)[:-1] if field_name == "cohort" else list(second.cohort),
            identities=list(second.identities)[:-1]
            if field_name == "cohort"
            else list(second.identities),
            threshold=second.threshold,
            value_bound=second.value_bound,
            vector_length=second.vector_length,
            bits=second.bits,
        )
        content = RecordDict(dict(msg.content.items()))
        content[KEY_SECAGG_CONFIG] = bundle_to_record([raw[0], forged.encode()])
        msg.content = content

    run, _ = federation(cfg, tmp_path, on_deliver=forge)
    first, second = run.execute()
    for result in (first, second):
        assert victim in reasons(result) and "site error" in reasons(result)[victim]
        assert expected_error in reasons(result)[victim]
        assert accepted(result) == {node(i) for i in range(6)} - {victim}


def test_setup_covers_only_remaining_rounds_and_later_setup_follows(
    tmp_path: Path, distinct_updates: None
) -> None:
    cfg = vector_cfg(5, rounds=5, secagg_setup_rounds=2)
    run, grid = federation(cfg, tmp_path)
    run.execute()
    actions = _actions(grid)
    assert actions.count("secagg_keys") == 3  # rounds 1-2, 3-4, 5
    assert actions.count("secagg_masked") == 5 and actions.count("secagg_unmask") == 5
