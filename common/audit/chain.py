"""The audit hash chain: canonical encoding, event hashes and the walk that finds a break.

Guarantee
---------
Every audit event commits to its predecessor: ``hash = SHA-256(prev_hash ||
canonical_json(header))`` where the header holds the event's sequence number,
UTC time, run, kind, actor and payload. Anyone holding the events can
recompute the chain (:func:`find_chain_break`), so an edited, deleted,
inserted or reordered event is found and *named*:

* **hash mismatch** at seq ``n``: the stored hash of event ``n`` is not the hash
  of its own contents (its payload, kind, actor, time, run or seq was edited,
  or the contents of two rows were swapped);
* **broken link** at seq ``n``: event ``n``'s ``prev_hash`` is not the hash of
  event ``n - 1`` (an event before it was replaced by a forged one whose own
  hash is consistent, e.g. an insertion with re-numbered successors);
* **gap** at seq ``n``: the event numbered ``n`` is missing (a deleted row);
* **out of order** at seq ``n``: a sequence number repeats or goes backwards.

This module knows nothing of signatures. The chain alone cannot tell a
rewritten history whose hashes were all recomputed (no key is needed for
that) from the genuine one, nor a history cut short at the end: the server's
signed heads over the chain, and the whole-history verification that checks
them (bad seal, truncated tail, unsealed tail), are in :mod:`common.audit.seal`.

Assumptions: SHA-256 is collision- and second-preimage resistant; seq
numbers start at 1 and the first event's ``prev_hash`` is :data:`GENESIS_HASH`.

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
from typing import Any

from common.errors import DataError

__all__ = [
    "CHAIN_VERSION",
    "GENESIS_HASH",
    "AuditEvent",
    "canonical_json",
    "event_hash",
    "find_chain_break",
    "is_hex_digest",
    "make_event",
    "parse_canonical_json",
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
