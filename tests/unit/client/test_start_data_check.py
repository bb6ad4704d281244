"""``fedseal-client start`` parses the site's file before it connects: a bad file is one line.

Nothing about a malformed file then reaches the coordinator (the admission query only
ever sees files that parse); a good file is cached where the ClientApp maps it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.cli import app
from client.state import DATA_CACHE_DIR


def _start(tmp_path: Path, data: Path, *extra: str) -> object:
    return CliRunner().invoke(
        app,
        [
            "start", "--data", str(data), "--insecure", "--superlink", "127.0.0.1:1",
            "--max-retries", "1", "--state-dir", str(tmp_path / "state"), *extra,
        ],
    )  # fmt: skip


def _error_lines(result: object) -> list[str]:
    """The run's error lines, but for the connection it tries once its checks passed."""
    lines = result.output.splitlines()  # type: ignore[attr-defined]
    return [
        ln for ln in lines if ln.startswith("error:") and "cannot reach the SuperLink" not in ln
    ]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("f0,f1,target\n1,2,0\n", "no label column 'label'"),
        ("f0,f1,label\n1,x,0\n", "non-numeric value"),
        ("f0,f1,label\n1,nan,0\n", "NaN"),
        ("f0,f1,label\n1,2,-1\n", "labels"),
    ],
)
def test_bad_site_file_is_one_line_before_any_connection(
    tmp_path: Path, text: str, needle: str
) -> None:
    data = tmp_path / "site.csv"
    data.write_text(text)
    result = _start(tmp_path, data)
    assert result.exit_code == 2, result.output  # type: ignore[attr-defined]
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]  # type: ignore[attr-defined]
    assert len(errors) == 1 and needle in errors[0], result.output  # type: ignore[attr-defined]
    assert "SuperLink" not in result.output  # type: ignore[attr-defined]


def test_good_site_file_is_cached_where_the_client_app_maps_it(tmp_path: Path) -> None:
    data = tmp_path / "site.csv"
    data.write_text("f0,f1,label\n1,2,0\n3,4,1\n5,6,1\n")
    result = _start(tmp_path, data)
    assert "site data:" in result.output and "3 rows, 2 features" in result.output  # type: ignore[attr-defined]
    cache = tmp_path / "state" / "site" / DATA_CACHE_DIR
    entries = [e for e in cache.iterdir() if not e.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "x.npy").is_file()


def test_start_under_a_policy_requiring_dp_needs_a_declared_dataset_id(tmp_path: Path) -> None:
    data = tmp_path / "site.csv"
    data.write_text("f0,f1,label\n1,2,0\n3,4,1\n")
    (error,) = _error_lines(_start(tmp_path, data))  # the shipped default requires DP-SGD
    assert "give --dataset-id NAME" in error
    (bad,) = _error_lines(_start(tmp_path, data, "--dataset-id", "../x"))
    assert "dataset id '../x' must be" in bad


def test_start_without_a_dataset_id_warns_when_dp_is_not_required(tmp_path: Path) -> None:
    data = tmp_path / "site.csv"
    data.write_text("f0,f1,label\n1,2,0\n3,4,1\n")
    policy = tmp_path / "policy.toml"
    policy.write_text('kind = "site"\n[privacy]\nrequire_dp = false\n')
    result = _start(tmp_path, data, "--policy", str(policy))
    assert "warning: no --dataset-id" in result.output and not _error_lines(result)  # type: ignore[attr-defined]


def test_start_checks_declared_feature_bounds_against_the_file(tmp_path: Path) -> None:
    data = tmp_path / "site.csv"
    data.write_text("f0,f1,label\n1,2,0\n3,4,1\n")
    named = ("--dataset-id", "lab-a")
    (error,) = _error_lines(_start(tmp_path, data, *named, "--feature-bounds", "0:1,0:2,0:3"))
    assert "given for 3 features, the data has 2" in error
    (bad,) = _error_lines(_start(tmp_path, data, *named, "--feature-bounds", "5:1"))
    assert "low 5 is above high 1" in bad
    bounds = tmp_path / "bounds.txt"
    bounds.write_text("# f0\n0:10\n-1:1  # f1\n")
    result = _start(tmp_path, data, *named, "--feature-bounds", str(bounds))
    assert not _error_lines(result) and "cannot reach the SuperLink" in result.output  # type: ignore[attr-defined]
