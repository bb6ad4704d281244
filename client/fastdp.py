"""Fast DP-SGD: exact per-example clipping in one backward pass (ghost norms + book-keeping).

What it computes
----------------
DP-SGD needs, per step, the sum of per-example gradients each clipped to
L2 norm ``C`` (Abadi et al., CCS 2016)::

    S = sum_i c_i * grad_i,    c_i = min(1, C / (||grad_i|| + 1e-6))

(Opacus' clip factor, bit for bit the same formula). Opacus' hooks mode
materialises every ``grad_i`` (``B x`` the model's size); its ghost mode
computes the norms without them, then runs a *second* backward pass on the
re-weighted loss. This module does neither: one forward, one backward,
then ``S`` per layer from what that backward saw (book-keeping, Bu et al.,
"Differentially Private Optimization on Large Model at Small Cost",
ICML 2023).

For a layer ``y = W a (+ b)`` applied at positions ``t`` of example ``i``
(``T = 1`` for a plain ``(B, d)`` input; a sequence, the patches of a
convolution, or several calls of one layer otherwise), with activations
``a_it`` and output gradients ``g_it``:

* ``grad_i W = sum_t g_it a_it^T``, so ``||grad_i W||^2 = ||a_i||^2 ||g_i||^2``
  when ``T = 1`` (Goodfellow, 2015) and
  ``<A_i A_i^T, G_i G_i^T>_F`` (the Gram, or "ghost", norm; Li et al.,
  ICLR 2022) otherwise, at ``O(T^2 (d_in + d_out))`` per example instead of
  ``O(T d_in d_out)`` for materialising ``grad_i W``. Which is cheaper is
  chosen per layer and input shape from those two counts (and a memory cap
  on materialising), and logged with the reason.
* ``S_W = sum_i c_i grad_i W = (diag(c) G)^T A``: one matrix product of the
  size of the ordinary weight gradient, which the custom backward below
  therefore does *not* compute (only the input gradient), so the private
  step costs about what a non-private one does.
* ``Conv2d`` is the same with ``a_it`` the unfolded input patches
  (``S_W`` by the native convolution weight-gradient kernel);
  ``Embedding``: ``grad_i W`` has rows ``sum_{t: x_it = v} g_it``, whose norm
  is summed exactly over the distinct tokens of each example; ``LayerNorm``
  and ``GroupNorm``: the per-example gradients of the affine weights,
  ``sum (g * x_hat)`` and ``sum g`` over the positions, are small and are
  materialised.

The per-example gradient is taken of the per-example loss, as Opacus does
with ``loss_reduction="mean"``: the captured output gradients (of the
batch-mean loss) are multiplied by the physical batch size ``B``.

What it guarantees, and what it does not change
-----------------------------------------------
``S`` is the same clipped sum Opacus' hooks compute, up to floating-point
rounding (tests compare both, and an explicit per-example loop, for every
supported layer and the model zoo). Everything after ``S`` is Opacus'
own code through the engine :func:`client.privacy.make_private` built:
its Poisson ``DPDataLoader``, the ghost-clipping optimizer (which takes
``p.grad = S``, accumulates physical batches, adds ``N(0, (z C)^2)`` noise
from the engine's source, fedseal's ChaCha20 stream by default, and divides
by the expected batch size) and the accountant hook, so the privacy event
``(z, q, steps)`` is exactly the one the other modes report. Against whom:
as for :mod:`client.privacy` (anyone who sees the updates leaving the site).

Assumptions (the same as Opacus'): the batch is the first dimension of
every input, examples do not interact in the forward pass, and the loss is
the mean over the batch. A model with any trainable layer this module
cannot clip exactly (another type, a grouped or asymmetrically padded
convolution, a sparse or max-norm embedding, a parameter shared between
layers) is not run here: :func:`choose_grad_sample_mode` falls back to
Opacus' hooks for the whole model and logs why; nothing is ever clipped
approximately.
"""

from __future__ import annotations

import abc
import logging
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.variable import Variable

from common.errors import ConfigurationError

__all__ = [
    "FastClippingModule",
    "LayerMethod",
    "choose_grad_sample_mode",
    "fast_unsupported_layers",
    "make_private_fast",
]

log = logging.getLogger(__name__)

