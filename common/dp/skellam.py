"""The distributed Skellam mechanism: each site noises its own quantised update before masking.

Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private
Federated Learning", NeurIPS 2021 (here "the paper"). With secure
aggregation the coordinator learns only the sum of the masked vectors; if
every site adds its share of integer noise before masking, that sum already
carries the whole noise and the coordinator never holds an un-noised sum
(central DP, :mod:`common.dp.central`, noises after unmasking). Every step
below is a named pure function; randomness is passed in.

Pipeline of one site (:func:`encode_update`) and of the server (:func:`decode_sum`)
----------------------------------------------------------------------------------
1. **Pad and rotate** (:func:`rotate`): the clipped update ``x`` (``||x||_2 <= c``,
   ``d`` coordinates) is padded with zeros to ``d' = 2^ceil(log2 d)`` and
   rotated, ``y = H D x / sqrt(d')``, with ``H`` the Walsh-Hadamard matrix
   (fast transform, ``O(d' log d')``) and ``D`` a diagonal of random signs.
   The rotation is orthonormal, so ``||y||_2 = ||x||_2``, and it spreads the
   norm evenly over the coordinates (each ``y_k`` is a Rademacher sum with
   coefficient norm ``||x||_2 / sqrt(d')``), which is what lets few ring bits
   hold the sum. The signs come from a **public** seed
   (:func:`rotation_key`: the round's secure-aggregation configuration), the
   same for every site of a round and for the server, which inverts the
   rotation after unmasking (:func:`unrotate`). The rotation is not secret:
   privacy comes from the noise only.
2. **Scale** by ``gamma`` (:attr:`SkellamParams.gamma`): ``z = gamma * y``.
   Floating point can make ``||z||_2`` exceed ``gamma c`` by a few ulps; it
   is then scaled back onto that sphere, so ``||z||_2 <= gamma c`` holds exactly.
3. **Conditional stochastic rounding** (:func:`conditional_round`): each
   coordinate is rounded down or up with probability given by its
   fractional part (unbiased, ``|q_k - z_k| < 1``), and the whole vector is
   rounded again until ``||q||_2 <= Delta_2``, where (the paper's Section 4,
   from Kairouz, Liu, Steinke, ICML 2021, Theorem 23) ::

       Delta_2^2 = min( (gamma c)^2 + d'/4 + sqrt(2 ln(1/beta)) (gamma c + sqrt(d')/2),
                        (gamma c + sqrt(d'))^2 )

   An unconditioned rounding exceeds the first bound with probability at
   most ``beta``; the second holds always (triangle inequality with
   ``|q_k - z_k| < 1``). So each attempt succeeds with probability at least
   ``1 - beta`` (``beta = e^-0.5``: at least 39 %), the number of attempts is
   geometric, and after conditioning ``||q||_2 <= Delta_2`` *holds for every
   output*: this, not a probability, is the L2 sensitivity the accountant
   uses. Integer vectors also give ``||q||_1 <= ||q||_2^2`` (``|q_k| <= q_k^2``)
   and ``||q||_1 <= sqrt(d') ||q||_2``, so ``Delta_1 = min(Delta_2^2, sqrt(d') Delta_2)``.
4. **Skellam noise** (:func:`sample_skellam`): the site adds
   ``Sk(mu_s) = Poisson(mu_s) - Poisson(mu_s)`` to every coordinate,
   ``mu_s = mu / t`` its share of the target ``mu`` (:attr:`SkellamParams.share`),
   ``t`` the secure-aggregation threshold. Skellam variables add:
   ``m`` shares give ``Sk(m mu_s)``, variance ``2 m mu_s``. A site's honest
   neighbours refuse to unmask a survivor set below ``t``
   (:meth:`common.secagg.SecAggClient.consistency`), so every sum the server
   can unmask holds ``m >= t`` shares, hence noise ``Sk(mu')`` with
   ``mu' = m mu_s >= mu``. Each site derives ``mu`` from the public run
   settings it holds and ``t`` from the round's configuration it checks
   (:func:`site_share`); nothing the coordinator says about noise is read.
5. **Wrap** (:func:`to_ring`) into ``Z_{2^b}`` and mask as usual; the server
   lifts the ring sum to signed integers, divides by ``gamma`` and unrotates.

No wrap-around (correctness, not privacy). The ring holds signed sums in
``[-2^(b-1), 2^(b-1))``. For at most ``n`` sites with ``||x_i||_2 <= c`` and data
independent of the rotation's signs, coordinate ``k`` of the integer sum is
``A_k + E_k + N_k``: ``A_k = gamma (H D X)_k / sqrt(d')`` with ``X = sum_i x_i``,
a Rademacher sum with coefficient norm at most ``gamma n c / sqrt(d')``, so
Hoeffding gives ``P(|A_k| >= a) <= 2 exp(-a^2 d' / (2 gamma^2 n^2 c^2))``;
the rounding errors ``|E_k| < n``; the noise ``N_k ~ Sk(n mu_s)`` (tail from
:func:`scipy.stats.skellam`, monotone in ``mu``). By a union bound over the
``d'`` coordinates the sum wraps with probability at most
:func:`wrap_probability`; :func:`make_params` picks the largest ``gamma``
(bisection to a relative 2^-12) for which that bound is at most
:data:`WRAP_PROBABILITY` (``2^-40``) per round.

Noise source and floating point
-------------------------------
The noise comes only from :class:`common.rng.ChaCha20Random` (OS-keyed in
production): each Poisson variate is the exact inverse CDF
(:func:`scipy.stats.poisson.ppf`, the smallest ``k`` with ``F(k) >= u``) of a
uniform ``u = (j + 1/2) 2^-53``, ``j`` 53 keystream bits
(:func:`poisson_inverse_cdf`: the same quantile as scipy's ``ppf``, found faster). So ``u`` never
reaches 0 or 1 and the sampled law is the Poisson law with its mass
quantised to the 2^-53 grid: per variate it differs from the ideal one in
total variation by at most about ``2^-53`` per unit of the largest
step in the cdf grid (both tails beyond the 2^-54 quantiles are cut, less
than ``2^-53`` of mass), plus the ~1e-15 relative error of scipy's
regularised incomplete gamma function. fedseal does not add this to delta,
exactly as :mod:`common.rng` does for Gaussian noise. Unlike floating-point
Gaussian noise, the output is an integer, so no floating-point gap in the
output grid can single out a neighbouring input (Mironov, CCS 2012).

What is private, against whom, under which assumption
-----------------------------------------------------
One site's update (zero-out adjacency: the site's update replaced by zero,
its sampling coin and noise share unchanged, as in the distributed-DP
analyses of the paper and of Kairouz, Liu, Steinke 2021), against the
coordinator (which sees the unmasked noised sum) and anyone it shows the
model to, assuming at least ``t`` of the summed sites are honest (a
colluding site can leave out its noise) and that secure aggregation hides
individual masked vectors (:mod:`common.secagg`). The accounting is in
:mod:`common.dp.skellam_accounting`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import special, stats

from common.errors import ConfigurationError, DataError
from common.rng import ChaCha20Random

__all__ = [
    "BETA",
    "MECHANISM",
    "WRAP_PROBABILITY",
    "SkellamParams",
    "conditional_round",
    "decode_sum",
    "encode_update",
    "fwht",
    "l1_bound",
    "l2_bound",
    "make_params",
    "padded_length",
    "poisson_inverse_cdf",
    "rotate",
    "rotation_key",
    "rotation_signs",
    "sample_skellam",
    "skellam_tail",
    "site_share",
    "to_ring",
    "unrotate",
    "wrap_probability",
]

MECHANISM = "distributed-skellam"
BETA = math.exp(-0.5)
"""The paper's conditional-rounding parameter ``beta``: each attempt fails with probability <= beta."""
WRAP_PROBABILITY = 2.0**-40
"""Largest accepted bound on the probability that a round's noised sum wraps the ring."""
MAX_ROUNDING_ATTEMPTS = 200
"""Each attempt succeeds with probability >= 1 - beta > 0.39: 200 failures have probability < 1e-42."""
_ROTATION_LABEL = b"fedseal skellam rotation v1"
_PPF_CHUNK = 1 << 16

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


