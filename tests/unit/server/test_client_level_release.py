"""Issue 13, DP-FedAvg as published: fixed denominator, every Poisson cohort released, no count out.

The round loop over an in-memory Grid whose sites run the real ClientApp (the
protocol-benchmark "vector" model and "echo" workload), with the real
plain and secure aggregators under :class:`server.privacy.CentralDP`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fake_grid import FIRST_NODE_ID, FakeGrid, admitting_app, server_identity
from federation import federated_setup

from client.app import make_client_app
from common.config import RunConfig
from common.dp import PrivacyEvent, PrivacyLevel, epsilon_for
from common.errors import ConfigurationError, ProtocolAbort
from common.secagg.params import default_scale
from common.secagg.quantize import quantised_l2_bound
from server.aggregation.base import Aggregate, RoundInput
from server.aggregation.exchange import Exchange, GridExchange
from server.aggregation.plain import PlainAggregator
from server.aggregation.secure import SecAggAggregator
from server.book import RunBook
from server.cli_record import _card
from server.cohort import dp_denominator
from server.privacy import (
    NOISE_ONLY_EVENT,
    CentralDP,
    calibrate_client_noise,
    client_level_outlook,
)
from server.record import SqlRecord
from server.report import report_figures, write_report
from server.results import WITHHELD_FAILURE, SiteOutcome
from server.rounds import FederatedRun

D = 8
SITES = 10
NODE_IDS = [str(FIRST_NODE_ID + i) for i in range(SITES)]


# Poisson q = 0.1 over 10 sites under client-level DP, the protocol-benchmark model.
BASE = RunConfig(
    dataset="custom", model="vector", workload="echo", num_features=D, num_classes=2,
    num_sites=SITES, rounds=3, min_sites=2, device="cpu", secagg=False, clip_norm=1.0,
    central_dp=True, sampling="poisson", fraction_train=0.1, accountant="rdp",
)  # fmt: skip


def cfg(**changes: object) -> RunConfig:
    return BASE.replace(**changes)


@pytest.fixture(autouse=True)
def _as_server_app() -> Iterator[None]:
    with server_identity():  # the exchange signs and stamps instructions as a ServerApp
        yield


def real_run(tmp_path: Path, config: RunConfig, *, booked: bool = False) -> FederatedRun:
    grid = FakeGrid(make_client_app(federated_setup(tmp_path / "sites", SITES)), SITES)
    book = None
    if booked:
        record = SqlRecord(f"sqlite:///{tmp_path / 'record.db'}")
        book = RunBook(record, Ed25519PrivateKey.generate(), "00000000abcd")
    return FederatedRun(config, grid, book=book)


# ------------------------------------------------- q = 0.1 over 10 sites: every round released
@pytest.mark.parametrize("secagg", [False, True], ids=["plain", "secure"])
def test_poisson_tenth_of_ten_sites_every_round_is_released(tmp_path: Path, secagg: bool) -> None:
    # P(empty) = 0.35 and P(one site) = 0.39 a round: on main most of these rounds aborted
    rounds = 12 if secagg else 30
    run = real_run(tmp_path, cfg(secagg=secagg, rounds=rounds))
    before = run.global_vector.copy()
    results = run.execute()
    assert [r.failed for r in results] == [False] * rounds
    assert run.privacy is not None and run.privacy.accountant.rounds == rounds
    assert all(r.client_level_epsilon is not None for r in results)
    assert not np.array_equal(run.global_vector, before)  # noise reached the model every round


def test_an_empty_poisson_cohort_releases_noise_over_qn_without_asking_anyone() -> None:
    size = 40_000
    config = cfg(num_features=size, noise_multiplier=2.0)
    grid = FakeGrid(admitting_app(), SITES)
    central = CentralDP(PlainAggregator(size, config.clip_norm), config, vector_length=size)
    exchange = GridExchange(grid, config, "00000000abcd", "test")
    agg = central.aggregate(RoundInput(1, [], np.zeros(size)), exchange)
    assert grid.history == [] and agg.failure is None and agg.contributors == []
    assert agg.central is not None and central.accountant.rounds == 1
    expected = config.noise_multiplier * config.clip_norm / (config.fraction_train * SITES)
    assert float(np.std(agg.mean())) == pytest.approx(expected, rel=0.03)


def test_a_secure_cohort_below_the_protocol_minimum_releases_noise_only_audited(
    tmp_path: Path,
) -> None:
    config = cfg(secagg=True)
    grid = FakeGrid(make_client_app(federated_setup(tmp_path, SITES)), SITES)
    central = CentralDP(SecAggAggregator(config, 0xABCD, D), config, vector_length=D)
    exchange = GridExchange(grid, config, "00000000abcd", "test")
    agg = central.aggregate(RoundInput(1, [FIRST_NODE_ID + 3], np.zeros(D)), exchange)
    assert grid.history == []  # no site was asked: one site's update would be in the clear
    assert agg.failure is None and agg.central is not None
    (event,) = [e for e in agg.events if e.kind == NOISE_ONLY_EVENT]
    assert event.payload["cohort"] == [str(FIRST_NODE_ID + 3)]
    assert [o.accepted for o in agg.outcomes] == [False]


def test_a_secure_poisson_cohort_of_three_is_aggregated_and_noised(tmp_path: Path) -> None:
    config = cfg(secagg=True, noise_multiplier=1e-12)
    grid = FakeGrid(make_client_app(federated_setup(tmp_path, SITES)), SITES)
    central = CentralDP(SecAggAggregator(config, 0xABCD, D), config, vector_length=D)
    exchange = GridExchange(grid, config, "00000000abcd", "test")
    cohort = [FIRST_NODE_ID + i for i in (1, 4, 7)]
    agg = central.aggregate(RoundInput(1, cohort, np.zeros(D)), exchange)
    assert agg.failure is None and sorted(agg.contributors) == cohort and np.any(agg.total)
    assert agg.central is not None and NOISE_ONLY_EVENT not in [e.kind for e in agg.events]
    # the secure sum of three echo updates over q*N = 1, not over 3
    np.testing.assert_allclose(agg.mean(), agg.total / (0.1 * SITES), atol=1e-6)


class Scripted:
    """An inner aggregator handing back a scripted sum of ``count`` clipped contributions."""

    clipped_to = 1.0

    def __init__(self, count: int, value: float, failure: Exception | None = None) -> None:
        self.count, self.value, self.failure = count, value, failure

    def aggregate(self, round_input: RoundInput, exchange: Exchange) -> Aggregate:
        nodes = list(round_input.cohort[: self.count])
        agg = Aggregate(
            np.full(D, self.value * self.count), 1.0, nodes, [SiteOutcome(n, True) for n in nodes]
        )
        agg.failure = self.failure  # type: ignore[assignment]
        return agg


@pytest.mark.parametrize("count", [1, 2, 5])
def test_the_mean_divides_by_q_n_not_by_the_realised_count(count: int) -> None:
    config = cfg(fraction_train=0.5, noise_multiplier=1e-12)
    central = CentralDP(Scripted(count, 0.1), config, vector_length=D)
    agg = central.aggregate(RoundInput(1, [1, 2, 3, 4, 5], np.zeros(D)), exchange=None)  # type: ignore[arg-type]
    denominator = 0.5 * SITES
    assert dp_denominator(config) == denominator
    np.testing.assert_allclose(agg.mean(), np.full(D, 0.1 * count / denominator), atol=1e-9)
    assert agg.central is not None and agg.central.denominator == denominator


def test_a_fixed_cohort_divides_by_its_planned_size() -> None:
    config = cfg(sampling="fixed", fraction_train=0.3, noise_multiplier=1e-12)
    central = CentralDP(Scripted(2, 0.1), config, vector_length=D)
    agg = central.aggregate(RoundInput(1, [1, 2, 3], np.zeros(D)), exchange=None)  # type: ignore[arg-type]
    np.testing.assert_allclose(agg.mean(), np.full(D, 0.2 / 3), atol=1e-9)  # ceil(0.3 * 10)


def test_a_round_failing_for_another_reason_still_fails_and_spends_nothing() -> None:
    config = cfg()
    central = CentralDP(Scripted(2, 0.1, ProtocolAbort("lost")), config, vector_length=D)
    agg = central.aggregate(RoundInput(1, [1, 2, 3], np.zeros(D)), exchange=None)  # type: ignore[arg-type]
    assert agg.failure is not None and agg.central is None and central.accountant.rounds == 0


def test_more_admitted_sites_than_planned_fail_the_round_not_the_noise(tmp_path: Path) -> None:
    config = cfg(num_sites=3, rounds=1, fraction_train=0.5)
    grid = FakeGrid(make_client_app(federated_setup(tmp_path, 4)), 4)
    run = FederatedRun(config, grid)
    with pytest.raises(ProtocolAbort, match="no round"):
        run.execute()
    assert "more than the 3 the run is planned for" in (run.results[0].failure or "")
    assert run.privacy is not None and run.privacy.accountant.rounds == 0


# --------------------------------------------------------------------- sensitivity
@pytest.mark.parametrize(
    ("sampling", "threshold", "factor"),
    [("fixed", 0.6, 1), ("poisson", 0.6, 2), ("poisson", 3.0, 4)],
)
def test_secure_sensitivity_adds_the_rounding_slack_and_the_noise_only_switch(
    sampling: str, threshold: float, factor: int
) -> None:
    config = cfg(secagg=True, sampling=sampling, secagg_threshold=threshold, secagg_bits=16)
    central = CentralDP(SecAggAggregator(config, 1, D), config, vector_length=D)
    one = quantised_l2_bound(1.0, D, default_scale(1.0, 16, SITES))
    assert one > config.clip_norm
    assert central.sensitivity == pytest.approx(factor * one)
    assert central.min_cohort == (2 if threshold < 1 else 4)


def test_plain_sensitivity_is_the_clip_norm() -> None:
    config = cfg()
    assert CentralDP(Scripted(1, 0.0), config, vector_length=D).sensitivity == config.clip_norm


# ---------------------------------------------------------- released outputs: no count
def _assert_no_count(doc_round: dict, text: str) -> None:
    for key in ("participants", "sampled", "seconds", "secagg", "energy"):
        assert doc_round[key] is None, key
    assert doc_round["sites"] == []
    for node_id in NODE_IDS:
        assert node_id not in text, node_id


def test_released_outputs_under_client_level_dp_carry_no_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flwr.fedseal")
    config = cfg(fraction_train=0.5, rounds=3)
    run = real_run(tmp_path, config, booked=True)
    results = run.execute()
    # control: the coordinator itself knew the counts (and the per-site outcomes)
    assert all(isinstance(r.participants, int) and r.sites for r in results)
    doc = run.result_doc()
    text = json.dumps(doc)
    for r in doc["rounds"]:
        _assert_no_count(r, text)
    assert doc["privacy"]["client_level"]["denominator"] == 0.5 * SITES
    assert run.book is not None
    record = run.book.record
    for info in record.rounds(run.run_id):  # what reports and resumes read
        _assert_no_count(info.metrics, json.dumps(info.metrics))
    for version in record.list_versions(run.run_id):
        card = _card(record, version)
        assert card["participants"] == [] and card["energy"]["reports"] is None
    html = write_report(record, run.run_id, tmp_path / "report").html.read_text()
    for node_id in NODE_IDS:
        assert node_id not in html
    assert "site reports" not in html
    figures = report_figures(record, run.run_id)
    try:
        sites_axes = figures.metrics.axes[2]
        assert sites_axes.get_lines() == []
        assert any("withheld" in t.get_text() for t in sites_axes.texts)
    finally:
        figures.close()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "participants" not in logged
    for node_id in NODE_IDS:
        assert node_id not in logged


def test_without_client_level_dp_the_counts_are_released(tmp_path: Path) -> None:
    # the same inspection, made to fail: it sees the counts when they are published
    config = cfg(central_dp=False, sampling="fixed", fraction_train=1.0, rounds=1)
    run = real_run(tmp_path, config)
    run.execute()
    (r,) = run.result_doc()["rounds"]
    assert r["participants"] == r["sampled"] == SITES and len(r["sites"]) == SITES
    with pytest.raises(AssertionError):
        _assert_no_count(r, json.dumps(r))


def test_a_failed_round_releases_no_reason_under_client_level_dp(tmp_path: Path) -> None:
    config = cfg(rounds=1, num_sites=3, fraction_train=0.5)
    grid = FakeGrid(make_client_app(federated_setup(tmp_path, 4)), 4)
    run = FederatedRun(config, grid)
    with pytest.raises(ProtocolAbort) as caught:
        run.execute()
    (r,) = run.result_doc()["rounds"]
    assert r["failed"] is True and r["failure"] == WITHHELD_FAILURE
    assert "4 admitted" not in str(caught.value)


# ---------------------------------------------------- calibration and the learning warning
def test_client_epsilon_calibrates_the_noise_multiplier_to_the_target() -> None:
    target = cfg(rounds=5, fraction_train=0.5, client_epsilon=2.0)
    calibrated = calibrate_client_noise(target)
    event = PrivacyEvent(calibrated.noise_multiplier, 0.5, 1, PrivacyLevel.CLIENT)
    eps = epsilon_for([event] * 5, target.delta, "rdp")
    assert 2.0 - 0.02 <= eps <= 2.0
    CentralDP(Scripted(1, 0.0), calibrated, vector_length=D)  # accepted as it is


def test_a_noise_multiplier_missing_the_client_epsilon_target_is_refused() -> None:
    config = cfg(rounds=5, client_epsilon=2.0, noise_multiplier=0.3)
    with pytest.raises(ConfigurationError, match="above client_epsilon 2"):
        CentralDP(Scripted(1, 0.0), config, vector_length=D)


def test_client_epsilon_without_central_dp_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="client_epsilon"):
        cfg(central_dp=False, client_epsilon=1.0)


def test_the_outlook_warns_when_the_noise_drowns_a_clipped_update() -> None:
    d = 2_000
    config = cfg(sampling="fixed", fraction_train=1.0, clip_norm=5.0, noise_multiplier=1.0)
    outlook = client_level_outlook(config, d)
    expected_std = 1.0 * 5.0 / SITES
    assert outlook.mean_noise_std == pytest.approx(expected_std)
    assert outlook.update_scale == pytest.approx(5.0 / math.sqrt(d))
    warning = outlook.warning()
    assert warning is not None and f"{expected_std:.3g}" in warning
    assert outlook.sites_needed == math.ceil(5.0 / (5.0 / math.sqrt(d)))
    many = client_level_outlook(config.replace(num_sites=outlook.sites_needed), d)
    assert many.learns and many.warning() is None
