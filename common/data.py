"""Datasets: scikit-learn's bundled ones for simulations, a site's own file in deployment.

Preprocessing is done by the party that holds the data, on its own data
only (:class:`Standardizer`): a real site never sees pooled data, and
simulated sites must not either. Under record-level DP it uses public
feature bounds (:class:`FeatureBounds`: declared by the site, or published
with a built-in dataset), never statistics of private records, unless the
site's policy explicitly allows that (:func:`scaler_for`).

Memory: a site's file is parsed a block of rows at a time
(:func:`parse_site_file`) and its features are kept in the smallest dtype
that holds every value exactly (:func:`compact_dtype`: integer grey levels
stay one byte each). Rows become float32 only a batch at a time
(:class:`Examples`), and the scaler is fitted a chunk at a time, so no
float copy of a whole large file is ever made. :mod:`common.data_cache`
keeps the parsed arrays on disk, so later processes map them instead of
parsing again.
"""

from __future__ import annotations

import csv
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from common.errors import ConfigurationError, DataError

BUILTIN_DATASETS = ("digits", "breast_cancer", "synthetic")
MAX_SITE_FILE_BYTES = 2 * 1024**3
SITE_FILE_SUFFIXES = (".csv", ".npz")
# Rows parsed at once (a CSV block as float64: BLOCK_ROWS x columns x 8 bytes).
BLOCK_ROWS = 8_192
# Rows converted to float32 at once when fitting a scaler or materialising a split.
CHUNK_ROWS = 16_384
# Narrow dtypes features are stored in when every value is an integer in range, narrowest first.
COMPACT_INTEGER_DTYPES: tuple[type[np.integer[Any]], ...] = (
    np.uint8,
    np.int8,
    np.uint16,
    np.int16,
)
FEATURE_DTYPES: frozenset[np.dtype[Any]] = frozenset(
    {np.dtype(np.float32), *(np.dtype(t) for t in COMPACT_INTEGER_DTYPES)}
)


def compact_dtype(low: float, high: float, integral: bool) -> np.dtype[Any]:
    """The narrowest feature dtype holding every value in ``[low, high]`` exactly.

    One of :data:`COMPACT_INTEGER_DTYPES` when every value is an integer
    (``integral``) within its range, else float32 (what every feature is
    converted to for training anyway).
    """
    if integral:
        for candidate in COMPACT_INTEGER_DTYPES:
            info = np.iinfo(candidate)
            if info.min <= low and high <= info.max:
                return np.dtype(candidate)
    return np.dtype(np.float32)


def label_dtype(high: int) -> np.dtype[Any]:
    """The narrowest unsigned dtype holding labels ``0..high`` (for storage only)."""
    for candidate in (np.uint8, np.uint16, np.uint32):
        if high <= np.iinfo(candidate).max:
            return np.dtype(candidate)
    return np.dtype(np.int64)


def _all_finite(x: np.ndarray) -> bool:
    """Whether every value of ``x`` is finite, checked a chunk of rows at a time."""
    if np.issubdtype(x.dtype, np.integer):
        return True
    return all(bool(np.isfinite(x[s : s + CHUNK_ROWS]).all()) for s in range(0, len(x), CHUNK_ROWS))


