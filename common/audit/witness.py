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
that site's witness.

References
----------
RFC 6962, Section 3.5 (signed tree heads) and the "gossip" of heads between
clients; Crosby and Wallach, USENIX Security 2009.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.audit.chain import AuditEvent, find_chain_break
from common.audit.seal import SignedHead
from common.errors import IntegrityError

__all__ = ["HeadCheck", "WitnessReport", "check_witness"]


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
    public_key: Ed25519PublicKey,
    record_id: str,
) -> HeadCheck:
    def fail(problem: str) -> HeadCheck:
        return HeadCheck(head.seq, head.head_hash, False, problem)

    try:
        head.verify(public_key)
    except IntegrityError:
        return fail("the stored head is not signed by the trusted server key")
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
    """
    checks = tuple(
        _check_one(h, events, public_key, record_id) for h in sorted(heads, key=lambda h: h.seq)
    )
    return WitnessReport(ok=bool(checks) and all(c.ok for c in checks), checks=checks)
