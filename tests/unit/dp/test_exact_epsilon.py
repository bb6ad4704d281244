"""Acceptance (issue 13, item 5): every epsilon fedseal prints is exact to 1 %.

Each epsilon function fedseal uses — record-level :func:`epsilon_for` (what
the site ledger and the run report print), :meth:`ClientLevelAccountant.epsilon`
(DP-FedAvg) and :func:`calibrate_noise_multiplier` (the noise a site plans)
— is checked, with the default accountant, against Google's dp-accounting
PLD accountant built here independently (``PoissonSampledDpEvent(q,
GaussianDpEvent(z))`` self-composed ``steps`` times, per recorded event) at
a discretisation ``REFERENCE_FINENESS`` times finer than fedseal's own:

* within 1 % of the pessimistic reference (an upper bound of the true
  epsilon, off by no more than its discretisation error), and
* never below the optimistic reference at that grid (a lower bound of the
  true epsilon), i.e. never below the reference by more than the PLD's own
  discretisation error: fedseal's figure stays a valid guarantee.

The grid of (z, q, steps) covers epsilon from 0.1 to 20, q = 1 and q = 0.01,
steps 1 to 1000; the default run takes a few cells, ``-m slow`` all of them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import pytest

from common.dp.accounting import (
    ClientLevelAccountant,
    ClientSampling,
    calibrate_noise_multiplier,
    epsilon_for,
    merge_history,
    pld_grid,
)
from common.dp.events import PrivacyEvent, PrivacyLevel

dpa = pytest.importorskip("dp_accounting")
from dp_accounting.pld import privacy_loss_distribution as pld  # noqa: E402

DELTA = 1e-5
REL = 0.01
REFERENCE_FINENESS = 5.0

# (noise_multiplier, sample_rate, steps): epsilon at DELTA from 0.07 to 20.5.
GRID = [
    (40.0, 1.0, 1),
    (5.0, 1.0, 1),
    (1.0, 1.0, 1),
    (0.285, 1.0, 1),
    (10.0, 1.0, 100),
    (250.0, 1.0, 1000),
    (30.0, 1.0, 1000),
    (0.5, 0.01, 1),
    (0.3, 0.01, 1),
    (0.5, 0.01, 10),
    (1.0, 0.01, 100),
    (8.0, 0.01, 1000),
    (4.0, 0.01, 1000),
    (1.0, 0.01, 1000),
    (0.6, 0.01, 1000),
    (1.5, 0.1, 100),
    (0.7, 0.1, 100),
    (3.0, 0.1, 1000),
    (1.2, 0.05, 300),
    (0.7, 0.3, 1),
]
FAST = [(30.0, 1.0, 1000), (8.0, 0.01, 1000), (0.3, 0.01, 1), (0.7, 0.1, 100)]


def _reference(events: Sequence[PrivacyEvent], *, pessimistic: bool) -> float:
    """dp-accounting PLD epsilon of ``events`` at a grid finer than fedseal's.

    Pessimistic: ``PLDAccountant`` as its documentation composes DP-SGD.
    Optimistic (``pessimistic_estimate=False``, privacy buckets): a lower
    bound of the true epsilon at the same grid.
    """
    logging.getLogger("absl").setLevel(logging.ERROR)
    grid = pld_grid(tuple(merge_history(events)), DELTA) / REFERENCE_FINENESS
    if pessimistic:
        acc = dpa.pld.PLDAccountant(value_discretization_interval=grid)
        for e in events:
            gaussian = dpa.GaussianDpEvent(e.noise_multiplier)
            acc.compose(
                dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(e.sample_rate, gaussian), e.steps)
            )
        return float(acc.get_epsilon(DELTA))
    total = None
    for e in events:
        one = pld.from_gaussian_mechanism(
            e.noise_multiplier,
            sampling_prob=e.sample_rate,
            value_discretization_interval=grid,
            pessimistic_estimate=False,
            use_connect_dots=False,
        ).self_compose(e.steps)
        total = one if total is None else total.compose(one)
    assert total is not None
    return float(total.get_epsilon_for_delta(DELTA))


def _assert_exact(ours: float, events: Sequence[PrivacyEvent]) -> float:
    """Check ``ours`` against the references; return the pessimistic one."""
    upper = _reference(events, pessimistic=True)
    lower = _reference(events, pessimistic=False)
    assert lower <= upper
    assert ours == pytest.approx(upper, rel=REL), f"{ours} vs dp-accounting PLD {upper}"
    assert ours >= lower, f"{ours} is below the PLD's lower bound {lower}: not a guarantee"
    return upper


def test_grid_spans_epsilon_from_a_tenth_to_twenty() -> None:
    eps = [epsilon_for([PrivacyEvent(z, q, k)], DELTA) for z, q, k in GRID]
    assert min(eps) <= 0.1 and max(eps) >= 20.0
    assert {q for _, q, _ in GRID} >= {1.0, 0.01}
    assert {k for _, _, k in GRID} >= {1, 1000}


def _cells(
    grid: Sequence[tuple[float, float, int]], fast: Sequence[tuple[float, float, int]]
) -> list:
    """The grid's cells as parameters; those not in ``fast`` run only with ``-m slow``."""
    return [pytest.param(*c, marks=() if c in fast else pytest.mark.slow) for c in grid]


