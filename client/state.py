"""Where a site keeps its own state: ledger, witnessed audit heads, the state-sealing key,
and (deployed sites) the copy of the site policy in force.

Resolution of the site's state directory, first match wins:

1. ``state-dir`` in the SuperNode's node config (``fedseal-client start``);
2. the simulation's site root (``<out>/sites/site-<partition-id>``);
3. ``$FLWR_HOME/fedseal-sites/site-<partition-id or node id>`` (e.g. ``flwr run .``).

The state key (32 random bytes, file mode 0600) seals per-round secure
aggregation secrets while they wait in Flower's node context between
messages; it never leaves the site.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.errors import ConfigurationError
from common.rng import secure_bytes

STATE_KEY_FILE = "state.key"
LEDGER_FILE = "ledger.db"
WITNESS_FILE = "witnessed-heads.jsonl"
POLICY_FILE = "policy.toml"  # the site policy `fedseal-client start` put in force
KEY_BYTES = 32


def site_dir(node_config: Mapping[str, Any], node_id: int, site_root: Path | None) -> Path:
    """The state directory of the site running this ClientApp (created if missing)."""
    if node_config.get("state-dir"):
        path = Path(str(node_config["state-dir"]))
    else:
        label = (
            f"site-{node_config['partition-id']}"
            if "partition-id" in node_config
            else f"node-{node_id}"
        )
        if site_root is not None:
            path = site_root / label
        else:
            home = os.environ.get("FLWR_HOME") or tempfile.gettempdir()
            path = Path(home) / "fedseal-sites" / label
    path.mkdir(parents=True, exist_ok=True)
    return path


def state_key(directory: Path) -> bytes:
    """This site's state-sealing key, created on first use (0600, never overwritten)."""
    path = directory / STATE_KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # another process may be writing it right now
            key = path.read_bytes()
            if len(key) == KEY_BYTES:
                return key
            time.sleep(0.05)
        raise ConfigurationError(f"{path} is corrupt: expected {KEY_BYTES} bytes") from None
    key = secure_bytes(KEY_BYTES)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
        fh.flush()
        os.fsync(fh.fileno())
    return key
