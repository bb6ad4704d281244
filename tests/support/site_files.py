"""A site's own data file, made up for a test: random integer features and labels in a CSV."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def random_site_csv(
    path: Path, *, rows: int, features: int, high: int, classes: int, seed: int
) -> Path:
    """Write ``rows`` rows of ``features`` integers in ``[0, high)`` and a ``label`` column."""
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, high, size=(rows, features)), rng.integers(0, classes, size=rows)
    header = ",".join([f"f{i}" for i in range(features)] + ["label"])
    np.savetxt(path, np.column_stack([x, y]), fmt="%d", delimiter=",", header=header, comments="")
    return path
