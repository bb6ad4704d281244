"""A site's parsed data file, kept on disk so that every later process maps it.

Flower's Deployment Engine starts a fresh ClientApp process for every
message, and a round takes several; parsing a large CSV in each would cost
its full parse every time. :func:`load_site_file_cached` parses the file
once (:func:`common.data.parse_site_file`, bounded memory) into a cache
entry and afterwards opens the entry with ``np.load(mmap_mode="r")``.

What it guarantees
------------------
- **Keyed by content.** An entry's name is a SHA-256 over the cache format
  version, the file type, the label column and the SHA-256 of the file's
  bytes; a changed file gets a new entry (the old ones for the same path are
  removed once the new one exists).
- **Never trusted silently.** ``meta.json`` records the shape and dtype of
  ``x.npy``/``y.npy`` and each file's size and SHA-256; every open checks all
  of them, and an entry that fails any check is discarded and rebuilt
  (logged as a warning). An entry appears under its name only complete: it
  is written in a temporary directory, synced, then renamed.
- **As checked as a fresh parse.** Entries hold only files that passed every
  check of :func:`~common.data.parse_site_file`; labels are checked against
  the run's ``num_classes`` on every open.
- **Private.** Entries are created 0700 with files 0600; the caller passes a
  cache root that is already private (the site's state directory).

Assumes a POSIX file system (``flock``, atomic ``rename``); one builder at a
time per cache root (an exclusive lock), others wait and then map its entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from common.data import (
    CHUNK_ROWS,
    FEATURE_DTYPES,
    Dataset,
    ParsedSiteFile,
    check_site_path,
    label_dtype,
    parse_site_file,
)
from common.errors import DataError

__all__ = ["CACHE_FORMAT", "file_sha256", "load_site_file_cached"]

CACHE_FORMAT = 1
META_FILE = "meta.json"
X_FILE = "x.npy"
Y_FILE = "y.npy"
LOCK_FILE = ".lock"
_RAW_FILE = "x.float32.partial"
_MAX_META_BYTES = 64 * 1024
_LABEL_DTYPES = frozenset(np.dtype(t) for t in (np.uint8, np.uint16, np.uint32, np.int64))
_READ_BYTES = 1 << 20

log = logging.getLogger(__name__)

Parser = Callable[..., ParsedSiteFile]


class _Invalid(Exception):
    """A cache entry that must not be used (why: the message)."""


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of the bytes of ``path`` (read a MiB at a time)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(_READ_BYTES), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(suffix: str, label_column: str, content_sha256: str) -> str:
    """The entry name for a file of type ``suffix`` with that content and label column."""
    material = "\0".join(
        ("fedseal-data-cache", str(CACHE_FORMAT), suffix, label_column, content_sha256)
    )
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def load_site_file_cached(
    path: str | Path,
    *,
    cache_root: Path,
    num_classes: int,
    label_column: str = "label",
    content_sha256: str | None = None,
    parse: Parser = parse_site_file,
) -> Dataset:
    """A site's file as a :class:`~common.data.Dataset` whose features are memory-mapped.

    Parameters
    ----------
    path
        The site's CSV or NPZ file (format of :func:`common.data.parse_site_file`).
    cache_root
        A private directory of the site's (created by the caller, 0700).
    num_classes, label_column
        As for :func:`common.data.parse_site_file`.
    content_sha256
        The file's SHA-256 when the caller has it already (it hashes the file
        for the dataset id); otherwise it is computed here.
    parse
        The parser used when the entry must be built.

    Raises
    ------
    DataError
        Everything :func:`~common.data.parse_site_file` raises; the file
        changed while it was parsed; the entry cannot be written.
    """
    p = check_site_path(path)
    digest = content_sha256 or file_sha256(p)
    key = cache_key(p.suffix.lower(), label_column, digest)
    entry = cache_root / key
    with contextlib.suppress(FileNotFoundError, _Invalid):
        return _open_entry(entry, key, digest, num_classes, p)
    with _locked(cache_root):
        try:
            return _open_entry(entry, key, digest, num_classes, p)  # built while we waited
        except FileNotFoundError:
            pass
        except _Invalid as exc:
            log.warning("site data cache %s is invalid (%s); rebuilding it", key, exc)
            _discard(entry)
        _remove_leftovers(cache_root)
        _build(p, cache_root, entry, key, digest, num_classes, label_column, parse)
        _prune(cache_root, keep=key, source=str(p.resolve()), label_column=label_column)
    try:
        return _open_entry(entry, key, digest, num_classes, p)
    except (FileNotFoundError, _Invalid) as exc:
        raise DataError(
            f"{p}: its data cache does not verify right after writing ({exc})"
        ) from None


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    try:
        fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise DataError(f"cannot write a data cache in {root}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------- opening


def _open_entry(entry: Path, key: str, digest: str, num_classes: int, source: Path) -> Dataset:
    """The entry's dataset once every recorded size, hash, shape and dtype matches.

    Raises FileNotFoundError when there is no entry, :class:`_Invalid` when it
    must not be used, DataError when its labels do not fit ``num_classes``.
    """
    if not entry.is_dir():
        raise FileNotFoundError(entry)
    meta = _read_meta(entry / META_FILE)
    if (meta["format"], meta["key"], meta["source_sha256"]) != (CACHE_FORMAT, key, digest):
        raise _Invalid("made for another file or format")
    for name in (X_FILE, Y_FILE):
        _verify_file(entry / name, meta["files"][name])
    rows, features = meta["rows"], meta["num_features"]
    try:
        x = np.load(entry / X_FILE, mmap_mode="r", allow_pickle=False)
        y = np.load(entry / Y_FILE, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise _Invalid(f"unreadable array: {exc}") from None
    if x.shape != (rows, features) or x.dtype.name != meta["x_dtype"] or not x.flags.c_contiguous:
        raise _Invalid("features differ from the recorded shape or dtype")
    if y.shape != (rows,) or y.dtype.name != meta["y_dtype"]:
        raise _Invalid("labels differ from the recorded shape or dtype")
    if int(y.max()) >= num_classes:
        raise DataError(
            f"{source}: labels must lie in [0, {num_classes}), found {int(y.min())}..{int(y.max())}"
        )
    return Dataset(x, y.astype(np.int64), num_classes, source.name)


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            raw = fh.read(_MAX_META_BYTES + 1)
    except FileNotFoundError:
        raise _Invalid("no meta.json (an unfinished entry)") from None
    if len(raw) > _MAX_META_BYTES:
        raise _Invalid("meta.json too large")
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _Invalid("meta.json is not JSON") from None
    if not isinstance(meta, dict):
        raise _Invalid("meta.json is not an object")
    for name in ("format", "rows", "num_features"):
        if not _is_count(meta.get(name)):
            raise _Invalid(f"meta.json field {name!r} is not a count")
    for name in ("key", "source_sha256", "x_dtype", "y_dtype", "label_column", "source"):
        if not isinstance(meta.get(name), str):
            raise _Invalid(f"meta.json field {name!r} is not a string")
    if meta["x_dtype"] not in {d.name for d in FEATURE_DTYPES}:
        raise _Invalid("unknown feature dtype")
    if meta["y_dtype"] not in {d.name for d in _LABEL_DTYPES}:
        raise _Invalid("unknown label dtype")
    files = meta.get("files")
    if not isinstance(files, dict):
        raise _Invalid("meta.json has no files")
    for name in (X_FILE, Y_FILE):
        record = files.get(name)
        if (
            not isinstance(record, dict)
            or not _is_count(record.get("bytes"))
            or not isinstance(record.get("sha256"), str)
        ):
            raise _Invalid(f"meta.json does not describe {name}")
    return meta


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _verify_file(path: Path, record: dict[str, Any]) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise _Invalid(f"{path.name} is missing") from None
    if size != record["bytes"]:
        raise _Invalid(f"{path.name} has {size} bytes, {record['bytes']} recorded")
    if file_sha256(path) != record["sha256"]:
        raise _Invalid(f"{path.name} does not match its recorded SHA-256")


# ---------------------------------------------------------------- building


class _FileSink:
    """Checked float32 feature rows appended to a private file (never all in memory)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = os.fdopen(_create_private(path), "wb")

    def write(self, block: np.ndarray) -> None:
        self._fh.write(np.ascontiguousarray(block, dtype=np.float32).tobytes())

    def reset(self) -> None:
        self._fh.seek(0)
        self._fh.truncate()

    def close(self) -> None:
        self._fh.close()


