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
    result = noise_aggregate(total, n, noise_multiplier=z, clip_norm=c, rng=seeded_generator(11))
    values = np.concatenate([a.ravel() for a in result.mean])
    expected_std = z * c / n  # std z*C on the sum, divided by the real count
    lo = stats.chi2.ppf(ALPHA / 2, N - 1) * expected_std**2 / (N - 1)
    hi = stats.chi2.ppf(1 - ALPHA / 2, N - 1) * expected_std**2 / (N - 1)
    assert lo <= float(np.var(values, ddof=1)) <= hi
    assert result.noise_std == pytest.approx(z * c)
    assert result.contributors == n


def test_noise_aggregate_zero_noise_returns_exact_mean() -> None:
    rng = seeded_generator(2)
    updates = [[rng.normal(size=(3, 2)), rng.normal(size=())] for _ in range(3)]
    clipped = [clip_l2(u, 1.0)[0] for u in updates]
    total = [sum(parts) for parts in zip(*clipped, strict=True)]
    result = noise_aggregate(total, 3, noise_multiplier=0.0, clip_norm=1.0, rng=rng)
    for got, s in zip(result.mean, total, strict=True):
        np.testing.assert_array_equal(got, s / 3)


def test_noise_aggregate_event_is_client_level_with_sampling_rate() -> None:
    fixed = noise_aggregate(
        [np.zeros(2)], 2, noise_multiplier=1.1, clip_norm=1.0, rng=seeded_generator(0)
    )
    assert fixed.event == PrivacyEvent(1.1, 1.0, 1, PrivacyLevel.CLIENT)
    poisson = noise_aggregate(
        [np.zeros(2)],
        2,
        noise_multiplier=1.1,
        clip_norm=1.0,
        rng=seeded_generator(0),
        sample_rate=0.2,
    )
    assert poisson.event.sample_rate == 0.2


def test_noise_aggregate_does_not_mutate_input() -> None:
    total = [np.ones(5)]
    noise_aggregate(total, 1, noise_multiplier=1.0, clip_norm=1.0, rng=seeded_generator(0))
    np.testing.assert_array_equal(total[0], np.ones(5))


@pytest.mark.parametrize("n", [0, -1])
def test_noise_aggregate_no_contributors_raises(n: int) -> None:
    with pytest.raises(DataError):
        noise_aggregate(
            [np.zeros(2)], n, noise_multiplier=1.0, clip_norm=1.0, rng=seeded_generator(0)
        )


def test_noise_aggregate_bool_count_or_bad_params_raise() -> None:
    rng = seeded_generator(0)
    with pytest.raises(ConfigurationError):
        noise_aggregate([np.zeros(2)], True, noise_multiplier=1.0, clip_norm=1.0, rng=rng)
    with pytest.raises(ConfigurationError):
        noise_aggregate([np.zeros(2)], 2, noise_multiplier=1.0, clip_norm=0.0, rng=rng)
    with pytest.raises(ConfigurationError):
        noise_aggregate(
            [np.zeros(2)], 2, noise_multiplier=1.0, clip_norm=1.0, rng=rng, sample_rate=0.0
        )
    with pytest.raises(DataError):
        noise_aggregate([np.array([np.nan])], 2, noise_multiplier=1.0, clip_norm=1.0, rng=rng)
    with pytest.raises(DataError):
        noise_aggregate([], 2, noise_multiplier=1.0, clip_norm=1.0, rng=rng)