# Opacus' clip factor: C / (norm + 1e-6), at most 1 (opacus.optimizers.optimizer).
_CLIP_EPS = 1e-6
# Materialising per-example weight gradients above this many bytes is never chosen.
MAX_MATERIALISED_BYTES = 256 * 2**20


@dataclass(frozen=True, slots=True)
class LayerMethod:
    """How one layer's per-example norms are computed, and why."""

    layer: str
    method: str  # "ghost", "per_sample", "token_sum", "affine"
    reason: str


# ---------------------------------------------------------------------------
# What can be clipped exactly here


def _conv_padding(module: nn.Conv2d) -> tuple[int, int] | str:
    """Explicit symmetric padding of ``module``, or why there is none."""
    if module.groups != 1:
        return f"grouped convolution (groups={module.groups})"
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0)
        pads = []
        for k, d in zip(module.kernel_size, module.dilation, strict=True):
            total = d * (k - 1)
            if total % 2:
                return "'same' padding that is asymmetric"
            pads.append(total // 2)
        return (pads[0], pads[1])
    return (int(module.padding[0]), int(module.padding[1]))


def _layer_problem(module: nn.Module) -> str | None:
    kind = type(module)
    if kind is nn.Conv2d:
        padding = _conv_padding(module)  # type: ignore[arg-type]
        return padding if isinstance(padding, str) else None
    if kind is nn.Embedding:
        if module.sparse:
            return "sparse gradients"
        if module.max_norm is not None:
            return "max_norm renormalisation"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq (a batch-dependent gradient)"
        return None
    if kind in (nn.Linear, nn.LayerNorm, nn.GroupNorm):
        return None
    return "no exact fast rule for this layer type"


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def fast_unsupported_layers(model: nn.Module) -> list[str]:
    """Why ``model`` cannot take the fast path: one line per layer, empty when it can."""
    problems: list[str] = []
    owner: dict[int, str] = {}
    for name, sub in model.named_modules(remove_duplicate=False):
        params = _trainable(sub)
        if not params:
            continue
        label = f"{name or '<root>'} ({type(sub).__name__})"
        problem = _layer_problem(sub)
        if problem is not None:
            problems.append(f"{label}: {problem}")
        for p in params:
            if id(p) in owner and owner[id(p)] != label:
                problems.append(
                    f"{label}: parameter shared with {owner[id(p)]} (per-layer norms would not add)"
                )
            owner.setdefault(id(p), label)
    if not owner:
        problems.append("<root>: no trainable parameter")
    return list(dict.fromkeys(problems))


def choose_grad_sample_mode(model: nn.Module, requested: str) -> str:
    """Resolve ``"auto"``/``"fast"`` to ``"fast"`` or, with the reason logged, ``"hooks"``.

    Any other mode is returned unchanged. The fallback is for the whole
    model: mixing methods across layers would still need Opacus' hooks on
    every layer for the norms.
    """
    if requested not in ("auto", "fast"):
        return requested
    problems = fast_unsupported_layers(model)
    if problems:
        log.warning(
            "fast DP-SGD clipping not used, Opacus per-sample hooks instead: %s",
            "; ".join(problems),
        )
        return "hooks"
    log.info("fast DP-SGD clipping (one backward pass, ghost norms + book-keeping)")
    return "fast"


# ---------------------------------------------------------------------------
# Custom backward passes: the input gradient only, the layer's records kept


class _Clipper:
    """Collects every tapped layer's records of one backward pass, then clips.

    The first tapped backward of a pass queues :meth:`finish` on autograd's
    engine (run once the whole pass is done); it computes the per-example
    norms over all layers, the clip factors, and writes ``p.grad = S``.
    """

    def __init__(self, taps: list[_Tap], max_grad_norm: float, forbid_accumulation: bool) -> None:
        self.taps = taps
        self.max_grad_norm = max_grad_norm
        self.forbid_accumulation = forbid_accumulation
        self.queued = False
        self.last_norms: torch.Tensor | None = None
        self.methods: dict[str, LayerMethod] = {}
        # Per parameter, the gradient tensor last written and its version (weakly held).
        self._written: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}

    def notify(self) -> None:
        if not self.queued:
            self.queued = True
            Variable._execution_engine.queue_callback(self.finish)

    def finish(self) -> None:
        try:
            self._clip()
        finally:
            self.queued = False
            for tap in self.taps:
                tap.records.clear()

    def _batch_size(self) -> int:
        sizes = {int(r[0].shape[0]) for tap in self.taps for r in tap.records}
        if len(sizes) > 1:
            raise ConfigurationError(
                f"fast DP-SGD saw batches of different sizes {sorted(sizes)} in one backward pass"
            )
        return sizes.pop() if sizes else 0

    def _clip(self) -> None:
        batch = self._batch_size()
        active = [t for t in self.taps if t.records]
        if not active:
            return
        ref = active[0].records[0][1]
        squares = torch.zeros(batch, device=ref.device, dtype=ref.dtype)
        for tap in active:
            method = tap.prepare()
            if self.methods.get(tap.name) != method:
                self.methods[tap.name] = method
                log.info("fast DP-SGD %s: %s (%s)", tap.name, method.method, method.reason)
            squares = squares + tap.sq_norms().to(squares.dtype)
        # The captured gradients are of the batch-mean loss; per-example ones are B times them.
        norms = squares.clamp(min=0).sqrt() * batch
        self.last_norms = norms.detach()
        factor = (self.max_grad_norm / (norms + _CLIP_EPS)).clamp(max=1.0) * batch
        for tap in self.taps:
            for p, grad in tap.clipped_sums(factor):
                self._write(p, grad)

    def _write(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """``p.grad += grad``, refusing a second pass's sum before a step under Poisson sampling."""
        grad = grad.to(p.dtype).reshape(p.shape)
        old = p.grad
        if old is None:
            p.grad = grad
        else:
            seen = self._written.get(id(p))
            if (
                self.forbid_accumulation
                and seen is not None
                and seen[0]() is old
                and seen[1] == old._version
            ):
                raise ConfigurationError(
                    "fast DP-SGD: a second backward pass before zero_grad (gradient "
                    "accumulation) would clip per pass, not per example, under Poisson "
                    "sampling; call zero_grad between passes"
                )
            old.add_(grad)
            grad = old
        self._written[id(p)] = (weakref.ref(grad), grad._version)


class _Tap(abc.ABC):
    """One layer: its records of the current pass and its per-example maths."""

    kind = ""

    def __init__(self, name: str, module: nn.Module, clipper_ref: list[_Clipper]) -> None:
        self.name = name
        self.module = module
        self.records: list[tuple[torch.Tensor, ...]] = []
        self._clipper_ref = clipper_ref

    def record(self, *tensors: torch.Tensor) -> None:
        self.records.append(tuple(t.detach() for t in tensors))
        self._clipper_ref[0].notify()

    def params(self) -> Iterator[tuple[str, nn.Parameter]]:
        for pname in ("weight", "bias"):
            p = getattr(self.module, pname, None)
            if isinstance(p, nn.Parameter) and p.requires_grad:
                yield pname, p

    @abc.abstractmethod
    def prepare(self) -> LayerMethod:
        """Each layer kind's own (prepare); the base class has none."""

    @abc.abstractmethod
    def sq_norms(self) -> torch.Tensor:
        """Each layer kind's own (sq_norms); the base class has none."""

    @abc.abstractmethod
    def clipped_sums(self, factor: torch.Tensor) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        """Each layer kind's own (clipped_sums); the base class has none."""


def _ghost_or_materialise(
    name: str, batch: int, positions: int, d_in: int, d_out: int, itemsize: int
) -> LayerMethod:
    if positions == 1:
        return LayerMethod(name, "ghost", "T=1: ||a||^2 ||g||^2")
    ghost = positions * positions * (d_in + d_out + 1)
    per_sample = positions * d_in * d_out
    memory = batch * d_in * d_out * itemsize
    if memory > MAX_MATERIALISED_BYTES:
        return LayerMethod(
            name, "ghost", f"T={positions}: per-example gradients would take {memory >> 20} MiB"
        )
    if ghost <= per_sample:
        return LayerMethod(
            name, "ghost", f"T={positions}: Gram cost {ghost} <= per-example cost {per_sample}"
        )
    return LayerMethod(
        name, "per_sample", f"T={positions}: per-example cost {per_sample} < Gram cost {ghost}"
    )


def _positions(x: torch.Tensor) -> torch.Tensor:
    """``(B, ..., d)`` as ``(B, T, d)`` (also for an empty batch)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Several calls of one layer as more positions (no copy for the usual single call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each example (first dimension), one reduction kernel."""
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1).square()


