"""``SqlRecord``: the central record's repository over any SQLAlchemy database.

One object per database: runs, rounds, nodes, privacy spend, energy, the
model registry (rows here, bytes in a content-addressed
:class:`~server.record.artifacts.ArtifactStore`) and the audit chain
(:mod:`common.audit`). Every write that matters to an auditor appends its
audit event *in the same transaction* as the row it describes, so the record
and its log cannot disagree.

Append-only audit log under concurrency: each append locks the
``schema_meta`` row :data:`~server.record.schema.META_AUDIT_LOCK`
(``SELECT ... FOR UPDATE`` on PostgreSQL) and SQLite transactions start with
``BEGIN IMMEDIATE`` (one writer at a time), then reads the head, links the new
event to it and inserts it with its seq as primary key. Two writers racing
therefore serialise; even without the lock, the primary key would refuse a
fork of the chain.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import time as _time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import event as sa_event
from sqlalchemy import func, inspect
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import (
    ArgumentError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.pool import StaticPool
from sqlmodel import Session, SQLModel, col, create_engine, select

from common.audit.chain import GENESIS_HASH, AuditEvent, canonical_json, make_event
from common.audit.export import encode_export
from common.audit.seal import (
    SignedHead,
    VerifyReport,
    public_key_from_hex,
    public_key_hex,
    sign_head,
    verify_chain,
)
from common.errors import ConfigurationError, DataError, RecordError
from server.record.artifacts import ArtifactStore
from server.record.schema import (
    META_AUDIT_LOCK,
    META_CREATED,
    META_RECORD_ID,
    META_SCHEMA_VERSION,
    RECORD_TABLE_NAMES,
    SCHEMA_VERSION,
    AuditEventRow,
    AuditSealRow,
    EnergyRow,
    ModelVersionRow,
    NodeRow,
    PrivacySpendRow,
    RoundRow,
    RunRow,
    SchemaMeta,
)

__all__ = [
    "EnergyEntry",
    "ModelVersion",
    "NodeEntry",
    "PrivacyEntry",
    "RoundInfo",
    "RunInfo",
    "SqlRecord",
    "normalise_url",
    "utc_now",
]

T = TypeVar("T")
PRIVACY_LEVELS = ("record", "client")
RUN_END_STATUSES = ("finished", "aborted")
_WRITE_ATTEMPTS = 8


def utc_now() -> str:
    """The current UTC time as ISO-8601 with microseconds and a ``Z`` suffix."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def normalise_url(url: str) -> str:
    """A SQLAlchemy URL from ``url``: a bare path means a SQLite file; ``postgresql://`` uses psycopg 3."""
    text = str(url).strip()
    if not text:
        raise ConfigurationError("empty database URL")
    if "://" not in text:
        return f"sqlite:///{Path(text).expanduser().resolve()}"
    for prefix in ("postgresql://", "postgres://"):
        if text.startswith(prefix):
            return "postgresql+psycopg://" + text[len(prefix) :]
    return text


def _json(value: object) -> str:
    return canonical_json(value).decode("utf-8")


def _node(node_id: int) -> str:
    if isinstance(node_id, bool) or not isinstance(node_id, int) or not 0 <= node_id < 2**64:
        raise DataError(f"node_id must be an unsigned 64-bit int, got {node_id!r}")
    return str(node_id)


def _round(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"round must be a non-negative int, got {value!r}")
    return value


