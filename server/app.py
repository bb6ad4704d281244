"""The fedseal ServerApp (Flower Message API)."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import SERVER_ONLY_PREFIX, RunConfig
from server.results import RoundObserver
from server.rounds import FederatedRun

# Coordinator-only run_config keys (never sent to sites).
KEY_OUT_DIR = SERVER_ONLY_PREFIX + "out-dir"


def make_server_app(
    cfg: RunConfig | None = None,
    observer: RoundObserver | None = None,
    out_dir: Path | None = None,
) -> ServerApp:
    """Build the ServerApp.

    ``cfg`` given: use it (simulations pass their options this way); otherwise
    read Flower's ``context.run_config`` (``flwr run``, deployments), where
    ``server-out-dir`` names the directory for ``result.json``.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else RunConfig.from_flower(context.run_config)
        target = out_dir
        configured = context.run_config.get(KEY_OUT_DIR)
        if target is None and isinstance(configured, str) and configured:
            target = Path(configured)
        FederatedRun(run_cfg, grid, observer, target).execute()

    return server_app


app = make_server_app()
