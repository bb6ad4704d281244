from __future__ import annotations

import logging
import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from common.dp.accounting import (
    PRV_RELATIVE_ERROR,
    ClientLevelAccountant,
    ClientSampling,
    calibrate_noise_multiplier,
    epsilon_for,
    merge_history,
)
from common.dp.events import PrivacyEvent, PrivacyLevel
from common.errors import ConfigurationError

DELTA = 1e-5
HISTORY = [
    PrivacyEvent(1.1, 0.02, 40),
    PrivacyEvent(1.1, 0.02, 40),  # a second round with the same mechanism
    PrivacyEvent(0.9, 0.05, 30),
    PrivacyEvent(1.1, 0.02, 40),
]


@pytest.mark.parametrize("name", ["prv", "rdp"])
def test_epsilon_for_equals_opacus_stepped_accountant(name: str) -> None:
    acc = PRVAccountant() if name == "prv" else RDPAccountant()
    for event in HISTORY:  # exactly what a PrivacyEngine does, step by step
        for _ in range(event.steps):
            acc.step(noise_multiplier=event.noise_multiplier, sample_rate=event.sample_rate)
    expected = acc.get_epsilon(delta=DELTA)
    if name == "prv":  # fedseal's "prv": Opacus' PRV at a relative eps_error
        expected = acc.get_epsilon(delta=DELTA, eps_error=PRV_RELATIVE_ERROR * expected)
    assert epsilon_for(HISTORY, DELTA, name) == expected


def test_merge_history_merges_only_consecutive_equal_mechanisms() -> None:
    assert merge_history(HISTORY) == [(1.1, 0.02, 80), (0.9, 0.05, 30), (1.1, 0.02, 40)]


def _dp_accounting_epsilon(events: list[PrivacyEvent], name: str) -> float:
    dpa = pytest.importorskip("dp_accounting")
    logging.getLogger("absl").setLevel(logging.ERROR)
    if name == "rdp":
        acc = dpa.rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    else:
        acc = dpa.pld.PLDAccountant(value_discretization_interval=1e-4)
    for e in events:
        gaussian = dpa.GaussianDpEvent(e.noise_multiplier)
        mech = (
            gaussian if e.sample_rate == 1.0 else dpa.PoissonSampledDpEvent(e.sample_rate, gaussian)
        )
        acc.compose(dpa.SelfComposedDpEvent(mech, e.steps))
    return float(acc.get_epsilon(DELTA))


@pytest.mark.parametrize("name", ["prv", "rdp"])
@pytest.mark.parametrize(
    "events",
    [
        [PrivacyEvent(1.1, 0.01, 1000)],
        [PrivacyEvent(0.8, 0.05, 200), PrivacyEvent(1.5, 0.05, 300)],
        [PrivacyEvent(5.0, 1.0, 10, PrivacyLevel.CLIENT)],
    ],
)
def test_epsilon_for_agrees_with_dp_accounting_within_one_percent(
    name: str, events: list[PrivacyEvent]
) -> None:
    ours = epsilon_for(events, DELTA, name)
    theirs = _dp_accounting_epsilon(events, name)
    assert ours == pytest.approx(theirs, rel=0.01)


def test_epsilon_for_empty_history_is_zero_and_zero_noise_is_infinite() -> None:
    assert epsilon_for([], DELTA) == 0.0
    assert math.isinf(epsilon_for([PrivacyEvent(0.0, 0.1, 1)], DELTA))


def test_epsilon_for_mixed_levels_or_bad_arguments_raise() -> None:
    with pytest.raises(ConfigurationError):
        epsilon_for(
            [PrivacyEvent(1.0, 0.1, 1), PrivacyEvent(1.0, 0.1, 1, PrivacyLevel.CLIENT)], DELTA
        )
    with pytest.raises(ConfigurationError):
        epsilon_for(HISTORY, 0.0)
    with pytest.raises(ConfigurationError):
        epsilon_for(HISTORY, DELTA, "gdp")


@pytest.mark.parametrize("name", ["prv", "rdp"])
@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_calibrate_noise_multiplier_round_trip_meets_target(name: str, target: float) -> None:
    z = calibrate_noise_multiplier(target, DELTA, 0.02, 500, name)
    eps = epsilon_for([PrivacyEvent(z, 0.02, 500)], DELTA, name)
    assert target - 0.01 <= eps <= target


def test_calibrate_noise_multiplier_with_prior_leaves_total_within_target() -> None:
    prior = [PrivacyEvent(1.5, 0.02, 300)]
    z = calibrate_noise_multiplier(3.0, DELTA, 0.02, 300, "rdp", prior_events=prior)
    total = epsilon_for([*prior, PrivacyEvent(z, 0.02, 300)], DELTA, "rdp")
    assert 3.0 - 0.01 <= total <= 3.0
    assert z > calibrate_noise_multiplier(3.0, DELTA, 0.02, 300, "rdp")


def test_calibrate_noise_multiplier_exhausted_prior_raises() -> None:
    prior = [PrivacyEvent(0.5, 0.5, 100)]
    with pytest.raises(ConfigurationError):
        calibrate_noise_multiplier(1.0, DELTA, 0.02, 10, "rdp", prior_events=prior)


@pytest.mark.parametrize("name", ["prv", "rdp"])
def test_client_level_epsilon_falls_with_noise_and_rises_with_rounds(name: str) -> None:
    def eps(z: float, rounds: int) -> float:
        acc = ClientLevelAccountant(ClientSampling.POISSON, 0.3, name)
        for _ in range(rounds):
            acc.record(acc.event_for_round(z))
        return acc.epsilon(DELTA)

    by_noise = [eps(z, 10) for z in (0.8, 1.2, 2.0, 4.0)]
    assert all(a > b for a, b in zip(by_noise, by_noise[1:], strict=False))
    by_rounds = [eps(1.2, r) for r in (1, 5, 20, 50)]
    assert all(a < b for a, b in zip(by_rounds, by_rounds[1:], strict=False))


def test_client_level_fixed_cohort_gets_no_amplification() -> None:
    fixed = ClientLevelAccountant("fixed_cohort")
    poisson = ClientLevelAccountant("poisson", 0.3)
    assert fixed.sampling is ClientSampling.FIXED_COHORT
    assert fixed.event_for_round(1.0).sample_rate == 1.0
    for acc in (fixed, poisson):
        acc.record(acc.event_for_round(1.0))
    assert fixed.epsilon(DELTA) > poisson.epsilon(DELTA)
    with pytest.raises(ConfigurationError):
        ClientLevelAccountant(ClientSampling.FIXED_COHORT, 0.3)


def test_client_level_record_refuses_mismatched_or_record_level_events() -> None:
    acc = ClientLevelAccountant(ClientSampling.POISSON, 0.3)
    with pytest.raises(ConfigurationError):
        acc.record(PrivacyEvent(1.0, 0.5, 1, PrivacyLevel.CLIENT))
    with pytest.raises(ConfigurationError):
        acc.record(PrivacyEvent(1.0, 0.3, 1))
    assert acc.rounds == 0


def test_client_level_epsilon_if_is_a_dry_run() -> None:
    acc = ClientLevelAccountant(ClientSampling.POISSON, 0.3, "rdp")
    acc.record(acc.event_for_round(1.0))
    before = acc.epsilon(DELTA)
    would_be = acc.epsilon_if(acc.event_for_round(1.0), DELTA)
    assert would_be > before and acc.epsilon(DELTA) == before and acc.rounds == 1
    restored = ClientLevelAccountant(ClientSampling.POISSON, 0.3, "rdp", events=acc.events)
    assert restored.epsilon(DELTA) == before
