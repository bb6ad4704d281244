"""The site's release log: one release per (dataset, run, round), sealed at rest.

The ledger half (:class:`client.ledger.SiteLedger` release methods) and the rule
(:func:`client.release.release_once`) with a hand-built site context; the attacks
over a real ClientApp are in ``tests/adversary/test_repeated_rounds.py``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fake_grid import server_identity
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.agent import SiteContext
from client.ledger import RELEASED, RESERVED, SiteLedger
from client.release import release_once
from client.site_policy import SiteSetup
from client.state import LEDGER_FILE, private_dir
from client.steps import is_refusal
from common.config import RunConfig
from common.dp.events import PrivacyEvent
from common.errors import ConfigurationError, RecordError
from common.record_digest import request_digest
from common.records import KEY_ARRAYS, KEY_AUDIT_HEAD, KEY_CONFIG, KEY_METRICS, vector_to_record
from common.task import task_for

DIGEST = "ab" * 32
D = 64


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with server_identity():
        yield


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[SiteLedger]:
    with SiteLedger(tmp_path / LEDGER_FILE) as led:
        yield led


# ------------------------------------------------------------------ the table
def test_claim_release_first_is_fresh_then_returns_the_same_row(ledger: SiteLedger) -> None:
    first = ledger.claim_release("digits", "run-a", 1, "plain", DIGEST)
    assert first.fresh and first.entry.state == RESERVED
    again = ledger.claim_release("digits", "run-a", 1, "secure", "cd" * 32, "ef" * 32)
    assert not again.fresh and again.entry == first.entry  # nothing written the second time
    other = ledger.claim_release("digits", "run-a", 2, "plain", DIGEST)
    assert other.fresh and other.entry.id != first.entry.id
    assert ledger.claim_release("breast_cancer", "run-a", 1, "plain", DIGEST).fresh


def test_store_release_round_trip_links_the_ledger_entry(ledger: SiteLedger) -> None:
    entry_id = ledger.reserve("digits", "run-a", 1, PrivacyEvent(1.0, 1.0, 1), 1e-5, "rdp", 1e6)
    claim = ledger.claim_release("digits", "run-a", 1, "plain", DIGEST)
    stored = ledger.store_release(claim.entry.id, b"sealed bytes")
    assert (stored.state, ledger.sealed_reply(stored), stored.ledger_entry_id) == (
        RELEASED, b"sealed bytes", entry_id,
    )  # fmt: skip
    ledger.count_answer(stored.id, resent=True)
    ledger.count_answer(stored.id, resent=True)
    ledger.count_answer(stored.id, resent=False)
    (row,) = ledger.releases("digits")
    assert (row.resent, row.refused, row.request_digest) == (2, 1, DIGEST)
    assert row.to_json()["sealed_sha256"] == hashlib.sha256(b"sealed bytes").hexdigest()
    with pytest.raises(RecordError, match="not reserved"):
        ledger.store_release(stored.id, b"again")  # a release is stored once
    with pytest.raises(RecordError, match="not reserved"):
        ledger.abandon_release(stored.id)  # and never taken back


def test_store_release_without_dp_links_no_ledger_entry(ledger: SiteLedger) -> None:
    claim = ledger.claim_release("digits", "run-a", 1, "secure", DIGEST, "ef" * 32)
    stored = ledger.store_release(claim.entry.id, None)
    assert stored.ledger_entry_id is None and stored.setup_digest == "ef" * 32


def test_abandon_release_frees_the_round(ledger: SiteLedger) -> None:
    claim = ledger.claim_release("digits", "run-a", 1, "plain", DIGEST)
    ledger.abandon_release(claim.entry.id)
    assert ledger.releases() == []
    assert ledger.claim_release("digits", "run-a", 1, "plain", DIGEST).fresh


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("", "run", 1, "plain", DIGEST), "dataset_id"),
        (("digits", "run", -1, "plain", DIGEST), "round"),
        (("digits", "run", True, "plain", DIGEST), "round"),
        (("digits", "run", 1, "masked", DIGEST), "kind"),
        (("digits", "run", 1, "plain", ""), "request_digest"),
    ],
)
def test_claim_release_invalid_arguments_refused(
    ledger: SiteLedger, args: tuple[object, ...], match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        ledger.claim_release(*args)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the rule
def cfg() -> RunConfig:
    return RunConfig(
        dataset="custom", model="vector", workload="echo", num_features=D, num_classes=2,
        num_sites=2, rounds=2, device="cpu", secagg=False,
    )  # fmt: skip


def site(tmp_path: Path, server_round: int = 1) -> SiteContext:
    directory = private_dir(tmp_path / "site-0")
    context = Context(
        run_id=7,
        node_id=1000,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config={},
    )
    c = cfg()
    return SiteContext(
        c, server_round, task_for(c), context, directory, "run-a", SiteSetup(None), None
    )


def instruction(head: bytes = b"head-1", model: float = 0.0) -> Message:
    config = ConfigRecord({"server-round": 1, "run-id": "run-a", KEY_AUDIT_HEAD: head})
    content = RecordDict(
        {KEY_CONFIG: config, KEY_ARRAYS: vector_to_record(np.full(D, model, np.float32))}
    )
    msg = Message(content, 1000, "train", group_id="1")
    msg.metadata.__dict__["_message_id"] = "instruction-1"  # as the transport sets it
    return msg


UPDATE = np.linspace(-0.123456, 0.654321, D).astype(np.float32)  # bytes unlike any header


class Produce:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, msg: Message) -> Message:
        self.calls += 1
        metrics = MetricRecord({"num-examples": 3, "train-loss": 0.25})
        content = RecordDict({KEY_ARRAYS: vector_to_record(UPDATE), KEY_METRICS: metrics})
        return Message(content=content, reply_to=msg)


def test_release_once_resends_the_same_reply_for_the_same_request(tmp_path: Path) -> None:
    s, produce = site(tmp_path), Produce()
    first_msg, again_msg = instruction(b"head-1"), instruction(b"head-2")  # only the head moved
    first = release_once(s, first_msg, lambda: produce(first_msg))
    again = release_once(s, again_msg, lambda: produce(again_msg))
    assert produce.calls == 1
    assert again.content[KEY_METRICS] == first.content[KEY_METRICS]
    np.testing.assert_array_equal(again.content[KEY_ARRAYS]["vector"].numpy(), UPDATE)


def test_release_once_other_request_refused_without_producing(tmp_path: Path) -> None:
    s, produce = site(tmp_path), Produce()
    msg = instruction()
    release_once(s, msg, lambda: produce(msg))
    other = instruction(model=1.0)
    reply = release_once(s, other, lambda: produce(other))
    assert is_refusal(reply) and produce.calls == 1
    assert "already released for another request" in str(reply.content["refusal"]["reason"])


def test_release_once_failed_attempt_frees_the_round(tmp_path: Path) -> None:
    s, msg = site(tmp_path), instruction()

    def boom() -> Message:
        raise RuntimeError("training crashed")

    with pytest.raises(RuntimeError):
        release_once(s, msg, boom)
    produce = Produce()
    assert not is_refusal(release_once(s, msg, lambda: produce(msg))) and produce.calls == 1


def test_release_cache_is_encrypted_at_rest(tmp_path: Path) -> None:
    """Neither the database file nor its column holds the update's bytes in the clear."""
    s, produce, msg = site(tmp_path), Produce(), instruction()
    release_once(s, msg, lambda: produce(msg))
    with SiteLedger(s.directory / LEDGER_FILE) as led:
        (row,) = led.releases()
        sealed = led.sealed_reply(row)
    assert sealed is not None and UPDATE.tobytes() not in sealed
    assert row.request_digest == request_digest("train", msg.content).hex()
    stored = [*s.directory.glob(f"{LEDGER_FILE}*"), *(s.directory / "releases").iterdir()]
    assert any(p.suffix == ".sealed" for p in stored)
    for path in stored:  # the database, any journal, the sealed file
        raw = path.read_bytes()
        assert UPDATE.tobytes() not in raw and UPDATE[:8].tobytes() not in raw, path.name
    (release_file,) = (s.directory / "releases").glob("*.sealed")
    assert release_file.read_bytes() == sealed
    assert oct(release_file.stat().st_mode & 0o777) == "0o600"


def test_request_digest_ignores_signature_and_head_not_the_config() -> None:
    a, b = instruction(b"head-1"), instruction(b"head-2")
    b.content["instruction-signature"] = ConfigRecord({"seq": 9})
    assert request_digest("train", a.content) == request_digest("train", b.content)
    assert request_digest("train", a.content) != request_digest("train.secagg_masked", a.content)
    c = instruction()
    c.content[KEY_CONFIG]["cohort-size"] = 3
    assert request_digest("train", a.content) != request_digest("train", c.content)
