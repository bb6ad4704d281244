import pytest
import torch
from opacus.validators import ModuleValidator

from common.errors import ConfigurationError
from common.models import build_model


@pytest.mark.parametrize("name,shape", [("mlp", (30,)), ("cnn", (1, 8, 8))])
def test_build_model_forward_shape_and_opacus_compatible(name, shape):
    model = build_model(name, shape, 3, seed=0)
    assert model(torch.zeros(5, *shape)).shape == (5, 3)
    assert ModuleValidator.validate(model, strict=False) == []


def test_build_model_same_seed_same_weights():
    a, b = build_model("mlp", (8,), 2, seed=5), build_model("mlp", (8,), 2, seed=5)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize(
    "args",
    [("resnet", (8,), 2), ("mlp", (8,), 1), ("cnn", (8,), 2), ("mlp", (), 2), ("mlp", (0,), 2)],
)
def test_build_model_bad_arguments_rejected(args):
    with pytest.raises(ConfigurationError):
        build_model(*args)
