from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from common.dp.central import noise_aggregate
from common.dp.clipping import clip_l2
from common.dp.events import PrivacyEvent, PrivacyLevel
from common.errors import ConfigurationError, DataError
from common.rng import seeded_generator

N = 200_000
ALPHA = 1e-6


@pytest.mark.parametrize(("z", "c", "n"), [(1.0, 1.0, 1), (1.3, 0.7, 4), (0.5, 2.0, 10)])
def test_noise_aggregate_mean_noise_has_calibrated_std(z: float, c: float, n: int) -> None:
    total = [np.zeros(N // 2), np.zeros((N // 4, 2))]
    result = noise_aggregate(
        total, denominator=n, noise_multiplier=z, sensitivity=c, rng=seeded_generator(11)
    )
    values = np.concatenate([a.ravel() for a in result.mean])
    expected_std = z * c / n  # std z*Delta on the sum, divided by the fixed denominator
    lo = stats.chi2.ppf(ALPHA / 2, N - 1) * expected_std**2 / (N - 1)
    hi = stats.chi2.ppf(1 - ALPHA / 2, N - 1) * expected_std**2 / (N - 1)
    assert lo <= float(np.var(values, ddof=1)) <= hi
    assert result.noise_std == pytest.approx(z * c)
    assert result.denominator == n


def test_noise_aggregate_zero_noise_returns_exact_mean() -> None:
    rng = seeded_generator(2)
    updates = [[rng.normal(size=(3, 2)), rng.normal(size=())] for _ in range(3)]
    clipped = [clip_l2(u, 1.0)[0] for u in updates]
    total = [sum(parts) for parts in zip(*clipped, strict=True)]
    result = noise_aggregate(total, denominator=3, noise_multiplier=0.0, sensitivity=1.0, rng=rng)
    for got, s in zip(result.mean, total, strict=True):
        np.testing.assert_array_equal(got, s / 3)


def test_noise_aggregate_event_is_client_level_with_sampling_rate() -> None:
    fixed = noise_aggregate(
        [np.zeros(2)], denominator=2, noise_multiplier=1.1, sensitivity=1.0, rng=seeded_generator(0)
    )
    assert fixed.event == PrivacyEvent(1.1, 1.0, 1, PrivacyLevel.CLIENT)
    poisson = noise_aggregate(
        [np.zeros(2)],
        denominator=2,
        noise_multiplier=1.1,
        sensitivity=1.0,
        rng=seeded_generator(0),
        sample_rate=0.2,
    )
    assert poisson.event.sample_rate == 0.2


def test_noise_aggregate_does_not_mutate_input() -> None:
    total = [np.ones(5)]
    noise_aggregate(
        total, denominator=1, noise_multiplier=1.0, sensitivity=1.0, rng=seeded_generator(0)
    )
    np.testing.assert_array_equal(total[0], np.ones(5))


@pytest.mark.parametrize("n", [0, -1])
def test_noise_aggregate_non_positive_denominator_raises(n: int) -> None:
    with pytest.raises(ConfigurationError):
        noise_aggregate(
            [np.zeros(2)],
            denominator=n,
            noise_multiplier=1.0,
            sensitivity=1.0,
            rng=seeded_generator(0),
        )


def test_noise_aggregate_bool_denominator_or_bad_params_raise() -> None:
    rng = seeded_generator(0)
    with pytest.raises(ConfigurationError):
        noise_aggregate(
            [np.zeros(2)], denominator=True, noise_multiplier=1.0, sensitivity=1.0, rng=rng
        )
    with pytest.raises(ConfigurationError):
        noise_aggregate(
            [np.zeros(2)], denominator=2, noise_multiplier=1.0, sensitivity=0.0, rng=rng
        )
    with pytest.raises(ConfigurationError):
        noise_aggregate(
            [np.zeros(2)],
            denominator=2,
            noise_multiplier=1.0,
            sensitivity=1.0,
            rng=rng,
            sample_rate=0.0,
        )
    with pytest.raises(DataError):
        noise_aggregate(
            [np.array([np.nan])], denominator=2, noise_multiplier=1.0, sensitivity=1.0, rng=rng
        )
    with pytest.raises(DataError):
        noise_aggregate([], denominator=2, noise_multiplier=1.0, sensitivity=1.0, rng=rng)
