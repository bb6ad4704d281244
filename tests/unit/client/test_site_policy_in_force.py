"""``fedseal-client start --policy``: the site's policy is the one the deployed ClientApp enforces.

No processes: ``install_site_policy`` and ``site_policy`` run in-process, and
``fedseal-client start`` through typer's CliRunner against a closed port, so
it stops at its first connection (after the policy is put in force) or,
for a broken policy, before it.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from client.cli import app as client_app
from client.cli import node_config_text
from client.site_policy import install_site_policy, site_policy
from client.state import POLICY_FILE
from common.errors import ConfigurationError
from policies import PolicyFileError, default_site_policy_path, load_site_policy, policy_hash

OWN = 'kind = "site"\nname = "ward 7"\n[privacy]\nepsilon_budget = 2.0\n[rounds]\nmin_cohort_size = 5\n'


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(tmp_path: Path, *extra: str) -> Any:
    data = tmp_path / "d.csv"
    data.write_text("a,label\n1,0\n")
    args = [
        "start",
        "--data",
        str(data),
        "--superlink",
        f"127.0.0.1:{_closed_port()}",
        "--insecure",
        "--port",
        str(_closed_port()),
        "--state-dir",
        str(tmp_path / "s"),
        "--max-retries",  # the default (0) waits for the SuperLink forever
        "1",
        "--dataset-id",  # the budget's identity, which a policy requiring DP needs
        "ward-7-records",
        *extra,
    ]
    return CliRunner().invoke(client_app, args)


def test_given_policy_is_copied_into_the_site_state_with_its_hash(tmp_path: Path) -> None:
    own = tmp_path / "own.toml"
    own.write_text(OWN)
    installed = install_site_policy(own, tmp_path / "state")
    assert installed.path == tmp_path / "state" / POLICY_FILE and not installed.default
    assert installed.hash == policy_hash(load_site_policy(own))
    own.write_text(OWN.replace("2.0", "50.0"))  # later edits of the original change nothing
    node = {"policy-path": str(installed.path), "policy-hash": installed.hash}
    enforced = site_policy(node, None)
    assert enforced is not None and enforced.privacy.epsilon_budget == 2.0
    assert enforced.rounds.min_cohort_size == 5


def test_no_policy_means_the_shipped_default_is_in_force(tmp_path: Path) -> None:
    installed = install_site_policy(None, tmp_path / "state")
    assert installed.default and installed.source == default_site_policy_path().resolve()
    assert installed.hash == policy_hash(load_site_policy(default_site_policy_path()))
    assert "shipped default" in installed.summary()


def test_copy_whose_hash_moved_is_refused_by_the_client_app(tmp_path: Path) -> None:
    own = tmp_path / "own.toml"
    own.write_text(OWN)
    installed = install_site_policy(own, tmp_path / "state")
    installed.path.chmod(0o644)
    installed.path.write_text(OWN.replace("min_cohort_size = 5", "min_cohort_size = 1"))
    node = {"policy-path": str(installed.path), "policy-hash": installed.hash}
    with pytest.raises(ConfigurationError, match="changed since `fedseal-client start`"):
        site_policy(node, None)
    installed.path.unlink()
    with pytest.raises(ConfigurationError, match="cannot be read"):
        site_policy(node, None)


def test_broken_policy_raises_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('kind = "site"\n[privacy]\nepsilon_budget = -1\nextra = 1\n')
    with pytest.raises(PolicyFileError) as info:
        install_site_policy(bad, tmp_path / "state")
    assert len(info.value.violations) == 2
    assert not (tmp_path / "state" / POLICY_FILE).exists()


def test_start_names_the_policy_in_force_before_connecting(tmp_path: Path) -> None:
    own = tmp_path / "own.toml"
    own.write_text(OWN)
    result = _start(tmp_path, "--policy", str(own))
    assert result.exit_code == 1 and "cannot reach the SuperLink" in result.stderr
    line = f"site policy in force: {own.resolve()}, sha256 {policy_hash(load_site_policy(own))}"
    assert result.stdout.strip().splitlines() == [line]


def test_start_without_policy_names_the_shipped_default(tmp_path: Path) -> None:
    result = _start(tmp_path)
    assert result.exit_code == 1
    assert (
        f"site policy in force: {default_site_policy_path().resolve()} (the shipped default"
        in result.stdout
    )


def test_start_with_a_broken_policy_fails_like_policy_check_before_any_connection(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'kind = "site"\n[privacy]\nepsilon_budget = -1\n[rounds]\nmin_cohort_size = true\n'
    )
    result = _start(tmp_path, "--policy", str(bad))
    assert result.exit_code == 2
    assert f"{bad}: privacy.epsilon_budget: out of range" in result.stderr
    assert f"{bad}: rounds.min_cohort_size: wrong type" in result.stderr
    assert f"{bad}: 2 problems" in result.stderr
    assert "cannot reach" not in result.output and "Traceback" not in result.output
    assert "site policy in force" not in result.stdout


def test_node_config_refuses_values_flower_would_mangle() -> None:
    assert node_config_text({"a": "/x y/z", "b": "1"}) == 'a="/x y/z" b="1"'
    for value in ('/x"y', "/x\\y", "/x\ny"):
        with pytest.raises(ConfigurationError, match="double quote, backslash or newline"):
            node_config_text({"policy-path": value})
