"""Runs, node admissions and rounds, each write with its audit event in the same transaction.

A run is created once (a second run with the same id is refused) and only
ever moves between ``running``, ``finished`` and ``aborted``. A round is
opened with its cohort and closed with its metrics; a finished round is never
reopened, so no round counts twice, while one left open by a crash can be
restarted (its row reused, the event says ``restarted``). A round that
produced no model is closed as ``failed`` with its reason, and is no more
reopened than a finished one. Every change
appends its event (:class:`~server.record.audit_log.AuditLog`) in the
transaction that makes it, so the record and its log cannot disagree.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

from sqlmodel import Session, col, select

from common.errors import DataError, RecordError
from server.record.audit_log import AuditLog
from server.record.db import Database
from server.record.schema import ModelVersionRow, NodeRow, RoundRow, RunRow
from server.record.values import (
    CLOSED_ROUND_STATUSES,
    RUN_END_STATUSES,
    ModelVersion,
    NodeEntry,
    RoundInfo,
    RunInfo,
    check_node_id,
    check_round,
    json_text,
    node_from_row,
    round_from_row,
    run_from_row,
    utc_now,
    version_from_row,
)

__all__ = ["Runs", "require_run"]


def require_run(session: Session, run_id: str) -> RunRow:
    """The run's row in ``session`` (raises :class:`RecordError` if there is no such run)."""
    row = session.get(RunRow, run_id)
    if row is None:
        raise RecordError(f"no run {run_id!r} in the record")
    return row


