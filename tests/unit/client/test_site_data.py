"""A site's data: cached once in its state directory, batches identical to the in-memory path."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from site_files import random_site_csv
from torch.utils.data import DataLoader, TensorDataset

from client.site import DATA_CACHE_DIR, LOCAL_TEST_FRACTION, load_site_data, site_partition
from client.training import make_loader
from common.config import RunConfig
from common.data import Standardizer, load_site_file, scaler_for, split_train_test
from common.errors import ConfigurationError
from common.rng import seeded_generator
from common.task import task_for


def _csv(path: Path, n: int = 600, features: int = 6) -> Path:
    return random_site_csv(path, rows=n, features=features, high=17, classes=3, seed=5)


def _custom(features: int = 6, **kw: object) -> RunConfig:
    return RunConfig(dataset="custom", num_features=features, num_classes=3, **kw)


def _legacy(path: Path, dataset_id: str, features: int = 6):
    """The pre-cache pipeline: whole file as float32, split copies, fitted scaler."""
    data = load_site_file(path, num_classes=3)
    data = type(data)(data.x.astype(np.float32), data.y, data.num_classes, data.name)
    digest = int.from_bytes(hashlib.sha256(dataset_id.encode()).digest()[:8], "big")
    train, test = split_train_test(data, LOCAL_TEST_FRACTION, seeded_generator(digest))
    scaler = Standardizer.fit(train.x)
    return scaler.transform(train.x), train.y, scaler.transform(test.x), test.y


def test_load_site_data_with_state_dir_caches_privately_and_matches_the_legacy_pipeline(
    tmp_path,
):
    src = _csv(tmp_path / "site.csv")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    cfg = _custom()
    data = load_site_data(cfg, task_for(cfg), {"data-path": str(src)}, state)
    cache = state / DATA_CACHE_DIR
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1
    assert data.train.data.x.dtype == np.uint8
    x_train, y_train, x_test, y_test = _legacy(src, data.dataset_id)
    np.testing.assert_array_equal(data.x_train, x_train)
    np.testing.assert_array_equal(data.y_train, y_train)
    np.testing.assert_array_equal(data.x_test, x_test)
    np.testing.assert_array_equal(data.y_test, y_test)


def test_load_site_data_feature_count_mismatch_is_a_configuration_error(tmp_path):
    src = _csv(tmp_path / "site.csv")
    cfg = _custom(features=5)
    with pytest.raises(ConfigurationError, match="expects 5 features"):
        load_site_data(cfg, task_for(cfg), {"data-path": str(src)}, tmp_path)


def test_simulated_site_data_identical_to_the_legacy_arrays():
    cfg = RunConfig(num_sites=10)
    task = task_for(cfg)
    node = {"partition-id": 3, "num-partitions": 10}
    data = load_site_data(cfg, task, node)
    part = site_partition(cfg, 3, 10)
    digest = int.from_bytes(hashlib.sha256(data.dataset_id.encode()).digest()[:8], "big")
    train, test = split_train_test(part, LOCAL_TEST_FRACTION, seeded_generator(digest))
    scaler = scaler_for(train, private=cfg.dp)
    np.testing.assert_array_equal(data.x_train, task.shape_examples(scaler.transform(train.x)))
    np.testing.assert_array_equal(data.x_test, task.shape_examples(scaler.transform(test.x)))
    np.testing.assert_array_equal(data.y_train, train.y)


def test_make_loader_batches_identical_to_the_legacy_tensor_loader():
    cfg = RunConfig(num_sites=10)
    data = load_site_data(cfg, task_for(cfg), {"partition-id": 1, "num-partitions": 10})
    legacy = DataLoader(
        TensorDataset(torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)),
        batch_size=16,
        shuffle=True,
        generator=torch.Generator().manual_seed(42),
    )
    new = make_loader(data.train, 16, shuffle=True, seed=42)
    assert len(new) == len(legacy)
    for _ in range(3):  # local epochs: each pass a new permutation from the same generator
        pairs = list(zip(legacy, new, strict=True))
        assert len(pairs) == len(legacy)
        for (xa, ya), (xb, yb) in pairs:
            assert xb.dtype == torch.float32 and yb.dtype == torch.int64
            torch.testing.assert_close(xa, xb, rtol=0, atol=0)
            torch.testing.assert_close(ya, yb, rtol=0, atol=0)
