"""``fedseal-sim bench deploy``: its figures, its table, the generated Flower app, and one real run."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simulations.bench.cli import bench_app, breakdown_table, deploy_table
from simulations.bench.deploy import (
    DeployReport,
    RunSample,
    exchange_breakdown,
    exchange_phases,
    messages_per_round,
    round_periods,
    steady_median,
    write_flower_app,
)

SECURE_ROUND = ("train.secagg_masked", "train.secagg_consistency", "train.secagg_unmask")


def _sample(variant: str, repeat: int, periods: tuple[float, ...], per_round: int = 1) -> RunSample:
    messages = {r: ("train",) * per_round for r in range(1, len(periods) + 1)}
    return RunSample(variant, repeat, periods, messages)


def test_round_periods_are_differences_of_consecutive_ends() -> None:
    assert round_periods([10.0, 13.0, 19.0, 24.5]) == [3.0, 6.0, 5.5]
    assert round_periods([1.0]) == []


def test_steady_median_skips_the_first_round() -> None:
    assert steady_median([90.0, 5.0, 7.0, 6.0]) == 6.0
    assert steady_median([90.0]) is None


def test_messages_per_round_groups_a_supernode_log_by_round() -> None:
    log = "\n".join(
        [
            "INFO :      [RUN 7, ROUND 1]",
            "INFO :      Receiving: query.identity message (ID: a)",
            "INFO :      Received successfully",
            "INFO :      [RUN 7, ROUND 1]",
            "INFO :      Sending: query.identity message (ID: b)",
            "INFO :      [RUN 7, ROUND 2]",
            *(f"INFO :      Receiving: {t} message (ID: c)" for t in SECURE_ROUND),
            "INFO :      Receiving: query.audit_head message (ID: e)",
            "INFO :      [RUN 7]",
            "INFO :      Receiving: train message (ID: d)",
        ]
    )
    found = messages_per_round(log)
    assert found == {
        0: ["train"],
        1: ["query.identity"],
        2: [*SECURE_ROUND, "query.audit_head"],
    }
    sample = RunSample("secure", 1, (9.0, 5.0), {r: tuple(v) for r, v in found.items()})
    assert sample.exchanges == 3  # the run's final audit head is not a round's exchange


def test_exchanges_of_a_run_without_round_ids_are_counted_over_its_rounds() -> None:
    sample = RunSample("flower", 1, (9.0, 6.0, 6.0), {0: ("train",) * 3})
    assert sample.exchanges == 1


def test_report_ratios_are_taken_within_each_repeat() -> None:
    report = DeployReport(
        4,
        (
            _sample("flower", 1, (20.0, 6.0, 6.0, 6.0)),
            _sample("plain", 1, (40.0, 9.0, 9.0, 9.0)),
            _sample("secure", 1, (90.0, 18.0, 18.0, 18.0), per_round=3),
            _sample("flower", 2, (20.0, 3.0, 3.0, 3.0)),
            _sample("plain", 2, (40.0, 6.0, 6.0, 6.0)),
            _sample("secure", 2, (90.0, 12.0, 12.0, 12.0), per_round=3),
        ),
    )
    plain = report.over_flower("plain")
    assert plain is not None and (plain.low, plain.high) == (1.5, 2.0)
    assert report.exchanges("secure") == 3.0 and report.exchanges("plain") == 1.0
    assert report.limit("plain") == 1.5
    assert report.limit("secure") == pytest.approx(3.6)
    assert report.met("secure") is True  # ratios 3 and 4: median 3.5 <= 3.6
    rows = {row["variant"]: row for row in report.rows()}
    assert rows["flower"]["over_flower"] is None and rows["flower"]["met"] is None
    assert rows["plain"]["met"] is False  # median ratio 1.75 > 1.5
    doc = json.loads(json.dumps(report.to_json()))  # JSON all the way down
    assert [v["variant"] for v in doc["variants"]] == ["flower", "plain", "secure"]
    assert doc["variants"][1]["over_flower"] == {"median": 1.75, "min": 1.5, "max": 2.0}
    assert len(doc["samples"]) == 6


def test_deploy_table_has_one_row_per_variant() -> None:
    report = DeployReport(
        3, (_sample("flower", 1, (9.0, 6.0, 6.0)), _sample("plain", 1, (9.0, 7.0, 8.0)))
    )
    table = deploy_table(report.rows(), 3, 1, "load 1.0 on 2 CPUs")
    assert table.row_count == 2
    assert "load 1.0" in str(table.title)


STAMPED_LOG = """\
100.000 INFO :      [RUN 7, ROUND 2]
100.000 INFO :      Receiving: train.secagg_masked message (ID: a)
100.250 INFO :      Received successfully
101.750 INFO :      Start `flwr-clientapp` process
104.750 INFO :      [RUN 7, ROUND 2]
104.750 INFO :      Sending: train.secagg_masked message (ID: b)
105.000 INFO :      Sent successfully
108.000 INFO :      Receiving: train.secagg_consistency message (ID: c)
108.500 INFO :      Received successfully
no stamp on this line
"""


def test_exchange_phases_from_a_time_stamped_supernode_log() -> None:
    (masked, m), (consistency, c) = exchange_phases(STAMPED_LOG)
    assert masked == "train.secagg_masked" and consistency == "train.secagg_consistency"
    assert m == {"pull": 0.25, "start": 1.5, "app": 3.0, "push": 0.25}
    assert c == {"wait": 3.0, "pull": 0.5}  # no process start, no reply yet


def test_exchange_breakdown_takes_medians_over_sites() -> None:
    other = STAMPED_LOG.replace("104.750", "102.750")
    found = exchange_breakdown([STAMPED_LOG, other])
    app = found["train.secagg_masked"]["app"]
    assert (app.low, app.median, app.high) == (1.0, 2.0, 3.0)
    report = DeployReport(
        2,
        (RunSample("secure", 1, (9.0, 5.0), {}, found),),
    )
    assert report.breakdown("secure")["train.secagg_masked"]["app"].median == 2.0
    assert breakdown_table(report).row_count == 2
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["breakdown_s"]["secure"]["train.secagg_masked"]["app"]["median"] == 2.0


def test_write_flower_app_is_a_numpy_only_flower_app(tmp_path: Path) -> None:
    timing = tmp_path / 'odd "name".txt'
    app = write_flower_app(tmp_path / "app", rounds=3, vector_size=10, timing_file=timing)
    import tomllib

    doc = tomllib.loads((app / "pyproject.toml").read_text())
    assert doc["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "benchapp.server_app:app",
        "clientapp": "benchapp.client_app:app",
    }
    assert doc["tool"]["flwr"]["app"]["config"]["timing-file"] == str(timing)
    assert doc["tool"]["flwr"]["app"]["config"]["num-server-rounds"] == 3
    client = ast.parse((app / "benchapp" / "client_app.py").read_text())
    imported = {
        (n.module or "").split(".")[0] if isinstance(n, ast.ImportFrom) else a.name.split(".")[0]
        for n in ast.walk(client)
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in n.names
    }
    assert imported == {"numpy", "flwr"}
    server = (app / "benchapp" / "server_app.py").read_text()
    assert "from flwr.serverapp.strategy import FedAvg" in server
    compile(server, "server_app.py", "exec")


def test_write_flower_app_client_handler_adds_to_the_model(tmp_path: Path) -> None:
    import numpy as np
    from flwr.app import ArrayRecord, Context, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    app = write_flower_app(tmp_path / "app", rounds=2, vector_size=4, timing_file=tmp_path / "t")
    sys.path.insert(0, str(app))
    try:
        from benchapp import client_app  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(app))
        sys.modules.pop("benchapp", None)
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    try:  # the message as the ServerApp process makes it
        msg = Message(
            RecordDict({"arrays": ArrayRecord([np.zeros(4, dtype=np.float32)])}),
            dst_node_id=1,
            message_type="train",
        )
        msg.metadata.__dict__["_message_id"] = "m1"
        ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
        reply = client_app.train(msg, ctx)
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
    (vector,) = [a.numpy() for a in reply.content["arrays"].values()]
    assert np.allclose(vector, 1e-3)
    sys.modules.pop("benchapp.client_app", None)


def test_deploy_unknown_variant_is_refused() -> None:
    result = CliRunner().invoke(bench_app, ["deploy", "--variants", "plain,fast", "--json"])
    assert result.exit_code != 0


@pytest.mark.slow  # about 8 minutes on a loaded 2-core box: three Deployment-Engine runs
def test_deploy_bench_one_repeat_three_rounds_reports_every_variant() -> None:
    result = CliRunner().invoke(bench_app, ["deploy", "--repeats", "1", "--rounds", "3", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    rows = {v["variant"]: v for v in doc["variants"]}
    assert set(rows) == {"flower", "plain", "secure"}
    assert all(r["round_s"]["median"] > 0 for r in rows.values())
    assert rows["flower"]["exchanges"] == 1 and rows["plain"]["exchanges"] == 1
    assert rows["secure"]["exchanges"] >= 3  # masked, consistency, unmask after the setup


def test_a_warm_task_starting_before_the_pull_is_logged_takes_no_start_time() -> None:
    """A forked task (client.warm_exec) may log its start before the SuperNode logs the pull."""
    warm = STAMPED_LOG.replace("101.750", "100.200")
    (_, m), _ = exchange_phases(warm)
    assert m["start"] == 0.0
    assert m["pull"] == 0.25
