"""Scoring the global model after a round: centrally on a held-out split, or at the sites.

Central evaluation uses the server's own split of an embedded dataset
(scaled on itself, never on site data). Without one (site data only the
sites hold), the sites score the model on their local test splits and the
server averages their figures weighted by their counts.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import MessageType
from flwr.serverapp import Grid

from common.config import RunConfig
from common.data import load_builtin, scaler_for, split_holdout_stratified
from common.evaluation import evaluate as evaluate_model
from common.records import (
    KEY_ARRAYS,
    KEY_COHORT_SIZE,
    KEY_METRICS,
    ModelSpec,
    vector_to_record,
    vector_to_state_dict,
)
from common.task import TaskSpec
from server.aggregation.exchange import Exchange
from server.aggregation.replies import is_finite_number


class HeldOut:
    """The server's own evaluation split of an embedded dataset (scaled on itself)."""

    def __init__(self, cfg: RunConfig, task: TaskSpec) -> None:
        _, holdout = split_holdout_stratified(
            load_builtin(cfg.dataset), cfg.test_fraction, cfg.seed
        )
        scaler = scaler_for(holdout, private=cfg.dp)
        self.x = task.shape_examples(scaler.transform(holdout.x))
        self.y = holdout.y


class Evaluator:
    """Evaluates a global-model vector: ``(loss, accuracy, how)``, ``how`` in central/federated/none."""

    def __init__(
        self, cfg: RunConfig, task: TaskSpec, model: torch.nn.Module, spec: ModelSpec
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.spec = spec
        self.heldout = (
            HeldOut(cfg, task) if cfg.dataset != "custom" and cfg.workload == "train" else None
        )

    def evaluate(
        self, server_round: int, global_vector: np.ndarray, grid: Grid, exchange: Exchange
    ) -> tuple[float | None, float | None, str]:
        if self.cfg.workload == "echo":
            return None, None, "none"
        if self.heldout is not None:
            self.model.load_state_dict(vector_to_state_dict(global_vector, self.spec))
            loss, accuracy = evaluate_model(
                self.model, self.heldout.x, self.heldout.y, torch.device("cpu")
            )
            return loss, accuracy, "central"
        nodes = list(grid.get_node_ids())
        content = exchange.instruction(server_round, **{KEY_COHORT_SIZE: len(nodes)})
        content[KEY_ARRAYS] = vector_to_record(global_vector)
        replies = exchange.send({n: (content, MessageType.EVALUATE) for n in nodes}, server_round)
        total, loss_sum, acc_sum = 0, 0.0, 0.0
        for reply in replies.values():
            if reply.has_error() or KEY_METRICS not in reply.content.metric_records:
                continue
            m = reply.content.metric_records[KEY_METRICS]
            n, loss, acc = m.get("num-examples"), m.get("loss"), m.get("accuracy")
            if not (
                isinstance(n, int) and n > 0 and is_finite_number(loss) and is_finite_number(acc)
            ):
                continue
            total += n
            loss_sum += n * float(loss)  # type: ignore[arg-type]
            acc_sum += n * float(acc)  # type: ignore[arg-type]
        if total == 0:
            return None, None, "federated"
        return loss_sum / total, acc_sum / total, "federated"
