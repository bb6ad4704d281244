from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common.dp.clipping import clip_l2, l2_norm
from common.errors import ConfigurationError, DataError

finite_floats = st.floats(allow_nan=False, allow_infinity=False, width=64)
clip_norms = st.floats(min_value=1e-300, max_value=1e300, allow_nan=False)
dtypes = st.sampled_from([np.float16, np.float32, np.float64])


@st.composite
def arrays_any_shape(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(dtypes)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6))
    elements = st.floats(allow_nan=False, allow_infinity=False, width=np.dtype(dtype).itemsize * 8)
    return draw(hnp.arrays(dtype, shape, elements=elements))


def _norm64(arrays: list[np.ndarray]) -> float:
    return l2_norm(arrays)


@settings(max_examples=300, deadline=None)
@given(x=arrays_any_shape(), c=clip_norms)
def test_clip_l2_any_shape_norm_at_most_c(x: np.ndarray, c: float) -> None:
    before = x.copy()
    clipped, original = clip_l2(x, c)
    assert clipped.shape == x.shape and clipped.dtype == x.dtype
    assert _norm64([clipped]) <= c
    np.testing.assert_array_equal(x, before)  # never mutated
    if original <= c:
        np.testing.assert_array_equal(clipped, x)


@settings(max_examples=200, deadline=None)
@given(xs=st.lists(arrays_any_shape(), min_size=0, max_size=4), c=clip_norms)
def test_clip_l2_list_joint_norm_at_most_c(xs: list[np.ndarray], c: float) -> None:
    clipped, _ = clip_l2(xs, c)
    assert len(clipped) == len(xs)
    assert [a.shape for a in clipped] == [a.shape for a in xs]
    assert _norm64(clipped) <= c


@settings(max_examples=100, deadline=None)
@given(
    scale=st.sampled_from([1e-320, 1e-200, 1e-30, 1.0, 1e30, 1e200, 1e307]),
    n=st.integers(1, 50),
    c=clip_norms,
)
def test_clip_l2_huge_and_tiny_norms_at_most_c(scale: float, n: int, c: float) -> None:
    x = np.full(n, scale)
    clipped, original = clip_l2(x, c)
    assert _norm64([clipped]) <= c
    assert original == pytest.approx(scale * math.sqrt(n), rel=1e-12) or math.isinf(original)


def test_clip_l2_overflowing_norm_still_clipped_in_direction() -> None:
    x = [np.full(4, 1e308), np.array(3.0)]
    clipped, original = clip_l2(x, 2.0)
    assert math.isinf(original)
    np.testing.assert_allclose(clipped[0], np.ones(4), rtol=1e-12)
    assert _norm64(clipped) <= 2.0


def test_clip_l2_zero_d_array_scaled_to_c() -> None:
    clipped, original = clip_l2(np.array(-5.0), 2.0)
    assert clipped.shape == () and float(clipped) == pytest.approx(-2.0)
    assert original == 5.0


def test_clip_l2_zero_update_returns_zero_copy() -> None:
    x = np.zeros((3, 2), dtype=np.float32)
    clipped, original = clip_l2(x, 1.0)
    assert original == 0.0 and clipped is not x
    np.testing.assert_array_equal(clipped, x)


def test_clip_l2_empty_inputs_return_empty() -> None:
    clipped, original = clip_l2(np.zeros((0, 3)), 1.0)
    assert clipped.shape == (0, 3) and original == 0.0
    clipped_list, original = clip_l2([], 1.0)
    assert clipped_list == [] and original == 0.0


def test_clip_l2_scales_by_c_over_norm_exactly() -> None:
    x = [np.array([3.0, 0.0]), np.array([[4.0]])]
    clipped, original = clip_l2(x, 1.0)
    assert original == 5.0
    np.testing.assert_allclose(clipped[0], [0.6, 0.0])
    np.testing.assert_allclose(clipped[1], [[0.8]])


def test_clip_l2_integer_input_returns_float64() -> None:
    clipped, _ = clip_l2(np.array([3, 4]), 1.0)
    assert clipped.dtype == np.float64


@pytest.mark.parametrize("c", [0.0, -1.0, math.inf, math.nan, True])
def test_clip_l2_invalid_clip_norm_raises(c: float) -> None:
    with pytest.raises(ConfigurationError):
        clip_l2(np.ones(3), c)


@pytest.mark.parametrize("bad", [np.array([1.0, np.nan]), np.array([np.inf]), np.array(["a"])])
def test_clip_l2_non_finite_or_non_numeric_raises(bad: np.ndarray) -> None:
    with pytest.raises(DataError):
        clip_l2(bad, 1.0)


def _reference_norm(arrays: list[np.ndarray]) -> float:
    """Independent of the module: exact squares of float16/32 values, summed with fsum."""
    return math.sqrt(math.fsum(float(v) ** 2 for a in arrays for v in a.astype(np.float64).ravel()))


@settings(max_examples=200, deadline=None)
@given(
    xs=st.lists(
        st.sampled_from([np.float16, np.float32]).flatmap(
            lambda dt: hnp.arrays(
                dt,
                hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=40),
                elements=st.floats(
                    allow_nan=False, allow_infinity=False, width=np.dtype(dt).itemsize * 8
                ),
            )
        ),
        min_size=1,
        max_size=3,
    ),
    c=st.floats(min_value=1e-6, max_value=1e6),
)
def test_narrow_norm_matches_exact_reference_and_clip_holds(xs: list[np.ndarray], c: float) -> None:
    reference = _reference_norm(xs)
    assert math.isclose(l2_norm(xs), reference, rel_tol=1e-12, abs_tol=0.0)
    clipped, original = clip_l2(xs, c)
    assert math.isclose(original, reference, rel_tol=1e-12, abs_tol=0.0)
    assert _reference_norm(clipped) <= c * (1 + 1e-12)
    assert all(a.dtype == b.dtype and a.shape == b.shape for a, b in zip(clipped, xs, strict=True))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_narrow_non_finite_anywhere_raises(dtype: type, bad: float) -> None:
    x = np.full(100_003, 0.5, dtype=dtype)  # several chunks; the bad value is in a late one
    x[70_001] = bad
    with pytest.raises(DataError):
        clip_l2(x, 1.0)
    with pytest.raises(DataError):
        l2_norm([np.ones(3, dtype=dtype), x])
