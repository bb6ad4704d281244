"""The model zoo: small, Opacus-compatible networks selected by name.

Every model here uses only layers Opacus can compute per-sample gradients
for (Linear, Conv2d, GroupNorm, activations, pooling): no BatchNorm, whose
statistics mix examples and therefore break record-level DP.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from common.errors import ConfigurationError


class MLP(nn.Module):
    """Two hidden layers with ReLU; for tabular data of shape ``(features,)``."""

    def __init__(self, num_features: int, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(num_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


class SmallCNN(nn.Module):
    """Two conv blocks (GroupNorm, not BatchNorm) and a linear head; for ``(C, H, W)`` images."""

    def __init__(self, channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, kernel_size=3, padding=1),
            nn.GroupNorm(4, width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1),
            nn.GroupNorm(4, 2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(2 * width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))  # type: ignore[no-any-return]


class ParameterVector(nn.Module):
    """A bare parameter vector: the model of protocol benchmarks (no forward computation)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ConfigurationError("the 'vector' model is for protocol benchmarks and cannot predict")


def _build_vector(shape: Sequence[int], num_classes: int) -> nn.Module:
    size = 1
    for s in shape:
        size *= int(s)
    return ParameterVector(size)


def _build_linear(shape: Sequence[int], num_classes: int) -> nn.Module:
    """Multinomial logistic regression: the fewest parameters, so the least DP noise."""
    features = 1
    for s in shape:
        features *= int(s)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, num_classes))


def _build_mlp(shape: Sequence[int], num_classes: int) -> nn.Module:
    features = 1
    for s in shape:
        features *= int(s)
    return MLP(features, num_classes)


def _build_cnn(shape: Sequence[int], num_classes: int) -> nn.Module:
    if len(shape) != 3:
        raise ConfigurationError(
            f"model 'cnn' needs image-shaped examples (C, H, W); this data has shape {tuple(shape)}"
        )
    return SmallCNN(int(shape[0]), num_classes)


_ZOO: dict[str, Callable[[Sequence[int], int], nn.Module]] = {
    "mlp": _build_mlp,
    "linear": _build_linear,
    "cnn": _build_cnn,
    "vector": _build_vector,
}


def model_names() -> tuple[str, ...]:
    """Names accepted by :func:`build_model`."""
    return tuple(_ZOO)


def build_model(
    name: str, input_shape: Sequence[int], num_classes: int, *, seed: int = 0
) -> nn.Module:
    """Build the named model with deterministic initial weights.

    Parameters
    ----------
    name : {"mlp", "cnn"}
    input_shape : shape of one example, without the batch dimension
    num_classes : number of output classes (>= 2)
    seed : initial weights depend only on this seed, so server and sites agree

    Raises
    ------
    ConfigurationError
        Unknown name, bad shape or fewer than two classes.
    """
    if name not in _ZOO:
        raise ConfigurationError(f"unknown model {name!r}; choose one of {', '.join(_ZOO)}")
    if num_classes < 2:
        raise ConfigurationError(f"num_classes must be >= 2, got {num_classes}")
    if not input_shape or any(int(s) < 1 for s in input_shape):
        raise ConfigurationError(
            f"input_shape must be non-empty and positive, got {tuple(input_shape)}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _ZOO[name](input_shape, num_classes)
