from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from client.ledger import SiteLedger
from common.dp.accounting import PRV_RELATIVE_ERROR, epsilon_for
from common.dp.events import PrivacyEvent, PrivacyLevel
from common.errors import ConfigurationError, PrivacyBudgetExceeded, RecordError

DELTA = 1e-5
ROUND_EVENT = PrivacyEvent(1.1, 0.05, 40)


@pytest.fixture
def ledger(tmp_path: Path) -> SiteLedger:
    with SiteLedger(tmp_path / "ledger.db") as led:
        yield led


def test_spent_empty_dataset_is_zero(ledger: SiteLedger) -> None:
    assert ledger.spent("digits", DELTA, "rdp") == 0.0


@pytest.mark.parametrize("name", ["prv", "rdp"])
def test_spent_across_runs_equals_opacus_accountant(tmp_path: Path, name: str) -> None:
    history = [
        ("run-a", 0, PrivacyEvent(1.1, 0.05, 40)),
        ("run-a", 1, PrivacyEvent(1.1, 0.05, 40)),
        ("run-b", 0, PrivacyEvent(0.9, 0.1, 20)),
        ("run-b", 1, PrivacyEvent(1.1, 0.05, 40)),
    ]
    with SiteLedger(tmp_path / "l.db") as led:
        for run, rnd, ev in history:
            led.reserve("digits", run, rnd, ev, DELTA, name, budget=1e6)
        led.reserve("other", "run-a", 0, PrivacyEvent(0.5, 0.5, 100), DELTA, name, budget=1e6)
    acc = PRVAccountant() if name == "prv" else RDPAccountant()
    for _, _, ev in history:
        for _ in range(ev.steps):
            acc.step(noise_multiplier=ev.noise_multiplier, sample_rate=ev.sample_rate)
    with SiteLedger(tmp_path / "l.db") as reopened:  # recomputed from the file, not memory
        expected = acc.get_epsilon(delta=DELTA)
        if name == "prv":  # fedseal's "prv": Opacus' PRV at a relative eps_error
            expected = acc.get_epsilon(delta=DELTA, eps_error=PRV_RELATIVE_ERROR * expected)
        assert reopened.spent("digits", DELTA, name) == expected


def test_reserve_over_budget_refuses_with_message_and_writes_nothing(ledger: SiteLedger) -> None:
    one = epsilon_for([ROUND_EVENT], DELTA, "rdp")
    two = epsilon_for([ROUND_EVENT, ROUND_EVENT], DELTA, "rdp")
    budget = (one + two) / 2  # room for one round, not two
    ledger.reserve("digits", "r", 0, ROUND_EVENT, DELTA, "rdp", budget)
    with pytest.raises(
        PrivacyBudgetExceeded, match=r"^privacy budget exhausted: spent \S+ of \S+"
    ) as info:
        ledger.reserve("digits", "r", 1, ROUND_EVENT, DELTA, "rdp", budget)
    assert info.value.spent == pytest.approx(one)
    assert info.value.budget == budget
    assert info.value.would_be == pytest.approx(two)
    assert f"spent {one:.4g} of {budget:.4g}" in str(info.value)
    assert len(ledger.history("digits")) == 1
    # another dataset has its own budget
    ledger.reserve("other", "r", 1, ROUND_EVENT, DELTA, "rdp", budget)


def test_reserve_same_round_twice_counts_once(ledger: SiteLedger) -> None:
    first = ledger.reserve("digits", "r", 3, ROUND_EVENT, DELTA, "prv", 100.0)
    again = ledger.reserve("digits", "r", 3, ROUND_EVENT, DELTA, "prv", 100.0)
    assert first == again
    assert len(ledger.history()) == 1
    assert ledger.spent("digits", DELTA, "prv") == epsilon_for([ROUND_EVENT], DELTA, "prv")


def test_reserve_same_round_other_mechanism_raises(ledger: SiteLedger) -> None:
    ledger.reserve("digits", "r", 0, ROUND_EVENT, DELTA, "rdp", 100.0)
    with pytest.raises(RecordError, match="different mechanism"):
        ledger.reserve("digits", "r", 0, PrivacyEvent(2.0, 0.05, 40), DELTA, "rdp", 100.0)


def test_confirm_changes_state_not_spend(ledger: SiteLedger) -> None:
    entry = ledger.reserve("digits", "r", 0, ROUND_EVENT, DELTA, "rdp", 100.0)
    before = ledger.spent("digits", DELTA, "rdp")
    assert ledger.history()[0].state == "reserved" and ledger.history()[0].confirmed_at is None
    ledger.confirm(entry, steps_taken=ROUND_EVENT.steps)
    ledger.confirm(entry, steps_taken=ROUND_EVENT.steps)  # idempotent
    row = ledger.history()[0]
    assert row.state == "confirmed" and row.confirmed_at is not None
    assert ledger.spent("digits", DELTA, "rdp") == before
    with pytest.raises(RecordError):
        ledger.confirm(entry + 100, steps_taken=ROUND_EVENT.steps)


