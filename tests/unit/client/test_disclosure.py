"""What leaves a site (client.disclosure and its mod): each withheld figure names its leak.

A train step that reports everything it knows (count, loss, accuracy, train
time, energy, the update norm) goes through the ClientApp's real mod chain;
the reply that leaves is checked per run setting.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fake_grid import server_identity
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from site_messages import D, instruction, metrics_of, reason_of, site_context, update_of, vector_cfg

from client.agent import LocalUpdate, SiteContext
from client.app import LOCAL_TEST_WITHHELD, make_client_app
from client.disclosure import disclose
from client.mods import MASKED_STAGE
from client.mods.disclosure import disclosure_mod
from common.config import RunConfig
from common.records import (
    KEY_ARRAYS,
    KEY_METRICS,
    KEY_REFUSAL,
    state_dict_to_vector,
    vector_to_record,
)
from common.task import task_for

EVERYTHING = {
    "train-loss": 0.7,
    "train-accuracy": 27 / 575,
    "train-seconds": 1.5,
    "steps": 36,
    "energy-kwh": 1e-6,
    "co2eq-g": 1e-4,
    "energy-estimated": 1,
    "record-level-epsilon": 2.5,
    "record-level-delta": 1e-6,
    "noise-multiplier": 1.1,
    "sample-rate": 1.0,
    "dp-steps": 1,
    "private-scaling": 0,
}
PLAN = {"record-level-epsilon", "record-level-delta", "noise-multiplier", "sample-rate"}
PLAN |= {"dp-steps", "private-scaling"}
ENERGY = {"energy-kwh", "co2eq-g", "energy-estimated"}


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with server_identity():
        yield


def _telling_trainer(site: SiteContext, arrays: object) -> LocalUpdate:
    partition = int(site.context.node_config["partition-id"])
    return LocalUpdate(update_of(partition), 575, dict(EVERYTHING))


def _sent(tmp_path: Path, cfg: RunConfig) -> set[str]:
    reply = make_client_app(tmp_path, trainer=_telling_trainer)(instruction(cfg), site_context(1))
    assert KEY_ARRAYS in reply.content
    return set(metrics_of(reply).keys())


def test_plain_round_without_dp_keeps_every_metric_fedavg_weighs_by_the_count(
    tmp_path: Path,
) -> None:
    assert _sent(tmp_path, vector_cfg()) == {"num-examples", *EVERYTHING}


def test_record_level_dp_sends_only_the_declared_plan_epsilon_and_delta(tmp_path: Path) -> None:
    # the count, train accuracy (27/575 on private batches), train time and energy stay here
    assert _sent(tmp_path, vector_cfg(dp=True)) == PLAN


def test_client_level_dp_sends_no_metric_not_even_the_update_norm(tmp_path: Path) -> None:
    assert _sent(tmp_path, vector_cfg(central_dp=True, noise_multiplier=1.0)) == set()


def test_secure_round_without_dp_sends_energy_only_no_count_or_norm() -> None:
    msg = instruction(vector_cfg(secagg=True), message_type=MASKED_STAGE)
    inner = Message(
        RecordDict(
            {
                KEY_ARRAYS: vector_to_record(update_of(0)),
                KEY_METRICS: MetricRecord({"num-examples": 114, "update-norm": 3.2, **EVERYTHING}),
            }
        ),
        reply_to=msg,
    )
    reply = disclosure_mod(msg, site_context(), lambda m, c: inner)
    assert set(metrics_of(reply).keys()) == ENERGY


def test_undeclared_record_never_leaves_the_site() -> None:
    content = RecordDict(
        {
            KEY_ARRAYS: vector_to_record(np.zeros(D, np.float32)),
            "site-notes": ConfigRecord({"rows": 575}),
        }
    )
    assert list(disclose(content, None).keys()) == [KEY_ARRAYS]


def test_reply_to_an_unreadable_instruction_keeps_a_refusal_only() -> None:
    msg = instruction(vector_cfg())
    del msg.content["config"]
    inner = Message(
        RecordDict({KEY_METRICS: MetricRecord({"refused": 1, "num-examples": 575})}),
        reply_to=msg,
    )
    reply = disclosure_mod(msg, site_context(), lambda m, c: inner)
    assert dict(metrics_of(reply)) == {"refused": 1}


def _digits(**changes: object) -> RunConfig:
    return RunConfig(dataset="digits", num_sites=3, rounds=1, device="cpu").replace(**changes)


@pytest.mark.parametrize(
    "changes", [{"dp": True}, {"central_dp": True, "secagg": False}], ids=["dp", "central"]
)
def test_evaluate_under_dp_is_refused_before_scoring(
    tmp_path: Path, changes: dict[str, object]
) -> None:
    cfg = _digits(**changes)
    reply = make_client_app(tmp_path)(instruction(cfg, message_type="evaluate"), site_context(0))
    assert set(reply.content.keys()) == {KEY_METRICS, KEY_REFUSAL}
    assert dict(metrics_of(reply)) == {"refused": 1}
    assert reason_of(reply) == LOCAL_TEST_WITHHELD


def _evaluate(tmp_path: Path, cfg: RunConfig) -> MetricRecord:
    """The metrics of the site's reply to an evaluate message carrying the initial model."""
    msg = instruction(cfg, message_type="evaluate")
    model = task_for(cfg).build(seed=cfg.seed)
    msg.content[KEY_ARRAYS] = vector_to_record(state_dict_to_vector(model.state_dict()))
    return metrics_of(make_client_app(tmp_path)(msg, site_context(0)))


def test_evaluate_under_secure_aggregation_sends_no_test_count(tmp_path: Path) -> None:
    assert set(_evaluate(tmp_path, _digits(secagg=True)).keys()) == {"loss", "accuracy"}
    plain = _evaluate(tmp_path / "plain", _digits(secagg=False))
    assert set(plain.keys()) == {"num-examples", "loss", "accuracy"}
    assert plain["num-examples"] > 0  # a plain federation without DP weighs by it


def _raise(exc: Exception):  # type: ignore[no-untyped-def]
    def handler(msg: Message, context: object) -> Message:
        raise exc

    return handler


@pytest.mark.parametrize("dp", [True, False], ids=["dp", "no-dp"])
def test_a_failure_reaches_the_coordinator_as_its_kind_not_its_text(dp: bool) -> None:
    """Flower would send ``str(exc)``: a parser's message can quote a record's value."""
    from common.errors import DataError

    cfg = vector_cfg(central_dp=dp, noise_multiplier=1.0)
    leak = ValueError("could not convert '212.5' (patient 4711, glucose) to an int")
    reply = disclosure_mod(instruction(cfg), site_context(), _raise(leak))
    assert reply.has_error()
    assert reply.error.reason.startswith("ValueError") and "4711" not in reply.error.reason
    own = DataError("the label column holds 11 classes, the run expects 10")
    reason = disclosure_mod(instruction(cfg), site_context(), _raise(own)).error.reason
    # fedseal's own errors name rules: their text leaves only when nothing is claimed private
    assert ("11 classes" in reason) is (not dp) and reason.startswith("DataError")
