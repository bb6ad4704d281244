"""Fast DP-SGD clipping: the same clipped sum as Opacus' hooks and an explicit per-example loop."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.fastdp import FastClippingModule, choose_grad_sample_mode, fast_unsupported_layers
from client.privacy import make_private
from common.errors import ConfigurationError
from common.models import build_model

F64 = torch.float64
CLIP = 0.5
# Opacus 1.6's per-sample rules ignore a convolution's padding_mode and an embedding's
# padding_idx, so there only the per-example loop is the reference.
OPACUS_INEXACT = {"conv2d_reflect_same"}


def _loop_reference(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Clipped sum and norms by one backward pass per example (the definition)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(len(y)):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        norms.append(norm)
        factor = (clip / (norm + 1e-6)).clamp(max=1.0)
        for t, g in zip(total, grads, strict=True):
            t.add_(factor * g)
    return total, torch.stack(norms)


def _private_sum(
    model: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor, clip: float
) -> tuple[list[torch.Tensor], nn.Module]:
    """The clipped sum the DP optimizer noised (noise 0): ``p.grad`` times the batch."""
    model = copy.deepcopy(model)
    loader = DataLoader(TensorDataset(x, y), batch_size=len(y))
    private, dp_opt, _, handle = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        loader,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        poisson_sampling=False,
        grad_sample_mode=mode,
        noise_generator=torch.Generator(device=x.device).manual_seed(0),
    )
    assert handle.grad_sample_mode == mode
    dp_opt.zero_grad()
    nn.functional.cross_entropy(private(x), y).backward()
    dp_opt.step()
    return [p.grad.detach() * len(y) for p in model.parameters()], private


def _seq_linear(t: int, d: int, h: int) -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Flatten(), nn.Linear(t * h, 3)), (t, d)


def _cases() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return {
        "linear": (nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), (6,)),
        "linear_no_bias": (nn.Sequential(nn.Linear(6, 4, bias=False), nn.Linear(4, 3)), (6,)),
        # T = 2, d 16 x 16: the Gram (ghost) norm; T = 10, d 4 x 3: per-example gradients.
        "sequence_ghost": _seq_linear(2, 16, 16),
        "sequence_per_sample": _seq_linear(10, 4, 3),
        "conv2d": (
            nn.Sequential(
                nn.Conv2d(2, 4, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(4, 3, 3, stride=2, dilation=1),
                nn.Flatten(),
                nn.Linear(3 * 2 * 2, 3),
            ),
            (2, 6, 6),
        ),
        "conv2d_reflect_same": (
            nn.Sequential(
                nn.Conv2d(1, 2, 3, padding="same", padding_mode="reflect"),
                nn.Flatten(),
                nn.Linear(2 * 5 * 5, 3),
            ),
            (1, 5, 5),
        ),
        "layernorm": (
            nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Flatten(), nn.Linear(3 * 6, 3)),
            (3, 4),
        ),
        "groupnorm": (
            nn.Sequential(
                nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)
            ),
            (1, 5, 5),
        ),
    }


def _inputs(shape: tuple[int, ...], n: int = 7, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, *shape, generator=g, dtype=F64) * 2
    y = torch.randint(0, 3, (n,), generator=g)
    return x.to(device), y.to(device)


@pytest.mark.parametrize("case", list(_cases()))
def test_fast_clipped_sum_equals_opacus_hooks_and_the_per_example_loop(case: str) -> None:
    model, shape = _cases()[case]
    model = model.to(F64)
    x, y = _inputs(shape)
    _, norms = _loop_reference(copy.deepcopy(model), x, y, CLIP)
    clip = float(norms.median())  # some examples clipped, some not
    reference, _ = _loop_reference(copy.deepcopy(model), x, y, clip)
    fast, private = _private_sum(model, "fast", x, y, clip)
    for f, r in zip(fast, reference, strict=True):
        torch.testing.assert_close(f, r, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(private.per_sample_norms, norms, rtol=1e-9, atol=1e-12)
    if case not in OPACUS_INEXACT:
        hooks, _ = _private_sum(model, "hooks", x, y, clip)
        for f, h in zip(fast, hooks, strict=True):
            torch.testing.assert_close(f, h, rtol=1e-9, atol=1e-12)


def test_fast_sequence_layers_choose_the_cheaper_norm_with_a_reason() -> None:
    methods = {}
    for case in ("sequence_ghost", "sequence_per_sample"):
        model, shape = _cases()[case]
        _, private = _private_sum(model.to(F64), "fast", *_inputs(shape), CLIP)
        methods[case] = private.layer_methods["0"]
    assert methods["sequence_ghost"].method == "ghost"
    assert methods["sequence_per_sample"].method == "per_sample"
    assert "T=10" in methods["sequence_per_sample"].reason


def test_fast_embedding_with_padding_and_repeated_tokens_equals_the_loop() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(9, 4, padding_idx=0), nn.Flatten(), nn.Linear(5 * 4, 3)).to(
        F64
    )
    x = torch.tensor([[1, 1, 2, 0, 0], [3, 4, 3, 3, 8], [0, 0, 0, 0, 0], [5, 6, 7, 8, 1]])
    y = torch.tensor([0, 1, 2, 1])
    _, norms = _loop_reference(copy.deepcopy(model), x, y, CLIP)
    clip = float(norms.median())
    reference, _ = _loop_reference(copy.deepcopy(model), x, y, clip)
    fast, private = _private_sum(model, "fast", x, y, clip)
    for f, r in zip(fast, reference, strict=True):
        torch.testing.assert_close(f, r, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(private.per_sample_norms, norms, rtol=1e-9, atol=1e-12)
    # Without a padding index Opacus' hooks agree (with one they give the padding row a
    # per-example gradient torch's backward does not have: see OPACUS_INEXACT).
    model.zero_grad()
    plain = nn.Sequential(nn.Embedding(9, 4), nn.Flatten(), nn.Linear(5 * 4, 3)).to(F64)
    plain.load_state_dict(model.state_dict())
    fast, _ = _private_sum(plain, "fast", x, y, clip)
    hooks, _ = _private_sum(plain, "hooks", x, y, clip)
    for f, h in zip(fast, hooks, strict=True):
        torch.testing.assert_close(f, h, rtol=1e-9, atol=1e-12)


def test_fast_layer_called_twice_adds_its_per_example_gradients() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared, self.head = nn.Linear(5, 5), nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))

    torch.manual_seed(0)
    model = Twice().to(F64)
    x, y = _inputs((5,))
    _, norms = _loop_reference(copy.deepcopy(model), x, y, CLIP)
    clip = float(norms.median())
    reference, _ = _loop_reference(copy.deepcopy(model), x, y, clip)
    fast, private = _private_sum(model, "fast", x, y, clip)
    for f, r in zip(fast, reference, strict=True):
        torch.testing.assert_close(f, r, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(private.per_sample_norms, norms, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "cnn", "linear"])
def test_fast_zoo_models_equal_opacus_hooks(name: str) -> None:
    shape = (1, 8, 8) if name == "cnn" else (12,)
    model = build_model(name, shape, 4, seed=1).to(F64)
    x, _ = _inputs(shape, n=6)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    assert choose_grad_sample_mode(model, "auto") == "fast"
    fast, _ = _private_sum(model, "fast", x, y, 0.05)
    hooks, _ = _private_sum(model, "hooks", x, y, 0.05)
    for f, h in zip(fast, hooks, strict=True):
        torch.testing.assert_close(f, h, rtol=1e-8, atol=1e-12)


def test_fast_outlier_example_moves_the_clipped_sum_by_at_most_the_bound() -> None:
    # Adversarial record: a huge input (so a huge gradient) must add at most C to the sum.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(F64)
    x, y = _inputs((6,), n=8)
    with_outlier = x.clone()
    with_outlier[3] *= 1e6
    clipped_a, _ = _private_sum(model, "fast", with_outlier, y, CLIP)
    keep = torch.arange(8) != 3
    clipped_b, _ = _private_sum(model, "fast", x[keep], y[keep], CLIP)
    moved = torch.sqrt(
        sum((a - b).square().sum() for a, b in zip(clipped_a, clipped_b, strict=True))
    )
    assert float(moved) <= CLIP * (1 + 1e-6)
    # With clipping effectively off the same record moves the sum by orders of magnitude more.
    unclipped_a, _ = _private_sum(model, "fast", with_outlier, y, 1e30)
    unclipped_b, _ = _private_sum(model, "fast", x[keep], y[keep], 1e30)
    moved_off = torch.sqrt(
        sum((a - b).square().sum() for a, b in zip(unclipped_a, unclipped_b, strict=True))
    )
    assert float(moved_off) > 1e3 * CLIP


def test_fast_noise_std_is_z_c_over_the_expected_batch() -> None:
    z, c, n, batch = 1.3, 0.7, 40, 8
    torch.manual_seed(0)
    model = nn.Linear(2000, 4)
    data = TensorDataset(torch.randn(n, 2000), torch.zeros(n, dtype=torch.long))
    private, dp_opt, _, handle = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        DataLoader(data, batch_size=batch),  # q = 1/5, expected batch int(40 / 5) = 8
        noise_multiplier=z,
        max_grad_norm=c,
        poisson_sampling=False,
    )
    assert handle.grad_sample_mode == "fast" and handle.noise_source == "chacha20"
    x = data.tensors[0][:3]  # any physical batch: the normaliser is the expected batch
    draws = []
    for _ in range(5):
        dp_opt.zero_grad()
        (private(x) * 0.0).sum().backward()  # zero gradient: p.grad is noise / 8 only
        dp_opt.step()
        draws.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    noise = torch.cat(draws).double().numpy()
    std = z * c / batch
    m = noise.size
    lo = stats.chi2.ppf(1e-6 / 2, m - 1) * std**2 / (m - 1)
    hi = stats.chi2.ppf(1 - 1e-6 / 2, m - 1) * std**2 / (m - 1)
    assert lo <= float(np.var(noise, ddof=1)) <= hi
    assert handle.steps == 5


def _poisson_epoch(mode: str) -> tuple[object, list[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(60, 4, generator=g), torch.randint(0, 2, (60,), generator=g))
    private, dp_opt, loader, handle = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        DataLoader(data, batch_size=20),  # q = 1/3: 3 noised steps per epoch
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        max_physical_batch_size=4,
        grad_sample_mode=mode,
    )
    assert handle.grad_sample_mode == mode
    before = [p.detach().clone() for p in model.parameters()]
    for xb, yb in loader:  # empty physical batches included
        dp_opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(private(xb), yb).backward()
        dp_opt.step()
    return handle, before, list(model.parameters())


def test_fast_poisson_epoch_with_physical_batches_reports_the_hooks_event() -> None:
    handle, before, after = _poisson_epoch("fast")
    hooks_handle, _, _ = _poisson_epoch("hooks")
    assert handle.steps == 3  # type: ignore[attr-defined]
    assert handle.event() == hooks_handle.event()  # type: ignore[attr-defined]
    assert handle.event().sample_rate == pytest.approx(1 / 3)  # type: ignore[attr-defined]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_fast_second_backward_before_zero_grad_under_poisson_is_refused() -> None:
    model = nn.Linear(3, 2)
    fast = FastClippingModule(model, max_grad_norm=1.0, forbid_accumulation=True)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    nn.functional.cross_entropy(fast(x), y).backward()
    with pytest.raises(ConfigurationError, match="accumulation"):
        nn.functional.cross_entropy(fast(x), y).backward()
    for p in model.parameters():  # zeroing in place in between is a fresh pass
        assert p.grad is not None
        p.grad.zero_()
    nn.functional.cross_entropy(fast(x), y).backward()


def test_fast_no_grad_forward_and_remove_give_the_plain_model() -> None:
    torch.manual_seed(0)
    model = build_model("cnn", (1, 8, 8), 3)
    x = torch.randn(5, 1, 8, 8)
    expected = model(x).detach()
    fast = FastClippingModule(model, max_grad_norm=1.0)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), expected)
    torch.testing.assert_close(fast(x).detach(), expected, rtol=1e-5, atol=1e-6)
    copied = copy.deepcopy(fast)  # its own taps: gradients land in the copy only
    nn.functional.cross_entropy(copied(x), torch.zeros(5, dtype=torch.long)).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in copied.parameters())
    plain = fast.remove()
    assert plain is model and "forward" not in vars(model.head)
    torch.testing.assert_close(model(x).detach(), expected)


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten()), "Conv1d"),
        (nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten()), "grouped"),
        (nn.Sequential(nn.Embedding(5, 3, max_norm=1.0)), "max_norm"),
    ],
)
def test_fast_unsupported_layer_falls_back_to_hooks_with_the_reason_logged(
    model: nn.Module, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert any(reason in line for line in fast_unsupported_layers(model))
    with caplog.at_level(logging.WARNING, logger="client.fastdp"):
        assert choose_grad_sample_mode(model, "fast") == "hooks"
    assert reason in caplog.text and "hooks" in caplog.text
    with pytest.raises(ConfigurationError, match=reason):
        FastClippingModule(model, max_grad_norm=1.0)


def test_fast_shared_parameter_falls_back() -> None:
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    problems = fast_unsupported_layers(nn.Sequential(a, b))
    assert any("shared" in p for p in problems)


def test_make_private_fast_unsupported_model_runs_opacus_hooks() -> None:
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4, 2))
    data = TensorDataset(torch.randn(8, 1, 6), torch.zeros(8, dtype=torch.long))
    _, _, _, handle = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        DataLoader(data, batch_size=4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode="fast",
    )
    assert handle.grad_sample_mode == "hooks"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["linear", "conv2d", "groupnorm", "sequence_ghost"])
def test_fast_clipped_sum_on_cuda_equals_the_loop(case: str) -> None:
    model, shape = _cases()[case]
    model = model.to(F64).cuda()
    x, y = _inputs(shape, device="cuda")
    reference, _ = _loop_reference(copy.deepcopy(model), x, y, CLIP)
    fast, _ = _private_sum(model, "fast", x, y, CLIP)
    for f, r in zip(fast, reference, strict=True):
        assert f.device.type == "cuda"
        torch.testing.assert_close(f, r, rtol=1e-9, atol=1e-12)
