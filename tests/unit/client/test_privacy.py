from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.privacy import dp_expected_batch_size, make_private, plan_site_dp, validate_model
from common.config import FULL_BATCH_DP_CAP
from common.dp.accounting import PRV_RELATIVE_ERROR, epsilon_for
from common.dp.events import PrivacyEvent
from common.errors import ConfigurationError, NotSupportedError

DELTA = 1e-5


def _mlp(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).to(dtype)


def _data(n: int = 32, dtype: torch.dtype = torch.float64) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(
        torch.randn(n, 8, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)
    )


def _one_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> None:
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def test_make_private_zero_noise_no_clipping_equals_vanilla_step() -> None:
    data = _data()
    x, y = data.tensors
    vanilla = _mlp()
    private = copy.deepcopy(vanilla)
    opt_v = torch.optim.SGD(vanilla.parameters(), lr=0.5)
    opt_p = torch.optim.SGD(private.parameters(), lr=0.5)
    # Fixed batch (no Poisson sampling): the whole dataset is one batch.
    loader = DataLoader(data, batch_size=len(data))
    model_p, dp_opt, _, handle = make_private(
        private, opt_p, loader, noise_multiplier=0.0, max_grad_norm=1e12, poisson_sampling=False
    )
    _one_step(vanilla, opt_v, x, y)
    _one_step(model_p, dp_opt, x, y)
    for pv, pp in zip(vanilla.parameters(), private.parameters(), strict=True):
        # Per-sample gradients summed vs one batched gradient: float64 rounding only.
        torch.testing.assert_close(pp, pv, rtol=1e-12, atol=1e-14)
    with pytest.raises(NotSupportedError):
        handle.event()


def test_make_private_with_noise_differs_from_vanilla_step() -> None:
    # Same comparison with noise on must fail: the check above has power.
    data = _data()
    x, y = data.tensors
    vanilla = _mlp()
    private = copy.deepcopy(vanilla)
    opt_v = torch.optim.SGD(vanilla.parameters(), lr=0.5)
    model_p, dp_opt, _, _ = make_private(
        private,
        torch.optim.SGD(private.parameters(), lr=0.5),
        DataLoader(data, batch_size=len(data)),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
        noise_generator=torch.Generator().manual_seed(0),
    )
    _one_step(vanilla, opt_v, x, y)
    _one_step(model_p, dp_opt, x, y)
    diffs = [
        float((a - b).abs().max())
        for a, b in zip(vanilla.parameters(), private.parameters(), strict=True)
    ]
    assert max(diffs) > 1e-3


def test_make_private_poisson_epoch_event_matches_opacus_accounting() -> None:
    torch.manual_seed(0)
    data = _data(n=60, dtype=torch.float32)
    model = _mlp(torch.float32)
    loader = DataLoader(data, batch_size=8)  # 8 batches -> sample_rate 1/8
    model_p, dp_opt, dp_loader, handle = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        loader,
        noise_multiplier=1.1,
        max_grad_norm=1.0,
        noise_generator=torch.Generator().manual_seed(0),
    )
    for _ in range(2):
        for xb, yb in dp_loader:  # empty Poisson batches still take a noised step
            _one_step(model_p, dp_opt, xb, yb)
    plan = plan_site_dp(100.0, DELTA, 60, 8, 2, 1, "prv", noise_multiplier=1.1)
    assert handle.event() == PrivacyEvent(1.1, 1 / 8, plan.steps_per_round)
    assert handle.sample_rate == plan.sample_rate
    opacus = handle._engine.accountant  # fedseal's "prv": Opacus' PRV at a relative eps_error
    first = opacus.get_epsilon(delta=DELTA)
    tight = opacus.get_epsilon(delta=DELTA, eps_error=PRV_RELATIVE_ERROR * first)
    assert handle.epsilon(DELTA, "prv") == tight


def test_make_private_ghost_mode_takes_counted_steps() -> None:
    data = _data(n=16, dtype=torch.float32)
    model = _mlp(torch.float32)
    model_p, dp_opt, dp_loader, handle = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        DataLoader(data, batch_size=4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode="ghost",
    )
    assert handle.criterion is not None
    before = [p.detach().clone() for p in model.parameters()]
    xb, yb = data.tensors
    dp_opt.zero_grad()
    handle.criterion(model_p(xb), yb).backward()
    dp_opt.step()
    assert handle.steps == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_validate_model_batchnorm_replaced_in_copy() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)
    )
    fixed = validate_model(model)
    assert fixed is not model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fixed.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in fixed.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # original untouched


def test_validate_model_valid_model_returned_unchanged() -> None:
    model = _mlp()
    assert validate_model(model) is model


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))
        self.register_buffer("running", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.running


def test_validate_model_unfixable_layer_raises_naming_it() -> None:
    model = nn.Sequential(nn.Linear(3, 3), _Scaled())
    with pytest.raises(ConfigurationError, match=r"1 \(_Scaled\)"):
        validate_model(model)


def test_make_private_unvalidated_model_raises() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(ConfigurationError, match="BatchNorm1d"):
        make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            DataLoader(_data(8), batch_size=4),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )


