"""The record's values: frozen results of its queries, row converters and input checks.

Everything the record hands out is one of the immutable values here (or an
:class:`~common.audit.chain.AuditEvent` / :class:`~common.audit.seal.SignedHead`),
never a live SQLModel row, so no caller can change the database by changing
an object. The checks refuse bad input (:class:`~common.errors.DataError`)
before any transaction starts: node ids are unsigned 64-bit integers stored
as decimal text, rounds are non-negative ints, measured quantities are
finite and non-negative, and JSON columns hold canonical JSON text.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass
from typing import Any

from common.audit.chain import AuditEvent, canonical_json
from common.audit.seal import SignedHead
from common.errors import DataError, RecordError
from server.record.schema import (
    AuditEventRow,
    AuditSealRow,
    EnergyRow,
    ModelVersionRow,
    NodeRow,
    PrivacySpendRow,
    RoundRow,
    RunRow,
)

__all__ = [
    "PRIVACY_LEVELS",
    "CLOSED_ROUND_STATUSES",
    "RUN_END_STATUSES",
    "EnergyEntry",
    "ModelVersion",
    "NodeEntry",
    "PrivacyEntry",
    "RoundInfo",
    "RunInfo",
    "check_finite",
    "check_node_id",
    "check_optional_finite",
    "check_round",
    "energy_from_row",
    "event_from_row",
    "json_text",
    "node_from_row",
    "privacy_from_row",
    "round_from_row",
    "run_from_row",
    "seal_from_row",
    "utc_now",
    "version_from_row",
]

PRIVACY_LEVELS = ("record", "client")
RUN_END_STATUSES = ("finished", "aborted")
CLOSED_ROUND_STATUSES = ("finished", "failed")  # a round in either is never reopened


# ----------------------------------------------------------------- value objects


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A run: when it was created and ended, its status and its configuration."""

    run_id: str
    created_at: str
    finished_at: str | None
    status: str
    config: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RoundInfo:
    """A round of a run: its times, status, cohort of node ids and metrics."""

    run_id: str
    round: int
    started_at: str
    finished_at: str | None
    status: str
    cohort: tuple[int, ...]
    metrics: dict[str, Any]


@dataclass(frozen=True, slots=True)
class NodeEntry:
    """One admission decision about a node in a run."""

    run_id: str
    node_id: int
    name: str | None
    admitted: bool
    reason: str
    time: str


@dataclass(frozen=True, slots=True)
class PrivacyEntry:
    """One privacy spend: the mechanism's parameters and the cumulative epsilon at its level."""

    run_id: str
    round: int
    level: str
    node_id: int | None
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon: float
    accountant: str
    time: str


@dataclass(frozen=True, slots=True)
class EnergyEntry:
    """One site's energy and emissions for one round (``estimated`` if not measured)."""

    run_id: str
    round: int
    node_id: int
    energy_kwh: float
    co2eq_g: float
    estimated: bool
    time: str


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """A registered global model: which run and round, its artifact hash and its privacy/energy card."""

    version: int
    run_id: str
    round: int
    parent: int | None
    sha256: str
    size_bytes: int
    created_at: str
    metrics: dict[str, Any]
    record_level_epsilon: float | None
    client_level_epsilon: float | None
    energy_kwh: float | None
    participants: tuple[int, ...]
    tags: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "version": self.version,
            "run_id": self.run_id,
            "round": self.round,
            "parent": self.parent,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "created_at": self.created_at,
            "metrics": self.metrics,
            "record_level_epsilon": self.record_level_epsilon,
            "client_level_epsilon": self.client_level_epsilon,
            "energy_kwh": self.energy_kwh,
            "participants": list(self.participants),
            "tags": list(self.tags),
        }


# ----------------------------------------------------------------- input checks


