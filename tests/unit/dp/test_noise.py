from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from common.dp.noise import add_gaussian_noise, central_noise_std
from common.errors import ConfigurationError, DataError
from common.rng import seeded_generator

N_SAMPLES = 200_000
ALPHA = 1e-6  # false-failure probability of each statistical check


def _variance_interval(n: int, std: float) -> tuple[float, float]:
    """Two-sided (1 - ALPHA) interval of the sample variance of n N(0, std^2) draws.

    (n - 1) s^2 / std^2 follows chi-square with n - 1 degrees of freedom.
    """
    lo = stats.chi2.ppf(ALPHA / 2, n - 1) * std**2 / (n - 1)
    hi = stats.chi2.ppf(1 - ALPHA / 2, n - 1) * std**2 / (n - 1)
    return float(lo), float(hi)


def test_variance_interval_rejects_a_one_percent_wrong_std() -> None:
    # The tolerance is tight enough to catch a 1 % error in the std.
    lo, hi = _variance_interval(N_SAMPLES, 1.0)
    assert not lo <= 1.01**2 <= hi and not lo <= 0.99**2 <= hi


@pytest.mark.parametrize("std", [0.3, 1.0, 2.5])
def test_add_gaussian_noise_sample_variance_matches_std(std: float) -> None:
    x = np.zeros(N_SAMPLES)
    noised = add_gaussian_noise(x, std, seeded_generator(7))
    lo, hi = _variance_interval(N_SAMPLES, std)
    assert lo <= float(np.var(noised, ddof=1)) <= hi
    z = stats.norm.ppf(1 - ALPHA / 2)
    assert abs(float(np.mean(noised))) <= z * std / math.sqrt(N_SAMPLES)
    np.testing.assert_array_equal(x, 0.0)  # input untouched


def test_add_gaussian_noise_zero_std_is_exact_copy() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = add_gaussian_noise(x, 0.0, seeded_generator(0))
    assert out is not x and out.dtype == np.float32
    np.testing.assert_array_equal(out, x)


def test_add_gaussian_noise_list_keeps_shapes_and_dtypes() -> None:
    xs = [np.zeros((2, 2), np.float32), np.zeros((), np.float64), np.zeros(3, np.int64)]
    out = add_gaussian_noise(xs, 1.0, seeded_generator(1))
    assert [a.shape for a in out] == [(2, 2), (), (3,)]
    assert [a.dtype for a in out] == [np.float32, np.float64, np.float64]


def test_add_gaussian_noise_same_seed_same_noise_other_seed_differs() -> None:
    x = np.zeros(100)
    a = add_gaussian_noise(x, 1.0, seeded_generator(3))
    b = add_gaussian_noise(x, 1.0, seeded_generator(3))
    c = add_gaussian_noise(x, 1.0, seeded_generator(4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("std", [-1.0, math.nan, math.inf])
def test_add_gaussian_noise_invalid_std_raises(std: float) -> None:
    with pytest.raises(ConfigurationError):
        add_gaussian_noise(np.zeros(3), std, seeded_generator(0))


def test_add_gaussian_noise_global_rng_refused() -> None:
    with pytest.raises(ConfigurationError):
        add_gaussian_noise(np.zeros(3), 1.0, np.random)  # type: ignore[arg-type]


def test_add_gaussian_noise_non_numeric_raises() -> None:
    with pytest.raises(DataError):
        add_gaussian_noise(np.array(["a"]), 1.0, seeded_generator(0))


def test_central_noise_std_is_z_times_c() -> None:
    assert central_noise_std(1.5, 0.4) == pytest.approx(0.6)
    assert central_noise_std(0.0, 0.4) == 0.0


@pytest.mark.parametrize(("z", "c"), [(-1.0, 1.0), (1.0, 0.0), (1.0, -2.0), (math.inf, 1.0)])
def test_central_noise_std_out_of_domain_raises(z: float, c: float) -> None:
    with pytest.raises(ConfigurationError):
        central_noise_std(z, c)
