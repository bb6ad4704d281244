"""``SqlRecord``: the central record over any SQLAlchemy database, one front over its parts.

One object per database: runs, rounds, nodes (:mod:`server.record.runs`),
privacy spend and energy (:mod:`server.record.spend`), the model registry
(:mod:`server.record.registry`; rows here, bytes in a content-addressed
:class:`~server.record.artifacts.ArtifactStore`) and the audit chain
(:mod:`server.record.audit_log`, over :mod:`common.audit`), all sharing one
:class:`~server.record.db.Database`. Every write that matters to an auditor
appends its audit event *in the same transaction* as the row it describes,
so the record and its log cannot disagree; appends serialise on the audit
lock, so concurrent writers never fork the chain.

This front only opens the database and forwards each operation of
:class:`~server.record.protocol.Record` to the part that keeps it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.audit.chain import AuditEvent
from common.audit.seal import KeySchedule, SignedHead, VerifyReport
from server.record.artifacts import ArtifactStore
from server.record.audit_log import AuditLog
from server.record.db import Database, locate
from server.record.registry import Registry
from server.record.runs import Runs
from server.record.spend import Spend
from server.record.values import (
    EnergyEntry,
    ModelVersion,
    NodeEntry,
    PrivacyEntry,
    RoundInfo,
    RunInfo,
)

__all__ = ["SqlRecord"]


class SqlRecord:
    """The central record in one SQL database (SQLite file by default, PostgreSQL via psycopg).

    Parameters
    ----------
    url
        A SQLAlchemy URL, or a bare file path meaning a SQLite file.
        ``postgresql://`` is read as ``postgresql+psycopg://``.
    artifact_dir
        Where model artifacts are stored. Defaults to ``artifacts/`` next to
        a SQLite file; required for other databases if models are stored.
    create
        Create the file and schema if absent (``False`` for read-only tools
        such as ``audit verify``, which must not conjure an empty record).

    Raises
    ------
    RecordError
        Bad URL, missing driver, unreachable server, missing database (with
        ``create=False``), a database that is not a fedseal record, or one
        whose schema version is newer than this code's.
    """

    def __init__(self, url: str, artifact_dir: Path | None = None, *, create: bool = True) -> None:
        where = locate(url, create=create)
        self.url = where.url
        if artifact_dir is None and where.file is not None:
            artifact_dir = where.file.parent / "artifacts"
        artifacts = ArtifactStore(artifact_dir) if artifact_dir is not None else None
        self._db = Database(where, create=create)
        self.engine = self._db.engine
        self.record_id = self._db.record_id
        self._audit = AuditLog(self._db)
        self._runs = Runs(self._db, self._audit)
        self._spend = Spend(self._db, self._audit)
        self._registry = Registry(self._db, self._audit, artifacts)

    @property
    def artifacts(self) -> ArtifactStore | None:
        """The model artifact store (``None``: this record has no artifact directory)."""
        return self._registry.artifacts

    @artifacts.setter
    def artifacts(self, store: ArtifactStore | None) -> None:
        self._registry.artifacts = store

    # -- lifetime ------------------------------------------------------------

    def close(self) -> None:
        """Release the database connections."""
        self._db.close()

    def __enter__(self) -> SqlRecord:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- audit log (server.record.audit_log) --------------------------------

    def append_event(
        self, run_id: str | None, kind: str, actor: str, payload: Mapping[str, object]
    ) -> AuditEvent:
        """Append one audit event (:meth:`AuditLog.append_event`)."""
        return self._audit.append_event(run_id, kind, actor, payload)

    def events(self, run_id: str | None = None) -> list[AuditEvent]:
        """Audit events in seq order (:meth:`AuditLog.events`)."""
        return self._audit.events(run_id)

    def seals(self) -> list[SignedHead]:
        """Signed heads in the order made (:meth:`AuditLog.seals`)."""
        return self._audit.seals()

    def latest_seal(self) -> SignedHead | None:
        """The newest signed head (:meth:`AuditLog.latest_seal`)."""
        return self._audit.latest_seal()

    def seal(self, signing_key: Ed25519PrivateKey) -> SignedHead:
        """Sign and store the current head (:meth:`AuditLog.seal`)."""
        return self._audit.seal(signing_key)

    def stored_public_keys(self) -> list[str]:
        """Distinct public keys of the seals (:meth:`AuditLog.stored_public_keys`)."""
        return self._audit.stored_public_keys()

    def append_sealed(
        self,
        run_id: str | None,
        kind: str,
        actor: str,
        payload: Mapping[str, object],
        signing_key: Ed25519PrivateKey,
    ) -> tuple[AuditEvent, SignedHead]:
        """Append one event and seal it in one transaction (:meth:`AuditLog.append_sealed`)."""
        return self._audit.append_sealed(run_id, kind, actor, payload, signing_key)

    def stored_key_schedule(self) -> KeySchedule | None:
        """The key history the record tells (:meth:`AuditLog.stored_key_schedule`)."""
        return self._audit.stored_key_schedule()

    def rotate_key(
        self, retiring_key: Ed25519PrivateKey, new_key: Ed25519PublicKey, actor: str = "operator"
    ) -> tuple[AuditEvent, SignedHead]:
        """Append ``key_rotated`` sealed by the retiring key (:meth:`AuditLog.rotate_key`)."""
        return self._audit.rotate_key(retiring_key, new_key, actor)

    def verify(self, public_key: Ed25519PublicKey) -> VerifyReport:
        """Recompute the chain and check every seal against the trusted key (:meth:`AuditLog.verify`)."""
        return self._audit.verify(public_key)

    def verify_trusting_stored_key(self) -> VerifyReport:
        """Verify against the record's own copy of its key (:meth:`AuditLog.verify_trusting_stored_key`)."""
        return self._audit.verify_trusting_stored_key()

    def export_jsonl(self, out: TextIO) -> int:
        """Write the JSON-lines export (:meth:`AuditLog.export_jsonl`)."""
        return self._audit.export_jsonl(out)

    def export_csv(self, out: TextIO) -> int:
        """Write events as CSV (:meth:`AuditLog.export_csv`)."""
        return self._audit.export_csv(out)

    def iter_export_lines(self) -> Iterator[str]:
        """The JSON-lines export as lines (:meth:`AuditLog.iter_export_lines`)."""
        yield from self._audit.iter_export_lines()

    # -- runs, nodes, rounds (server.record.runs) ---------------------------

    def create_run(
        self,
        config: Mapping[str, object],
        *,
        run_id: str | None = None,
        policy_hash: str | None = None,
        app_hash: str | None = None,
        actor: str = "server",
    ) -> str:
        """Register a run and append ``run_started`` (:meth:`Runs.create_run`)."""
        return self._runs.create_run(
            config, run_id=run_id, policy_hash=policy_hash, app_hash=app_hash, actor=actor
        )

    def finish_run(
        self,
        run_id: str,
        status: str = "finished",
        reason: str | None = None,
        *,
        actor: str = "server",
    ) -> None:
        """Mark a run finished or aborted (:meth:`Runs.finish_run`)."""
        self._runs.finish_run(run_id, status, reason, actor=actor)

    def resume_run(self, run_id: str, *, actor: str = "server") -> ModelVersion | None:
        """Mark a run running again; its last model version (:meth:`Runs.resume_run`)."""
        return self._runs.resume_run(run_id, actor=actor)

    def get_run(self, run_id: str) -> RunInfo:
        """One run (:meth:`Runs.get_run`)."""
        return self._runs.get_run(run_id)

    def list_runs(self) -> list[RunInfo]:
        """All runs, oldest first (:meth:`Runs.list_runs`)."""
        return self._runs.list_runs()

    def record_node(
        self,
        run_id: str,
        node_id: int,
        admitted: bool,
        reason: str,
        *,
        name: str | None = None,
        actor: str = "server",
    ) -> NodeEntry:
        """Record an admission decision (:meth:`Runs.record_node`)."""
        return self._runs.record_node(run_id, node_id, admitted, reason, name=name, actor=actor)

    def record_nodes(
        self,
        run_id: str,
        node_ids: Sequence[int],
        admitted: bool,
        reason: str,
        *,
        name: str | None = None,
        actor: str = "server",
    ) -> list[NodeEntry]:
        """The same decision for many nodes, in one transaction (:meth:`Runs.record_nodes`)."""
        return self._runs.record_nodes(run_id, node_ids, admitted, reason, name=name, actor=actor)

    def nodes(self, run_id: str) -> list[NodeEntry]:
        """Admission decisions of a run (:meth:`Runs.nodes`)."""
        return self._runs.nodes(run_id)

    def start_round(
        self, run_id: str, round: int, cohort: Sequence[int], *, actor: str = "server"
    ) -> RoundInfo:
        """Open or restart a round (:meth:`Runs.start_round`)."""
        return self._runs.start_round(run_id, round, cohort, actor=actor)

    def finish_round(
        self, run_id: str, round: int, metrics: Mapping[str, object], *, actor: str = "server"
    ) -> RoundInfo:
        """Close a started round (:meth:`Runs.finish_round`)."""
        return self._runs.finish_round(run_id, round, metrics, actor=actor)

    def fail_round(
        self,
        run_id: str,
        round: int,
        reason: str,
        metrics: Mapping[str, object],
        *,
        actor: str = "server",
    ) -> RoundInfo:
        """Close a started round as failed (:meth:`Runs.fail_round`)."""
        return self._runs.fail_round(run_id, round, reason, metrics, actor=actor)

    def rounds(self, run_id: str) -> list[RoundInfo]:
        """A run's rounds in order (:meth:`Runs.rounds`)."""
        return self._runs.rounds(run_id)

    # -- privacy and energy (server.record.spend) ---------------------------

    def record_privacy(
        self,
        run_id: str,
        round: int,
        *,
        level: str,
        epsilon: float,
        delta: float,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        accountant: str = "rdp",
        node_id: int | None = None,
        actor: str = "server",
    ) -> PrivacyEntry:
        """Store one privacy spend (:meth:`Spend.record_privacy`)."""
        return self._spend.record_privacy(
            run_id,
            round,
            level=level,
            epsilon=epsilon,
            delta=delta,
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            node_id=node_id,
            actor=actor,
        )

    def privacy(self, run_id: str) -> list[PrivacyEntry]:
        """A run's privacy spends (:meth:`Spend.privacy`)."""
        return self._spend.privacy(run_id)

    def record_energy(
        self,
        run_id: str,
        round: int,
        node_id: int,
        energy_kwh: float,
        co2eq_g: float,
        estimated: bool,
        *,
        actor: str = "server",
    ) -> EnergyEntry:
        """Store one site's energy for one round (:meth:`Spend.record_energy`)."""
        return self._spend.record_energy(
            run_id, round, node_id, energy_kwh, co2eq_g, estimated, actor=actor
        )

    def energy(self, run_id: str) -> list[EnergyEntry]:
        """A run's energy reports (:meth:`Spend.energy`)."""
        return self._spend.energy(run_id)

    def energy_total_kwh(self, run_id: str, up_to_round: int | None = None) -> float:
        """Sum of a run's reported kWh (:meth:`Spend.energy_total_kwh`)."""
        return self._spend.energy_total_kwh(run_id, up_to_round)

    # -- model registry (server.record.registry) ----------------------------

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
        """Store a round's global model and register its version (:meth:`Registry.add_model_version`)."""
        return self._registry.add_model_version(
            run_id,
            round,
            parent,
            arrays_bytes,
            metrics,
            record_level_epsilon,
            client_level_epsilon,
            energy_kwh,
            participants,
            tags,
            actor=actor,
        )

    def get_version(self, version: int) -> ModelVersion:
        """One model version (:meth:`Registry.get_version`)."""
        return self._registry.get_version(version)

    def list_versions(self, run_id: str | None = None) -> list[ModelVersion]:
        """Model versions in version order (:meth:`Registry.list_versions`)."""
        return self._registry.list_versions(run_id)

    def latest_version(self, run_id: str) -> ModelVersion | None:
        """The run's version with the highest round (:meth:`Registry.latest_version`)."""
        return self._registry.latest_version(run_id)

    def tag_version(self, version: int, tag: str, *, actor: str = "server") -> ModelVersion:
        """Add a tag to a version (:meth:`Registry.tag_version`)."""
        return self._registry.tag_version(version, tag, actor=actor)

    def load_version_bytes(self, version: int) -> bytes:
        """The version's artifact, re-hashed (:meth:`Registry.load_version_bytes`)."""
        return self._registry.load_version_bytes(version)

    def export_version(self, version: int, dest: Path) -> Path:
        """Write the version's verified artifact to ``dest`` (:meth:`Registry.export_version`)."""
        return self._registry.export_version(version, dest)
