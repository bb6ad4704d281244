"""The site agent's work in one round: decide whether to take part, then train and clip.

Order of operations on the site (DESIGN.md): train (Opacus DP-SGD when record-level
DP is on) -> update = new - global -> clip the update's L2 norm to C (when
central DP or secure aggregation is on) -> [secure aggregation masks it].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message

from client.site import SiteData, load_site_data
from client.state import WITNESS_FILE, site_dir
from client.training import make_loader, select_device, train_local
from client.witness import witness_head
from common.config import RunConfig
from common.records import (
    KEY_AUDIT_HEAD,
    KEY_CONFIG,
    ModelSpec,
    record_to_config,
    record_to_vector,
    state_dict_to_vector,
    vector_to_state_dict,
)
from common.task import TaskSpec, task_for

ECHO_UPDATE_VALUE = 1e-3


@dataclass(frozen=True, slots=True)
class LocalUpdate:
    """What a site sends for one round (before any masking)."""

    update: np.ndarray
    num_examples: int
    metrics: dict[str, float | int] = field(default_factory=dict)


@dataclass(slots=True)
class SiteContext:
    """Everything the agent needs about the site running this ClientApp."""

    cfg: RunConfig
    server_round: int
    task: TaskSpec
    context: Context
    directory: Path

    @classmethod
    def of(cls, msg: Message, context: Context, site_root: Path | None) -> SiteContext:
        """Parse an instruction; keep the server's signed audit head it carries."""
        cfg, server_round, extra = record_to_config(msg.content[KEY_CONFIG])
        directory = site_dir(context.node_config, context.node_id, site_root)
        if KEY_AUDIT_HEAD in extra:
            witness_head(directory / WITNESS_FILE, extra[KEY_AUDIT_HEAD])
        return cls(cfg, server_round, task_for(cfg), context, directory)

    def data(self) -> SiteData:
        return load_site_data(self.cfg, self.task, self.context.node_config)


def load_global(site: SiteContext, arrays: object) -> tuple[torch.nn.Module, ModelSpec, np.ndarray]:
    """Build the run's model and load the received global weights (validated)."""
    model = site.task.build(seed=site.cfg.seed)
    spec = ModelSpec.of(model.state_dict())
    global_vec = record_to_vector(arrays, spec.size, what="global model")
    model.load_state_dict(vector_to_state_dict(global_vec, spec))
    return model, spec, global_vec


def compute_update(site: SiteContext, arrays: object) -> LocalUpdate:
    """Train locally from the global model in ``arrays``; return the (clipped) update."""
    cfg = site.cfg
    model, spec, global_vec = load_global(site, arrays)
    if cfg.workload == "echo":
        return LocalUpdate(
            np.full(spec.size, ECHO_UPDATE_VALUE, dtype=np.float32), 1, {"train-seconds": 0.0}
        )
    data = site.data()
    device = select_device(cfg.device)
    model.to(device)
    loader = make_loader(
        data.x_train,
        data.y_train,
        cfg.batch_size,
        shuffle=True,
        seed=cfg.seed * 100_003 + site.server_round,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=0.9)
    stats = train_local(model, loader, epochs=cfg.local_epochs, optimizer=optimizer, device=device)
    update = state_dict_to_vector(model.state_dict()) - global_vec
    metrics: dict[str, Any] = {
        "train-loss": stats.loss,
        "train-accuracy": stats.accuracy,
        "train-seconds": stats.seconds,
        "steps": stats.steps,
    }
    return LocalUpdate(update, len(data.y_train), metrics)
