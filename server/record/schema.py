"""The central record's one SQLModel schema, and its version check.

Tables: ``schema_meta`` (schema version, record id), ``runs``, ``rounds``,
``nodes``, ``model_versions``, ``privacy_spend``, ``energy``, ``audit_events``,
``audit_seals``. JSON-valued columns hold canonical JSON text
(:func:`common.audit.canonical_json`), times are ISO-8601 UTC strings (the
audit chain hashes the exact string), and node ids are decimal strings
because Flower's node ids are unsigned 64-bit integers, which PostgreSQL's
BIGINT cannot hold.

Versioning: :data:`SCHEMA_VERSION` is stored in ``schema_meta``. A database
from a newer fedseal is refused (:class:`~common.errors.RecordError`), never
silently written; an older one would be upgraded by an explicit migration
step here (version 1 is the first, so there are none yet).
"""

from __future__ import annotations

from sqlalchemy import Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

SCHEMA_VERSION = 1
"""Bump with every change to the tables below, and add a migration step."""

META_SCHEMA_VERSION = "schema_version"
META_RECORD_ID = "record_id"
META_CREATED = "created_at"
META_AUDIT_LOCK = "audit_head_lock"
"""A ``schema_meta`` row that audit appenders lock (``SELECT ... FOR UPDATE``)."""


class SchemaMeta(SQLModel, table=True):
    __tablename__ = "schema_meta"

    key: str = Field(primary_key=True, max_length=64)
    value: str = Field(max_length=256)


class RunRow(SQLModel, table=True):
    __tablename__ = "runs"

    run_id: str = Field(primary_key=True, max_length=64)
    created_at: str = Field(max_length=40)
    finished_at: str | None = Field(default=None, max_length=40)
    status: str = Field(max_length=16)
    config_json: str = Field(sa_column=Column(Text, nullable=False))


class RoundRow(SQLModel, table=True):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("run_id", "round"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="runs.run_id", index=True, max_length=64)
    round: int
    started_at: str = Field(max_length=40)
    finished_at: str | None = Field(default=None, max_length=40)
    status: str = Field(max_length=16)
    cohort_json: str = Field(sa_column=Column(Text, nullable=False))
    metrics_json: str = Field(sa_column=Column(Text, nullable=False))


class NodeRow(SQLModel, table=True):
    __tablename__ = "nodes"

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="runs.run_id", index=True, max_length=64)
    node_id: str = Field(max_length=20)
    name: str | None = Field(default=None, max_length=256)
    admitted: bool
    reason: str = Field(sa_column=Column(Text, nullable=False))
    time: str = Field(max_length=40)


class ModelVersionRow(SQLModel, table=True):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("run_id", "round"),)

    version: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="runs.run_id", index=True, max_length=64)
    round: int
    parent: int | None = Field(default=None, foreign_key="model_versions.version")
    sha256: str = Field(max_length=64)
    size_bytes: int
    created_at: str = Field(max_length=40)
    metrics_json: str = Field(sa_column=Column(Text, nullable=False))
    record_level_epsilon: float | None = None
    client_level_epsilon: float | None = None
    energy_kwh: float | None = None
    participants_json: str = Field(sa_column=Column(Text, nullable=False))
    tags_json: str = Field(sa_column=Column(Text, nullable=False))


class PrivacySpendRow(SQLModel, table=True):
    __tablename__ = "privacy_spend"

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="runs.run_id", index=True, max_length=64)
    round: int
    level: str = Field(max_length=16)
    node_id: str | None = Field(default=None, max_length=20)
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon: float
    accountant: str = Field(max_length=32)
    time: str = Field(max_length=40)


class EnergyRow(SQLModel, table=True):
    __tablename__ = "energy"
    __table_args__ = (UniqueConstraint("run_id", "round", "node_id"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="runs.run_id", index=True, max_length=64)
    round: int
    node_id: str = Field(max_length=20)
    energy_kwh: float
    co2eq_g: float
    estimated: bool
    time: str = Field(max_length=40)


class AuditEventRow(SQLModel, table=True):
    __tablename__ = "audit_events"

    seq: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    time: str = Field(max_length=40)
    run_id: str | None = Field(default=None, index=True, max_length=256)
    kind: str = Field(max_length=256)
    actor: str = Field(max_length=256)
    payload_json: str = Field(sa_column=Column(Text, nullable=False))
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)


class AuditSealRow(SQLModel, table=True):
    __tablename__ = "audit_seals"

    id: int | None = Field(default=None, primary_key=True)
    record_id: str = Field(max_length=256)
    seq: int
    head_hash: str = Field(max_length=64)
    time: str = Field(max_length=40)
    public_key_hex: str = Field(max_length=64)
    signature_hex: str = Field(max_length=128)


RECORD_TABLE_NAMES: tuple[str, ...] = (
    "schema_meta",
    "runs",
    "rounds",
    "nodes",
    "model_versions",
    "privacy_spend",
    "energy",
    "audit_events",
    "audit_seals",
)