class Runs:
    """The runs, nodes and rounds tables of one record database.

    Parameters
    ----------
    db
        The open record database.
    audit
        The audit log of the same database, which every change appends to.
    """

    def __init__(self, db: Database, audit: AuditLog) -> None:
        self._db = db
        self._audit = audit

    # -- runs ----------------------------------------------------------------

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
        config_json = json_text(dict(config))

        def work(session: Session) -> str:
            if session.get(RunRow, rid) is not None:
                raise RecordError(f"run {rid} already exists")
            session.add(
                RunRow(run_id=rid, created_at=utc_now(), status="running", config_json=config_json)
            )
            session.flush()
            self._audit.append(
                session,
                rid,
                "run_started",
                actor,
                {"config": dict(config), "policy_hash": policy_hash, "app_hash": app_hash},
            )
            return rid

        return self._db.write(work)

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
            row = require_run(session, run_id)
            row.status, row.finished_at = status, utc_now()
            session.add(row)
            self._audit.append(session, run_id, f"run_{status}", actor, {"reason": reason})

        self._db.write(work)

    def resume_run(self, run_id: str, *, actor: str = "server") -> ModelVersion | None:
        """Mark a run running again, append ``run_resumed``; return its last model version."""

        def work(session: Session) -> ModelVersion | None:
            row = require_run(session, run_id)
            last = session.exec(
                select(ModelVersionRow)
                .where(ModelVersionRow.run_id == run_id)
                .order_by(col(ModelVersionRow.round).desc())
                .limit(1)
            ).first()
            previous = row.status
            row.status, row.finished_at = "running", None
            session.add(row)
            version = version_from_row(last) if last is not None else None
            self._audit.append(
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

        return self._db.write(work)

    def get_run(self, run_id: str) -> RunInfo:
        """One run (raises :class:`RecordError` if unknown)."""
        return self._db.read(lambda s: run_from_row(require_run(s, run_id)))

    def list_runs(self) -> list[RunInfo]:
        """All runs, oldest first."""
        rows = self._db.read(
            lambda s: list(s.exec(select(RunRow).order_by(col(RunRow.created_at))).all())
        )
        return [run_from_row(r) for r in rows]

    # -- nodes ---------------------------------------------------------------

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
        return self.record_nodes(run_id, [node_id], admitted, reason, name=name, actor=actor)[0]

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
        """:meth:`record_node` for each of ``node_ids``, in order, in one transaction.

        Each node gets its own row and its own audit event, exactly as one
        call per node would write them; one commit instead of one per node
        (a thousand sites connecting at once cost a thousand synced commits).
        """
        nids = [(n, check_node_id(n)) for n in node_ids]
        when = utc_now()
        kind = "node_admitted" if admitted else "node_denied"

        def work(session: Session) -> list[NodeEntry]:
            require_run(session, run_id)
            out = []
            for node_id, nid in nids:
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
                self._audit.append(
                    session, run_id, kind, actor, {"node_id": nid, "name": name, "reason": reason}
                )
                out.append(NodeEntry(run_id, node_id, name, bool(admitted), reason, when))
            return out

        return self._db.write(work)

    def nodes(self, run_id: str) -> list[NodeEntry]:
        """Admission decisions of a run, in order."""
        rows = self._db.read(
            lambda s: list(
                s.exec(
                    select(NodeRow).where(NodeRow.run_id == run_id).order_by(col(NodeRow.id))
                ).all()
            )
        )
        return [node_from_row(r) for r in rows]

    # -- rounds --------------------------------------------------------------

    def start_round(
        self, run_id: str, round: int, cohort: Sequence[int], *, actor: str = "server"
    ) -> RoundInfo:
        """Open a round and append ``round_started`` with its cohort.

        A round left open by a crash is restarted (its row reused, the event
        says ``restarted``); a finished or failed round is refused, so no round
        counts twice.
        """
        rnd = check_round(round)
        members = [int(check_node_id(n)) for n in cohort]

        def work(session: Session) -> RoundInfo:
            require_run(session, run_id)
            row = session.exec(
                select(RoundRow).where(RoundRow.run_id == run_id, RoundRow.round == rnd)
            ).first()
            restarted = row is not None
            if row is not None:
                if row.status in CLOSED_ROUND_STATUSES:
                    raise RecordError(f"round {rnd} of run {run_id} already {row.status}")
                row.started_at, row.cohort_json = utc_now(), json_text([str(m) for m in members])
            else:
                row = RoundRow(
                    run_id=run_id,
                    round=rnd,
                    started_at=utc_now(),
                    status="started",
                    cohort_json=json_text([str(m) for m in members]),
                    metrics_json="{}",
                )
            session.add(row)
            session.flush()
            self._audit.append(
                session,
                run_id,
                "round_started",
                actor,
                {"round": rnd, "cohort": [str(m) for m in members], "restarted": restarted},
            )
            return round_from_row(row)

        return self._db.write(work)

    def finish_round(
        self, run_id: str, round: int, metrics: Mapping[str, object], *, actor: str = "server"
    ) -> RoundInfo:
        """Close a started round with its metrics and append ``round_finished``."""
        return self._close_round(run_id, round, "finished", metrics, {}, actor)

    def fail_round(
        self,
        run_id: str,
        round: int,
        reason: str,
        metrics: Mapping[str, object],
        *,
        actor: str = "server",
    ) -> RoundInfo:
        """Close a started round as ``failed`` (no model came of it) and append ``round_failed``.

        A failed round is closed like a finished one: never reopened, so a
        resumed run goes on after it instead of redoing it.
        """
        if not isinstance(reason, str) or not reason:
            raise DataError("a failed round needs its reason")
        return self._close_round(run_id, round, "failed", metrics, {"reason": reason}, actor)

    def _close_round(
        self,
        run_id: str,
        round: int,
        status: str,
        metrics: Mapping[str, object],
        extra: Mapping[str, object],
        actor: str,
    ) -> RoundInfo:
        rnd = check_round(round)
        metrics_json = json_text(dict(metrics))

        def work(session: Session) -> RoundInfo:
            row = session.exec(
                select(RoundRow).where(RoundRow.run_id == run_id, RoundRow.round == rnd)
            ).first()
            if row is None or row.status != "started":
                raise RecordError(f"round {rnd} of run {run_id} is not open")
            row.status, row.finished_at, row.metrics_json = status, utc_now(), metrics_json
            session.add(row)
            payload = {"round": rnd, **extra, "metrics": dict(metrics)}
            self._audit.append(session, run_id, f"round_{status}", actor, payload)
            return round_from_row(row)

        return self._db.write(work)

    def rounds(self, run_id: str) -> list[RoundInfo]:
        """A run's rounds in order."""
        rows = self._db.read(
            lambda s: list(
                s.exec(
                    select(RoundRow).where(RoundRow.run_id == run_id).order_by(col(RoundRow.round))
                ).all()
            )
        )
        return [round_from_row(r) for r in rows]
