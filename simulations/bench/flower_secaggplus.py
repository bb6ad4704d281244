"""The peer: Flower's own SecAgg+ (legacy workflow API), for side-by-side benchmarks.

Built as Flower documents it: a legacy ``FedAvg`` strategy inside a
``LegacyContext``, ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))``
on the server and ``secaggplus_mod`` on a ``NumPyClient`` app. Clients do no
training: they return the received vector plus a fixed perturbation, so the
protocol's cost is what is measured. Each round's time runs from the
strategy's ``configure_fit`` to its ``aggregate_fit``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

ECHO_DELTA = 1e-3


def odd_num_shares(clients: int) -> int:
    """An odd ``num_shares`` near 3*log2(n), below n (Flower crashes on even values)."""
    k = max(3, round(3 * math.log2(max(clients, 2))))
    if k % 2 == 0:
        k -= 1
    while k >= clients and k > 3:
        k -= 2
    return k


def make_apps(
    clients: int, params: int, rounds: int, round_times: dict[int, float]
) -> tuple[Any, Any]:
    """Build (ServerApp, ClientApp) for Flower's SecAgg+; per-round seconds land in ``round_times``."""
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    class TimedFedAvg(FedAvg):  # type: ignore[misc]
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._start: dict[int, float] = {}

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            self._start[server_round] = time.perf_counter()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            out = super().aggregate_fit(server_round, results, failures)
            round_times[server_round] = time.perf_counter() - self._start[server_round]
            return out

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = TimedFedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=clients,
            min_available_clients=clients,
            initial_parameters=ndarrays_to_parameters([np.zeros(params, dtype=np.float32)]),
        )
        lctx = LegacyContext(
            context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy
        )
        workflow = DefaultWorkflow(
            fit_workflow=SecAggPlusWorkflow(
                num_shares=odd_num_shares(clients), reconstruction_threshold=0.6
            )
        )
        workflow(grid, lctx)

    class EchoClient(NumPyClient):  # type: ignore[misc]
        def fit(self, parameters: Any, config: Any) -> Any:
            return [p + np.float32(ECHO_DELTA) for p in parameters], 1, {}

    def client_fn(context: Context) -> Any:
        return EchoClient().to_client()

    client_app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
    return server_app, client_app
