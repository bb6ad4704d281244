"""The only module that creates random generators or secret random bytes.

Two kinds of randomness, never mixed:

* **Secret randomness** (keys, mask seeds, nonces): :func:`secure_bytes`,
  straight from the operating system CSPRNG (``secrets.token_bytes``).
* **Statistical randomness** (DP noise, stochastic rounding, data shuffling,
  simulated partitions): a :class:`numpy.random.Generator` passed explicitly
  to every function that draws. :func:`secure_generator` seeds one from 256
  bits of OS entropy for privacy noise in production; :func:`seeded_generator`
  gives a reproducible one for simulations and tests. Library code never uses
  numpy's or Python's global generators.
"""

from __future__ import annotations

import secrets

import numpy as np


def secure_bytes(n: int) -> bytes:
    """Return ``n`` bytes from the operating system CSPRNG."""
    if n < 0:
        raise ValueError("n must be non-negative")
    return secrets.token_bytes(n)


def secure_generator() -> np.random.Generator:
    """A numpy Generator (PCG64DXSM) seeded with 256 bits of OS entropy.

    For DP noise: unpredictable to anyone who does not observe this process.
    Not for keys or mask seeds; use :func:`secure_bytes` for those.
    """
    seed = int.from_bytes(secure_bytes(32), "big")
    return np.random.Generator(np.random.PCG64DXSM(seed))


def seeded_generator(seed: int) -> np.random.Generator:
    """A reproducible numpy Generator for simulations, partitioning and tests."""
    if seed < 0:
        raise ValueError("seed must be non-negative")
    return np.random.Generator(np.random.PCG64DXSM(seed))
