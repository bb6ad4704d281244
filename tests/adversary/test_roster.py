"""A hostile coordinator against sites that pin their roster authority.

The coordinator hands the sites their roster (in deployment: the file an operator
passes to ``fedseal-client start --roster``; in these tests: the roster in the sites'
``SiteSetup``) but does not hold the authority's key. Real site code throughout
(``client.app.make_client_app`` over the in-memory Grid, ``client.site_roster`` for the
install step); only training is faked.

Attacks: a roster with an added (sybil) member, with a member's identity key swapped for
the coordinator's, re-signed by the coordinator's own key, an older validly signed
version replayed, and instructions signed by another key than the one the roster names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fake_grid import FIRST_NODE_ID, FakeGrid, server_identity
from federation import federated_grid
from flwr.app import Message

from client.agent import LocalUpdate, SiteContext
from client.site_roster import install_site_roster
from client.state import private_dir
from common.audit.instruction import InstructionSigner
from common.config import RunConfig
from common.errors import IntegrityError
from common.records import KEY_ARRAYS, KEY_COHORT_SIZE, vector_to_record
from common.roster import Roster, RosterMember, sign_roster
from policies import SitePolicies, SitePolicy, load_site_policies
from policies.models import TrustRules
from server.aggregation.exchange import GridExchange
from server.aggregation.replies import refusal_reason
from simulations.federation import Federation

D = 8
KEY = Ed25519PrivateKey.from_private_bytes(b"\x61" * 32)  # the coordinator's audit key
RAW = KEY.public_key().public_bytes_raw()
OTHER = Ed25519PrivateKey.from_private_bytes(b"\x62" * 32)  # someone else's
SYBIL = Ed25519PrivateKey.from_private_bytes(b"\x63" * 32).public_key().public_bytes_raw()
NODES = (FIRST_NODE_ID, FIRST_NODE_ID + 1)

# No trust.server_key: the coordinator key comes from the verified roster.
SITE_POLICY = """kind = "site"
[privacy]
require_dp = false
[rounds]
require_secure_aggregation = false
min_cohort_size = 1
"""


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with server_identity():
        yield


def policies(tmp_path: Path) -> SitePolicies:
    folder = tmp_path / "site-policies"
    folder.mkdir(exist_ok=True)
    (folder / "default.toml").write_text(SITE_POLICY)
    return load_site_policies(folder)


@dataclass
class Trainer:
    calls: list[int] = field(default_factory=list)

    def __call__(self, site: SiteContext, arrays: object) -> LocalUpdate:
        site.roster()  # what protocol v3 will do before it signs anything
        site.identity()
        self.calls.append(site.context.node_id)
        return LocalUpdate(np.full(D, 0.01, dtype=np.float32), 1, {"train-seconds": 0.0})


def cfg() -> RunConfig:
    return RunConfig(dataset="custom", model="vector", workload="echo", num_features=D,
                     num_classes=2, num_sites=2, rounds=1, min_sites=2, device="cpu",
                     secagg=False, clip_norm=1.0)  # fmt: skip


def train_round(grid: FakeGrid, signer: Ed25519PrivateKey = KEY) -> dict[int, Message]:
    ex = GridExchange(
        grid, cfg(), "0000feed0002", "code-hash", lambda: None, InstructionSigner(signer)
    )
    content = ex.instruction(1, **{KEY_COHORT_SIZE: len(NODES)})
    content[KEY_ARRAYS] = vector_to_record(np.zeros(D, dtype=np.float32))
    return ex.send({n: (content, "train") for n in NODES}, 1)


def sites(
    tmp_path: Path, edit: Callable[[Federation], Roster] | None = None
) -> tuple[FakeGrid, Federation, Trainer]:
    """Two sites of a federation naming KEY as coordinator; ``edit(fed)`` gives the roster handed out."""
    trainer = Trainer()
    grid, fed = federated_grid(
        tmp_path / "sites",
        2,
        policies=policies(tmp_path),
        coordinator_key=RAW,
        trainer=trainer,
        edit_roster=edit,
    )
    return grid, fed, trainer


def _refused_for_roster(replies: dict[int, Message], needle: str) -> None:
    for node in NODES:
        reason = refusal_reason(replies[node])
        assert reason is not None and "roster is refused" in reason and needle in reason, reason


# ------------------------------------------------------------------ the coordinator's edits
def with_sybil(fed: Federation) -> Roster:
    """The authority's roster with one more member (the coordinator's), signature kept."""
    r = fed.roster
    return dataclasses.replace(r, members=(*r.members, RosterMember("site-9", SYBIL)))


def with_swapped_identity(fed: Federation) -> Roster:
    """Site 1's identity key replaced by the coordinator's: it could then speak for site 1."""
    r = fed.roster
    swapped = dataclasses.replace(r.members[1], identity_key=SYBIL)
    return dataclasses.replace(r, members=(r.members[0], swapped))


def resigned_by_coordinator(fed: Federation) -> Roster:
    """The sybil roster, signed by the coordinator's own key as if it were the authority."""
    r = with_sybil(fed)
    return sign_roster(
        federation=r.federation,
        version=r.version + 1,
        coordinator_key=RAW,
        members=r.members,
        authority=KEY,
    )


