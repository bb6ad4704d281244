"""tolerated_dropouts against the protocol itself: that many dropouts complete, worst case.

The start-time check (``fedseal-server start`` refusing a secure run that tolerates no
dropout) rests on :func:`common.secagg.signing.tolerated_dropouts`; these tests run real
in-memory rounds to show the number is neither optimistic nor needlessly low for small
cohorts.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from common.errors import FedsealError
from common.secagg import Stage
from common.secagg.params import resolve_threshold
from common.secagg.signing import tolerated_dropouts
from common.secagg.simulate import federated_config, run_round

D = 4


def _round(n: int, threshold: float, dropped: set[int]) -> bool:
    cohort = list(range(1, n + 1))
    config, keys = federated_config(
        run_id=7, round=1, cohort=cohort, threshold=threshold, value_bound=1.0, vector_length=D
    )
    inputs = {u: np.full(D, 0.25, dtype=np.float64) for u in cohort}
    try:
        result = run_round(
            inputs,
            config,
            {Stage.COLLECT_MASKED: dropped},
            np.random.default_rng(0),
            identities=keys,
        )
    except FedsealError:
        return False
    survivors = [u for u in cohort if u not in dropped]
    np.testing.assert_allclose(result.sum, 0.25 * len(survivors), atol=1e-3)
    return True


@pytest.mark.parametrize("n", [3, 4, 5, 6])
def test_every_dropout_set_of_the_tolerated_size_completes(n: int) -> None:
    t, k = resolve_threshold(0.6, n)
    tolerated = tolerated_dropouts(n, t, k)
    for dropped in itertools.combinations(range(1, n + 1), tolerated):
        assert _round(n, 0.6, set(dropped)), (n, dropped)
    # and the number is tight: some set of one more fails the round
    more = itertools.combinations(range(1, n + 1), tolerated + 1)
    assert any(not _round(n, 0.6, set(d)) for d in more), n


def test_three_sites_tolerate_none_and_one_loss_fails_the_round() -> None:
    t, k = resolve_threshold(0.6, 3)
    assert (t, k) == (2, 2) and tolerated_dropouts(3, t, k) == 0
    assert not _round(3, 0.6, {2})


def test_four_sites_tolerate_one_but_not_two() -> None:
    t, k = resolve_threshold(0.6, 4)
    assert tolerated_dropouts(4, t, k) == 1
    assert all(not _round(4, 0.6, set(d)) for d in itertools.combinations(range(1, 5), 2))


def test_default_threshold_tolerates_a_dropout_whenever_the_cohort_allows_one() -> None:
    """From 4 sites up the defaults lose a site safely; 2 and 3 sites cannot, for any valid t."""
    from common.config import RunConfig

    default = RunConfig().secagg_threshold_value
    for n in range(4, 201):
        assert tolerated_dropouts(n, *resolve_threshold(default, n)) >= 1, n
    for n in (2, 3):
        k = n - 1
        assert all(tolerated_dropouts(n, t, k) == 0 for t in range(k // 2 + 1, k + 1))
