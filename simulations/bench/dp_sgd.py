"""DP-SGD step-time benchmark: Opacus private steps vs non-private, and the noise source.

For each model (an MLP on 64-feature digits-like vectors, a small CNN on
1x8x8 images), the same initial weights and the same fixed batch are trained
for a number of steps (forward, backward, optimizer step) without privacy,
with Opacus per-sample gradients via hooks, and with ghost clipping; each
private mode runs with its noise from torch's generator (Opacus' own path)
and from fedseal's ChaCha20 stream (``common.rng``, the production path).
The figure per variant is the median step time after warm-up; the variants
are interleaved over ``repeats`` repeats, and ratios (to non-private, and of
ChaCha20 to torch noise) are taken within each repeat and reported as the
median and min-max over repeats. A second table times the noise draw alone
(float32 tensors of a given size on the device). The data are synthetic
(seeded), so nothing is downloaded.

Run: ``fedseal-sim bench dp [--device cuda] [--repeats 3]`` or
``python -m simulations.bench.dp_sgd``.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from client.dp_noise import gaussian_like
from client.privacy import make_private, validate_model
from common.rng import secure_generator
from simulations.bench.secagg import Spread

NUM_CLASSES = 10


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES)
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, NUM_CLASSES),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (_mlp, (64,)),
    "cnn": (_cnn, (1, 8, 8)),
}
MODES = ("non_private", "hooks", "ghost")
NOISES = ("torch", "chacha20")
NOISE_SIZES = (100_000, 1_000_000)


def _batch(
    shape: tuple[int, ...], batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand((batch_size, *shape), generator=g)  # digits pixels scaled to [0, 1]
    y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
    return x.to(device), y.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _make_step(
    mode: str,
    noise: str,
    base: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    max_grad_norm: float,
) -> Callable[[], None]:
    model = copy.deepcopy(base)
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn: nn.Module = nn.CrossEntropyLoss()
    if mode != "non_private":
        model = validate_model(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x.cpu(), y.cpu()), batch_size=len(y)
        )
        generator = torch.Generator(device=x.device).manual_seed(0) if noise == "torch" else None
        # A fixed batch (no Poisson sampling) so every variant sees the same data.
        model, optimizer, _, handle = make_private(
            model,
            optimizer,
            loader,
            noise_multiplier=1.0,
            max_grad_norm=max_grad_norm,
            poisson_sampling=False,
            grad_sample_mode=mode,
            noise_generator=generator,
        )
        if handle.noise_source != noise:
            raise RuntimeError(f"asked for {noise} noise, Opacus got {handle.noise_source}")
        if handle.criterion is not None:
            loss_fn = handle.criterion

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()

    return step


def _variants(modes: tuple[str, ...], noises: tuple[str, ...]) -> list[tuple[str, str]]:
    private = [(m, n) for m in modes if m != "non_private" for n in noises]
    return [("non_private", "-"), *private]


def _row(
    name: str, params: int, mode: str, noise: str, dev: torch.device, batch: int
) -> dict[str, Any]:
    return {
        "model": name,
        "mode": mode,
        "noise": noise,
        "device": dev.type,
        "batch_size": batch,
        "params": params,
        "step_ms": None,
        "ratio_vs_non_private": None,
        "ratio_vs_torch_noise": None,
        "error": None,
    }


def bench_dp_sgd(
    device: str = "cpu",
    *,
    batch_size: int = 64,
    steps: int = 30,
    warmup: int = 5,
    repeats: int = 3,
    max_grad_norm: float = 1.0,
    models: tuple[str, ...] = ("mlp", "cnn"),
    modes: tuple[str, ...] = MODES,
    noises: tuple[str, ...] = NOISES,
) -> list[dict[str, Any]]:
    """Step time per model, mode and noise source over interleaved repeats.

    Returns one dict per (model, mode, noise): ``model``, ``mode``, ``noise``
    (``"-"`` for non-private), ``device``, ``batch_size``, ``params``, and
    :class:`~simulations.bench.secagg.Spread` figures (median, min, max over
    repeats) ``step_ms``, ``ratio_vs_non_private`` and, for ChaCha20 noise,
    ``ratio_vs_torch_noise`` (the same mode with torch noise, same repeat);
    ``error`` names a variant Opacus cannot run instead of a time.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA device is available")
    rows: list[dict[str, Any]] = []
    for name in models:
        build, shape = MODELS[name]
        torch.manual_seed(0)
        base = build().to(dev)
        x, y = _batch(shape, batch_size, dev)
        params = sum(p.numel() for p in base.parameters())
        variants = _variants(modes, noises)
        cells = {v: _row(name, params, v[0], v[1], dev, batch_size) for v in variants}
        built: dict[tuple[str, str], Callable[[], None]] = {}
        for v in variants:
            try:
                built[v] = _make_step(v[0], v[1], base, x, y, max_grad_norm)
            except Exception as exc:  # noqa: BLE001 - report, do not hide, a failing mode
                cells[v]["error"] = f"{type(exc).__name__}: {exc}"
        times: dict[tuple[str, str], list[float]] = {v: [] for v in built}
        for _ in range(repeats):  # interleaved: each repeat runs every variant once
            for v, step in built.items():
                try:
                    times[v].append(_time_steps(step, dev, warmup, steps))
                except Exception as exc:  # noqa: BLE001
                    cells[v]["error"] = f"{type(exc).__name__}: {exc}"
        base_times = times.get(("non_private", "-"), [])
        for v, ts in times.items():
            if cells[v]["error"] or not ts:
                continue
            cells[v]["step_ms"] = Spread.of([t * 1e3 for t in ts])
            if len(base_times) == len(ts):
                cells[v]["ratio_vs_non_private"] = Spread.of(
                    [t / b for t, b in zip(ts, base_times, strict=True)]
                )
            torch_times = times.get((v[0], "torch"), [])
            if (
                v[1] == "chacha20"
                and len(torch_times) == len(ts)
                and not cells[(v[0], "torch")]["error"]
            ):
                cells[v]["ratio_vs_torch_noise"] = Spread.of(
                    [t / b for t, b in zip(ts, torch_times, strict=True)]
                )
        rows.extend(cells[v] for v in variants)
    return rows