def test_honest_roster_accepted_and_its_coordinator_key_pins_instructions(tmp_path: Path) -> None:
    grid, _, trainer = sites(tmp_path)
    replies = train_round(grid)
    assert all(refusal_reason(replies[n]) is None for n in NODES)
    assert sorted(trainer.calls) == list(NODES)


def test_sybil_member_added_by_the_coordinator_refused(tmp_path: Path) -> None:
    grid, _, trainer = sites(tmp_path, with_sybil)
    _refused_for_roster(train_round(grid), "signature does not verify")
    assert trainer.calls == []


def test_identity_key_swapped_by_the_coordinator_refused(tmp_path: Path) -> None:
    grid, _, trainer = sites(tmp_path, with_swapped_identity)
    _refused_for_roster(train_round(grid), "signature does not verify")
    assert trainer.calls == []


def test_roster_resigned_by_the_coordinators_own_key_refused(tmp_path: Path) -> None:
    grid, _, trainer = sites(tmp_path, resigned_by_coordinator)
    _refused_for_roster(train_round(grid), "not by the pinned authority")
    assert trainer.calls == []


def test_instruction_signed_by_another_key_than_the_rosters_coordinator_refused(
    tmp_path: Path,
) -> None:
    """No trust.server_key in the policy: the roster's coordinator key is the pin."""
    grid, _, trainer = sites(tmp_path)
    replies = train_round(grid, signer=OTHER)
    for node in NODES:
        reason = refusal_reason(replies[node])
        assert (
            reason is not None
            and "trust.server_key" in reason
            and "not by the trusted server key" in reason
        )
    assert trainer.calls == []


# ------------------------------------------------------------------ replay of an older roster
def test_older_roster_replayed_after_a_newer_one_refused(tmp_path: Path) -> None:
    """The authority signed v2 (site 1 removed); the coordinator hands back the valid v1."""
    grid, fed, trainer = sites(tmp_path)
    v1 = fed.roster
    v2 = sign_roster(
        federation=v1.federation,
        version=v1.version + 1,
        coordinator_key=RAW,
        members=v1.members[:1],
        authority=fed.authority_key,
    )
    # site 0 installs v2 (deployment path: `fedseal-client start --roster`) ...
    policy = SitePolicy(trust=TrustRules(roster_authority=fed.authority_public.hex()))
    state = private_dir(tmp_path / "sites" / "site-0")
    source = tmp_path / "v2.json"
    source.write_text(v2.to_json())
    install_site_roster(source, state, policy)
    # ... then is handed v1 again, at start ...
    source.write_text(v1.to_json())
    with pytest.raises(IntegrityError, match="below version 2"):
        install_site_roster(source, state, policy)
    # ... and in its ClientApp: every instruction is refused until it is given v2 (or newer)
    replies = train_round(grid)
    reason = refusal_reason(replies[NODES[0]])
    assert reason is not None and "roster is refused" in reason and "below version 2" in reason
    assert trainer.calls == [NODES[1]]  # site 1 never saw v2: v1 is still its newest
