"""The one-run audit's statistics: a lower bound on epsilon from correct membership guesses.

What it guarantees
------------------
The setting of Steinke, Nasr & Jagielski, "Privacy Auditing with One (1)
Training Run" (NeurIPS 2023; arXiv:2305.08846): ``m`` canaries, each
included in the training data independently with probability 1/2; after
training the auditor guesses "in" or "out" for ``r`` of them (abstaining on
the rest), the guesses depending only on the trained model and on what the
auditor knew before (never on the inclusion draw itself). If training is
``(epsilon, delta)``-DP with respect to each canary (add/remove one record),
their main theorem (the ``(epsilon, delta)`` case) bounds the number ``W`` of
correct guesses, for every ``v``::

    P[W >= v] <= P[B >= v] + 2 m delta * max_{1 <= i <= v} P[v - i <= B < v] / i,
    B ~ Binomial(r, q),  q = e^epsilon / (1 + e^epsilon),

which is :func:`p_value` (computed as in their Appendix D). For ``delta = 0``
it is the tail of ``Binomial(r, q)``: an epsilon-DP mechanism guesses no
better than randomised response with accuracy ``q``. At ``epsilon = 0`` and
``delta = 0`` it is the ``Binomial(r, 1/2)`` tail of blind guessing.

:func:`epsilon_lower_bound` inverts it: having observed ``v`` correct
guesses, every ``epsilon`` whose p-value is below ``1 - confidence`` is
rejected, and the bound is the supremum of the rejected values. A mechanism
that is ``(epsilon, delta)``-DP is also ``(epsilon', delta)``-DP for every
``epsilon' >= epsilon``, so ``min_{epsilon' >= epsilon} p_value(epsilon')``
is a valid p-value too and its rejected set is exactly ``[0, bound)``:
``P[bound > epsilon_true] <= 1 - confidence`` whatever the shape of
:func:`p_value` in epsilon. (The paper's code bisects, assuming the p-value
increases with epsilon; the supremum is found here without that assumption.)

The bound is about the mechanism as run, canaries included; it is a
statement about one run's outcome, so a true epsilon is exceeded by it with
probability at most ``1 - confidence`` (never "never").
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit
from scipy.stats import binom

from common.errors import ConfigurationError

__all__ = ["epsilon_lower_bound", "p_value"]

# Grid points over [0, epsilon where the Binomial tail alone reaches 1 - confidence] on which
# the last rejected epsilon is looked for before it is refined by root finding.
_GRID_POINTS = 1024
_TOLERANCE = 1e-9


def _check_counts(m: int, r: int, v: int) -> None:
    for name, value in (("m", m), ("r", r), ("v", v)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ConfigurationError(f"{name} must be an integer, got {value!r}")
    if not 0 <= v <= r <= m or m < 1:
        raise ConfigurationError(
            f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m}) and canaries >= 1"
        )


def _check_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0.0 <= delta <= 1.0:
        raise ConfigurationError(f"delta must lie in [0, 1], got {delta!r}")
    return float(delta)


def _p_values(m: int, r: int, v: int, epsilons: np.ndarray, delta: float) -> np.ndarray:
    """:func:`p_value` at each of ``epsilons`` (checked arguments), vectorised over them."""
    q = expit(epsilons)  # accuracy of epsilon-DP randomised response
    tail = binom.sf(v - 1, r, q)  # P[B >= v]
    if delta == 0.0 or v == 0:
        capped: np.ndarray = np.minimum(tail, 1.0)
        return capped
    below = np.arange(v - 1, -1, -1)  # B = v-1, v-2, ..., 0
    pmf = binom.pmf(below[None, :], r, q[:, None])
    window = np.cumsum(pmf, axis=1) / np.arange(1, v + 1)  # P[v - i <= B < v] / i, i = 1..v
    bound: np.ndarray = np.minimum(tail + 2.0 * m * delta * window.max(axis=1), 1.0)
    return bound


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The probability of ``v`` or more correct guesses out of ``r`` under ``(epsilon, delta)``-DP.

    Parameters
    ----------
    m : int
        Canaries, each included independently with probability 1/2.
    r : int
        Guesses made (abstentions excluded), ``r <= m``.
    v : int
        Correct guesses, ``v <= r``.
    epsilon : float
        The null hypothesis' epsilon, finite and ``>= 0``.
    delta : float
        The null hypothesis' delta, in ``[0, 1]``.

    Returns
    -------
    float
        The bound of the module docstring, capped at 1.

    Raises
    ------
    ConfigurationError
        Counts out of order, or epsilon/delta out of their domain.
    """
    _check_counts(m, r, v)
    d = _check_delta(delta)
    if isinstance(epsilon, bool) or not (
        isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon >= 0
    ):
        raise ConfigurationError(f"epsilon must be finite and >= 0, got {epsilon!r}")
    return float(_p_values(m, r, v, np.array([float(epsilon)]), d)[0])


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that ``v`` correct guesses out of ``r`` reject at ``confidence``.

    ``sup {epsilon >= 0 : p_value(m, r, v, epsilon, delta) < 1 - confidence}``, or 0
    when even epsilon = 0 is not rejected (the module docstring says why the
    supremum is a valid bound). The supremum lies below the epsilon at which
    the Binomial tail alone reaches ``1 - confidence`` (the p-value is never
    smaller than that tail, which grows with epsilon); that range is scanned
    on a grid and the last crossing refined by root finding (to ~1e-9).

    Raises
    ------
    ConfigurationError
        Counts out of order, delta outside [0, 1], confidence outside (0, 1).
    """
    _check_counts(m, r, v)
    d = _check_delta(delta)
    if isinstance(confidence, bool) or not (
        isinstance(confidence, int | float) and 0.0 < confidence < 1.0
    ):
        raise ConfigurationError(f"confidence must lie in (0, 1), got {confidence!r}")
    alpha = 1.0 - float(confidence)
    if v == 0 or p_value(m, r, v, 0.0, d) >= alpha:
        return 0.0

    def excess(eps: float) -> float:
        return float(_p_values(m, r, v, np.array([eps]), d)[0]) - alpha

    # The tail P[B >= v] rises from P[Binomial(r, 1/2) >= v] < alpha to 1: past its crossing
    # nothing is rejected.
    high = 1.0
    while float(binom.sf(v - 1, r, float(expit(high)))) < alpha:
        high *= 2.0
    grid = np.linspace(0.0, high, _GRID_POINTS + 1)
    rejected = _p_values(m, r, v, grid, d) < alpha
    last = int(np.flatnonzero(rejected)[-1])
    if last == _GRID_POINTS:  # the tail crossing itself; cannot be rejected, so never here
        return float(grid[-1])
    return float(brentq(excess, grid[last], grid[last + 1], xtol=_TOLERANCE))