@dataclass(frozen=True, slots=True, eq=False)
class FeatureBounds:
    """Public bounds ``[low, high]`` of each feature: declared by the data's owner or published.

    Never learned from private records: scaling by them (:meth:`Standardizer.from_bounds`)
    releases nothing about any record, which is what record-level DP needs
    (fitting a mean and spread on the records is itself a release the
    DP-SGD accountant does not cover). One pair stands for every feature
    (``low`` and ``high`` of length 1); otherwise one pair per feature.

    Raises
    ------
    DataError
        Bounds that are not finite, of unequal length or empty, or a ``low``
        above its ``high``.
    """

    low: np.ndarray
    high: np.ndarray

    def __post_init__(self) -> None:
        low = np.asarray(self.low, dtype=np.float64).reshape(-1)
        high = np.asarray(self.high, dtype=np.float64).reshape(-1)
        if low.shape != high.shape or low.size == 0:
            raise DataError("feature bounds need one low and one high value per feature")
        if not (np.isfinite(low).all() and np.isfinite(high).all()):
            raise DataError("feature bounds must be finite numbers")
        if (low > high).any():
            at = int(np.argmax(low > high))
            raise DataError(f"feature bound {at}: low {low[at]:g} is above high {high[at]:g}")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    @classmethod
    def uniform(cls, low: float, high: float) -> FeatureBounds:
        """The same bounds for every feature."""
        return cls(np.array([low]), np.array([high]))

    @classmethod
    def parse(cls, text: str) -> FeatureBounds:
        """Bounds from ``LOW:HIGH`` (every feature) or ``L1:H1,L2:H2,...`` (one pair per feature).

        Raises
        ------
        DataError
            Text of another shape, or bounds :class:`FeatureBounds` refuses.
        """
        pairs = [p.strip() for p in text.replace("\n", ",").split(",") if p.strip()]
        lows, highs = [], []
        for pair in pairs:
            parts = pair.split(":")
            if len(parts) != 2:
                raise DataError(f"feature bounds: {pair!r} is not LOW:HIGH")
            try:
                lows.append(float(parts[0]))
                highs.append(float(parts[1]))
            except ValueError:
                raise DataError(f"feature bounds: {pair!r} is not LOW:HIGH") from None
        if not pairs:
            raise DataError("feature bounds: none given (LOW:HIGH, or one LOW:HIGH per feature)")
        return cls(np.array(lows), np.array(highs))

    def text(self) -> str:
        """The canonical ``LOW:HIGH[,...]`` form :meth:`parse` reads back exactly."""
        pairs = zip(self.low.tolist(), self.high.tolist(), strict=True)
        return ",".join(f"{lo!r}:{hi!r}" for lo, hi in pairs)

    def for_features(self, num_features: int) -> tuple[np.ndarray, np.ndarray]:
        """``(low, high)`` for each of ``num_features`` features.

        Raises
        ------
        DataError
            Per-feature bounds for another number of features.
        """
        if self.low.size == 1:
            return np.full(num_features, self.low[0]), np.full(num_features, self.high[0])
        if self.low.size != num_features:
            raise DataError(
                f"feature bounds are given for {self.low.size} features, the data has {num_features}"
            )
        return self.low, self.high


# The per-feature ranges scikit-learn's breast_cancer documentation publishes (the
# "Min"/"Max" table of ``load_breast_cancer().DESCR``, in feature order): public
# facts about the published dataset, which the built-in simulations may scale by.
# fmt: off
BREAST_CANCER_BOUNDS = FeatureBounds(
    np.array(
        [6.981, 9.71, 43.79, 143.5, 0.053, 0.019, 0.0, 0.0, 0.106, 0.05,
         0.112, 0.36, 0.757, 6.802, 0.002, 0.002, 0.0, 0.0, 0.008, 0.001,
         7.93, 12.02, 50.41, 185.2, 0.071, 0.027, 0.0, 0.0, 0.156, 0.055]
    ),
    np.array(
        [28.11, 39.28, 188.5, 2501.0, 0.163, 0.345, 0.427, 0.201, 0.304, 0.097,
         2.873, 4.885, 21.98, 542.2, 0.031, 0.135, 0.396, 0.053, 0.079, 0.03,
         36.04, 49.54, 251.2, 4254.0, 0.223, 1.058, 1.252, 0.291, 0.664, 0.208]
    ),
)
# fmt: on


