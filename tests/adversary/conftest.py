"""The adversary suite: each test plays a hostile coordinator (or colluding sites) against
real site code over the in-memory Grid (``tests/support/fake_grid.py``) and asserts the
defence refuses or detects the attack.

Makes the in-memory test doubles in ``tests/support`` importable (``import fake_grid``).
"""

from __future__ import annotations

import sys
from pathlib import Path

SUPPORT = str(Path(__file__).resolve().parents[1] / "support")
if SUPPORT not in sys.path:
    sys.path.insert(0, SUPPORT)
