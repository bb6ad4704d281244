"""``Record``: the operations the rest of fedseal uses on the central record, as a protocol.

The server (``server.book``), its command line, its report and the
simulations depend on these operations only; :class:`~server.record.store.SqlRecord`
is the implementation (any SQLAlchemy database). The guarantees behind them
(every change appends its audit event in the same transaction, the log is
append-only and sealed, verification names the first bad seq) are stated
where they are kept: :mod:`server.record.audit_log`, :mod:`server.record.runs`,
:mod:`server.record.spend`, :mod:`server.record.registry`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol, Self, TextIO, runtime_checkable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.audit.chain import AuditEvent
from common.audit.seal import KeySchedule, SignedHead, VerifyReport
from server.record.values import (
    EnergyEntry,
    ModelVersion,
    NodeEntry,
    PrivacyEntry,
    RoundInfo,
    RunInfo,
)

__all__ = ["Record"]


@runtime_checkable
class Record(Protocol):
    """The central record: runs, rounds, nodes, spend, model registry and the sealed audit log."""

    @property
    def record_id(self) -> str:
        """The record's identity, fixed when its database was created; seals are bound to it."""
        ...

    # -- lifetime ------------------------------------------------------------

    def close(self) -> None:
        """Release the database connections."""
        ...

    def __enter__(self) -> Self:
        """The record itself, closed again by ``__exit__``."""
        ...

    def __exit__(self, *exc: object) -> None:
        """Close the record."""
        ...

    # -- audit log -----------------------------------------------------------

    def append_event(
        self, run_id: str | None, kind: str, actor: str, payload: Mapping[str, object]
    ) -> AuditEvent:
        """Append one audit event, linked to the current head atomically."""
        ...

    def events(self, run_id: str | None = None) -> list[AuditEvent]:
        """Audit events in seq order (all, or one run's)."""
        ...

    def seals(self) -> list[SignedHead]:
        """Signed heads in the order they were made."""
        ...

    def latest_seal(self) -> SignedHead | None:
        """The newest signed head, or ``None``."""
        ...

    def seal(self, signing_key: Ed25519PrivateKey) -> SignedHead:
        """Sign the current head with the server's key and store the seal."""
        ...

    def stored_public_keys(self) -> list[str]:
        """Distinct public keys (hex) the seals were made with, in first-use order."""
        ...

    def append_sealed(
        self,
        run_id: str | None,
        kind: str,
        actor: str,
        payload: Mapping[str, object],
        signing_key: Ed25519PrivateKey,
    ) -> tuple[AuditEvent, SignedHead]:
        """Append one event and seal it with ``signing_key`` in one transaction."""
        ...

    def stored_key_schedule(self) -> KeySchedule | None:
        """The key history as the record tells it (first seal's key and its rotations)."""
        ...

    def rotate_key(
        self, retiring_key: Ed25519PrivateKey, new_key: Ed25519PublicKey, actor: str = "operator"
    ) -> tuple[AuditEvent, SignedHead]:
        """Append ``key_rotated`` naming ``new_key``, sealed by the key in force, atomically."""
        ...

    def verify(self, public_key: Ed25519PublicKey) -> VerifyReport:
        """Recompute the chain and check every seal against the trusted key and its rotations."""
        ...

    def verify_trusting_stored_key(self) -> VerifyReport:
        """As :meth:`verify`, anchored on the record's own stored copy of its key."""
        ...

    def export_jsonl(self, out: TextIO) -> int:
        """Write the portable JSON-lines export; return the event count."""
        ...

    def export_csv(self, out: TextIO) -> int:
        """Write events as CSV; return the event count."""
        ...

    def iter_export_lines(self) -> Iterator[str]:
        """The JSON-lines export as lines."""
        ...

    # -- runs, nodes, rounds -------------------------------------------------

    def create_run(
        self,
        config: Mapping[str, object],
        *,
        run_id: str | None = None,
        policy_hash: str | None = None,
        app_hash: str | None = None,
        actor: str = "server",
    ) -> str:
        """Register a run and append ``run_started``; return its id."""
        ...

    def finish_run(
        self,
        run_id: str,
        status: str = "finished",
        reason: str | None = None,
        *,
        actor: str = "server",
    ) -> None:
        """Mark a run finished or aborted and append ``run_finished`` / ``run_aborted``."""
        ...

    def resume_run(self, run_id: str, *, actor: str = "server") -> ModelVersion | None:
        """Mark a run running again, append ``run_resumed``; return its last model version."""
        ...

    def get_run(self, run_id: str) -> RunInfo:
        """One run."""
        ...

    def list_runs(self) -> list[RunInfo]:
        """All runs, oldest first."""
        ...

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
        """Record an admission decision and append ``node_admitted`` / ``node_denied``."""
        ...

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
        """:meth:`record_node` for each of ``node_ids``, in order, in one transaction."""
        ...

    def nodes(self, run_id: str) -> list[NodeEntry]:
        """Admission decisions of a run, in order."""
        ...

    def start_round(
        self, run_id: str, round: int, cohort: Sequence[int], *, actor: str = "server"
    ) -> RoundInfo:
        """Open (or restart an unfinished) round and append ``round_started``."""
        ...

    def finish_round(
        self, run_id: str, round: int, metrics: Mapping[str, object], *, actor: str = "server"
    ) -> RoundInfo:
        """Close a started round with its metrics and append ``round_finished``."""
        ...

    def fail_round(
        self,
        run_id: str,
        round: int,
        reason: str,
        metrics: Mapping[str, object],
        *,
        actor: str = "server",
    ) -> RoundInfo:
        """Close a started round as failed (no model) and append ``round_failed`` with the reason."""
        ...

    def rounds(self, run_id: str) -> list[RoundInfo]:
        """A run's rounds in order."""
        ...

    # -- privacy and energy --------------------------------------------------

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
        """Store one privacy spend and append ``privacy_spent``."""
        ...

    def privacy(self, run_id: str) -> list[PrivacyEntry]:
        """A run's privacy spends in the order recorded."""
        ...

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
        """Store one site's energy for one round and append ``energy_reported``."""
        ...

    def energy(self, run_id: str) -> list[EnergyEntry]:
        """A run's energy reports."""
        ...

    def energy_total_kwh(self, run_id: str, up_to_round: int | None = None) -> float:
        """Sum of a run's reported kWh (up to and including ``up_to_round`` if given)."""
        ...

    # -- model registry ------------------------------------------------------

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
        """Store a round's global model content-addressed and register its version."""
        ...

    def get_version(self, version: int) -> ModelVersion:
        """One model version."""
        ...

    def list_versions(self, run_id: str | None = None) -> list[ModelVersion]:
        """Model versions in version order (all, or one run's)."""
        ...

    def latest_version(self, run_id: str) -> ModelVersion | None:
        """The run's version with the highest round, or ``None``."""
        ...

    def tag_version(self, version: int, tag: str, *, actor: str = "server") -> ModelVersion:
        """Add a tag to a version (idempotent) and append ``model_version_tagged``."""
        ...

    def load_version_bytes(self, version: int) -> bytes:
        """The version's artifact, re-hashed."""
        ...

    def export_version(self, version: int, dest: Path) -> Path:
        """Write the version's artifact to ``dest`` after verifying its SHA-256."""
        ...
