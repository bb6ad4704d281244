"""SiteLedger.would_spend: reserve's budget check as a dry run (same numbers, nothing written)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from client.ledger import SiteLedger
from common.dp.accounting import epsilon_for
from common.dp.events import PrivacyEvent, PrivacyLevel
from common.errors import ConfigurationError, PrivacyBudgetExceeded

DELTA = 1e-5
ROUND_EVENT = PrivacyEvent(1.1, 0.05, 40)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[SiteLedger]:
    with SiteLedger(tmp_path / "ledger.db") as led:
        yield led


def test_would_spend_empty_history_is_one_round_and_writes_nothing(ledger: SiteLedger) -> None:
    spend = ledger.would_spend("digits", "r", 1, ROUND_EVENT, DELTA, "rdp", 100.0)
    assert spend.spent == 0.0
    assert spend.would_be == epsilon_for([ROUND_EVENT], DELTA, "rdp")
    assert spend.budget == 100.0 and not spend.recorded and not spend.exceeds
    assert ledger.history() == []


def test_would_spend_equals_what_reserve_then_computes(ledger: SiteLedger) -> None:
    ledger.reserve("digits", "earlier", 1, PrivacyEvent(0.9, 0.1, 20), DELTA, "rdp", 100.0)
    spend = ledger.would_spend("digits", "r", 1, ROUND_EVENT, DELTA, "rdp", 100.0)
    assert spend.spent == ledger.spent("digits", DELTA, "rdp")
    ledger.reserve("digits", "r", 1, ROUND_EVENT, DELTA, "rdp", 100.0)
    assert ledger.spent("digits", DELTA, "rdp") == spend.would_be


def test_would_spend_over_budget_gives_reserves_refusal(ledger: SiteLedger) -> None:
    one = epsilon_for([ROUND_EVENT], DELTA, "rdp")
    two = epsilon_for([ROUND_EVENT, ROUND_EVENT], DELTA, "rdp")
    budget = (one + two) / 2  # room for one round, not two
    ledger.reserve("digits", "r", 0, ROUND_EVENT, DELTA, "rdp", budget)
    spend = ledger.would_spend("digits", "r", 1, ROUND_EVENT, DELTA, "rdp", budget)
    assert spend.exceeds and (spend.spent, spend.would_be) == (one, two)
    with pytest.raises(PrivacyBudgetExceeded) as info:
        ledger.reserve("digits", "r", 1, ROUND_EVENT, DELTA, "rdp", budget)
    assert str(spend.error()) == str(info.value)
    assert len(ledger.history()) == 1


def test_would_spend_recorded_round_costs_nothing_new(ledger: SiteLedger) -> None:
    ledger.reserve("digits", "r", 3, ROUND_EVENT, DELTA, "rdp", 100.0)
    spend = ledger.would_spend("digits", "r", 3, ROUND_EVENT, DELTA, "rdp", 100.0)
    assert spend.recorded and spend.would_be == spend.spent == epsilon_for(
        [ROUND_EVENT], DELTA, "rdp"
    )
    # another dataset, run or round is a new application
    assert not ledger.would_spend("other", "r", 3, ROUND_EVENT, DELTA, "rdp", 100.0).recorded
    assert not ledger.would_spend("digits", "r2", 3, ROUND_EVENT, DELTA, "rdp", 100.0).recorded
    assert not ledger.would_spend("digits", "r", 4, ROUND_EVENT, DELTA, "rdp", 100.0).recorded


def test_would_spend_recorded_round_over_budget_still_exceeds(ledger: SiteLedger) -> None:
    # a redo adds nothing, but a history already over the (lowered) budget is still refused
    ledger.reserve("digits", "r", 3, ROUND_EVENT, DELTA, "rdp", 100.0)
    spent = epsilon_for([ROUND_EVENT], DELTA, "rdp")
    spend = ledger.would_spend("digits", "r", 3, ROUND_EVENT, DELTA, "rdp", spent / 2)
    assert spend.recorded and spend.exceeds and spend.would_be == spent


@pytest.mark.parametrize(
    "args",
    [
        ("", "r", 0, ROUND_EVENT, DELTA, "rdp", 1.0),
        ("d", "", 0, ROUND_EVENT, DELTA, "rdp", 1.0),
        ("d", "r", -1, ROUND_EVENT, DELTA, "rdp", 1.0),
        ("d", "r", 0, PrivacyEvent(1.0, 0.1, 1, PrivacyLevel.CLIENT), DELTA, "rdp", 1.0),
        ("d", "r", 0, ROUND_EVENT, 0.0, "rdp", 1.0),
        ("d", "r", 0, ROUND_EVENT, DELTA, "nope", 1.0),
        ("d", "r", 0, ROUND_EVENT, DELTA, "rdp", 0.0),
    ],
)
def test_would_spend_invalid_arguments_raise_like_reserve(
    ledger: SiteLedger, args: tuple[object, ...]
) -> None:
    with pytest.raises(ConfigurationError):
        ledger.would_spend(*args)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        ledger.reserve(*args)  # type: ignore[arg-type]
