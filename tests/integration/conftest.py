"""Make the in-memory test doubles in ``tests/support`` importable (``import fake_grid``)."""

from __future__ import annotations

import sys
from pathlib import Path

SUPPORT = str(Path(__file__).resolve().parents[1] / "support")
if SUPPORT not in sys.path:
    sys.path.insert(0, SUPPORT)

from deployment import federation  # noqa: E402,F401 - the loopback federation fixture
