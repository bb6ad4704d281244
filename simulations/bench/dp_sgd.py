"""DP-SGD step-time benchmark: fedseal's fast clipping vs Opacus vs non-private, by model size.

For each model (an MLP on 64-feature vectors, a small CNN on 1x8x8
images), widened to reach each requested parameter count, the same initial
weights and the same fixed batch are trained for a number of steps
(forward, backward, optimizer step) without privacy and with each private
mode: Opacus per-sample gradients via hooks, Opacus ghost clipping (two
backward passes) and fedseal's fast path (:mod:`client.fastdp`: one backward
pass, ghost norms + book-keeping). Each private mode runs with its noise
from torch's generator (Opacus' own path, reproducible and not secret),
from fedseal's ChaCha20 stream (``common.rng``, the production path), and
with none (noise multiplier 0: no draw, not private; what the clipping
path alone costs).

The figure per variant is the median step time after warm-up. The variants
are interleaved over ``repeats`` repeats (each repeat runs every variant
once, starting one variant later than the previous repeat), and ratios (to
non-private, of ChaCha20 to torch noise, and of the fast path to ghost
clipping with the same noise) are taken within each repeat and reported as
the median and min-max over repeats. Hooks mode materialises ``batch x
params`` per-sample gradients; above ``hooks_max_params`` it is skipped
and the row says why. A second table times the noise draw alone (float32
tensors of a given size on the device). The data are synthetic (seeded),
so nothing is downloaded.

Run: ``fedseal-sim bench dp [--params 1e5,1e6,1e7] [--device cuda] [--repeats 3]``
or ``python -m simulations.bench.dp_sgd``.
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
MLP_FEATURES = 64


def _mlp(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(MLP_FEATURES, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, NUM_CLASSES),
    )


def _cnn(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, NUM_CLASSES),
    )


def _mlp_params(width: int) -> int:
    return (MLP_FEATURES + 1) * width + (width + 1) * width + (width + 1) * NUM_CLASSES


def _cnn_params(width: int) -> int:
    return 10 * width + (9 * width + 1) * 2 * width + (32 * width + 1) * 64 + 65 * NUM_CLASSES


MODELS: dict[str, tuple[Callable[[int], nn.Module], Callable[[int], int], tuple[int, ...]]] = {
    "mlp": (_mlp, _mlp_params, (MLP_FEATURES,)),
    "cnn": (_cnn, _cnn_params, (1, 8, 8)),
}
# The widths of the previous, fixed-size version of this benchmark (17k and 38k parameters).
DEFAULT_WIDTHS = {"mlp": 128, "cnn": 16}
MODES = ("non_private", "hooks", "ghost", "fast")
# "none": noise multiplier 0, no draw at all (the clipping path's own cost; not private).
NOISES = ("none", "torch", "chacha20")
NOISE_SIZES = (100_000, 1_000_000)
# Above this many parameters hooks mode (batch x params per-sample gradients) is skipped.
HOOKS_MAX_PARAMS = 2_000_000
# The CNN's compute grows with its width squared times the positions; beyond this it is skipped.
CNN_MAX_PARAMS = 2_000_000


def width_for(model: str, params: int) -> int:
    """The smallest width at which ``model`` has at least ``params`` parameters."""
    count = MODELS[model][1]
    width = 1
    while count(width) < params:
        width *= 2
    low, high = width // 2, width
    while low + 1 < high:
        mid = (low + high) // 2
        low, high = (mid, high) if count(mid) < params else (low, mid)
    return max(high, 1)


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


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def _time_steps(
    step: Callable[[], None],
    device: torch.device,
    warmup: int,
    steps: int,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median of ``steps`` timed calls after ``warmup`` untimed ones, on ``clock``."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        start = clock()
        step()
        _sync(device)
        times.append(clock() - start)
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
        seeded = noise in ("torch", "none")
        generator = torch.Generator(device=x.device).manual_seed(0) if seeded else None
        # A fixed batch (no Poisson sampling) so every variant sees the same data.
        model, optimizer, _, handle = make_private(
            model,
            optimizer,
            loader,
            noise_multiplier=0.0 if noise == "none" else 1.0,
            max_grad_norm=max_grad_norm,
            poisson_sampling=False,
            grad_sample_mode=mode,
            noise_generator=generator,
        )
        if handle.noise_source != ("torch" if noise == "none" else noise):
            raise RuntimeError(f"asked for {noise} noise, Opacus got {handle.noise_source}")
        if handle.grad_sample_mode != mode:
            raise RuntimeError(f"asked for mode {mode}, make_private ran {handle.grad_sample_mode}")
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
        "threads": torch.get_num_threads(),
        "step_ms": None,
        "ratio_vs_non_private": None,
        "ratio_vs_torch_noise": None,
        "ratio_vs_ghost": None,
        "error": None,
    }


def _ratio(a: list[float], b: list[float]) -> Spread | None:
    """Per-repeat ratios ``a / b`` as a Spread (None unless both ran every repeat)."""
    if not a or len(a) != len(b):
        return None
    return Spread.of([x / y for x, y in zip(a, b, strict=True)])


def _cells(
    requested: tuple[int, ...] | None, models: tuple[str, ...]
) -> list[tuple[str, int, int | None, str | None]]:
    """``(model, width, target, skip reason)`` per cell; widths reach each requested count."""
    cells: list[tuple[str, int, int | None, str | None]] = []
    for name in models:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        for target in requested or (None,):
            width = DEFAULT_WIDTHS[name] if target is None else width_for(name, target)
            skip = None
            if name == "cnn" and target is not None and target > CNN_MAX_PARAMS:
                skip = f"skipped: cnn above {CNN_MAX_PARAMS:.0e} params (seconds a step)"
            cells.append((name, width, target, skip))
    return cells


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
    params: tuple[int, ...] | None = None,
    hooks_max_params: int = HOOKS_MAX_PARAMS,
    clock: str = "wall",
) -> list[dict[str, Any]]:
    """Step time per model size, mode and noise source over interleaved repeats.

    ``params``: parameter counts to reach by widening each model (``None``:
    the fixed small widths of :data:`DEFAULT_WIDTHS`). Returns one dict per
    (model, size, mode, noise): ``model``, ``mode``, ``noise`` (``"-"`` for
    non-private), ``device``, ``batch_size``, ``params`` (the count reached),
    and :class:`~simulations.bench.secagg.Spread` figures (median, min, max
    over repeats) ``step_ms``, ``ratio_vs_non_private``, for ChaCha20 noise
    ``ratio_vs_torch_noise`` (same mode, torch noise, same repeat) and for
    the fast path ``ratio_vs_ghost`` (Opacus ghost clipping, same noise,
    same repeat); ``error`` says why a variant has no time (skipped, or
    failed to run). ``clock``: ``"wall"`` (elapsed time) or ``"cpu"`` (the
    process's CPU time, all threads: on a machine shared with other work
    it varies far less than elapsed time; on CUDA it misses the device's
    time, so use ``"wall"`` there).
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA device is available")
    rows: list[dict[str, Any]] = []
    for name, width, _, skip in _cells(params, models):
        build, count, shape = MODELS[name]
        variants = _variants(modes, noises)
        cells = {v: _row(name, count(width), v[0], v[1], dev, batch_size) for v in variants}
        if skip is not None:  # one row says so
            row = _row(name, count(width), "-", "-", dev, batch_size)
            row["error"] = skip
            rows.append(row)
            continue
        torch.manual_seed(0)
        base = build(width).to(dev)
        x, y = _batch(shape, batch_size, dev)
        built: dict[tuple[str, str], Callable[[], None]] = {}
        for v in variants:
            if v[0] == "hooks" and count(width) > hooks_max_params:
                gib = batch_size * count(width) * 4 / 2**30
                cells[v]["error"] = (
                    f"skipped: above {hooks_max_params:.0e} params (per-sample grads {gib:.1f} GiB)"
                )
                continue
            try:
                built[v] = _make_step(v[0], v[1], base, x, y, max_grad_norm)
            except Exception as exc:  # noqa: BLE001 - report, do not hide, a failing mode
                cells[v]["error"] = f"{type(exc).__name__}: {exc}"
        times: dict[tuple[str, str], list[float]] = {v: [] for v in built}
        order = list(built)
        for r in range(repeats):  # interleaved; each repeat starts one variant later
            for v in order[r % len(order) :] + order[: r % len(order)]:
                try:
                    times[v].append(_time_steps(built[v], dev, warmup, steps, CLOCKS[clock]))
                except Exception as exc:  # noqa: BLE001
                    cells[v]["error"] = f"{type(exc).__name__}: {exc}"
        del built
        ok = {v: ts for v, ts in times.items() if not cells[v]["error"] and ts}
        base_times = ok.get(("non_private", "-"), [])
        for v, ts in ok.items():
            cells[v]["step_ms"] = Spread.of([t * 1e3 for t in ts])
            cells[v]["ratio_vs_non_private"] = _ratio(ts, base_times)
            if v[1] == "chacha20":
                cells[v]["ratio_vs_torch_noise"] = _ratio(ts, ok.get((v[0], "torch"), []))
            if v[0] == "fast":
                cells[v]["ratio_vs_ghost"] = _ratio(ts, ok.get(("ghost", v[1]), []))
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
