"""The portable audit export: JSON lines a site or an auditor can verify offline.

Layout (version 1), one JSON object per line:

1. a header ``{"format": "fedseal-audit-export", "v": 1, "record_id": ..., "public_key": hex | null}``;
2. every event in seq order, ``{"type": "event", "seq", "time", "run_id", "kind",
   "actor", "payload", "prev_hash", "hash"}``;
3. every seal in the order made, ``{"type": "seal", ...}`` (:meth:`SignedHead.to_dict`).

The export carries no more trust than the database it came from: the public
key in the header is informative only; verifiers pass the key they trust.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from common.audit.chain import AuditEvent, canonical_json
from common.audit.seal import SignedHead
from common.errors import DataError

__all__ = ["EXPORT_FORMAT", "AuditExport", "encode_export", "parse_export"]

EXPORT_FORMAT = "fedseal-audit-export"
EXPORT_VERSION = 1
MAX_LINE_CHARS = 1_000_000
_EVENT_FIELDS = {"type", "seq", "time", "run_id", "kind", "actor", "payload", "prev_hash", "hash"}


@dataclass(frozen=True, slots=True)
class AuditExport:
    """A parsed export: the record's id, its events and its seals."""

    record_id: str
    public_key_hex: str | None
    events: tuple[AuditEvent, ...]
    seals: tuple[SignedHead, ...]


def encode_export(
    record_id: str,
    public_key_hex: str | None,
    events: Iterable[AuditEvent],
    seals: Sequence[SignedHead],
) -> Iterator[str]:
    """Yield the export's lines (without newline characters)."""
    header = {
        "format": EXPORT_FORMAT,
        "v": EXPORT_VERSION,
        "record_id": record_id,
        "public_key": public_key_hex,
    }
    yield canonical_json(header).decode("utf-8")
    for event in events:
        yield canonical_json({"type": "event", **event.to_dict()}).decode("utf-8")
    for seal in seals:
        yield canonical_json({"type": "seal", **seal.to_dict()}).decode("utf-8")


def _event_from(obj: dict[str, object], line_no: int) -> AuditEvent:
    if set(obj) != _EVENT_FIELDS:
        raise DataError(f"export line {line_no}: event fields must be {sorted(_EVENT_FIELDS)}")
    seq, payload = obj["seq"], obj["payload"]
    texts = [obj[k] for k in ("time", "kind", "actor", "prev_hash", "hash")]
    run_id = obj["run_id"]
    if isinstance(seq, bool) or not isinstance(seq, int):
        raise DataError(f"export line {line_no}: seq must be an integer")
    if not all(isinstance(t, str) for t in texts) or not (
        run_id is None or isinstance(run_id, str)
    ):
        raise DataError(f"export line {line_no}: event text fields must be strings")
    if not isinstance(payload, dict):
        raise DataError(f"export line {line_no}: payload must be an object")
    time, kind, actor, prev_hash, digest = (str(t) for t in texts)
    return AuditEvent(
        seq=seq,
        time=time,
        run_id=run_id if isinstance(run_id, str) else None,
        kind=kind,
        actor=actor,
        payload_json=canonical_json(payload).decode("utf-8"),
        prev_hash=prev_hash,
        hash=digest,
    )


def parse_export(lines: Iterable[str]) -> AuditExport:
    """Parse export lines (blank lines ignored).

    Raises
    ------
    DataError
        On a missing or foreign header, an unknown line type, a malformed
        event or seal, NaN/Infinity, or an over-long line; the message names
        the line number.
    """
    record_id: str | None = None
    key_hex: str | None = None
    events: list[AuditEvent] = []
    seals: list[SignedHead] = []

    def reject(name: str) -> object:
        raise DataError(f"non-finite number {name}")

    for line_no, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            continue
        if len(line) > MAX_LINE_CHARS:
            raise DataError(f"export line {line_no}: longer than {MAX_LINE_CHARS} characters")
        try:
            obj = json.loads(line, parse_constant=reject)
        except ValueError as exc:
            raise DataError(f"export line {line_no}: not JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise DataError(f"export line {line_no}: not a JSON object")
        if record_id is None:
            if obj.get("format") != EXPORT_FORMAT or obj.get("v") != EXPORT_VERSION:
                raise DataError("not a fedseal audit export (bad or missing header line)")
            rid, key = obj.get("record_id"), obj.get("public_key")
            if not isinstance(rid, str) or not rid:
                raise DataError("export header: record_id missing")
            if key is not None and not isinstance(key, str):
                raise DataError("export header: public_key must be hex or null")
            record_id, key_hex = rid, key
            continue
        kind = obj.get("type")
        if kind == "event":
            events.append(_event_from(obj, line_no))
        elif kind == "seal":
            body = {k: v for k, v in obj.items() if k != "type"}
            try:
                seals.append(SignedHead.from_dict(body))
            except DataError as exc:
                raise DataError(f"export line {line_no}: {exc}") from None
        else:
            raise DataError(f"export line {line_no}: unknown line type {kind!r}")
    if record_id is None:
        raise DataError("empty export: no header line")
    return AuditExport(record_id, key_hex, tuple(events), tuple(seals))
