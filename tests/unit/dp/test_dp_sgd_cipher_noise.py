"""DP-SGD noise comes from the ChaCha20 stream, never from torch's generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.privacy import make_private
from common.errors import ConfigurationError
from common.rng import ChaCha20Random

ALPHA = 1e-6
N_EXAMPLES = 8
KEY = bytes(range(32))


def _private_linear(
    *,
    z: float,
    c: float,
    mode: str = "hooks",
    device: str = "cpu",
    noise_generator: object = None,
    features: int = 50,
) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, object]:
    torch.manual_seed(0)
    model = nn.Linear(features, 4).to(device)
    x = torch.randn(N_EXAMPLES, features, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(N_EXAMPLES, dtype=torch.long)
    loader = DataLoader(TensorDataset(x, y), batch_size=N_EXAMPLES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay put
    private, dp_opt, _, handle = make_private(
        model,
        optimizer,
        loader,
        noise_multiplier=z,
        max_grad_norm=c,
        poisson_sampling=False,  # a fixed batch: every step sees the same examples
        grad_sample_mode=mode,
        noise_generator=noise_generator,  # type: ignore[arg-type]
    )
    return private, dp_opt, x.to(device), handle


def _noise_of_one_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor
) -> np.ndarray:
    """The noise Opacus put into ``p.grad``: the loss has zero gradient, so grad = noise / batch."""
    optimizer.zero_grad()
    (model(x) * 0.0).sum().backward()
    optimizer.step()
    grads = [p.grad.detach().cpu().double().reshape(-1) for p in model.parameters()]
    return torch.cat(grads).numpy() * N_EXAMPLES  # loss_reduction "mean" divides by the batch


def test_dp_sgd_noise_std_is_noise_multiplier_times_clip_norm() -> None:
    z, c = 1.3, 0.7
    model, optimizer, x, handle = _private_linear(z=z, c=c, features=5000)
    assert handle.noise_source == "chacha20"
    noise = np.concatenate([_noise_of_one_step(model, optimizer, x) for _ in range(10)])
    n = noise.size
    std = z * c
    lo = stats.chi2.ppf(ALPHA / 2, n - 1) * std**2 / (n - 1)
    hi = stats.chi2.ppf(1 - ALPHA / 2, n - 1) * std**2 / (n - 1)
    assert lo <= float(np.var(noise, ddof=1)) <= hi
    assert abs(float(noise.mean())) <= stats.norm.ppf(1 - ALPHA / 2) * std / np.sqrt(n)
    assert stats.kstest(noise / std, "norm").pvalue > ALPHA


def test_dp_sgd_noise_is_exactly_the_keyed_stream() -> None:
    z, c = 1.1, 2.0
    model, optimizer, x, _ = _private_linear(z=z, c=c, noise_generator=ChaCha20Random(KEY))
    first, second = _noise_of_one_step(model, optimizer, x), _noise_of_one_step(model, optimizer, x)
    expected = ChaCha20Random(KEY).normal(0.0, z * c, size=2 * first.size)
    # float32 gradients: the float64 draw is cast once, then divided and multiplied by the batch.
    np.testing.assert_allclose(np.concatenate([first, second]), expected, rtol=1e-6, atol=1e-6)


def test_dp_sgd_step_never_calls_torch_normal(monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer, x, _ = _private_linear(z=1.0, c=1.0)

    def forbidden(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("DP-SGD noise drawn from torch's generator")

    monkeypatch.setattr(torch, "normal", forbidden)
    assert np.any(_noise_of_one_step(model, optimizer, x) != 0.0)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_same_torch_seed_twice_gives_different_dp_sgd_noise(mode: str) -> None:
    # Same model, data and torch state: the gradients differ only if the noise does.
    draws = []
    for _ in range(2):
        model, optimizer, x, handle = _private_linear(z=1.0, c=1.0, mode=mode)
        loss_fn = handle.criterion if handle.criterion is not None else nn.CrossEntropyLoss()
        torch.manual_seed(1234)  # torch's global generator in the same state both times
        optimizer.zero_grad()
        loss_fn(model(x), torch.zeros(N_EXAMPLES, dtype=torch.long)).backward()
        optimizer.step()
        draws.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
    assert not torch.equal(draws[0], draws[1])


def test_torch_generator_path_is_reproducible_and_labelled() -> None:
    runs = []
    for _ in range(2):
        model, optimizer, x, handle = _private_linear(
            z=1.0, c=1.0, noise_generator=torch.Generator().manual_seed(5)
        )
        assert handle.noise_source == "torch"
        runs.append(_noise_of_one_step(model, optimizer, x))
    np.testing.assert_array_equal(runs[0], runs[1])


def test_zero_noise_multiplier_draws_nothing_and_adds_nothing() -> None:
    model, optimizer, x, _ = _private_linear(z=0.0, c=1.0)
    np.testing.assert_array_equal(_noise_of_one_step(model, optimizer, x), 0.0)


def test_noise_generator_of_another_type_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        _private_linear(z=1.0, c=1.0, noise_generator=np.random.default_rng(0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dp_sgd_cipher_noise_on_cuda_has_calibrated_std() -> None:
    z, c = 1.3, 0.7
    model, optimizer, x, _ = _private_linear(z=z, c=c, device="cuda", features=500)
    assert all(p.device.type == "cuda" for p in model.parameters())
    noise = np.concatenate([_noise_of_one_step(model, optimizer, x) for _ in range(100)])
    n, std = noise.size, z * c
    lo = stats.chi2.ppf(ALPHA / 2, n - 1) * std**2 / (n - 1)
    hi = stats.chi2.ppf(1 - ALPHA / 2, n - 1) * std**2 / (n - 1)
    assert lo <= float(np.var(noise, ddof=1)) <= hi
