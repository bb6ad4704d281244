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
(:func:`common.audit.seal.verify_chain`) against the key the caller trusts,
naming the first bad seq; trusting the key stored with the seals instead is
a separate, explicitly named call (:meth:`AuditLog.verify_trusting_stored_key`),
because whoever writes the database also writes that copy.

Key rotation (:meth:`AuditLog.rotate_key`) appends the ``key_rotated`` event
and seals it with the retiring key in one transaction, so no other event can
slip between the rotation and the retiring key's signature over it.
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
    KEY_ROTATED,
    KeySchedule,
    SignedHead,
    VerifyReport,
    key_schedule,
    public_key_from_hex,
    public_key_hex,
    rotation_payload,
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

    def _seal_in(self, session: Session, signing_key: Ed25519PrivateKey) -> SignedHead:
        """Sign the head read under the audit lock and store the seal, inside ``session``."""
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
                public_key_hex=public_key_hex(signing_key.public_key()),
                signature_hex=signed.signature.hex(),
            )
        )
        return signed

    def seal(self, signing_key: Ed25519PrivateKey) -> SignedHead:
        """Sign the current head with the server's key and store the seal.

        Raises
        ------
        RecordError
            If there is no event to seal.
        """
        return self._db.write(lambda s: self._seal_in(s, signing_key))

    def append_sealed(
        self,
        run_id: str | None,
        kind: str,
        actor: str,
        payload: Mapping[str, object],
        signing_key: Ed25519PrivateKey,
    ) -> tuple[AuditEvent, SignedHead]:
        """Append one event and seal it with ``signing_key`` in one transaction."""

        def work(session: Session) -> tuple[AuditEvent, SignedHead]:
            event = self.append(session, run_id, kind, actor, payload)
            return event, self._seal_in(session, signing_key)

        return self._db.write(work)

    def stored_key_schedule(self) -> KeySchedule | None:
        """The key history as the record tells it: from the first seal's stored key, its rotations.

        Not a trust decision (the stored key is the coordinator's own copy):
        it is what the writer itself must agree with, so that it never seals
        with a key the record's history does not put in force. ``None`` for a
        record without seals.

        Raises
        ------
        DataError
            If the first seal row's stored key is not a valid key.
        """
        rows = self._seal_rows()
        if not rows:
            return None
        anchor = public_key_from_hex(rows[0].public_key_hex)
        return key_schedule(self.events(), self.seals(), anchor, self._db.record_id)

    def rotate_key(
        self, retiring_key: Ed25519PrivateKey, new_key: Ed25519PublicKey, actor: str = "operator"
    ) -> tuple[AuditEvent, SignedHead]:
        """Append ``key_rotated`` naming ``new_key`` and seal it with ``retiring_key``, atomically.

        Defends the rotation chain against a **key swap by the operator's own
        mistake or a stale key**: the retiring key must be the one the record
        says is in force, otherwise verifiers would refuse every later seal.

        Raises
        ------
        RecordError
            If the record has no seal yet (nothing to rotate from), its key
            history is broken, or ``retiring_key`` is not the key in force.
        """
        schedule = self.stored_key_schedule()
        if schedule is None:
            raise RecordError("the record has no seal yet: there is no key in force to rotate from")
        if schedule.problem is not None:
            seq, problem = schedule.problem
            raise RecordError(f"the record's key history is broken at seq {seq}: {problem}")
        retiring_hex = public_key_hex(retiring_key.public_key())
        if retiring_hex != schedule.current.key_hex:
            raise RecordError(
                f"the key given ({retiring_hex[:16]}...) is not the record's key in force "
                f"({schedule.current.key_hex[:16]}...)"
            )
        payload = rotation_payload(retiring_key.public_key(), new_key)
        return self.append_sealed(None, KEY_ROTATED, actor, payload, retiring_key)

    def stored_public_keys(self) -> list[str]:
        """Distinct public keys (hex) the seal rows say they were made with, in first-use order."""
        keys: list[str] = []
        for row in self._seal_rows():
            if row.public_key_hex not in keys:
                keys.append(row.public_key_hex)
        return keys

    def _heads(self) -> tuple[list[AuditSealRow], list[SignedHead], VerifyReport | None]:
        """The seal rows, their signed heads, and a failure report for a malformed row."""
        rows = self._seal_rows()
        heads: list[SignedHead] = []
        for number, row in enumerate(rows, start=1):
            try:
                heads.append(seal_from_row(row))
            except (DataError, ValueError) as exc:
                n_events = len(self.events())
                failed = VerifyReport(
                    False, n_events, len(rows), max(row.seq, 1), f"bad seal #{number}: {exc}"
                )
                return rows, heads, failed
        return rows, heads, None

    def verify(self, public_key: Ed25519PublicKey) -> VerifyReport:
        """Recompute the chain and check every seal against the key the caller trusts.

        Seals by keys that sealed ``key_rotated`` events introduced are
        followed from ``public_key`` (:func:`common.audit.seal.key_schedule`);
        a seal by any other key is refused, naming its seq.
        """
        _rows, heads, failed = self._heads()
        if failed is not None:
            return failed
        return verify_chain(self.events(), heads, public_key, self._db.record_id)

    def verify_trusting_stored_key(self) -> VerifyReport:
        """Verify with the key stored beside the first seal as the trust anchor.

        This trusts the coordinator's own copy of its key: it catches
        corruption and edits by someone without the key, not a forger who
        rewrote the history and replaced the stored key too. Rotations are
        followed as in :meth:`verify`.
        """
        rows, heads, failed = self._heads()
        if failed is not None:
            return failed
        events = self.events()
        if not rows:
            return verify_chain(events, heads, None, self._db.record_id)
        try:
            key = public_key_from_hex(rows[0].public_key_hex)
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