@pytest.mark.parametrize(("z", "q", "steps"), _cells(GRID, FAST))
def test_record_level_epsilon_is_within_one_percent_of_dp_accounting_pld(
    z: float, q: float, steps: int
) -> None:
    events = [PrivacyEvent(z, q, steps)]
    _assert_exact(epsilon_for(events, DELTA), events)


def test_mixed_history_epsilon_is_within_one_percent_of_dp_accounting_pld() -> None:
    # A site's ledger: full-batch rounds (q = 1) and sampled rounds, two runs, reordered merges.
    events = [
        PrivacyEvent(3.0, 1.0, 20),
        PrivacyEvent(1.2, 0.05, 300),
        PrivacyEvent(3.0, 1.0, 20),
        PrivacyEvent(2.0, 0.01, 500),
    ]
    _assert_exact(epsilon_for(events, DELTA), events)


@pytest.mark.parametrize(
    ("sampling", "q", "z", "rounds"),
    [(ClientSampling.POISSON, 0.3, 1.0, 20), (ClientSampling.FIXED_COHORT, 1.0, 2.0, 50)],
)
def test_client_level_epsilon_is_within_one_percent_of_dp_accounting_pld(
    sampling: ClientSampling, q: float, z: float, rounds: int
) -> None:
    acc = ClientLevelAccountant(sampling, q)
    for _ in range(rounds):
        acc.record(acc.event_for_round(z))
    _assert_exact(acc.epsilon(DELTA), [PrivacyEvent(z, q, rounds, PrivacyLevel.CLIENT)])


CALIBRATION = [
    (1.0, 0.01, 1000),
    (20.0, 1.0, 1),
    (0.1, 1.0, 100),
    (0.1, 0.01, 1000),
    (5.0, 0.1, 100),
    (20.0, 0.01, 1000),
    (3.0, 0.3, 1),
]


@pytest.mark.parametrize(("target", "q", "steps"), _cells(CALIBRATION, CALIBRATION[:3]))
def test_calibrated_noise_hits_its_target_by_dp_accounting_pld(
    target: float, q: float, steps: int
) -> None:
    z = calibrate_noise_multiplier(target, DELTA, q, steps)
    events = [PrivacyEvent(z, q, steps)]
    reached = epsilon_for(events, DELTA)
    assert target * (1 - 0.005) <= reached <= target
    assert _assert_exact(reached, events) == pytest.approx(target, rel=REL)


@pytest.mark.slow
def test_calibration_after_a_prior_history_hits_the_total_target() -> None:
    prior = [PrivacyEvent(1.5, 0.02, 300)]
    z = calibrate_noise_multiplier(3.0, DELTA, 0.02, 300, prior_events=prior)
    events = [*prior, PrivacyEvent(z, 0.02, 300)]
    assert _reference(events, pessimistic=True) == pytest.approx(3.0, rel=REL)
    assert epsilon_for(events, DELTA) <= 3.0


def test_reference_has_power_old_prv_default_was_over_one_percent() -> None:
    # Opacus' PRV at its fixed eps_error 0.01 (fedseal's figure before issue 13) fails
    # this check near epsilon 0.84, so the 1 % bound is not vacuous.
    from opacus.accountants import PRVAccountant

    event = PrivacyEvent(1.0, 0.01, 140)  # epsilon 0.80
    acc = PRVAccountant()
    acc.load_state_dict({"history": [(1.0, 0.01, 140)], "mechanism": "prv"})
    old = float(acc.get_epsilon(delta=DELTA))
    reference = _reference([event], pessimistic=True)
    assert not math.isclose(old, reference, rel_tol=REL)
    _assert_exact(epsilon_for([event], DELTA), [event])
