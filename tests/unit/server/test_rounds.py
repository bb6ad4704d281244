"""The round loop with a fake aggregator: what it applies, books and refuses, no monkeypatching."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fake_grid import FakeGrid, admitting_app, server_identity
from flwr.clientapp import ClientApp

from common.config import RunConfig
from common.errors import ProtocolAbort
from server.aggregation import Aggregate, Exchange, RoundInput
from server.book import RunBook
from server.privacy import CentralDP
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
    grid = FakeGrid(admitting_app(), config.num_sites)
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


def failing(reason: str) -> Aggregate:
    failed = summed([], 0.0)
    failed.failure = ProtocolAbort(reason)
    return failed


def test_loop_failed_round_keeps_model_is_booked_failed_and_run_goes_on(tmp_path: Path) -> None:
    script = {
        1: summed([1000, 1001], 1.0),
        2: failing("round 2: the protocol gave up"),
        3: summed([1000, 1001], 0.5),
    }
    aggregator = ScriptedAggregator(script)
    run, record = booked_run(tmp_path, cfg(rounds=3), aggregator)
    before = run.global_vector.copy()
    results = run.execute()
    assert [(r.round, r.failed) for r in results] == [(1, False), (2, True), (3, False)]
    assert results[1].failure == "round 2: the protocol gave up" and results[1].accuracy is None
    # round 3 started from round 1's model: the failed round changed nothing
    np.testing.assert_allclose(
        aggregator.inputs[2].global_vector - before, np.full(D, 1.0), atol=1e-6
    )
    np.testing.assert_allclose(run.global_vector - before, np.full(D, 1.5), atol=1e-6)
    assert [e.kind for e in record.events(run.run_id)].count("probe") == 3  # its events booked
    assert [(r.round, r.status) for r in record.rounds(run.run_id)] == [
        (1, "finished"), (2, "failed"), (3, "finished"),
    ]  # fmt: skip
    (failed,) = [e.payload() for e in record.events(run.run_id) if e.kind == "round_failed"]
    assert failed["round"] == 2 and failed["reason"] == "round 2: the protocol gave up"
    assert failed["metrics"]["failed"] is True
    assert [v.round for v in record.list_versions(run.run_id)] == [1, 3]
    assert record.get_run(run.run_id).status == "finished"
    assert run.result_doc()["failed_rounds"] == [2]
    assert record.verify_trusting_stored_key().ok


def test_loop_max_failed_rounds_in_a_row_abort_the_run(tmp_path: Path) -> None:
    script = {
        1: summed([1000, 1001], 1.0),
        2: failing("round 2: lost"),
        3: summed([1000, 1001], 1.0),
        4: failing("round 4: lost"),
        5: failing("round 5: lost"),
        6: summed([1000, 1001], 1.0),
    }
    aggregator = ScriptedAggregator(script)
    run, record = booked_run(tmp_path, cfg(rounds=6, max_failed_rounds=2), aggregator)
    with pytest.raises(ProtocolAbort, match=r"2 failed rounds in a row .*round 5: lost"):
        run.execute()
    assert [i.server_round for i in aggregator.inputs] == [1, 2, 3, 4, 5]  # round 6 never ran
    info = record.get_run(run.run_id)
    assert info.status == "aborted"
    (aborted,) = [e.payload() for e in record.events(run.run_id) if e.kind == "run_aborted"]
    assert "max_failed_rounds=2" in aborted["reason"]
    assert [r.status for r in record.rounds(run.run_id)].count("failed") == 3


def test_loop_too_few_contributors_fails_the_round_model_unchanged() -> None:
    aggregator = ScriptedAggregator({1: summed([1000], 3.0, events=False), 2: summed([1000], 3.0)})
    run = FederatedRun(cfg(rounds=2), FakeGrid(admitting_app(), 3), aggregator=aggregator)
    before = run.global_vector.copy()
    with pytest.raises(ProtocolAbort, match="no round of run .* succeeded"):
        run.execute()  # two failed rounds, fewer than max_failed_rounds, and no model
    assert [r.failed for r in run.results] == [True, True]
    assert "1 usable update" in (run.results[0].failure or "")
    np.testing.assert_array_equal(run.global_vector, before)


class ClippedScript(ScriptedAggregator):
    clipped_to = 1.0


def test_loop_failed_round_under_central_dp_adds_no_noise_and_spends_nothing(
    tmp_path: Path,
) -> None:
    script = {
        1: summed([1000, 1001], 0.1),
        2: failing("round 2: lost"),
        3: summed([1000, 1001], 0.1),
    }
    config = cfg(rounds=3, central_dp=True, clip_norm=1.0)
    central = CentralDP(ClippedScript(script), config, vector_length=D)
    run, record = booked_run(tmp_path, config, central)  # type: ignore[arg-type]
    results = run.execute()
    assert central.accountant.rounds == 2
    assert results[1].client_level_epsilon is None and results[2].client_level_epsilon is not None
    spends = [(p.round, p.level) for p in record.privacy(run.run_id)]
    assert spends == [(1, "client"), (3, "client")]
    assert "central_dp_applied" not in [
        e.kind for e in record.events(run.run_id) if e.payload().get("round") == 2
    ]


def test_resume_after_a_failed_round_goes_on_after_it_from_the_last_model(tmp_path: Path) -> None:
    class Crash(Exception):
        pass

    class CrashingAt3(ScriptedAggregator):
        def aggregate(self, round_input: RoundInput, exchange: Exchange) -> Aggregate:
            if round_input.server_round == 3:
                raise Crash("coordinator killed")
            return super().aggregate(round_input, exchange)

    script = {
        1: summed([1000, 1001], 1.0),
        2: failing("round 2: lost"),
        3: summed([1000, 1001], 0.5),
    }
    run, record = booked_run(tmp_path, cfg(rounds=3), CrashingAt3(script))
    before = run.global_vector.copy()
    with pytest.raises(Crash):
        run.execute()
    aggregator = ScriptedAggregator(script)
    book = RunBook(record, Ed25519PrivateKey.generate(), run.run_id)
    resumed = FederatedRun(
        cfg(rounds=3), FakeGrid(admitting_app(), 3), book=book, resume=True, aggregator=aggregator
    )
    results = resumed.execute()
    assert [i.server_round for i in aggregator.inputs] == [3]  # the failed round 2 is not redone
    np.testing.assert_allclose(
        aggregator.inputs[0].global_vector - before, np.full(D, 1.0), atol=1e-6
    )
    assert [(r.round, r.failed) for r in results] == [(1, False), (2, True), (3, False)]


def test_loop_samples_fixed_cohort_of_admitted_nodes() -> None:
    aggregator = ScriptedAggregator({1: summed([1000, 1001, 1002], 0.0)})
    run = FederatedRun(cfg(rounds=1), FakeGrid(admitting_app(), 3), aggregator=aggregator)
    run.execute()
    assert aggregator.inputs[0].cohort == [1000, 1001, 1002]


# ------------------------------------------------------------ admission and unfilled rounds
def _admission_app(refuse: set[int], asked: list[int]) -> ClientApp:
    """Sites answering the admission query; those in ``refuse`` decline (data misfit)."""
    from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

    from common.records import KEY_METRICS, KEY_REFUSAL
    from common.secagg.stages import IDENTITY_ACTION

    app = ClientApp()

    @app.query(IDENTITY_ACTION)
    def admission(msg: Message, context: Context) -> Message:
        asked.append(context.node_id)
        if context.node_id in refuse:
            content = RecordDict(
                {
                    KEY_METRICS: MetricRecord({"refused": 1}),
                    KEY_REFUSAL: ConfigRecord({"reason": "data: the site's feature count differs"}),
                }
            )
            return Message(content, reply_to=msg)
        return Message(RecordDict(), reply_to=msg)

    return app


def test_sites_refusing_admission_are_left_out_of_every_cohort_and_asked_once(
    tmp_path: Path,
) -> None:
    asked: list[int] = []
    script = {1: summed([1000, 1002], 0.5), 2: summed([1000, 1002], 0.5)}
    aggregator = ScriptedAggregator(script)
    record = SqlRecord(f"sqlite:///{tmp_path / 'record.db'}")
    book = RunBook(record, Ed25519PrivateKey.generate(), "00000000abcd")
    grid = FakeGrid(_admission_app({1001}, asked), 3)
    run = FederatedRun(cfg(rounds=2), grid, book=book, aggregator=aggregator)
    run.execute()
    assert [i.cohort for i in aggregator.inputs] == [[1000, 1002], [1000, 1002]]
    assert sorted(asked) == [1000, 1001, 1002]  # once per site and run, not per round
    (refused,) = [e.payload() for e in record.events(run.run_id) if e.kind == "site_refused"]
    assert refused["node_id"] == "1001" and refused["stage"] == "admission"
    assert "feature count" in refused["reason"]
    record.close()


def test_too_few_admitted_sites_fail_the_round_not_the_run(tmp_path: Path) -> None:
    asked: list[int] = []
    aggregator = ScriptedAggregator({})
    grid = FakeGrid(_admission_app({1000, 1001}, asked), 3)
    run, record = booked_run(tmp_path, cfg(rounds=4, max_failed_rounds=3), aggregator)
    run.grid = grid
    run.exchange.grid = grid
    with pytest.raises(ProtocolAbort, match="3 failed rounds in a row"):
        run.execute()
    assert aggregator.inputs == []  # no cohort was ever drawn
    assert [r.failed for r in run.results] == [True, True, True]
    assert "1 admitted site(s)" in (run.results[0].failure or "")
    assert [r.status for r in record.rounds(run.run_id)] == ["failed"] * 3


def test_too_few_connected_sites_fail_the_round_and_the_run_goes_on(tmp_path: Path) -> None:
    aggregator = ScriptedAggregator({2: summed([1000, 1001], 0.5)})
    grid = FakeGrid(admitting_app(), 2)
    hidden = grid.contexts.copy()
    grid.contexts.clear()  # round 1: nobody connected (yet)
    run = FederatedRun(cfg(rounds=2, round_timeout_s=0.2), grid, aggregator=aggregator)

    real = grid.get_node_ids

    def reconnect() -> list[int]:
        nodes = list(real())
        if not nodes and run.results:  # after round 1 failed, the sites come back
            grid.contexts.update(hidden)
        return nodes

    grid.get_node_ids = reconnect  # type: ignore[method-assign]
    results = run.execute()
    assert [r.failed for r in results] == [True, False]
    assert "0 site(s) connected" in (results[0].failure or "")
    assert aggregator.inputs[0].cohort == [1000, 1001]


def test_run_waits_for_the_expected_sites_before_round_one(tmp_path: Path) -> None:
    aggregator = ScriptedAggregator({1: summed([1000, 1001, 1002], 0.0)})
    grid = FakeGrid(admitting_app(), 3)
    late = {n: grid.contexts.pop(n) for n in (1002,)}
    polls = [0]
    real = grid.get_node_ids

    def arrive() -> list[int]:
        polls[0] += 1
        if polls[0] == 2:
            grid.contexts.update(late)  # the third site connects while the run waits
        return list(real())

    grid.get_node_ids = arrive  # type: ignore[method-assign]
    run, record = booked_run(tmp_path, cfg(rounds=1, wait_sites=3, wait_timeout_s=30.0), aggregator)
    run.grid = grid
    run.exchange.grid = grid
    run.execute()
    assert aggregator.inputs[0].cohort == [1000, 1001, 1002]  # not the first two only
    (waited,) = [e.payload() for e in record.events(run.run_id) if e.kind == "sites_waited"]
    assert waited["expected"] == 3 and waited["connected"] == 3