class _MatrixTap(_Tap):
    """Shared maths of Linear and Conv2d: ``grad_i W = G_i^T A_i`` over positions."""

    @abc.abstractmethod
    def _matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each layer kind's own (_matrices); the base class has none."""

    @abc.abstractmethod
    def _bias_rows(self) -> torch.Tensor:
        """Each layer kind's own (_bias_rows); the base class has none."""

    def prepare(self) -> LayerMethod:
        a, g = self._matrices()  # (B, T, d_in), (B, T, d_out)
        self._a, self._g = a, g
        self._per_sample: torch.Tensor | None = None
        self._method = _ghost_or_materialise(
            self.name, a.shape[0], a.shape[1], a.shape[2], g.shape[2], g.element_size()
        )
        return self._method

    def sq_norms(self) -> torch.Tensor:
        a, g = self._a, self._g
        total = torch.zeros(g.shape[0], device=g.device, dtype=g.dtype)
        if self.module.weight.requires_grad:
            if a.shape[1] == 1:
                total = _sq_norms(a) * _sq_norms(g)
            elif self._method.method == "ghost":
                total = (a @ a.transpose(1, 2) * (g @ g.transpose(1, 2))).sum((1, 2))
            else:
                self._per_sample = g.transpose(1, 2) @ a  # (B, d_out, d_in)
                total = _sq_norms(self._per_sample)
        bias = self.module.bias
        if bias is not None and bias.requires_grad:
            self._bias = self._bias_rows()
            total = total + _sq_norms(self._bias)
        return total

    def _weight_sum(self, factor: torch.Tensor) -> torch.Tensor:
        if self._per_sample is not None:
            return torch.einsum("b,boi->oi", factor, self._per_sample)
        a, g = self._a, self._g
        if a.shape[2] < g.shape[2]:  # scale the smaller operand by the clip factors
            a = a * factor.view(-1, 1, 1)
        else:
            g = g * factor.view(-1, 1, 1)
        return g.reshape(-1, g.shape[2]).t() @ a.reshape(-1, a.shape[2])

    def clipped_sums(self, factor: torch.Tensor) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        if not self.records:
            for _, p in self.params():
                yield p, torch.zeros_like(p)
            return
        factor = factor.to(self._g.dtype)
        for pname, p in self.params():
            if pname == "weight":
                yield p, self._weight_sum(factor)
            else:
                yield p, factor @ self._bias
        self._a = self._g = self._per_sample = self._bias = None  # type: ignore[assignment]


