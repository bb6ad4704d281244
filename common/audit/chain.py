"""The audit hash chain: canonical encoding, event hashes and whole-chain verification.

Guarantee
---------
Every audit event commits to its predecessor: ``hash = SHA-256(prev_hash ||
canonical_json(header))`` where the header holds the event's sequence number,
UTC time, run, kind, actor and payload. Anyone holding the events (and the
signed heads, :mod:`common.audit.seal`) can recompute the chain, so an edited,
deleted, inserted or reordered event is found and *named*:

* **hash mismatch** at seq ``n``: the stored hash of event ``n`` is not the hash
  of its own contents (its payload, kind, actor, time, run or seq was edited,
  or the contents of two rows were swapped);
* **broken link** at seq ``n``: event ``n``'s ``prev_hash`` is not the hash of
  event ``n - 1`` (an event before it was replaced by a forged one whose own
  hash is consistent, e.g. an insertion with re-numbered successors);
* **gap** at seq ``n``: the event numbered ``n`` is missing (a deleted row);
* **out of order** at seq ``n``: a sequence number repeats or goes backwards;
* **bad seal**: a seal's Ed25519 signature does not verify under the trusted
  key, it is for another record, or it names a ``(seq, head_hash)`` that the
  chain no longer holds (the event at that seq was changed);
* **truncated tail**: a seal names a seq beyond the last event. Every seal
  records ``(seq, head_hash)``; the chain is *complete* only if the newest
  seal covers the last event. Removing sealed events from the end therefore
  leaves a seal pointing past the head, and is named by the first missing seq;
* **unsealed tail**: events after the newest seal. A closed record (the server
  seals at every round end and when a run ends) has none; appending forged
  events at the end (with correct hashes, which needs no key) is caught here.

What verification against the record alone cannot catch: an attacker with
write access to the database who deletes the newest events *together with*
the seals that cover them, cutting exactly at a remaining seal. The chain
that is left is then a consistent, sealed prefix. That is why sites keep the
signed heads they received (:mod:`common.audit.witness`): a site's newer head
names a seq and hash the truncated history no longer contains.

Assumptions: SHA-256 is collision- and second-preimage resistant; the
verifier obtains the server's public key out of band (``--public-key``);
seq numbers start at 1 and the first event's ``prev_hash`` is
:data:`GENESIS_HASH`.

References
----------
Schneier and Kelsey, "Secure Audit Logs to Support Computer Forensics",
ACM TISSEC 2(2), 1999 (hash-chained logs). Crosby and Wallach, "Efficient
Data Structures for Tamper-Evident Logging", USENIX Security 2009. RFC 8785
(JSON Canonicalization Scheme) motivates the canonical encoding; ours is the
subset sorted keys / no whitespace / UTF-8 / finite numbers only.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common.errors import DataError, IntegrityError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from common.audit.seal import SignedHead

__all__ = [
    "CHAIN_VERSION",
    "GENESIS_HASH",
    "AuditEvent",
    "VerifyReport",
    "canonical_json",
    "event_hash",
    "find_chain_break",
    "is_hex_digest",
    "make_event",
    "parse_canonical_json",
    "verify_chain",
]

CHAIN_VERSION = 1
"""Version of the hashed header layout; part of every hashed message."""

GENESIS_HASH = "0" * 64
"""The ``prev_hash`` of the first event (seq 1)."""

_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_FIELD_CHARS = 256
"""Longest kind, actor, run id or time string accepted in an event."""


def is_hex_digest(value: object) -> bool:
    """Whether ``value`` is a 64-character lowercase hexadecimal SHA-256 digest."""
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def _check_json_value(value: object, path: str) -> None:
    if value is None or isinstance(value, bool | str | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DataError(f"audit payload {path}: {value!r} is not a finite number")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise DataError(f"audit payload {path}: key {key!r} is not a string")
            _check_json_value(item, f"{path}.{key}")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_json_value(item, f"{path}[{i}]")
        return
    raise DataError(f"audit payload {path}: {type(value).__name__} is not JSON")


def canonical_json(value: object) -> bytes:
    """Encode ``value`` as canonical JSON bytes.

    Sorted keys, no insignificant whitespace, UTF-8 (non-ASCII kept as is),
    tuples as lists. Equal values give equal bytes, so the bytes can be hashed.

    Parameters
    ----------
    value
        ``None``, ``bool``, ``int``, finite ``float``, ``str``, or lists/tuples
        and string-keyed mappings of these.

    Raises
    ------
    DataError
        On NaN or infinite floats, non-string keys, or non-JSON types.
    """
    _check_json_value(value, "$")
    text = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def _reject_constant(name: str) -> Any:
    raise DataError(f"non-finite number {name} in JSON")


def parse_canonical_json(text: str) -> Any:
    """Parse JSON text and insist it is already in canonical form.

    Raises
    ------
    DataError
        If the text is not JSON, holds NaN/Infinity, or is not canonical
        (whitespace, key order, escapes differ from :func:`canonical_json`).
    """
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise DataError(f"not JSON: {exc}") from None
    if canonical_json(value).decode("utf-8") != text:
        raise DataError("JSON text is not in canonical form")
    return value


def event_hash(
    prev_hash: str,
    seq: int,
    time: str,
    run_id: str | None,
    kind: str,
    actor: str,
    payload: Mapping[str, object],
) -> str:
    """SHA-256 of ``prev_hash`` (32 raw bytes) followed by the canonical event header.

    The header is ``canonical_json({"v": 1, "seq", "time", "run_id", "kind",
    "actor", "payload"})``. Returns the digest as 64 lowercase hex characters.

    Raises
    ------
    DataError
        If ``prev_hash`` is not a hex SHA-256 digest, ``seq`` is not a
        positive ``int`` (``bool`` refused), or the payload is not canonical JSON.
    """
    if not is_hex_digest(prev_hash):
        raise DataError("prev_hash must be 64 lowercase hex characters")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise DataError(f"seq must be a positive int, got {seq!r}")
    header = {
        "v": CHAIN_VERSION,
        "seq": seq,
        "time": time,
        "run_id": run_id,
        "kind": kind,
        "actor": actor,
        "payload": payload,
    }
    digest = hashlib.sha256()
    digest.update(bytes.fromhex(prev_hash))
    digest.update(canonical_json(header))
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audit event as stored: ``payload_json`` is canonical JSON text (an object)."""

    seq: int
    time: str
    run_id: str | None
    kind: str
    actor: str
    payload_json: str
    prev_hash: str
    hash: str

    def payload(self) -> dict[str, Any]:
        """The payload as a dict (raises :class:`DataError` if not canonical JSON object)."""
        value = parse_canonical_json(self.payload_json)
        if not isinstance(value, dict):
            raise DataError("audit payload is not a JSON object")
        return value

    def computed_hash(self) -> str:
        """The hash this event's contents should have (raises :class:`DataError`)."""
        return event_hash(
            self.prev_hash, self.seq, self.time, self.run_id, self.kind, self.actor, self.payload()
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the payload as an object."""
        return {
            "seq": self.seq,
            "time": self.time,
            "run_id": self.run_id,
            "kind": self.kind,
            "actor": self.actor,
            "payload": self.payload(),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


def _check_field(name: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value or len(value) > MAX_FIELD_CHARS:
        raise DataError(f"audit event {name} must be a non-empty string of <= 256 characters")


def make_event(
    prev_hash: str,
    seq: int,
    time: str,
    run_id: str | None,
    kind: str,
    actor: str,
    payload: Mapping[str, object],
) -> AuditEvent:
    """Build the next event of a chain (validating fields, computing its hash)."""
    _check_field("kind", kind)
    _check_field("actor", actor)
    _check_field("time", time)
    _check_field("run_id", run_id, optional=True)
    if not isinstance(payload, Mapping):
        raise DataError("audit payload must be a mapping")
    digest = event_hash(prev_hash, seq, time, run_id, kind, actor, payload)
    return AuditEvent(
        seq=seq,
        time=time,
        run_id=run_id,
        kind=kind,
        actor=actor,
        payload_json=canonical_json(payload).decode("utf-8"),
        prev_hash=prev_hash,
        hash=digest,
    )


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """Outcome of :func:`verify_chain`.

    ``first_bad_seq`` is the lowest seq at which something is wrong (``None``
    when ``ok``); ``problem`` says what, in one line.
    """

    ok: bool
    n_events: int
    n_seals: int
    first_bad_seq: int | None = None
    problem: str | None = None

    def summary(self) -> str:
        """``OK: N events, M seals`` or ``FAILED at seq S: <problem>``."""
        if self.ok:
            return f"OK: {self.n_events} events, {self.n_seals} seals"
        return f"FAILED at seq {self.first_bad_seq}: {self.problem}"


def find_chain_break(events: Sequence[AuditEvent]) -> tuple[int, str] | None:
    """Walk the hash chain (seals not considered).

    Returns
    -------
    tuple[int, str] | None
        The first bad seq and what is wrong there, or ``None`` if every event
        is numbered ``1, 2, ...``, hashes to its stored hash and links to its
        predecessor.
    """
    prev = GENESIS_HASH
    for index, event in enumerate(events):
        expected = index + 1
        if isinstance(event.seq, bool) or not isinstance(event.seq, int):
            return expected, "seq is not an integer"
        if event.seq > expected:
            return expected, (
                f"gap: event {expected} is missing (the next stored event is {event.seq}); "
                "a row was deleted"
            )
        if event.seq < expected:
            return expected, (
                f"out of order: found seq {event.seq} where {expected} was expected "
                "(rows repeated or reordered)"
            )
        try:
            recomputed = event.computed_hash()
        except DataError as exc:
            return expected, f"malformed event ({exc})"
        if recomputed != event.hash:
            return (
                expected,
                "hash mismatch: the stored hash is not the hash of the event's contents",
            )
        if event.prev_hash != prev:
            return expected, (
                f"broken link: prev_hash does not match the hash of event {expected - 1} "
                "(an event before it was inserted, removed or replaced)"
            )
        prev = event.hash
    return None


def _check_seals(
    events: Sequence[AuditEvent],
    seals: Sequence[SignedHead],
    public_key: Ed25519PublicKey | None,
    record_id: str | None,
) -> tuple[int, str] | None:
    """Check every seal; the problem with the lowest seq, or ``None``."""
    found: list[tuple[int, str]] = []
    by_seq = {event.seq: event for event in events}
    last_seq = events[-1].seq if events else 0
    previous = 0
    for number, seal in enumerate(seals, start=1):
        if record_id is not None and seal.record_id != record_id:
            found.append((seal.seq, f"bad seal #{number}: it is for record {seal.record_id!r}"))
            continue
        if public_key is not None:
            try:
                seal.verify(public_key)
            except IntegrityError:
                found.append(
                    (seal.seq, f"bad seal #{number}: signature does not verify under the key")
                )
                continue
        if seal.seq < previous:
            found.append((seal.seq, f"bad seal #{number}: seals are out of order"))
            continue
        previous = seal.seq
        if seal.seq > last_seq:
            found.append(
                (
                    last_seq + 1,
                    f"truncated tail: seal #{number} covers seq {seal.seq} but the last "
                    f"event is {last_seq}",
                )
            )
            continue
        sealed = by_seq.get(seal.seq)
        if sealed is None or sealed.hash != seal.head_hash:
            found.append(
                (
                    max(seal.seq, 1),
                    f"bad seal #{number}: the sealed head hash no longer matches event {seal.seq}",
                )
            )
    newest = max((seal.seq for seal in seals), default=0)
    if last_seq > newest:
        found.append(
            (
                newest + 1,
                f"unsealed tail: events {newest + 1}..{last_seq} come after the last seal",
            )
        )
    return min(found, key=lambda item: item[0]) if found else None


def verify_chain(
    events: Sequence[AuditEvent],
    seals: Sequence[SignedHead],
    public_key: Ed25519PublicKey | None,
    record_id: str | None = None,
) -> VerifyReport:
    """Recompute the whole chain and check every seal.

    Parameters
    ----------
    events
        The events in storage order (by seq), first seq 1.
    seals
        The signed heads in the order they were made.
    public_key
        The server's Ed25519 key to check seal signatures with; ``None`` skips
        signature checks (seal positions and hashes are still checked).
    record_id
        If given, every seal must be for this record.

    Returns
    -------
    VerifyReport
        ``ok`` only if the chain is intact, every seal is good, and the newest
        seal covers the last event. Otherwise the lowest bad seq and what is
        wrong there (on a tie, the chain problem is named before the seal one).
    """
    problems = [
        p
        for p in (
            find_chain_break(events),
            _check_seals(events, seals, public_key, record_id),
        )
        if p is not None
    ]
    if not problems:
        return VerifyReport(ok=True, n_events=len(events), n_seals=len(seals))
    seq, problem = min(problems, key=lambda item: item[0])
    return VerifyReport(
        ok=False, n_events=len(events), n_seals=len(seals), first_bad_seq=seq, problem=problem
    )
