"""What one site holds: its data (local file or simulated partition), preprocessed locally.

In deployment the SuperNode's node config names the site's data file
(``data-path``); in simulation Flower gives each virtual node a
``partition-id`` of ``num-partitions`` and the site takes that share of the
embedded dataset's training pool (never the server's held-out part). A
process that runs many simulated sites (a Ray actor) holds the dataset once,
read-only, and partitions it once; each site's splits are row numbers into
it (:func:`site_rows`), not copies.

Feature scaling (:func:`common.data.scaler_for`): the site's declared
public bounds (node config ``feature-bounds``, ``fedseal-client start
--feature-bounds``) when it has them; under record-level DP otherwise the
built-in dataset's published bounds, or, only where the site policy allows
it (``privacy.allow_private_scaling``), statistics of the site's own
training split (:attr:`SiteData.private_scaling`: reported with the
site's ε); without DP the site fits on its own training split.

The dataset's identity (:func:`site_dataset_id`), which the site's
lifetime budget is bound to, is the one the site declares (node config
``dataset-id``, ``fedseal-client start --dataset-id``): stable across edits
of the file. A deployed site that declares none gets its file's name and
content hash, which a one-row edit changes (a new budget), so the site
refuses DP rounds without a declared id (:mod:`client.agent`). A simulated
site is ``<dataset>-site<i>``: nothing the server chooses (no seed).

A deployed site's file is parsed once into ``<state-dir>/data-cache``
(:mod:`common.data_cache`) and memory-mapped by every later ClientApp
process; its features stay in their compact dtype and become float32 one
batch at a time (:class:`~common.data.Examples`).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.state import DATA_CACHE_DIR, private_dir
from common.config import RunConfig
from common.data import (
    Dataset,
    Examples,
    FeatureBounds,
    holdout_indices,
    load_builtin,
    load_site_file,
    scaler_for,
    split_indices,
)
from common.data_cache import file_sha256, load_site_file_cached
from common.errors import ConfigurationError
from common.partition import dirichlet_partition, iid_partition
from common.rng import seeded_generator
from common.task import TaskSpec

LOCAL_TEST_FRACTION = 0.2
NODE_CONFIG_DATASET_ID = "dataset-id"
NODE_CONFIG_FEATURE_BOUNDS = "feature-bounds"
DATASET_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True, eq=False)
class SiteData:
    """A site's train and test splits, scaled and shaped for the run's model a batch at a time.

    ``x_train``/``x_test`` materialise a whole split as float32 (evaluation,
    small sites); training reads :attr:`train` batch by batch instead.
    """

    dataset_id: str
    train: Examples
    test: Examples
    declared_id: bool = True  # the id is the site's own word, not its file's content hash

    @property
    def private_scaling(self) -> bool:
        """Whether the features were standardised on the site's own records (not public bounds)."""
        return not self.train.scaler.public

    @property
    def x_train(self) -> np.ndarray:
        return self.train.features()

    @property
    def y_train(self) -> np.ndarray:
        return self.train.y

    @property
    def x_test(self) -> np.ndarray:
        return self.test.features()

    @property
    def y_test(self) -> np.ndarray:
        return self.test.y


def site_partition(cfg: RunConfig, partition_id: int, num_partitions: int) -> Dataset:
    """The simulated site's share of the embedded dataset's training pool (a copy)."""
    data, rows = site_rows(cfg, partition_id, num_partitions)
    return data.subset(rows)


def site_rows(cfg: RunConfig, partition_id: int, num_partitions: int) -> tuple[Dataset, np.ndarray]:
    """The embedded dataset and the row numbers (into it) of the simulated site's share.

    The dataset is the process's one read-only copy (:func:`common.data.load_builtin`)
    and the partition of its training pool is made once per process and
    federation size (:func:`_partitions`), so a process that runs many
    simulated sites holds the data once and each site only its row numbers.
    """
    if not (0 <= partition_id < num_partitions):
        raise ConfigurationError(f"partition-id {partition_id} outside [0, {num_partitions})")
    data = load_builtin(cfg.dataset, synthetic_rows=cfg.synthetic_rows)
    parts = _partitions(
        cfg.dataset,
        cfg.synthetic_rows,
        cfg.test_fraction,
        cfg.seed,
        cfg.partition,
        cfg.alpha,
        num_partitions,
    )
    return data, parts[partition_id]


@functools.lru_cache(maxsize=4)
def _partitions(
    dataset: str,
    synthetic_rows: int,
    test_fraction: float,
    seed: int,
    partition: str,
    alpha: float,
    num_partitions: int,
) -> tuple[np.ndarray, ...]:
    """Every simulated site's rows of the training pool (read-only), made once per process."""
    data = load_builtin(dataset, synthetic_rows=synthetic_rows)
    pool, _ = holdout_indices(data, test_fraction, seed)
    rng = seeded_generator(seed)
    if partition == "iid":
        parts = iid_partition(len(pool), num_partitions, rng)
    else:
        parts = dirichlet_partition(data.y[pool], num_partitions, alpha, rng)
    out = []
    for part in parts:
        rows = pool[part]
        rows.setflags(write=False)
        out.append(rows)
    return tuple(out)


