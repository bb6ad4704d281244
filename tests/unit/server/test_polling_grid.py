"""PollingGrid: Flower's send_and_receive loop over a deployed Grid, pulling more often."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import pytest

from server.aggregation.exchange import PollingGrid


class _Reply:
    def __init__(self, reply_to: str) -> None:
        self.metadata = type("Metadata", (), {"reply_to_message_id": reply_to})()


class _SlowGrid:
    """Pushes get ids; each pushed message's reply appears at its own pull count."""

    def __init__(self, ready_at: dict[str, int]) -> None:
        self.ready_at = ready_at
        self.pulls = 0
        self.pushed: list[Any] = []

    def push_messages(self, messages: Iterable[Any]) -> list[str]:
        self.pushed = list(messages)
        return list(self.ready_at)

    def pull_messages(self, message_ids: Iterable[str]) -> list[_Reply]:
        self.pulls += 1
        return [_Reply(m) for m in message_ids if self.ready_at[m] == self.pulls]

    def get_node_ids(self) -> list[int]:
        return [1, 2]


def test_polling_grid_collects_every_reply_and_stops_pulling() -> None:
    inner = _SlowGrid({"a": 1, "b": 3})
    grid = PollingGrid(inner, interval_s=0.01)  # type: ignore[arg-type]
    start = time.monotonic()
    replies = list(grid.send_and_receive(["m1", "m2"], timeout=5.0))  # type: ignore[list-item]
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert inner.pulls == 3 and inner.pushed == ["m1", "m2"]
    assert time.monotonic() - start < 1.0  # not Flower's 3 s per pull


def test_polling_grid_gives_up_at_the_timeout_with_what_arrived() -> None:
    inner = _SlowGrid({"a": 1, "never": 10_000})
    grid = PollingGrid(inner, interval_s=0.02)  # type: ignore[arg-type]
    replies = list(grid.send_and_receive(["m1", "m2"], timeout=0.2))  # type: ignore[list-item]
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert 2 <= inner.pulls <= 20


def test_polling_grid_delegates_and_refuses_a_bad_interval() -> None:
    assert list(PollingGrid(_SlowGrid({}), 0.1).get_node_ids()) == [1, 2]  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PollingGrid(_SlowGrid({}), 0.0)  # type: ignore[arg-type]
