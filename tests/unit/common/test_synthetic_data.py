"""The generated ``synthetic`` dataset and the simulated sites' views of the shared data."""

from __future__ import annotations

import numpy as np
import pytest

from client.site import LOCAL_TEST_FRACTION, load_site_data, site_partition, site_rows
from common.config import RunConfig
from common.data import (
    SYNTHETIC_BOUND,
    SYNTHETIC_CLASSES,
    SYNTHETIC_DEFAULT_ROWS,
    SYNTHETIC_FEATURES,
    load_builtin,
    make_synthetic,
    scaler_for,
    split_indices,
)
from common.errors import ConfigurationError
from common.task import task_for


def test_synthetic_has_its_published_shape_classes_and_bounds() -> None:
    data = load_builtin("synthetic")
    assert data.x.shape == (SYNTHETIC_DEFAULT_ROWS, SYNTHETIC_FEATURES)
    assert data.x.dtype == np.float32
    assert set(np.unique(data.y)) == set(range(SYNTHETIC_CLASSES))
    assert data.feature_bounds is not None
    low, high = data.feature_bounds.for_features(data.num_features)
    assert (low == -SYNTHETIC_BOUND).all() and (high == SYNTHETIC_BOUND).all()
    assert data.x.min() >= -SYNTHETIC_BOUND and data.x.max() <= SYNTHETIC_BOUND
    # the clip to the published range touches only the tails
    assert (np.abs(data.x) >= SYNTHETIC_BOUND).mean() < 0.02


def test_synthetic_is_reproducible_and_its_size_an_option() -> None:
    a, b = make_synthetic(500), make_synthetic(500)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert len(make_synthetic(700)) == 700
    with pytest.raises(ConfigurationError, match="synthetic_rows"):
        make_synthetic(3)
    with pytest.raises(ConfigurationError, match="synthetic_rows"):
        RunConfig(dataset="synthetic", synthetic_rows=0)


def test_synthetic_run_config_scales_by_public_bounds_under_dp() -> None:
    cfg = RunConfig(dataset="synthetic", num_sites=50, synthetic_rows=20_000, dp=True)
    site = load_site_data(cfg, task_for(cfg), {"partition-id": 4, "num-partitions": 50})
    assert not site.private_scaling  # the published bounds, no one's records
    x = site.x_train
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.shape[1:] == (SYNTHETIC_FEATURES,)


def test_synthetic_default_gives_1000_sites_100_training_records_each() -> None:
    cfg = RunConfig(dataset="synthetic", num_sites=1000)
    sizes = []
    for pid in range(1000):
        _, rows = site_rows(cfg, pid, 1000)
        train, _ = split_indices(len(rows), LOCAL_TEST_FRACTION, np.random.default_rng(0))
        sizes.append(len(train))  # the split's size does not depend on the generator
    assert min(sizes) >= 100


def test_partitions_are_disjoint_and_outside_the_servers_holdout() -> None:
    cfg = RunConfig(dataset="synthetic", num_sites=200, synthetic_rows=10_000)
    parts = [site_rows(cfg, pid, 200)[1] for pid in range(200)]
    every = np.concatenate(parts)
    assert len(np.unique(every)) == len(every)  # no row at two sites
    data = load_builtin("synthetic", synthetic_rows=10_000)
    assert len(every) == len(data) - int(np.ceil(len(data) * cfg.test_fraction))


def test_site_view_holds_row_numbers_not_a_copy_of_the_dataset() -> None:
    cfg = RunConfig(dataset="synthetic", num_sites=100, synthetic_rows=20_000, dp=True)
    task = task_for(cfg)
    shared = load_builtin("synthetic", synthetic_rows=20_000)
    sites = [
        load_site_data(cfg, task, {"partition-id": pid, "num-partitions": 100}) for pid in (1, 2)
    ]
    for site in sites:
        # the split's features are the process's one dataset (same buffer), read-only
        assert site.train.data.x is shared.x and site.test.data.x is shared.x
        assert not shared.x.flags.writeable
        # what the site itself holds is its row numbers: about 1/100 of the rows
        assert len(site.train) + len(site.test) == 20_000 * 0.8 / 100
    a, b = sites
    assert not set(a.train.index) & set(b.train.index)
    # the view gives the same examples as the partition's copy would
    part = site_partition(cfg, 1, 100)
    rows = site_rows(cfg, 1, 100)[1]
    positions = np.searchsorted(rows, a.train.index)
    scaler = scaler_for(part, private=True)
    np.testing.assert_array_equal(a.x_train, scaler.transform(part.x[positions]))
