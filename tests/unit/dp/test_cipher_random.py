"""The ChaCha20 stream's samplers: distribution, independence, no duplicated streams."""

from __future__ import annotations

import copy
import math
import os
import pickle

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from scipy import stats

from common.dp.central import noise_aggregate
from common.dp.noise import add_gaussian_noise
from common.errors import ConfigurationError
from common.rng import ChaCha20Random, secure_generator
from common.secagg.params import make_config
from common.secagg.quantize import lift_signed, quantize

N = 200_000
ALPHA = 1e-6  # false-failure probability of each statistical check
KEY = bytes(range(32))


def test_random_is_the_top_53_bits_of_the_chacha20_keystream() -> None:
    # Known answer against cryptography's cipher directly: no homemade keystream.
    stream = Cipher(algorithms.ChaCha20(KEY, bytes(16)), mode=None).encryptor()
    words = np.frombuffer(stream.update(bytes(8 * 1000)), dtype="<u8")
    expected = (words >> np.uint64(11)).astype(np.float64) * 2.0**-53
    np.testing.assert_array_equal(ChaCha20Random(KEY).random(1000), expected)


def test_draws_do_not_depend_on_how_requests_are_split() -> None:
    whole = ChaCha20Random(KEY).random(20_000)
    parts = ChaCha20Random(KEY)
    pieces = [parts.random(7), parts.random(9000), np.array([parts.random()]), parts.random(10_992)]
    np.testing.assert_array_equal(np.concatenate(pieces), whole)


def test_uniforms_pass_ks_and_have_mean_and_variance_of_u01() -> None:
    u = ChaCha20Random().random(N)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert stats.kstest(u, "uniform").pvalue > ALPHA
    z = stats.norm.ppf(1 - ALPHA / 2)
    assert abs(float(u.mean()) - 0.5) <= z * math.sqrt(1 / 12 / N)
    counts = np.bincount((u * 64).astype(np.int64), minlength=64)
    assert stats.chisquare(counts).pvalue > ALPHA


def test_normals_pass_ks_and_have_calibrated_mean_and_std() -> None:
    x = ChaCha20Random().standard_normal(N)
    assert stats.kstest(x, "norm").pvalue > ALPHA
    z = stats.norm.ppf(1 - ALPHA / 2)
    assert abs(float(x.mean())) <= z / math.sqrt(N)
    lo = stats.chi2.ppf(ALPHA / 2, N - 1) / (N - 1)
    hi = stats.chi2.ppf(1 - ALPHA / 2, N - 1) / (N - 1)
    assert lo <= float(np.var(x, ddof=1)) <= hi
    # Symmetric by construction (separate sign bit), tails cut near 8.3 sigma.
    assert abs(float(np.mean(x > 0)) - 0.5) <= z * 0.5 / math.sqrt(N)
    assert float(np.abs(x).max()) < 8.3


def test_normal_scales_and_shifts_like_numpy() -> None:
    a = ChaCha20Random(KEY).normal(2.0, 3.0, size=(4, 5))
    b = ChaCha20Random(KEY).standard_normal((4, 5))
    assert a.shape == (4, 5)
    np.testing.assert_allclose(a, 2.0 + 3.0 * b, rtol=0, atol=1e-15)
    assert isinstance(ChaCha20Random(KEY).normal(), float)
    assert ChaCha20Random(KEY).normal(0.0, 1.0, size=()).shape == ()
    assert ChaCha20Random(KEY).standard_normal(0).shape == (0,)
    assert ChaCha20Random(KEY).random((2, 0)).shape == (2, 0)


def test_two_fresh_streams_differ_and_one_key_repeats() -> None:
    assert not np.array_equal(ChaCha20Random().random(64), ChaCha20Random().random(64))
    assert not np.array_equal(secure_generator().random(64), secure_generator().random(64))
    np.testing.assert_array_equal(ChaCha20Random(KEY).random(64), ChaCha20Random(KEY).random(64))


def test_random_out_fills_in_place_and_checks_its_argument() -> None:
    out = np.empty(10)
    assert ChaCha20Random(KEY).random(out=out) is out
    np.testing.assert_array_equal(out, ChaCha20Random(KEY).random(10))
    with pytest.raises(ConfigurationError):
        ChaCha20Random().random(out=np.empty(3, dtype=np.float32))
    with pytest.raises(ConfigurationError):
        ChaCha20Random().random(4, out=np.empty(3))


@pytest.mark.parametrize("key", [b"short", bytes(33), "x" * 32])
def test_bad_key_is_refused(key: object) -> None:
    with pytest.raises(ConfigurationError):
        ChaCha20Random(key)  # type: ignore[arg-type]


def test_bad_size_or_scale_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        ChaCha20Random().random(-1)
    with pytest.raises(ConfigurationError):
        ChaCha20Random().normal(0.0, -1.0, size=3)


def test_stream_state_is_never_pickled_or_copied() -> None:
    # A copy would replay the same noise twice (averaging it away).
    rng = ChaCha20Random()
    with pytest.raises(TypeError):
        pickle.dumps(rng)
    with pytest.raises(TypeError):
        copy.deepcopy(rng)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_draws_other_noise_than_its_parent() -> None:
    rng = ChaCha20Random()
    rng.random(3)  # buffer filled before the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report its next draws, then leave at once
        os.close(read)
        os.write(write, rng.random(8).tobytes())
        os._exit(0)
    os.close(write)
    child = np.frombuffer(os.read(read, 64), dtype=np.float64)
    os.close(read)
    os.waitpid(pid, 0)
    assert child.size == 8
    assert not np.array_equal(child, rng.random(8))


def test_central_noise_from_the_stream_has_calibrated_std() -> None:
    result = noise_aggregate(
        [np.zeros(N)],
        denominator=4.0,
        noise_multiplier=1.3,
        sensitivity=0.7,
        rng=secure_generator(),
    )
    expected = 1.3 * 0.7 / 4
    lo = stats.chi2.ppf(ALPHA / 2, N - 1) * expected**2 / (N - 1)
    hi = stats.chi2.ppf(1 - ALPHA / 2, N - 1) * expected**2 / (N - 1)
    assert lo <= float(np.var(result.mean[0], ddof=1)) <= hi
    out = add_gaussian_noise(np.zeros(3, dtype=np.float32), 1.0, ChaCha20Random())
    assert out.dtype == np.float32


def test_rounding_coins_from_the_stream_are_unbiased() -> None:
    config = make_config(
        run_id=1,
        round=1,
        cohort=[10, 11],
        identities=[bytes([1]) * 32, bytes([2]) * 32],
        threshold=1.0,
        value_bound=1.0,
        vector_length=N,
    )
    x = np.full(N, 0.3 / config.scale)
    y = float(x[0] * config.scale)
    frac = y - math.floor(y)
    ups = lift_signed(quantize(x, config, ChaCha20Random()), 32) - math.floor(y)
    assert set(np.unique(ups).tolist()) <= {0, 1}
    sd = math.sqrt(frac * (1 - frac) / N)
    assert abs(float(ups.mean()) - frac) <= stats.norm.ppf(1 - ALPHA / 2) * sd
