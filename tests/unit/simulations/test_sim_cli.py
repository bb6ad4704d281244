"""``fedseal-sim run`` fails early and says so on one line (and as JSON with ``--json``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simulations.cli import app


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_is_refused_before_the_run(tmp_path: Path) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        result = CliRunner().invoke(app, ["run", "--no-dp", "--out", str(out), "--json"])
    finally:
        out.chmod(0o700)
    assert result.exit_code == 2
    (line,) = result.stdout.splitlines()
    doc = json.loads(line)
    assert doc["exit_code"] == 2 and "not writable" in doc["error"]
    assert not (out / "record.db").exists()


def test_out_that_is_a_file_is_refused_with_json_error(tmp_path: Path) -> None:
    out = tmp_path / "a-file"
    out.write_text("not a directory")
    result = CliRunner().invoke(app, ["run", "--no-dp", "--out", str(out), "--json"])
    assert result.exit_code == 2
    doc = json.loads(result.stdout)
    assert doc == {"error": doc["error"], "exit_code": 2} and str(out) in doc["error"]


def test_resume_without_out_is_a_json_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", "--resume", "abc", "--json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"].startswith("--resume needs --out")
