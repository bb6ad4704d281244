"""Immutable privacy events: one value per application of a DP mechanism.

Guarantee
---------
A :class:`PrivacyEvent` describes, and only describes, a composition of
``steps`` applications of the sampled Gaussian mechanism with noise
multiplier ``noise_multiplier`` (noise std divided by the L2 sensitivity) and
sampling probability ``sample_rate``. ``sample_rate`` is the probability with
which each protected unit (a record for :attr:`PrivacyLevel.RECORD`, a site
for :attr:`PrivacyLevel.CLIENT`) is independently included in each step,
i.e. Poisson sampling; ``sample_rate = 1.0`` means every unit takes part in
every step and no amplification by sampling is claimed.

Events carry no data and no secrets. Mechanisms emit them; accounting
(:mod:`common.dp.accounting`) composes them separately, in the spirit of
``dp_accounting.dp_event`` (Google) and Opacus' accountant history triples.

Domains (validated at construction, :class:`~common.errors.ConfigurationError`
otherwise): ``noise_multiplier >= 0`` and finite, ``0 < sample_rate <= 1``,
``steps >= 1`` (a Python ``int``, not ``bool``).

References
----------
Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
Mironov, Talwar, Zhang, "Rényi Differential Privacy of the Sampled Gaussian
Mechanism", 2019.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from common.errors import ConfigurationError

__all__ = ["PrivacyEvent", "PrivacyLevel"]


class PrivacyLevel(StrEnum):
    """The unit of privacy an event protects.

    ``RECORD``: one example of a site's dataset (site DP-SGD).
    ``CLIENT``: one site's whole contribution (central DP-FedAvg).
    Epsilons of different levels are never added or compared.
    """

    RECORD = "record"
    CLIENT = "client"


@dataclass(frozen=True, slots=True)
class PrivacyEvent:
    """``steps`` compositions of the Poisson-sampled Gaussian mechanism.

    Parameters
    ----------
    noise_multiplier : float
        Noise std over L2 sensitivity (dimensionless), ``>= 0``. Zero means no
        noise, i.e. no privacy (infinite epsilon).
    sample_rate : float
        Poisson inclusion probability of each unit per step, in ``(0, 1]``.
    steps : int
        Number of mechanism applications, ``>= 1``.
    level : PrivacyLevel
        Unit of privacy; :attr:`PrivacyLevel.RECORD` by default.

    Raises
    ------
    ConfigurationError
        If a field is outside its domain or of the wrong type.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    level: PrivacyLevel = PrivacyLevel.RECORD

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "sample_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigurationError(f"{name} must be a real number, got {value!r}")
            if not math.isfinite(float(value)):
                raise ConfigurationError(f"{name} must be finite, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.noise_multiplier < 0.0:
            raise ConfigurationError(
                f"noise_multiplier must be >= 0, got {self.noise_multiplier!r}"
            )
        if not 0.0 < self.sample_rate <= 1.0:
            raise ConfigurationError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int):
            raise ConfigurationError(f"steps must be an int, got {self.steps!r}")
        if self.steps < 1:
            raise ConfigurationError(f"steps must be >= 1, got {self.steps!r}")
        if not isinstance(self.level, PrivacyLevel):
            try:
                object.__setattr__(self, "level", PrivacyLevel(self.level))
            except ValueError as exc:
                raise ConfigurationError(f"unknown privacy level {self.level!r}") from exc
