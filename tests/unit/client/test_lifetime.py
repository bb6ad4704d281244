"""A lifetime that lasts: a declared dataset id, calibration against what the history left,
delta < 1/n at the site, confirm checks the steps, client-level participation on the site's books.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_grid import server_identity
from site_files import random_site_csv
from site_messages import FakeTrainer, instruction, reason_of, site_context, vector_cfg

from client.agent import (
    DELTA_NOT_BELOW_ONE_OVER_N,
    UNDECLARED_DATASET_ID,
    SiteContext,
    round_plan,
)
from client.app import make_client_app
from client.ledger import CONFIRMED, RESERVED, SiteLedger
from client.site import declares_dataset_id, site_dataset_id
from client.site_policy import SiteSetup
from client.state import LEDGER_FILE
from common.config import RunConfig
from common.dp import PrivacyEvent, PrivacyLevel, epsilon_for
from common.errors import IntegrityError
from common.records import KEY_SITE_DECISIONS
from policies import load_site_policies


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with server_identity():
        yield


def _file_site(tmp_path: Path, **node: str) -> object:
    context = site_context(0)
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = random_site_csv(tmp_path / "site.csv", rows=120, features=4, high=9, classes=2, seed=1)
    context.node_config.update({"data-path": str(data), "feature-bounds": "0:8", **node})
    return context


def _file_cfg(**changes: object) -> RunConfig:
    return RunConfig(
        dataset="custom", num_features=4, num_classes=2, num_sites=3, rounds=2, dp=True,
        site_epsilon=4.0, accountant="rdp", secagg=False, device="cpu",
    ).replace(**changes)  # fmt: skip


# ------------------------------------------------------------------ dataset identity
def test_declared_dataset_id_survives_an_edit_of_the_file_the_content_hash_does_not(
    tmp_path: Path,
) -> None:
    cfg = _file_cfg()
    declared = _file_site(tmp_path / "a", **{"dataset-id": "clinic-2024"}).node_config  # type: ignore[attr-defined]
    hashed = _file_site(tmp_path / "b").node_config  # type: ignore[attr-defined]
    before = site_dataset_id(cfg, declared), site_dataset_id(cfg, hashed)
    for node in (declared, hashed):
        with Path(node["data-path"]).open("a") as fh:
            fh.write("1,2,3,4,0\n")  # one more row
    assert site_dataset_id(cfg, declared) == before[0] == "clinic-2024"
    assert site_dataset_id(cfg, hashed) != before[1]  # an edit would have started a new budget
    assert declares_dataset_id(declared) and not declares_dataset_id(hashed)


def test_dp_round_without_a_declared_dataset_id_is_refused_before_training(
    tmp_path: Path,
) -> None:
    trainer = FakeTrainer()
    app = make_client_app(tmp_path / "sites", trainer=trainer)
    reply = app(instruction(_file_cfg()), _file_site(tmp_path))  # type: ignore[arg-type]
    assert reason_of(reply) == UNDECLARED_DATASET_ID
    assert trainer.calls == []
    declared = app(instruction(_file_cfg()), _file_site(tmp_path, **{"dataset-id": "clinic"}))  # type: ignore[arg-type]
    assert trainer.calls == [(0, 1)] and "refusal" not in declared.content


def test_simulated_dataset_id_embeds_no_server_chosen_seed() -> None:
    node = {"partition-id": 3, "num-partitions": 10}
    ids = {site_dataset_id(RunConfig(seed=seed), node) for seed in (0, 1, 12345)}
    assert ids == {"digits-site3"}


# ------------------------------------------------------------------ calibration
def _digits_cfg(**changes: object) -> RunConfig:
    return RunConfig(
        dataset="digits", num_sites=3, dp=True, accountant="rdp", secagg=False, device="cpu"
    ).replace(**changes)


def _digits_site(tmp_path: Path, cfg: RunConfig) -> SiteContext:
    msg = instruction(cfg)
    return SiteContext.of(msg, site_context(0), SiteSetup(tmp_path))


def test_calibration_aims_at_what_the_history_left_not_the_full_budget(tmp_path: Path) -> None:
    cfg = _digits_cfg(rounds=3, site_epsilon=4.0)
    site = _digits_site(tmp_path, cfg)
    data = site.data()
    with SiteLedger(site.directory / LEDGER_FILE) as ledger:
        fresh = round_plan(site, data, ledger).plan  # the history: the noisy size's release
        ledger.reserve(data.dataset_id, "earlier-run", 1, PrivacyEvent(4.0, 1.0, 2), 1e-5, "rdp", 9)
        ledger.reserve(data.dataset_id, site.run_id, 1, fresh.round_event(), 1e-5, "rdp", 9)
        planned = round_plan(site, data, ledger).plan
        history = ledger.history(data.dataset_id)
    assert [e.run_id for e in history] == ["public-size", "earlier-run", site.run_id]
    prior = [history[0].event, history[1].event]
    # the history before this run plus all of this run's rounds fits in the budget ...
    run_rounds = PrivacyEvent(
        planned.noise_multiplier, planned.sample_rate, 3 * planned.steps_per_round
    )
    assert epsilon_for([*prior, run_rounds], 1e-5, "rdp") <= 4.0
    # ... which the plan from zero would not (this run's own round 1 is not "history")
    from_zero = PrivacyEvent(fresh.noise_multiplier, fresh.sample_rate, 3 * fresh.steps_per_round)
    assert epsilon_for([*prior, from_zero], 1e-5, "rdp") > 4.0
    assert planned.noise_multiplier > fresh.noise_multiplier


def test_history_that_leaves_no_room_refuses_the_round_before_training(tmp_path: Path) -> None:
    cfg = _digits_cfg(rounds=1, site_epsilon=2.0)
    site = _digits_site(tmp_path, cfg)
    with SiteLedger(site.directory / LEDGER_FILE) as ledger:
        ledger.reserve(site.data().dataset_id, "old", 1, PrivacyEvent(0.5, 1.0, 5), 1e-5, "rdp", 99)
    trainer = FakeTrainer()
    reply = make_client_app(tmp_path, trainer=trainer)(instruction(cfg), site_context(0))
    assert reason_of(reply).startswith("privacy budget exhausted: spent")
    assert trainer.calls == []


# ------------------------------------------------------------------ delta < 1/n
def test_delta_not_below_one_over_n_is_refused_at_the_site_naming_no_size(tmp_path: Path) -> None:
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "default.toml").write_text(
        'kind = "site"\n[privacy]\ndelta = 0.05\n'
        "[rounds]\nrequire_secure_aggregation = false\nmin_cohort_size = 1\n"
    )
    cfg = _digits_cfg(rounds=1, accountant="prv")
    trainer = FakeTrainer()
    app = make_client_app(tmp_path / "sites", load_site_policies(folder), trainer=trainer)
    reply = app(instruction(cfg), site_context(0))
    assert reason_of(reply) == DELTA_NOT_BELOW_ONE_OVER_N
    assert not re.search(r"\d\d", reason_of(reply))  # no size in it: n stays at the site
    assert "privacy.delta" in str(reply.content[KEY_SITE_DECISIONS]["decisions"])
    assert trainer.calls == []


# ------------------------------------------------------------------ confirm
def test_confirm_with_other_steps_than_reserved_is_an_integrity_error(tmp_path: Path) -> None:
    with SiteLedger(tmp_path / "ledger.db") as ledger:
        entry = ledger.reserve("d", "run", 1, PrivacyEvent(1.0, 0.5, 4), 1e-5, "rdp", 10.0)
        with pytest.raises(IntegrityError, match="5 DP-SGD steps taken, 4 reserved"):
            ledger.confirm(entry, steps_taken=5)
        assert [e.state for e in ledger.history()] == [RESERVED]  # still counted as spent
        ledger.confirm(entry, steps_taken=4)
        assert [e.state for e in ledger.history()] == [CONFIRMED]


# ------------------------------------------------------------------ client-level exposure
def test_site_books_each_round_it_contributes_to_under_client_level_dp(tmp_path: Path) -> None:
    cfg = vector_cfg(central_dp=True, noise_multiplier=1.3, rounds=3)
    app = make_client_app(tmp_path, trainer=FakeTrainer())
    for server_round in (1, 2, 2):  # a repeat of round 2 is answered from the release log
        app(instruction(cfg, server_round=server_round), site_context(0))
    app(instruction(vector_cfg(rounds=3), server_round=3), site_context(1))  # no client-level DP
    with SiteLedger(tmp_path / "site-0" / LEDGER_FILE) as ledger:
        rows = ledger.participation()
        (exposure,) = ledger.client_exposure()
    run_event = PrivacyEvent(1.3, cfg.client_sample_rate, 1, PrivacyLevel.CLIENT)
    assert [(r.round, r.event, r.delta) for r in rows] == [
        (1, run_event, cfg.delta),
        (2, run_event, cfg.delta),
    ]
    assert exposure.rounds == 2
    alone = PrivacyEvent(1.3, 1.0, 1, PrivacyLevel.CLIENT)
    assert exposure.client_level_epsilon == epsilon_for([alone, alone], cfg.delta, cfg.accountant)
    with SiteLedger(tmp_path / "site-1" / LEDGER_FILE) as other:
        assert other.participation() == []
