"""Datasets: scikit-learn's bundled ones for simulations, a site's own file in deployment.

Preprocessing is always fitted by the party that holds the data, on its own
training split only (:class:`Standardizer`): a real site never sees pooled
data, and simulated sites must not either.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import DataError

BUILTIN_DATASETS = ("digits", "breast_cancer")
MAX_SITE_FILE_BYTES = 2 * 1024**3


@dataclass(frozen=True, slots=True)
class Dataset:
    """Examples ``x`` (float32, shape ``(n, features)``) and labels ``y`` (int64).

    ``image_shape`` is the ``(C, H, W)`` view of one example when the data are
    images (digits: ``(1, 8, 8)``), else ``None``.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str
    image_shape: tuple[int, int, int] | None = None
    feature_range: tuple[float, float] | None = None  # public bounds of every feature, if known

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise DataError(f"{self.name}: x must be (n, features) and y (n,) with equal n")
        if len(self.y) == 0:
            raise DataError(f"{self.name}: the dataset is empty")
        if not np.all(np.isfinite(self.x)):
            raise DataError(f"{self.name}: features contain NaN or infinite values")
        if self.y.min() < 0 or self.y.max() >= self.num_classes:
            raise DataError(
                f"{self.name}: labels must lie in [0, {self.num_classes}), "
                f"found {int(self.y.min())}..{int(self.y.max())}"
            )

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_features(self) -> int:
        return int(self.x.shape[1])

    def subset(self, index: np.ndarray) -> Dataset:
        """The examples at ``index`` (a copy)."""
        return Dataset(
            self.x[index],
            self.y[index],
            self.num_classes,
            self.name,
            self.image_shape,
            self.feature_range,
        )


def load_builtin(name: str) -> Dataset:
    """Load one of scikit-learn's bundled datasets (no network access)."""
    from sklearn import datasets as skd

    if name == "digits":
        bunch = skd.load_digits()
        return Dataset(
            bunch.data.astype(np.float32),
            bunch.target.astype(np.int64),
            10,
            "digits",
            (1, 8, 8),
            (0.0, 16.0),  # 4-bit grey levels: public, not learned from anyone's data
        )
    if name == "breast_cancer":
        bunch = skd.load_breast_cancer()
        return Dataset(
            bunch.data.astype(np.float32), bunch.target.astype(np.int64), 2, "breast_cancer"
        )
    raise DataError(
        f"unknown built-in dataset {name!r}; choose one of {', '.join(BUILTIN_DATASETS)}"
    )


