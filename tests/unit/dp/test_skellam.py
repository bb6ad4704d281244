"""The distributed Skellam mechanism: rotation, rounding bound, noise, ring, accountant."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.linalg import hadamard
from scipy.special import logsumexp

from common.dp import skellam as sk
from common.dp import skellam_accounting as acc
from common.errors import ConfigurationError
from common.rng import ChaCha20Random
from common.secagg.quantize import lift_signed


def _rng(tag: int) -> ChaCha20Random:
    return ChaCha20Random(tag.to_bytes(32, "little"))


@pytest.mark.parametrize("d", [1, 7, 64, 1000])
def test_rotation_inverts_and_keeps_the_norm(d: int) -> None:
    x = np.random.default_rng(d).normal(size=d)
    key = sk.rotation_key(b"round 1")
    y = sk.rotate(x, key)
    assert y.size == sk.padded_length(d)
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    assert np.allclose(sk.unrotate(y, key, d), x, atol=1e-12)
    if d > 4:  # a new round gets new signs
        assert not np.allclose(sk.rotate(x, sk.rotation_key(b"round 2")), y)


def test_fwht_is_the_hadamard_matrix() -> None:
    x = np.random.default_rng(1).normal(size=32)
    assert np.allclose(sk.fwht(x), hadamard(32) @ x)


def test_conditional_rounding_keeps_the_proved_bound_on_the_worst_input() -> None:
    # Every coordinate just above an integer: plain rounding goes up everywhere with
    # probability near 1 -- the case the deterministic bound is approached by.
    length = 256
    z = np.full(length, 0.999)
    scaled = float(np.linalg.norm(z))
    bound = sk.l2_bound(scaled, length)
    rng = _rng(2)
    for _ in range(50):
        q = sk.conditional_round(z, bound, rng)
        assert float(np.linalg.norm(q)) <= bound
        assert np.all(np.abs(q - z) < 1)
    # A bound too small for any rounding is refused, not silently broken.
    with pytest.raises(Exception, match="conditional rounding"):
        sk.conditional_round(np.full(length, 0.5), 1.0, rng)


def test_conditional_rounding_is_nearly_unbiased_on_a_typical_input() -> None:
    rng = _rng(3)
    z = np.random.default_rng(3).normal(size=4096) * 20
    bound = sk.l2_bound(float(np.linalg.norm(z)), z.size)
    mean = np.mean([sk.conditional_round(z, bound, rng) for _ in range(20)], axis=0)
    assert abs(float(np.mean(mean - z))) < 0.02


@pytest.mark.parametrize("mu", [0.2, 7.0, 5e3, 2e7])
def test_poisson_inversion_is_scipys_quantile(mu: float) -> None:
    u = _rng(4).random(3000) + 2.0**-54
    u[:2] = [2.0**-54, 1 - 2.0**-54]
    assert np.array_equal(sk.poisson_inverse_cdf(u.copy(), mu), stats.poisson.ppf(u, mu))


def test_skellam_noise_needs_the_cipher_generator() -> None:
    with pytest.raises(ConfigurationError, match="ChaCha20Random"):
        sk.sample_skellam(1.0, 4, np.random.default_rng(0))  # type: ignore[arg-type]


def _params(**kw: object) -> sk.SkellamParams:
    base: dict[str, object] = dict(
        dimension=3000, clip_norm=1.0, bits=18, max_sites=8, threshold=4, noise_multiplier=0.8
    )
    base.update(kw)
    return sk.make_params(**base)  # type: ignore[arg-type]


def _ring_sum(rings: list[np.ndarray], bits: int) -> np.ndarray:
    total = np.zeros(rings[0].size, dtype=np.uint64)
    for r in rings:
        total += r
    return lift_signed((total & np.uint64((1 << bits) - 1)).astype(np.uint32), bits)


@pytest.mark.parametrize("survivors", ["threshold", "all"])
def test_echo_noise_variance_matches_the_claim(survivors: str) -> None:
    """Zero updates from m sites over many rounds: the decoded sum is pure noise of
    variance 2 m mu_s / gamma^2 per coordinate (model units), within a 4-sigma interval."""
    p = _params()
    m = p.threshold if survivors == "threshold" else p.max_sites
    rng = _rng(5)
    samples = []
    for r in range(6):
        key = sk.rotation_key(f"echo {r}".encode())
        rings = [
            sk.encode_update(np.zeros(p.dimension), p, key, p.threshold, rng) for _ in range(m)
        ]
        samples.append(sk.decode_sum(_ring_sum(rings, p.bits), p, key))
    noise = np.concatenate(samples)
    claim = p.noise_std(m) ** 2
    n = noise.size
    # sample variance of n draws: std var * sqrt(2 / n) (+ the tiny excess kurtosis of Skellam)
    assert abs(float(np.var(noise)) - claim) <= 4 * claim * math.sqrt(2.0 / n)
    assert claim >= p.noise_std(p.threshold) ** 2 * (1 - 1e-12)  # never below the target


def test_decoded_sum_of_real_updates_is_unbiased_and_exact_in_the_ring() -> None:
    p = _params(noise_multiplier=0.05)
    gen = np.random.default_rng(6)
    updates = [gen.normal(size=p.dimension) for _ in range(p.max_sites)]
    updates = [u / np.linalg.norm(u) * 0.9 for u in updates]
    key = sk.rotation_key(b"sum")
    rng = _rng(6)
    rings = [sk.encode_update(u, p, key, p.threshold, rng) for u in updates]
    decoded = sk.decode_sum(_ring_sum(rings, p.bits), p, key)
    error = decoded - np.sum(updates, axis=0)
    # rounding (< 1 per site) + noise, both / gamma: a few of their std per coordinate
    scale = math.sqrt(p.noise_std(p.max_sites) ** 2 + p.max_sites / (4 * p.gamma**2))
    assert float(np.max(np.abs(error))) < 7 * scale
    assert abs(float(np.mean(error))) < 5 * scale / math.sqrt(error.size)


def test_ring_wraps_negative_values_and_the_wrap_bound_holds() -> None:
    q = np.array([-3, -1, 0, 1, 2**17 - 1, -(2**17)])
    assert np.array_equal(lift_signed(sk.to_ring(q, 18), 18), q)
    p = _params()
    bound = sk.wrap_probability(p.gamma, 1.0, p.padded, p.max_sites, p.share, p.bits)
    assert bound <= sk.WRAP_PROBABILITY
    # and gamma is the largest one (to the bisection's tolerance) that keeps the bound
    bigger = p.gamma * 1.01
    mu = (p.noise_multiplier * sk.l2_bound(bigger, p.padded)) ** 2 / 2
    assert (
        sk.wrap_probability(bigger, 1.0, p.padded, p.max_sites, mu / p.threshold, p.bits)
        > sk.WRAP_PROBABILITY
    )


def test_too_few_bits_for_the_noise_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="ring bits"):
        _params(bits=8, max_sites=200, threshold=2, noise_multiplier=5.0)


def test_skellam_tail_bound_dominates_scipy() -> None:
    for mu in (3.0, 200.0):
        for tau in (5, 40, 120):
            assert sk.skellam_tail(tau, mu) >= float(stats.skellam.sf(tau - 1, mu, mu))


# ------------------------------------------------------------------ accountant
def _exact_rdp(alpha: int, mu: float, shift: np.ndarray, q: float = 1.0) -> float:
    """Exact D_alpha(M(x) || M(0)) and the reverse, maximised, of Sk(mu) per coordinate
    shifted by ``shift`` (Poisson-mixed with rate q); coordinates add for q = 1."""
    span = int(12 * math.sqrt(2 * mu) + np.max(np.abs(shift)) + 40)
    k = np.arange(-span, span + 1)
    base = stats.skellam.logpmf(k, mu, mu)

    def div(logp: np.ndarray, logr: np.ndarray) -> float:
        return float(logsumexp(alpha * logp + (1 - alpha) * logr)) / (alpha - 1)

    if q == 1.0:
        total = 0.0
        for v in shift:
            moved = stats.skellam.logpmf(k - v, mu, mu)
            total += max(div(moved, base), div(base, moved))
        return total
    (v,) = shift
    moved = stats.skellam.logpmf(k - v, mu, mu)
    mix = np.logaddexp(math.log1p(-q) + base, math.log(q) + moved)
    return max(div(mix, base), div(base, mix))


@pytest.mark.parametrize(
    ("mu", "shift"),
    [(30.0, [4]), (400.0, [15]), (60.0, [3, -2, 1, 1]), (2.0, [1])],
)
def test_skellam_rdp_bounds_the_exact_divergence(mu: float, shift: list[int]) -> None:
    v = np.array(shift, dtype=float)
    l2, l1 = float(np.linalg.norm(v)), float(np.sum(np.abs(v)))
    for alpha in (2, 3, 5, 8, 12, 20, 32, 48, 64):
        bound = acc.skellam_rdp(alpha, mu, l2, l1)
        exact = _exact_rdp(alpha, mu, v)
        assert bound >= exact * (1 - 1e-9), (alpha, bound, exact)


def test_skellam_rdp_is_within_5_percent_at_the_orders_that_decide_epsilon() -> None:
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    mu, v = 400.0, np.array([15.0])
    rounds, delta = 20, 1e-5
    curve = [rounds * acc.skellam_rdp(a, mu, 15.0, 15.0) for a in acc.ORDERS]
    _, best = compute_epsilon(list(acc.ORDERS), curve, delta)
    best = int(best)
    for alpha in (max(2, best - 1), best, best + 1):
        bound = acc.skellam_rdp(alpha, mu, 15.0, 15.0)
        exact = _exact_rdp(alpha, mu, v)
        assert exact <= bound <= 1.05 * exact, (alpha, bound, exact)


def test_subsampled_rdp_bounds_the_exact_mixture_divergence() -> None:
    mu, shift, q = 50.0, 10, 0.1
    top = 40
    base = [acc.skellam_rdp(a, mu, float(shift), float(shift)) for a in range(2, top + 1)]
    for alpha in (2, 3, 6, 10, 20, 40):
        bound = acc.subsampled_rdp(alpha, q, base)
        exact = _exact_rdp(alpha, mu, np.array([float(shift)]), q)
        assert exact * (1 - 1e-9) <= bound <= base[alpha - 2], (alpha, bound, exact)


def test_epsilon_composes_and_amplifies() -> None:
    event = acc.SkellamEvent(mu=2e6, l2=2000.0, l1=4e4)
    one = acc.epsilon_for([event], 1e-5)
    ten = acc.epsilon_for([event] * 10, 1e-5)
    sampled = acc.epsilon_for([acc.SkellamEvent(2e6, 2000.0, 4e4, 0.1)] * 10, 1e-5)
    assert 0 < one < ten and sampled < ten
    # close to the Gaussian of the same variance (2 mu = (z l2)^2, z = 1): analytic-ish check
    from common.dp.accounting import epsilon_for as gaussian_epsilon
    from common.dp.events import PrivacyEvent, PrivacyLevel

    z = math.sqrt(2 * 2e6) / 2000.0
    g = gaussian_epsilon([PrivacyEvent(z, 1.0, 10, PrivacyLevel.CLIENT)], 1e-5, "rdp")
    assert ten == pytest.approx(g, rel=0.1)
    assert acc.epsilon_for([], 1e-5) == 0.0
