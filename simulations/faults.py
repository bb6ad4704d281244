"""Fault injection for simulations: a Flower ``Grid`` wrapper that silences chosen sites.

Sites that vanish mid-protocol are a property of the *network*, not of the
coordinator, so they are simulated where the network is: around the Grid the
ServerApp talks to. Nothing in ``server/`` or ``client/`` knows a fault was
injected; the server sees exactly what it would see if those sites had
crashed after receiving the stage's message (no reply), and sites receive no
fault settings at all.

A :class:`FaultPlan` names a fraction of each round's sampled sites and the
secure-aggregation stage at which they go silent. :class:`SilencingGrid`
picks, per round, ``round(rate * n)`` of the ``n`` sites addressed at that
stage (reproducibly from the plan's seed and the round) and discards their
replies to that stage's messages. Plain rounds (no secure aggregation) have
no stages and are never touched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import Message
from flwr.serverapp import Grid

from common.errors import ConfigurationError
from common.rng import seeded_generator
from common.secagg.stages import STAGE_LABELS, Stage
from server.aggregation.exchange import GridWrapper

DEFAULT_DROP_STAGE = Stage.COLLECT_MASKED.label


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """Which share of sampled sites goes silent, and at which stage.

    ``rate`` lies in [0, 1); ``stage`` is a stage label (``keys``, ``shares``,
    ``masked``, ``unmask``); ``seed`` makes the choice of sites reproducible.
    """

    rate: float = 0.0
    stage: str = DEFAULT_DROP_STAGE
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.rate, bool) or not (0.0 <= self.rate < 1.0):
            raise ConfigurationError(f"drop rate must lie in [0, 1), got {self.rate!r}")
        if self.stage not in STAGE_LABELS:
            raise ConfigurationError(
                f"drop stage must be one of {', '.join(STAGE_LABELS)}; got {self.stage!r}"
            )

    @property
    def active(self) -> bool:
        return self.rate > 0.0

    def silenced(self, addressed: Iterable[int], server_round: int) -> frozenset[int]:
        """The sites among ``addressed`` that go silent at this plan's stage in ``server_round``."""
        nodes = sorted(addressed)
        count = int(round(self.rate * len(nodes)))
        if count == 0:
            return frozenset()
        rng = seeded_generator(self.seed * 7_919 + server_round)
        picked = rng.choice(len(nodes), size=count, replace=False)  # indices: ids exceed int64
        return frozenset(nodes[int(i)] for i in picked)


class SilencingGrid(GridWrapper):
    """Wraps ``inner`` and drops the replies a :class:`FaultPlan` silences.

    Messages are still delivered (a silenced site does the stage's work, as a
    site that crashes before answering would); only the replies of the chosen
    sites never reach the ServerApp. ``silenced`` records, per round, who was
    silenced (for tests and reports; the server never reads it).
    """

    def __init__(self, inner: Grid, plan: FaultPlan) -> None:
        super().__init__(inner)
        self.plan = plan
        self.silenced: dict[int, frozenset[int]] = {}

    # -------------------------------------------------------------- delegation
    @property
    def pull_interval(self) -> float | None:
        """The wrapped grid's pull interval (Flower's in-memory grid has one), if any."""
        value = getattr(self.inner, "pull_interval", None)
        return float(value) if isinstance(value, int | float) else None

    @pull_interval.setter
    def pull_interval(self, value: float) -> None:
        if hasattr(self.inner, "pull_interval"):
            self.inner.pull_interval = value  # type: ignore[attr-defined]

    # ----------------------------------------------------------------- faults
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        replies = self.inner.send_and_receive(messages, timeout=timeout)
        if not self.plan.active:
            return replies
        quiet: set[int] = set()
        for server_round, nodes in self._addressed_at_stage(messages).items():
            chosen = self.plan.silenced(nodes, server_round)
            self.silenced[server_round] = self.silenced.get(server_round, frozenset()) | chosen
            quiet |= chosen
        return [r for r in replies if r.metadata.src_node_id not in quiet]

    def _addressed_at_stage(self, messages: list[Message]) -> dict[int, list[int]]:
        """Per round (the messages' group id), the nodes sent the plan's stage."""
        out: dict[int, list[int]] = {}
        for msg in messages:
            action = msg.metadata.message_type.partition(".")[2]
            stage = Stage.from_action(action)
            if stage is None or stage.label != self.plan.stage:
                continue
            try:
                server_round = int(msg.metadata.group_id)
            except ValueError:
                continue
            out.setdefault(server_round, []).append(msg.metadata.dst_node_id)
        return out
