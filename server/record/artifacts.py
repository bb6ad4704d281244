"""Content-addressed model artifacts: files named by the SHA-256 of their bytes.

Layout: ``<root>/sha256/<first two hex>/<all 64 hex>``. Files are written
atomically (temporary file in the same directory, fsync, ``os.replace``), so
a crash never leaves a half-written artifact under its final name. Every read
and export re-hashes the bytes and refuses a mismatch
(:class:`~common.errors.IntegrityError`): an artifact edited on disk is never
served as the model its record row describes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from common.audit.chain import is_hex_digest
from common.errors import DataError, IntegrityError, RecordError

__all__ = ["ArtifactStore", "sha256_hex"]


def sha256_hex(data: bytes) -> str:
    """SHA-256 of ``data`` as 64 lowercase hex characters."""
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ArtifactStore:
    """A directory of content-addressed blobs."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        """Where the artifact with this SHA-256 lives (raises :class:`DataError` on a bad digest)."""
        if not is_hex_digest(digest):
            raise DataError(f"not a SHA-256 hex digest: {digest!r}")
        return self.root / "sha256" / digest[:2] / digest

    def put(self, data: bytes) -> str:
        """Store ``data``; return its SHA-256. An existing intact copy is kept as is."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DataError("artifact data must be bytes")
        blob = bytes(data)
        digest = sha256_hex(blob)
        target = self.path(digest)
        if target.is_file() and sha256_hex(target.read_bytes()) == digest:
            return digest
        try:
            _write_atomic(target, blob)
        except OSError as exc:
            raise RecordError(f"cannot write artifact {target}: {exc.strerror}") from None
        return digest

    def get(self, digest: str) -> bytes:
        """The artifact's bytes, re-hashed.

        Raises
        ------
        RecordError
            If the file is missing or unreadable.
        IntegrityError
            If its contents no longer hash to ``digest``.
        """
        target = self.path(digest)
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            raise RecordError(f"artifact {digest} is missing from {self.root}") from None
        except OSError as exc:
            raise RecordError(f"cannot read artifact {target}: {exc.strerror}") from None
        if sha256_hex(data) != digest:
            raise IntegrityError(
                f"artifact {digest} was altered on disk: its contents hash differently"
            )
        return data

    def export(self, digest: str, dest: Path) -> Path:
        """Verify the artifact, then write it atomically to ``dest``."""
        data = self.get(digest)
        try:
            _write_atomic(Path(dest), data)
        except OSError as exc:
            raise RecordError(f"cannot write {dest}: {exc.strerror}") from None
        return Path(dest)
