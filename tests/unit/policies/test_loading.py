"""Policy files: defaults load, every problem is named with file and field, hashes are canonical."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ConfigurationError
from policies import (
    PolicyFileError,
    ServerPolicy,
    SitePolicy,
    default_server_policy_path,
    default_site_policy_path,
    load_policy,
    load_server_policy,
    load_site_policies,
    load_site_policy,
    parse_policy,
    policy_hash,
)
from policies.models import ServerRoundRules


def _write(tmp_path: Path, text: str, name: str = "policy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _problems(exc: PolicyFileError) -> dict[str, str]:
    return {v.field: v.problem for v in exc.violations}


def test_load_defaults_equal_code_defaults() -> None:
    assert load_server_policy(default_server_policy_path()) == ServerPolicy()
    assert load_site_policy(default_site_policy_path()) == SitePolicy()


def test_load_policy_auto_detects_kind_from_sections(tmp_path: Path) -> None:
    assert isinstance(
        load_policy(_write(tmp_path, "[privacy]\nepsilon_budget = 2.0\n")), SitePolicy
    )
    assert isinstance(load_policy(_write(tmp_path, "[energy]\n", "s.toml")), ServerPolicy)


def test_load_policy_undetectable_kind_names_kind(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError) as info:
        load_policy(_write(tmp_path, 'name = "x"\n'))
    assert "kind" in _problems(info.value)


def test_load_policy_toml_syntax_error_reported_not_raised_raw(tmp_path: Path) -> None:
    path = _write(tmp_path, "[rounds\nmin_sites = 2\n")
    with pytest.raises(PolicyFileError) as info:
        load_server_policy(path)
    (violation,) = info.value.violations
    assert violation.file == str(path)
    assert violation.field == "<syntax>"
    assert "line 1" in violation.problem


def test_load_policy_missing_file_reported(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError) as info:
        load_site_policy(tmp_path / "absent.toml")
    assert "cannot read" in info.value.violations[0].problem


def test_load_policy_unknown_key_named_with_suggestion(tmp_path: Path) -> None:
    path = _write(tmp_path, "[rounds]\nmin_site = 2\n")
    with pytest.raises(PolicyFileError) as info:
        load_server_policy(path)
    problems = _problems(info.value)
    assert list(problems) == ["rounds.min_site"]
    assert "unknown key" in problems["rounds.min_site"]
    assert "min_sites" in problems["rounds.min_site"]
    assert str(info.value).startswith(f"{path}: rounds.min_site: unknown key")


def test_load_policy_unknown_section_named(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError) as info:
        load_site_policy(_write(tmp_path, 'kind = "site"\n[privcy]\nepsilon_budget = 1.0\n'))
    assert "unknown key" in _problems(info.value)["privcy"]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[rounds]\nmin_sites = true\n", "rounds.min_sites"),
        ("[rounds]\nmin_sites = 2.5\n", "rounds.min_sites"),
        ('[rounds]\nmax_fraction = "half"\n', "rounds.max_fraction"),
        ("[secure_aggregation]\nrequired = 1\n", "secure_aggregation.required"),
        ("[admission]\nmode = 'allowlist'\nnode_ids = [1, true]\n", "admission.node_ids[1]"),
        ("rounds = 3\n", "rounds"),
        ("[release.min_metrics]\naccuracy = '0.9'\n", "release.min_metrics.accuracy"),
    ],
)
def test_load_server_policy_wrong_type_named(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(PolicyFileError) as info:
        load_server_policy(_write(tmp_path, text))
    problems = _problems(info.value)
    assert field in problems, problems
    assert "wrong type" in problems[field]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[privacy]\nepsilon_budget = -1.0\n", "privacy.epsilon_budget"),
        ("[privacy]\nepsilon_budget = 0\n", "privacy.epsilon_budget"),
        ("[privacy]\nepsilon_budget = nan\n", "privacy.epsilon_budget"),
        ("[privacy]\nepsilon_budget = inf\n", "privacy.epsilon_budget"),
        ("[privacy]\ndelta = 1.0\n", "privacy.delta"),
        ("[privacy]\nmin_noise_multiplier = -0.1\n", "privacy.min_noise_multiplier"),
        ("[rounds]\nmin_cohort_size = 0\n", "rounds.min_cohort_size"),
        ("[privacy.datasets.x]\nepsilon_budget = -2.0\n", "privacy.datasets.x.epsilon_budget"),
        ("[trust]\nserver_key = 'abc'\n", "trust.server_key"),
        ("[trust]\nallowed_app_hashes = ['xyz']\n", "trust.allowed_app_hashes[0]"),
        ("schema = 2\n[privacy]\n", "schema"),
    ],
)
def test_load_site_policy_out_of_range_named(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(PolicyFileError) as info:
        load_site_policy(_write(tmp_path, 'kind = "site"\n' + text))
    problems = _problems(info.value)
    assert field in problems, problems


def test_load_server_policy_fraction_outside_unit_interval_named(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError) as info:
        load_server_policy(_write(tmp_path, "[rounds]\nmax_fraction = 0.0\n"))
    assert "out of range" in _problems(info.value)["rounds.max_fraction"]


def test_load_policy_several_errors_all_listed(tmp_path: Path) -> None:
    text = """
