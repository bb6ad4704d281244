"""``policy check``: exit 0 with one summary line, exit 2 naming every bad field."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from policies.cli import policy_app
from policies.loading import default_server_policy_path, default_site_policy_path

runner = CliRunner()


def test_policy_check_default_server_exit_0_one_line() -> None:
    result = runner.invoke(policy_app, ["check", str(default_server_policy_path())])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("OK: server policy")


def test_policy_check_default_site_with_kind_exit_0() -> None:
    result = runner.invoke(policy_app, ["check", str(default_site_policy_path()), "--kind", "site"])
    assert result.exit_code == 0, result.output
    assert "epsilon budget 8 at delta 1e-05" in result.stdout


def test_policy_check_broken_file_exit_2_lists_every_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        'kind = "site"\nextra = 1\n[privacy]\nepsilon_budget = -1\n[rounds]\nmin_cohort_size = true\n',
        encoding="utf-8",
    )
    result = runner.invoke(policy_app, ["check", str(path)])
    assert result.exit_code == 2
    assert f"{path}: extra: unknown key" in result.stderr
    assert f"{path}: privacy.epsilon_budget: out of range" in result.stderr
    assert f"{path}: rounds.min_cohort_size: wrong type" in result.stderr
    assert "3 problems" in result.stderr
    assert "Traceback" not in result.output


def test_policy_check_syntax_error_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[privacy\n", encoding="utf-8")
    result = runner.invoke(policy_app, ["check", str(path)])
    assert result.exit_code == 2
    assert f"{path}: <syntax>: TOML syntax error" in result.stderr


def test_policy_check_wrong_kind_exit_2() -> None:
    result = runner.invoke(
        policy_app, ["check", str(default_site_policy_path()), "--kind", "server"]
    )
    assert result.exit_code == 2
    assert ": kind: this is a site policy" in result.stderr


def test_policy_default_prints_file_that_checks(tmp_path: Path) -> None:
    result = runner.invoke(policy_app, ["default", "server"])
    assert result.exit_code == 0
    path = tmp_path / "server.toml"
    path.write_text(result.stdout, encoding="utf-8")
    assert runner.invoke(policy_app, ["check", str(path)]).exit_code == 0
