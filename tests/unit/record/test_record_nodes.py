"""Many nodes recorded in one transaction: the same rows and audit events as one call each."""

from __future__ import annotations

import pytest

from common.errors import DataError
from server.record.store import SqlRecord


def test_record_nodes_writes_one_row_and_one_chained_event_per_node_in_order(
    record: SqlRecord,
) -> None:
    run = record.create_run({"rounds": 1})
    nodes = [5, 2**64 - 1, 9, 1]
    entries = record.record_nodes(run, nodes, True, "connected")
    assert [e.node_id for e in entries] == nodes
    assert [(n.node_id, n.admitted, n.reason) for n in record.nodes(run)] == [
        (n, True, "connected") for n in nodes
    ]
    events = [e for e in record.events(run) if e.kind == "node_admitted"]
    assert [e.payload()["node_id"] for e in events] == [str(n) for n in nodes]
    every = record.events()
    for prev, ev in zip(every, every[1:], strict=False):
        assert ev.prev_hash == prev.hash and ev.seq == prev.seq + 1


def test_record_nodes_is_all_or_nothing(record: SqlRecord) -> None:
    run = record.create_run({"rounds": 1})
    before = len(record.events())
    with pytest.raises(DataError):
        record.record_nodes(run, [3, -1], True, "connected")  # a bad id: nothing is written
    assert record.nodes(run) == [] and len(record.events()) == before
