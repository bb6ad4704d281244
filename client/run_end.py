"""The run-finished marker: how a deployed site learns that its run is over.

The run's final signed audit head is the last message a site receives
(``query.audit_head``, :func:`client.app.handle_audit_head`). Once it is
verified and witnessed, the ClientApp writes ``run-finished.json`` (the run
id) into the site's private state directory; ``fedseal-client start`` polls
for it and then stops its SuperNode and exits 0, unless ``--keep-running``
keeps the site for further runs.

Only a head that passed the witness checks writes the marker, so a message
that fails the coordinator's signature (or carries a stale head) cannot end
a site's session; it is replaced crash-safely, so a reader never sees half
of it.
"""

from __future__ import annotations

import json
from pathlib import Path

from client.state import replace_file

RUN_FINISHED_FILE = "run-finished.json"
MAX_MARKER_BYTES = 4096


def mark_run_finished(directory: Path, run_id: str) -> Path:
    """Write the marker for ``run_id`` in the site's state ``directory``; its path."""
    path = directory / RUN_FINISHED_FILE
    replace_file(path, json.dumps({"run": run_id}, sort_keys=True).encode("utf-8"))
    return path


def finished_run(directory: Path) -> str | None:
    """The run id of the marker in ``directory``; None if there is none (or it is unreadable)."""
    path = directory / RUN_FINISHED_FILE
    try:
        if path.stat().st_size > MAX_MARKER_BYTES:
            return None
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    run_id = doc.get("run") if isinstance(doc, dict) else None
    return run_id if isinstance(run_id, str) and run_id else None


def clear_run_finished(directory: Path) -> None:
    """Remove a marker left by an earlier session (it must not end this one)."""
    (directory / RUN_FINISHED_FILE).unlink(missing_ok=True)
