"""Distributed DP at the coordinator: no server noise, survivors' noise accounted, sites not fooled."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from common.config import RunConfig
from common.dp import skellam as sk
from common.dp.distributed import calibrate_run_noise, check_run_noise, run_params
from common.errors import ConfigurationError
from common.rng import ChaCha20Random
from common.secagg.quantize import lift_signed
from server.aggregation.base import Aggregate, RoundInput
from server.distributed import DistributedDP

D = 500
CFG = RunConfig(num_sites=6, rounds=3, distributed_dp=True, secagg_bits=20, clip_norm=1.0)


def _unmasked_sum(params: sk.SkellamParams, key: bytes, updates: list[np.ndarray], t: int) -> Any:
    rng = ChaCha20Random(bytes(31) + b"\x07")
    total = np.zeros(params.padded, dtype=np.uint64)
    for u in updates:
        total += sk.encode_update(u, params, key, t, rng)
    ring = (total & np.uint64((1 << params.bits) - 1)).astype(np.uint32)
    return lift_signed(ring, params.bits)


class _FakeSecure:
    """Stands in for the secure aggregator: hands over a sum the sites already noised."""

    clipped_to = 1.0

    def __init__(self, sum_int: Any, config: bytes, threshold: int, reported: list[int]) -> None:
        self.result = (sum_int, config, threshold)
        self.reported = reported

    def aggregate(self, round_input: RoundInput, exchange: Any) -> Aggregate:
        agg = Aggregate(np.zeros(8), 1.0, list(self.reported), [])
        agg.unmasked = self.result
        return agg


def _updates(m: int) -> list[np.ndarray]:
    gen = np.random.default_rng(1)
    out = [gen.normal(size=D) for _ in range(m)]
    return [u / np.linalg.norm(u) * 0.8 for u in out]


def _forbid(*_: Any, **__: Any) -> Any:
    raise AssertionError("the server drew noise")


def test_the_server_path_draws_no_noise_and_releases_the_decoded_mean(monkeypatch) -> None:
    params = run_params(CFG, D)
    t, key_bytes = 3, b"round config"
    updates = _updates(5)
    sum_int = _unmasked_sum(params, sk.rotation_key(key_bytes), updates, t)
    # Every noise sampler the server could reach raises from here on.
    import common.dp.central as central
    import common.dp.noise as noise
    import server.privacy as privacy

    monkeypatch.setattr(sk, "sample_skellam", _forbid)
    monkeypatch.setattr(central, "add_gaussian_noise", _forbid)
    monkeypatch.setattr(noise, "add_gaussian_noise", _forbid)
    monkeypatch.setattr(privacy, "noise_aggregate", _forbid)
    import common.rng as rng

    public_uniform = ChaCha20Random._uniform

    def only_public(self: ChaCha20Random, count: int) -> Any:
        # the rotation's signs come from a public key; an OS-keyed stream is privacy noise
        if self._fresh_key:
            raise AssertionError("the server drew noise")
        return public_uniform(self, count)

    monkeypatch.setattr(ChaCha20Random, "_uniform", only_public)
    monkeypatch.setattr(ChaCha20Random, "_standard_normal", _forbid)
    monkeypatch.setattr(rng, "secure_generator", _forbid)
    wrapper = DistributedDP(
        _FakeSecure(sum_int, key_bytes, t, [1, 2, 3, 4, 5]), CFG, vector_length=D
    )
    agg = wrapper.aggregate(RoundInput(1, [1, 2, 3, 4, 5], np.zeros(D)), None)  # type: ignore[arg-type]
    assert agg.failure is None and agg.central is not None
    assert agg.central.mechanism == "distributed-skellam"
    expected = np.sum(updates, axis=0) / wrapper.denominator
    error = agg.mean() - expected
    claimed = math.sqrt(2 * 5 * params.mu / t) / params.gamma  # 5 shares of mu / t
    assert agg.central.noise_std == pytest.approx(claimed)
    # the released mean carries exactly the sites' noise (and rounding), no more, no less
    assert float(np.std(error)) == pytest.approx(claimed / wrapper.denominator, rel=0.15)
    assert [e.kind for e in agg.events] == ["distributed_dp_applied"]
    assert agg.events[0].payload["survivors_mu"] == pytest.approx(5 * params.mu / t)


def test_a_coordinator_under_reporting_survivors_gains_no_privacy_and_cannot_go_below_t() -> None:
    params = run_params(CFG, D)
    t, key_bytes = 3, b"round config"
    sum_int = _unmasked_sum(params, sk.rotation_key(key_bytes), _updates(5), t)

    def epsilon(reported: list[int]) -> Any:
        w = DistributedDP(_FakeSecure(sum_int, key_bytes, t, reported), CFG, vector_length=D)
        return w.aggregate(RoundInput(1, [1, 2, 3, 4, 5], np.zeros(D)), None)  # type: ignore[arg-type]

    honest, fewer = epsilon([1, 2, 3, 4, 5]), epsilon([1, 2, 3])
    assert honest.central is not None and fewer.central is not None
    # the claim only gets worse (more epsilon), the noise in the sum is the sites' own
    assert fewer.central.epsilon > honest.central.epsilon
    assert fewer.central.noise_std >= math.sqrt(2 * params.mu) / params.gamma * (1 - 1e-12)
    below = epsilon([1, 2])
    assert below.failure is not None and below.central is None  # fewer than t: not released


def test_sites_refuse_a_noise_multiplier_below_the_runs_own_epsilon_target() -> None:
    calibrated = calibrate_run_noise(CFG.replace(client_epsilon=4.0), D)
    check_run_noise(calibrated, D)  # the honest configuration passes
    lowered = calibrated.replace(noise_multiplier=calibrated.noise_multiplier * 0.8)
    with pytest.raises(ConfigurationError, match="above the run's client_epsilon"):
        check_run_noise(lowered, D)


def test_each_site_adds_mu_over_the_rounds_threshold_so_t_survivors_reach_the_target() -> None:
    params = run_params(CFG, D)
    for t in (1, 2, 5):
        assert t * sk.site_share(params, t) == pytest.approx(params.mu)
    with pytest.raises(ConfigurationError):
        sk.site_share(params, 0)


def test_distributed_dp_needs_secure_aggregation_and_enough_bits() -> None:
    with pytest.raises(ConfigurationError, match="needs secagg"):
        RunConfig(distributed_dp=True, secagg=False)
    with pytest.raises(ConfigurationError, match="secagg_bits"):
        RunConfig(distributed_dp=True, secagg_bits=12)
    assert RunConfig(distributed_dp=True).central_dp  # client-level DP is on


def _site(cfg: RunConfig, floor: float | None) -> Any:
    from types import SimpleNamespace

    policy = (
        None
        if floor is None
        else SimpleNamespace(rounds=SimpleNamespace(min_distributed_noise_multiplier=floor))
    )
    task = SimpleNamespace(parameter_count=lambda: D)
    return SimpleNamespace(cfg=cfg, policy=lambda: policy, task=task)


def test_a_site_refuses_a_coordinators_run_settings_with_too_little_noise() -> None:
    """The run settings come from the coordinator: the site's own floor and their own
    epsilon claim decide, at the keys stage."""
    from client.secure import distributed_noise_refusal

    honest = calibrate_run_noise(CFG.replace(client_epsilon=4.0), D)
    assert distributed_noise_refusal(_site(honest, 0.5)) is None
    # a coordinator asking for less noise than its own epsilon claim
    cheat = honest.replace(noise_multiplier=honest.noise_multiplier * 0.7)
    assert "client_epsilon" in (distributed_noise_refusal(_site(cheat, 0.5)) or "")
    # or dropping the claim and the noise together: the site's floor holds
    bare = CFG.replace(noise_multiplier=0.1)
    assert "floor" in (distributed_noise_refusal(_site(bare, 0.5)) or "")
    assert distributed_noise_refusal(_site(bare, 0.05)) is None
