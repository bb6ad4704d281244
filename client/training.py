"""Plain PyTorch local training and evaluation (no Flower in here)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from common.data import Examples
from common.rng import secure_bytes


def select_device(preference: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is an error."""
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda":
        if not torch.cuda.is_available():
            from common.errors import ConfigurationError

            raise ConfigurationError("device 'cuda' requested but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ExampleDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A torch view of :class:`~common.data.Examples` that builds whole batches at once.

    The loader hands ``__getitems__`` a batch's indices (its sampler's, or
    Opacus' Poisson sampler's, possibly empty) and gets back one
    ``(inputs, labels)`` pair of tensors, scaled to float32 from the compact
    rows only now; :func:`pass_batch` is the matching collate function.
    """

    def __init__(self, examples: Examples) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.examples.take(np.array([i]))
        return torch.from_numpy(x[0]), torch.from_numpy(y)[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.examples.take(np.asarray(indices, dtype=np.int64))
        return torch.from_numpy(x), torch.from_numpy(y)


def pass_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate for :class:`ExampleDataset`: the batch is built already."""
    return batch


class ShuffledBatches(Sampler[list[int]]):
    """Batches of a fresh random permutation on every pass, without a Python list of all indices.

    Draws from ``generator`` exactly what ``DataLoader(shuffle=True)``'s
    ``RandomSampler`` draws (one permutation per pass, plus the one it draws
    and discards at the end of a pass), so the batches are the same as
    with the stock sampler; but only one batch of indices is ever a list
    (the stock sampler holds a list of every index: ~40 MB per million).
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.generator = n, batch_size, generator

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=self.generator)
        for start in range(0, self.n, self.batch_size):
            yield order[start : start + self.batch_size].tolist()
        torch.randperm(self.n, generator=self.generator)  # RandomSampler's end-of-pass draw


def make_loader(
    examples: Examples, batch_size: int, *, shuffle: bool, seed: int | None
) -> DataLoader[tuple[torch.Tensor, ...]]:
    """A loader over ``examples``, a batch at a time; ``seed=None`` seeds it from OS entropy.

    DP training must use ``seed=None``: amplification by sampling assumes the
    adversary cannot predict which records a step samples.
    """
    generator = torch.Generator().manual_seed(seed if seed is not None else secret_seed())
    dataset = ExampleDataset(examples)
    if shuffle:
        return DataLoader(
            dataset,
            batch_sampler=ShuffledBatches(len(dataset), batch_size, generator),
            generator=generator,
            collate_fn=pass_batch,
        )
    return DataLoader(dataset, batch_size=batch_size, generator=generator, collate_fn=pass_batch)


def secret_seed() -> int:
    """A 63-bit seed from the OS CSPRNG for torch generators (sampling, DP noise)."""
    return int.from_bytes(secure_bytes(8), "big") >> 1


@dataclass(frozen=True, slots=True)
class TrainStats:
    loss: float
    accuracy: float
    examples: int
    steps: int
    seconds: float


def train_local(
    model: nn.Module,
    loader: DataLoader[tuple[torch.Tensor, ...]],
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    private: bool = False,
) -> TrainStats:
    """Run ``epochs`` passes of cross-entropy training; returns mean loss/accuracy seen.

    ``steps`` counts optimizer calls, one per physical batch (under DP-SGD a
    logical Poisson batch split to bound memory takes several; the noised
    steps are the handle's, :class:`client.privacy.DpSgdHandle`).
    ``private``: the loader Poisson-samples and the optimizer is Opacus' DP
    optimizer, so an empty batch still takes its (noise-only) step: skipping
    it would change the mechanism the accountant assumes.
    """
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    start = time.perf_counter()
    for _ in range(epochs):
        for xb, yb in loader:
            if len(yb) == 0 and not private:
                continue
            xb, yb = xb.to(device), yb.to(device)
            optimizer.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = loss_fn(logits, yb)
            loss.backward()
            optimizer.step()
            steps += 1
            if len(yb) == 0:
                continue
            total_loss += float(loss.detach()) * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return TrainStats(total_loss / max(seen, 1), correct / max(seen, 1), seen, steps, seconds)