class _LinearTap(_MatrixTap):
    kind = "linear"

    def _matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _cat([_positions(x) for x, _ in self.records]), _cat(
            [_positions(y) for _, y in self.records]
        )

    def _bias_rows(self) -> torch.Tensor:
        return self._g.sum(1)


class _Conv2dTap(_MatrixTap):
    kind = "conv2d"

    def __init__(self, name: str, module: nn.Module, clipper_ref: list[_Clipper]) -> None:
        super().__init__(name, module, clipper_ref)
        padding = _conv_padding(module)  # type: ignore[arg-type]
        if isinstance(padding, str):
            raise ConfigurationError(f"{name}: {padding}")
        self.padding = padding
        # Non-zero padding modes: the forward pads explicitly (an ordinary differentiable op)
        # and the convolution itself runs unpadded.
        self.pre_pad: tuple[int, ...] | None = None
        if module.padding_mode != "zeros":
            self.pre_pad = tuple(module._reversed_padding_repeated_twice)
            self.padding = (0, 0)

    def _matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.module
        b = self.records[0][0].shape[0]
        cols, outs = [], []
        for x, g in self.records:
            unfolded = F.unfold(x, m.kernel_size, m.dilation, self.padding, m.stride)
            cols.append(unfolded.transpose(1, 2))  # (B, L, C_in k_h k_w)
            outs.append(g.reshape(b, g.shape[1], math.prod(g.shape[2:])).transpose(1, 2))
        return _cat(cols), _cat(outs)

    def _bias_rows(self) -> torch.Tensor:
        return self._g.sum(1)

    def _weight_sum(self, factor: torch.Tensor) -> torch.Tensor:
        if self._per_sample is not None:
            return super()._weight_sum(factor)
        m = self.module
        total: torch.Tensor | None = None
        for x, g in self.records:
            part = torch.nn.grad.conv2d_weight(
                x, m.weight.shape, g * factor.view(-1, 1, 1, 1), m.stride, self.padding, m.dilation
            )
            total = part if total is None else total + part
        if total is None:
            raise ConfigurationError(f"{self.name}: no records")  # unreachable: records checked
        return total


