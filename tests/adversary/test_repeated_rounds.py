"""A coordinator that repeats rounds, against sites that release each round once.

Real site code throughout (``client.app.make_client_app`` with a policy pinning the
coordinator's key, over the in-memory Grid); training is the real DP-SGD trainer or a
fixed update, counted either way. The attacker holds the signing key and signs what it
likes: the same train instruction again, the same round with another model, cohort size
or configuration, a secure round redone under a new setup; or it edits the site's disk.
Each test names the attack; each fails with its defence (``client.release``) switched off.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fake_grid import FIRST_NODE_ID, FakeGrid, server_identity
from federation import federated_setup
from flwr.app import Message, RecordDict
from flwr.common.serde import recorddict_to_proto
from pinned_sites import echo_cfg, pinned_policies

from client.agent import LocalUpdate, SiteContext, Trainer, compute_update
from client.app import make_client_app
from client.ledger import PUBLIC_SIZE_RUN, SiteLedger
from client.state import LEDGER_FILE
from common.audit.instruction import InstructionSigner
from common.audit.seal import SignedHead, sign_head
from common.config import RunConfig
from common.record_digest import read_signature
from common.records import (
    KEY_ARRAYS,
    KEY_AUDIT_HEAD,
    KEY_COHORT_SIZE,
    KEY_CONFIG,
    KEY_METRICS,
    state_dict_to_vector,
    vector_to_record,
)
from common.task import task_for
from server.aggregation import RoundInput, SecAggAggregator
from server.aggregation.exchange import GridExchange, Outgoing
from server.aggregation.replies import refusal_reason
from server.book import RunBook, code_hash
from server.record import SqlRecord
from server.rounds import FederatedRun

D = 16
KEY = Ed25519PrivateKey.from_private_bytes(b"\x31" * 32)  # the coordinator's audit key
RUN_ID = "0000beef0001"
RECORD = "record-of-this-run"
NODE, PEER = FIRST_NODE_ID, FIRST_NODE_ID + 1


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with server_identity():
        yield


@dataclass
class Counted:
    """The site's trainer (default: a fixed update), every (node, round) it trained for recorded."""

    inner: Trainer | None = None
    calls: list[tuple[int, int]] = field(default_factory=list)

    def __call__(self, site: SiteContext, arrays: object) -> LocalUpdate:
        self.calls.append((site.context.node_id, site.server_round))
        if self.inner is not None:
            return self.inner(site, arrays)
        update = np.full(D, 0.01 * (site.context.node_id - NODE + 1), dtype=np.float32)
        return LocalUpdate(update, 1, {"train-seconds": 0.0})


@dataclass
class Sites:
    grid: FakeGrid
    trainer: Counted
    root: Path

    def ledger(self, node_id: int = NODE) -> SiteLedger:
        return SiteLedger(self.root / f"site-{node_id - FIRST_NODE_ID}" / LEDGER_FILE)


def sites(tmp_path: Path, num_sites: int = 2, trainer: Counted | None = None) -> Sites:
    policies = pinned_policies(tmp_path / "site-policies", KEY)
    counted = trainer if trainer is not None else Counted()
    root = tmp_path / "sites"
    app = make_client_app(federated_setup(root, num_sites, policies), trainer=counted)
    return Sites(FakeGrid(app, num_sites), counted, root)


def head_of(seq: int) -> SignedHead:
    return sign_head(KEY, RECORD, seq, hashlib.sha256(f"{RECORD}/{seq}".encode()).hexdigest(), "t")


def coordinator(s: Sites, cfg: RunConfig, head_seq: int = 3) -> GridExchange:
    """A coordinator process holding the key; its instructions carry the head of ``head_seq``."""
    head = head_of(head_seq)
    return GridExchange(s.grid, cfg, RUN_ID, "code-hash", lambda: head, InstructionSigner(KEY))


def train_request(
    ex: GridExchange, server_round: int = 1, cohort_size: int = 2, model: np.ndarray | None = None
) -> RecordDict:
    content = ex.instruction(server_round, **{KEY_COHORT_SIZE: cohort_size})
    vector = model if model is not None else np.zeros(D, dtype=np.float32)
    content[KEY_ARRAYS] = vector_to_record(vector)
    return content


def ask(
    ex: GridExchange, content: RecordDict, node_id: int = NODE, server_round: int = 1
) -> Message:
    """Send ``content`` as a plain train instruction (signed anew, at the next seq)."""
    return ex.send({node_id: (content, "train")}, server_round)[node_id]


