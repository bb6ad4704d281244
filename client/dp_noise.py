"""DP-SGD noise from fedseal's cryptographic stream: the seam into Opacus.

What it guarantees
------------------
An optimizer made by :class:`CipherNoisePrivacyEngine` is Opacus' own
``DPOptimizer`` (hooks) or ``DPOptimizerFastGradientClipping`` (ghost
clipping) with one method replaced: :meth:`CipherNoise.add_noise` draws the
Gaussian noise of every step from a :class:`common.rng.ChaCha20Random`
instead of torch's generator. Clipping, accumulation, the skip logic of
split batches, scaling, Poisson sampling and the accountant hook are
Opacus' code, unchanged. Per step and parameter, the noise added to the sum
of clipped per-sample gradients is i.i.d. ``N(0, (z * C)^2)`` with
``z = noise_multiplier`` and ``C = max_grad_norm``, as in Opacus.

The variates are drawn on the CPU in float64 (one call per step for all
parameters), then cast to each gradient's dtype and moved to its device, so
CUDA and CPU models get the same noise distribution and no code assumes a
device. Against whom: anyone who sees the model updates leaving the site
and does not observe the site's process memory (the stream's key).

Opacus' ``secure_mode`` (torchcsprng) is not used here; see
:func:`client.privacy.make_private` for how a caller chooses the source.
"""

from __future__ import annotations

from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping, get_optimizer_class
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from common.errors import NotSupportedError
from common.rng import ChaCha20Random

__all__ = ["CipherNoise", "CipherNoisePrivacyEngine", "gaussian_like"]


def gaussian_like(
    source: ChaCha20Random, std: float, references: list[torch.Tensor]
) -> list[torch.Tensor]:
    """I.i.d. ``N(0, std^2)`` tensors shaped, typed and placed like ``references``.

    One float64 draw of the total size from ``source`` (CPU), cast and moved
    once when every reference shares a device and dtype. ``std = 0`` draws
    nothing and returns zeros (as Opacus does).
    """
    if std == 0.0:
        return [torch.zeros_like(r) for r in references]
    total = sum(r.numel() for r in references)
    flat = torch.from_numpy(source.normal(0.0, std, size=total))
    kinds = {(r.device, r.dtype) for r in references}
    if len(kinds) == 1:
        device, dtype = kinds.pop()
        flat = flat.to(device=device, dtype=dtype)
    noises: list[torch.Tensor] = []
    offset = 0
    for r in references:
        n = r.numel()
        noises.append(flat[offset : offset + n].view(r.shape).to(device=r.device, dtype=r.dtype))
        offset += n
    return noises


class CipherNoise:
    """Mixin for an Opacus optimizer: :meth:`add_noise` from a :class:`ChaCha20Random`.

    Parameters
    ----------
    noise_source : ChaCha20Random
        The stream every step's noise comes from (keyword-only; the other
        arguments are the Opacus optimizer's).
    """

    noise_source: ChaCha20Random
    params: list[torch.nn.Parameter]
    noise_multiplier: float
    max_grad_norm: float

    def __init__(self, *args: Any, noise_source: ChaCha20Random, **kwargs: Any) -> None:
        if not isinstance(noise_source, ChaCha20Random):
            raise NotSupportedError("cipher noise needs a common.rng.ChaCha20Random")
        super().__init__(*args, **kwargs)
        self.noise_source = noise_source

    def add_noise(self) -> None:
        """Set ``p.grad = p.summed_grad + N(0, (z C)^2)`` for every parameter (Opacus' contract)."""
        z = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        summed = []
        for p in self.params:
            _check_processed_flag(p.summed_grad)  # a gradient is never noised twice
            summed.append(p.summed_grad)
        noises = gaussian_like(self.noise_source, float(z) * float(self.max_grad_norm), summed)
        for p, grad, noise in zip(self.params, summed, noises, strict=True):
            p.grad = (grad + noise).view_as(p)
            _mark_as_processed(grad)


class CipherNoiseDPOptimizer(CipherNoise, DPOptimizer):
    """Opacus' ``DPOptimizer`` (per-sample gradients by hooks) with cipher noise."""


class CipherNoiseGhostDPOptimizer(CipherNoise, DPOptimizerFastGradientClipping):
    """Opacus' ghost-clipping optimizer with cipher noise."""


_CIPHER_CLASSES: dict[type, type] = {
    DPOptimizer: CipherNoiseDPOptimizer,
    DPOptimizerFastGradientClipping: CipherNoiseGhostDPOptimizer,
}


class CipherNoisePrivacyEngine(PrivacyEngine):
    """Opacus' ``PrivacyEngine`` whose optimizers draw their noise from ``noise_source``.

    Only the optimizer class changes (``_prepare_optimizer``, the step
    where Opacus picks it); the model wrapping, the Poisson loader and the
    accountant hook are the engine's own. Flat clipping in one process
    (hooks or ghost) is what fedseal runs; other Opacus optimizers raise.
    """

    def __init__(self, noise_source: ChaCha20Random, accountant: str = "prv") -> None:
        super().__init__(accountant=accountant, secure_mode=False)
        self._noise_source = noise_source

    def _prepare_optimizer(
        self,
        *,
        optimizer: torch.optim.Optimizer,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        loss_reduction: str = "mean",
        distributed: bool = False,
        clipping: str = "flat",
        noise_generator: Any = None,
        grad_sample_mode: str = "hooks",
        **kwargs: Any,
    ) -> DPOptimizer:
        if noise_generator is not None:
            raise NotSupportedError("cipher noise takes no torch noise generator")
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        base = get_optimizer_class(
            clipping=clipping, distributed=distributed, grad_sample_mode=grad_sample_mode
        )
        cls = _CIPHER_CLASSES.get(base)
        if cls is None:
            raise NotSupportedError(
                f"cipher noise is wired for flat single-process clipping, not {base.__name__}"
            )
        dp_optimizer: DPOptimizer = cls(
            optimizer=optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            noise_source=self._noise_source,
            **kwargs,
        )
        return dp_optimizer
