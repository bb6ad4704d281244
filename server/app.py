"""The fedseal ServerApp (Flower Message API)."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from server.results import RoundObserver
from server.rounds import FederatedRun


def make_server_app(
    cfg: RunConfig | None = None, observer: RoundObserver | None = None
) -> ServerApp:
    """Build the ServerApp.

    ``cfg`` given: use it (simulations pass their options this way); otherwise
    read Flower's ``context.run_config`` (``flwr run``, deployments).
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else RunConfig.from_flower(context.run_config)
        FederatedRun(run_cfg, grid, observer).execute()

    return server_app


app = make_server_app()