def release_bytes(reply: Message) -> bytes:
    """The data-dependent part of a reply (update arrays and metrics) as wire bytes."""
    assert refusal_reason(reply) is None and not reply.has_error(), refusal_reason(reply)
    released = RecordDict({k: reply.content[k] for k in (KEY_ARRAYS, KEY_METRICS)})
    return bytes(recorddict_to_proto(released).SerializeToString())


# ------------------------------------------------------------------ (a) the same request thrice
def test_same_plain_train_instruction_three_times_one_release_one_charge(tmp_path: Path) -> None:
    """Three identical train instructions used to give three freshly noised DP-SGD updates
    for the epsilon of one; now the site trains once and sends the same bytes three times."""
    cfg = RunConfig(
        dataset="breast_cancer", model="linear", dp=True, accountant="rdp", num_sites=2,
        rounds=2, min_sites=1, device="cpu", secagg=False,
    )  # fmt: skip
    s = sites(tmp_path, trainer=Counted(inner=compute_update))
    ex = coordinator(s, cfg)
    model = task_for(cfg).build(seed=cfg.seed)
    content = train_request(ex, model=state_dict_to_vector(model.state_dict()))
    first = release_bytes(ask(ex, content))
    with s.ledger() as ledger:
        size, entry = ledger.history()  # the noisy size's release, then the round
        spent = ledger.spent(entry.dataset_id, entry.delta, "rdp")
    assert size.run_id == PUBLIC_SIZE_RUN
    replies = [release_bytes(ask(ex, content)) for _ in range(2)]
    assert replies == [first, first]
    assert s.trainer.calls == [(NODE, 1)]
    with s.ledger() as ledger:
        assert ledger.history() == [size, entry] and entry.state == "confirmed"  # one charge
        assert ledger.spent(entry.dataset_id, entry.delta, "rdp") == spent > 0
        (release,) = ledger.releases()
    assert (release.ledger_entry_id, release.resent, release.refused) == (entry.id, 2, 0)


# ------------------------------------------------------------------ (b) the same round, another request
def _other_model(ex: GridExchange) -> RecordDict:
    return train_request(ex, model=np.full(D, 0.5, dtype=np.float32))


def _other_cohort(ex: GridExchange) -> RecordDict:
    return train_request(ex, cohort_size=3)


def _other_config(ex: GridExchange) -> RecordDict:
    content = train_request(ex)
    config = content[KEY_CONFIG]
    content[KEY_CONFIG] = type(config)({**config, "local-epochs": 5})
    return content


@pytest.mark.parametrize(
    "other", [_other_model, _other_cohort, _other_config], ids=["model", "cohort-size", "config"]
)
def test_same_round_with_another_model_cohort_or_config_refused_without_training(
    tmp_path: Path, other: Any
) -> None:
    s = sites(tmp_path)
    ex = coordinator(s, echo_cfg())
    release_bytes(ask(ex, train_request(ex)))
    reason = refusal_reason(ask(ex, other(ex)))
    assert (
        reason is not None
        and f"round 1 of run {RUN_ID!r} already released for another request" in reason
    )
    assert s.trainer.calls == [(NODE, 1)]
    with s.ledger() as ledger:
        (release,) = ledger.releases()
    assert (release.resent, release.refused) == (0, 1)


class SameRoundExchange(GridExchange):
    """A coordinator that asks for round 1 every round (with each round's model)."""

    def instruction(self, server_round: int, **extra: Any) -> RecordDict:
        return super().instruction(1, **extra)

    def messages(self, outgoing: Outgoing, server_round: int) -> list[Message]:
        return super().messages(outgoing, 1)


def test_round_asked_again_with_the_next_model_refused_and_refusal_in_the_audit_log(
    tmp_path: Path,
) -> None:
    s = sites(tmp_path)
    record = SqlRecord(f"sqlite:///{tmp_path / 'record.db'}")
    run = FederatedRun(echo_cfg(rounds=2), s.grid, book=RunBook(record, KEY, RUN_ID))
    old = run.exchange
    run.exchange = SameRoundExchange(
        s.grid, old.cfg, old.run_id, old.app_hash, old.head, old.signer
    )
    results = run.execute()
    assert [(r.round, r.failed, r.participants) for r in results] == [(1, False, 2), (2, True, 0)]
    assert sorted(s.trainer.calls) == [(NODE, 1), (PEER, 1)]
    events = record.events(RUN_ID)
    refusals = [e.payload() for e in events if e.kind == "site_refused"]
    assert sorted(p["node_id"] for p in refusals) == [str(NODE), str(PEER)]
    assert all("already released for another request" in p["reason"] for p in refusals)
    assert [e.payload()["round"] for e in events if e.kind == "round_failed"] == [2]
    record.close()