def _create_private(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)


def _build(
    source: Path,
    root: Path,
    entry: Path,
    key: str,
    digest: str,
    num_classes: int,
    label_column: str,
    parse: Parser,
) -> None:
    work = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=root))  # mode 0700
    try:
        sink = _FileSink(work / _RAW_FILE)
        try:
            parsed = parse(source, num_classes=num_classes, label_column=label_column, sink=sink)
        finally:
            sink.close()
        if file_sha256(source) != digest:
            raise DataError(f"{source}: the file changed while it was being read; try again")
        x_record = _write_features(
            sink.path, work / X_FILE, parsed.rows, parsed.num_features, parsed.feature_dtype
        )
        os.unlink(sink.path)
        labels = parsed.labels.astype(label_dtype(int(parsed.labels.max())))
        buf = io.BytesIO()
        np.save(buf, labels, allow_pickle=False)
        y_record = _write_bytes(work / Y_FILE, buf.getvalue())
        meta = {
            "format": CACHE_FORMAT,
            "key": key,
            "source": str(source.resolve()),
            "source_sha256": digest,
            "label_column": label_column,
            "rows": parsed.rows,
            "num_features": parsed.num_features,
            "x_dtype": parsed.feature_dtype.name,
            "y_dtype": labels.dtype.name,
            "files": {X_FILE: x_record, Y_FILE: y_record},
        }
        _write_bytes(work / META_FILE, json.dumps(meta, indent=1, sort_keys=True).encode())
        _sync_dir(work)
        os.rename(work, entry)
        _sync_dir(root)
    except OSError as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise DataError(
            f"{source}: cannot write a data cache in {root}: {exc.strerror or exc}"
        ) from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _write_features(
    raw: Path, dest: Path, rows: int, features: int, dtype: np.dtype[Any]
) -> dict[str, Any]:
    """Write ``dest`` as a ``.npy`` of ``dtype`` from the raw float32 rows, a chunk at a time."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header,
        {
            "descr": np.lib.format.dtype_to_descr(dtype),
            "fortran_order": False,
            "shape": (rows, features),
        },
    )
    h = hashlib.sha256()
    size = 0
    with raw.open("rb") as src, os.fdopen(_create_private(dest), "wb") as out:
        for data in _chunks(header.getvalue(), src, CHUNK_ROWS * features * 4, dtype):
            out.write(data)
            h.update(data)
            size += len(data)
        out.flush()
        os.fsync(out.fileno())
    return {"bytes": size, "sha256": h.hexdigest()}


def _chunks(
    header: bytes, src: io.BufferedReader, chunk_bytes: int, dtype: np.dtype[Any]
) -> Iterator[bytes]:
    yield header
    for block in iter(lambda: src.read(chunk_bytes), b""):
        yield np.frombuffer(block, dtype=np.float32).astype(dtype).tobytes()


def _write_bytes(path: Path, data: bytes) -> dict[str, Any]:
    with os.fdopen(_create_private(path), "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- housekeeping


def _discard(entry: Path) -> None:
    """Move ``entry`` out of the way (atomically), then delete it."""
    trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=entry.parent))
    try:
        os.rename(entry, trash / entry.name)
    except FileNotFoundError:
        pass
    shutil.rmtree(trash, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    """Half-built or half-deleted entries of crashed processes (the lock is ours: none is live)."""
    for child in root.iterdir():
        if child.is_dir() and child.name.startswith((".build-", ".trash-")):
            shutil.rmtree(child, ignore_errors=True)


def _prune(root: Path, *, keep: str, source: str, label_column: str) -> None:
    """Remove the entries of older contents of the same file and label column."""
    for child in root.iterdir():
        if child.name == keep or child.name.startswith(".") or not child.is_dir():
            continue
        try:
            meta = _read_meta(child / META_FILE)
        except _Invalid:
            continue
        if meta["source"] == source and meta["label_column"] == label_column:
            _discard(child)
