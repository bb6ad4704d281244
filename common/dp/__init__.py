"""Differential-privacy building blocks shared by sites and server (pure, no I/O).

``events`` (immutable mechanism descriptions), ``clipping`` (L2 clipping),
``noise`` (Gaussian noise), ``central`` (DP-FedAvg aggregation) and
``accounting`` (epsilon from an event history, noise calibration,
client-level accountant).
"""

from common.dp.accounting import (
    ACCOUNTANTS,
    DEFAULT_ACCOUNTANT,
    AccountantName,
    ClientLevelAccountant,
    ClientSampling,
    calibrate_noise_multiplier,
    epsilon_for,
)
from common.dp.central import CentralDpResult, noise_aggregate
from common.dp.clipping import clip_l2, l2_norm
from common.dp.events import PrivacyEvent, PrivacyLevel
from common.dp.noise import add_gaussian_noise, central_noise_std

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ACCOUNTANT",
    "AccountantName",
    "CentralDpResult",
    "ClientLevelAccountant",
    "ClientSampling",
    "PrivacyEvent",
    "PrivacyLevel",
    "add_gaussian_noise",
    "calibrate_noise_multiplier",
    "central_noise_std",
    "clip_l2",
    "epsilon_for",
    "l2_norm",
    "noise_aggregate",
]
