"""Each aggregator and the central-DP wrapper against fake sites over an in-memory Grid."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fake_grid import FIRST_NODE_ID, FakeGrid, Fault, error_reply, server_identity
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.config import RunConfig
from common.errors import ConfigurationError, ProtocolAbort
from common.records import (
    KEY_ARRAYS,
    KEY_CONFIG,
    KEY_METRICS,
    KEY_REFUSAL,
    KEY_RUN_ID,
    KEY_SECAGG_MSG,
    bytes_to_record,
    vector_to_record,
)
from common.secagg.signing import identity_message, public_bytes
from common.secagg.stages import IDENTITY_ACTION
from server.aggregation import (
    Aggregate,
    Exchange,
    GridExchange,
    PlainAggregator,
    RoundInput,
    SecAggAggregator,
)
from server.privacy import CentralDP
from server.results import SiteOutcome

D = 6


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with server_identity():
        yield


def cfg(**changes: object) -> RunConfig:
    base: dict[str, object] = dict(
        dataset="custom", model="vector", workload="echo", num_features=D, num_classes=2,
        num_sites=4, rounds=1, min_sites=2, device="cpu", secagg=False, clip_norm=1.0,
    )  # fmt: skip
    base.update(changes)
    return RunConfig(**base)  # type: ignore[arg-type]


def update_of(partition: int) -> np.ndarray:
    """Site ``partition`` sends ``(partition + 1) * 0.5`` in every coordinate."""
    return np.full(D, 0.5 * (partition + 1), dtype=np.float32)


def fake_sites(refuse: int | None = None, *, counts: bool = True) -> ClientApp:
    """A ClientApp whose train handler replies with :func:`update_of` (no training).

    ``counts=False``: the sites state no example count (as under DP).
    """
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        if partition == refuse:
            content = RecordDict(
                {
                    KEY_METRICS: MetricRecord({"refused": 1}),
                    KEY_REFUSAL: ConfigRecord({"reason": "not today"}),
                }
            )
            return Message(content, reply_to=msg)
        stated = {"num-examples": partition + 1, "train-seconds": 0.0} if counts else {}
        content = RecordDict(
            {KEY_ARRAYS: vector_to_record(update_of(partition)), KEY_METRICS: MetricRecord(stated)}
        )
        return Message(content, reply_to=msg)

    @app.query(IDENTITY_ACTION)
    def identity(msg: Message, context: Context) -> Message:
        key = IDENTITIES.setdefault(context.node_id, Ed25519PrivateKey.generate())
        run_number = int(str(msg.content.config_records[KEY_CONFIG][KEY_RUN_ID]), 16)
        claim = public_bytes(key) + key.sign(identity_message(run_number, context.node_id))
        return Message(RecordDict({KEY_SECAGG_MSG: bytes_to_record(claim)}), reply_to=msg)

    return app


IDENTITIES: dict[int, Ed25519PrivateKey] = {}


def run_once(
    config: RunConfig, grid: FakeGrid, aggregator: PlainAggregator | CentralDP
) -> Aggregate:
    exchange = GridExchange(grid, config, "00000000abcd", "test")
    cohort = sorted(grid.get_node_ids())
    return aggregator.aggregate(RoundInput(1, cohort, np.zeros(D, dtype=np.float32)), exchange)


def test_plain_weights_updates_by_example_count() -> None:
    config = cfg()
    agg = run_once(config, FakeGrid(fake_sites(), 4), PlainAggregator(D))
    counts = np.arange(1, 5)
    expected = sum(c * update_of(i) for i, c in enumerate(counts)) / counts.sum()
    np.testing.assert_allclose(agg.mean(), expected, rtol=1e-6)
    assert agg.contributors == [FIRST_NODE_ID + i for i in range(4)] and agg.failure is None
    assert agg.events == []


def test_plain_without_stated_counts_weighs_every_site_the_same() -> None:
    # under DP a site's dataset size is private: no count, so no count-weighted FedAvg
    agg = run_once(cfg(), FakeGrid(fake_sites(counts=False), 4), PlainAggregator(D))
    np.testing.assert_allclose(agg.mean(), np.mean([update_of(i) for i in range(4)], 0), rtol=1e-6)
    assert agg.weight == 4.0 and agg.failure is None
    assert all(o.accepted and o.num_examples is None for o in agg.outcomes)


def test_plain_refusal_and_error_reply_leave_only_usable_sites_with_events() -> None:
    config = cfg()
    grid = FakeGrid(
        fake_sites(refuse=1), 4, faults=[Fault(FIRST_NODE_ID + 2, "train", error_reply("boom"))]
    )
    agg = run_once(config, grid, PlainAggregator(D))
    assert agg.contributors == [FIRST_NODE_ID, FIRST_NODE_ID + 3]
    kinds = [(e.kind, e.payload["node_id"]) for e in agg.events]
    assert kinds == [
        ("site_refused", str(FIRST_NODE_ID + 1)),
        ("update_rejected", str(FIRST_NODE_ID + 2)),
    ]
    refused = [o for o in agg.outcomes if o.refused]
    assert [o.reason for o in refused] == ["not today"]


def test_plain_with_clip_norm_reclips_and_weighs_every_site_the_same() -> None:
    config = cfg()
    agg = run_once(config, FakeGrid(fake_sites(), 4), PlainAggregator(D, clip_norm=1.0))
    assert agg.weight == 4.0
    # every update exceeds C = 1 and points along (1, ..., 1): each is clipped to 1/sqrt(D) a coordinate
    np.testing.assert_allclose(agg.total, np.full(D, 4 / np.sqrt(D)), rtol=1e-6)


def test_central_dp_refuses_an_aggregator_without_clipping() -> None:
    with pytest.raises(ConfigurationError, match="clipped"):
        CentralDP(PlainAggregator(D), cfg(central_dp=True), vector_length=D)


def test_central_dp_noises_the_sum_with_std_z_c_and_commits_one_event() -> None:
    size = 40_000
    config = cfg(central_dp=True, noise_multiplier=2.0, num_features=size)

    class Fixed:
        clipped_to = 1.0

        def aggregate(self, round_input: RoundInput, exchange: Exchange) -> Aggregate:
            outcomes = [SiteOutcome(n, True) for n in round_input.cohort]
            return Aggregate(np.zeros(size), 4.0, list(round_input.cohort), outcomes)

    wrapper = CentralDP(Fixed(), config, vector_length=size)
    agg = wrapper.aggregate(RoundInput(1, [1, 2, 3, 4], np.zeros(size)), exchange=None)  # type: ignore[arg-type]
    # mean = noise / D with noise ~ N(0, (z C)^2) and D = 4 planned sites (fixed cohort of
    # all num_sites): std of the mean z*C/4 = 0.5
    assert agg.central is not None and agg.central.noise_std == pytest.approx(2.0)
    assert float(np.std(agg.mean())) == pytest.approx(0.5, rel=0.03)
    assert len(wrapper.accountant.events) == 1 and agg.central.epsilon > 0


def test_central_dp_adds_no_noise_and_spends_nothing_on_a_failed_round() -> None:
    config = cfg(central_dp=True, min_sites=3)

    class Failed:
        clipped_to = 1.0

        def aggregate(self, round_input: RoundInput, exchange: Exchange) -> Aggregate:
            agg = Aggregate(np.zeros(D), 2.0, [1, 2], [])
            agg.failure = ProtocolAbort("the protocol gave up")
            return agg

    wrapper = CentralDP(Failed(), config, vector_length=D)
    agg = wrapper.aggregate(RoundInput(1, [1, 2, 3], np.zeros(D)), exchange=None)  # type: ignore[arg-type]
    assert isinstance(agg.failure, ProtocolAbort) and agg.central is None
    assert agg.mean_update is None and wrapper.accountant.events == ()


def test_secure_aggregator_cohort_of_one_fails_without_any_exchange() -> None:
    config = cfg(secagg=True)
    grid = FakeGrid(fake_sites(), 1)
    aggregator = SecAggAggregator(config, 1, D)
    agg = aggregator.aggregate(
        RoundInput(1, [FIRST_NODE_ID], np.zeros(D, dtype=np.float32)),
        GridExchange(grid, config, "00000000abcd", "test"),
    )
    assert isinstance(agg.failure, ProtocolAbort) and grid.history == []


def test_secure_aggregator_policy_denial_fails_before_any_site_sees_the_config() -> None:
    config = cfg(secagg=True)
    grid = FakeGrid(fake_sites(), 4)
    judged: list[int] = []

    def judge(server_round: int, secagg_config: object) -> tuple[list, list]:
        judged.append(secagg_config.threshold)  # type: ignore[attr-defined]
        return [], ["threshold too low"]

    aggregator = SecAggAggregator(config, 0xABCD, D, judge)  # the exchange's run id
    agg = aggregator.aggregate(
        RoundInput(1, sorted(grid.get_node_ids()), np.zeros(D, dtype=np.float32)),
        GridExchange(grid, config, "00000000abcd", "test"),
    )
    assert judged == [2]  # 4 sites: k = 3 neighbours, t = ceil(0.6 * 3) = 2, resolved once
    assert agg.failure is not None and "threshold too low" in str(agg.failure)
    # the sites were asked who they are (nothing about the round), never sent a configuration
    assert [set(e.message_types.values()) for e in grid.history] == [{"query.secagg_identity"}]
    statuses = [e.payload["status"] for e in agg.events if e.kind == "secagg_outcome"]
    assert statuses == ["aborted"]
