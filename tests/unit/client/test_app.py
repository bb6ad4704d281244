"""The ClientApp's train path and mods, with a fake trainer injected (no internals patched).

Plain rounds are driven message by message through ``make_client_app(trainer=...)``;
secure rounds through the in-memory Grid (``tests/support/fake_grid.py``) and the
real server code, so that the masked stage gets real SecAgg+ requests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fake_grid import FIRST_NODE_ID, FakeGrid, server_identity
from federation import federated_setup
from flwr.app import Message, MetricRecord, RecordDict
from site_messages import (
    RUN_ID,
    D,
    FakeTrainer,
    instruction,
    metrics_of,
    reason_of,
    site_context,
    update_of,
    vector_cfg,
)

from client.agent import LocalUpdate, SiteContext
from client.app import make_client_app
from client.ledger import SiteLedger
from client.mods import MASKED_STAGE
from client.mods.clipping import clipping_mod
from client.secure import STATE_RECORD
from client.site import load_site_data
from client.state import LEDGER_FILE, private_dir
from common.config import RunConfig
from common.dp import PrivacyEvent, clip_l2, epsilon_for
from common.errors import PrivacyBudgetExceeded
from common.records import (
    KEY_ARRAYS,
    KEY_METRICS,
    KEY_REFUSAL,
    KEY_SITE_DECISIONS,
    record_to_vector,
    vector_to_record,
)
from common.secagg import make_config
from common.secagg.quantize import error_bound
from common.task import task_for
from policies import load_site_policies
from server.rounds import FederatedRun


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with server_identity():
        yield


# ------------------------------------------------------------------ plain train action
def test_plain_train_reply_is_the_trainers_update_and_metrics(tmp_path: Path) -> None:
    trainer = FakeTrainer()
    app = make_client_app(tmp_path, trainer=trainer)
    reply = app(instruction(vector_cfg()), site_context(1))
    assert list(reply.content.keys()) == [KEY_ARRAYS, KEY_METRICS]
    np.testing.assert_array_equal(record_to_vector(reply.content[KEY_ARRAYS], D), update_of(1))
    assert dict(metrics_of(reply)) == {"num-examples": 2, "train-seconds": 0.0}
    assert trainer.calls == [(1, 1)]


def test_plain_train_clipping_on_clips_to_clip_norm_and_keeps_the_norm_at_the_site(
    tmp_path: Path,
) -> None:
    cfg = vector_cfg(central_dp=True, noise_multiplier=1.0, clip_norm=0.75)
    app = make_client_app(tmp_path, trainer=FakeTrainer())
    reply = app(instruction(cfg), site_context(2))  # norm 1.5 > C
    update = record_to_vector(reply.content[KEY_ARRAYS], D)
    expected, _ = clip_l2(update_of(2), 0.75)
    np.testing.assert_array_equal(update, expected)
    assert float(np.linalg.norm(update.astype(np.float64))) <= 0.75
    # under client-level DP the pre-clip norm (and the count) never leave (client.disclosure)
    assert dict(metrics_of(reply)) == {}


def test_clipping_mod_reports_the_norm_before_clipping_to_the_mods_outside_it() -> None:
    msg = instruction(vector_cfg(central_dp=True, noise_multiplier=1.0, clip_norm=0.75))
    inner = Message(
        RecordDict(
            {
                KEY_ARRAYS: vector_to_record(update_of(2)),
                KEY_METRICS: MetricRecord({"num-examples": 1}),
            }
        ),
        reply_to=msg,
    )
    metrics = metrics_of(clipping_mod(msg, site_context(), lambda m, c: inner))
    assert list(metrics.keys()) == ["num-examples", "update-norm"]
    assert metrics["update-norm"] == pytest.approx(1.5, rel=1e-6)


def test_clipping_mod_off_returns_the_inner_reply_untouched() -> None:
    msg = instruction(vector_cfg())  # neither central DP nor secure aggregation
    inner = Message(
        RecordDict(
            {
                KEY_ARRAYS: vector_to_record(update_of(3)),
                KEY_METRICS: MetricRecord({"num-examples": 1}),
            }
        ),
        reply_to=msg,
    )
    reply = clipping_mod(msg, site_context(), lambda m, c: inner)
    assert reply is inner and list(metrics_of(reply).keys()) == ["num-examples"]
    np.testing.assert_array_equal(record_to_vector(reply.content[KEY_ARRAYS], D), update_of(3))


def test_clipping_mod_always_clips_the_masked_stage() -> None:
    # whatever the instruction's run configuration says, a masked input is clipped to C
    msg = instruction(vector_cfg(), message_type=MASKED_STAGE)
    inner = Message(
        RecordDict(
            {
                KEY_ARRAYS: vector_to_record(update_of(3)),
                KEY_METRICS: MetricRecord({"num-examples": 1}),
            }
        ),
        reply_to=msg,
    )
    reply = clipping_mod(msg, site_context(), lambda m, c: inner)
    assert float(np.linalg.norm(record_to_vector(reply.content[KEY_ARRAYS], D))) <= 1.0
    assert list(metrics_of(reply).keys()) == ["num-examples", "update-norm"]


SITE_POLICY = """kind = "site"
[privacy]
require_dp = false
[rounds]
require_secure_aggregation = false
min_cohort_size = {min_cohort}
"""


def _policies(tmp_path: Path, **by_site: int) -> object:
    folder = tmp_path / "policies"
    folder.mkdir()
    for site, min_cohort in by_site.items():
        (folder / f"{site}.toml").write_text(SITE_POLICY.format(min_cohort=min_cohort))
    return load_site_policies(folder)


def test_policy_refusal_comes_before_training_with_the_decisions(tmp_path: Path) -> None:
    trainer = FakeTrainer()
    policies = _policies(tmp_path, default=1, **{"site-0": 9})
    app = make_client_app(tmp_path / "sites", policies, trainer=trainer)  # type: ignore[arg-type]
    refused = app(instruction(vector_cfg()), site_context(0))
    assert list(refused.content.keys()) == [KEY_METRICS, KEY_REFUSAL, KEY_SITE_DECISIONS]
    assert dict(metrics_of(refused)) == {"refused": 1}
    assert "rounds.min_cohort_size" in reason_of(refused)
    assert trainer.calls == []
    # an allowing policy: the update goes out with the decisions, last
    allowed = app(instruction(vector_cfg()), site_context(1))
    assert list(allowed.content.keys()) == [KEY_ARRAYS, KEY_METRICS, KEY_SITE_DECISIONS]
    assert trainer.calls == [(1, 1)]


def test_trainer_budget_refusal_is_a_refusal_reply(tmp_path: Path) -> None:
    trainer = FakeTrainer(refuse={(0, 1)})
    reply = make_client_app(tmp_path, trainer=trainer)(instruction(vector_cfg()), site_context(0))
    assert list(reply.content.keys()) == [KEY_METRICS, KEY_REFUSAL]
    assert reason_of(reply) == str(PrivacyBudgetExceeded(3.0, 4.0, 5.0))


# ------------------------------------------------------------------ budget dry run (would_spend)
def _dp_cfg(site_epsilon: float) -> RunConfig:
    return RunConfig(
        dataset="digits", num_sites=3, rounds=1, dp=True, site_epsilon=site_epsilon,
        accountant="rdp", secagg=False, device="cpu",
    )  # fmt: skip


def _ledger_of(tmp_path: Path, cfg: RunConfig, partition: int) -> tuple[SiteLedger, str]:
    context = site_context(partition, cfg.num_sites)
    dataset_id = load_site_data(cfg, task_for(cfg), context.node_config).dataset_id
    private_dir(tmp_path / f"site-{partition}")  # as the site makes it: 0700
    return SiteLedger(tmp_path / f"site-{partition}" / LEDGER_FILE), dataset_id


EARLIER = PrivacyEvent(0.8, 0.5, 40)


def test_budget_refusal_from_the_dry_run_comes_before_training(tmp_path: Path) -> None:
    cfg = _dp_cfg(4.0)
    ledger, dataset_id = _ledger_of(tmp_path, cfg, 0)
    with ledger:
        ledger.reserve(dataset_id, "earlier-run", 1, EARLIER, cfg.site_delta, "rdp", 1e9)
    trainer = FakeTrainer()
    reply = make_client_app(tmp_path, trainer=trainer)(instruction(cfg), site_context(0))
    assert reason_of(reply).startswith("privacy budget exhausted: spent")
    assert trainer.calls == []
    with ledger:
        assert len(ledger.history()) == 1  # the dry run wrote nothing


def test_budget_dry_run_a_recorded_round_costs_nothing_new(tmp_path: Path) -> None:
    # the site's history is just under its budget; this run's round 1 is already in it
    spent = epsilon_for([EARLIER], 1e-5, "rdp")
    cfg = _dp_cfg(spent * 1.01)
    ledger, dataset_id = _ledger_of(tmp_path, cfg, 0)
    with ledger:
        ledger.reserve(dataset_id, RUN_ID, 1, EARLIER, cfg.site_delta, "rdp", 1e9)
    trainer = FakeTrainer()
    app = make_client_app(tmp_path, trainer=trainer)
    redo = app(instruction(cfg, server_round=1), site_context(0))
    assert KEY_REFUSAL not in redo.content and trainer.calls == [(0, 1)]
    fresh = app(instruction(cfg, server_round=2), site_context(0))
    assert reason_of(fresh).startswith("privacy budget exhausted: spent")
    assert trainer.calls == [(0, 1)]


# ------------------------------------------------------------------ secure masked stage (mod)
def _tolerance(cfg: RunConfig, contributors: int) -> float:
    config = make_config(
        run_id=1,
        round=1,
        cohort=[FIRST_NODE_ID + i for i in range(cfg.num_sites)],
        identities=[i.to_bytes(32, "big") for i in range(1, cfg.num_sites + 1)],
        threshold=cfg.secagg_threshold_value,
        value_bound=cfg.clip_norm,
        vector_length=D,
        bits=cfg.secagg_bits,
    )
    return error_bound(config, contributors) / contributors + 1e-6


def test_masked_stage_trains_once_through_the_train_path_and_masks_the_clipped_update(
    tmp_path: Path,
) -> None:
    cfg = vector_cfg(4, secagg=True)
    stage_seen: list[str] = []
    trained_at: list[str] = []

    class Recording(FakeTrainer):
        def __call__(self, site: SiteContext, arrays: object) -> LocalUpdate:
            trained_at.append(stage_seen[-1])
            return super().__call__(site, arrays)

    trainer = Recording()
    grid = FakeGrid(
        make_client_app(federated_setup(tmp_path, cfg.num_sites), trainer=trainer),
        cfg.num_sites,
        on_deliver=lambda g, m: stage_seen.append(m.metadata.message_type),
    )
    run = FederatedRun(cfg, grid)
    before = run.global_vector.astype(np.float64)
    (result,) = run.execute()
    assert result.participants == 4
    # keys, shares, consistency and unmask never train; the masked stage trains once per site
    assert sorted(trainer.calls) == [(p, 1) for p in range(4)]
    assert trained_at == [MASKED_STAGE] * 4
    masked = next(e for e in grid.history if set(e.message_types.values()) == {MASKED_STAGE})
    for reply in masked.replies.values():
        # only the masked vector leaves the site: no count, no norm, no train time
        assert dict(metrics_of(reply)) == {}
        assert KEY_ARRAYS not in reply.content
    clipped = [clip_l2(update_of(p), cfg.clip_norm)[0].astype(np.float64) for p in range(4)]
    delta = run.global_vector.astype(np.float64) - before
    np.testing.assert_allclose(delta, np.mean(clipped, axis=0), rtol=0, atol=_tolerance(cfg, 4))
    unclipped = np.mean([update_of(p) for p in range(4)], axis=0)
    assert np.max(np.abs(delta - unclipped)) > 1e-2


def test_masked_stage_budget_refusal_from_the_train_path_drops_that_round_only(
    tmp_path: Path,
) -> None:
    cfg = vector_cfg(5, secagg=True, rounds=2)  # one setup prepares both rounds
    refuser = 2
    trainer = FakeTrainer(refuse={(refuser, 2)})
    app = make_client_app(federated_setup(tmp_path, cfg.num_sites), trainer=trainer)
    grid = FakeGrid(app, cfg.num_sites)
    first, second = FederatedRun(cfg, grid).execute()
    assert first.participants == 5 and second.participants == 4
    refused = {s.node_id: s for s in second.sites if s.refused}
    assert list(refused) == [FIRST_NODE_ID + refuser]
    assert refused[FIRST_NODE_ID + refuser].reason == str(PrivacyBudgetExceeded(3.0, 4.0, 5.0))
    # its round-2 secrets were erased with the refusal: no sealed state is left anywhere
    assert all(STATE_RECORD not in c.state.config_records for c in grid.contexts.values())
