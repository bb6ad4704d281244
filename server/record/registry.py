"""The model registry: versions of a run's global model, their tags, and their artifacts.

A version row names its artifact by SHA-256; the bytes live in the
content-addressed :class:`~server.record.artifacts.ArtifactStore`. The
artifact is written first (atomically, idempotent by hash), then the row and
its ``model_version_created`` event commit together, so a registered version
always has its bytes. A parent must be a version of the same run. Every read
of the bytes re-hashes them, so an artifact altered on disk is refused
(:class:`~common.errors.IntegrityError`), never served as the registered
model. Tags only accumulate (``model_version_tagged``); nothing is deleted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from sqlmodel import Session, col, select

from common.errors import ConfigurationError, DataError, RecordError
from server.record.artifacts import ArtifactStore
from server.record.audit_log import AuditLog
from server.record.db import Database
from server.record.runs import require_run
from server.record.schema import ModelVersionRow
from server.record.values import (
    ModelVersion,
    check_node_id,
    check_optional_finite,
    check_round,
    json_text,
    utc_now,
    version_from_row,
)

__all__ = ["Registry"]


class Registry:
    """The model versions of one record database and the store holding their bytes.

    Parameters
    ----------
    db
        The open record database.
    audit
        The audit log of the same database, which every change appends to.
    artifacts
        Where artifacts are stored; ``None`` if the record has no artifact
        directory (then storing or reading bytes raises
        :class:`~common.errors.ConfigurationError`).
    """

    def __init__(self, db: Database, audit: AuditLog, artifacts: ArtifactStore | None) -> None:
        self._db = db
        self._audit = audit
        self.artifacts = artifacts

    def _store(self) -> ArtifactStore:
        if self.artifacts is None:
            raise ConfigurationError("this record has no artifact directory; pass artifact_dir")
        return self.artifacts

    def add_model_version(
        self,
        run_id: str,
        round: int,
        parent: int | None,
        arrays_bytes: bytes,
        metrics: Mapping[str, object],
        record_level_epsilon: float | None,
        client_level_epsilon: float | None,
        energy_kwh: float | None,
        participants: Sequence[int],
        tags: Sequence[str] = (),
        *,
        actor: str = "server",
    ) -> ModelVersion:
        """Store a round's global model content-addressed and register its version.

        The artifact is written first (atomically, idempotent by hash); the
        version row and its ``model_version_created`` event then commit together.
        """
        rnd = check_round(round)
        eps_r = check_optional_finite("record_level_epsilon", record_level_epsilon)
        eps_c = check_optional_finite("client_level_epsilon", client_level_epsilon)
        kwh = check_optional_finite("energy_kwh", energy_kwh)
        members = [check_node_id(p) for p in participants]
        labels = [str(t) for t in tags]
        metrics_json = json_text(dict(metrics))
        digest = self._store().put(arrays_bytes)
        size = len(arrays_bytes)
        when = utc_now()

        def work(session: Session) -> ModelVersion:
            require_run(session, run_id)
            if parent is not None:
                prow = session.get(ModelVersionRow, parent)
                if prow is None or prow.run_id != run_id:
                    raise RecordError(f"parent version {parent} is not a version of run {run_id}")
            row = ModelVersionRow(
                run_id=run_id,
                round=rnd,
                parent=parent,
                sha256=digest,
                size_bytes=size,
                created_at=when,
                metrics_json=metrics_json,
                record_level_epsilon=eps_r,
                client_level_epsilon=eps_c,
                energy_kwh=kwh,
                participants_json=json_text(members),
                tags_json=json_text(labels),
            )
            session.add(row)
            session.flush()
            version = version_from_row(row)
            payload = version.to_dict()
            payload["participants"] = members
            self._audit.append(session, run_id, "model_version_created", actor, payload)
            return version

        return self._db.write(work)

    def get_version(self, version: int) -> ModelVersion:
        """One model version (raises :class:`RecordError` if unknown)."""
        row = self._db.read(lambda s: s.get(ModelVersionRow, version))
        if row is None:
            raise RecordError(f"no model version {version} in the record")
        return version_from_row(row)

    def list_versions(self, run_id: str | None = None) -> list[ModelVersion]:
        """Model versions in version order (all, or one run's)."""

        def work(session: Session) -> list[ModelVersionRow]:
            query = select(ModelVersionRow).order_by(col(ModelVersionRow.version))
            if run_id is not None:
                query = query.where(ModelVersionRow.run_id == run_id)
            return list(session.exec(query).all())

        return [version_from_row(r) for r in self._db.read(work)]

    def latest_version(self, run_id: str) -> ModelVersion | None:
        """The run's version with the highest round, or ``None``."""
        versions = self.list_versions(run_id)
        return max(versions, key=lambda v: v.round) if versions else None

    def tag_version(self, version: int, tag: str, *, actor: str = "server") -> ModelVersion:
        """Add a tag to a version (idempotent) and append ``model_version_tagged``."""
        if not isinstance(tag, str) or not tag.strip() or len(tag) > 64:
            raise DataError("a tag is a non-empty string of at most 64 characters")

        def work(session: Session) -> ModelVersion:
            row = session.get(ModelVersionRow, version)
            if row is None:
                raise RecordError(f"no model version {version} in the record")
            tags = list(json.loads(row.tags_json))
            if tag not in tags:
                tags.append(tag)
                row.tags_json = json_text(tags)
                session.add(row)
                self._audit.append(
                    session,
                    row.run_id,
                    "model_version_tagged",
                    actor,
                    {"version": version, "tag": tag},
                )
            return version_from_row(row)

        return self._db.write(work)

    def load_version_bytes(self, version: int) -> bytes:
        """The version's artifact, re-hashed (raises :class:`IntegrityError` on a mismatch)."""
        return self._store().get(self.get_version(version).sha256)

    def export_version(self, version: int, dest: Path) -> Path:
        """Write the version's artifact to ``dest`` after verifying its SHA-256.

        Raises
        ------
        IntegrityError
            If the stored artifact no longer hashes to the registered digest.
        """
        return self._store().export(self.get_version(version).sha256, dest)