def test_make_private_secure_mode_without_csprng_not_supported() -> None:
    pytest.importorskip("torch")
    try:
        import torchcsprng  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchcsprng installed")
    model = _mlp()
    with pytest.raises(NotSupportedError):
        make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            DataLoader(_data(8), batch_size=4),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            secure_mode=True,
        )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"noise_multiplier": -1.0, "max_grad_norm": 1.0},
        {"noise_multiplier": 1.0, "max_grad_norm": 0.0},
        {"noise_multiplier": 1.0, "max_grad_norm": math.inf},
        {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "grad_sample_mode": "ew"},
    ],
)
def test_make_private_invalid_parameters_raise(kwargs: dict[str, object]) -> None:
    model = _mlp()
    with pytest.raises(ConfigurationError):
        make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            DataLoader(_data(8), batch_size=4),
            **kwargs,
        )  # type: ignore[arg-type]


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_plan_site_dp_calibrated_plan_meets_target(accountant: str) -> None:
    plan = plan_site_dp(3.0, DELTA, 180, 16, 2, 10, accountant)
    assert plan.sample_rate == 1 / 12
    assert plan.steps_per_round == 2 * 12
    assert 3.0 - 0.01 <= plan.planned_epsilon <= 3.0
    ten_rounds = [plan.round_event()] * 10
    assert epsilon_for(ten_rounds, DELTA, accountant) == pytest.approx(
        plan.planned_epsilon, rel=1e-9
    )


def test_plan_site_dp_steps_mirror_opacus_sampler_rounding() -> None:
    # int(1 / (1 / 93)) == 92 in floating point: Opacus runs 92 steps per epoch.
    plan = plan_site_dp(3.0, DELTA, 93, 1, 1, 1, "rdp", noise_multiplier=1.0)
    assert plan.steps_per_round == int(1 / (1 / 93))


def test_plan_site_dp_prior_history_needs_more_noise() -> None:
    fresh = plan_site_dp(3.0, DELTA, 180, 16, 1, 5, "rdp")
    prior = (PrivacyEvent(2.0, 1 / 12, 30),)
    later = plan_site_dp(3.0, DELTA, 180, 16, 1, 5, "rdp", prior_events=prior)
    assert later.noise_multiplier > fresh.noise_multiplier
    assert later.planned_epsilon <= 3.0


def test_plan_site_dp_invalid_sizes_raise() -> None:
    with pytest.raises(ConfigurationError):
        plan_site_dp(3.0, DELTA, 0, 16, 1, 5)
    with pytest.raises(ConfigurationError):
        plan_site_dp(3.0, DELTA, 100, 16, 1, True)  # type: ignore[arg-type]


@pytest.mark.gpu
def test_make_private_cuda_model_noise_on_device() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    device = torch.device("cuda")
    data = _data(n=32, dtype=torch.float32)
    model = _mlp(torch.float32).to(device)
    model_p, dp_opt, dp_loader, handle = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        DataLoader(data, batch_size=8),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    for xb, yb in dp_loader:
        _one_step(model_p, dp_opt, xb.to(device), yb.to(device))
    assert handle.steps == 4
    assert all(p.device.type == "cuda" for p in model.parameters())


@pytest.mark.parametrize("n", [1, 144, 4095, FULL_BATCH_DP_CAP])
def test_dp_expected_batch_size_default_is_full_batch_up_to_the_cap(n: int) -> None:
    b = dp_expected_batch_size(0, n)
    assert b == n
    assert plan_site_dp(3.0, DELTA, n, b, 1, 1, "rdp", noise_multiplier=1.0).sample_rate == 1.0


@pytest.mark.parametrize("n", [FULL_BATCH_DP_CAP + 1, 10_000, 1_136_000])
def test_dp_expected_batch_size_default_above_the_cap_samples_about_cap_per_step(n: int) -> None:
    b = dp_expected_batch_size(0, n)
    plan = plan_site_dp(3.0, DELTA, n, b, 1, 1, "rdp", noise_multiplier=1.0)
    assert b == FULL_BATCH_DP_CAP
    assert plan.sample_rate == 1 / math.ceil(n / FULL_BATCH_DP_CAP)
    assert plan.sample_rate * n <= FULL_BATCH_DP_CAP
    assert plan.steps_per_round == int(1 / plan.sample_rate)


def test_dp_expected_batch_size_explicit_value_kept_even_above_the_cap() -> None:
    assert dp_expected_batch_size(32, 100) == 32
    assert dp_expected_batch_size(8000, 100_000) == 8000
    assert dp_expected_batch_size(500, 100) == 100
    with pytest.raises(ConfigurationError):
        dp_expected_batch_size(-1, 100)


def _full_batch_private_step(max_physical: int | None) -> tuple[nn.Module, list[int], int]:
    data = _data(n=64)
    model = _mlp()
    model_p, dp_opt, dp_loader, handle = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.5),
        DataLoader(data, batch_size=len(data)),  # sample rate 1: every record, every step
        noise_multiplier=0.0,
        max_grad_norm=0.5,
        noise_generator=torch.Generator().manual_seed(0),
        max_physical_batch_size=max_physical,
    )
    sizes = []
    for xb, yb in dp_loader:
        sizes.append(len(yb))
        _one_step(model_p, dp_opt, xb, yb)
    return model, sizes, handle.steps


def test_make_private_physical_batches_take_the_same_single_step() -> None:
    whole, whole_sizes, whole_steps = _full_batch_private_step(None)
    split, split_sizes, split_steps = _full_batch_private_step(16)
    assert whole_sizes == [64] and split_sizes == [16, 16, 16, 16]
    assert whole_steps == split_steps == 1  # the accountant sees one step either way
    for a, b in zip(whole.parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    untouched = _mlp()
    assert any(
        not torch.equal(a, b)
        for a, b in zip(split.parameters(), untouched.parameters(), strict=True)
    )
