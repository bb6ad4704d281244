"""Feature scaling without a leak: public bounds under record-level DP, fitting only by consent.

Fitting a mean and spread on private records releases statistics of them
that DP-SGD's accountant does not cover; each test below names what it stops.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from site_files import random_site_csv

from client.site import load_site_data
from common.config import RunConfig
from common.data import (
    BREAST_CANCER_BOUNDS,
    PRIVATE_SCALING_REFUSED,
    FeatureBounds,
    Standardizer,
    load_builtin,
    load_site_file,
)
from common.errors import ConfigurationError, DataError
from common.task import task_for


def _csv(path: Path) -> Path:
    return random_site_csv(path, rows=200, features=4, high=11, classes=3, seed=3)


def _cfg(dp: bool) -> RunConfig:
    return RunConfig(dataset="custom", num_features=4, num_classes=3, dp=dp)


def test_site_file_under_dp_without_public_bounds_is_refused_not_standardised(
    tmp_path: Path,
) -> None:
    node = {"data-path": str(_csv(tmp_path / "site.csv")), "dataset-id": "clinic"}
    with pytest.raises(ConfigurationError) as refused:
        load_site_data(_cfg(True), task_for(_cfg(True)), node)
    assert str(refused.value) == PRIVATE_SCALING_REFUSED
    fitted = load_site_data(_cfg(False), task_for(_cfg(False)), node)  # no DP: fitted, as before
    assert fitted.private_scaling


def test_declared_bounds_scale_by_the_bounds_alone_whatever_the_records(tmp_path: Path) -> None:
    path = _csv(tmp_path / "site.csv")
    node = {"data-path": str(path), "dataset-id": "clinic", "feature-bounds": "0:20"}
    data = load_site_data(_cfg(True), task_for(_cfg(True)), node)
    assert not data.private_scaling
    raw = load_site_file(path, num_classes=3).x[data.train.index].astype(np.float32)
    np.testing.assert_allclose(data.x_train, (raw - 10.0) / 10.0, rtol=0, atol=1e-6)


def test_site_policy_consent_allows_standardising_on_private_records_and_says_so(
    tmp_path: Path,
) -> None:
    node = {"data-path": str(_csv(tmp_path / "site.csv")), "dataset-id": "clinic"}
    data = load_site_data(_cfg(True), task_for(_cfg(True)), node, allow_private_scaling=True)
    assert data.private_scaling  # reported with the site's epsilon (metric private-scaling)


def test_builtin_datasets_under_dp_use_their_published_bounds() -> None:
    for name in ("digits", "breast_cancer"):
        cfg = RunConfig(dataset=name, num_sites=4, dp=True)
        data = load_site_data(cfg, task_for(cfg), {"partition-id": 1, "num-partitions": 4})
        assert not data.private_scaling, name


def test_breast_cancer_bounds_are_the_documented_table_and_hold_every_record() -> None:
    from sklearn.datasets import load_breast_cancer

    rows = re.findall(
        r"^\s*[a-z ]+\((?:mean|standard error|worst)\):\s+([\d.]+)\s+([\d.]+)\s*$",
        load_breast_cancer().DESCR,
        flags=re.MULTILINE,
    )
    assert len(rows) == 30
    documented = np.array(rows, dtype=np.float64)
    np.testing.assert_array_equal(BREAST_CANCER_BOUNDS.low, documented[:, 0])
    np.testing.assert_array_equal(BREAST_CANCER_BOUNDS.high, documented[:, 1])
    x = load_builtin("breast_cancer").x
    # the table is rounded to about 4 digits: every record lies within it up to that
    assert (x >= documented[:, 0] * (1 - 1e-3) - 1e-3).all()
    assert (x <= documented[:, 1] * (1 + 1e-3) + 1e-3).all()


def test_feature_bounds_text_round_trips_and_refuse_a_wrong_feature_count() -> None:
    per_feature = FeatureBounds.parse("0:1, -2.5:3,1e-3:4")
    assert FeatureBounds.parse(per_feature.text()).text() == per_feature.text()
    np.testing.assert_array_equal(per_feature.low, [0.0, -2.5, 1e-3])
    with pytest.raises(DataError, match="given for 3 features, the data has 4"):
        Standardizer.from_bounds(per_feature, 4)
    for bad in ("", "1", "a:b", "2:1", "0:inf"):
        with pytest.raises(DataError):
            FeatureBounds.parse(bad)
    scaler = Standardizer.from_bounds(FeatureBounds.uniform(0, 16), 2)
    np.testing.assert_array_equal(scaler.transform(np.array([[0, 16]], np.uint8)), [[-1, 1]])
    assert scaler.public


def test_site_without_public_bounds_is_refused_at_admission_in_its_own_category(
    tmp_path: Path,
) -> None:
    from fake_grid import server_identity
    from site_messages import instruction, site_context

    from client.agent import SiteContext
    from client.secure import data_misfit

    context = site_context(0)
    context.node_config.update({"data-path": str(_csv(tmp_path / "site.csv")), "dataset-id": "c"})
    with server_identity():
        dp = SiteContext.of(instruction(_cfg(True)), context, tmp_path)
        plain = SiteContext.of(instruction(_cfg(False)), context, tmp_path)
    assert data_misfit(dp) == "data: the site declares no public feature bounds for record-level DP"
    assert data_misfit(plain) is None
