"""A scaled-down 1,000-site run: 200 synthetic sites, DP-SGD and secure aggregation, end to end.

Runs ``fedseal-sim run`` through the scale benchmark (:mod:`simulations.bench.scale`),
so the memory sampler is exercised on a real Ray run too. Slow (minutes on 2 cores).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.ledger import SiteLedger
from client.state import LEDGER_FILE
from server.record import SqlRecord
from server.record.keys import load_public_key
from simulations.bench.scale import run_scale

pytestmark = pytest.mark.slow

SITES, ROUNDS, FRACTION = 200, 2, 0.1


def test_200_synthetic_sites_with_dp_and_secagg_complete_with_ledgers_audit_and_report(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    args = ["--dataset", "synthetic", "--clients", str(SITES), "--fraction", str(FRACTION)]
    args += ["--rounds", str(ROUNDS), "--dp", "--secagg", "--json"]
    result = run_scale(args, out, timeout_s=1200)
    assert result.exit_code == 0, (out / "run.log").read_text()[-3000:]
    assert result.rounds_completed == ROUNDS
    cohort = round(SITES * FRACTION)
    assert result.participants_per_round == [cohort] * ROUNDS
    assert result.max_record_level_epsilon is not None
    # the sampler saw the whole tree: the driver and Ray's processes, not just one
    assert result.peak_processes >= 4 and result.peak_rss_mib > 100
    assert json.loads((out / "scale.json").read_text())["wall_s"] == result.wall_s

    doc = json.loads((out / "result.json").read_text())
    ledgers = sorted(out.glob(f"sites/site-*/{LEDGER_FILE}"))
    # every site that trained keeps its own ledger, charging only its own dataset
    assert 0 < len(ledgers) <= cohort * ROUNDS
    spent_sites = 0
    for path in ledgers:
        with SiteLedger(path) as ledger:
            history = ledger.history()
        own = {e.dataset_id for e in history}
        assert own == {f"synthetic-site{path.parent.name.removeprefix('site-')}"}
        spent_sites += any(e.run_id == doc["run_id"] for e in history)
    assert spent_sites == len(ledgers)
    with SqlRecord(f"sqlite:///{out / 'record.db'}", create=False) as record:
        assert record.verify(load_public_key(out / "keys" / "audit.pub")).ok
    assert (out / "report" / "report.html").is_file()
