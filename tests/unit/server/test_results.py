"""What the coordinator makes of what sites state: optional figures, the site's own delta."""

from __future__ import annotations

from common.config import RunConfig
from server.aggregation.replies import site_outcome
from server.results import RoundResult, result_document


def test_site_outcome_keeps_only_what_the_site_stated_with_its_own_delta() -> None:
    stated = {"record-level-epsilon": 2.5, "record-level-delta": 1e-7, "private-scaling": 1}
    outcome = site_outcome(7, stated)
    assert (outcome.num_examples, outcome.train_seconds, outcome.energy_kwh) == (None, None, None)
    assert outcome.record_level_epsilon == 2.5 and outcome.record_level_delta == 1e-7
    assert outcome.private_scaling is True
    assert site_outcome(8, {}).private_scaling is None


def test_result_document_names_the_sites_deltas_private_scaling_and_what_is_withheld() -> None:
    cfg = RunConfig(dataset="custom", num_features=4, num_classes=2, dp=True)
    sites = (
        site_outcome(7, {"record-level-epsilon": 1.0, "record-level-delta": 1e-7}),
        site_outcome(9, {"record-level-delta": 1e-6, "private-scaling": 1}),
    )
    result = RoundResult(1, None, None, 2, 2, 0.1, sites, evaluation="withheld")
    doc = result_document("abc", cfg, [result], None)
    assert doc["privacy"]["site_deltas_reported"] == [1e-7, 1e-6]
    assert doc["privacy"]["private_scaling_sites"] == ["9"]
    assert "outside the accountant" in doc["privacy"]["feature_scaling"]
    assert "withheld under DP" in doc["energy"]["per_site"]
    assert doc["evaluation"] == {
        "metric_of_record": "none",
        "note": "no held-out evaluation set at the coordinator (dataset 'custom'), and under DP "
        "the sites release no local-test metrics: rounds report no accuracy or loss",
    }
    public = result_document("abc", cfg.replace(dataset="digits", num_features=0), [], None)
    assert (
        public["evaluation"]["note"] is None
        and public["evaluation"]["metric_of_record"] == "central"
    )