def utc_now() -> str:
    """The current UTC time as ISO-8601 with microseconds and a ``Z`` suffix."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def json_text(value: object) -> str:
    """``value`` as canonical JSON text (raises :class:`DataError` if it is not JSON)."""
    return canonical_json(value).decode("utf-8")


def check_node_id(node_id: int) -> str:
    """A Flower node id as the decimal text the record stores.

    Raises
    ------
    DataError
        Unless ``node_id`` is an ``int`` (not ``bool``) in ``[0, 2**64)``.
    """
    if isinstance(node_id, bool) or not isinstance(node_id, int) or not 0 <= node_id < 2**64:
        raise DataError(f"node_id must be an unsigned 64-bit int, got {node_id!r}")
    return str(node_id)


def check_round(value: int) -> int:
    """A round number, unchanged (raises :class:`DataError` unless a non-negative ``int``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"round must be a non-negative int, got {value!r}")
    return value


def check_finite(name: str, value: float, *, minimum: float = 0.0) -> float:
    """``value`` as a ``float``.

    Raises
    ------
    DataError
        If it is not a number (``bool`` refused), not finite, or below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < minimum:
        raise DataError(f"{name} must be finite and >= {minimum}, got {value!r}")
    return float(value)


def check_optional_finite(name: str, value: float | None) -> float | None:
    """``None``, or ``value`` checked by :func:`check_finite`."""
    return None if value is None else check_finite(name, value)


# ----------------------------------------------------------------- row converters


def run_from_row(row: RunRow) -> RunInfo:
    """The value of a ``runs`` row."""
    return RunInfo(
        row.run_id, row.created_at, row.finished_at, row.status, json.loads(row.config_json)
    )


def round_from_row(row: RoundRow) -> RoundInfo:
    """The value of a ``rounds`` row (cohort node ids back to ints)."""
    return RoundInfo(
        run_id=row.run_id,
        round=row.round,
        started_at=row.started_at,
        finished_at=row.finished_at,
        status=row.status,
        cohort=tuple(int(n) for n in json.loads(row.cohort_json)),
        metrics=json.loads(row.metrics_json),
    )


def node_from_row(row: NodeRow) -> NodeEntry:
    """The value of a ``nodes`` row."""
    return NodeEntry(row.run_id, int(row.node_id), row.name, row.admitted, row.reason, row.time)


def privacy_from_row(row: PrivacySpendRow) -> PrivacyEntry:
    """The value of a ``privacy_spend`` row."""
    return PrivacyEntry(
        row.run_id,
        row.round,
        row.level,
        int(row.node_id) if row.node_id is not None else None,
        row.noise_multiplier,
        row.sample_rate,
        row.steps,
        row.delta,
        row.epsilon,
        row.accountant,
        row.time,
    )


def energy_from_row(row: EnergyRow) -> EnergyEntry:
    """The value of an ``energy`` row."""
    return EnergyEntry(
        row.run_id,
        row.round,
        int(row.node_id),
        row.energy_kwh,
        row.co2eq_g,
        row.estimated,
        row.time,
    )


def version_from_row(row: ModelVersionRow) -> ModelVersion:
    """The value of a ``model_versions`` row (raises :class:`RecordError` if it has no number)."""
    if row.version is None:
        raise RecordError("model version row without a version number")
    return ModelVersion(
        version=row.version,
        run_id=row.run_id,
        round=row.round,
        parent=row.parent,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        created_at=row.created_at,
        metrics=json.loads(row.metrics_json),
        record_level_epsilon=row.record_level_epsilon,
        client_level_epsilon=row.client_level_epsilon,
        energy_kwh=row.energy_kwh,
        participants=tuple(int(p) for p in json.loads(row.participants_json)),
        tags=tuple(str(t) for t in json.loads(row.tags_json)),
    )


def event_from_row(row: AuditEventRow) -> AuditEvent:
    """The audit event an ``audit_events`` row holds, as stored (not verified)."""
    return AuditEvent(
        seq=row.seq,
        time=row.time,
        run_id=row.run_id,
        kind=row.kind,
        actor=row.actor,
        payload_json=row.payload_json,
        prev_hash=row.prev_hash,
        hash=row.hash,
    )


def seal_from_row(row: AuditSealRow) -> SignedHead:
    """The signed head an ``audit_seals`` row holds (signature not checked).

    Raises
    ------
    DataError
        If a field is malformed (:class:`SignedHead` validation).
    ValueError
        If the signature is not hex.
    """
    return SignedHead(
        row.record_id, row.seq, row.head_hash, row.time, bytes.fromhex(row.signature_hex)
    )
