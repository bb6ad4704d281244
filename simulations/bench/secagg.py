"""Secure-aggregation benchmark: plain FedAvg vs fedseal SecAgg+ vs Flower's SecAgg+, one run.

Every variant runs on Flower's Simulation Engine with the same number of
sites, whose clients do no training (they return a fixed update), so what is
timed is the protocol: messages, serialisation, crypto, aggregation. The
figure per variant is the median round time over rounds after the first
(the first round pays for actor start-up and imports).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from common.config import RunConfig


@dataclass(frozen=True, slots=True)
class BenchRow:
    clients: int
    params: int
    plain_s: float
    fedseal_s: float | None
    flower_secaggplus_s: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "params": self.params,
            "plain_s": self.plain_s,
            "fedseal_s": self.fedseal_s,
            "flower_secaggplus_s": self.flower_secaggplus_s,
        }


def _median_after_first(times: Sequence[float]) -> float:
    if len(times) < 2:
        raise ValueError("need at least two rounds to drop the first")
    return float(statistics.median(times[1:]))


def echo_config(
    clients: int, params: int, rounds: int, *, secagg: bool, setup_rounds: int | None = None
) -> RunConfig:
    """A run whose sites return a fixed update for a ``params``-long parameter vector."""
    fields: dict[str, Any] = dict(
        dataset="custom",
        model="vector",
        workload="echo",
        num_features=params,
        num_classes=2,
        num_sites=clients,
        rounds=rounds,
        min_sites=clients,
        fraction_train=1.0,
    )
    known = RunConfig.__dataclass_fields__
    if "secagg" in known:
        fields["secagg"] = secagg
    elif secagg:
        raise ValueError("this build of fedseal has no secure aggregation")
    if setup_rounds is not None:
        fields["secagg_setup_rounds"] = setup_rounds
    # Differential privacy (whatever switches this build has) stays off: the
    # benchmark times the aggregation protocol alone.
    for name, spec in known.items():
        if name.endswith("dp") and str(spec.type) == "bool":
            fields[name] = False
    return RunConfig(**fields)


def time_fedseal(
    clients: int, params: int, rounds: int, *, secagg: bool, setup_rounds: int | None = None
) -> float:
    from simulations.engine import run_simulation

    cfg = echo_config(clients, params, rounds, secagg=secagg, setup_rounds=setup_rounds)
    _, results = run_simulation(cfg, cpus_per_site=1.0)
    return _median_after_first([r.seconds for r in results])


def time_flower_secaggplus(clients: int, params: int, rounds: int) -> float:
    from common.env import apply_safe_flower_env

    apply_safe_flower_env()
    from flwr.simulation import run_simulation as flwr_run_simulation

    from simulations.bench.flower_secaggplus import make_apps
    from simulations.engine import _shutdown_ray

    round_times: dict[int, float] = {}
    server_app, client_app = make_apps(clients, params, rounds, round_times)
    try:
        flwr_run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=clients,
            backend_config={
                "client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
                "init_args": {
                    "include_dashboard": False,
                    "logging_level": "ERROR",
                    "log_to_driver": False,
                },
            },
        )
    finally:
        _shutdown_ray()
    if len(round_times) != rounds:
        raise RuntimeError(f"Flower SecAgg+ completed {len(round_times)} of {rounds} rounds")
    return _median_after_first([round_times[r] for r in sorted(round_times)])


def run_bench(
    clients: Sequence[int],
    params: Sequence[int],
    rounds: int = 3,
    *,
    include_flower: bool = True,
    on_row: Callable[[BenchRow], None] | None = None,
    setup_rounds: int | None = None,
) -> list[BenchRow]:
    """Time every (clients, params) cell for each variant; rows in the order measured."""
    import logging

    logging.getLogger("flwr").setLevel(logging.ERROR)
    rows = []
    for n in clients:
        for m in params:
            plain = time_fedseal(n, m, rounds, secagg=False)
            try:
                fedseal: float | None = time_fedseal(
                    n, m, rounds, secagg=True, setup_rounds=setup_rounds
                )
            except ValueError:
                fedseal = None
            flower = time_flower_secaggplus(n, m, rounds) if include_flower else None
            row = BenchRow(n, m, plain, fedseal, flower)
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


def timestamp() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())
