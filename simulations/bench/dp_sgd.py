"""DP-SGD step-time benchmark: Opacus private steps vs non-private, one run.

For each model (an MLP on 64-feature digits-like vectors, a small CNN on
1x8x8 images), the same initial weights and the same fixed batch are trained
for a number of steps (forward, backward, optimizer step) without privacy,
with Opacus per-sample gradients via hooks, and with ghost clipping. The
figure per variant is the median step time after warm-up; the ratio is
against the non-private median measured in the same run on the same device.
The data are synthetic (seeded), so nothing is downloaded.

Run: ``python -m simulations.bench.dp_sgd [--device cuda] [--batch-size 64]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from client.privacy import make_private, validate_model

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
    mode: str, base: nn.Module, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float
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
        # A fixed batch (no Poisson sampling) so every variant sees the same data.
        model, optimizer, _, handle = make_private(
            model,
            optimizer,
            loader,
            noise_multiplier=1.0,
            max_grad_norm=max_grad_norm,
            poisson_sampling=False,
            grad_sample_mode=mode,
        )
        if handle.criterion is not None:
            loss_fn = handle.criterion

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()

    return step


def bench_dp_sgd(
    device: str = "cpu",
    *,
    batch_size: int = 64,
    steps: int = 30,
    warmup: int = 5,
    max_grad_norm: float = 1.0,
    models: tuple[str, ...] = ("mlp", "cnn"),
    modes: tuple[str, ...] = MODES,
) -> list[dict[str, Any]]:
    """Median step time per model and mode, with the ratio to non-private.

    Returns one dict per (model, mode): ``model``, ``mode``, ``device``,
    ``batch_size``, ``params``, ``step_ms``, ``ratio_vs_non_private`` and
    ``error`` (a mode Opacus cannot run reports its error instead of a time).
    """
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
        baseline: float | None = None
        for mode in ("non_private", *[m for m in modes if m != "non_private"]):
            row: dict[str, Any] = {
                "model": name,
                "mode": mode,
                "device": dev.type,
                "batch_size": batch_size,
                "params": params,
                "step_ms": None,
                "ratio_vs_non_private": None,
                "error": None,
            }
            try:
                median_s = _time_steps(
                    _make_step(mode, base, x, y, max_grad_norm), dev, warmup, steps
                )
            except Exception as exc:  # noqa: BLE001 - report, do not hide, a failing mode
                row["error"] = f"{type(exc).__name__}: {exc}"
            else:
                row["step_ms"] = median_s * 1e3
                if mode == "non_private":
                    baseline = median_s
                if baseline:
                    row["ratio_vs_non_private"] = median_s / baseline
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: print the benchmark as a rich table (or JSON)."""
    import json

    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    # Opacus' ghost clipping warns on every step that the inputs need no grad.
    warnings.filterwarnings("ignore", category=UserWarning, module="opacus")
    warnings.filterwarnings("ignore", message="Full backward hook", category=UserWarning)
    rows = bench_dp_sgd(
        args.device, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup
    )
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"DP-SGD step time vs non-private ({args.device}, batch {args.batch_size})")
    for column in ("model", "params", "mode", "step ms", "x non-private", "note"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["model"],
            str(r["params"]),
            r["mode"],
            "-" if r["step_ms"] is None else f"{r['step_ms']:.3f}",
            "-" if r["ratio_vs_non_private"] is None else f"{r['ratio_vs_non_private']:.2f}",
            r["error"] or "",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
