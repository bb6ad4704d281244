"""Witness checks: does an exported history still contain what a site was shown?

Guarantee
---------
Each round, the server sends the sites its latest :class:`SignedHead`; a site
stores it. Later, given the server's exported history, :func:`check_witness`
says, for every stored head, whether the history still holds an intact chain
from seq 1 up to that head's seq, ending in exactly that head's hash. Since the
head hash commits to all earlier events, a "yes" means nothing the site
witnessed was edited, deleted, inserted or reordered; a "no" is evidence of a
rewrite (the site holds the server's own signature over the original).

This catches what verifying the database alone cannot: truncating the newest
events together with their seals (:mod:`common.audit.chain`), or replacing
the whole history with a freshly hashed one (the attacker has no signing
key, and the site's head names a hash the new history lacks).

Against whom: anyone rewriting the central record after the site received a
head. Assumptions: as :mod:`common.audit.seal` (the site trusts the right
public key); events *after* the newest head a site holds are not covered by
that site's witness. A head signed after a key rotation is checked against
the key the history's sealed rotations put in force at its seq
(:func:`common.audit.seal.key_schedule`), starting from the trusted key.

:func:`verify_with_witnesses` is the verdict an auditor wants in one line:
the whole sealed history (:func:`common.audit.seal.verify_chain`) *and* every
head the sites witnessed. It is what defends against a **clean tail cut**:
deleting the newest events together with the seals over them leaves a
sealed prefix that verifies on its own, but is shorter than the final head
the sites were sent. :func:`parse_witness_lines` reads a site's witness file
(``witnessed-heads.jsonl``: one ``{"head": "<hex of SignedHead.encode()>"}``
per line) without importing the site agent.

References
----------
RFC 6962, Section 3.5 (signed tree heads) and the "gossip" of heads between
clients; Crosby and Wallach, USENIX Security 2009.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.audit.chain import AuditEvent, find_chain_break
from common.audit.seal import (
    MAX_ENCODED_HEAD_BYTES,
    KeySchedule,
    SignedHead,
    VerifyReport,
    key_schedule,
    verify_chain,
)
from common.errors import DataError

__all__ = [
    "WITNESS_FILE",
    "HeadCheck",
    "WitnessReport",
    "check_witness",
    "parse_witness_lines",
    "verify_with_witnesses",
]

WITNESS_FILE = "witnessed-heads.jsonl"
"""The name of a site's witness file in its state directory."""


@dataclass(frozen=True, slots=True)
class HeadCheck:
    """The verdict on one witnessed head."""

    seq: int
    head_hash: str
    ok: bool
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class WitnessReport:
    """Verdicts for every witnessed head; ``ok`` only if all hold (and there is one)."""

    ok: bool
    checks: tuple[HeadCheck, ...]

    def summary(self) -> str:
        """One line: what was confirmed, or the first head the history contradicts."""
        if not self.checks:
            return "no witnessed heads to check"
        if self.ok:
            newest = max(c.seq for c in self.checks)
            return f"OK: the history contains all {len(self.checks)} witnessed heads (up to seq {newest})"
        bad = next(c for c in self.checks if not c.ok)
        return f"MISMATCH at witnessed seq {bad.seq}: {bad.problem}"


def _check_one(
    head: SignedHead,
    events: Sequence[AuditEvent],
    schedule: KeySchedule,
    record_id: str,
) -> HeadCheck:
    def fail(problem: str) -> HeadCheck:
        return HeadCheck(head.seq, head.head_hash, False, problem)

    if not schedule.accepts(head):
        return fail(
            "the stored head is not signed by the trusted server key "
            "(nor by a key a sealed rotation in this history put in force at its seq)"
        )
    if head.record_id != record_id:
        return fail(f"the head is for record {head.record_id!r}, the export is {record_id!r}")
    prefix = [e for e in events if e.seq <= head.seq]
    broken = find_chain_break(prefix)
    if broken is not None:
        return fail(f"the history is broken at seq {broken[0]}: {broken[1]}")
    if len(prefix) < head.seq:
        return fail(
            f"the history ends at seq {len(prefix)}, before the witnessed seq {head.seq} "
            "(truncated)"
        )
    if prefix[head.seq - 1].hash != head.head_hash:
        return fail("the event at the witnessed seq has a different hash (history rewritten)")
    return HeadCheck(head.seq, head.head_hash, True)


