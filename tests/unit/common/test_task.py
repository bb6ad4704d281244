"""The task a run's configuration implies, and the built-in shapes it knows without the data."""

from __future__ import annotations

import pytest

from common.config import RunConfig
from common.data import BUILTIN_DATASETS, load_builtin
from common.task import BUILTIN_SHAPES, task_for


@pytest.mark.parametrize("name", BUILTIN_DATASETS)
def test_builtin_shapes_agree_with_the_loaded_dataset(name: str) -> None:
    data = load_builtin(name)
    assert BUILTIN_SHAPES[name] == (data.num_features, data.num_classes, data.image_shape)


def test_every_builtin_dataset_has_a_shape() -> None:
    assert set(BUILTIN_SHAPES) == set(BUILTIN_DATASETS)


@pytest.mark.parametrize("name", BUILTIN_DATASETS)
def test_task_parameter_count_matches_the_built_model(name: str) -> None:
    task = task_for(RunConfig(dataset=name, dp=False))
    model = task.build(seed=0)
    assert task.parameter_count() == sum(p.numel() for p in model.parameters())
