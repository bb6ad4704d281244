"""A site's file parsed once into a private, content-keyed, verified cache (common.data_cache)."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from common.data import load_site_file, parse_site_file
from common.data_cache import META_FILE, X_FILE, Y_FILE, load_site_file_cached
from common.errors import DataError


class CountingParser:
    """The real parser, counted: the seam ``load_site_file_cached(parse=...)``."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, path, **kwargs):
        self.calls += 1
        return parse_site_file(path, **kwargs)


def write_csv(path: Path, x: np.ndarray, y: np.ndarray, fmt: str = "%d") -> Path:
    header = ",".join([f"f{i}" for i in range(x.shape[1])] + ["label"])
    np.savetxt(path, np.column_stack([x, y]), fmt=fmt, delimiter=",", header=header, comments="")
    return path


def digits_like(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 17, size=(n, 64)), rng.integers(0, 10, size=n)


@pytest.fixture
def cache_root(tmp_path: Path) -> Path:
    root = tmp_path / "state" / "data-cache"
    root.mkdir(parents=True, mode=0o700)
    return root


def entries(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_cached_load_second_load_maps_the_cache_without_parsing(tmp_path, cache_root):
    x, y = digits_like(500)
    src = write_csv(tmp_path / "site.csv", x, y)
    parser = CountingParser()
    first = load_site_file_cached(src, cache_root=cache_root, num_classes=10, parse=parser)
    second = load_site_file_cached(src, cache_root=cache_root, num_classes=10, parse=parser)
    assert parser.calls == 1
    assert isinstance(second.x, np.memmap) and not second.x.flags.writeable
    np.testing.assert_array_equal(first.x, second.x)
    assert len(entries(cache_root)) == 1


def test_cached_load_values_identical_to_an_independent_parse_and_dtype_compact(
    tmp_path, cache_root
):
    x, y = digits_like(300, seed=1)
    src = write_csv(tmp_path / "site.csv", x, y)
    reference = np.loadtxt(src, delimiter=",", skiprows=1)  # independent of fedseal's parser
    data = load_site_file_cached(src, cache_root=cache_root, num_classes=10)
    assert data.x.dtype == np.uint8 and data.y.dtype == np.int64
    np.testing.assert_array_equal(data.x.astype(np.float64), reference[:, :64])
    np.testing.assert_array_equal(data.y, reference[:, 64].astype(np.int64))


@pytest.mark.parametrize(
    "values,fmt,dtype",
    [
        (np.array([[-3, 100], [5, 7]]), "%d", np.int8),
        (np.array([[0, 300], [5, 7]]), "%d", np.uint16),
        (np.array([[-300, 3], [5, 7]]), "%d", np.int16),
        (np.array([[0, 70000], [5, 7]]), "%d", np.float32),
        (np.array([[0.5, 1.25], [5, 7]]), "%.2f", np.float32),
    ],
)
def test_cached_load_picks_the_narrowest_exact_dtype(tmp_path, cache_root, values, fmt, dtype):
    src = write_csv(tmp_path / "site.csv", values, np.array([0, 1]), fmt=fmt)
    data = load_site_file_cached(src, cache_root=cache_root, num_classes=2)
    assert data.x.dtype == dtype
    np.testing.assert_array_equal(data.x.astype(np.float64), values.astype(np.float64))


def test_cached_load_changed_file_gets_a_new_cache_and_the_old_one_goes(tmp_path, cache_root):
    x, y = digits_like(200)
    src = write_csv(tmp_path / "site.csv", x, y)
    parser = CountingParser()
    load_site_file_cached(src, cache_root=cache_root, num_classes=10, parse=parser)
    old = entries(cache_root)
    x2 = x.copy()
    x2[0, 0] = 16 - x2[0, 0] if x2[0, 0] != 8 else 0
    write_csv(src, x2, y)  # same name, same size class: only the content says it changed
    data = load_site_file_cached(src, cache_root=cache_root, num_classes=10, parse=parser)
    assert parser.calls == 2
    assert data.x[0, 0] == x2[0, 0]
    assert len(entries(cache_root)) == 1 and entries(cache_root) != old


@pytest.mark.parametrize(
    "damage",
    ["truncate-x", "flip-x", "drop-meta", "edit-meta-rows", "flip-y", "drop-y"],
)
def test_cached_load_corrupt_cache_is_detected_and_rebuilt(tmp_path, cache_root, damage):
    x, y = digits_like(400, seed=2)
    src = write_csv(tmp_path / "site.csv", x, y)
    parser = CountingParser()
    load_site_file_cached(src, cache_root=cache_root, num_classes=10, parse=parser)
    (entry,) = entries(cache_root)
    if damage == "truncate-x":
        with (entry / X_FILE).open("r+b") as fh:
            fh.truncate((entry / X_FILE).stat().st_size - 64)
    elif damage == "flip-x":
        raw = bytearray((entry / X_FILE).read_bytes())
        raw[-1] ^= 0x01
        (entry / X_FILE).write_bytes(bytes(raw))
    elif damage == "drop-meta":
        (entry / META_FILE).unlink()
    elif damage == "edit-meta-rows":
        meta = json.loads((entry / META_FILE).read_text())
        meta["rows"] -= 1
        (entry / META_FILE).write_text(json.dumps(meta))
    elif damage == "flip-y":
        raw = bytearray((entry / Y_FILE).read_bytes())
        raw[-1] ^= 0x01
        (entry / Y_FILE).write_bytes(bytes(raw))
    else:
        (entry / Y_FILE).unlink()
    data = load_site_file_cached(src, cache_root=cache_root, num_classes=10, parse=parser)
    assert parser.calls == 2
    np.testing.assert_array_equal(data.x, x.astype(np.uint8))
    np.testing.assert_array_equal(data.y, y)


def test_cached_load_entry_is_private(tmp_path, cache_root):
    x, y = digits_like(50)
    src = write_csv(tmp_path / "site.csv", x, y)
    load_site_file_cached(src, cache_root=cache_root, num_classes=10)
    (entry,) = entries(cache_root)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o700
    for name in (X_FILE, Y_FILE, META_FILE):
        assert stat.S_IMODE((entry / name).stat().st_mode) == 0o600
    leftovers = [p.name for p in cache_root.iterdir() if p.name.startswith((".build-", ".trash-"))]
    assert leftovers == []


@pytest.mark.parametrize(
    "text,match",
    [
        ("a,label\n1,0\nnan,1\n", "NaN"),
        ("a,label\n1,0\ninf,1\n", "NaN or infinite"),
        ("a,label\n1,0\nabc,1\n", r"site.csv:3: non-numeric value 'abc'"),
        ("a,label\n1,0\n2,1,7\n", r"site.csv:3: expected 2 values, found 3"),
        ("a,label\n1,0\n2\n", r"site.csv:3: expected 2 values, found 1"),
        ("a,label\n1,5\n", "labels must lie"),
        ("a,label\n1,0.5\n", "integers"),
        ("a,label\n", "no data rows"),
        ("a,target\n1,0\n", "no label column"),
    ],
)
def test_cached_load_invalid_file_raises_one_line_and_caches_nothing(
    tmp_path, cache_root, text, match
):
    src = tmp_path / "site.csv"
    src.write_text(text)
    with pytest.raises(DataError, match=match) as info:
        load_site_file_cached(src, cache_root=cache_root, num_classes=2)
    assert "\n" not in str(info.value)
    assert entries(cache_root) == []
    assert [p.name for p in cache_root.iterdir() if p.name.startswith(".build-")] == []


def test_cached_load_labels_checked_against_each_runs_classes(tmp_path, cache_root):
    src = write_csv(tmp_path / "site.csv", np.array([[1], [2], [3]]), np.array([0, 1, 4]))
    assert len(load_site_file_cached(src, cache_root=cache_root, num_classes=5)) == 3
    with pytest.raises(DataError, match=r"labels must lie in \[0, 3\), found 0..4"):
        load_site_file_cached(src, cache_root=cache_root, num_classes=3)


def test_cached_load_blank_and_quoted_rows_read_as_the_csv_module_does(tmp_path, cache_root):
    src = tmp_path / "site.csv"
    src.write_text('a,b,label\n1,2,0\n\n , ,\n"3",4.5,1\n')  # pandas cannot: the exact reader does
    data = load_site_file_cached(src, cache_root=cache_root, num_classes=2)
    assert data.x.tolist() == [[1.0, 2.0], [3.0, 4.5]] and data.y.tolist() == [0, 1]


def test_cached_load_npz_is_cached_too(tmp_path, cache_root):
    x, y = digits_like(100)
    src = tmp_path / "site.npz"
    np.savez(src, x=x, y=y)
    parser = CountingParser()
    first = load_site_file_cached(src, cache_root=cache_root, num_classes=10, parse=parser)
    again = load_site_file_cached(src, cache_root=cache_root, num_classes=10, parse=parser)
    assert parser.calls == 1 and first.x.dtype == np.uint8
    np.testing.assert_array_equal(again.x, x)


def test_cached_load_label_column_is_part_of_the_key(tmp_path, cache_root):
    src = tmp_path / "site.csv"
    src.write_text("a,label,other\n1,0,1\n2,1,0\n")
    a = load_site_file_cached(src, cache_root=cache_root, num_classes=2)
    b = load_site_file_cached(src, cache_root=cache_root, num_classes=2, label_column="other")
    assert a.y.tolist() == [0, 1] and b.y.tolist() == [1, 0]
    assert a.x[:, 0].tolist() == [1, 2] and b.x[:, 1].tolist() == [0, 1]
    assert len(entries(cache_root)) == 2


def test_cached_load_unwritable_cache_is_one_line_data_error(tmp_path, cache_root):
    if os.geteuid() == 0:
        pytest.skip("root writes through directory permissions")
    src = write_csv(tmp_path / "site.csv", *digits_like(10))
    cache_root.chmod(0o500)
    try:
        with pytest.raises(DataError, match="cannot write a data cache"):
            load_site_file_cached(src, cache_root=cache_root, num_classes=10)
    finally:
        cache_root.chmod(0o700)


def test_cached_load_not_utf8_is_one_line_data_error(tmp_path, cache_root):
    src = tmp_path / "site.csv"
    src.write_bytes(b"a,label\n1,0\n" + b"\xff\xfe,1\n")
    with pytest.raises(DataError, match="not a UTF-8 text CSV file"):
        load_site_file_cached(src, cache_root=cache_root, num_classes=2)
    assert entries(cache_root) == []


def test_parse_without_pandas_gives_the_same_arrays(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(20_000, 3)) * 1e3  # decimals: both readers must agree bit for bit
    src = write_csv(tmp_path / "site.csv", x, rng.integers(0, 2, size=20_000), fmt="%.9g")
    fast = load_site_file(src, num_classes=2)
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now raises ImportError
    exact = load_site_file(src, num_classes=2)
    assert fast.x.dtype == exact.x.dtype == np.float32
    np.testing.assert_array_equal(fast.x, exact.x)
    np.testing.assert_array_equal(fast.y, exact.y)
    reference = np.loadtxt(src, delimiter=",", skiprows=1)[:, :3].astype(np.float32)
    np.testing.assert_array_equal(exact.x, reference)
