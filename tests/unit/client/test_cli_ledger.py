from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.cli_ledger import ledger_app
from client.ledger import SiteLedger
from common.dp.events import PrivacyEvent

runner = CliRunner()
DELTA = 1e-5


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    with SiteLedger(path) as led:
        e = led.reserve("digits", "run-1", 0, PrivacyEvent(1.1, 0.05, 40), DELTA, "rdp", 50.0)
        led.confirm(e, steps_taken=40)
        led.reserve("digits", "run-1", 1, PrivacyEvent(1.1, 0.05, 40), DELTA, "rdp", 50.0)
    return path


def test_ledger_show_json_entries_and_totals_match_ledger(db: Path) -> None:
    result = runner.invoke(ledger_app, ["show", "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [e["state"] for e in payload["entries"]] == ["confirmed", "reserved"]
    (total,) = payload["totals"]
    with SiteLedger(db) as led:
        assert total["record_level_epsilon"] == led.spent("digits", DELTA, "rdp")
    assert total["reserved"] == 1 and total["confirmed"] == 1 and total["steps"] == 80


def test_ledger_show_json_delta_and_accountant_override(db: Path) -> None:
    result = runner.invoke(
        ledger_app, ["show", "--db", str(db), "--json", "--delta", "1e-3", "--accountant", "prv"]
    )
    assert result.exit_code == 0, result.output
    (total,) = json.loads(result.stdout)["totals"]
    assert total["delta"] == 1e-3 and total["accountant"] == "prv"
    with SiteLedger(db) as led:
        assert total["record_level_epsilon"] == led.spent("digits", 1e-3, "prv")


def test_ledger_show_table_lists_dataset(db: Path) -> None:
    result = runner.invoke(ledger_app, ["show", "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert "digits" in result.stdout and "reserved" in result.stdout


def test_ledger_show_missing_db_fails_without_creating(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    result = runner.invoke(ledger_app, ["show", "--db", str(missing)])
    assert result.exit_code == 2
    assert "no privacy ledger" in result.output
    assert not missing.exists()


def test_ledger_show_bad_accountant_is_usage_error(db: Path) -> None:
    result = runner.invoke(ledger_app, ["show", "--db", str(db), "--accountant", "gdp"])
    assert result.exit_code == 2
    assert "accountant must be one of" in result.output


def test_ledger_show_lists_the_sites_client_level_exposure(tmp_path: Path) -> None:
    from common.dp.events import PrivacyLevel

    path = tmp_path / "ledger.db"
    with SiteLedger(path) as led:
        event = PrivacyEvent(1.5, 0.5, 1, PrivacyLevel.CLIENT)
        for server_round in (1, 3):
            led.record_participation(
                event, "digits", "run-1", server_round, delta=DELTA, accountant="rdp"
            )
        (expected,) = led.client_exposure()
    result = runner.invoke(ledger_app, ["show", "--db", str(path), "--json"])
    assert result.exit_code == 0, result.output
    (shown,) = json.loads(result.stdout)["client_level"]
    assert shown == expected.to_json() and shown["rounds"] == 2
    table = runner.invoke(ledger_app, ["show", "--db", str(path)])
    assert "client-level exposure per run" in table.stdout and "run-1" in table.stdout
