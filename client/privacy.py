"""Site DP-SGD: Opacus wiring, model validation and privacy planning.

What it guarantees
------------------
With ``poisson_sampling=True`` every training step samples each record of the
site's dataset independently with probability ``sample_rate`` (Opacus'
``DPDataLoader``), clips each per-sample gradient to L2 norm
``max_grad_norm`` and adds Gaussian noise of std
``noise_multiplier * max_grad_norm`` to their sum (Abadi et al., CCS 2016).
The steps actually taken are the record-level
:class:`~common.dp.events.PrivacyEvent` ``(noise_multiplier, sample_rate,
steps)`` that :class:`DpSgdHandle` reports and the site ledger accounts.
The guarantee is against anyone who sees the model updates that leave the
site (the server, other sites) and does not observe the site's process
memory: by default the noise comes from :func:`common.rng.secure_generator`,
a ChaCha20 keystream keyed from the OS CSPRNG (:mod:`client.dp_noise`
puts it into Opacus' optimizer), not from torch's generator. A seeded
``torch.Generator`` (Opacus' own noise path) is for reproducible tests and
benchmarks only; ``secure_mode=True`` is Opacus' ``torchcsprng`` path (not
installed by default).

Without Poisson sampling the accountant's assumption does not hold; the
handle then refuses to produce an event (:class:`NotSupportedError`) rather
than report an epsilon that is not proven.

Adjacency and what the plan may depend on
-----------------------------------------
A site's dataset size ``n`` is private (add/remove one record, the
adjacency of the Poisson-sampled Gaussian accountant). Everything that
leaves the site is therefore a function of ``n~`` (:func:`noisy_size`), a
release of ``n`` through the Gaussian mechanism (sensitivity 1 under
add/remove) charged once per dataset in the site ledger, never of ``n``
itself: the sampling rate ``q = 1/ceil(n~/b)``, the steps
``epochs * ceil(n~/b)`` and the normaliser ``q * n~`` (the expected batch
the noised sum is divided by). Opacus would divide by ``q * n``: the
update's noise then has std ``z C / (q n)``, and its spread over the
model's coordinates gives ``n`` away (to a few percent at a thousand
coordinates) whatever ``z`` is. With a public normaliser the update is
``(clipped sum + noise) / (q n~)``, post-processing of the Gaussian
mechanism on the sum. Poisson sampling with a public ``q`` is accounted by
``(z, q, steps)`` alone, whatever ``n`` is; a stale ``n~`` (the file grew)
changes the batch size, never the guarantee.

Memory: the expected batch is bounded (:func:`dp_expected_batch_size`:
``dp_batch_size = 0`` means full batch only up to
:data:`~common.config.FULL_BATCH_DP_CAP` examples), and each Poisson batch is
cut into physical batches of at most ``max_physical_batch_size`` whose
clipped per-sample gradients are summed before the one noised step (Opacus'
``BatchMemoryManager`` splitting), so per-sample gradients never take more
than one physical batch of memory. Splitting changes neither the sampled
records nor the step the accountant sees.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from common.config import FULL_BATCH_DP_CAP
from common.dp.accounting import (
    DEFAULT_ACCOUNTANT,
    AccountantName,
    calibrate_noise_multiplier,
    epsilon_for,
    validate_accountant,
    validate_delta,
)
from common.dp.events import PrivacyEvent, PrivacyLevel
from common.errors import ConfigurationError, NotSupportedError
from common.rng import ChaCha20Random, secure_generator

__all__ = [
    "DpSgdHandle",
    "SiteDpPlan",
    "dp_expected_batch_size",
    "make_private",
    "noisy_size",
    "plan_site_dp",
    "validate_model",
]

# "auto": the fast path (client.fastdp) when it clips the model exactly, else "hooks".
GRAD_SAMPLE_MODES = ("auto", "fast", "hooks", "ghost")
# Most examples whose per-sample gradients exist at once (a Poisson batch is split into these).
MAX_PHYSICAL_BATCH_SIZE = 1024
PUBLIC_SIZE_NOISE_STD = 20.0
"""Default std of the noise on a site's released size: costs eps 0.16 alone at delta 1e-5,
about +0.01 on a DP-SGD history of eps 2-14 (PLD); a site sets its own (node config
``dp-size-noise``)."""


def noisy_size(n: int, noise_std: float, rng: ChaCha20Random | None = None) -> int:
    """``max(1, round(n + N(0, noise_std^2)))``: the dataset size as a site may release it.

    Under add/remove adjacency ``n`` has sensitivity 1, so ``n + N(0,
    sigma^2)`` is the Gaussian mechanism with noise multiplier ``sigma``
    (the ledger charges the event ``(sigma, 1.0, 1)``); rounding and the
    floor at 1 are post-processing. The noise is drawn from a fresh
    :func:`common.rng.secure_generator` unless ``rng`` is given (tests).

    Raises
    ------
    ConfigurationError
        ``n`` not a positive int, or ``noise_std`` not finite and > 0.
    """
    size = _positive_int("dataset_size", n)
    if isinstance(noise_std, bool) or not (
        isinstance(noise_std, int | float) and math.isfinite(noise_std) and noise_std > 0
    ):
        raise ConfigurationError(f"noise_std must be finite and > 0, got {noise_std!r}")
    source = rng if rng is not None else secure_generator()
    return max(1, round(size + float(noise_std) * source.standard_normal()))


def dp_expected_batch_size(dp_batch_size: int, dataset_size: int) -> int:
    """DP-SGD's expected batch ``b`` for a split of ``dataset_size`` examples.

    ``dp_batch_size > 0`` is taken as given (at most the split); ``0`` means
    the whole split (sampling rate 1, DP-GD) while it holds at most
    :data:`~common.config.FULL_BATCH_DP_CAP` examples, and ``b = FULL_BATCH_DP_CAP``
    above (sampling rate ``1 / ceil(n / b)``, as :func:`plan_site_dp` and
    Opacus compute it), so a step's cost does not grow with the site's data.

    Raises
    ------
    ConfigurationError
        ``dp_batch_size`` negative or ``dataset_size`` not positive.
    """
    if isinstance(dp_batch_size, bool) or not isinstance(dp_batch_size, int) or dp_batch_size < 0:
        raise ConfigurationError(f"dp_batch_size must be an int >= 0, got {dp_batch_size!r}")
    n = _positive_int("dataset_size", dataset_size)
    return min(dp_batch_size or FULL_BATCH_DP_CAP, n)


def _unsupported_layers(model: nn.Module) -> list[str]:
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator

    problems: list[str] = []
    for name, sub in trainable_modules(model):
        validator = ModuleValidator.VALIDATORS.get(type(sub))
        messages = [str(e) for e in validator(sub)] if validator is not None else []
        if not messages and any(True for _ in sub.buffers(recurse=False)):
            messages = ["trainable layer with buffers (its statistics would not be private)"]
        for message in messages:
            problems.append(f"{name or '<root>'} ({type(sub).__name__}): {message}")
    return problems


def validate_model(model: nn.Module) -> nn.Module:
    """Return a model Opacus can train privately, fixing what can be fixed.

    Layers Opacus knows how to replace (e.g. BatchNorm -> GroupNorm) are
    replaced in a *copy* (Opacus' ``ModuleValidator.fix``), on the model's
    device; a model that is already valid is returned as is. The model is put
    in training mode.

    Raises
    ------
    ConfigurationError
        Naming every layer (path and type) that cannot be made private.
    """
    if not isinstance(model, nn.Module):
        raise ConfigurationError(f"expected a torch.nn.Module, got {type(model).__name__}")
    from opacus.validators import ModuleValidator

    model.train()
    if not _unsupported_layers(model):
        return model
    fixed: nn.Module = ModuleValidator.fix(model)
    fixed.train()
    remaining = _unsupported_layers(fixed)
    if remaining:
        raise ConfigurationError(
            "the model has layers Opacus cannot train with differential privacy: "
            + "; ".join(remaining)
        )
    return fixed


class DpSgdHandle:
    """What one private training session spent: the mechanism and its steps.

    Produced by :func:`make_private`; reads the step count from the Opacus
    accountant the optimizer reports to, so it counts exactly the noised
    steps taken.
    """

    __slots__ = (
        "_engine",
        "criterion",
        "grad_sample_mode",
        "max_grad_norm",
        "noise_multiplier",
        "noise_source",
        "poisson_sampling",
        "sample_rate",
    )

    def __init__(
        self,
        engine: Any,
        *,
        noise_source: str,
        noise_multiplier: float,
        max_grad_norm: float,
        sample_rate: float,
        poisson_sampling: bool,
        grad_sample_mode: str,
        criterion: nn.Module | None,
    ) -> None:
        self._engine = engine
        #: Where the step noise comes from: ``"chacha20"`` (fedseal's stream, the
        #: default), ``"torch"`` (a caller's torch generator) or ``"torchcsprng"``.
        self.noise_source = noise_source
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.sample_rate = sample_rate
        self.poisson_sampling = poisson_sampling
        self.grad_sample_mode = grad_sample_mode
        #: The loss to call ``backward`` on in ghost-clipping mode (``None`` for hooks).
        self.criterion = criterion

    @property
    def steps(self) -> int:
        """Noised optimizer steps taken so far."""
        return sum(int(s) for _, _, s in self._engine.accountant.history)

    def event(self) -> PrivacyEvent:
        """The record-level event of the steps taken so far.

        Raises
        ------
        NotSupportedError
            If Poisson sampling is off (no proven accounting).
        ConfigurationError
            If no step has been taken yet.
        """
        if not self.poisson_sampling:
            raise NotSupportedError(
                "without Poisson sampling the DP-SGD accountant's assumption does not hold; "
                "fedseal does not report an epsilon for it"
            )
        if self.steps == 0:
            raise ConfigurationError("no private step has been taken yet")
        return PrivacyEvent(
            self.noise_multiplier, self.sample_rate, self.steps, PrivacyLevel.RECORD
        )

    def epsilon(self, delta: float, accountant: str = DEFAULT_ACCOUNTANT) -> float:
        """Record-level epsilon of this session alone (the ledger composes sessions)."""
        return epsilon_for([self.event()], delta, accountant)


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[Any],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    poisson_sampling: bool = True,
    grad_sample_mode: str = "auto",
    secure_mode: bool = False,
    noise_generator: torch.Generator | ChaCha20Random | None = None,
    criterion: nn.Module | None = None,
    max_physical_batch_size: int | None = MAX_PHYSICAL_BATCH_SIZE,
    sample_rate: float | None = None,
    expected_batch_size: float | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader[Any], DpSgdHandle]:
    """Wrap model, optimizer and loader for DP-SGD with Opacus.

    The model must already be valid (:func:`validate_model`) and its
    parameters on the device training will use; the optimizer must hold the
    model's parameters. Noise is drawn from a cryptographic stream on the
    CPU and moved to that device (a torch generator draws on the device).

    Parameters
    ----------
    model, optimizer, data_loader
        The plain PyTorch objects (loader with ``drop_last=False``).
    noise_multiplier : float
        ``z >= 0``: noise std over ``max_grad_norm``.
    max_grad_norm : float
        Per-sample gradient L2 clipping bound, ``> 0``.
    poisson_sampling : bool
        Replace the loader's batching by Poisson sampling (required for the
        reported epsilon).
    grad_sample_mode : {"auto", "fast", "hooks", "ghost"}
        Per-sample clipping: ``"fast"`` is :mod:`client.fastdp` (one backward
        pass; falls back to ``"hooks"``, logged, for a model it cannot clip
        exactly); ``"auto"`` (default) is ``"fast"`` with that fallback;
        ``"hooks"`` Opacus' per-sample gradients; ``"ghost"`` Opacus' ghost
        clipping, which needs :attr:`DpSgdHandle.criterion` as the loss.
        :attr:`DpSgdHandle.grad_sample_mode` says which one ran.
    secure_mode : bool
        Opacus' own secure noise (needs ``torchcsprng``) instead of fedseal's stream.
    noise_generator : ChaCha20Random or torch.Generator, optional
        Where the noise comes from. ``None`` (production): a fresh
        :func:`common.rng.secure_generator`. A ``ChaCha20Random``: that
        stream (keyed for reproducible tests). A ``torch.Generator``: Opacus
        draws from it (reproducible benchmarks and tests only; not secret).
        Refused with ``secure_mode``.
    criterion : nn.Module, optional
        Loss for ghost clipping (default cross-entropy).
    max_physical_batch_size : int, optional
        Split each sampled batch into physical batches of at most this many
        examples (Opacus' ``BatchMemoryManager``); the optimizer steps, with
        noise, once per sampled batch. ``None``: no splitting.
    sample_rate, expected_batch_size : float, optional
        A plan made from public quantities (:class:`SiteDpPlan`: its
        ``sample_rate`` and ``expected_batch``): each step samples every
        record with probability ``sample_rate`` (``int(1/sample_rate)``
        steps an epoch) and the noised sum is divided by
        ``expected_batch_size``. Given together, with Poisson sampling.
        Without them Opacus' own choice: ``1/len(data_loader)`` and
        ``len(dataset) * sample_rate``, both functions of the dataset's
        size (see the module notes).

    Returns
    -------
    tuple
        ``(private_model, dp_optimizer, private_loader, handle)``.

    Raises
    ------
    ConfigurationError
        On invalid parameters or a model Opacus cannot wrap.
    NotSupportedError
        If ``secure_mode`` is requested without ``torchcsprng``.
    """
    if isinstance(noise_multiplier, bool) or not (
        isinstance(noise_multiplier, int | float)
        and math.isfinite(noise_multiplier)
        and noise_multiplier >= 0
    ):
        raise ConfigurationError(
            f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}"
        )
    if isinstance(max_grad_norm, bool) or not (
        isinstance(max_grad_norm, int | float)
        and math.isfinite(max_grad_norm)
        and max_grad_norm > 0
    ):
        raise ConfigurationError(f"max_grad_norm must be finite and > 0, got {max_grad_norm!r}")
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ConfigurationError(
            f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}"
        )
    if max_physical_batch_size is not None:
        _positive_int("max_physical_batch_size", max_physical_batch_size)
    if (sample_rate is None) != (expected_batch_size is None):
        raise ConfigurationError("sample_rate and expected_batch_size go together")
    if sample_rate is not None and expected_batch_size is not None:
        if not poisson_sampling:
            raise ConfigurationError("a public sample_rate needs Poisson sampling")
        if not (isinstance(sample_rate, int | float) and 0 < sample_rate <= 1):
            raise ConfigurationError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if not (
            isinstance(expected_batch_size, int | float)
            and math.isfinite(expected_batch_size)
            and expected_batch_size > 0
        ):
            raise ConfigurationError(
                f"expected_batch_size must be finite and > 0, got {expected_batch_size!r}"
            )
    problems = _unsupported_layers(model)
    if problems:
        raise ConfigurationError(
            "the model is not DP-compatible (call validate_model first): " + "; ".join(problems)
        )
    from client.fastdp import choose_grad_sample_mode, make_private_fast

    grad_sample_mode = choose_grad_sample_mode(model, grad_sample_mode)
    torch_generator: torch.Generator | None = None
    if isinstance(noise_generator, torch.Generator):
        device = next(model.parameters()).device
        if noise_generator.device.type != device.type:
            raise ConfigurationError(
                f"noise_generator is on {noise_generator.device}, the model on {device}"
            )
        torch_generator = noise_generator
    elif noise_generator is not None and not isinstance(noise_generator, ChaCha20Random):
        raise ConfigurationError(
            "noise_generator must be a ChaCha20Random or a torch.Generator, "
            f"got {type(noise_generator).__name__}"
        )
    if secure_mode and noise_generator is not None:
        raise ConfigurationError("secure_mode draws its own noise: pass no noise_generator")
    engine = _engine(secure_mode, torch_generator, noise_generator)
    kwargs: dict[str, Any] = {}
    if grad_sample_mode == "ghost":
        kwargs["criterion"] = criterion if criterion is not None else nn.CrossEntropyLoss()
    make = engine.make_private
    if grad_sample_mode == "fast":
        make = functools.partial(make_private_fast, engine)
    try:
        wrapped = make(
            module=model,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(max_grad_norm),
            poisson_sampling=poisson_sampling,
            grad_sample_mode=grad_sample_mode,
            noise_generator=torch_generator,
            **kwargs,
        )
    except (NotImplementedError, ValueError) as exc:
        raise ConfigurationError(f"Opacus cannot make this training private: {exc}") from exc
    if grad_sample_mode == "ghost":
        private_model, dp_optimizer, dp_criterion, loader = wrapped
    else:
        private_model, dp_optimizer, loader = wrapped
        dp_criterion = None
    rate = 1.0 / len(data_loader)
    if sample_rate is not None and expected_batch_size is not None:
        from opacus.data_loader import DPDataLoader

        rate = float(sample_rate)
        loader = DPDataLoader(
            data_loader.dataset,
            sample_rate=rate,
            collate_fn=data_loader.collate_fn,
            generator=data_loader.generator,
        )
        dp_optimizer.expected_batch_size = float(expected_batch_size)  # type: ignore[attr-defined]
    if max_physical_batch_size is not None:
        from opacus.utils.batch_memory_manager import wrap_data_loader

        # What BatchMemoryManager's context yields: the same batches, split, with the
        # optimizer told which physical batch ends a sampled one.
        loader = wrap_data_loader(
            data_loader=loader, max_batch_size=max_physical_batch_size, optimizer=dp_optimizer
        )
    handle = DpSgdHandle(
        engine,
        noise_source=_noise_label(secure_mode, torch_generator),
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        sample_rate=rate,
        poisson_sampling=poisson_sampling,
        grad_sample_mode=grad_sample_mode,
        criterion=dp_criterion,
    )
    return private_model, dp_optimizer, loader, handle


def _engine(
    secure_mode: bool,
    torch_generator: torch.Generator | None,
    noise_generator: torch.Generator | ChaCha20Random | None,
) -> Any:
    """The Opacus engine for the chosen noise source (see :func:`make_private`)."""
    if secure_mode or torch_generator is not None:
        from opacus import PrivacyEngine

        try:
            return PrivacyEngine(accountant="prv", secure_mode=secure_mode)
        except ImportError as exc:
            raise NotSupportedError(
                "secure_mode needs the torchcsprng package, which is not installed"
            ) from exc
    from client.dp_noise import CipherNoisePrivacyEngine

    source = noise_generator if isinstance(noise_generator, ChaCha20Random) else None
    return CipherNoisePrivacyEngine(source if source is not None else secure_generator())


def _noise_label(secure_mode: bool, torch_generator: torch.Generator | None) -> str:
    if secure_mode:
        return "torchcsprng"
    return "torch" if torch_generator is not None else "chacha20"


@dataclass(frozen=True, slots=True)
class SiteDpPlan:
    """A site's DP-SGD parameters for a run.

    Attributes
    ----------
    noise_multiplier : float
        ``z`` used for every step.
    sample_rate : float
        Poisson rate, ``1 / ceil(dataset_size / batch_size)`` as Opacus uses.
    steps_per_round : int
        Noised steps one round takes (``local_epochs`` Poisson epochs, each
        of ``int(1 / sample_rate)`` steps, as Opacus' sampler runs them).
    planned_rounds : int
        Rounds the plan covers.
    planned_epsilon : float
        Record-level epsilon after ``planned_rounds`` rounds (including any
        prior history given to :func:`plan_site_dp`).
    delta : float
        Delta of ``planned_epsilon``.
    accountant : {"pld", "prv", "rdp"}
        Accountant of ``planned_epsilon``.
    public_size : int
        The dataset size the plan was made from (a site's noisy size
        :func:`noisy_size`, never its true ``n``).
    """

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_rounds: int
    planned_epsilon: float
    delta: float
    accountant: AccountantName
    public_size: int

    @property
    def expected_batch(self) -> float:
        """The normaliser of the noised sum: ``sample_rate * public_size``."""
        return self.sample_rate * self.public_size

    def round_event(self) -> PrivacyEvent:
        """The record-level event of one planned round (what the ledger reserves)."""
        return PrivacyEvent(self.noise_multiplier, self.sample_rate, self.steps_per_round)


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a positive int, got {value!r}")
    return value


def plan_site_dp(
    target_epsilon: float,
    delta: float,
    dataset_size: int,
    batch_size: int,
    local_epochs: int,
    planned_rounds: int,
    accountant: str = DEFAULT_ACCOUNTANT,
    noise_multiplier: float | None = None,
    *,
    prior_events: tuple[PrivacyEvent, ...] = (),
) -> SiteDpPlan:
    """Plan DP-SGD so the site's record-level epsilon stays within ``target_epsilon``.

    Without ``noise_multiplier`` the smallest ``z`` (to 0.01 in epsilon) is
    calibrated so that ``prior_events`` (the dataset's ledger history) plus
    ``planned_rounds`` rounds stay at or below ``target_epsilon``. With it,
    ``z`` is taken as given and ``planned_epsilon`` says what it costs (the
    ledger refuses rounds beyond the budget).

    Raises
    ------
    ConfigurationError
        For invalid arguments or a target that cannot be met.
    """
    name = validate_accountant(accountant)
    d = validate_delta(delta)
    n = _positive_int("dataset_size", dataset_size)
    b = _positive_int("batch_size", batch_size)
    epochs = _positive_int("local_epochs", local_epochs)
    rounds = _positive_int("planned_rounds", planned_rounds)
    batches = math.ceil(n / b)
    sample_rate = 1.0 / batches
    steps_per_round = epochs * int(1.0 / sample_rate)
    if noise_multiplier is None:
        z = calibrate_noise_multiplier(
            target_epsilon,
            d,
            sample_rate,
            rounds * steps_per_round,
            name,
            prior_events=prior_events,
        )
    else:
        z = PrivacyEvent(noise_multiplier, sample_rate, 1).noise_multiplier
    planned = epsilon_for(
        [*prior_events, PrivacyEvent(z, sample_rate, rounds * steps_per_round)], d, name
    )
    return SiteDpPlan(
        noise_multiplier=z,
        sample_rate=sample_rate,
        steps_per_round=steps_per_round,
        planned_rounds=rounds,
        planned_epsilon=planned,
        delta=d,
        accountant=name,
        public_size=n,
    )
