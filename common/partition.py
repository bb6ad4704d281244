"""Partitioning an embedded dataset across simulated sites.

flwr-datasets' partitioners work on Hugging Face ``datasets`` objects, which
fedseal does not otherwise need; these two partitioners are the small
numpy equivalents, reproducible from a passed Generator.
"""

from __future__ import annotations

import numpy as np

from common.errors import ConfigurationError, DataError


def iid_partition(num_examples: int, num_sites: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle and cut ``range(num_examples)`` into ``num_sites`` near-equal parts."""
    _check(num_examples, num_sites)
    order = rng.permutation(num_examples)
    return [np.sort(part) for part in np.array_split(order, num_sites)]


def dirichlet_partition(
    labels: np.ndarray,
    num_sites: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    min_examples: int = 2,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label-skewed partition: each class is split across sites by Dirichlet(alpha) proportions.

    Small ``alpha`` (e.g. 0.1) gives sites dominated by few classes; large
    ``alpha`` approaches IID. Draws are repeated (up to ``max_tries``) until
    every site holds at least ``min_examples`` examples.

    Raises
    ------
    ConfigurationError
        ``alpha <= 0``, or no draw satisfied ``min_examples``.
    """
    if not (alpha > 0 and np.isfinite(alpha)):
        raise ConfigurationError(f"alpha must be a positive number, got {alpha!r}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError("labels must be one-dimensional")
    _check(len(labels), num_sites)
    if len(labels) < num_sites * min_examples:
        raise ConfigurationError(
            f"{len(labels)} examples cannot give {num_sites} sites {min_examples} examples each"
        )
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            proportions = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(int)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].append(chunk)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in result) >= min_examples:
            return result
    raise ConfigurationError(
        f"no Dirichlet(alpha={alpha}) draw gave every one of {num_sites} sites "
        f"{min_examples}+ examples in {max_tries} tries; raise alpha or use fewer sites"
    )


def _check(num_examples: int, num_sites: int) -> None:
    if num_sites < 1:
        raise ConfigurationError(f"num_sites must be >= 1, got {num_sites}")
    if num_examples < num_sites:
        raise ConfigurationError(
            f"{num_examples} examples cannot be split across {num_sites} sites"
        )