class _EmbeddingTap(_Tap):
    kind = "embedding"

    def prepare(self) -> LayerMethod:
        b = self.records[0][0].shape[0]
        idx = _cat([i.reshape(b, math.prod(i.shape[1:])) for i, _ in self.records])
        g = _cat([_positions(y) for _, y in self.records])
        pad = self.module.padding_idx
        if pad is not None:  # torch gives the padding row no gradient
            g = g * (idx != pad).unsqueeze(-1).to(g.dtype)
        self._idx, self._g = idx, g
        return LayerMethod(self.name, "token_sum", "per-example sums over distinct tokens")

    def sq_norms(self) -> torch.Tensor:
        idx, g = self._idx, self._g
        b, t = idx.shape
        if b * t == 0:
            return torch.zeros(b, device=g.device, dtype=g.dtype)
        vocab = self.module.weight.shape[0]
        rows = torch.arange(b, device=idx.device).unsqueeze(1) * vocab + idx
        keys, inverse = torch.unique(rows.reshape(-1), return_inverse=True)
        sums = torch.zeros(len(keys), g.shape[2], device=g.device, dtype=g.dtype)
        sums.index_add_(0, inverse, g.reshape(-1, g.shape[2]))
        out = torch.zeros(b, device=g.device, dtype=g.dtype)
        return out.index_add_(0, keys // vocab, _sq_norms(sums))

    def clipped_sums(self, factor: torch.Tensor) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        weight = self.module.weight
        grad = torch.zeros_like(weight)
        if self.records:
            g = self._g * factor.to(self._g.dtype).view(-1, 1, 1)
            grad.index_add_(0, self._idx.reshape(-1), g.reshape(-1, g.shape[2]).to(grad.dtype))
            self._idx = self._g = None  # type: ignore[assignment]
        yield weight, grad


class _AffineTap(_Tap):
    """LayerNorm/GroupNorm affine weights: per-example gradients materialised (they are small)."""

    kind = "affine"

    def _reduce_dims(self, ndim: int) -> tuple[int, ...]:
        m = self.module
        if isinstance(m, nn.LayerNorm):
            return tuple(range(1, ndim - len(m.normalized_shape)))
        return tuple(range(2, ndim))  # GroupNorm: every dim past the channels

    def _per_example(self, x_hat: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dims = self._reduce_dims(g.ndim)
        weight = (g * x_hat).sum(dims) if dims else g * x_hat
        bias = g.sum(dims) if dims else g
        return weight, bias

    def prepare(self) -> LayerMethod:
        weight: torch.Tensor | None = None
        bias: torch.Tensor | None = None
        for x_hat, g in self.records:
            w, b = self._per_example(x_hat, g)
            weight = w if weight is None else weight + w
            bias = b if bias is None else bias + b
        self._per = {"weight": weight, "bias": bias}
        return LayerMethod(self.name, "affine", "per-example affine gradients are small")

    def sq_norms(self) -> torch.Tensor:
        total: torch.Tensor | None = None
        for pname, _ in self.params():
            per = self._per[pname]
            if per is None:
                continue
            sq = _sq_norms(per)
            total = sq if total is None else total + sq
        if total is None:
            raise ConfigurationError(f"{self.name}: no trainable affine parameter")
        return total

    def clipped_sums(self, factor: torch.Tensor) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        for pname, p in self.params():
            per = self._per.get(pname) if self.records else None
            if per is None:
                yield p, torch.zeros_like(p)
                continue
            yield p, torch.einsum("b,b...->...", factor.to(per.dtype), per)
        self._per = {}


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Any, bias: Any, tap: _Tap) -> Any:
        ctx.tap = tap
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        x, weight = ctx.saved_tensors
        ctx.tap.record(x, g)
        gx = g @ weight if ctx.needs_input_grad[0] else None
        return gx, None, None, None


class _Conv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Any, bias: Any, tap: _Conv2dTap) -> torch.Tensor:
        m = tap.module
        ctx.tap = tap
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias, m.stride, tap.padding, m.dilation)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        x, weight = ctx.saved_tensors
        tap: _Conv2dTap = ctx.tap
        tap.record(x, g)
        gx = None
        if ctx.needs_input_grad[0]:
            m = tap.module
            gx = torch.nn.grad.conv2d_input(x.shape, weight, g, m.stride, tap.padding, m.dilation)
        return gx, None, None, None


