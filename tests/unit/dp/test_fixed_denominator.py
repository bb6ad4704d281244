"""DP-FedAvg's fixed denominator (issue 13): the released mean never divides by the realised count."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from common.dp.central import CentralDpResult, mean_noise_std, noise_aggregate
from common.errors import ConfigurationError
from common.rng import seeded_generator

N = 100_000
ALPHA = 1e-6


def release(
    total: np.ndarray, denominator: object, z: float = 1.0, delta: float = 1.0
) -> CentralDpResult:
    """One DP-FedAvg release of ``total`` (a seeded generator: tests only)."""
    return noise_aggregate(
        [total],
        denominator=denominator,  # type: ignore[arg-type]
        noise_multiplier=z,
        sensitivity=delta,
        rng=seeded_generator(3),
    )


def test_mean_is_the_sum_over_the_fixed_denominator_whatever_the_count() -> None:
    # three contributions of 0.1 each, q*N = 0.5 * 10 = 5 expected: the mean is 0.3 / 5,
    # not 0.3 / 3 (the realised count); z = 0 leaves the arithmetic exact
    result = release(np.full(4, 0.3), 5.0, z=0.0)
    np.testing.assert_array_equal(result.mean[0], np.full(4, 0.3) / 5.0)
    assert not np.allclose(result.mean[0], np.full(4, 0.1))


@pytest.mark.parametrize(("z", "delta", "denominator"), [(1.0, 1.0, 1.0), (1.3, 2.5, 0.7)])
def test_an_empty_sum_releases_noise_of_std_z_delta_over_d(
    z: float, delta: float, denominator: float
) -> None:
    # nobody sampled: the round still releases, noise / D, the same law as any other round
    result = release(np.zeros(N), denominator, z, delta)
    expected = z * delta / denominator
    variance = float(np.var(result.mean[0], ddof=1)) * (N - 1) / expected**2
    assert stats.chi2.ppf(ALPHA / 2, N - 1) <= variance <= stats.chi2.ppf(1 - ALPHA / 2, N - 1)
    assert mean_noise_std(z, delta, denominator) == pytest.approx(expected)
    assert result.noise_std == pytest.approx(z * delta)


def test_the_result_carries_the_denominator_and_no_count() -> None:
    result = release(np.zeros(2), 2.5)
    assert result.denominator == 2.5
    assert not hasattr(result, "contributors")


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "5"])
def test_a_denominator_outside_its_domain_is_refused(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="denominator"):
        release(np.zeros(2), bad)
