"""The record's audit log: append-only hash-chained events, signed seals, verification, exports.

Append-only under concurrency: every append (:meth:`AuditLog.append`, run
inside the caller's transaction, so an event commits together with the row
it describes) locks the ``schema_meta`` row
:data:`~server.record.schema.META_AUDIT_LOCK` (``SELECT ... FOR UPDATE`` on
PostgreSQL; SQLite transactions start with ``BEGIN IMMEDIATE``, one writer at
a time), then reads the head, links the new event to it
(:func:`common.audit.chain.make_event`) and inserts it with its seq as
primary key. Two writers racing therefore serialise; even without the lock,
the primary key would refuse a fork of the chain. A seal signs the head read
under the same lock, so it names an event that exists.

Nothing here updates or deletes an event or a seal. :meth:`AuditLog.verify`
recomputes the whole chain and checks every seal
(:func:`common.audit.seal.verify_chain`), naming the first bad seq.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Mapping
from typing import TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlmodel import Session, col, select

from common.audit.chain import GENESIS_HASH, AuditEvent, make_event
from common.audit.export import encode_export
from common.audit.seal import (
    SignedHead,
    VerifyReport,
    public_key_from_hex,
    public_key_hex,
    sign_head,
    verify_chain,
)
from common.errors import DataError, RecordError
from server.record.db import Database
from server.record.schema import META_AUDIT_LOCK, AuditEventRow, AuditSealRow, SchemaMeta
from server.record.values import event_from_row, seal_from_row, utc_now

__all__ = ["AuditLog"]


def _lock(session: Session) -> SchemaMeta | None:
    """Take the audit lock row for the rest of the transaction (``None`` if it is missing)."""
    return session.exec(
        select(SchemaMeta).where(SchemaMeta.key == META_AUDIT_LOCK).with_for_update()
    ).first()


def _head(session: Session) -> AuditEventRow | None:
    """The newest event row, or ``None`` for an empty log."""
    return session.exec(
        select(AuditEventRow).order_by(col(AuditEventRow.seq).desc()).limit(1)
    ).first()


class AuditLog:
    """The audit events and seals of one record database.

    Parameters
    ----------
    db
        The open record database; its ``record_id`` is what seals are for.
    """

    def __init__(self, db: Database) -> None:
        self._db = db

    def append(
        self,
        session: Session,
        run_id: str | None,
        kind: str,
        actor: str,
        payload: Mapping[str, object],
    ) -> AuditEvent:
        """Append one event inside the caller's write transaction ``session``.

        Raises
        ------
        DataError
            If the payload is not canonical JSON or a field is empty.
        RecordError
            If the record's audit lock row is missing.
        """
        if _lock(session) is None:
            raise RecordError("the record's audit lock row is missing")
        head = _head(session)
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
        return self._db.write(lambda s: self.append(s, run_id, kind, actor, payload))

    def events(self, run_id: str | None = None) -> list[AuditEvent]:
        """Audit events in seq order (all, or one run's)."""

        def work(session: Session) -> list[AuditEvent]:
            query = select(AuditEventRow).order_by(col(AuditEventRow.seq))
            if run_id is not None:
                query = query.where(AuditEventRow.run_id == run_id)
            return [event_from_row(r) for r in session.exec(query).all()]

        return self._db.read(work)

    def _seal_rows(self) -> list[AuditSealRow]:
        return self._db.read(
            lambda s: list(s.exec(select(AuditSealRow).order_by(col(AuditSealRow.id))).all())
        )

    def seals(self) -> list[SignedHead]:
        """Signed heads in the order they were made (raises :class:`DataError` on a malformed row)."""
        return [seal_from_row(r) for r in self._seal_rows()]

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
            _lock(session)
            head = _head(session)
            if head is None:
                raise RecordError("nothing to seal: the audit log is empty")
            signed = sign_head(signing_key, self._db.record_id, head.seq, head.hash, utc_now())
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

        return self._db.write(work)

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
                heads.append(seal_from_row(row))
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
        return verify_chain(events, heads, key, self._db.record_id)

    def export_jsonl(self, out: TextIO) -> int:
        """Write the portable JSON-lines export (:mod:`common.audit.export`); return the event count."""
        events = self.events()
        keys = self.stored_public_keys()
        for line in encode_export(
            self._db.record_id, keys[-1] if keys else None, events, self.seals()
        ):
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

    def iter_export_lines(self) -> Iterator[str]:
        """The JSON-lines export as lines (convenience for tests and sites)."""
        buffer = io.StringIO()
        self.export_jsonl(buffer)
        yield from buffer.getvalue().splitlines()