class _EmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, idx: torch.Tensor, weight: Any, tap: _Tap) -> torch.Tensor:
        ctx.tap = tap
        ctx.save_for_backward(idx)
        return F.embedding(idx, weight, tap.module.padding_idx)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        (idx,) = ctx.saved_tensors
        ctx.tap.record(idx, g)
        return None, None, None


class _AffineFn(torch.autograd.Function):
    """``y = x_hat * w + b`` with ``w, b`` broadcast by ``shape``; records ``(x_hat, g)``."""

    @staticmethod
    def forward(
        ctx: Any, x_hat: torch.Tensor, weight: Any, bias: Any, tap: _Tap, shape: Any
    ) -> torch.Tensor:
        ctx.tap, ctx.shape = tap, shape
        ctx.save_for_backward(x_hat, weight)
        y = x_hat if weight is None else x_hat * weight.view(shape)
        return y if bias is None else y + bias.view(shape)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        x_hat, weight = ctx.saved_tensors
        ctx.tap.record(x_hat, g)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = g if weight is None else g * weight.view(ctx.shape)
        return gx, None, None, None, None


def _linear_run(tap: _Tap, x: torch.Tensor) -> torch.Tensor:
    m = tap.module
    return _LinearFn.apply(x, m.weight, m.bias, tap)  # type: ignore[no-any-return]


def _conv2d_run(tap: _Conv2dTap, x: torch.Tensor) -> torch.Tensor:
    m = tap.module
    if tap.pre_pad is not None:
        x = F.pad(x, tap.pre_pad, mode=m.padding_mode)
    return _Conv2dFn.apply(x, m.weight, m.bias, tap)  # type: ignore[no-any-return]


def _embedding_run(tap: _Tap, idx: torch.Tensor) -> torch.Tensor:
    return _EmbeddingFn.apply(idx, tap.module.weight, tap)  # type: ignore[no-any-return]


def _norm_run(tap: _Tap, x: torch.Tensor) -> torch.Tensor:
    m = tap.module
    if isinstance(m, nn.LayerNorm):
        x_hat = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        shape: tuple[int, ...] = tuple(m.normalized_shape)
    else:
        x_hat = F.group_norm(x, m.num_groups, None, None, m.eps)
        shape = (m.num_channels, *([1] * (x.ndim - 2)))
    return _AffineFn.apply(x_hat, m.weight, m.bias, tap, shape)  # type: ignore[no-any-return]


class _PatchedForward:
    """A layer's forward: the tapped one with autograd on, the layer's own otherwise.

    An object (not a closure) so that ``copy.deepcopy`` of a wrapped model
    copies its taps with it.
    """

    __slots__ = ("run", "tap")

    def __init__(self, tap: _Tap, run: Callable[..., torch.Tensor]) -> None:
        self.tap, self.run = tap, run

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # evaluation: the layer's own forward
            return type(self.tap.module).forward(self.tap.module, x)  # type: ignore[no-any-return]
        return self.run(self.tap, x)


_TAPS: dict[type, tuple[type[_Tap], Callable[..., torch.Tensor]]] = {
    nn.Linear: (_LinearTap, _linear_run),
    nn.Conv2d: (_Conv2dTap, _conv2d_run),
    nn.Embedding: (_EmbeddingTap, _embedding_run),
    nn.LayerNorm: (_AffineTap, _norm_run),
    nn.GroupNorm: (_AffineTap, _norm_run),
}