kind = "site"
colour = "blue"
[privacy]
epsilon_budget = -4.0
delta = true
[rounds]
min_cohort_size = "five"
max_local_epochs = 0
"""
    with pytest.raises(PolicyFileError) as info:
        load_site_policy(_write(tmp_path, text))
    assert set(_problems(info.value)) == {
        "colour",
        "privacy.epsilon_budget",
        "privacy.delta",
        "rounds.min_cohort_size",
        "rounds.max_local_epochs",
    }


def test_load_policy_cross_field_problem_named(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError) as info:
        load_server_policy(_write(tmp_path, "[rounds]\nmin_fraction = 0.9\nmax_fraction = 0.5\n"))
    assert "max_fraction" in _problems(info.value)["rounds.min_fraction"]


def test_load_policy_allowlist_with_bad_entry_reports_only_entry(tmp_path: Path) -> None:
    text = "[admission]\nmode = 'allowlist'\nnode_ids = [3, 'x']\n"
    with pytest.raises(PolicyFileError) as info:
        load_server_policy(_write(tmp_path, text))
    assert list(_problems(info.value)) == ["admission.node_ids[1]"]


def test_load_server_policy_given_site_file_names_kind(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError) as info:
        load_server_policy(default_site_policy_path())
    assert list(_problems(info.value)) == ["kind"]


def test_model_constructed_in_code_validates() -> None:
    with pytest.raises(ConfigurationError, match="min_sites"):
        ServerRoundRules(min_sites=0)
    with pytest.raises(ConfigurationError, match="max_fraction"):
        ServerRoundRules(max_fraction=1.5)


def test_policy_hash_whitespace_order_comments_and_explicit_defaults_ignored(
    tmp_path: Path,
) -> None:
    a = parse_policy('kind="site"\n[privacy]\nepsilon_budget=4\n[rounds]\nmin_cohort_size=5\n')
    b = parse_policy(
        "# a comment\n[rounds]\n  min_cohort_size = 5   # five\n\n"
        "[privacy]\nepsilon_budget = 4.0\ndelta = 1e-5\n",
        kind="site",
    )
    assert policy_hash(a) == policy_hash(b)


def test_policy_hash_changes_with_meaning() -> None:
    a = parse_policy("[privacy]\nepsilon_budget = 4.0\n", kind="site")
    b = parse_policy("[privacy]\nepsilon_budget = 4.5\n", kind="site")
    assert policy_hash(a) != policy_hash(b)
    assert len(policy_hash(a)) == 64


def test_policy_hash_list_order_ignored() -> None:
    a = parse_policy("[admission]\nmode='allowlist'\nnode_ids=[3,1,2]\n", kind="server")
    b = parse_policy("[admission]\nmode='allowlist'\nnode_ids=[1,2,3]\n", kind="server")
    assert policy_hash(a) == policy_hash(b)


def test_load_site_policies_single_file_applies_to_all(tmp_path: Path) -> None:
    policies = load_site_policies(default_site_policy_path())
    assert policies.for_site(0) == SitePolicy()
    assert policies.for_site("site-9") == SitePolicy()


def test_load_site_policies_directory_per_site_and_default(tmp_path: Path) -> None:
    _write(tmp_path, "[privacy]\nepsilon_budget = 1.0\n", "3.toml")
    _write(tmp_path, "[privacy]\nepsilon_budget = 6.0\n", "default.toml")
    policies = load_site_policies(tmp_path)
    assert policies.for_site(3).privacy.epsilon_budget == 1.0
    assert policies.for_site(4).privacy.epsilon_budget == 6.0


def test_load_site_policies_directory_without_default_unknown_site_raises(tmp_path: Path) -> None:
    _write(tmp_path, "[privacy]\nepsilon_budget = 1.0\n", "a.toml")
    with pytest.raises(ConfigurationError, match="'b'"):
        load_site_policies(tmp_path).for_site("b")


def test_load_site_policies_directory_errors_of_all_files_listed(tmp_path: Path) -> None:
    _write(tmp_path, "[privacy]\nepsilon_budget = -1.0\n", "a.toml")
    _write(tmp_path, "[rounds]\nmin_cohort_size = true\n", "b.toml")
    with pytest.raises(PolicyFileError) as info:
        load_site_policies(tmp_path)
    assert {Path(v.file).name for v in info.value.violations} == {"a.toml", "b.toml"}


def test_load_site_policies_empty_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError):
        load_site_policies(tmp_path)
