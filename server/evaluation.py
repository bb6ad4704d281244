"""Scoring the global model after a round: centrally on a held-out split, or at the sites.

Central evaluation uses the server's own split of an embedded dataset
(scaled on itself, never on site data): the metric of record. Without one
(site data only the sites hold), the sites score the model on their local
test splits, computed on private records outside any accountant: under DP
(either level) the server does not ask and the sites would refuse
(:mod:`client.disclosure`), so the round reports no accuracy ("withheld");
otherwise the server averages their figures, weighted by their counts when
every site states one (not under secure aggregation, where the counts stay
at the sites). Either way a run without a held-out set says so
(:func:`server.results.evaluation_note`).
"""

from __future__ import annotations

import logging

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
from server.results import evaluation_note

log = logging.getLogger("flwr.fedseal.server")


class HeldOut:
    """The server's own evaluation split of an embedded dataset (scaled on itself)."""

    def __init__(self, cfg: RunConfig, task: TaskSpec) -> None:
        _, holdout = split_holdout_stratified(
            load_builtin(cfg.dataset, synthetic_rows=cfg.synthetic_rows),
            cfg.test_fraction,
            cfg.seed,
        )
        scaler = scaler_for(holdout, private=cfg.dp)
        self.x = task.shape_examples(scaler.transform(holdout.x))
        self.y = holdout.y


class Evaluator:
    """Evaluates a global-model vector: ``(loss, accuracy, how)``.

    ``how`` is ``central``, ``federated``, ``withheld`` (no held-out split
    under DP) or ``none`` (no training workload).
    """

    def __init__(
        self, cfg: RunConfig, task: TaskSpec, model: torch.nn.Module, spec: ModelSpec
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.spec = spec
        self.heldout = (
            HeldOut(cfg, task) if cfg.dataset != "custom" and cfg.workload == "train" else None
        )
        if (note := evaluation_note(cfg)) is not None:
            log.warning("%s", note)

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
        if self.cfg.dp or self.cfg.central_dp:
            return None, None, "withheld"
        nodes = list(grid.get_node_ids())
        content = exchange.instruction(server_round, **{KEY_COHORT_SIZE: len(nodes)})
        content[KEY_ARRAYS] = vector_to_record(global_vector)
        replies = exchange.send({n: (content, MessageType.EVALUATE) for n in nodes}, server_round)
        scores: list[tuple[int | None, float, float]] = []
        for reply in replies.values():
            if reply.has_error() or KEY_METRICS not in reply.content.metric_records:
                continue
            m = reply.content.metric_records[KEY_METRICS]
            n, site_loss, site_acc = m.get("num-examples"), m.get("loss"), m.get("accuracy")
            if not (is_finite_number(site_loss) and is_finite_number(site_acc)):
                continue
            count = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None
            scores.append((count, float(site_loss), float(site_acc)))  # type: ignore[arg-type]
        if not scores:
            return None, None, "federated"
        # Weighted by the sites' test counts when every site states one; equally otherwise.
        stated = [c for c, _, _ in scores if c is not None]
        weights = stated if len(stated) == len(scores) else [1] * len(scores)
        total = float(sum(weights))
        mean_loss = sum(w * lo for w, (_, lo, _) in zip(weights, scores, strict=True)) / total
        mean_acc = sum(w * a for w, (_, _, a) in zip(weights, scores, strict=True)) / total
        return mean_loss, mean_acc, "federated"
