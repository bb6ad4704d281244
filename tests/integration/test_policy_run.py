"""Policies enforced on both sides of real rounds (in-memory Grid, no Ray), decisions recorded."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_grid import FIRST_NODE_ID, FakeGrid, server_identity
from federation import federated_setup

from client.app import make_client_app
from common.config import RunConfig
from common.errors import PolicyViolation
from policies import load_server_policy, load_site_policies
from server.book import RunBook
from server.policy_gate import PolicyGate
from server.record import SqlRecord, create_keypair, load_signing_key
from server.rounds import FederatedRun

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with server_identity():
        yield


SITE_DEFAULT = """kind = "site"
[privacy]
epsilon_budget = 8.0
[rounds]
min_cohort_size = 3
"""


def _run(
    tmp_path: Path,
    cfg: RunConfig,
    *,
    server_policy: str | None = None,
    site_dir: Path | None = None,
):
    record = SqlRecord(f"sqlite:///{tmp_path / 'record.db'}")
    create_keypair(tmp_path / "keys")  # made on purpose, as `fedseal-server keys` does
    book = RunBook(record, load_signing_key(tmp_path / "keys"), "0000abcd0001")
    gate = None
    if server_policy is not None:
        (tmp_path / "server.toml").write_text(server_policy)
        gate = PolicyGate(load_server_policy(tmp_path / "server.toml"), book)
    policies = load_site_policies(site_dir) if site_dir is not None else None
    grid = FakeGrid(
        make_client_app(federated_setup(tmp_path / "sites", cfg.num_sites, policies)), cfg.num_sites
    )
    return FederatedRun(cfg, grid, book=book, gate=gate), record


def _cfg(**changes: object) -> RunConfig:
    return RunConfig(
        num_sites=4,
        rounds=3,
        min_sites=2,
        dp=True,
        site_epsilon=8.0,
        accountant="rdp",
        local_epochs=1,
        batch_size=32,
        secagg=True,
    ).replace(**changes)


def _verify(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            str(BIN / "fedseal-server"),
            "audit",
            "verify",
            "--db",
            str(tmp_path / "record.db"),
            "--public-key",
            str(tmp_path / "keys" / "audit.pub"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("OK:"), proc.stdout + proc.stderr


def test_site_with_small_budget_calibrates_to_it_and_stays_within_it(tmp_path: Path) -> None:
    # The run asks for epsilon 8 over its rounds; site 0's own budget is 7. The site plans its
    # noise against its own budget (client.agent.round_plan), so it takes part in every round
    # with more noise than the others instead of running out (and refusing) near the end.
    sites = tmp_path / "site-policies"
    sites.mkdir()
    (sites / "default.toml").write_text(SITE_DEFAULT)
    (sites / "site-0.toml").write_text(
        SITE_DEFAULT.replace("epsilon_budget = 8.0", "epsilon_budget = 7.0")
    )
    run, record = _run(tmp_path, _cfg(), site_dir=sites)
    results = run.execute()
    first = FIRST_NODE_ID
    for r in results:
        assert r.participants == 4
        by_node = {s.node_id: s for s in r.sites}
        assert by_node[first].record_level_epsilon <= 7.0
        others = {by_node[first + i].noise_multiplier for i in (1, 2, 3)}
        assert len(others) == 1 and by_node[first].noise_multiplier > others.pop()
    last = {s.node_id: s for s in results[-1].sites}
    assert last[first].record_level_epsilon > 6.9  # what the budget allows, spent by the end
    kinds = [e.kind for e in record.events("0000abcd0001")]
    assert "site_policy_decisions" in kinds
    record.close()
    _verify(tmp_path)


def test_site_policy_forbids_cohort_size_others_carry_on(tmp_path: Path) -> None:
    sites = tmp_path / "site-policies"
    sites.mkdir()
    (sites / "default.toml").write_text(SITE_DEFAULT)
    (sites / "site-2.toml").write_text(
        SITE_DEFAULT.replace("min_cohort_size = 3", "min_cohort_size = 10")
    )
    run, record = _run(tmp_path, _cfg(rounds=1), site_dir=sites)
    (result,) = run.execute()
    by_node = {s.node_id: s for s in result.sites}
    assert by_node[FIRST_NODE_ID + 2].refused
    assert "rounds.min_cohort_size" in by_node[FIRST_NODE_ID + 2].reason
    assert result.participants == 3
    record.close()


def test_server_refuses_run_that_violates_its_policy(tmp_path: Path) -> None:
    policy = 'kind = "server"\n[secure_aggregation]\nrequired = true\n'
    run, record = _run(tmp_path, _cfg(secagg=False, dp=False), server_policy=policy)
    with pytest.raises(PolicyViolation, match="secure_aggregation.required"):
        run.execute()
    events = record.events("0000abcd0001")
    assert any(e.kind == "policy_decision" and not e.payload()["allowed"] for e in events)
    assert events[-1].kind == "run_aborted"
    record.close()
    _verify(tmp_path)


def test_energy_budget_stops_run_cleanly(tmp_path: Path) -> None:
    policy = 'kind = "server"\n[energy]\nmax_kwh_per_run = 1e-12\n'
    run, record = _run(tmp_path, _cfg(dp=False), server_policy=policy)
    results = run.execute()
    assert len(results) == 1  # the second round would exceed the budget
    assert run.stopped is not None and "energy" in run.stopped
    assert json.loads(json.dumps(run.result_doc()))["stopped"] == run.stopped
    assert record.get_run("0000abcd0001").status == "finished"
    record.close()
    _verify(tmp_path)


def test_release_gate_refuses_then_force_overrides_and_records(tmp_path: Path) -> None:
    run, record = _run(tmp_path, _cfg(rounds=1, dp=False))
    run.execute()
    record.close()
    (tmp_path / "gate.toml").write_text('kind = "server"\n[release]\nmax_client_epsilon = 1.0\n')
    args = [
        str(BIN / "fedseal-server"),
        "models",
        "export",
        "1",
        "--db",
        str(tmp_path / "record.db"),
        "--out",
        str(tmp_path / "model.bin"),
        "--policy",
        str(tmp_path / "gate.toml"),
        "--keys",
        str(tmp_path / "keys"),
    ]
    denied = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert denied.returncode == 1 and "release.max_client_epsilon" in denied.stderr
    assert not (tmp_path / "model.bin").exists()
    forced = subprocess.run([*args, "--force"], capture_output=True, text=True, timeout=60)
    assert forced.returncode == 0, forced.stderr
    assert (tmp_path / "model.bin").is_file()
    with SqlRecord(f"sqlite:///{tmp_path / 'record.db'}", create=False) as rec:
        assert any(e.kind == "release_override" for e in rec.events("0000abcd0001"))
    _verify(tmp_path)


def test_site_allowed_app_hashes_admit_only_the_listed_coordinator_code(tmp_path: Path) -> None:
    from server.book import code_hash

    sites = tmp_path / "site-policies"
    sites.mkdir()
    (sites / "default.toml").write_text(
        SITE_DEFAULT + f'[trust]\nallowed_app_hashes = ["{code_hash()}"]\n'
    )
    (sites / "site-1.toml").write_text(
        SITE_DEFAULT + f'[trust]\nallowed_app_hashes = ["{"0" * 64}"]\n'
    )
    run, record = _run(tmp_path, _cfg(rounds=1), site_dir=sites)
    (result,) = run.execute()
    by_node = {s.node_id: s for s in result.sites}
    assert by_node[FIRST_NODE_ID + 1].refused
    assert "trust.allowed_app_hashes" in by_node[FIRST_NODE_ID + 1].reason
    assert result.participants == 3
    record.close()
