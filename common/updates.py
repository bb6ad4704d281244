"""Model updates on the client: the L2 clipping step before masking or sending."""

from __future__ import annotations

import numpy as np

from common.errors import ConfigurationError


def clip_update(update: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """Return ``update`` scaled by ``min(1, C/||update||)`` and its original L2 norm."""
    if not (clip_norm > 0 and np.isfinite(clip_norm)):
        raise ConfigurationError(f"clip_norm must be positive and finite, got {clip_norm!r}")
    norm = float(np.linalg.norm(update.astype(np.float64)))
    if norm <= clip_norm:
        return update, norm
    scaled = (update.astype(np.float64) * (clip_norm / norm)).astype(update.dtype)
    # float rounding may leave the norm a hair above C: shrink until it is not
    while float(np.linalg.norm(scaled.astype(np.float64))) > clip_norm:
        scaled = np.nextafter(scaled, 0).astype(update.dtype)
    return scaled, norm