def test_summary_totals_per_dataset(ledger: SiteLedger) -> None:
    e0 = ledger.reserve("a", "r", 0, ROUND_EVENT, DELTA, "rdp", 100.0)
    ledger.reserve("a", "r", 1, ROUND_EVENT, DELTA, "rdp", 100.0)
    ledger.reserve("b", "r", 0, PrivacyEvent(2.0, 0.01, 10), 1e-6, "prv", 100.0)
    ledger.confirm(e0, steps_taken=ROUND_EVENT.steps)
    totals = {t.dataset_id: t for t in ledger.summary()}
    assert totals["a"].entries == 2 and totals["a"].reserved == 1 and totals["a"].confirmed == 1
    assert totals["a"].steps == 80 and totals["a"].accountant == "rdp"
    assert totals["a"].record_level_epsilon == ledger.spent("a", DELTA, "rdp")
    assert totals["b"].delta == 1e-6 and totals["b"].accountant == "prv"
    override = {t.dataset_id: t for t in ledger.summary(delta=1e-3, accountant="rdp")}
    assert override["b"].record_level_epsilon == ledger.spent("b", 1e-3, "rdp")


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("", "r", 0, ROUND_EVENT, DELTA, "rdp", 1.0), ConfigurationError),
        (("d", "r", -1, ROUND_EVENT, DELTA, "rdp", 1.0), ConfigurationError),
        (("d", "r", True, ROUND_EVENT, DELTA, "rdp", 1.0), ConfigurationError),
        (
            ("d", "r", 0, PrivacyEvent(1.0, 0.1, 1, PrivacyLevel.CLIENT), DELTA, "rdp", 1.0),
            ConfigurationError,
        ),
        (("d", "r", 0, ROUND_EVENT, 0.0, "rdp", 1.0), ConfigurationError),
        (("d", "r", 0, ROUND_EVENT, DELTA, "gdp", 1.0), ConfigurationError),
        (("d", "r", 0, ROUND_EVENT, DELTA, "rdp", 0.0), ConfigurationError),
    ],
)
def test_reserve_invalid_arguments_raise(ledger: SiteLedger, args: tuple, error: type) -> None:
    with pytest.raises(error):
        ledger.reserve(*args)
    assert ledger.history() == []


def test_ledger_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(RecordError):
        SiteLedger(tmp_path / "nope" / "ledger.db")


def _child(code: str) -> str:
    return textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from client.ledger import SiteLedger
        from common.dp.events import PrivacyEvent
        from common.errors import PrivacyBudgetExceeded
        """
    ) + textwrap.dedent(code)


def test_reserve_then_sigkill_before_confirm_still_counts(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    code = _child(
        f"""
        led = SiteLedger({str(db)!r})
        entry = led.reserve("digits", "run", 0, PrivacyEvent(1.1, 0.05, 40), 1e-5, "rdp", 100.0)
        print(entry, flush=True)
        time.sleep(600)  # "training": killed here, never confirms
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.strip().isdigit(), "child did not reserve"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with SiteLedger(db) as led:
        rows = led.history("digits")
        assert [r.state for r in rows] == ["reserved"]
        assert led.spent("digits", 1e-5, "rdp") == epsilon_for([ROUND_EVENT], 1e-5, "rdp")


def test_reserve_concurrent_processes_never_overspend(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    go = tmp_path / "go"
    one = epsilon_for([ROUND_EVENT], DELTA, "rdp")
    two = epsilon_for([ROUND_EVENT] * 2, DELTA, "rdp")
    budget = (one + two) / 2  # exactly one of the racers may reserve
    SiteLedger(db).close()
    procs = []
    for i in range(2):
        code = _child(
            f"""
            led = SiteLedger({str(db)!r})
            while not Path({str(go)!r}).exists():
                time.sleep(0.005)
            try:
                led.reserve("digits", "run", {i}, PrivacyEvent(1.1, 0.05, 40), 1e-5, "rdp", {budget!r})
                print("ok")
            except PrivacyBudgetExceeded:
                print("refused")
            """
        )
        procs.append(
            subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        )
    time.sleep(0.2)
    go.touch()
    outcomes = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outcomes == ["ok", "refused"]
    with SiteLedger(db) as led:
        assert len(led.history()) == 1
        assert led.spent("digits", DELTA, "rdp") <= budget


def test_reserve_zero_noise_round_is_refused(ledger: SiteLedger) -> None:
    # z = 0 has infinite epsilon: no finite budget admits it.
    with pytest.raises(PrivacyBudgetExceeded):
        ledger.reserve("digits", "r", 0, PrivacyEvent(0.0, 0.05, 1), DELTA, "rdp", 1e9)
    assert ledger.history() == []