def _finite(name: str, value: float, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < minimum:
        raise DataError(f"{name} must be finite and >= {minimum}, got {value!r}")
    return float(value)


def _optional_finite(name: str, value: float | None) -> float | None:
    return None if value is None else _finite(name, value)


# ----------------------------------------------------------------- value objects


@dataclass(frozen=True, slots=True)
class RunInfo:
    run_id: str
    created_at: str
    finished_at: str | None
    status: str
    config: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RoundInfo:
    run_id: str
    round: int
    started_at: str
    finished_at: str | None
    status: str
    cohort: tuple[int, ...]
    metrics: dict[str, Any]


@dataclass(frozen=True, slots=True)
class NodeEntry:
    run_id: str
    node_id: int
    name: str | None
    admitted: bool
    reason: str
    time: str


@dataclass(frozen=True, slots=True)
class PrivacyEntry:
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


def _version(row: ModelVersionRow) -> ModelVersion:
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


def _round_info(row: RoundRow) -> RoundInfo:
    return RoundInfo(
        run_id=row.run_id,
        round=row.round,
        started_at=row.started_at,
        finished_at=row.finished_at,
        status=row.status,
        cohort=tuple(int(n) for n in json.loads(row.cohort_json)),
        metrics=json.loads(row.metrics_json),
    )


def _event(row: AuditEventRow) -> AuditEvent:
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


# ----------------------------------------------------------------- the repository


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
        self.url = normalise_url(url)
        try:
            parsed = make_url(self.url)
        except ArgumentError:
            raise RecordError(f"not a database URL: {url!r}") from None
        self._sqlite = parsed.get_backend_name() == "sqlite"
        db_file: Path | None = None
        if self._sqlite and parsed.database not in (None, "", ":memory:"):
            db_file = Path(str(parsed.database))
            if not create and not db_file.is_file():
                raise RecordError(f"no record database at {db_file}")
        if artifact_dir is None and db_file is not None:
            artifact_dir = db_file.parent / "artifacts"
        self.artifacts = ArtifactStore(artifact_dir) if artifact_dir is not None else None
        self.engine = self._make_engine(parsed.database in (None, "", ":memory:"))
        try:
            self.record_id = self._open_schema(create)
        except BaseException:
            self.engine.dispose()
            raise

    # -- engine and schema ---------------------------------------------------

    def _make_engine(self, memory: bool) -> Engine:
        kwargs: dict[str, Any] = {}
        if self._sqlite:
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
            if memory:
                kwargs["poolclass"] = StaticPool
        try:
            engine = create_engine(self.url, **kwargs)
        except NoSuchModuleError:
            raise RecordError(
                f"no SQLAlchemy driver for {self.url.split('://')[0]!r}; for PostgreSQL "
                "install fedseal[postgres] (psycopg)"
            ) from None
        except (ArgumentError, ImportError) as exc:
            raise RecordError(f"cannot use database URL: {exc}") from None
        if self._sqlite:

            @sa_event.listens_for(engine, "connect")
            def _on_connect(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
                cursor = dbapi_conn.cursor()
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.close()

            @sa_event.listens_for(engine, "begin")
            def _on_begin(conn: Any) -> None:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine

    def _open_schema(self, create: bool) -> str:
        try:
            tables = set(inspect(self.engine).get_table_names())
        except OperationalError as exc:
            raise RecordError(f"cannot open the record database: {exc.orig}") from None
        except SQLAlchemyError as exc:
            raise RecordError(f"cannot open the record database: {exc}") from None
        ours = set(RECORD_TABLE_NAMES)
        if "schema_meta" not in tables:
            if tables & ours:
                raise RecordError("the database has fedseal tables but no schema_meta; refusing it")
            if not create:
                raise RecordError("the database holds no fedseal record (no schema_meta table)")
            self._create_schema()
        meta = self._meta()
        raw_version = meta.get(META_SCHEMA_VERSION)
        try:
            version = int(raw_version) if raw_version is not None else None
        except ValueError:
            version = None
        if version is None:
            raise RecordError("the record's schema_meta has no valid schema version")
        if version > SCHEMA_VERSION:
            raise RecordError(
                f"the record's schema version {version} is newer than this fedseal "
                f"supports ({SCHEMA_VERSION}); upgrade fedseal to open it"
            )
        if version < SCHEMA_VERSION:
            raise RecordError(
                f"the record's schema version {version} has no migration to {SCHEMA_VERSION}"
            )
        record_id = meta.get(META_RECORD_ID)
        if not record_id:
            raise RecordError("the record's schema_meta has no record id")
        return record_id

    def _create_schema(self) -> None:
        try:
            SQLModel.metadata.create_all(
                self.engine,
                tables=[SQLModel.metadata.tables[name] for name in RECORD_TABLE_NAMES],
            )
            with Session(self.engine) as session, session.begin():
                if session.get(SchemaMeta, META_SCHEMA_VERSION) is None:
                    for key, value in (
                        (META_SCHEMA_VERSION, str(SCHEMA_VERSION)),
                        (META_RECORD_ID, uuid.uuid4().hex),
                        (META_CREATED, utc_now()),
                        (META_AUDIT_LOCK, "0"),
                    ):
                        session.add(SchemaMeta(key=key, value=value))
        except SAIntegrityError:
            return  # another process created it at the same moment; read theirs
        except SQLAlchemyError as exc:
            raise RecordError(f"cannot create the record schema: {exc}") from None

    def _meta(self) -> dict[str, str]:
        with Session(self.engine) as session:
            return {m.key: m.value for m in session.exec(select(SchemaMeta)).all()}

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()

    def __enter__(self) -> SqlRecord:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions --------------------------------------------------------

    def _write(self, work: Callable[[Session], T]) -> T:
        """Run ``work`` in one transaction, retrying only on lock contention."""
        for attempt in range(_WRITE_ATTEMPTS):
            try:
                with Session(self.engine, expire_on_commit=False) as session, session.begin():
                    return work(session)
            except OperationalError as exc:
                text = str(exc.orig).lower()
                retry = "locked" in text or "deadlock" in text or "could not serialize" in text
                if not retry or attempt == _WRITE_ATTEMPTS - 1:
                    raise RecordError(f"record write failed: {exc.orig}") from None
                _time.sleep(0.05 * (attempt + 1))
            except SAIntegrityError as exc:
                raise RecordError(f"record write refused by a constraint: {exc.orig}") from None
            except SQLAlchemyError as exc:
                raise RecordError(f"record write failed: {exc}") from None
        raise RecordError("record write failed")

    def _read(self, work: Callable[[Session], T]) -> T:
        try:
            with Session(self.engine, expire_on_commit=False) as session:
                return work(session)
        except SQLAlchemyError as exc:
            raise RecordError(f"record read failed: {exc}") from None

    def _append(
        self,
        session: Session,
        run_id: str | None,
        kind: str,
        actor: str,
        payload: Mapping[str, object],
    ) -> AuditEvent:
        lock = session.exec(
            select(SchemaMeta).where(SchemaMeta.key == META_AUDIT_LOCK).with_for_update()
        ).first()
        if lock is None:
            raise RecordError("the record's audit lock row is missing")
        head = session.exec(
            select(AuditEventRow).order_by(col(AuditEventRow.seq).desc()).limit(1)
        ).first()
        prev_hash, seq = (head.hash, head.seq + 1) if head is not None else (GENESIS_HASH, 1)
        ev = make_event(prev_hash, seq, utc_now(), run_id, kind, actor, payload)
        session.add(
            AuditEventRow(
                seq=ev.seq,
                time=ev.time,
                run_id=ev.run_id,
                kind=ev.kind,
                actor=ev.actor,
                payload_json=ev.payload_json,
                prev_hash=ev.prev_hash,
                hash=ev.hash,
            )
        )
        session.flush()
        return ev

    # -- audit log -----------------------------------------------------------

    def append_event(
        self, run_id: str | None, kind: str, actor: str, payload: Mapping[str, object]
    ) -> AuditEvent:
        """Append one audit event (append-only; linked to the current head atomically).

        Raises
        ------
        DataError
            If the payload is not canonical JSON (NaN, non-string keys...) or a field is empty.
        RecordError
            If the database refuses the write.
        """
        return self._write(lambda s: self._append(s, run_id, kind, actor, payload))

    def events(self, run_id: str | None = None) -> list[AuditEvent]:
        """Audit events in seq order (all, or one run's)."""

        def work(session: Session) -> list[AuditEvent]:
            query = select(AuditEventRow).order_by(col(AuditEventRow.seq))
            if run_id is not None:
                query = query.where(AuditEventRow.run_id == run_id)
            return [_event(r) for r in session.exec(query).all()]

        return self._read(work)

    def _seal_rows(self) -> list[AuditSealRow]:
        return self._read(
            lambda s: list(s.exec(select(AuditSealRow).order_by(col(AuditSealRow.id))).all())
        )

    def seals(self) -> list[SignedHead]:
        """Signed heads in the order they were made (raises :class:`DataError` on a malformed row)."""
        return [
            SignedHead(r.record_id, r.seq, r.head_hash, r.time, bytes.fromhex(r.signature_hex))
            for r in self._seal_rows()
        ]

    def latest_seal(self) -> SignedHead | None:
        """The newest signed head, the one sent to sites with each round's instruction."""
        all_seals = self.seals()
        return all_seals[-1] if all_seals else None

    def seal(self, signing_key: Ed25519PrivateKey) -> SignedHead:
        """Sign the current head with the server's key and store the seal.

        Raises
        ------
        RecordError
            If there is no event to seal.
        """
        key_hex = public_key_hex(signing_key.public_key())

        def work(session: Session) -> SignedHead:
            session.exec(
                select(SchemaMeta).where(SchemaMeta.key == META_AUDIT_LOCK).with_for_update()
            ).first()
            head = session.exec(
                select(AuditEventRow).order_by(col(AuditEventRow.seq).desc()).limit(1)
            ).first()
            if head is None:
                raise RecordError("nothing to seal: the audit log is empty")
            signed = sign_head(signing_key, self.record_id, head.seq, head.hash, utc_now())
            session.add(
                AuditSealRow(
                    record_id=signed.record_id,
                    seq=signed.seq,
                    head_hash=signed.head_hash,
                    time=signed.time,
                    public_key_hex=key_hex,
                    signature_hex=signed.signature.hex(),
                )
            )
            return signed

        return self._write(work)

    def stored_public_keys(self) -> list[str]:
        """Distinct public keys (hex) the seal rows say they were made with, in first-use order."""
        keys: list[str] = []
        for row in self._seal_rows():
            if row.public_key_hex not in keys:
                keys.append(row.public_key_hex)
        return keys

    def verify(self, public_key: Ed25519PublicKey | None = None) -> VerifyReport:
        """Recompute the chain and check every seal (:func:`common.audit.seal.verify_chain`).

        Without ``public_key``, signatures are checked against the key stored
        with the seals, which catches corruption but not a forger who also
        replaced the key; pass the trusted key for that.
        """
        events = self.events()
        rows = self._seal_rows()
        heads: list[SignedHead] = []
        for number, row in enumerate(rows, start=1):
            try:
                heads.append(
                    SignedHead(
                        row.record_id,
                        row.seq,
                        row.head_hash,
                        row.time,
                        bytes.fromhex(row.signature_hex),
                    )
                )
            except (DataError, ValueError) as exc:
                return VerifyReport(
                    False, len(events), len(rows), max(row.seq, 1), f"bad seal #{number}: {exc}"
                )
        key = public_key
        if key is None and rows:
            stored = self.stored_public_keys()
            if len(stored) > 1:
                return VerifyReport(
                    False,
                    len(events),
                    len(rows),
                    next(r.seq for r in rows if r.public_key_hex == stored[1]),
                    "bad seal: seals carry different public keys; pass --public-key",
                )
            try:
                key = public_key_from_hex(stored[0])
            except DataError as exc:
                return VerifyReport(False, len(events), len(rows), rows[0].seq, f"bad seal: {exc}")
        return verify_chain(events, heads, key, self.record_id)

    def export_jsonl(self, out: TextIO) -> int:
        """Write the portable JSON-lines export (:mod:`common.audit.export`); return the event count."""
        events = self.events()
        keys = self.stored_public_keys()
        for line in encode_export(self.record_id, keys[-1] if keys else None, events, self.seals()):
            out.write(line + "\n")
        return len(events)

    def export_csv(self, out: TextIO) -> int:
        """Write events as CSV (payload as canonical JSON text); return the event count."""
        events = self.events()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["seq", "time", "run_id", "kind", "actor", "payload", "prev_hash", "hash"])
        for ev in events:
            writer.writerow(
                [
                    ev.seq,
                    ev.time,
                    ev.run_id or "",
                    ev.kind,
                    ev.actor,
                    ev.payload_json,
                    ev.prev_hash,
                    ev.hash,
                ]
            )
        return len(events)

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
        """Register a run and append ``run_started`` (config, policy and app hash); return its id."""
        rid = run_id or uuid.uuid4().hex
        config_json = _json(dict(config))

        def work(session: Session) -> str:
            if session.get(RunRow, rid) is not None:
                raise RecordError(f"run {rid} already exists")
            session.add(
                RunRow(run_id=rid, created_at=utc_now(), status="running", config_json=config_json)
            )
            session.flush()
            self._append(
                session,
                rid,
                "run_started",
                actor,
                {"config": dict(config), "policy_hash": policy_hash, "app_hash": app_hash},
            )
            return rid

        return self._write(work)

    def _run_row(self, session: Session, run_id: str) -> RunRow:
        row = session.get(RunRow, run_id)
        if row is None:
            raise RecordError(f"no run {run_id!r} in the record")
        return row

    def finish_run(
        self,
        run_id: str,
        status: str = "finished",
        reason: str | None = None,
        *,
        actor: str = "server",
    ) -> None:
        """Mark a run finished or aborted and append ``run_finished`` / ``run_aborted``."""
        if status not in RUN_END_STATUSES:
            raise DataError(f"run status must be one of {RUN_END_STATUSES}, got {status!r}")

        def work(session: Session) -> None:
            row = self._run_row(session, run_id)
            row.status, row.finished_at = status, utc_now()
            session.add(row)
            self._append(session, run_id, f"run_{status}", actor, {"reason": reason})

        self._write(work)

    def resume_run(self, run_id: str, *, actor: str = "server") -> ModelVersion | None:
        """Mark a run running again, append ``run_resumed``; return its last model version."""

        def work(session: Session) -> ModelVersion | None:
            row = self._run_row(session, run_id)
            last = session.exec(
                select(ModelVersionRow)
                .where(ModelVersionRow.run_id == run_id)
                .order_by(col(ModelVersionRow.round).desc())
                .limit(1)
            ).first()
            previous = row.status
            row.status, row.finished_at = "running", None
            session.add(row)
            version = _version(last) if last is not None else None
            self._append(
                session,
                run_id,
                "run_resumed",
                actor,
                {
                    "previous_status": previous,
                    "last_version": version.version if version else None,
                    "last_round": version.round if version else None,
                },
            )
            return version

        return self._write(work)

    def get_run(self, run_id: str) -> RunInfo:
        """One run (raises :class:`RecordError` if unknown)."""

        def work(session: Session) -> RunInfo:
            r = self._run_row(session, run_id)
            return RunInfo(
                r.run_id, r.created_at, r.finished_at, r.status, json.loads(r.config_json)
            )

        return self._read(work)

    def list_runs(self) -> list[RunInfo]:
        """All runs, oldest first."""
        rows = self._read(
            lambda s: list(s.exec(select(RunRow).order_by(col(RunRow.created_at))).all())
        )
        return [
            RunInfo(r.run_id, r.created_at, r.finished_at, r.status, json.loads(r.config_json))
            for r in rows
        ]

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
        nid = _node(node_id)
        when = utc_now()

        def work(session: Session) -> NodeEntry:
            self._run_row(session, run_id)
            session.add(
                NodeRow(
                    run_id=run_id,
                    node_id=nid,
                    name=name,
                    admitted=bool(admitted),
                    reason=reason,
                    time=when,
                )
            )
            kind = "node_admitted" if admitted else "node_denied"
            self._append(
                session, run_id, kind, actor, {"node_id": nid, "name": name, "reason": reason}
            )
            return NodeEntry(run_id, node_id, name, bool(admitted), reason, when)

        return self._write(work)

    def nodes(self, run_id: str) -> list[NodeEntry]:
        """Admission decisions of a run, in order."""
        rows = self._read(
            lambda s: list(
                s.exec(
                    select(NodeRow).where(NodeRow.run_id == run_id).order_by(col(NodeRow.id))
                ).all()
            )
        )
        return [
            NodeEntry(r.run_id, int(r.node_id), r.name, r.admitted, r.reason, r.time) for r in rows
        ]

    def start_round(
        self, run_id: str, round: int, cohort: Sequence[int], *, actor: str = "server"
    ) -> RoundInfo:
        """Open a round and append ``round_started`` with its cohort.

        A round left open by a crash is restarted (its row reused, the event
        says ``restarted``); a finished round is refused, so no round counts twice.
        """
        rnd = _round(round)
        members = [int(_node(n)) for n in cohort]

        def work(session: Session) -> RoundInfo:
            self._run_row(session, run_id)
            row = session.exec(
                select(RoundRow).where(RoundRow.run_id == run_id, RoundRow.round == rnd)
            ).first()
            restarted = row is not None
            if row is not None:
                if row.status == "finished":
                    raise RecordError(f"round {rnd} of run {run_id} already finished")
                row.started_at, row.cohort_json = utc_now(), _json([str(m) for m in members])
            else:
                row = RoundRow(
                    run_id=run_id,
                    round=rnd,
                    started_at=utc_now(),
                    status="started",
                    cohort_json=_json([str(m) for m in members]),
                    metrics_json="{}",
                )
            session.add(row)
            session.flush()
            self._append(
                session,
                run_id,
                "round_started",
                actor,
                {"round": rnd, "cohort": [str(m) for m in members], "restarted": restarted},
            )
            return _round_info(row)

        return self._write(work)

    def finish_round(
        self, run_id: str, round: int, metrics: Mapping[str, object], *, actor: str = "server"
    ) -> RoundInfo:
        """Close a started round with its metrics and append ``round_finished``."""
        rnd = _round(round)
        metrics_json = _json(dict(metrics))

        def work(session: Session) -> RoundInfo:
            row = session.exec(
                select(RoundRow).where(RoundRow.run_id == run_id, RoundRow.round == rnd)
            ).first()
            if row is None or row.status != "started":
                raise RecordError(f"round {rnd} of run {run_id} is not open")
            row.status, row.finished_at, row.metrics_json = "finished", utc_now(), metrics_json
            session.add(row)
            self._append(
                session, run_id, "round_finished", actor, {"round": rnd, "metrics": dict(metrics)}
            )
            return _round_info(row)

        return self._write(work)

    def rounds(self, run_id: str) -> list[RoundInfo]:
        """A run's rounds in order."""
        rows = self._read(
            lambda s: list(
                s.exec(
                    select(RoundRow).where(RoundRow.run_id == run_id).order_by(col(RoundRow.round))
                ).all()
            )
        )
        return [_round_info(r) for r in rows]

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
        """Store one privacy spend and append ``privacy_spent``.

        ``level`` is ``"record"`` (DP-SGD at a site, ``node_id`` given) or
        ``"client"`` (central DP-FedAvg); ``epsilon`` is the cumulative epsilon
        at that level after this round. The two levels are never summed.
        """
        if level not in PRIVACY_LEVELS:
            raise DataError(f"privacy level must be one of {PRIVACY_LEVELS}, got {level!r}")
        rnd = _round(round)
        eps = _finite("epsilon", epsilon)
        dlt = _finite("delta", delta)
        sigma = _finite("noise_multiplier", noise_multiplier)
        q = _finite("sample_rate", sample_rate)
        if not 0.0 < q <= 1.0 or not 0.0 <= dlt < 1.0:
            raise DataError("sample_rate must be in (0, 1] and delta in [0, 1)")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise DataError(f"steps must be a non-negative int, got {steps!r}")
        nid = _node(node_id) if node_id is not None else None
        when = utc_now()
        entry = PrivacyEntry(
            run_id, rnd, level, node_id, sigma, q, steps, dlt, eps, accountant, when
        )

        def work(session: Session) -> PrivacyEntry:
            self._run_row(session, run_id)
            session.add(
                PrivacySpendRow(
                    run_id=run_id,
                    round=rnd,
                    level=level,
                    node_id=nid,
                    noise_multiplier=entry.noise_multiplier,
                    sample_rate=q,
                    steps=steps,
                    delta=dlt,
                    epsilon=entry.epsilon,
                    accountant=accountant,
                    time=when,
                )
            )
            payload = {
                "round": rnd,
                "level": level,
                "node_id": nid,
                "epsilon": entry.epsilon,
                "delta": dlt,
                "noise_multiplier": entry.noise_multiplier,
                "sample_rate": q,
                "steps": steps,
                "accountant": accountant,
            }
            self._append(session, run_id, "privacy_spent", actor, payload)
            return entry

        return self._write(work)

    def privacy(self, run_id: str) -> list[PrivacyEntry]:
        """A run's privacy spends in the order recorded."""
        rows = self._read(
            lambda s: list(
                s.exec(
                    select(PrivacySpendRow)
                    .where(PrivacySpendRow.run_id == run_id)
                    .order_by(col(PrivacySpendRow.id))
                ).all()
            )
        )
        return [
            PrivacyEntry(
                r.run_id,
                r.round,
                r.level,
                int(r.node_id) if r.node_id is not None else None,
                r.noise_multiplier,
                r.sample_rate,
                r.steps,
                r.delta,
                r.epsilon,
                r.accountant,
                r.time,
            )
            for r in rows
        ]

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
        """Store one site's energy for one round and append ``energy_reported``.

        A second report for the same (run, round, node) is refused, so a
        resumed run never counts a round's energy twice.
        """
        rnd = _round(round)
        nid = _node(node_id)
        kwh = _finite("energy_kwh", energy_kwh)
        co2 = _finite("co2eq_g", co2eq_g)
        if not isinstance(estimated, bool):
            raise DataError("estimated must be a bool")
        when = utc_now()
        entry = EnergyEntry(run_id, rnd, node_id, kwh, co2, estimated, when)

        def work(session: Session) -> EnergyEntry:
            self._run_row(session, run_id)
            session.add(
                EnergyRow(
                    run_id=run_id,
                    round=rnd,
                    node_id=nid,
                    energy_kwh=entry.energy_kwh,
                    co2eq_g=entry.co2eq_g,
                    estimated=estimated,
                    time=when,
                )
            )
            session.flush()
            payload = {
                "round": rnd,
                "node_id": nid,
                "energy_kwh": entry.energy_kwh,
                "co2eq_g": entry.co2eq_g,
                "estimated": estimated,
            }
            self._append(session, run_id, "energy_reported", actor, payload)
            return entry

        return self._write(work)

    def energy(self, run_id: str) -> list[EnergyEntry]:
        """A run's energy reports ordered by round then node."""
        rows = self._read(
            lambda s: list(
                s.exec(
                    select(EnergyRow)
                    .where(EnergyRow.run_id == run_id)
                    .order_by(col(EnergyRow.round), col(EnergyRow.id))
                ).all()
            )
        )
        return [
            EnergyEntry(
                r.run_id, r.round, int(r.node_id), r.energy_kwh, r.co2eq_g, r.estimated, r.time
            )
            for r in rows
        ]

    def energy_total_kwh(self, run_id: str, up_to_round: int | None = None) -> float:
        """Sum of a run's reported kWh (up to and including ``up_to_round`` if given)."""

        def work(session: Session) -> float:
            query = select(func.coalesce(func.sum(EnergyRow.energy_kwh), 0.0)).where(
                EnergyRow.run_id == run_id
            )
            if up_to_round is not None:
                query = query.where(EnergyRow.round <= up_to_round)
            return float(session.exec(query).one())

        return self._read(work)

    # -- model registry ------------------------------------------------------

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
        rnd = _round(round)
        eps_r = _optional_finite("record_level_epsilon", record_level_epsilon)
        eps_c = _optional_finite("client_level_epsilon", client_level_epsilon)
        kwh = _optional_finite("energy_kwh", energy_kwh)
        members = [_node(p) for p in participants]
        labels = [str(t) for t in tags]
        metrics_json = _json(dict(metrics))
        digest = self._store().put(arrays_bytes)
        size = len(arrays_bytes)
        when = utc_now()

        def work(session: Session) -> ModelVersion:
            self._run_row(session, run_id)
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
                participants_json=_json(members),
                tags_json=_json(labels),
            )
            session.add(row)
            session.flush()
            version = _version(row)
            payload = version.to_dict()
            payload["participants"] = members
            self._append(session, run_id, "model_version_created", actor, payload)
            return version

        return self._write(work)

    def get_version(self, version: int) -> ModelVersion:
        """One model version (raises :class:`RecordError` if unknown)."""
        row = self._read(lambda s: s.get(ModelVersionRow, version))
        if row is None:
            raise RecordError(f"no model version {version} in the record")
        return _version(row)

    def list_versions(self, run_id: str | None = None) -> list[ModelVersion]:
        """Model versions in version order (all, or one run's)."""

        def work(session: Session) -> list[ModelVersionRow]:
            query = select(ModelVersionRow).order_by(col(ModelVersionRow.version))
            if run_id is not None:
                query = query.where(ModelVersionRow.run_id == run_id)
            return list(session.exec(query).all())

        return [_version(r) for r in self._read(work)]

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
                row.tags_json = _json(tags)
                session.add(row)
                self._append(
                    session,
                    row.run_id,
                    "model_version_tagged",
                    actor,
                    {"version": version, "tag": tag},
                )
            return _version(row)

        return self._write(work)

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

    def iter_export_lines(self) -> Iterator[str]:
        """The JSON-lines export as lines (convenience for tests and sites)."""
        buffer = io.StringIO()
        self.export_jsonl(buffer)
        yield from buffer.getvalue().splitlines()