# ------------------------------------------------------------------ (c) a secure round redone
def test_secure_round_redone_under_a_new_setup_refused_at_the_masked_stage(tmp_path: Path) -> None:
    """After its masked input left, a site must not mask a second update for the round under
    another setup: the two sums would differ by that site's contribution."""
    s = sites(tmp_path, num_sites=3)
    cfg = echo_cfg(3, secagg=True)
    record = SqlRecord(f"sqlite:///{tmp_path / 'record.db'}")
    (done,) = FederatedRun(cfg, s.grid, book=RunBook(record, KEY, RUN_ID)).execute()
    assert done.participants == 3 and len(s.trainer.calls) == 3
    # the coordinator redoes round 1: a fresh setup (new keys, new graph), the same cohort,
    # from a new process (it seals first, so its instructions number above the old ones)
    record.append_event(RUN_ID, "round_redone", "server", {"round": 1})
    record.seal(KEY)
    redo = SecAggAggregator(cfg, int(RUN_ID, 16), D)
    ex = GridExchange(s.grid, cfg, RUN_ID, code_hash(), record.latest_seal, InstructionSigner(KEY))
    cohort = sorted(s.grid.contexts)
    agg = redo.aggregate(RoundInput(1, cohort, np.zeros(D, dtype=np.float32)), ex)
    record.close()
    assert agg.failure is not None and agg.contributors == []
    assert len(s.trainer.calls) == 3  # nobody trained again
    (outcome,) = [e.payload for e in agg.events if e.kind == "secagg_outcome"]
    refused: Mapping[str, str] = outcome["refused"]
    assert sorted(refused) == [str(n) for n in cohort]
    # protocol v3's configuration has no coordinator-chosen seed, so a redo with the same
    # cohort has the same configuration digest: the round is refused as released, whatever setup
    assert all("its masked input was already released" in r for r in refused.values()), refused
    # each refusal that sank the round is named on its own, with the site's outcome
    named = [e.payload["node_id"] for e in agg.events if e.kind == "site_refused"]
    assert sorted(named) == [str(n) for n in cohort]
    assert all(o.refused for o in agg.outcomes) and len(agg.outcomes) == len(cohort)
    with s.ledger() as ledger:
        (release,) = ledger.releases()
    assert (release.kind, release.refused, release.sealed_sha256) == ("secure", 1, None)


# ------------------------------------------------------------------ (d) the cache tampered with
def test_release_cache_tampered_on_disk_refused_never_retrained(tmp_path: Path) -> None:
    s = sites(tmp_path)
    ex = coordinator(s, echo_cfg())
    content = train_request(ex)
    release_bytes(ask(ex, content))
    (stored,) = (s.root / "site-0" / "releases").glob("*.sealed")
    flipped = bytearray(stored.read_bytes())
    flipped[len(flipped) // 2] ^= 0x01
    stored.write_bytes(bytes(flipped))
    reason = refusal_reason(ask(ex, content))
    assert reason is not None and "stored release fails authentication" in reason
    assert s.trainer.calls == [(NODE, 1)]


# ------------------------------------------------------------------ (e) a resumed coordinator
def test_resend_by_a_resumed_coordinator_new_signature_seq_and_head_same_bytes(
    tmp_path: Path,
) -> None:
    s = sites(tmp_path)
    crashed = coordinator(s, echo_cfg(), head_seq=3)
    first = ask(crashed, train_request(crashed))
    resumed = coordinator(s, echo_cfg(), head_seq=9)  # a new process: later head, seq from scratch
    content = train_request(resumed)
    again = ask(resumed, content)
    assert release_bytes(again) == release_bytes(first)
    assert s.trainer.calls == [(NODE, 1)]
    sent = resumed.messages({NODE: (content, "train")}, 1)[0]
    signature = read_signature(sent.content)
    assert signature is not None and signature.seq > crashed.seq  # signed anew, higher seq
    assert sent.content[KEY_CONFIG][KEY_AUDIT_HEAD] == head_of(9).encode() != head_of(3).encode()
