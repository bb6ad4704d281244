"""The round loop with a fake aggregator: what it applies, books and refuses, no monkeypatching."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fake_grid import FakeGrid, server_identity
from flwr.clientapp import ClientApp

from common.config import RunConfig
from common.errors import ProtocolAbort
from server.aggregation import Aggregate, Exchange, RoundInput
from server.book import RunBook
from server.record import SqlRecord
from server.results import SiteOutcome
from server.rounds import FederatedRun

D = 8


def cfg(**changes: object) -> RunConfig:
    base: dict[str, object] = dict(
        dataset="custom", model="vector", workload="echo", num_features=D, num_classes=2,
        num_sites=3, rounds=2, min_sites=2, device="cpu", secagg=False,
    )  # fmt: skip
    base.update(changes)
    return RunConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with server_identity():
        yield


class ScriptedAggregator:
    """Returns a scripted aggregate per round and remembers what it was asked."""

    def __init__(self, script: dict[int, Aggregate]) -> None:
        self.script = script
        self.inputs: list[RoundInput] = []

    def aggregate(self, round_input: RoundInput, exchange: Exchange) -> Aggregate:
        self.inputs.append(round_input)
        return self.script[round_input.server_round]


def summed(contributors: list[int], value: float, *, events: bool = True) -> Aggregate:
    agg = Aggregate(
        np.full(D, value * len(contributors)),
        float(len(contributors)),
        contributors,
        [SiteOutcome(n, True, num_examples=1) for n in contributors],
    )
    if events:
        agg.event("probe", {"contributors": [str(n) for n in contributors]})
    return agg


def booked_run(
    tmp_path: Path, config: RunConfig, aggregator: ScriptedAggregator
) -> tuple[FederatedRun, SqlRecord]:
    record = SqlRecord(f"sqlite:///{tmp_path / 'record.db'}")
    book = RunBook(record, Ed25519PrivateKey.generate(), "00000000abcd")
    grid = FakeGrid(ClientApp(), config.num_sites)
    return FederatedRun(config, grid, book=book, aggregator=aggregator), record


def test_loop_applies_each_aggregate_mean_and_books_its_events_in_order(tmp_path: Path) -> None:
    script = {1: summed([1000, 1001], 0.5), 2: summed([1000, 1001, 1002], -0.25)}
    aggregator = ScriptedAggregator(script)
    run, record = booked_run(tmp_path, cfg(), aggregator)
    before = run.global_vector.copy()
    results = run.execute()
    np.testing.assert_allclose(run.global_vector - before, np.full(D, 0.25), atol=1e-6)
    assert [r.participants for r in results] == [2, 3]
    # the loop handed each round the model as it was after the previous one
    np.testing.assert_allclose(
        aggregator.inputs[1].global_vector - before, np.full(D, 0.5), atol=1e-6
    )
    probes = [e.payload() for e in record.events(run.run_id) if e.kind == "probe"]
    assert probes == [
        {"contributors": ["1000", "1001"]},
        {"contributors": ["1000", "1001", "1002"]},
    ]
    assert [v.round for v in record.list_versions(run.run_id)] == [1, 2]
    assert record.verify_trusting_stored_key().ok


def test_loop_failed_round_keeps_model_books_events_and_aborts_run(tmp_path: Path) -> None:
    failed = summed([], 0.0)
    failed.failure = ProtocolAbort("round 2: the protocol gave up")
    aggregator = ScriptedAggregator({1: summed([1000, 1001], 1.0), 2: failed})
    run, record = booked_run(tmp_path, cfg(), aggregator)
    with pytest.raises(ProtocolAbort, match="gave up"):
        run.execute()
    assert len(run.results) == 1
    assert [e.kind for e in record.events(run.run_id)].count("probe") == 2
    assert record.get_run(run.run_id).status == "aborted"
    assert [v.round for v in record.list_versions(run.run_id)] == [1]


def test_loop_too_few_contributors_fails_the_round_model_unchanged() -> None:
    aggregator = ScriptedAggregator({1: summed([1000], 3.0, events=False)})
    run = FederatedRun(cfg(rounds=1), FakeGrid(ClientApp(), 3), aggregator=aggregator)
    before = run.global_vector.copy()
    with pytest.raises(ProtocolAbort, match="1 usable update"):
        run.execute()
    np.testing.assert_array_equal(run.global_vector, before)


def test_loop_samples_fixed_cohort_of_admitted_nodes() -> None:
    aggregator = ScriptedAggregator({1: summed([1000, 1001, 1002], 0.0)})
    run = FederatedRun(cfg(rounds=1), FakeGrid(ClientApp(), 3), aggregator=aggregator)
    run.execute()
    assert aggregator.inputs[0].cohort == [1000, 1001, 1002]