@dataclass(frozen=True, slots=True, eq=False)
class Dataset:
    """Examples ``x`` (shape ``(n, features)``) and labels ``y`` (int64).

    ``x`` is float32, or one of :data:`COMPACT_INTEGER_DTYPES` when every
    value is an integer in its range (a site file's grey levels); it may be a
    read-only memory map (:mod:`common.data_cache`). :class:`Examples` turns
    rows into scaled float32 a batch at a time.

    ``image_shape`` is the ``(C, H, W)`` view of one example when the data are
    images (digits: ``(1, 8, 8)``), else ``None``.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str
    image_shape: tuple[int, int, int] | None = None
    feature_bounds: FeatureBounds | None = None  # public per-feature bounds, if published

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise DataError(f"{self.name}: x must be (n, features) and y (n,) with equal n")
        if len(self.y) == 0:
            raise DataError(f"{self.name}: the dataset is empty")
        if self.x.dtype not in FEATURE_DTYPES:
            raise DataError(f"{self.name}: features must be float32 or a compact integer dtype")
        if not _all_finite(self.x):
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
            self.feature_bounds,
        )


# ---------------------------------------------------------------- the generated dataset

# ``synthetic``: scikit-learn's ``make_classification`` with these published settings and
# seed, so that it is the same public table everywhere (nothing downloaded, no run's seed
# in it) and large enough for federations of a thousand sites (1,000 sites x 100+
# training records at the default size, :data:`SYNTHETIC_DEFAULT_ROWS`).
SYNTHETIC_SEED = 15_000
SYNTHETIC_FEATURES = 20
SYNTHETIC_INFORMATIVE = 12
SYNTHETIC_CLASSES = 10
SYNTHETIC_CLASS_SEP = 1.5
SYNTHETIC_BOUND = 6.0
SYNTHETIC_DEFAULT_ROWS = 160_000
SYNTHETIC_MIN_ROWS = 2 * SYNTHETIC_CLASSES
SYNTHETIC_MAX_ROWS = 10_000_000
# The published range of every synthetic feature: values are clipped to it when the table
# is made, so scaling by it (record-level DP, :func:`scaler_for`) uses no one's records.
SYNTHETIC_BOUNDS = FeatureBounds.uniform(-SYNTHETIC_BOUND, SYNTHETIC_BOUND)


def check_synthetic_rows(rows: object) -> int:
    """``rows`` if it is a valid size of the synthetic dataset.

    Raises
    ------
    ConfigurationError
        Not an integer in ``[SYNTHETIC_MIN_ROWS, SYNTHETIC_MAX_ROWS]``.
    """
    if (
        isinstance(rows, bool)
        or not isinstance(rows, int)
        or not SYNTHETIC_MIN_ROWS <= rows <= SYNTHETIC_MAX_ROWS
    ):
        raise ConfigurationError(
            f"synthetic_rows must be an integer in [{SYNTHETIC_MIN_ROWS}, "
            f"{SYNTHETIC_MAX_ROWS}], got {rows!r}"
        )
    return rows


def make_synthetic(rows: int = SYNTHETIC_DEFAULT_ROWS) -> Dataset:
    """The generated ``synthetic`` dataset of ``rows`` rows (float32, 20 features, 10 classes).

    ``make_classification`` (Guyon 2003's design: Gaussian clusters on the
    vertices of a hypercube, plus noise features) with the module's published
    settings and :data:`SYNTHETIC_SEED`; a given ``rows`` always gives the
    same table. Every feature is clipped to ``[-SYNTHETIC_BOUND,
    SYNTHETIC_BOUND]`` (:data:`SYNTHETIC_BOUNDS`, declared as the dataset's
    published bounds, like digits' 0..16); the clip touches only the far
    tails of the Gaussians.

    Raises
    ------
    ConfigurationError
        ``rows`` outside :func:`check_synthetic_rows`' range.
    """
    from sklearn.datasets import make_classification
    from threadpoolctl import threadpool_limits

    # One BLAS thread: the same bits whatever the machine's thread count, and no stall of
    # OpenBLAS's thread pool in a thread of a process that also runs Ray (seen in the
    # ServerApp's thread, where the multi-threaded product did not finish for minutes).
    with threadpool_limits(limits=1, user_api="blas"):
        x, y = make_classification(
            n_samples=check_synthetic_rows(rows),
            n_features=SYNTHETIC_FEATURES,
            n_informative=SYNTHETIC_INFORMATIVE,
            n_redundant=0,
            n_classes=SYNTHETIC_CLASSES,
            n_clusters_per_class=1,
            class_sep=SYNTHETIC_CLASS_SEP,
            random_state=SYNTHETIC_SEED,
        )
    x = np.clip(x, -SYNTHETIC_BOUND, SYNTHETIC_BOUND).astype(np.float32)
    return Dataset(x, y.astype(np.int64), SYNTHETIC_CLASSES, "synthetic", None, SYNTHETIC_BOUNDS)


def load_builtin(name: str, *, synthetic_rows: int = SYNTHETIC_DEFAULT_ROWS) -> Dataset:
    """One of the built-in datasets (no network access): scikit-learn's bundled or generated.

    Loaded (or generated) once per process and shared: the arrays of the
    returned dataset are read-only, so every simulated site of a process
    can take views of them (:mod:`client.site`) instead of copies.
    ``synthetic_rows`` is the size of ``synthetic`` (:func:`make_synthetic`)
    and ignored for the others.
    """
    if name not in BUILTIN_DATASETS:
        raise DataError(
            f"unknown built-in dataset {name!r}; choose one of {', '.join(BUILTIN_DATASETS)}"
        )
    return _load_builtin(name, synthetic_rows if name == "synthetic" else 0)


@functools.lru_cache(maxsize=4)
def _load_builtin(name: str, synthetic_rows: int) -> Dataset:
    data = make_synthetic(synthetic_rows) if name == "synthetic" else _load_bundled(name)
    data.x.setflags(write=False)
    data.y.setflags(write=False)
    return data


def _load_bundled(name: str) -> Dataset:
    from sklearn import datasets as skd

    if name == "digits":
        bunch = skd.load_digits()
        return Dataset(
            bunch.data.astype(np.float32),
            bunch.target.astype(np.int64),
            10,
            "digits",
            (1, 8, 8),
            FeatureBounds.uniform(0.0, 16.0),  # 4-bit grey levels: public, nobody's data
        )
    if name == "breast_cancer":
        bunch = skd.load_breast_cancer()
        return Dataset(
            bunch.data.astype(np.float32),
            bunch.target.astype(np.int64),
            2,
            "breast_cancer",
            feature_bounds=BREAST_CANCER_BOUNDS,
        )
    raise DataError(
        f"unknown built-in dataset {name!r}; choose one of {', '.join(BUILTIN_DATASETS)}"
    )


# ---------------------------------------------------------------- a site's own file


class FeatureSink(Protocol):
    """Where :func:`parse_site_file` puts the feature rows it has checked."""

    def write(self, block: np.ndarray) -> None:
        """Take the next ``(rows, features)`` float32 rows, in file order."""

    def reset(self) -> None:
        """Forget every row written so far (the parse starts again from the top)."""


@dataclass(frozen=True, slots=True, eq=False)
class ParsedSiteFile:
    """What :func:`parse_site_file` learnt about a file whose rows went to a sink.

    ``feature_dtype`` is the narrowest dtype that holds every feature value
    exactly (:func:`compact_dtype`); ``labels`` are int64, checked to lie in
    ``[0, num_classes)``.
    """

    rows: int
    num_features: int
    feature_dtype: np.dtype[Any]
    labels: np.ndarray


class _RestartExact(Exception):
    """The fast CSV reader met something only the exact reader may judge."""


def check_site_path(path: str | Path) -> Path:
    """``path`` as a :class:`Path` once it names a regular file of a supported type and size.

    Raises
    ------
    DataError
        Missing file, larger than :data:`MAX_SITE_FILE_BYTES`, or not ``.csv``/``.npz``.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"site data file not found: {p}")
    if p.stat().st_size > MAX_SITE_FILE_BYTES:
        raise DataError(f"{p}: larger than {MAX_SITE_FILE_BYTES} bytes")
    suffix = p.suffix.lower()
    if suffix not in SITE_FILE_SUFFIXES:
        raise DataError(f"{p}: unsupported file type {suffix!r} (use .csv or .npz)")
    return p


