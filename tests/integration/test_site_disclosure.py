"""Every message a site sends under DP, inspected: only what the privacy section declares public.

The threat: the coordinator is not trusted, so every data-dependent value
that leaves a site must be inside the DP accountant or not be sent. These
runs drive the real ClientApp (all its mods) through the in-memory Grid
(``tests/support/fake_grid.py``: every reply crosses a protobuf round trip
and is kept as the node produced it) with the real server code, over the
embedded datasets and over sites' own CSV files, with and without secure
aggregation, and look at every reply of every exchange: the admission
answer, each secure stage, each plain round.

What may leave (README, "Privacy, precisely"), written here on its own so
that a change to the site's allow-list (``client.disclosure``) that lets
anything else out fails these tests: the update (plain) or the masked
input (secure), a refusal and its reason, the site-policy decisions, and
the record-level DP-SGD plan with the site's ε and δ.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fake_grid import FIRST_NODE_ID, FakeGrid, server_identity
from federation import federated_setup
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from client.app import make_client_app
from common.config import RunConfig
from common.records import (
    KEY_ARRAYS,
    KEY_METRICS,
    KEY_PAYLOAD,
    KEY_REFUSAL,
    KEY_SECAGG_MSG,
    KEY_SITE_DECISIONS,
    KEY_VECTOR,
)
from policies import load_site_policies
from server.rounds import FederatedRun

SITES = 4
SITE_DELTA = 2e-6  # the sites' own delta (their policy), not the run's 1e-5

DECLARED_RECORDS = {KEY_ARRAYS, KEY_SECAGG_MSG, KEY_METRICS, KEY_REFUSAL, KEY_SITE_DECISIONS}
DECLARED_METRICS = {
    "refused",
    "record-level-epsilon",
    "record-level-delta",
    "noise-multiplier",
    "sample-rate",
    "dp-steps",
    "private-scaling",
}

POLICY = """kind = "site"
[privacy]
require_dp = true
epsilon_budget = 8.0
delta = {delta}
[rounds]
require_secure_aggregation = {secagg}
min_cohort_size = 2
"""


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with server_identity():
        yield


def _write_site_csvs(root: Path) -> list[Path]:
    """Four sites' own files (64 grey levels and a label each), of four different sizes."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    header = ",".join([f"f{j}" for j in range(64)] + ["label"])
    paths = []
    for i in range(SITES):
        rows = np.c_[digits.data[i::SITES], digits.target[i::SITES]][: 300 + 40 * i]
        path = root / f"site{i}.csv"
        np.savetxt(path, rows, fmt="%g", delimiter=",", header=header, comments="")
        paths.append(path)
    return paths


def _run(tmp_path: Path, source: str, secagg: bool) -> tuple[FakeGrid, FederatedRun, list]:
    if source == "csv":
        cfg = RunConfig(dataset="custom", num_features=64, num_classes=10)
    else:
        cfg = RunConfig(dataset=source)
    cfg = cfg.replace(
        num_sites=SITES,
        rounds=2,
        min_sites=2,
        dp=True,
        site_epsilon=6.0,
        accountant="rdp",
        secagg=secagg,
        device="cpu",
    )
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "default.toml").write_text(
        POLICY.format(delta=SITE_DELTA, secagg=str(secagg).lower())
    )
    setup = federated_setup(tmp_path / "sites", SITES, load_site_policies(folder))
    grid = FakeGrid(make_client_app(setup), SITES)
    if source == "csv":
        for i, path in enumerate(_write_site_csvs(tmp_path)):
            grid.contexts[FIRST_NODE_ID + i].node_config.update(
                {"data-path": str(path), "dataset-id": f"clinic-{i}", "feature-bounds": "0:16"}
            )
    run = FederatedRun(cfg, grid)
    return grid, run, run.execute()


def _check_reply(reply: Message, size: int) -> MetricRecord | None:
    """Assert ``reply`` holds only declared content; its metrics, if any."""
    assert not reply.has_error(), reply.error.reason  # an error's text could carry anything
    content = reply.content
    assert set(content.keys()) <= DECLARED_RECORDS, set(content.keys()) - DECLARED_RECORDS
    if KEY_ARRAYS in content:  # a plain round's update: one vector of the model's size
        record = content[KEY_ARRAYS]
        assert isinstance(record, ArrayRecord) and list(record.keys()) == [KEY_VECTOR]
        assert record[KEY_VECTOR].numpy().size == size
    if KEY_SECAGG_MSG in content:  # protocol bytes only (the masked input at the masked stage)
        record = content[KEY_SECAGG_MSG]
        assert isinstance(record, ArrayRecord)
        assert all(name.startswith(KEY_PAYLOAD) for name in record.keys())
    if KEY_REFUSAL in content:
        assert isinstance(content[KEY_REFUSAL], ConfigRecord)
        assert set(content[KEY_REFUSAL].keys()) == {"reason"}
    if KEY_SITE_DECISIONS in content:
        assert set(content[KEY_SITE_DECISIONS].keys()) == {"policy-hash", "decisions"}
    metrics = content.metric_records.get(KEY_METRICS)
    if metrics is not None:
        leaked = set(metrics.keys()) - DECLARED_METRICS
        assert not leaked, f"undeclared metrics leave the site: {sorted(leaked)}"
    return metrics


@pytest.mark.parametrize("secagg", [True, False], ids=["secagg", "plain"])
@pytest.mark.parametrize("source", ["digits", "breast_cancer", "csv"])
def test_site_sends_under_dp_only_the_update_its_decisions_and_the_declared_privacy_figures(
    tmp_path: Path, source: str, secagg: bool
) -> None:
    grid, run, results = _run(tmp_path, source, secagg)
    assert [r.participants for r in results] == [SITES, SITES]
    size = run.spec.size
    plans: dict[int, set[tuple[float, float, int]]] = {1: set(), 2: set()}
    stated = 0
    for exchange in grid.history:
        for reply in exchange.replies.values():
            metrics = _check_reply(reply, size)
            if metrics is None or "record-level-epsilon" not in metrics:
                continue
            stated += 1
            assert metrics["record-level-delta"] == SITE_DELTA  # the site's own delta
            assert 0 < float(metrics["record-level-epsilon"]) <= 8.0
            server_round = int(reply.metadata.group_id)
            plans[server_round].add(
                (metrics["noise-multiplier"], metrics["sample-rate"], metrics["dp-steps"])
            )
    assert stated == 2 * SITES  # every site stated its figures once per round
    # The declared plan says nothing about a site's size: the same for every site of a
    # round (the CSV sites hold four different numbers of rows).
    assert all(len(p) == 1 for p in plans.values()), plans
    (plan,) = plans[1]
    assert plan[1:] == (1.0, run.cfg.dp_local_epochs)
    # The server keeps working on what it gets: no counts, no energy; the sites' δ booked.
    for result in results:
        assert all(s.num_examples is None and s.energy_kwh is None for s in result.sites)
        assert {s.record_level_delta for s in result.sites} == {SITE_DELTA}
        assert result.energy is None
    doc = run.result_doc()
    assert doc["privacy"]["site_deltas_reported"] == [SITE_DELTA]
    assert "withheld" in doc["energy"]["per_site"]
    if source == "csv":  # no held-out set at the coordinator, and DP: no accuracy, said so
        assert [r.evaluation for r in results] == ["withheld", "withheld"]
        assert [r.accuracy for r in results] == [None, None]
        assert "no held-out evaluation set" in doc["evaluation"]["note"]
    else:
        assert [r.evaluation for r in results] == ["central", "central"]
        assert doc["evaluation"]["note"] is None
