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


def _start(tmp_path: Path, data: Path) -> object:
    return CliRunner().invoke(
        app,
        [
            "start", "--data", str(data), "--insecure", "--superlink", "127.0.0.1:1",
            "--max-retries", "1", "--state-dir", str(tmp_path / "state"),
        ],
    )  # fmt: skip


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
