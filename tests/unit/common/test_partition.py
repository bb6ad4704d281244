import numpy as np
import pytest

from common.errors import ConfigurationError
from common.partition import dirichlet_partition, iid_partition
from common.rng import seeded_generator


def _assert_exact_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and len(np.unique(allidx)) == n


def test_iid_partition_covers_each_example_once_balanced():
    parts = iid_partition(103, 10, seeded_generator(1))
    _assert_exact_cover(parts, 103)
    assert {len(p) for p in parts} <= {10, 11}


def test_iid_partition_same_seed_same_split():
    a = iid_partition(50, 4, seeded_generator(7))
    b = iid_partition(50, 4, seeded_generator(7))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_dirichlet_partition_covers_and_respects_min_size():
    labels = np.repeat(np.arange(10), 50)
    parts = dirichlet_partition(labels, 8, 0.5, seeded_generator(0), min_examples=5)
    _assert_exact_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 5


def test_dirichlet_partition_small_alpha_more_skewed_than_large():
    labels = np.repeat(np.arange(10), 100)

    def skew(alpha):
        parts = dirichlet_partition(labels, 10, alpha, seeded_generator(3))
        return np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])

    assert skew(0.1) > skew(100.0) + 0.2


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_dirichlet_partition_bad_alpha_rejected(alpha):
    with pytest.raises(ConfigurationError):
        dirichlet_partition(np.zeros(20, int), 2, alpha, seeded_generator(0))


def test_partition_more_sites_than_examples_rejected():
    with pytest.raises(ConfigurationError):
        iid_partition(3, 5, seeded_generator(0))
    with pytest.raises(ConfigurationError):
        dirichlet_partition(np.zeros(3, int), 5, 1.0, seeded_generator(0))