def bench_noise_draw(
    device: str = "cpu",
    *,
    sizes: tuple[int, ...] = NOISE_SIZES,
    draws: int = 20,
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """Time to draw one float32 noise tensor of each size on ``device``, per source.

    ``torch``: ``torch.normal`` from a torch generator on the device (what
    Opacus does); ``chacha20``: :func:`client.dp_noise.gaussian_like` from a
    fresh :func:`common.rng.secure_generator` (float64 on the CPU, cast, moved).
    Returns one dict per (size, noise) with ``draw_ms`` and, for ChaCha20,
    ``ratio_vs_torch_noise`` as Spreads over interleaved repeats.
    """
    dev = torch.device(device)
    rows: list[dict[str, Any]] = []
    for size in sizes:
        reference = torch.zeros(size, device=dev)
        generator = torch.Generator(device=dev).manual_seed(0)
        source = secure_generator()

        def torch_draw(n: int = size, g: torch.Generator = generator) -> None:
            torch.normal(0.0, 1.0, size=(n,), generator=g, device=dev)

        def chacha20_draw(ref: torch.Tensor = reference, rng: Any = source) -> None:
            gaussian_like(rng, 1.0, [ref])

        fns: dict[str, Callable[[], None]] = {"torch": torch_draw, "chacha20": chacha20_draw}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(repeats):
            for key, fn in fns.items():
                times[key].append(_time_steps(fn, dev, 5, draws))
        for key in fns:
            rows.append(
                {
                    "size": size,
                    "noise": key,
                    "device": dev.type,
                    "draw_ms": Spread.of([t * 1e3 for t in times[key]]),
                    "ratio_vs_torch_noise": None
                    if key == "torch"
                    else Spread.of(
                        [c / t for c, t in zip(times[key], times["torch"], strict=True)]
                    ),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: the same as ``fedseal-sim bench dp`` (one table renderer)."""
    import sys

    from simulations.bench.cli import bench_app

    bench_app(["dp", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
