"""What the policies judge: a run's plan (server side) and a round's request (site side).

Both are frozen values built by the caller from the run configuration and the
incoming instruction; each validates its own fields at construction
(:class:`~common.errors.ConfigurationError` naming the field), so the checks
in :mod:`policies.evaluate` never see a malformed value. Settings of a
mechanism that is off are ``None``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.errors import ConfigurationError


def _int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigurationError(f"{name} must be >= {minimum}, got {value}")


def _bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name} must be a boolean, got {value!r}")


def _positive(name: str, value: object, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigurationError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _needs(name: str, value: object, on: bool, what: str) -> None:
    if on and value is None:
        raise ConfigurationError(f"{name} is required when {what} is on")
    if not on and value is not None:
        raise ConfigurationError(f"{name} must be None when {what} is off")


@dataclass(frozen=True, slots=True)
class RunPlan:
    """The run the coordinator is about to start.

    Attributes
    ----------
    rounds : int
        Number of rounds (>= 1).
    fraction_train : float
        Sampling fraction of sites per round, in (0, 1].
    min_sites : int
        Least number of sites a round needs (>= 1).
    secure_aggregation : bool
        Whether updates are securely aggregated.
    secagg_threshold : int or None
        The reconstruction threshold (``None`` iff secure aggregation is off).
    central_dp : bool
        Whether central (client-level) DP-FedAvg is on.
    central_noise_multiplier : float or None
        Noise std / clip norm of central DP (``None`` iff off).
    central_clip_norm : float or None
        L2 clip norm of each site's update (``None`` iff off).
    central_delta : float or None
        δ at which client-level ε is reported (``None`` iff off).
    """

    rounds: int
    fraction_train: float
    min_sites: int
    secure_aggregation: bool
    secagg_threshold: int | None = None
    central_dp: bool = False
    central_noise_multiplier: float | None = None
    central_clip_norm: float | None = None
    central_delta: float | None = None

    def __post_init__(self) -> None:
        _int("rounds", self.rounds, 1)
        _int("min_sites", self.min_sites, 1)
        _positive("fraction_train", self.fraction_train)
        if self.fraction_train > 1:
            raise ConfigurationError(
                f"fraction_train must lie in (0, 1], got {self.fraction_train}"
            )
        _bool("secure_aggregation", self.secure_aggregation)
        _bool("central_dp", self.central_dp)
        _needs(
            "secagg_threshold", self.secagg_threshold, self.secure_aggregation, "secure aggregation"
        )
        if self.secagg_threshold is not None:
            _int("secagg_threshold", self.secagg_threshold, 1)
        for name in ("central_noise_multiplier", "central_clip_norm", "central_delta"):
            value = getattr(self, name)
            _needs(name, value, self.central_dp, "central DP")
            if value is not None:
                _positive(name, value, allow_zero=name == "central_noise_multiplier")
        if self.central_delta is not None and self.central_delta >= 1:
            raise ConfigurationError(f"central_delta must lie in (0, 1), got {self.central_delta}")


@dataclass(frozen=True, slots=True)
class RoundRequest:
    """A round instruction as a site sees it, before it trains.

    Attributes
    ----------
    server_round : int
        The round number (>= 1).
    cohort_size : int
        How many sites take part in this round (>= 1).
    secure_aggregation : bool
        Whether the update will be securely aggregated.
    secagg_threshold : int or None
        The reconstruction threshold (``None`` iff secure aggregation is off).
    secagg_neighbours : int or None
        The neighbour degree ``k`` of the round's graph, when the instruction
        states it (secure rounds do).
    site_dp : bool
        Whether the site trains with DP-SGD.
    noise_multiplier : float or None
        DP-SGD noise multiplier (``None`` iff site DP is off).
    max_grad_norm : float or None
        DP-SGD per-sample clip norm (``None`` iff site DP is off).
    local_epochs : int
        Local epochs asked for (>= 1).
    app_hash : str or None
        SHA-256 (hex) of the Flower app (FAB) the instruction comes from,
        when known.
    signature : bytes or None
        The instruction's Ed25519 signature (64 bytes; ``None``: unsigned).
    signed_payload : bytes or None
        The exact bytes the signature covers, as the site recomputed them from
        what it received (:meth:`common.audit.instruction.InstructionHeader.message`);
        ``None`` when the site pins no key (it recomputes nothing then).
    signer_key_id : bytes or None
        The SHA-256 fingerprint of the key the instruction names (32 bytes).
    sequence : int or None
        The instruction's sequence number, as it carries it.
    last_sequence : int or None
        The last sequence number the site accepted before this instruction
        from the same key for the same run (``None``: none yet).
    server_key : bytes or None
        The coordinator key (raw 32 bytes) the site pinned, from its policy
        or its node config; the policy's own ``trust.server_key``, when set,
        must be the same key.
    """

    server_round: int
    cohort_size: int
    secure_aggregation: bool
    site_dp: bool
    local_epochs: int
    secagg_threshold: int | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None
    app_hash: str | None = None
    secagg_neighbours: int | None = None
    signature: bytes | None = None
    signed_payload: bytes | None = None
    signer_key_id: bytes | None = None
    sequence: int | None = None
    last_sequence: int | None = None
    server_key: bytes | None = None

    def __post_init__(self) -> None:
        _int("server_round", self.server_round, 1)
        _int("cohort_size", self.cohort_size, 1)
        _int("local_epochs", self.local_epochs, 1)
        _bool("secure_aggregation", self.secure_aggregation)
        _bool("site_dp", self.site_dp)
        _needs(
            "secagg_threshold", self.secagg_threshold, self.secure_aggregation, "secure aggregation"
        )
        if self.secagg_threshold is not None:
            _int("secagg_threshold", self.secagg_threshold, 1)
        if self.secagg_neighbours is not None:
            _int("secagg_neighbours", self.secagg_neighbours, 1)
        _needs("noise_multiplier", self.noise_multiplier, self.site_dp, "site DP")
        _needs("max_grad_norm", self.max_grad_norm, self.site_dp, "site DP")
        if self.noise_multiplier is not None:
            _positive("noise_multiplier", self.noise_multiplier, allow_zero=True)
        if self.max_grad_norm is not None:
            _positive("max_grad_norm", self.max_grad_norm)
        if self.app_hash is not None and not isinstance(self.app_hash, str):
            raise ConfigurationError(f"app_hash must be a string, got {self.app_hash!r}")
        for name in ("signature", "signed_payload", "signer_key_id", "server_key"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bytes):
                raise ConfigurationError(f"{name} must be bytes, got {type(value).__name__}")
        for name, size in (("signature", 64), ("signer_key_id", 32), ("server_key", 32)):
            value = getattr(self, name)
            if value is not None and len(value) != size:
                raise ConfigurationError(f"{name} must be {size} bytes, got {len(value)}")
        for name in ("sequence", "last_sequence"):
            if getattr(self, name) is not None:
                _int(name, getattr(self, name), 1)
