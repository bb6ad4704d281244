"""Content-addressed artifacts: path layout, idempotent put, tamper and traversal refused."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from common.errors import DataError, IntegrityError, RecordError
from server.record.artifacts import ArtifactStore


def test_put_path_is_content_address(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    digest = store.put(b"model")
    assert digest == hashlib.sha256(b"model").hexdigest()
    assert store.path(digest) == tmp_path / "sha256" / digest[:2] / digest
    assert store.get(digest) == b"model"
    assert store.put(b"model") == digest
    assert [p.name for p in store.path(digest).parent.iterdir()] == [digest]  # no temp files


def test_put_replaces_corrupted_copy(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    digest = store.put(b"model")
    store.path(digest).write_bytes(b"junk")
    store.put(b"model")
    assert store.get(digest) == b"model"


def test_get_altered_artifact_raises_integrity_error(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    digest = store.put(b"model")
    store.path(digest).write_bytes(b"mode1")
    with pytest.raises(IntegrityError):
        store.get(digest)
    with pytest.raises(IntegrityError):
        store.export(digest, tmp_path / "out")


def test_get_missing_artifact_raises_record_error(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="missing"):
        ArtifactStore(tmp_path).get("0" * 64)


@pytest.mark.parametrize("digest", ["../../etc/passwd", "A" * 64, "0" * 63])
def test_path_non_digest_refused(tmp_path: Path, digest: str) -> None:
    with pytest.raises(DataError):
        ArtifactStore(tmp_path).path(digest)