def parse_site_file(
    path: str | Path, *, num_classes: int, label_column: str, sink: FeatureSink
) -> ParsedSiteFile:
    """Parse and check a site's CSV (header row) or NPZ file, a block of rows at a time.

    CSV: one header row; the column named ``label_column`` holds integer class
    labels in ``[0, num_classes)``; every other column is a numeric feature.
    NPZ: arrays ``x`` (n, features) and ``y`` (n,), or feature arrays plus an
    array named ``label_column``.

    Feature rows go to ``sink`` as float32 blocks; memory stays bounded by a
    block (plus one int64 label per row, and for NPZ the arrays themselves).
    CSV blocks are read by pandas' C reader when it is installed; anything it
    cannot read exactly like Python's ``float`` (a short or long row, a blank
    or non-numeric cell, a decoding error) makes the parse start again with
    the standard ``csv`` reader, whose errors name the line.

    Raises
    ------
    DataError
        Missing or unreadable file, missing label column, non-numeric or
        non-finite values, labels out of range, or no rows (one line, naming the file).
    """
    p = check_site_path(path)
    if p.suffix.lower() == ".npz":
        return _consume(p, _npz_blocks(p, label_column), num_classes, label_column, sink)
    label_at, columns = _csv_header(p, label_column)
    try:
        return _consume(p, _fast_csv_blocks(p, label_at, columns), num_classes, label_column, sink)
    except _RestartExact:
        sink.reset()
    return _consume(p, _exact_csv_blocks(p, label_at, columns), num_classes, label_column, sink)