def load_site_data(
    cfg: RunConfig,
    task: TaskSpec,
    node_config: Mapping[str, Any],
    state_dir: Path | None = None,
    *,
    allow_private_scaling: bool = False,
) -> SiteData:
    """Resolve, load, split and scale the data of the site running this ClientApp.

    With the site's private ``state_dir`` a data file is parsed once per
    content into ``state_dir/data-cache`` (mode 0700) and mapped from there
    (:func:`common.data_cache.load_site_file_cached`); without it the file is
    parsed into memory. ``allow_private_scaling`` (the site policy's
    ``privacy.allow_private_scaling``) lets record-level DP standardise on
    the site's own records where no public bounds exist.

    Raises
    ------
    DataError
        The site's file is missing or fails a check, or its declared bounds
        do not fit its features.
    ConfigurationError
        The node config names no data, the data do not fit the run's task,
        or under DP the features have no public bounds and the site policy
        does not allow standardising on private records.
    """
    key = tuple(sorted((str(k), str(v)) for k, v in node_config.items()))
    return _load_cached(cfg, task, key, state_dir, allow_private_scaling)


def check_dataset_id(value: object) -> str:
    """``value`` if it is a valid declared dataset id (1-64 of ``A-Z a-z 0-9 . _ -``).

    Raises
    ------
    ConfigurationError
        Anything else, naming the rule.
    """
    if not isinstance(value, str) or DATASET_ID_PATTERN.fullmatch(value) is None:
        raise ConfigurationError(
            f"dataset id {value!r} must be 1-64 letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit)"
        )
    return value


def site_dataset_id(cfg: RunConfig, node_config: Mapping[str, Any]) -> str:
    """The id of the dataset the site running this ClientApp holds, without loading it.

    What the site's ledger and release log key their rows by, so what its
    lifetime budget is bound to: the node config's declared ``dataset-id``;
    else, for a site file, its name and content hash (changed by any edit:
    :func:`declares_dataset_id` is False and DP rounds are refused); else,
    in simulation, ``<dataset>-site<partition-id>`` (no seed or other
    server-chosen value in it).

    Raises
    ------
    ConfigurationError
        If the node config names neither a data file nor a partition, or
        declares an invalid id.
    """
    declared = node_config.get(NODE_CONFIG_DATASET_ID)
    if declared:
        return check_dataset_id(declared)
    if "data-path" in node_config:
        return _file_id(Path(str(node_config["data-path"])))  # hashed once per file version
    if "partition-id" in node_config:
        return f"{cfg.dataset}-site{int(node_config['partition-id'])}"
    raise ConfigurationError(
        "node config has neither 'data-path' (deployment) nor 'partition-id' (simulation)"
    )


def declares_dataset_id(node_config: Mapping[str, Any]) -> bool:
    """Whether the site's dataset id is stable across edits of its file (declared, or simulated)."""
    return bool(node_config.get(NODE_CONFIG_DATASET_ID)) or "data-path" not in node_config


def declared_bounds(node_config: Mapping[str, Any]) -> FeatureBounds | None:
    """The public feature bounds the site declared (node config ``feature-bounds``), if any.

    Raises
    ------
    DataError
        Bounds that do not parse (:meth:`~common.data.FeatureBounds.parse`).
    """
    text = node_config.get(NODE_CONFIG_FEATURE_BOUNDS)
    return FeatureBounds.parse(str(text)) if text else None


@functools.lru_cache(maxsize=8)
def _load_cached(
    cfg: RunConfig,
    task: TaskSpec,
    node_key: tuple[tuple[str, str], ...],
    state_dir: Path | None,
    allow_private_scaling: bool,
) -> SiteData:
    node_config = dict(node_key)
    dataset_id = site_dataset_id(cfg, node_config)
    rows: np.ndarray | None = None  # a simulated site's rows of the shared dataset
    if "data-path" in node_config:
        path = Path(node_config["data-path"])
        label_column = node_config.get("label-column", "label")
        if state_dir is None:
            data = load_site_file(path, num_classes=task.num_classes, label_column=label_column)
        else:
            data = load_site_file_cached(
                path,
                cache_root=private_dir(state_dir / DATA_CACHE_DIR),
                num_classes=task.num_classes,
                label_column=label_column,
                content_sha256=_content_sha256(path),
            )
    else:
        if cfg.dataset == "custom":
            raise ConfigurationError("dataset 'custom' needs a data-path in the node config")
        pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
        # A view: the process's shared dataset and this site's row numbers, never a copy.
        data, rows = site_rows(cfg, pid, n)
    task.shape_examples(data.x[:1])  # the run's feature count, or ConfigurationError
    # Split with a generator keyed by the dataset id, so reruns give the same split.
    digest = int.from_bytes(hashlib.sha256(dataset_id.encode()).digest()[:8], "big")
    count = len(data) if rows is None else len(rows)
    train, test = split_indices(count, LOCAL_TEST_FRACTION, seeded_generator(digest))
    if rows is not None:
        train, test = rows[train], rows[test]
    scaler = scaler_for(
        data,
        private=cfg.dp,
        index=train,
        bounds=declared_bounds(node_config),
        allow_private_fit=allow_private_scaling,
    )
    return SiteData(
        dataset_id,
        Examples(data, train, scaler, task.input_shape),
        Examples(data, test, scaler, task.input_shape),
        declares_dataset_id(node_config),
    )


def _file_id(path: Path) -> str:
    """A stable dataset id for a site file: its name and a hash of its content."""
    return f"{path.name}-{_content_sha256(path)[:16]}"


def _content_sha256(path: Path) -> str:
    """The file's SHA-256, hashed once per process and version of the file."""
    info = path.stat()
    return _sha256_of(str(path), info.st_size, info.st_mtime_ns, info.st_ino)


@functools.lru_cache(maxsize=8)
def _sha256_of(path: str, size: int, mtime_ns: int, inode: int) -> str:
    return file_sha256(Path(path))