def padded_length(d: int) -> int:
    """``d' = 2^ceil(log2 d)``, the Hadamard transform's length for ``d`` coordinates."""
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ConfigurationError(f"vector length must be a positive int, got {d!r}")
    return 1 << (d - 1).bit_length()


def fwht(x: FloatArray) -> FloatArray:
    """The unnormalised fast Walsh-Hadamard transform ``H x`` (a new array; ``H H = d' I``).

    Raises
    ------
    DataError
        Unless ``x`` is a 1-D float array whose length is a power of two.
    """
    if not isinstance(x, np.ndarray) or x.ndim != 1 or x.size & (x.size - 1) or x.size == 0:
        raise DataError("the Hadamard transform needs a 1-D array of length 2^k")
    out = np.array(x, dtype=np.float64, copy=True)
    h = 1
    while h < out.size:
        view = out.reshape(-1, 2, h)
        top = view[:, 0, :].copy()
        view[:, 0, :] += view[:, 1, :]
        np.subtract(top, view[:, 1, :], out=view[:, 1, :])
        h *= 2
    return out


def rotation_key(public_context: bytes) -> bytes:
    """The 32-byte key of a round's public rotation: SHA-256 over a label and ``public_context``.

    ``public_context`` is the round's secure-aggregation configuration
    (:meth:`common.secagg.SecAggConfig.encode`), which every site checks
    and the server holds: all derive the same signs, and a new round gets new ones.
    """
    if type(public_context) is not bytes:
        raise ConfigurationError("the rotation's public context must be bytes")
    return hashlib.sha256(_ROTATION_LABEL + public_context).digest()


