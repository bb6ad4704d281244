"""Sites whose data does not fit the run's task are left out before any cohort is drawn.

Issue: 2 good + 3 bad sites (no label column, labels outside the classes, 63 of 64
features) used to sink every secure round: the bad sites refused at the keys stage and
pruning left too few usable sites, with 3 good sites connected. Now each site answers
the admission query once per run (its own data check, then its roster identity), the
refusals are audited with a fixed category, and the good sites' rounds complete.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fake_grid import FIRST_NODE_ID, server_identity
from federation import federated_grid
from sklearn.datasets import load_digits

from common.config import RunConfig
from server.book import RunBook
from server.record import SqlRecord
from server.rounds import FederatedRun


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with server_identity():
        yield


def _csv(path: Path, rows: slice, *, drop_feature: bool = False, label: str = "label",
         label_shift: int = 0) -> Path:  # fmt: skip
    d = load_digits()
    x, y = d.data[rows], d.target[rows] + label_shift
    if drop_feature:
        x = x[:, :-1]
    header = ",".join([f"f{j}" for j in range(x.shape[1])] + [label])
    body = "\n".join(",".join(map(str, r)) + f",{t}" for r, t in zip(x, y, strict=True))
    path.write_text(header + "\n" + body + "\n")
    return path


def test_bad_data_sites_are_excluded_at_admission_and_the_good_sites_rounds_complete(
    tmp_path: Path,
) -> None:
    files = [
        _csv(tmp_path / "good0.csv", slice(0, 200)),
        _csv(tmp_path / "good1.csv", slice(200, 400)),
        _csv(tmp_path / "good2.csv", slice(400, 600)),
        _csv(tmp_path / "nolabel.csv", slice(600, 700), label="target"),
        _csv(tmp_path / "range.csv", slice(700, 800), label_shift=5),
        _csv(tmp_path / "narrow.csv", slice(800, 900), drop_feature=True),
    ]
    grid, _ = federated_grid(tmp_path / "fed", len(files))
    for i, path in enumerate(files):
        context = grid.contexts[FIRST_NODE_ID + i]  # its partition id names its state directory
        context.node_config = {**context.node_config, "data-path": str(path)}
    cfg = RunConfig(
        dataset="custom", num_features=64, num_classes=10, model="linear", num_sites=6,
        rounds=2, min_sites=3, device="cpu", secagg=True, dp=False, local_epochs=1,
    )  # fmt: skip
    record = SqlRecord(f"sqlite:///{tmp_path / 'record.db'}")
    run = FederatedRun(
        cfg, grid, book=RunBook(record, Ed25519PrivateKey.generate(), "0000a11ce001")
    )
    results = run.execute()
    good = [FIRST_NODE_ID + i for i in range(3)]
    assert [r.failed for r in results] == [False, False], [
        (e.kind, e.payload()) for e in record.events(run.run_id) if "site" in e.kind
    ]
    assert all(r.participants == 3 and r.sampled == 3 for r in results)
    events = record.events(run.run_id)
    refused = {
        int(e.payload()["node_id"]): e.payload()["reason"]
        for e in events
        if e.kind == "site_refused" and e.payload().get("stage") == "admission"
    }
    assert sorted(refused) == [FIRST_NODE_ID + i for i in (3, 4, 5)]
    assert "unusable" in refused[FIRST_NODE_ID + 3]  # no label column
    assert "labels fall outside" in refused[FIRST_NODE_ID + 4]
    assert "feature count" in refused[FIRST_NODE_ID + 5]
    # the category only: no file name, count or line number from the site's data
    assert all("csv" not in r and "63" not in r for r in refused.values())
    cohorts = [e.payload()["cohort"] for e in events if e.kind == "secagg_setup"]
    assert cohorts and all(c == [str(n) for n in good] for c in cohorts)
    assert np.isfinite(run.global_vector).all()
    record.close()
