"""The site's witness copy of the server's signed audit heads.

Every instruction carries the server's latest signed head, and the run's
final head comes in a last message after the run ends. The site keeps each
new one (append-only JSON lines in its state directory), so that later
`fedseal-client audit check` can show whether the server's exported history
still contains what this site saw: history cannot be rewritten without the
sites' copies disagreeing.

A head is checked before it is stored (:func:`witness_head`); one that fails
is refused and not stored:

* with a pinned coordinator key, its Ed25519 signature must verify under
  that key (stops heads made up or signed by another key: they would fill
  the witness file with copies that prove nothing);
* its seq must not go back for its record, and a head at the seq already
  witnessed must name the same hash (stops a stale head, e.g. an old,
  validly signed head of a history that was rewritten since, being taken as
  the site's newest copy, and records equivocation instead of hiding it);
* within one run, every head must be for the same record (stops a head of
  another record, signed long ago with the same key, being passed off as
  this run's).

The newest head per record and the record of each run are kept in a small
index next to the file (``witnessed-heads.index.json``, replaced
crash-safely); it names the file size it describes and is rebuilt from the
file when the two disagree (a crash between the append and the index).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from client.state import WITNESS_INDEX_FILE, replace_file, site_lock
from common.audit.seal import SignedHead
from common.audit.witness import parse_witness_entries
from common.errors import DataError, IntegrityError

MAX_HEAD_BYTES = 1024
MAX_RUN_ID_CHARS = 256


class HeadRefused(DataError):
    """A received audit head failed a check and was not stored (one line: why)."""


@dataclass(slots=True)
class _Index:
    size: int = 0  # the witness file's size this index describes
    newest: dict[str, tuple[int, str]] = field(default_factory=dict)  # record -> (seq, hash)
    runs: dict[str, str] = field(default_factory=dict)  # run id -> record id

    def add(self, head: SignedHead, run_id: str | None) -> None:
        seq, _ = self.newest.get(head.record_id, (0, ""))
        if head.seq >= seq:
            self.newest[head.record_id] = (head.seq, head.head_hash)
        if run_id is not None:
            self.runs.setdefault(run_id, head.record_id)

    def encode(self) -> bytes:
        doc = {
            "v": 1,
            "size": self.size,
            "newest": {r: list(v) for r, v in self.newest.items()},
            "runs": self.runs,
        }
        return json.dumps(doc, sort_keys=True).encode("utf-8")


def witness_head(
    path: Path,
    head_bytes: object,
    *,
    run_id: str | None = None,
    trusted_key: bytes | None = None,
) -> SignedHead:
    """Check a received signed head and store it (once: a head already witnessed is not repeated).

    Parameters
    ----------
    path : Path
        The site's witness file (``witnessed-heads.jsonl``).
    head_bytes : object
        The head as the instruction carries it (:meth:`SignedHead.encode`).
    run_id : str or None
        The run whose instruction carried it.
    trusted_key : bytes or None
        The pinned coordinator key (raw 32 bytes); ``None``: not verified.

    Raises
    ------
    HeadRefused
        Malformed, not signed by the trusted key, older than (or conflicting
        with) the newest witnessed head of its record, or for another record
        than this run's earlier heads. Nothing is stored.
    """
    if not isinstance(head_bytes, bytes) or len(head_bytes) > MAX_HEAD_BYTES:
        raise HeadRefused("audit head must be at most 1024 bytes")
    if run_id is not None and (not isinstance(run_id, str) or len(run_id) > MAX_RUN_ID_CHARS):
        raise HeadRefused("audit head: bad run id")
    try:
        head = SignedHead.decode(head_bytes)
    except DataError as exc:
        raise HeadRefused(str(exc)) from None
    if trusted_key is not None:
        try:
            head.verify(Ed25519PublicKey.from_public_bytes(trusted_key))
        except (IntegrityError, ValueError):
            raise HeadRefused(
                f"audit head seq {head.seq} is not signed by the trusted server key "
                f"{trusted_key.hex()[:16]}..."
            ) from None
    with site_lock(path.parent):
        index = _load_index(path)
        newest = index.newest.get(head.record_id)
        if newest is not None:
            seq, head_hash = newest
            if head.seq < seq:
                raise HeadRefused(
                    f"audit head seq {head.seq} is older than seq {seq} already witnessed "
                    f"for record {head.record_id}"
                )
            if head.seq == seq and head.head_hash != head_hash:
                raise HeadRefused(
                    f"audit head seq {head.seq} names another hash than the head already "
                    f"witnessed at that seq (record {head.record_id})"
                )
        run_record = index.runs.get(run_id) if run_id is not None else None
        if run_record is not None and run_record != head.record_id:
            raise HeadRefused(
                f"audit head is for record {head.record_id}, but run {run_id}'s heads are "
                f"for record {run_record}"
            )
        if newest is not None and head.seq == newest[0] and run_record is not None:
            return head  # every message of a round carries the same head: keep it once
        if newest is None or head.seq > newest[0]:
            line = {"head": head.encode().hex()} | ({"run": run_id} if run_id else {})
            with path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(line, sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        index.add(head, run_id)
        index.size = path.stat().st_size if path.is_file() else 0
        replace_file(path.parent / WITNESS_INDEX_FILE, index.encode())
    return head


def _load_index(path: Path) -> _Index:
    """The witness index, rebuilt from the file if missing, unreadable or stale."""
    size = path.stat().st_size if path.is_file() else 0
    try:
        doc = json.loads((path.parent / WITNESS_INDEX_FILE).read_bytes())
        if doc.get("v") == 1 and doc.get("size") == size:
            return _Index(
                size,
                {str(r): (int(v[0]), str(v[1])) for r, v in doc["newest"].items()},
                {str(k): str(v) for k, v in doc["runs"].items()},
            )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        pass
    index = _Index(size)
    for head, run_id in _read(path):
        index.add(head, run_id)
    return index


def _read(path: Path) -> list[tuple[SignedHead, str | None]]:
    if not path.is_file():
        return []
    return parse_witness_entries(path.read_text(encoding="utf-8").splitlines(), str(path))


def read_heads(path: Path) -> list[SignedHead]:
    """All heads this site has witnessed, oldest first."""
    return [head for head, _ in _read(path)]
