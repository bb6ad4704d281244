"""Record-level DP through the real ServerApp/ClientApp paths (in-memory Grid, no Ray)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_grid import FIRST_NODE_ID, FakeGrid, server_identity
from federation import federated_setup
from opacus.accountants import RDPAccountant

from client.app import make_client_app
from client.ledger import PUBLIC_SIZE_RUN, SiteLedger
from client.site import site_dataset_id
from client.state import LEDGER_FILE, private_dir
from common.config import RunConfig
from common.dp import PrivacyEvent, epsilon_for
from server.rounds import FederatedRun


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with server_identity():
        yield


def _cfg(**changes: object) -> RunConfig:
    base = RunConfig(
        num_sites=3,
        rounds=2,
        min_sites=2,
        dp=True,
        site_epsilon=4.0,
        accountant="rdp",
        local_epochs=1,
        batch_size=32,
        secagg=False,
    )
    return base.replace(**changes)


def _exhaust(site_root: Path, cfg: RunConfig, partition: int) -> None:
    """Spend (almost) the whole budget of one site's dataset in an earlier run."""
    dataset_id = site_dataset_id(cfg, {"partition-id": partition, "num-partitions": cfg.num_sites})
    private_dir(site_root / f"site-{partition}")  # as the site makes it: 0700
    with SiteLedger(site_root / f"site-{partition}" / LEDGER_FILE) as ledger:
        ledger.reserve(
            dataset_id,
            "earlier-run",
            1,
            PrivacyEvent(0.8, 0.5, 40),
            cfg.site_delta,
            cfg.accountant,
            1e9,
        )


@pytest.mark.parametrize("secagg", [False, True])
def test_exhausted_site_refuses_and_run_completes_with_others(tmp_path: Path, secagg: bool) -> None:
    # 4 sites: with secure aggregation each survivor keeps t=2 of its k=3 neighbours.
    cfg = _cfg(secagg=secagg, num_sites=4)
    _exhaust(tmp_path, cfg, 0)
    run = FederatedRun(
        cfg, FakeGrid(make_client_app(federated_setup(tmp_path, cfg.num_sites)), cfg.num_sites)
    )
    results = run.execute()
    assert len(results) == 2
    for r in results:
        by_node = {s.node_id: s for s in r.sites}
        refused = by_node[FIRST_NODE_ID]
        assert refused.refused and not refused.accepted
        assert refused.reason.startswith("privacy budget exhausted: spent")
        assert r.participants == 3
        for i in (1, 2, 3):
            site = by_node[FIRST_NODE_ID + i]
            assert site.accepted and site.record_level_epsilon is not None
            assert site.record_level_epsilon <= cfg.site_epsilon + 1e-9


def test_reported_epsilon_equals_independent_accountant_on_ledger_history(tmp_path: Path) -> None:
    cfg = _cfg()
    run = FederatedRun(
        cfg, FakeGrid(make_client_app(federated_setup(tmp_path, cfg.num_sites)), cfg.num_sites)
    )
    last = run.execute()[-1]
    for partition in range(cfg.num_sites):
        site = next(s for s in last.sites if s.node_id == FIRST_NODE_ID + partition)
        with SiteLedger(tmp_path / f"site-{partition}" / LEDGER_FILE) as ledger:
            history = ledger.history()
        assert all(e.state == "confirmed" for e in history)
        # the noisy size's release (charged once, client.privacy "Adjacency"), then each round
        assert [e.run_id == PUBLIC_SIZE_RUN for e in history] == [True] + [False] * cfg.rounds
        # Opacus' RDP accountant stepped through the recorded mechanism history.
        acc = RDPAccountant()
        for e in history:
            acc.history.append((e.noise_multiplier, e.sample_rate, e.steps))
        independent = acc.get_epsilon(cfg.site_delta)
        assert site.record_level_epsilon == pytest.approx(independent, rel=0.01)
        assert site.record_level_epsilon == pytest.approx(
            epsilon_for([e.event for e in history], cfg.site_delta, "rdp"), rel=1e-9
        )
        assert site.record_level_epsilon <= cfg.site_epsilon + 1e-9


def test_central_dp_client_epsilon_reported_and_grows(tmp_path: Path) -> None:
    cfg = _cfg(dp=False, central_dp=True, noise_multiplier=1.5, clip_norm=1.0, rounds=3)
    results = FederatedRun(
        cfg, FakeGrid(make_client_app(federated_setup(tmp_path, cfg.num_sites)), cfg.num_sites)
    ).execute()
    eps = [r.client_level_epsilon for r in results]
    assert all(e is not None and e > 0 for e in eps)
    assert eps[0] < eps[1] < eps[2]
    expected = epsilon_for([PrivacyEvent(1.5, 1.0, 1)] * 3, cfg.delta, "rdp")
    assert eps[-1] == pytest.approx(expected, rel=1e-9)
