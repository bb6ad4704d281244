"""Secure-aggregation benchmark: plain FedAvg vs fedseal SecAgg+ vs Flower's SecAgg+.

Every variant runs on Flower's Simulation Engine with the same number of
sites, whose clients do no training (they return a fixed update), so what is
timed is the protocol: messages, serialisation, crypto, aggregation. A
variant's figure in one run is its median round time over rounds after the
first (the first round pays for actor start-up and imports).

These machines are noisy, so one run is not a figure: each cell runs
``repeats`` times with the variants interleaved (plain, fedseal, Flower,
plain, fedseal, ...), a ratio is taken within each repeat (the variants of
one repeat saw the same load), and the cell reports the median and the
min-max of those ratios.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from common.config import RunConfig


@dataclass(frozen=True, slots=True)
class Spread:
    """The median and the range of a figure over repeats."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread | None:
        if not values:
            return None
        return cls(float(statistics.median(values)), float(min(values)), float(max(values)))

    def to_json(self) -> dict[str, float]:
        return {"median": self.median, "min": self.low, "max": self.high}


@dataclass(frozen=True, slots=True)
class Sample:
    """One repeat of one cell: each variant's median round time (None: not run or not built)."""

    plain_s: float
    fedseal_s: float | None
    flower_secaggplus_s: float | None


@dataclass(frozen=True, slots=True)
class BenchRow:
    """One cell over its repeats: medians of the times, and of the per-repeat ratios."""

    clients: int
    params: int
    samples: tuple[Sample, ...]

    def _times(self, name: str) -> list[float]:
        return [v for s in self.samples if (v := getattr(s, name)) is not None]

    @property
    def plain_s(self) -> float:
        return float(statistics.median(self._times("plain_s")))

    @property
    def fedseal_s(self) -> float | None:
        times = self._times("fedseal_s")
        return float(statistics.median(times)) if times else None

    @property
    def flower_secaggplus_s(self) -> float | None:
        times = self._times("flower_secaggplus_s")
        return float(statistics.median(times)) if times else None

    @property
    def fedseal_over_plain(self) -> Spread | None:
        """fedseal / plain within each repeat."""
        return Spread.of(
            [r for s in self.samples if (r := ratio(s.fedseal_s, s.plain_s)) is not None]
        )

    @property
    def flower_over_fedseal(self) -> Spread | None:
        """Flower's SecAgg+ / fedseal within each repeat."""
        return Spread.of(
            [
                r
                for s in self.samples
                if (r := ratio(s.flower_secaggplus_s, s.fedseal_s)) is not None
            ]
        )

    def to_json(self) -> dict[str, Any]:
        spreads = {
            "fedseal_over_plain": self.fedseal_over_plain,
            "flower_over_fedseal": self.flower_over_fedseal,
        }
        return {
            "clients": self.clients,
            "params": self.params,
            "repeats": len(self.samples),
            "plain_s": self.plain_s,
            "fedseal_s": self.fedseal_s,
            "flower_secaggplus_s": self.flower_secaggplus_s,
            **{k: (v.to_json() if v is not None else None) for k, v in spreads.items()},
            "samples": [
                {
                    "plain_s": s.plain_s,
                    "fedseal_s": s.fedseal_s,
                    "flower_secaggplus_s": s.flower_secaggplus_s,
                }
                for s in self.samples
            ],
        }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def _median_after_first(times: Sequence[float]) -> float:
    if len(times) < 2:
        raise ValueError("need at least two rounds to drop the first")
    return float(statistics.median(times[1:]))


def echo_config(
    clients: int,
    params: int,
    rounds: int,
    *,
    secagg: bool,
    setup_rounds: int | None = None,
    distributed_dp: bool = False,
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
    if distributed_dp:  # the one DP variant timed: the sites' noise is part of the protocol
        fields.update(distributed_dp=True, secagg_bits=20)
    return RunConfig(**fields)


def time_fedseal(
    clients: int,
    params: int,
    rounds: int,
    *,
    secagg: bool,
    setup_rounds: int | None = None,
    distributed_dp: bool = False,
) -> float:
    from simulations.engine import run_simulation

    cfg = echo_config(
        clients,
        params,
        rounds,
        secagg=secagg,
        setup_rounds=setup_rounds,
        distributed_dp=distributed_dp,
    )
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
    repeats: int = 1,
    on_sample: Callable[[int, int, int, Sample], None] | None = None,
) -> list[BenchRow]:
    """Time every (clients, params) cell ``repeats`` times, variants interleaved; rows in order."""
    import logging

    if type(repeats) is not int or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    rows = []
    for n in clients:
        for m in params:
            samples = []
            for repeat in range(repeats):
                plain = time_fedseal(n, m, rounds, secagg=False)
                try:
                    fedseal: float | None = time_fedseal(
                        n, m, rounds, secagg=True, setup_rounds=setup_rounds
                    )
                except ValueError:
                    fedseal = None
                flower = time_flower_secaggplus(n, m, rounds) if include_flower else None
                sample = Sample(plain, fedseal, flower)
                samples.append(sample)
                if on_sample:
                    on_sample(n, m, repeat + 1, sample)
            row = BenchRow(n, m, tuple(samples))
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


def timestamp() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())
