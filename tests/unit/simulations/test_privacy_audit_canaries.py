"""Canary design, inclusion, planting and guesses of the one-run privacy audit."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from typer.testing import CliRunner

from client.privacy import make_private
from client.site import load_site_data
from client.training import make_loader, train_local
from common.data import Dataset, Examples, FeatureBounds, Standardizer, load_builtin
from common.errors import ConfigurationError
from common.models import build_model
from common.rng import seeded_generator
from common.task import task_for
from policies import load_site_policy
from simulations.cli import app
from simulations.privacy_audit.audit import (
    AuditSitesApp,
    audit_run_config,
    canary_scores,
    design_for,
    level_of,
    site_node_config,
    write_client_level_files,
    write_site_files,
)
from simulations.privacy_audit.canaries import (
    HIGH,
    MIDDLE,
    CanaryDesign,
    count_correct,
    draw_inclusion,
    guess,
    pad_rows,
    plant_rows,
)

SCALER_BOUNDS = FeatureBounds.uniform(0.0, 16.0)


def _scaled(design: CanaryDesign, rows: np.ndarray) -> np.ndarray:
    return Standardizer.from_bounds(SCALER_BOUNDS, design.num_features).transform(rows)


def test_each_canary_differs_from_the_neutral_input_in_its_own_feature_only() -> None:
    design = CanaryDesign(7, 64, 10)
    rows = _scaled(design, design.rows())
    assert not _scaled(design, design.neutral_row()).any()  # the middle scales to exactly 0
    assert np.array_equal(rows, np.eye(7, design.num_features, k=64, dtype=np.float32))
    assert design.labels.tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_padded_real_rows_are_exactly_zero_in_every_canary_feature() -> None:
    design = CanaryDesign(5, 64, 10)
    digits = load_builtin("digits")
    padded = pad_rows(digits.x[:40], design)
    assert np.array_equal(padded[:, :64], digits.x[:40].astype(np.uint8))
    assert not _scaled(design, padded)[:, 64:].any()
    with pytest.raises(ConfigurationError, match="grey levels"):
        pad_rows(np.full((2, 64), 17.0), design)
    with pytest.raises(ConfigurationError, match="64 features"):
        pad_rows(np.zeros((2, 63)), design)


def test_inclusion_is_a_fair_coin_per_canary() -> None:
    included = draw_inclusion(20_000, seeded_generator(1))
    assert included.dtype == bool and included.shape == (20_000,)
    assert 0.48 < included.mean() < 0.52
    # neighbours independent: the pairs (in, in) come up a quarter of the time
    assert 0.23 < np.mean(included[:-1] & included[1:]) < 0.27


def test_planted_rows_put_canaries_on_the_given_positions_and_keep_real_rows_in_order() -> None:
    real_x, real_y = np.arange(12).reshape(6, 2), np.arange(6)
    canary_x, canary_y = np.full((3, 2), -1), np.array([7, 8, 9])
    x, y = plant_rows(real_x, real_y, canary_x, canary_y, np.array([8, 0, 4, 2]))
    assert y[[8, 0, 4]].tolist() == [7, 8, 9] and (x[[8, 0, 4]] == -1).all()
    keep = np.setdiff1d(np.arange(9), [8, 0, 4])
    assert np.array_equal(x[keep], real_x) and np.array_equal(y[keep], real_y)
    with pytest.raises(ConfigurationError, match="do not fit"):
        plant_rows(real_x, real_y, canary_x, canary_y, np.array([1, 2]))
    with pytest.raises(ConfigurationError, match="distinct"):
        plant_rows(real_x, real_y, canary_x, canary_y, np.array([1, 1, 2]))


def test_guesses_take_the_highest_in_and_the_lowest_out() -> None:
    scores = np.array([0.5, -1.0, 3.0, 0.0, 2.0, -2.0])
    assert guess(scores, 2, 2).tolist() == [0, -1, 1, 0, 1, -1]
    assert guess(scores, 0, 0).tolist() == [0] * 6
    assert guess(np.zeros(4), 1, 2).tolist() == [-1, -1, 0, 1]  # ties: by index
    with pytest.raises(ConfigurationError, match="exceed"):
        guess(scores, 4, 3)
    with pytest.raises(ConfigurationError, match="finite"):
        guess(np.array([0.0, np.nan]), 1, 0)


def test_correct_guesses_count_hits_of_either_kind_and_ignore_abstentions() -> None:
    guesses = np.array([1, 1, -1, -1, 0, 0])
    included = np.array([True, False, False, True, True, False])
    assert count_correct(guesses, included) == (1, 1)


def test_canary_site_file_trains_on_exactly_the_included_canaries(tmp_path: Path) -> None:
    cfg = audit_run_config(30, sites=3)
    design = design_for(cfg)
    included = draw_inclusion(design.count, seeded_generator(3))
    files = write_site_files(cfg, tmp_path, design, included)
    assert sorted(files) == [0, 1, 2]
    task = task_for(cfg)
    trained = set()
    for i, path in files.items():
        data = load_site_data(cfg, task, {"partition-id": i, **site_node_config(path, i)})
        for split, may_hold in ((data.train, i == 0), (data.test, False)):
            rows = split.data.x[split.index][:, 64:]
            hits = np.flatnonzero((rows == HIGH).any(axis=0))
            assert may_hold or hits.size == 0
            if may_hold:
                trained = set(hits.tolist())
    assert trained == set(np.flatnonzero(included).tolist())


def _site_training(design: CanaryDesign, included: np.ndarray, noise_multiplier: float):
    digits = load_builtin("digits")
    x = np.concatenate([pad_rows(digits.x[:60], design), design.rows()[included]])
    y = np.concatenate([digits.y[:60], design.labels[included]])
    data = Dataset(x, y, 10, "site")
    scaler = Standardizer.from_bounds(SCALER_BOUNDS, design.num_features)
    examples = Examples(data, np.arange(len(y)), scaler, (design.num_features,))
    model = build_model("linear", (design.num_features,), 10, seed=0)
    initial = copy.deepcopy(model)
    loader = make_loader(examples, len(y), shuffle=False, seed=None)
    private_model, optimizer, private_loader, _ = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=4.0),
        loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=1.0,
    )
    train_local(
        private_model,
        private_loader,
        epochs=3,
        optimizer=optimizer,
        device=torch.device("cpu"),
        private=True,
    )
    return canary_scores(model, initial, design)


def test_without_noise_dp_sgd_moves_only_the_included_canaries_scores() -> None:
    design = CanaryDesign(16, 64, 10)
    included = np.arange(16) % 3 == 0
    scores = _site_training(design, included, noise_multiplier=0.0)
    assert np.all(scores[included] > 1e-3)
    assert np.all(np.abs(scores[~included]) < 1e-6)  # nothing else touches their weights


def test_with_noise_the_excluded_canaries_scores_move_too() -> None:
    design = CanaryDesign(16, 64, 10)
    included = np.arange(16) % 3 == 0
    scores = _site_training(design, included, noise_multiplier=5.0)
    assert np.all(np.abs(scores[~included]) > 1e-6)


def test_audit_sites_app_gives_each_partition_its_file_and_refuses_others() -> None:
    seen = []

    class Inner:
        def __call__(self, message: object, context: Context) -> object:
            seen.append(dict(context.node_config))
            return message

    wrapped = AuditSitesApp(Inner(), {1: {"data-path": "/d/site-1.npz"}})  # type: ignore[arg-type]
    context = Context("r", 7, {"partition-id": 1, "num-partitions": 2}, RecordDict(), {})
    message = object()  # the wrapper passes it on untouched
    assert wrapped(message, context) is message  # type: ignore[arg-type]
    assert seen == [{"partition-id": 1, "num-partitions": 2, "data-path": "/d/site-1.npz"}]
    context = Context("r", 8, {"partition-id": 0, "num-partitions": 2}, RecordDict(), {})
    with pytest.raises(ConfigurationError, match="partition 0"):
        wrapped(message, context)  # type: ignore[arg-type]


def test_audit_config_knows_its_level_and_refuses_non_audit_runs() -> None:
    cfg = audit_run_config(10)
    assert design_for(cfg).count == 10 and cfg.dp and cfg.model == "linear"
    assert level_of(cfg) == "record"
    client = audit_run_config(10, level="client", sites=2, site_epsilon=1.0)
    assert level_of(client) == "client" and client.central_dp and not client.dp
    assert client.num_sites == 12 and client.client_epsilon == 1.0
    with pytest.raises(ConfigurationError, match="one level at a time"):
        design_for(cfg.replace(central_dp=True))
    with pytest.raises(ConfigurationError, match="needs record-level"):
        design_for(cfg.replace(dp=False))
    with pytest.raises(ConfigurationError, match="custom dataset"):
        design_for(cfg.replace(dataset="digits"))
    with pytest.raises(ConfigurationError, match="data sites"):
        design_for(client.replace(num_sites=10, min_sites=2))
    with pytest.raises(ConfigurationError, match="level"):
        audit_run_config(10, level="site")


def test_client_level_sites_hold_their_canary_or_refuse_with_no_canary(tmp_path: Path) -> None:
    cfg = audit_run_config(6, level="client", sites=2)
    design = design_for(cfg)
    included = np.array([True, False, True, True, False, False])
    configs = write_client_level_files(cfg, tmp_path, design, included)
    assert sorted(configs) == list(range(8))
    for i in (0, 1):  # data sites: digits rows, nothing in the canary features
        with np.load(configs[i]["data-path"]) as f:
            assert len(f["y"]) > 100 and (f["x"][:, 64:] == MIDDLE).all()
        assert "policy-path" not in configs[i]
    for j, inc in enumerate(included):
        node = configs[2 + j]
        with np.load(node["data-path"]) as f:
            holds = np.flatnonzero((f["x"][:, 64:] == HIGH).any(axis=0)).tolist()
        assert holds == ([j] if inc else [])
        assert ("policy-path" in node) == (not inc)
        if not inc:
            policy = load_site_policy(node["policy-path"])
            assert policy.privacy.require_dp  # the run trains without DP-SGD: refused


def test_cli_refuses_more_guesses_than_canaries_before_any_run(tmp_path: Path) -> None:
    out = tmp_path / "a"
    result = CliRunner().invoke(
        app,
        [
            "audit-privacy",
            "-m",
            "10",
            "--guesses-in",
            "6",
            "--guesses-out",
            "5",
            "--json",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 2
    assert "exceed the 10 canaries" in json.loads(result.stdout)["error"]
    assert not (out / "record.db").exists()


@pytest.mark.parametrize("confidence", ["1.0", "0", "1.5"])
def test_cli_confidence_outside_the_unit_interval_is_a_one_line_json_error(
    tmp_path: Path, confidence: str
) -> None:
    out = tmp_path / "a"
    result = CliRunner().invoke(
        app,
        [
            "audit-privacy",
            "--level",
            "client",
            "--confidence",
            confidence,
            "--json",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 2
    (line,) = result.stdout.splitlines()
    assert "confidence" in json.loads(line)["error"]
    assert not out.exists()


def test_cli_refuses_a_run_directory_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "ledger-of-an-earlier-run").write_text("spent")
    result = CliRunner().invoke(app, ["audit-privacy", "--json", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "not an empty directory" in json.loads(result.stdout)["error"]