class FastClippingModule(nn.Module):
    """``model`` with its layers' backward passes replaced so ``p.grad`` is the clipped sum.

    After ``loss.backward()`` (``loss`` the batch mean), every trainable
    parameter's ``p.grad`` is ``S`` (see the module docstring) for that
    physical batch, what Opacus' ghost-clipping optimizer expects; the
    optimizer adds noise and normalises. The wrapped model's parameters are
    the caller's own (``state_dict`` keys gain the prefix ``_module.``, as
    with Opacus' wrapper). Passes under ``torch.no_grad()`` run the layers'
    own forward. :meth:`remove` restores the model.

    Raises
    ------
    ConfigurationError
        If the model has a layer the fast path cannot clip exactly
        (see :func:`fast_unsupported_layers`).
    """

    def __init__(
        self, model: nn.Module, *, max_grad_norm: float, forbid_accumulation: bool = True
    ) -> None:
        super().__init__()
        problems = fast_unsupported_layers(model)
        if problems:
            raise ConfigurationError("fast DP-SGD cannot clip this model: " + "; ".join(problems))
        if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ConfigurationError(f"max_grad_norm must be finite and > 0, got {max_grad_norm}")
        self._module = model
        ref: list[_Clipper] = []
        taps: list[_Tap] = []
        self._patched: list[nn.Module] = []
        for name, sub in model.named_modules():
            if not _trainable(sub):
                continue
            tap_cls, run = _TAPS[type(sub)]
            tap = tap_cls(name or "<root>", sub, ref)
            taps.append(tap)
            sub.forward = _PatchedForward(tap, run)  # type: ignore[method-assign]
            self._patched.append(sub)
        self._clipper = _Clipper(taps, float(max_grad_norm), forbid_accumulation)
        ref.append(self._clipper)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._module(*args, **kwargs)

    @property
    def per_sample_norms(self) -> torch.Tensor | None:
        """Per-example gradient norms of the last backward pass (before clipping)."""
        return self._clipper.last_norms

    @property
    def layer_methods(self) -> dict[str, LayerMethod]:
        """The method each layer's norm used last, with the reason."""
        return dict(self._clipper.methods)

    def remove(self) -> nn.Module:
        """Restore the layers' own forward; returns the plain model."""
        for sub in self._patched:
            del sub.forward
        self._patched = []
        return self._module


def make_private_fast(
    engine: Any,
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: torch.utils.data.DataLoader[Any],
    noise_multiplier: float,
    max_grad_norm: float,
    poisson_sampling: bool = True,
    noise_generator: torch.Generator | None = None,
    grad_sample_mode: str = "fast",
    **unused: Any,
) -> tuple[FastClippingModule, Any, torch.utils.data.DataLoader[Any]]:
    """What ``engine.make_private`` does, with the fast clipping module in place of Opacus'.

    ``engine`` is the Opacus ``PrivacyEngine`` :func:`client.privacy.make_private`
    chose for the noise source. Its own steps run unchanged: the Poisson
    ``DPDataLoader`` (``sample_rate = 1 / len(data_loader)``, expected batch
    ``int(n * sample_rate)``, as Opacus computes them), its ghost-clipping
    optimizer (noise from the engine's source, normalised by the expected
    batch) and the accountant's step hook.

    Raises
    ------
    ConfigurationError
        If the optimizer holds parameters the model does not, or the model
        cannot be clipped exactly here.
    """
    if grad_sample_mode != "fast":
        raise ConfigurationError(f"make_private_fast runs mode 'fast', not {grad_sample_mode!r}")
    if unused.get("criterion") is not None:
        raise ConfigurationError("the fast path takes any batch-mean loss: pass no criterion")
    owned = {id(p) for p in module.parameters()}
    for group in optimizer.param_groups:
        if any(id(p) not in owned for p in group["params"]):
            raise ConfigurationError("the optimizer holds parameters that are not the model's")
    fast = FastClippingModule(
        module, max_grad_norm=max_grad_norm, forbid_accumulation=poisson_sampling
    )
    loader = engine._prepare_data_loader(
        data_loader, poisson_sampling=poisson_sampling, distributed=False
    )
    sample_rate = 1 / len(loader)
    expected_batch_size = int(len(loader.dataset) * sample_rate)
    dp_optimizer = engine._prepare_optimizer(
        optimizer=optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        noise_generator=noise_generator,
        grad_sample_mode="ghost",  # the optimizer that takes p.grad as the clipped sum
    )
    dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return fast, dp_optimizer, loader
