"""What one site holds: its data (local file or simulated partition), preprocessed locally.

In deployment the SuperNode's node config names the site's data file
(``data-path``); in simulation Flower gives each virtual node a
``partition-id`` of ``num-partitions`` and the site takes that share of the
embedded dataset's training pool (never the server's held-out part).
Feature scaling is fitted on the site's own training split only.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunConfig
from common.data import (
    Dataset,
    load_builtin,
    load_site_file,
    scaler_for,
    split_holdout_stratified,
    split_train_test,
)
from common.errors import ConfigurationError
from common.partition import dirichlet_partition, iid_partition
from common.rng import seeded_generator
from common.task import TaskSpec

LOCAL_TEST_FRACTION = 0.2


@dataclass(frozen=True, slots=True)
class SiteData:
    """A site's preprocessed train/test arrays, shaped for the run's model."""

    dataset_id: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def site_partition(cfg: RunConfig, partition_id: int, num_partitions: int) -> Dataset:
    """The simulated site's share of the embedded dataset's training pool."""
    if not (0 <= partition_id < num_partitions):
        raise ConfigurationError(f"partition-id {partition_id} outside [0, {num_partitions})")
    pool, _ = split_holdout_stratified(load_builtin(cfg.dataset), cfg.test_fraction, cfg.seed)
    rng = seeded_generator(cfg.seed)
    if cfg.partition == "iid":
        parts = iid_partition(len(pool), num_partitions, rng)
    else:
        parts = dirichlet_partition(pool.y, num_partitions, cfg.alpha, rng)
    return pool.subset(parts[partition_id])


def load_site_data(cfg: RunConfig, task: TaskSpec, node_config: Mapping[str, Any]) -> SiteData:
    """Resolve, load, split and standardise the data of the site running this ClientApp."""
    key = tuple(sorted((str(k), str(v)) for k, v in node_config.items()))
    return _load_cached(cfg, task, key)


def site_dataset_id(cfg: RunConfig, node_config: Mapping[str, Any]) -> str:
    """The stable id of the dataset the site running this ClientApp holds, without loading it.

    What the site's ledger and release log key their rows by: the node
    config's ``dataset-id``, else the site file's name and content hash
    (deployment), else the simulated partition's description.

    Raises
    ------
    ConfigurationError
        If the node config names neither a data file nor a partition.
    """
    key = tuple(sorted((str(k), str(v)) for k, v in node_config.items()))
    return _dataset_id_cached(cfg.dataset, cfg.seed, cfg.partition, key)


@functools.lru_cache(maxsize=8)
def _dataset_id_cached(
    dataset: str, seed: int, partition: str, node_key: tuple[tuple[str, str], ...]
) -> str:
    node_config = dict(node_key)
    if "data-path" in node_config:
        return node_config.get("dataset-id") or _file_id(Path(node_config["data-path"]))
    if "partition-id" in node_config:
        pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
        return f"{dataset}-seed{seed}-{partition}-p{pid}of{n}"
    raise ConfigurationError(
        "node config has neither 'data-path' (deployment) nor 'partition-id' (simulation)"
    )


@functools.lru_cache(maxsize=8)
def _load_cached(cfg: RunConfig, task: TaskSpec, node_key: tuple[tuple[str, str], ...]) -> SiteData:
    node_config = dict(node_key)
    dataset_id = site_dataset_id(cfg, node_config)
    if "data-path" in node_config:
        data = load_site_file(
            Path(node_config["data-path"]),
            num_classes=task.num_classes,
            label_column=node_config.get("label-column", "label"),
        )
    else:
        if cfg.dataset == "custom":
            raise ConfigurationError("dataset 'custom' needs a data-path in the node config")
        pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
        data = site_partition(cfg, pid, n)
    # Split with a generator keyed by the dataset id, so reruns give the same split.
    digest = int.from_bytes(hashlib.sha256(dataset_id.encode()).digest()[:8], "big")
    train, test = split_train_test(data, LOCAL_TEST_FRACTION, seeded_generator(digest))
    scaler = scaler_for(train, private=cfg.dp)
    return SiteData(
        dataset_id,
        task.shape_examples(scaler.transform(train.x)),
        train.y,
        task.shape_examples(scaler.transform(test.x)),
        test.y,
    )


def _file_id(path: Path) -> str:
    """A stable dataset id for a site file: its name and a hash of its content."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return f"{path.name}-{h.hexdigest()[:16]}"
