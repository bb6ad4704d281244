"""Per-round results: what the server reports to observers and writes as JSON.

A :class:`RoundResult` holds everything the coordinator knows about a round.
What leaves the coordinator (``result.json`` and ``--json``, the record's
round metrics that reports and model cards are drawn from, the round's log
line) is :meth:`RoundResult.released`: under client-level DP that view keeps
nothing that depends on how many sites took part (see its docstring); the
coordinator's own audit log keeps who was sampled and who contributed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from common.config import RunConfig


@dataclass(frozen=True, slots=True)
class SiteOutcome:
    """One sampled site's part in a round: only what the site stated (None: not stated).

    Under DP a site states no example count, train time or energy (its
    dataset size is private) and its record-level ε comes with its own δ
    (README, "Privacy, precisely").
    """

    node_id: int
    accepted: bool
    reason: str = ""
    num_examples: int | None = None
    train_seconds: float | None = None
    refused: bool = False
    record_level_epsilon: float | None = None  # the site's lifetime total for this dataset
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    energy_kwh: float | None = None
    co2eq_g: float | None = None
    energy_estimated: bool | None = None
    record_level_delta: float | None = None  # the site's own delta, at which its ε holds
    private_scaling: bool | None = None  # features standardised on its records (its policy allows)


@dataclass(frozen=True, slots=True)
class RoundResult:
    """One round as the run reports it; a failed round (``failed``) changed nothing.

    A failed round (a protocol abort, too few usable updates, a policy denial
    of its parameters) kept the global model as it was and released nothing:
    no accuracy, loss, client-level epsilon or energy; ``failure`` says why.
    """

    round: int
    accuracy: float | None
    loss: float | None
    participants: int | None  # None: withheld (released under client-level DP)
    sampled: int | None  # likewise
    seconds: float | None  # likewise
    sites: tuple[SiteOutcome, ...] = field(default_factory=tuple)
    # "central" (the server's held-out split, the metric of record), "federated" (the sites'
    # local-test figures), "withheld" (no held-out split, and under DP the sites release
    # none), "none" (failed or not evaluated)
    evaluation: str = "central"
    secagg: dict[str, int] | None = None  # participants, dropouts, threshold, neighbours
    client_level_epsilon: float | None = None  # DP-FedAvg, run so far (None when off)
    energy: dict[str, float | bool] | None = None  # kwh, co2eq_g, estimated (sum over sites)
    failed: bool = False  # the round ended without a model update (see ``failure``)
    failure: str | None = None  # why it failed

    def released(self, client_level_dp: bool) -> RoundResult:
        """The round as it may leave the coordinator.

        Without client-level DP, the round itself. Under client-level DP the
        realised count is the one thing the noise does not hide (dividing by
        it, or publishing it, gives ``delta >= q^N``: :mod:`common.dp.central`),
        so everything that depends on it is withheld: ``participants`` and
        ``sampled``, the per-site outcomes (``sites``: who was asked, who
        refused, their record-level figures), the secure-aggregation counts
        (``secagg``: the threshold and degree are resolved from the cohort
        size), the round's energy (zero exactly when nobody trained) and its
        duration (a noise-only round takes no time), and the failure text
        (it may quote counts; it stays in the audit log's ``round_failed``).
        What remains (accuracy, loss, epsilon, whether the round failed) is
        computed from the released model or fixed by the plan.
        """
        if not client_level_dp:
            return self
        return replace(
            self,
            participants=None,
            sampled=None,
            seconds=None,
            sites=(),
            secagg=None,
            energy=None,
            failure=WITHHELD_FAILURE if self.failed else None,
        )

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["sites"] = [asdict(s) for s in self.sites]
        return out

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RoundResult:
        """Inverse of :meth:`to_json` (used when a run is resumed from the record)."""
        fields = dict(doc)
        fields["sites"] = tuple(SiteOutcome(**s) for s in fields.get("sites", ()))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in fields.items() if k in known})


WITHHELD_FAILURE = (
    "the round failed; under client-level DP its reason stays in the coordinator's "
    "audit log (round_failed)"
)


class RoundObserver(Protocol):
    """Receives progress from a running ServerApp (progress bars, records)."""

    def on_start(self, run_id: str, total_rounds: int) -> None: ...

    def on_round(self, result: RoundResult) -> None: ...

    def on_finish(self, results: list[RoundResult]) -> None: ...


class NullObserver:
    def on_start(self, run_id: str, total_rounds: int) -> None:
        pass

    def on_round(self, result: RoundResult) -> None:
        pass

    def on_finish(self, results: list[RoundResult]) -> None:
        pass


def round_energy(
    sites: tuple[SiteOutcome, ...] | list[SiteOutcome],
) -> dict[str, float | bool] | None:
    """Energy of a round: the sum over the sites that reported it; estimated if any part is."""
    reported = [s for s in sites if s.energy_kwh is not None]
    if not reported:
        return None
    return {
        "kwh": sum(s.energy_kwh or 0.0 for s in reported),
        "co2eq_g": sum(s.co2eq_g or 0.0 for s in reported),
        "estimated": any(bool(s.energy_estimated) for s in reported),
    }


def evaluation_note(cfg: RunConfig) -> str | None:
    """One line saying what stands in for the metric of record, when it is not central.

    The server's own held-out evaluation is the metric of record; a run on
    the sites' own data (``dataset = custom``) has none.
    """
    if cfg.dataset != "custom" or cfg.workload != "train":
        return None
    if cfg.dp or cfg.central_dp:
        return (
            "no held-out evaluation set at the coordinator (dataset 'custom'), and under DP "
            "the sites release no local-test metrics: rounds report no accuracy or loss"
        )
    return (
        "no held-out evaluation set at the coordinator (dataset 'custom'): accuracy and loss "
        "are the sites' own local-test figures, not a metric of record"
    )


ENERGY_WITHHELD = (
    "per-site energy withheld under DP: a site's energy and train time grow with its "
    "dataset size, which is private"
)


def result_document(
    run_id: str,
    cfg: RunConfig,
    results: list[RoundResult],
    stopped: str | None,
    client_level: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A run's results as the JSON document fedseal prints (``--json``) and writes.

    Every round as released (:meth:`RoundResult.released`); ``client_level``
    (from :class:`server.privacy.ClientLevelOutlook`) describes the central
    noise: its fixed denominator, sensitivity and std on the mean. What the
    privacy block says about the sites (their reported deltas, who scaled on
    private records) is read from the released rounds only.
    """
    rounds = [r.released(cfg.central_dp) for r in results]
    accepted = [s for r in rounds for s in r.sites if s.accepted]
    site_deltas = sorted({s.record_level_delta for s in accepted if s.record_level_delta})
    private_scaling = sorted({s.node_id for s in accepted if s.private_scaling})
    return {
        "run_id": run_id,
        "config": asdict(cfg),
        "rounds": [r.to_json() for r in rounds],
        "failed_rounds": [r.round for r in results if r.failed],
        "stopped": stopped,
        "evaluation": {
            "metric_of_record": "central" if cfg.dataset != "custom" else "none",
            "note": evaluation_note(cfg),
        },
        "energy": {"per_site": ENERGY_WITHHELD if cfg.dp or cfg.central_dp else "reported"},
        "privacy": {
            "site_dp": cfg.dp,
            "site_delta": cfg.site_delta,
            # each site's record-level ε is at its own δ (its policy's), as it reports it
            "site_deltas_reported": site_deltas,
            "feature_scaling": (
                "public bounds (declared by the site, or published with the dataset)"
                if not private_scaling
                else "standardised on private records, outside the accountant, at the sites "
                f"whose policy allows it: {private_scaling}"
            )
            if cfg.dp
            else "fitted on each site's own training split (no record-level DP)",
            "private_scaling_sites": [str(n) for n in private_scaling],
            "central_dp": cfg.central_dp,
            "delta": cfg.delta,
            "accountant": cfg.accountant,
            "client_level_sampling": (
                f"poisson(q={cfg.client_sample_rate})"
                if cfg.client_sampling == "poisson"
                else "fixed cohort: accounted without amplification (q=1)"
            ),
            "client_level": client_level,
            "units": {
                "record_level_epsilon": "per site dataset, DP-SGD (example-level), lifetime total from the site ledger, at the site's own delta (sites[].record_level_delta)",
                "client_level_epsilon": "per run, DP-FedAvg (site-level)",
            },
        },
    }