def load_site_file(path: str | Path, *, num_classes: int, label_column: str = "label") -> Dataset:
    """Load a site's own data from a CSV (header row) or NPZ file.

    CSV: one header row; the column named ``label_column`` holds integer class
    labels in ``[0, num_classes)``; every other column is a numeric feature.
    NPZ: arrays ``x`` (n, features) and ``y`` (n,), or feature arrays plus an
    array named ``label_column``.

    Raises
    ------
    DataError
        Missing or unreadable file, missing label column, non-numeric or
        non-finite values, labels out of range, or no rows.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"site data file not found: {p}")
    if p.stat().st_size > MAX_SITE_FILE_BYTES:
        raise DataError(f"{p}: larger than {MAX_SITE_FILE_BYTES} bytes")
    suffix = p.suffix.lower()
    if suffix == ".csv":
        x, y = _read_csv(p, label_column)
    elif suffix == ".npz":
        x, y = _read_npz(p, label_column)
    else:
        raise DataError(f"{p}: unsupported file type {suffix!r} (use .csv or .npz)")
    if len(y) == 0:
        raise DataError(f"{p}: no data rows")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{p}: features contain NaN or infinite values")
    if not np.all(np.isfinite(y)) or not np.all(np.equal(np.mod(y, 1), 0)):
        raise DataError(f"{p}: label column {label_column!r} must hold integers")
    labels = y.astype(np.int64)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(
            f"{p}: labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}"
        )
    return Dataset(x.astype(np.float32), labels, num_classes, p.name)


def _read_csv(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty file")
            header = [h.strip() for h in header]
            if label_column not in header:
                raise DataError(
                    f"{path}: no label column {label_column!r} (columns: {', '.join(header[:10])})"
                )
            label_at = header.index(label_column)
            rows_x: list[list[float]] = []
            rows_y: list[float] = []
            for line_no, row in enumerate(reader, start=2):
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{path}:{line_no}: expected {len(header)} values, found {len(row)}"
                    )
                try:
                    values = [float(c) for c in row]
                except ValueError:
                    bad = next(c for c in row if not _is_float(c))
                    raise DataError(f"{path}:{line_no}: non-numeric value {bad!r}") from None
                rows_y.append(values.pop(label_at))
                rows_x.append(values)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text CSV file") from exc
    if len(header) < 2:
        raise DataError(f"{path}: needs at least one feature column besides {label_column!r}")
    x = np.asarray(rows_x, dtype=np.float64).reshape(len(rows_x), len(header) - 1)
    return x, np.asarray(rows_y, dtype=np.float64)


def _read_npz(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            if "x" in names and "y" in names:
                x, y = npz["x"], npz["y"]
            elif label_column in names:
                y = npz[label_column]
                cols = [npz[n] for n in names if n != label_column]
                if not cols:
                    raise DataError(f"{path}: no feature arrays besides {label_column!r}")
                x = np.column_stack([c.reshape(len(y), -1) for c in cols])
            else:
                raise DataError(f"{path}: no label array {label_column!r} (and no 'x'/'y' pair)")
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable NPZ file ({exc})") from exc
    if not np.issubdtype(x.dtype, np.number) or not np.issubdtype(y.dtype, np.number):
        raise DataError(f"{path}: arrays must be numeric")
    if x.ndim == 1:
        x = x.reshape(-1, 1)
    x = x.reshape(len(x), -1)
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{path}: labels must be one value per row ({len(x)} rows)")
    return x.astype(np.float64), y.astype(np.float64)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Standardizer:
    """Per-feature standardisation fitted on one party's own training data."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, *, min_scale: float = 1e-6) -> Standardizer:
        if len(x) == 0:
            raise DataError("cannot fit a standardiser on no examples")
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        return cls(mean.astype(np.float32), np.maximum(std, min_scale).astype(np.float32))

    @classmethod
    def from_range(cls, low: float, high: float, num_features: int) -> Standardizer:
        """Map the public range [low, high] to [-1, 1]: depends on no one's data."""
        mid, half = (low + high) / 2.0, max((high - low) / 2.0, 1e-6)
        return cls(np.full(num_features, mid, np.float32), np.full(num_features, half, np.float32))

    def transform(self, x: np.ndarray) -> np.ndarray:
        if x.shape[1:] != self.mean.shape:
            raise DataError(f"expected {self.mean.shape[0]} features, got {x.shape[1:]}")
        scaled: np.ndarray = ((x - self.mean) / self.scale).astype(np.float32)
        return scaled


def scaler_for(train: Dataset, *, private: bool) -> Standardizer:
    """The feature scaling a party applies to its own data.

    Fitting mean and spread on private records is itself a release about them
    that DP-SGD's accountant does not cover; so under record-level DP a dataset
    with public feature bounds is scaled by those bounds instead. Without public
    bounds, the fitted statistics remain (a documented, unaccounted leak).
    """
    if private and train.feature_range is not None:
        return Standardizer.from_range(*train.feature_range, train.num_features)
    return Standardizer.fit(train.x)


def split_train_test(
    data: Dataset, test_fraction: float, rng: np.random.Generator
) -> tuple[Dataset, Dataset]:
    """Split ``data`` into train and test parts (test gets ``ceil(n*fraction)``, at least 1).

    A single example stays in train (and the test part repeats it) so that
    tiny sites still train; callers see the sizes in the returned datasets.
    """
    n = len(data)
    order = rng.permutation(n)
    if n < 2:
        return data, data
    n_test = min(n - 1, max(1, math.ceil(n * test_fraction)))
    return data.subset(np.sort(order[n_test:])), data.subset(np.sort(order[:n_test]))


def split_holdout_stratified(
    data: Dataset, test_fraction: float, seed: int
) -> tuple[Dataset, Dataset]:
    """The server's held-out split of an embedded dataset (stratified, reproducible).

    Simulated sites share only the first part; the second part is the server's
    own evaluation data.
    """
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(data))
    pool, holdout = train_test_split(
        idx, test_size=test_fraction, random_state=seed, stratify=data.y
    )
    return data.subset(np.sort(pool)), data.subset(np.sort(holdout))
