"""Verified, error-tolerant Shamir reconstruction (common.crypto.shamir.reconstruct_verified)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.crypto import shamir
from common.crypto.shamir import PRIME, Share, reconstruct_verified, split_secret
from common.errors import ConfigurationError, ProtocolAbort

SECRET = bytes(range(1, 33))


def _is(secret: bytes) -> Callable[[bytes], bool]:
    def verify(candidate: bytes) -> bool:
        return candidate == secret

    return verify


def _wrong(share: Share, delta: int = 1) -> Share:
    return Share(share.index, (share.value + delta) % PRIME)


def _polynomial(coefficients: list[int]) -> Callable[[int], int]:
    def f(x: int) -> int:
        return sum(c * pow(x, i, PRIME) for i, c in enumerate(coefficients)) % PRIME

    return f


def test_reconstruct_verified_honest_shares_one_attempt_nobody_named() -> None:
    shares = split_secret(SECRET, threshold=3, indices=[1, 2, 3, 4, 5])
    found = reconstruct_verified(shares, threshold=3, verify=_is(SECRET))
    assert found == shamir.Reconstruction(SECRET, (), True, 1)


def test_reconstruct_verified_wrong_share_first_outvoted_and_named() -> None:
    shares = list(split_secret(SECRET, threshold=4, indices=[3, 5, 8, 9, 12, 20]))
    shares[0] = _wrong(shares[0])
    found = reconstruct_verified(shares, threshold=4, verify=_is(SECRET))
    assert found.secret == SECRET
    assert found.inconsistent == (3,) and found.attributed
    assert 1 < found.attempts <= 4 + 1  # one liar costs at most t extra subsets
    # unchecked reconstruction from the same shares is silently wrong
    assert shamir.combine_shares(shares, threshold=4) != SECRET


def test_reconstruct_verified_wrong_share_outside_first_subset_still_named() -> None:
    shares = list(split_secret(SECRET, threshold=3, indices=[1, 2, 3, 4, 5]))
    shares[4] = _wrong(shares[4], delta=2**300)
    found = reconstruct_verified(shares, threshold=3, verify=_is(SECRET))
    assert found == shamir.Reconstruction(SECRET, (5,), True, 1)


def test_reconstruct_verified_too_many_wrong_shares_aborts() -> None:
    shares = list(split_secret(SECRET, threshold=3, indices=[1, 2, 3, 4]))
    shares[0], shares[3] = _wrong(shares[0]), _wrong(shares[3])  # 2 honest < t
    with pytest.raises(ProtocolAbort, match="verifiable"):
        reconstruct_verified(shares, threshold=3, verify=_is(SECRET))


def test_reconstruct_verified_attempt_budget_bounds_the_search() -> None:
    shares = list(split_secret(SECRET, threshold=3, indices=[1, 2, 3, 4, 5]))
    shares[0] = _wrong(shares[0])
    with pytest.raises(ProtocolAbort, match="1 subsets tried"):
        reconstruct_verified(shares, threshold=3, verify=_is(SECRET), max_attempts=1)
    with pytest.raises(ConfigurationError):
        reconstruct_verified(shares, threshold=3, verify=_is(SECRET), max_attempts=0)


def test_reconstruct_verified_fewer_than_threshold_aborts() -> None:
    shares = split_secret(SECRET, threshold=3, indices=[1, 2, 3])
    with pytest.raises(ProtocolAbort):
        reconstruct_verified(shares[:2], threshold=3, verify=_is(SECRET))


def _colluding(m: int) -> tuple[list[Share], int]:
    """t = 3 shares of SECRET at 1..m; holders 1 and 2 collude and know their true shares.

    They add delta(x) = x (x - 3): delta(0) = 0, so the polynomial through their
    shares and holder 3's share still opens to SECRET.
    """
    f = _polynomial([int.from_bytes(SECRET, "big"), 12345, 67890])
    shares = [Share(x, f(x)) for x in range(1, m + 1)]
    for i in (0, 1):
        x = shares[i].index
        shares[i] = Share(x, (shares[i].value + x * (x - 3)) % PRIME)
    return shares, 3


def test_reconstruct_verified_colluders_second_polynomial_dealers_wins_with_honest_majority() -> (
    None
):
    shares, t = _colluding(7)  # 2 liars <= (m - t + 1) / 2 = 2.5
    # the colluders' subset {1, 2, 3} verifies first but explains only 3 of 7 shares
    found = reconstruct_verified(shares, threshold=t, verify=_is(SECRET))
    assert found.secret == SECRET
    assert found.inconsistent == (1, 2) and found.attributed
    assert found.attempts > 1


def test_reconstruct_verified_colluders_without_majority_secret_right_nobody_named() -> None:
    shares, t = _colluding(5)  # dealer's and colluders' polynomials each explain 3 of 5
    found = reconstruct_verified(shares, threshold=t, verify=_is(SECRET))
    assert found.secret == SECRET
    assert found.inconsistent == () and not found.attributed


@settings(max_examples=40, deadline=None)
@given(
    t=st.integers(1, 6),
    extra=st.integers(1, 4),
    liars=st.data(),
    secret=st.binary(min_size=32, max_size=32),
)
def test_reconstruct_verified_any_liars_within_bound_exactly_named(
    t: int, extra: int, liars: st.DataObject, secret: bytes
) -> None:
    m = t + extra
    indices = liars.draw(st.lists(st.integers(1, 2**32 - 1), min_size=m, max_size=m, unique=True))
    shares = list(split_secret(secret, threshold=t, indices=indices))
    # independent (non-colluding) wrong shares, at most min(extra, (m - t + 1) // 2)
    bad = liars.draw(st.sets(st.integers(0, m - 1), max_size=min(extra, (m - t + 1) // 2)))
    for i in bad:
        shares[i] = _wrong(shares[i], liars.draw(st.integers(1, PRIME - 1)))
    found = reconstruct_verified(shares, threshold=t, verify=_is(secret))
    assert found.secret == secret
    assert found.attributed
    assert found.inconsistent == tuple(sorted(indices[i] for i in bad))
