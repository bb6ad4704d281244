"""The site's witness copy of the server's signed audit heads.

Every round instruction carries the server's latest signed head. The site
keeps each new one (append-only JSON lines in its state directory), so that
later `fedseal-client audit check` can show whether the server's exported
history still contains what this site saw: history cannot be rewritten
without the sites' copies disagreeing.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.audit.seal import SignedHead
from common.errors import DataError

MAX_HEAD_BYTES = 1024


def witness_head(path: Path, head_bytes: object) -> SignedHead:
    """Decode and store a received signed head (skipped if it equals the last one)."""
    if not isinstance(head_bytes, bytes) or len(head_bytes) > MAX_HEAD_BYTES:
        raise DataError("audit head must be at most 1024 bytes")
    head = SignedHead.decode(head_bytes)
    line = json.dumps({"head": head.encode().hex()})
    if _last_line(path) != line:  # every stage of a round carries the same head: keep it once
        with path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
    return head


def _last_line(path: Path) -> str | None:
    """The file's last non-empty line, read from its end (the file only grows)."""
    if not path.is_file():
        return None
    with path.open("rb") as fh:
        fh.seek(0, 2)
        fh.seek(max(0, fh.tell() - 4 * MAX_HEAD_BYTES))
        lines = fh.read().decode("utf-8", "replace").splitlines()
    return next((ln for ln in reversed(lines) if ln.strip()), None)


def read_heads(path: Path) -> list[SignedHead]:
    """All heads this site has witnessed, oldest first."""
    if not path.is_file():
        return []
    heads = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            heads.append(SignedHead.decode(bytes.fromhex(json.loads(line)["head"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}:{line_no}: unreadable witnessed head ({exc})") from None
    return heads