def _consume(
    path: Path,
    blocks: Iterator[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    label_column: str,
    sink: FeatureSink,
) -> ParsedSiteFile:
    """Check every ``(features, labels)`` block, hand the features on, keep the labels."""
    rows, num_features = 0, 0
    low, high, integral = math.inf, -math.inf, True
    label_low, label_high = math.inf, -math.inf
    labels: list[np.ndarray] = []
    for x_block, y_block in blocks:
        x = np.ascontiguousarray(x_block, dtype=np.float32)
        if not np.isfinite(x).all():
            raise DataError(f"{path}: features contain NaN or infinite values")
        y = np.asarray(y_block, dtype=np.float64)
        if not np.isfinite(y).all() or not np.equal(np.mod(y, 1), 0).all():
            raise DataError(f"{path}: label column {label_column!r} must hold integers")
        if x.size:
            low, high = min(low, float(x.min())), max(high, float(x.max()))
            integral = integral and bool(np.equal(np.floor(x), x).all())
        label_low, label_high = min(label_low, float(y.min())), max(label_high, float(y.max()))
        num_features = x.shape[1]
        rows += len(x)
        sink.write(x)
        labels.append(y.astype(np.int64))  # a copy: a view would keep the whole block alive
    if rows == 0:
        raise DataError(f"{path}: no data rows")
    if label_low < 0 or label_high >= num_classes:
        raise DataError(
            f"{path}: labels must lie in [0, {num_classes}), "
            f"found {int(label_low)}..{int(label_high)}"
        )
    y_all = np.concatenate(labels)
    return ParsedSiteFile(rows, num_features, compact_dtype(low, high, integral), y_all)


def _csv_header(path: Path, label_column: str) -> tuple[int, int]:
    """The label column's position and the number of columns, from the header row."""
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), None)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text CSV file") from exc
    if header is None:
        raise DataError(f"{path}: empty file")
    header = [h.strip() for h in header]
    if label_column not in header:
        raise DataError(
            f"{path}: no label column {label_column!r} (columns: {', '.join(header[:10])})"
        )
    if len(header) < 2:
        raise DataError(f"{path}: needs at least one feature column besides {label_column!r}")
    return header.index(label_column), len(header)


