"""A site's dataset size stays private under DP: the plan comes from a charged noisy size.

The threat: the coordinator is not trusted and sees every DP reply. Under
add/remove adjacency ``n`` is private, yet Opacus' own plan makes the
sampling rate ``1/ceil(n/b)``, the step count and the normaliser ``q n``
(the noised sum is divided by it) functions of ``n``: the update's noise
std ``z C / (q n)`` alone gives ``n`` away to a few percent. fedseal plans
from ``n~ = n + N(0, sigma^2)``, released once per dataset and charged to
the ledger (:mod:`client.privacy`, "Adjacency").
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_grid import FIRST_NODE_ID, server_identity
from flwr.app import Message, RecordDict
from site_files import random_site_csv
from site_messages import RUN_ID, metrics_of, site_context
from torch.utils.data import DataLoader, TensorDataset

import client.privacy
from client.app import make_client_app
from client.ledger import PUBLIC_SIZE_RUN, SiteLedger
from client.privacy import make_private, noisy_size
from common.config import RunConfig
from common.dp import PrivacyEvent, epsilon_for
from common.errors import ConfigurationError, PrivacyBudgetExceeded, RecordError
from common.models import build_model
from common.records import (
    KEY_ARRAYS,
    KEY_COHORT_SIZE,
    KEY_CONFIG,
    KEY_RUN_ID,
    KEY_VECTOR,
    config_to_record,
    vector_to_record,
)
from common.rng import ChaCha20Random

FEATURES, CLASSES = 64, 10
PARAMS = FEATURES * CLASSES + CLASSES  # the linear model's coordinates


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with server_identity():
        yield


# ------------------------------------------------------------------ the release itself
def _release(ledger: SiteLedger, draws: list[int], budget: float = 10.0, std: float = 20.0):
    def draw() -> int:
        draws.append(1)
        return 123

    return ledger.public_size(
        "clinic", noise_std=std, draw=draw, delta=1e-5, accountant="pld", budget=budget
    )


def test_noisy_size_is_released_once_charged_once_and_reused(tmp_path: Path) -> None:
    draws: list[int] = []
    with SiteLedger(tmp_path / "ledger.db") as ledger:
        first = _release(ledger, draws)
        again = _release(ledger, draws, std=5.0)  # a later setting does not redraw
        history = ledger.history("clinic")
        spent = ledger.spent("clinic", 1e-5)
    assert draws == [1] and first == again and first.noisy_size == 123
    assert [(e.run_id, e.round, e.state) for e in history] == [(PUBLIC_SIZE_RUN, 0, "confirmed")]
    assert history[0].event == PrivacyEvent(20.0, 1.0, 1)  # the Gaussian mechanism, sensitivity 1
    assert spent == pytest.approx(epsilon_for([PrivacyEvent(20.0, 1.0, 1)], 1e-5))


def test_a_release_the_budget_cannot_pay_for_draws_and_writes_nothing(tmp_path: Path) -> None:
    draws: list[int] = []
    with SiteLedger(tmp_path / "ledger.db") as ledger:
        with pytest.raises(PrivacyBudgetExceeded):
            _release(ledger, draws, budget=0.05)
        assert draws == [] and ledger.history() == []


def test_a_ledger_that_lost_the_release_charge_is_an_error_not_a_free_release(
    tmp_path: Path,
) -> None:
    import sqlite3

    with SiteLedger(tmp_path / "ledger.db") as ledger:
        _release(ledger, [])
    with sqlite3.connect(tmp_path / "ledger.db") as db:  # an insider deletes the charge
        db.execute("DELETE FROM privacy_ledger")
    with SiteLedger(tmp_path / "ledger.db") as ledger, pytest.raises(RecordError, match="edited"):
        _release(ledger, [])


def test_noisy_size_is_the_gaussian_mechanism_on_the_count() -> None:
    rng = ChaCha20Random(b"\x01" * 32)
    draws = np.array([noisy_size(500, 20.0, rng) for _ in range(2000)])
    assert abs(draws.mean() - 500) < 4 * 20 / np.sqrt(2000)
    assert 18.5 < draws.std() < 21.5
    assert noisy_size(1, 50.0, rng) >= 1
    with pytest.raises(ConfigurationError):
        noisy_size(10, 0.0)


# ------------------------------------------------------------------ the normaliser
def _noise_only_update(rows: int, *, public: bool) -> np.ndarray:
    """One full-batch DP-SGD step at ``z = 1000`` (the update is all noise) on ``rows`` records."""
    torch.manual_seed(0)
    model = build_model("linear", (FEATURES,), CLASSES, seed=0)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    rng = np.random.default_rng(rows)
    data = TensorDataset(
        torch.from_numpy(rng.random((rows, FEATURES)).astype(np.float32)),
        torch.from_numpy(rng.integers(0, CLASSES, rows)),
    )
    loader = DataLoader(data, batch_size=rows)
    plan = {"sample_rate": 1.0, "expected_batch_size": 200.0} if public else {}
    private, optimizer, batches, _ = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        loader,
        noise_multiplier=1000.0,
        max_grad_norm=1.0,
        **plan,
    )
    for x, y in batches:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(private(x), y).backward()
        optimizer.step()
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return (after - before).numpy()


def test_the_update_noise_does_not_reveal_the_dataset_size() -> None:
    small = _noise_only_update(100, public=True).std()
    large = _noise_only_update(300, public=True).std()
    assert small / large == pytest.approx(1.0, abs=0.15)
    # Switched off (Opacus' own normaliser q*n): the noise's spread gives the sizes away.
    leaked = (
        _noise_only_update(100, public=False).std() / _noise_only_update(300, public=False).std()
    )
    assert leaked == pytest.approx(3.0, rel=0.15)


# ------------------------------------------------------------------ a site's round
def _cfg() -> RunConfig:
    return RunConfig(
        dataset="custom", model="linear", num_features=FEATURES, num_classes=CLASSES,
        num_sites=2, rounds=1, dp=True, dp_batch_size=50, site_noise_multiplier=1000.0,
        site_epsilon=8.0, accountant="rdp", secagg=False, device="cpu",
    )  # fmt: skip


def _train_request(cfg: RunConfig) -> Message:
    extra = {KEY_RUN_ID: RUN_ID, KEY_COHORT_SIZE: cfg.num_sites}
    content = RecordDict({KEY_CONFIG: config_to_record(cfg, 1, **extra)})
    content[KEY_ARRAYS] = vector_to_record(np.zeros(PARAMS, dtype=np.float32))
    msg = Message(content, FIRST_NODE_ID, "train", group_id="1")
    msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    return msg


def test_sites_of_different_sizes_with_one_released_size_send_the_same_plan_and_noise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client.privacy, "noisy_size", lambda n, std, rng=None: 200)
    cfg = _cfg()
    replies = []
    for i, rows in enumerate((150, 450)):  # 120 and 360 training records
        path = random_site_csv(
            tmp_path / f"s{i}.csv", rows=rows, features=FEATURES, high=16, classes=CLASSES, seed=i
        )
        context = site_context(0, 2)
        context.node_config.update(
            {"data-path": str(path), "dataset-id": f"clinic-{i}", "feature-bounds": "0:16"}
        )
        app = make_client_app(tmp_path / f"sites{i}")
        replies.append(app(_train_request(cfg), context))
    figures = [
        {k: metrics_of(r)[k] for k in ("sample-rate", "dp-steps", "noise-multiplier")}
        for r in replies
    ]
    # From the released 200 at batch 50: q = 1/4, 4 steps; from n they would be 1/3 vs 1/8.
    assert (
        figures[0] == figures[1] == {"sample-rate": 0.25, "dp-steps": 4, "noise-multiplier": 1000.0}
    )
    updates = [r.content[KEY_ARRAYS][KEY_VECTOR].numpy() for r in replies]
    assert updates[0].std() / updates[1].std() == pytest.approx(1.0, abs=0.15)
    for i in range(2):
        with SiteLedger(tmp_path / f"sites{i}" / "site-0" / "ledger.db") as ledger:
            assert [e.run_id for e in ledger.history()][0] == PUBLIC_SIZE_RUN
