"""The one-run audit's bound, against values derived independently of the code under test."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from scipy.stats import binom

from common.errors import ConfigurationError
from simulations.privacy_audit.bound import epsilon_lower_bound, p_value


def _binomial_tail(r: int, v: int, q: Fraction) -> Fraction:
    """P[Binomial(r, q) >= v], exactly."""
    return sum((math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(v, r + 1)), Fraction(0))


def _reference_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The bound's formula written out term by term in exact arithmetic (q rounded once)."""
    q = Fraction(math.exp(epsilon) / (1 + math.exp(epsilon)))
    tail = _binomial_tail(r, v, q)
    windows = []
    for i in range(1, v + 1):
        window = sum(
            (math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(v - i, v)), Fraction(0)
        )
        windows.append(window / i)
    return min(1.0, float(tail + 2 * m * Fraction(delta) * max(windows, default=Fraction(0))))


@pytest.mark.parametrize(("r", "v"), [(10, 7), (20, 20), (31, 16), (50, 40)])
def test_p_value_at_epsilon_zero_delta_zero_is_the_fair_coin_tail(r: int, v: int) -> None:
    exact = _binomial_tail(r, v, Fraction(1, 2))
    assert p_value(100, r, v, 0.0, 0.0) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize(
    ("m", "r", "v", "epsilon", "delta"),
    [
        (40, 20, 15, 0.5, 1e-3),
        (40, 20, 20, 2.0, 1e-2),
        (100, 30, 12, 0.0, 1e-4),
        (60, 25, 25, 3.0, 1e-5),
    ],
)
def test_p_value_matches_the_formula_in_exact_arithmetic(
    m: int, r: int, v: int, epsilon: float, delta: float
) -> None:
    assert p_value(m, r, v, epsilon, delta) == pytest.approx(
        _reference_p_value(m, r, v, epsilon, delta), rel=1e-9, abs=1e-15
    )


@pytest.mark.parametrize(("r", "confidence"), [(10, 0.95), (100, 0.95), (100, 0.99), (37, 0.9)])
def test_all_correct_without_delta_has_the_closed_form_bound(r: int, confidence: float) -> None:
    # P[all r correct] = q^r under randomised response: the bound solves q^r = 1 - confidence.
    q = (1 - confidence) ** (1 / r)
    assert epsilon_lower_bound(200, r, r, 0.0, confidence) == pytest.approx(
        math.log(q / (1 - q)), abs=1e-6
    )


def test_blind_guessing_rates_bound_nothing() -> None:
    assert epsilon_lower_bound(200, 100, 50, 1e-5) == 0.0
    assert epsilon_lower_bound(200, 100, 55, 0.0) == 0.0  # P[Bin(100, 1/2) >= 55] > 0.05
    assert epsilon_lower_bound(200, 0, 0, 1e-5) == 0.0


def test_bound_rises_with_correct_guesses_and_falls_with_delta_and_confidence() -> None:
    bounds = [epsilon_lower_bound(200, 60, v, 1e-5) for v in range(30, 61)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:], strict=False))
    assert bounds[-1] > bounds[len(bounds) // 2] > 0.0
    by_delta = [epsilon_lower_bound(200, 60, 55, d) for d in (0.0, 1e-5, 1e-3, 1e-2)]
    assert all(a >= b for a, b in zip(by_delta, by_delta[1:], strict=False))
    by_confidence = [epsilon_lower_bound(200, 60, 55, 1e-5, c) for c in (0.8, 0.9, 0.95, 0.99)]
    assert all(a > b for a, b in zip(by_confidence, by_confidence[1:], strict=False))


def test_p_value_at_the_bound_is_the_significance_level() -> None:
    m, r, v, delta = 200, 80, 70, 1e-5
    bound = epsilon_lower_bound(m, r, v, delta, 0.95)
    assert p_value(m, r, v, bound, delta) == pytest.approx(0.05, abs=1e-6)
    assert p_value(m, r, v, bound * 0.99, delta) < 0.05 < p_value(m, r, v, bound * 1.01, delta)


@pytest.mark.parametrize(("epsilon", "r"), [(0.5, 60), (1.0, 100), (2.0, 40)])
def test_an_exactly_epsilon_dp_guesser_exceeds_the_bound_at_most_one_time_in_twenty(
    epsilon: float, r: int
) -> None:
    # Randomised response guesses each canary right with probability e^eps / (1 + e^eps): it
    # is epsilon-DP, so the bound may exceed epsilon with probability at most 5 %.
    q = math.exp(epsilon) / (1 + math.exp(epsilon))
    first = next(v for v in range(r + 1) if epsilon_lower_bound(4 * r, r, v, 0.0) > epsilon)
    assert float(binom.sf(first - 1, r, q)) <= 0.05
    assert float(binom.sf(first - 2, r, q)) > 0.05  # and one fewer would not have been rejected


@pytest.mark.parametrize(
    "args",
    [
        (10, 11, 5, 1e-5),
        (10, 5, 6, 1e-5),
        (0, 0, 0, 1e-5),
        (10, 5, 3, -1.0),
        (10, 5, 3, 2.0),
        (10, 5, True, 0.0),
    ],
)
def test_bad_counts_or_delta_are_refused(args: tuple) -> None:
    with pytest.raises(ConfigurationError):
        epsilon_lower_bound(*args)


@pytest.mark.parametrize("confidence", [0.0, 1.0, 1.5, -0.1])
def test_confidence_outside_the_open_unit_interval_is_refused(confidence: float) -> None:
    with pytest.raises(ConfigurationError, match="confidence"):
        epsilon_lower_bound(10, 5, 5, 0.0, confidence)


def test_p_value_refuses_a_negative_or_infinite_epsilon() -> None:
    for eps in (-0.1, math.inf, math.nan):
        with pytest.raises(ConfigurationError, match="epsilon"):
            p_value(10, 5, 5, eps, 0.0)
