"""A coordinator that picks weak secure-aggregation parameters is refused by the site's floors.

The coordinator chooses the cohort, the threshold ``t`` and the neighbour
degree ``k`` of every secure round. A lower ``t`` means fewer colluding
sites suffice to reconstruct a victim's secrets; a smaller ``k`` hides each
mask among fewer sites. A site whose policy sets floors refuses the round at
the keys stage, before it makes any key of that round, and the refusal (with
the rule) reaches the coordinator's audit log.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fake_grid import FIRST_NODE_ID, FakeGrid, server_identity
from federation import federated_setup

from client.app import make_client_app
from common.config import RunConfig
from policies import load_site_policies
from server.book import RunBook
from server.record import SqlRecord
from server.rounds import FederatedRun

PERMISSIVE = """
kind = "site"
[privacy]
require_dp = false
[rounds]
min_cohort_size = 1
"""


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with server_identity():
        yield


def run_with_floors(tmp_path: Path, floors: str, **cfg_changes: object) -> tuple[list, SqlRecord]:
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    (policy_dir / "default.toml").write_text(PERMISSIVE)
    (policy_dir / "site-0.toml").write_text(PERMISSIVE + floors)
    base: dict[str, object] = dict(
        dataset="custom", model="vector", workload="echo", num_features=8, num_classes=2,
        num_sites=6, rounds=1, device="cpu", clip_norm=1.0,
    )  # fmt: skip
    base.update(cfg_changes)
    cfg = RunConfig(**base)  # type: ignore[arg-type]
    app = make_client_app(
        federated_setup(tmp_path / "sites", cfg.num_sites, load_site_policies(policy_dir))
    )
    record = SqlRecord(f"sqlite:///{tmp_path / 'record.db'}")
    book = RunBook(record, Ed25519PrivateKey.generate(), "00000000beef")
    results = FederatedRun(cfg, FakeGrid(app, cfg.num_sites), book=book).execute()
    return results, record


@pytest.mark.parametrize(
    ("floors", "rule"),
    [
        ("min_secagg_threshold = 4\n", "rounds.min_secagg_threshold"),  # the run's t is 3
        ("min_secagg_threshold_fraction = 0.8\n", "rounds.min_secagg_threshold_fraction"),
        ("min_secagg_neighbours = 6\n", "rounds.min_secagg_neighbours"),  # k is 5 of 6 sites
    ],
)
def test_parameters_below_site_floors_are_refused_before_any_key(
    tmp_path: Path, floors: str, rule: str
) -> None:
    (result,), record = run_with_floors(tmp_path, floors)
    victim = FIRST_NODE_ID  # partition 0 holds the strict policy
    site = {s.node_id: s for s in result.sites}[victim]
    assert site.refused and rule in site.reason
    assert result.secagg is not None and result.participants == 5
    refused = [e.payload() for e in record.events() if e.kind == "site_refused"]
    assert [p["node_id"] for p in refused] == [str(victim)] and rule in refused[0]["reason"]
    # it refused at the keys stage: no secure-aggregation state for the round was ever made
    assert not (tmp_path / "sites" / "site-0" / "state.key").exists()


def test_parameters_meeting_the_floors_are_accepted(tmp_path: Path) -> None:
    floors = (
        "min_secagg_threshold = 3\nmin_secagg_threshold_fraction = 0.6\nmin_secagg_neighbours = 5\n"
    )
    (result,), _ = run_with_floors(tmp_path, floors)
    assert result.participants == 6 and not any(s.refused for s in result.sites)