def rotation_signs(key: bytes, length: int) -> FloatArray:
    """The diagonal ``D`` (``+-1``, each with probability 1/2) of the rotation keyed by ``key``.

    Public randomness (a keyed ChaCha20 stream, :class:`common.rng.ChaCha20Random`):
    reproducible by everyone who knows the key, which is the point.
    """
    bits = ChaCha20Random(key).random(length)
    return np.where(bits < 0.5, 1.0, -1.0)


def rotate(x: npt.NDArray[np.floating], key: bytes) -> FloatArray:
    """``H D [x, 0...] / sqrt(d')``: pad ``x`` to ``d'`` and rotate it (orthonormal)."""
    values = np.asarray(x, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise DataError("rotate needs a non-empty 1-D vector")
    length = padded_length(values.size)
    padded = np.zeros(length, dtype=np.float64)
    padded[: values.size] = values
    padded *= rotation_signs(key, length)
    out = fwht(padded)
    out /= math.sqrt(length)
    return out


def unrotate(y: npt.NDArray[np.floating], key: bytes, d: int) -> FloatArray:
    """The inverse of :func:`rotate`: ``(D H y / sqrt(d'))[:d]``."""
    values = np.asarray(y, dtype=np.float64)
    if values.ndim != 1 or values.size != padded_length(d):
        raise DataError(f"unrotate needs a vector of length {padded_length(d)}")
    out = fwht(values)
    out /= math.sqrt(values.size)
    out *= rotation_signs(key, values.size)
    return out[:d]


def l2_bound(scaled_norm: float, length: int, beta: float = BETA) -> float:
    """``Delta_2``: the conditional rounding's L2 bound for ``||z||_2 <= scaled_norm`` (module item 3)."""
    if not (math.isfinite(scaled_norm) and scaled_norm > 0):
        raise ConfigurationError(f"scaled norm must be positive, got {scaled_norm!r}")
    if not 0.0 < beta < 1.0:
        raise ConfigurationError(f"beta must be in (0, 1), got {beta!r}")
    root = math.sqrt(length)
    probable = (
        scaled_norm**2
        + length / 4.0
        + math.sqrt(2.0 * math.log(1.0 / beta)) * (scaled_norm + root / 2.0)
    )
    return math.sqrt(min(probable, (scaled_norm + root) ** 2))


def l1_bound(delta2: float, length: int) -> float:
    """``Delta_1 = min(Delta_2^2, sqrt(d') Delta_2)`` for integer vectors (module item 3)."""
    return min(delta2 * delta2, math.sqrt(length) * delta2)


def conditional_round(z: FloatArray, bound: float, rng: ChaCha20Random) -> IntArray:
    """Stochastically round ``z`` until ``||q||_2 <= bound`` (module item 3).

    Raises
    ------
    DataError
        If :data:`MAX_ROUNDING_ATTEMPTS` attempts all exceed the bound
        (probability below 1e-42 when ``bound`` is :func:`l2_bound` of ``||z||_2``).
    """
    floor = np.floor(z)
    frac = z - floor
    base = floor.astype(np.int64)
    limit = bound * bound
    for _ in range(MAX_ROUNDING_ATTEMPTS):
        q = base + (rng.random(z.size) < frac)
        if float(np.dot(q.astype(np.float64), q.astype(np.float64))) <= limit:
            return q
    raise DataError(
        f"conditional rounding exceeded the L2 bound {bound:.6g} {MAX_ROUNDING_ATTEMPTS} times"
    )


def poisson_inverse_cdf(u: FloatArray, mu: float) -> FloatArray:
    """The Poisson(``mu``) quantile of each ``u`` in (0, 1): the smallest ``k`` with ``F(k) >= u``.

    Exact inversion by search: a Cornish-Fisher start
    ``mu + sqrt(mu) z + (z^2 - 1) / 6`` (``z`` the normal quantile of ``u``)
    is moved one step at a time, all coordinates at once, until
    ``F(k - 1) < u <= F(k)``, with ``F`` the regularised incomplete gamma
    function (:func:`scipy.special.pdtr`, ~1e-15 relative). The start is a few
    steps off at most, so this is much faster than :func:`scipy.stats.poisson.ppf`
    for large ``mu`` (which bisects in ``cdflib``); coordinates still moving
    after 64 steps are finished by that function, so the result is the same.
    """
    z = special.ndtri(u)
    k = np.maximum(np.floor(mu + math.sqrt(mu) * z + (z * z - 1.0) / 6.0), 0.0)
    log_mu = math.log(mu)
    active = np.arange(k.size)
    for _ in range(64):
        kk, uu = k[active], u[active]
        upper = special.pdtr(kk, mu)  # F(k)
        with np.errstate(invalid="ignore", over="ignore"):
            lower = upper - np.exp(kk * log_mu - mu - special.gammaln(kk + 1.0))  # F(k - 1)
        bad = ~np.isfinite(lower)
        if bad.any():
            lower[bad] = special.pdtr(kk[bad] - 1.0, mu)
        up = upper < uu
        down = (kk > 0) & (lower >= uu)
        moving = up | down
        if not moving.any():
            return np.asarray(k, dtype=np.float64)
        k[active] = kk + up - down
        active = active[moving]
    done = (special.pdtr(k, mu) >= u) & ((k == 0) | (special.pdtr(k - 1.0, mu) < u))
    k[~done] = stats.poisson.ppf(u[~done], mu)
    return np.asarray(k, dtype=np.float64)


def sample_skellam(mu: float, size: int, rng: ChaCha20Random) -> IntArray:
    """``size`` draws of ``Poisson(mu) - Poisson(mu)`` (variance ``2 mu``) from ``rng``.

    Exact inversion (:func:`poisson_inverse_cdf`) of 53-bit cryptographic
    uniforms (module notes); ``mu = 0`` gives zeros. Only
    :class:`common.rng.ChaCha20Random` is accepted.

    Raises
    ------
    ConfigurationError
        For a ``mu`` that is negative or not finite, or another generator.
    """
    if not isinstance(rng, ChaCha20Random):
        raise ConfigurationError("Skellam noise must come from a ChaCha20Random")
    if not (math.isfinite(mu) and mu >= 0):
        raise ConfigurationError(f"the Skellam parameter must be finite and >= 0, got {mu!r}")
    if size < 0:
        raise ConfigurationError("size must be >= 0")
    out = np.zeros(size, dtype=np.int64)
    if mu == 0 or size == 0:
        return out
    for start in range(0, size, _PPF_CHUNK):
        count = min(_PPF_CHUNK, size - start)
        u = rng.random(2 * count)
        u += 2.0**-54  # (j + 1/2) 2^-53: never 0, never 1
        draws = poisson_inverse_cdf(u, mu)
        out[start : start + count] = (draws[:count] - draws[count:]).astype(np.int64)
    return out


def to_ring(q: IntArray, bits: int) -> npt.NDArray[np.uint32]:
    """``q mod 2^bits`` as uint32 ring words (``8 <= bits <= 32``)."""
    if not 8 <= bits <= 32:
        raise ConfigurationError(f"the distributed-DP ring has 8..32 bits, got {bits}")
    return np.bitwise_and(q, (1 << bits) - 1).astype(np.uint32)


@dataclass(frozen=True, slots=True)
class SkellamParams:
    """Public parameters of the distributed Skellam mechanism for one run.

    Attributes
    ----------
    dimension, padded : int
        ``d`` (model size) and ``d'`` (power of two).
    clip_norm : float
        ``c``: every site's update has L2 norm at most ``c``.
    bits : int
        Ring bits ``b`` per coordinate.
    max_sites : int
        ``n``: the most sites a round can sum (the run's planned population).
    threshold : int
        ``t``: the fewest survivors secure aggregation can unmask (the noise floor's divisor).
    noise_multiplier : float
        ``z``: the target noise ``mu`` gives variance ``2 mu = (z Delta_2)^2``.
    gamma : float
        The scale (integers per unit of the rotated update).
    l2, l1 : float
        ``Delta_2``, ``Delta_1`` after conditional rounding (integer domain).
    mu : float
        Target Skellam parameter of the summed noise (any ``>= t`` survivors reach it).
    """

    dimension: int
    padded: int
    clip_norm: float
    bits: int
    max_sites: int
    threshold: int
    noise_multiplier: float
    gamma: float
    l2: float
    l1: float
    mu: float

    @property
    def share(self) -> float:
        """``mu_s = mu / t``: one site's Skellam parameter."""
        return self.mu / self.threshold

    def survivors_mu(self, survivors: int) -> float:
        """``m mu_s``: the Skellam parameter of the noise in a sum of ``survivors`` sites."""
        return survivors * self.share

    def noise_std(self, survivors: int) -> float:
        """Std of the noise per coordinate of the decoded sum (model units): ``sqrt(2 m mu_s) / gamma``."""
        return math.sqrt(2.0 * self.survivors_mu(survivors)) / self.gamma

    def sensitivity(self) -> float:
        """``Delta_2 / gamma``: one site's L2 sensitivity in model units."""
        return self.l2 / self.gamma


def _mu_for(z: float, gamma: float, c: float, length: int) -> tuple[float, float, float]:
    l2 = l2_bound(gamma * c, length)
    return (z * l2) ** 2 / 2.0, l2, l1_bound(l2, length)


def skellam_tail(tau: float, mu: float) -> float:
    """Chernoff bound on ``P(Sk(mu) >= tau)`` for ``tau > 0``: ``exp(2 mu (cosh l - 1) - l tau)``.

    ``E exp(l N) = exp(2 mu (cosh l - 1))`` for ``N = Poisson(mu) - Poisson(mu)``;
    the exponent is smallest at ``l = asinh(tau / (2 mu))``. Rigorous (an upper bound).
    """
    if mu <= 0:
        return 0.0 if tau > 0 else 1.0
    lam = math.asinh(tau / (2.0 * mu))
    return math.exp(min(0.0, 2.0 * mu * (math.cosh(lam) - 1.0) - lam * tau))


def wrap_probability(
    gamma: float, clip_norm: float, length: int, max_sites: int, share: float, bits: int
) -> float:
    """Union bound on ``P(the noised sum of <= n sites leaves [-2^(b-1), 2^(b-1)))`` (module notes).

    The room ``2^(b-1) - 1 - n`` left after the rounding errors is split
    between the data term (Hoeffding) and the noise term (:func:`skellam_tail`,
    both signs) at the best of 256 splits. Increasing in ``gamma`` when
    ``share`` grows with ``gamma^2``, as in :func:`make_params`.
    """
    room = (1 << (bits - 1)) - 1 - max_sites
    if room <= 0:
        return 1.0
    spread = gamma * max_sites * clip_norm / math.sqrt(length)
    noise_mu = max_sites * share
    best = 1.0
    for frac in np.linspace(0.005, 0.995, 256):
        a = float(frac) * room
        data = 2.0 * math.exp(-(a * a) / (2.0 * spread * spread))
        tail = 2.0 * skellam_tail((1.0 - float(frac)) * room, noise_mu)
        best = min(best, length * (data + tail))
    return best


def make_params(
    *,
    dimension: int,
    clip_norm: float,
    bits: int,
    max_sites: int,
    threshold: int,
    noise_multiplier: float,
) -> SkellamParams:
    """The run's Skellam parameters: the largest ``gamma`` whose wrap bound is <= 2^-40.

    ``gamma`` is bisected (log scale, relative 2^-12) below the largest value
    one site's update could fit; the noise target follows from ``z``:
    ``mu = (z Delta_2(gamma))^2 / 2``.

    Raises
    ------
    ConfigurationError
        For values outside their domains, or when no ``gamma`` keeps the
        wrap bound below :data:`WRAP_PROBABILITY` (too few bits for this noise).
    """
    length = padded_length(dimension)
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ConfigurationError(f"clip_norm must be positive, got {clip_norm!r}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 8 <= bits <= 32:
        raise ConfigurationError(f"distributed DP needs 8..32 ring bits, got {bits!r}")
    if isinstance(max_sites, bool) or not isinstance(max_sites, int) or max_sites < 1:
        raise ConfigurationError(f"max_sites must be a positive int, got {max_sites!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold:
        raise ConfigurationError(f"threshold must be a positive int, got {threshold!r}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ConfigurationError(
            f"distributed DP needs a positive noise multiplier, got {noise_multiplier!r}"
        )

    def fits(gamma: float) -> bool:
        mu = _mu_for(noise_multiplier, gamma, clip_norm, length)[0]
        share = mu / threshold
        return (
            wrap_probability(gamma, clip_norm, length, max_sites, share, bits) <= WRAP_PROBABILITY
        )

    # The wrap bound grows with gamma: bisect log gamma between one that fits and one that
    # cannot (a single site's rotated update alone would fill the ring).
    high = float((1 << (bits - 1)) / clip_norm)
    low = high
    while not fits(low):
        low /= 2.0
        if low < 1e-6 / clip_norm:
            low = 0.0
            break
    if low > 0.0:
        while high / low > 1.0 + 2.0**-12:
            mid = math.sqrt(low * high)
            if fits(mid):
                low = mid
            else:
                high = mid
        gamma = low
        mu, l2, l1 = _mu_for(noise_multiplier, gamma, clip_norm, length)
        return SkellamParams(
            dimension=dimension,
            padded=length,
            clip_norm=float(clip_norm),
            bits=bits,
            max_sites=max_sites,
            threshold=threshold,
            noise_multiplier=float(noise_multiplier),
            gamma=gamma,
            l2=l2,
            l1=l1,
            mu=mu,
        )
    raise ConfigurationError(
        f"distributed DP: {bits} ring bits cannot hold the noised sum of {max_sites} sites "
        f"(noise multiplier {noise_multiplier:g}, threshold {threshold}) without wrapping; "
        "use more bits (secagg_bits) or a higher threshold"
    )


def site_share(params: SkellamParams, round_threshold: int) -> float:
    """The Skellam parameter a site adds in a round whose configuration has threshold ``t_r``.

    ``mu / t_r``: the site's honest neighbours refuse to unmask fewer than
    ``t_r`` survivors, so whatever ``t_r`` the coordinator put in the
    configuration, the unmasked sum holds at least ``t_r`` shares, i.e. at
    least ``mu``. ``mu`` comes from the run settings the site holds
    (:func:`make_params`), never from a coordinator's message.

    Raises
    ------
    ConfigurationError
        For a threshold that is not a positive int.
    """
    if isinstance(round_threshold, bool) or not isinstance(round_threshold, int):
        raise ConfigurationError("the round's threshold must be an int")
    if round_threshold < 1:
        raise ConfigurationError(f"the round's threshold must be >= 1, got {round_threshold}")
    return params.mu / round_threshold


def encode_update(
    update: npt.NDArray[np.floating],
    params: SkellamParams,
    key: bytes,
    round_threshold: int,
    rng: ChaCha20Random,
) -> npt.NDArray[np.uint32]:
    """One site's ring vector: rotate, scale, round conditionally, add its noise share, wrap.

    Parameters
    ----------
    update : ndarray
        The site's clipped update, ``d`` coordinates, ``||x||_2 <= c``.
    params : SkellamParams
        The run's parameters (from the site's own run settings).
    key : bytes
        The round's public rotation key (:func:`rotation_key`).
    round_threshold : int
        ``t`` of the round's secure-aggregation configuration.
    rng : ChaCha20Random
        Rounding coins and noise (:func:`common.rng.secure_generator`).

    Raises
    ------
    DataError
        For a vector of the wrong length, non-finite or above the clip norm.
    """
    x = np.asarray(update, dtype=np.float64)
    if x.shape != (params.dimension,):
        raise DataError(f"update shape {x.shape} != ({params.dimension},)")
    if not np.all(np.isfinite(x)):
        raise DataError("the update holds NaN or infinite values")
    norm = float(np.linalg.norm(x))
    if norm > params.clip_norm * (1 + 1e-6):
        raise DataError(f"update norm {norm:.6g} exceeds the clip norm {params.clip_norm}")
    z = rotate(x, key)
    z *= params.gamma
    limit = params.gamma * params.clip_norm
    scaled = float(np.linalg.norm(z))
    if scaled > limit:  # float error of the rotation: back onto the sphere
        z *= limit / scaled * (1 - 2.0**-50)
    q = conditional_round(z, params.l2, rng)
    q += sample_skellam(site_share(params, round_threshold), params.padded, rng)
    return to_ring(q, params.bits)


def decode_sum(sum_int: IntArray, params: SkellamParams, key: bytes) -> FloatArray:
    """The server's estimate of the sum of updates: ``unrotate(S / gamma)`` (no noise added).

    ``sum_int`` is the unmasked ring sum read as signed integers (``d'`` of them).
    """
    values = np.asarray(sum_int)
    if values.shape != (params.padded,):
        raise DataError(f"the unmasked sum has shape {values.shape}, not ({params.padded},)")
    return unrotate(values.astype(np.float64) / params.gamma, key, params.dimension)