def check_witness(
    heads: Sequence[SignedHead],
    events: Sequence[AuditEvent],
    public_key: Ed25519PublicKey,
    record_id: str,
    seals: Sequence[SignedHead] = (),
) -> WitnessReport:
    """Check every witnessed head against an exported history.

    Parameters
    ----------
    heads
        The signed heads the site stored (any order).
    events
        The exported events in seq order.
    public_key
        The server key the site trusts.
    record_id
        The record id the export declares.
    seals
        The history's own seals; with the witnessed heads they are what a
        ``key_rotated`` event may be sealed by (:func:`key_schedule`).
    """
    schedule = key_schedule(events, [*seals, *heads], public_key, record_id)
    checks = tuple(
        _check_one(h, events, schedule, record_id) for h in sorted(heads, key=lambda h: h.seq)
    )
    return WitnessReport(ok=bool(checks) and all(c.ok for c in checks), checks=checks)


def verify_with_witnesses(
    events: Sequence[AuditEvent],
    seals: Sequence[SignedHead],
    heads: Sequence[SignedHead],
    public_key: Ed25519PublicKey,
    record_id: str,
) -> VerifyReport:
    """Verify a sealed history and every head the sites witnessed, as one verdict.

    Defends against a **clean tail cut** by whoever can write the record:
    the newest events deleted together with the seals over them leave a
    consistent sealed prefix that :func:`verify_chain` accepts. A site that
    was sent a head beyond the cut holds the server's signature over a seq
    the history no longer reaches; this reports the record as tampered at
    the first missing seq. It also refuses a witnessed head that names a
    different hash at its seq (a rewritten history) or one for another record.

    Parameters
    ----------
    events, seals
        The history and its seals, in order.
    heads
        The heads the sites witnessed; none means the check cannot see a tail
        cut, and the report is :func:`verify_chain`'s alone.
    public_key
        The key the verifier trusts (rotations are followed from it).
    record_id
        The record the history is for.

    Returns
    -------
    VerifyReport
        ``ok`` only if the history verifies and contains every witnessed head.
    """
    report = verify_chain(events, seals, public_key, record_id)
    if not report.ok or not heads:
        return report
    witness = check_witness(heads, events, public_key, record_id, seals)
    if witness.ok:
        return report
    bad = next(c for c in witness.checks if not c.ok)
    return VerifyReport(
        ok=False,
        n_events=report.n_events,
        n_seals=report.n_seals,
        first_bad_seq=min(bad.seq, len(events) + 1),
        problem=f"tampered: a site witnessed the head at seq {bad.seq}, but {bad.problem}",
    )


def parse_witness_entries(
    lines: Iterable[str], source: str = "witness file"
) -> list[tuple[SignedHead, str | None]]:
    """The entries of a site's witness file, oldest first: (signed head, run id or None).

    Each line is ``{"head": hex}``, optionally with ``"run": run_id`` (the run
    whose instruction carried the head).

    Raises
    ------
    DataError
        On a line that is not such an object or whose head does not decode;
        the message names ``source`` and the line number.
    """
    entries: list[tuple[SignedHead, str | None]] = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            text = obj["head"] if isinstance(obj, dict) else None
            if not isinstance(text, str) or len(text) > 2 * MAX_ENCODED_HEAD_BYTES:
                raise DataError('expected {"head": hex}')
            run_id = obj.get("run")
            entries.append(
                (
                    SignedHead.decode(bytes.fromhex(text)),
                    run_id if isinstance(run_id, str) else None,
                )
            )
        except (ValueError, KeyError) as exc:
            raise DataError(f"{source}:{line_no}: unreadable witnessed head ({exc})") from None
    return entries


def parse_witness_lines(lines: Iterable[str], source: str = "witness file") -> list[SignedHead]:
    """The signed heads of a site's witness file, oldest first (see :func:`parse_witness_entries`)."""
    return [head for head, _ in parse_witness_entries(lines, source)]
