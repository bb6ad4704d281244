"""The learning task of a run: which model, what one example looks like, how many classes.

Server and sites derive the same :class:`TaskSpec` from the same
:class:`~common.config.RunConfig`, so the server can build the initial model
before it has seen any site data.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from common.config import RunConfig
from common.data import SYNTHETIC_CLASSES, SYNTHETIC_FEATURES, Dataset, load_builtin
from common.errors import ConfigurationError

if TYPE_CHECKING:  # torch is imported when a model is built, not with the task
    from torch import nn

# The built-in datasets' shapes (features, classes, image shape), so that a task is known
# without loading scikit-learn and the data: every site message derives the task, and in the
# Deployment Engine each one is a fresh process. tests/unit/common/test_task.py holds this
# table to what load_builtin returns.
BUILTIN_SHAPES: dict[str, tuple[int, int, tuple[int, int, int] | None]] = {
    "digits": (64, 10, (1, 8, 8)),
    "breast_cancer": (30, 2, None),
    "synthetic": (SYNTHETIC_FEATURES, SYNTHETIC_CLASSES, None),
}


@dataclass(frozen=True, slots=True)
class TaskSpec:
    model_name: str
    input_shape: tuple[int, ...]
    num_classes: int
    num_features: int

    def build(self, seed: int) -> nn.Module:
        from common.models import build_model

        return build_model(self.model_name, self.input_shape, self.num_classes, seed=seed)

    def parameter_count(self) -> int:
        """The model's number of parameters, without allocating or initialising them."""
        return _parameter_count(self.model_name, self.input_shape, self.num_classes)

    def shape_examples(self, x: np.ndarray) -> np.ndarray:
        """Reshape flat ``(n, features)`` rows into the model's input shape."""
        if x.shape[1:] != (self.num_features,):
            raise ConfigurationError(
                f"this run's model expects {self.num_features} features per example, "
                f"the data has {x.shape[1:]}"
            )
        return x.reshape((len(x), *self.input_shape))


@functools.lru_cache(maxsize=32)
def _parameter_count(name: str, input_shape: tuple[int, ...], num_classes: int) -> int:
    import torch

    from common.models import build_model

    with torch.device("meta"):  # shapes only: no memory, no random initialisation
        model = build_model(name, input_shape, num_classes, seed=0)
    return sum(p.numel() for p in model.parameters())


def task_for(cfg: RunConfig) -> TaskSpec:
    """The task implied by ``cfg`` (for built-in datasets: from the dataset's metadata)."""
    image_shape: tuple[int, int, int] | None
    if cfg.dataset == "custom":
        num_features, num_classes, image_shape = cfg.num_features, cfg.num_classes, None
    elif cfg.dataset in BUILTIN_SHAPES:
        num_features, num_classes, image_shape = BUILTIN_SHAPES[cfg.dataset]
    else:
        data: Dataset = load_builtin(cfg.dataset)
        num_features, num_classes, image_shape = (
            data.num_features,
            data.num_classes,
            data.image_shape,
        )
    # auto: under record-level DP the noise grows with the parameter count, and on
    # small sites a linear model learns most (simulations/bench/RESULTS-dp.md).
    name = ("linear" if cfg.dp else "mlp") if cfg.model == "auto" else cfg.model
    if name == "vector":
        return TaskSpec(name, (num_features,), num_classes, num_features)
    if name == "cnn":
        if image_shape is None:
            raise ConfigurationError(
                f"model 'cnn' needs image data; dataset {cfg.dataset!r} is tabular"
            )
        input_shape: tuple[int, ...] = image_shape
    else:
        input_shape = (num_features,)
    return TaskSpec(name, input_shape, num_classes, num_features)
