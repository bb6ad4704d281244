"""The fedseal ClientApp: the site agent's side of every round.

``train``: load the global model, train locally on the site's own data and
reply with the model *update* (new - global) as a flat float32 vector, plus
metrics. ``evaluate``: score the global model on the site's local test split.
The run's settings arrive in each message's config record (written by the
server from its :class:`~common.config.RunConfig`).
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site import load_site_data
from client.training import make_loader, select_device, train_local
from common.config import RunConfig
from common.evaluation import evaluate
from common.records import (
    KEY_ARRAYS,
    KEY_CONFIG,
    KEY_METRICS,
    ModelSpec,
    record_to_config,
    record_to_vector,
    state_dict_to_vector,
    vector_to_record,
    vector_to_state_dict,
)
from common.task import task_for


def _global_model(msg: Message, cfg: RunConfig) -> tuple[torch.nn.Module, ModelSpec, Any]:
    task = task_for(cfg)
    model = task.build(seed=cfg.seed)
    spec = ModelSpec.of(model.state_dict())
    global_vec = record_to_vector(msg.content[KEY_ARRAYS], spec.size, what="global model")
    model.load_state_dict(vector_to_state_dict(global_vec, spec))
    return model, spec, global_vec


def handle_train(msg: Message, context: Context) -> Message:
    cfg, server_round, _ = record_to_config(msg.content[KEY_CONFIG])
    task = task_for(cfg)
    data = load_site_data(cfg, task, context.node_config)
    model, spec, global_vec = _global_model(msg, cfg)
    device = select_device(cfg.device)
    model.to(device)
    loader = make_loader(
        data.x_train,
        data.y_train,
        cfg.batch_size,
        shuffle=True,
        seed=cfg.seed * 100_003 + server_round,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=0.9)
    stats = train_local(model, loader, epochs=cfg.local_epochs, optimizer=optimizer, device=device)
    update = state_dict_to_vector(model.state_dict()) - global_vec
    metrics = MetricRecord(
        {
            "num-examples": len(data.y_train),
            "train-loss": stats.loss,
            "train-accuracy": stats.accuracy,
            "train-seconds": stats.seconds,
            "steps": stats.steps,
        }
    )
    content = RecordDict({KEY_ARRAYS: vector_to_record(update), KEY_METRICS: metrics})
    return Message(content=content, reply_to=msg)


def handle_evaluate(msg: Message, context: Context) -> Message:
    cfg, _, _ = record_to_config(msg.content[KEY_CONFIG])
    task = task_for(cfg)
    data = load_site_data(cfg, task, context.node_config)
    model, _, _ = _global_model(msg, cfg)
    device = select_device(cfg.device)
    loss, accuracy = evaluate(model.to(device), data.x_test, data.y_test, device)
    metrics = MetricRecord({"num-examples": len(data.y_test), "loss": loss, "accuracy": accuracy})
    return Message(content=RecordDict({KEY_METRICS: metrics}), reply_to=msg)


def make_client_app() -> ClientApp:
    """Build the fedseal ClientApp."""
    client_app = ClientApp()
    client_app.train()(handle_train)
    client_app.evaluate()(handle_evaluate)
    return client_app


app = make_client_app()