def _split_label(values: np.ndarray, label_at: int) -> tuple[np.ndarray, np.ndarray]:
    return np.delete(values, label_at, axis=1), values[:, label_at]


def _fast_csv_blocks(
    path: Path, label_at: int, columns: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Blocks read by pandas' C reader; :class:`_RestartExact` on anything it may misread.

    A short row comes back padded with NaN and a blank cell as NaN, so any
    NaN sends the file to the exact reader (which also rejects ``nan`` cells).
    """
    try:
        import pandas as pd
    except ImportError:
        raise _RestartExact from None
    try:
        with pd.read_csv(
            path,
            skiprows=1,
            header=None,
            dtype=np.float64,
            chunksize=BLOCK_ROWS,
            encoding="utf-8",
            engine="c",
        ) as reader:
            for frame in reader:
                values = frame.to_numpy(dtype=np.float64)
                if values.shape[1] != columns or np.isnan(values).any():
                    raise _RestartExact
                yield _split_label(values, label_at)
    except ValueError:  # pandas' ParserError, EmptyDataError, a bad cell, UnicodeDecodeError
        raise _RestartExact from None


def _exact_csv_blocks(
    path: Path, label_at: int, columns: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Blocks read by the standard ``csv`` module and ``float``; errors name the line."""
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            next(reader, None)
            rows: list[list[float]] = []
            for line_no, row in enumerate(reader, start=2):
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != columns:
                    raise DataError(
                        f"{path}:{line_no}: expected {columns} values, found {len(row)}"
                    )
                try:
                    rows.append([float(c) for c in row])
                except ValueError:
                    bad = next(c for c in row if not _is_float(c))
                    raise DataError(f"{path}:{line_no}: non-numeric value {bad!r}") from None
                if len(rows) == BLOCK_ROWS:
                    yield _split_label(np.asarray(rows, dtype=np.float64), label_at)
                    rows = []
            if rows:
                yield _split_label(np.asarray(rows, dtype=np.float64), label_at)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text CSV file") from exc


def _npz_blocks(path: Path, label_column: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
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
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: not a readable NPZ file ({exc})") from exc
    if not np.issubdtype(x.dtype, np.number) or not np.issubdtype(y.dtype, np.number):
        raise DataError(f"{path}: arrays must be numeric")
    if x.ndim == 1:
        x = x.reshape(-1, 1)
    x = x.reshape(len(x), -1)
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{path}: labels must be one value per row ({len(x)} rows)")
    for start in range(0, len(x), BLOCK_ROWS):
        yield x[start : start + BLOCK_ROWS], y[start : start + BLOCK_ROWS]


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class _MemorySink:
    """Feature blocks kept in memory (a site file loaded without a cache)."""

    def __init__(self) -> None:
        self.blocks: list[np.ndarray] = []

    def write(self, block: np.ndarray) -> None:
        self.blocks.append(block)

    def reset(self) -> None:
        self.blocks = []


def load_site_file(path: str | Path, *, num_classes: int, label_column: str = "label") -> Dataset:
    """Load a site's own data from a CSV (header row) or NPZ file, into memory.

    The format and checks are :func:`parse_site_file`'s; features come back in
    their compact dtype (:func:`compact_dtype`). A site with a state
    directory uses :func:`common.data_cache.load_site_file_cached` instead,
    which parses once and maps the result.

    Raises
    ------
    DataError
        As :func:`parse_site_file`.
    """
    p = Path(path)
    sink = _MemorySink()
    parsed = parse_site_file(p, num_classes=num_classes, label_column=label_column, sink=sink)
    x = np.empty((parsed.rows, parsed.num_features), dtype=parsed.feature_dtype)
    at = 0
    for block in sink.blocks:
        x[at : at + len(block)] = block
        at += len(block)
    return Dataset(x, parsed.labels, num_classes, p.name)


# ---------------------------------------------------------------- preprocessing


@dataclass(frozen=True, slots=True)
class Standardizer:
    """Per-feature ``(x - mean) / scale``: fitted on one party's own training data, or
    taken from public bounds (``public``: then it depends on no one's records)."""

    mean: np.ndarray
    scale: np.ndarray
    public: bool = False

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        *,
        min_scale: float = 1e-6,
        index: np.ndarray | None = None,
        chunk_rows: int = CHUNK_ROWS,
    ) -> Standardizer:
        """Mean and spread of the rows ``index`` of ``x`` (all rows by default).

        Rows are converted to float32 ``chunk_rows`` at a time and the chunks'
        moments combined in float64 (Chan, Golub & LeVeque 1979), so ``x`` may
        be a compact or memory-mapped array of any size; with a single chunk
        the result is exactly ``x.mean(0)``, ``x.std(0)`` of the float32 rows.
        """
        rows = len(x) if index is None else len(index)
        if rows == 0:
            raise DataError("cannot fit a standardiser on no examples")
        count = 0
        mean = np.zeros(x.shape[1], np.float64)
        m2 = np.zeros(x.shape[1], np.float64)
        for start in range(0, rows, chunk_rows):
            sel = slice(start, start + chunk_rows)
            chunk = np.asarray(x[sel] if index is None else x[index[sel]], dtype=np.float32)
            n = len(chunk)
            chunk_mean = chunk.mean(axis=0).astype(np.float64)
            chunk_m2 = chunk.std(axis=0).astype(np.float64) ** 2 * n
            total = count + n
            delta = chunk_mean - mean
            mean = mean + delta * (n / total)
            m2 = m2 + chunk_m2 + delta**2 * (count * n / total)
            count = total
        std = np.sqrt(m2 / count)
        return cls(mean.astype(np.float32), np.maximum(std, min_scale).astype(np.float32))

    @classmethod
    def from_bounds(cls, bounds: FeatureBounds, num_features: int) -> Standardizer:
        """Map each feature's public range ``[low, high]`` to ``[-1, 1]``: depends on no one's data.

        Raises
        ------
        DataError
            Per-feature bounds for another number of features.
        """
        low, high = bounds.for_features(num_features)
        mid, half = (low + high) / 2.0, np.maximum((high - low) / 2.0, 1e-6)
        return cls(mid.astype(np.float32), half.astype(np.float32), public=True)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``(x - mean) / scale`` as float32 (``x`` float32 or a compact integer dtype)."""
        if x.shape[1:] != self.mean.shape:
            raise DataError(f"expected {self.mean.shape[0]} features, got {x.shape[1:]}")
        scaled: np.ndarray = ((x - self.mean) / self.scale).astype(np.float32)
        return scaled


PRIVATE_SCALING_REFUSED = (
    "under record-level DP the features need public bounds: declare them "
    "(`fedseal-client start --feature-bounds LOW:HIGH`, node config 'feature-bounds'), "
    "or let the site policy allow standardising on the site's own records "
    "(privacy.allow_private_scaling = true, a release outside the accountant)"
)


def scaler_for(
    data: Dataset,
    *,
    private: bool,
    index: np.ndarray | None = None,
    bounds: FeatureBounds | None = None,
    allow_private_fit: bool = False,
) -> Standardizer:
    """The feature scaling a party applies to its own data (its rows ``index``, default all).

    Declared ``bounds`` (the site's own, public) are always used. Under
    record-level DP (``private``) the dataset's published bounds are used
    next; fitting a mean and spread on private records is a release about
    them that the DP-SGD accountant does not cover, so it happens under DP
    only with ``allow_private_fit`` (the site policy's explicit consent,
    which the run's privacy block then reports). Without DP the party fits
    on its own rows.

    Raises
    ------
    ConfigurationError
        Under DP without public bounds and without ``allow_private_fit``.
    DataError
        Bounds for another number of features.
    """
    chosen = bounds or (data.feature_bounds if private else None)
    if chosen is not None:
        return Standardizer.from_bounds(chosen, data.num_features)
    if private and not allow_private_fit:
        raise ConfigurationError(PRIVATE_SCALING_REFUSED)
    return Standardizer.fit(data.x, index=index)


@dataclass(frozen=True, slots=True, eq=False)
class Examples:
    """The rows ``index`` of ``data`` as a model sees them, a batch at a time.

    Each batch is gathered from ``data.x`` (compact, possibly memory-mapped),
    scaled to float32 by ``scaler`` and shaped ``input_shape``; nothing holds
    a float copy of the whole split unless :meth:`features` is asked for.
    """

    data: Dataset
    index: np.ndarray
    scaler: Standardizer
    input_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.index.ndim != 1 or not np.issubdtype(self.index.dtype, np.integer):
            raise DataError(f"{self.data.name}: row index must be a 1-d integer array")
        if len(self.index) and (self.index.min() < 0 or self.index.max() >= len(self.data)):
            raise DataError(f"{self.data.name}: row index outside the dataset")
        if math.prod(self.input_shape) != self.data.num_features:
            raise DataError(
                f"{self.data.name}: {self.data.num_features} features cannot take "
                f"the shape {self.input_shape}"
            )

    def __len__(self) -> int:
        return len(self.index)

    @property
    def y(self) -> np.ndarray:
        """The split's labels (int64, a copy)."""
        labels: np.ndarray = self.data.y[self.index]
        return labels

    def take(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The examples at ``positions`` (into this split): float32 inputs and int64 labels."""
        rows = self.index[positions]
        x = self.scaler.transform(np.asarray(self.data.x[rows]))
        return x.reshape((len(rows), *self.input_shape)), self.data.y[rows]

    def features(self) -> np.ndarray:
        """Every example of the split as float32, shaped (a copy: small splits, evaluation)."""
        out = np.empty((len(self), *self.input_shape), dtype=np.float32)
        for start in range(0, len(self), CHUNK_ROWS):
            out[start : start + CHUNK_ROWS] = self.take(
                np.arange(start, min(start + CHUNK_ROWS, len(self)))
            )[0]
        return out


def split_indices(
    n: int, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test row numbers of ``n`` examples (test ``ceil(n*fraction)``, at least 1).

    A single example stays in train (and the test part repeats it) so that
    tiny sites still train.
    """
    order = rng.permutation(n)
    if n < 2:
        every = np.arange(n)
        return every, every
    n_test = min(n - 1, max(1, math.ceil(n * test_fraction)))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def split_train_test(
    data: Dataset, test_fraction: float, rng: np.random.Generator
) -> tuple[Dataset, Dataset]:
    """Split ``data`` into train and test parts as :func:`split_indices` does (copies).

    Callers see the sizes in the returned datasets.
    """
    train, test = split_indices(len(data), test_fraction, rng)
    if len(data) < 2:
        return data, data
    return data.subset(train), data.subset(test)


def split_holdout_stratified(
    data: Dataset, test_fraction: float, seed: int
) -> tuple[Dataset, Dataset]:
    """The server's held-out split of an embedded dataset (stratified, reproducible).

    Simulated sites share only the first part; the second part is the server's
    own evaluation data.
    """
    pool, holdout = holdout_indices(data, test_fraction, seed)
    return data.subset(pool), data.subset(holdout)


def holdout_indices(
    data: Dataset, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The sorted row numbers of :func:`split_holdout_stratified`'s two parts (no copies)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(data))
    pool, holdout = train_test_split(
        idx, test_size=test_fraction, random_state=seed, stratify=data.y
    )
    return np.sort(pool), np.sort(holdout)
