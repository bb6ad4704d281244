"""The simulations' fault grid: which sites it silences, and that nothing else changes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from common.errors import ConfigurationError
from simulations.faults import FaultPlan, SilencingGrid


def test_fault_plan_silences_round_rate_times_n_reproducibly() -> None:
    plan = FaultPlan(0.3, "masked", seed=4)
    nodes = list(range(100, 110))
    chosen = plan.silenced(nodes, 3)
    assert len(chosen) == 3 and chosen <= set(nodes)
    assert plan.silenced(reversed(nodes), 3) == chosen  # order of addressing does not matter
    assert plan.silenced(nodes, 4) == FaultPlan(0.3, "masked", seed=4).silenced(nodes, 4)


def test_fault_plan_zero_rate_silences_nobody() -> None:
    assert FaultPlan(0.0, "keys").silenced(range(10), 1) == frozenset()


@pytest.mark.parametrize(("rate", "stage"), [(1.0, "masked"), (-0.1, "masked"), (0.2, "train")])
def test_fault_plan_bad_values_are_configuration_errors(rate: float, stage: str) -> None:
    with pytest.raises(ConfigurationError):
        FaultPlan(rate, stage)


def test_no_fault_injection_in_server_or_client_code() -> None:
    """Faults are the simulated network's business: the product code never names them."""
    root = Path(__file__).resolve().parents[3]
    words = re.compile(r"drop_rate|drop_stage|droppers|injected|FaultPlan|SilencingGrid")
    offenders = [
        str(path.relative_to(root))
        for package in ("server", "client")
        for path in (root / package).rglob("*.py")
        if words.search(path.read_text())
    ]
    assert offenders == []


def test_silencing_grid_drops_only_the_planned_stage_replies() -> None:
    from fake_grid import FakeGrid, server_identity
    from flwr.app import Message, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: object) -> Message:
        return Message(RecordDict(), reply_to=msg)

    @app.train("secagg_masked")
    def masked(msg: Message, context: object) -> Message:
        return Message(RecordDict(), reply_to=msg)

    with server_identity():
        grid = SilencingGrid(FakeGrid(app, 4), FaultPlan(0.5, "masked"))
        nodes = sorted(grid.get_node_ids())

        def send(message_type: str) -> set[int]:
            msgs = [Message(RecordDict(), n, message_type, group_id="1") for n in nodes]
            return {r.metadata.src_node_id for r in grid.send_and_receive(msgs)}

        assert send("train") == set(nodes)  # a plain round has no stage: untouched
        answered = send("train.secagg_masked")
    assert len(answered) == 2 and answered | grid.silenced[1] == set(nodes)
