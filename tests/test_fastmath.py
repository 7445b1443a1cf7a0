"""Accuracy of the vectorizable exp and log1p of fastloss/_kernels/fastmath.h.

The reference is NumPy in float64 for float32 results (exact to far below
one float32 ulp), and mpmath at 80 bits for float64 results, sampled.
"""

import numpy as np
import pytest

from fastloss._kernels import _fastmath

try:
    import mpmath
except ImportError:  # pragma: no cover - mpmath is an optional test dependency
    mpmath = None

needs_mpmath = pytest.mark.skipif(mpmath is None, reason="mpmath is not installed")

MAX_ULP = 2.0


def fast_exp(x):
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    _fastmath.exp(x, out)
    return out


def fast_log1p(x):
    x = np.ascontiguousarray(x, dtype=np.float64)
    out = np.empty_like(x)
    _fastmath.log1p(x, out)
    return out


def ulp_error(got, exact, dtype):
    """Return |got - exact| in units of the spacing of ``exact`` in ``dtype``."""
    spacing = np.spacing(np.abs(exact).astype(dtype)).astype(np.float64)
    return np.abs(got.astype(np.float64) - exact) / spacing


def mp_reference(func, x):
    with mpmath.workprec(80):
        return np.array([float(func(mpmath.mpf(float(v)))) for v in x])


def test_expf_whole_range_within_2_ulp(rng):
    # Every float32 result that is finite and nonzero, subnormals included.
    x = np.concatenate([
        np.linspace(-103.9, 88.72, 1_000_001, dtype=np.float32),
        rng.uniform(-103.9, 88.72, 200_000).astype(np.float32),
        rng.uniform(-1.0, 1.0, 100_000).astype(np.float32),
    ])
    exact = np.exp(x.astype(np.float64))
    error = ulp_error(fast_exp(x), exact, np.float32)
    assert error.max() <= MAX_ULP


@needs_mpmath
def test_exp_whole_range_within_2_ulp(rng):
    x = np.concatenate([
        np.linspace(-745.0, 709.78, 1001),
        rng.uniform(-745.0, 709.78, 1500),
        rng.uniform(-1.0, 1.0, 500),
        np.linspace(-708.5, -708.3, 21),  # normal to subnormal
    ])
    exact = mp_reference(mpmath.exp, x)
    error = ulp_error(fast_exp(x), exact, np.float64)
    assert error.max() <= MAX_ULP


def test_exp_matches_numpy_in_bulk(rng):
    # A looser bound against np.exp, which has rounding errors of its own,
    # over many more points than the mpmath sample.
    x = rng.uniform(-745.0, 709.78, 1_000_000)
    error = ulp_error(fast_exp(x), np.exp(x), np.float64)
    assert error.max() <= MAX_ULP + 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_edge_values(dtype):
    info = np.finfo(dtype)
    x = np.array([0.0, -0.0, np.inf, -np.inf, 1e4, -1e4, info.max, -info.max,
                  info.tiny, -info.tiny, 1e-30], dtype)
    expected = np.array([1.0, 1.0, np.inf, 0.0, np.inf, 0.0, np.inf, 0.0,
                         1.0, 1.0, 1.0], dtype)
    got = fast_exp(x)
    np.testing.assert_array_equal(got, expected)
    assert np.isnan(fast_exp(np.array([np.nan], dtype)))[0]
    assert np.signbit(got).sum() == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_overflow_and_underflow_thresholds(dtype):
    # The largest input with a finite result, and the first one past it.
    big = np.log(np.finfo(dtype).max, dtype=np.float64)
    last_finite = np.nextafter(dtype(big), dtype(0))
    assert np.isfinite(fast_exp(np.array([last_finite], dtype)))[0]
    assert fast_exp(np.array([np.nextafter(dtype(big), dtype(np.inf))], dtype))[0] == np.inf
    # Below log of half the smallest subnormal the result is +0.
    smallest = np.finfo(dtype).smallest_subnormal
    tiny = np.log(np.float64(smallest)) - np.log(2.0)
    assert fast_exp(np.array([tiny - 0.01], dtype))[0] == 0.0
    assert fast_exp(np.array([np.log(np.float64(smallest)) + 0.01], dtype))[0] > 0.0


def test_exp_contiguous_and_vectorized_lanes_agree(rng):
    # The same value at every position of a long array gives the same result
    # as alone, so the vector loop and its scalar remainder agree.
    x = rng.uniform(-50, 50, 37)
    alone = np.array([fast_exp(np.array([v]))[0] for v in x])
    np.testing.assert_array_equal(fast_exp(x), alone)


def fast_exp_nonpos(x):
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    _fastmath.exp_nonpos(x, out)
    return out


# log of the smallest normal number, below which exp_nonpos returns 0.
MIN_NORMAL_LOG = {np.float32: np.log(2.0**-126), np.float64: np.log(2.0**-1022)}


def test_expf_nonpos_within_2_ulp(rng):
    # Every float32 input from the smallest normal result up to 0.
    x = np.concatenate([
        np.linspace(-87.3365, 0.0, 1_000_001, dtype=np.float32),
        rng.uniform(-87.3365, 0.0, 200_000).astype(np.float32),
        rng.uniform(-1.0, 0.0, 100_000).astype(np.float32),
    ])
    exact = np.exp(x.astype(np.float64))
    error = ulp_error(fast_exp_nonpos(x), exact, np.float32)
    assert error.max() <= MAX_ULP


@needs_mpmath
def test_exp_nonpos_within_2_ulp(rng):
    x = np.concatenate([
        np.linspace(-708.39, 0.0, 1001),
        rng.uniform(-708.39, 0.0, 1500),
        rng.uniform(-1.0, 0.0, 500),
    ])
    exact = mp_reference(mpmath.exp, x)
    error = ulp_error(fast_exp_nonpos(x), exact, np.float64)
    assert error.max() <= MAX_ULP


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_nonpos_matches_exp_above_cutoff(rng, dtype):
    # Where the result is normal, both functions round the same product.
    x = rng.uniform(MIN_NORMAL_LOG[dtype] + 1e-3, 0.0, 100_000).astype(dtype)
    np.testing.assert_array_equal(fast_exp_nonpos(x), fast_exp(x))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_nonpos_edge_values(dtype):
    info = np.finfo(dtype)
    cutoff = MIN_NORMAL_LOG[dtype]
    x = np.array([0.0, -0.0, -np.inf, -1e4, -info.max, -info.tiny, cutoff - 1e-3,
                  cutoff - 5.0, cutoff + 1e-3], dtype)
    got = fast_exp_nonpos(x)
    np.testing.assert_array_equal(got[:7], [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    assert got[7] == 0.0
    assert got[8] >= info.tiny
    assert np.signbit(got).sum() == 0
    assert np.isnan(fast_exp_nonpos(np.array([np.nan], dtype)))[0]


@needs_mpmath
def test_log1p_within_2_ulp(rng):
    x = np.concatenate([
        np.logspace(-300, 300, 1201),
        rng.uniform(0.0, 10.0, 1000),
        rng.uniform(-0.999, 0.0, 500),
        rng.uniform(0.0, 1e-8, 200),
        np.array([np.sqrt(0.5) - 1, np.sqrt(2.0) - 1, 1.0, 2.0**52, 2.0**53]),
    ])
    exact = mp_reference(mpmath.log1p, x)
    error = ulp_error(fast_log1p(x), exact, np.float64)
    assert error.max() <= MAX_ULP


def test_log1p_matches_numpy_in_bulk(rng):
    x = np.concatenate([rng.exponential(5.0, 500_000), rng.uniform(-1, 0, 100_000)])
    x = x[x > -1.0]
    error = ulp_error(fast_log1p(x), np.log1p(x), np.float64)
    assert error.max() <= MAX_ULP + 1.0


def test_log1p_edge_values():
    got = fast_log1p(np.array([0.0, -0.0, np.inf, -1.0, 5e-324, 1e308, np.finfo(float).max]))
    assert got[0] == 0.0
    assert got[1] == 0.0
    assert got[2] == np.inf
    assert got[3] == -np.inf
    assert got[4] == 5e-324
    np.testing.assert_allclose(got[5:], np.log1p([1e308, np.finfo(float).max]), rtol=1e-15)
    assert np.all(np.isnan(fast_log1p(np.array([np.nan, -2.0, -np.inf]))))


def fast_log1pf(x):
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    _fastmath.log1pf(x, out)
    return out


def test_log1pf_within_2_ulp(rng):
    # float64 NumPy is exact far below one float32 ulp.
    x = np.concatenate([
        np.logspace(-44, 38, 100_001).astype(np.float32),
        rng.uniform(0.0, 10.0, 200_000).astype(np.float32),
        rng.uniform(-0.9999, 0.0, 100_000).astype(np.float32),
        rng.uniform(0.0, 1e-6, 10_000).astype(np.float32),
        np.linspace(0.0, 1.0, 100_001, dtype=np.float32),
        np.array([np.sqrt(0.5) - 1, np.sqrt(2.0) - 1, 1.0, 2.0**23, 2.0**24], np.float32),
    ])
    exact = np.log1p(x.astype(np.float64))
    error = ulp_error(fast_log1pf(x), exact, np.float32)
    assert error.max() <= MAX_ULP


def test_log1pf_edge_values():
    tiny = np.float32(1e-45)
    huge = np.finfo(np.float32).max
    got = fast_log1pf(np.array([0.0, -0.0, np.inf, -1.0, tiny, huge], np.float32))
    assert got[0] == 0.0
    assert got[1] == 0.0
    assert got[2] == np.inf
    assert got[3] == -np.inf
    assert got[4] == tiny
    np.testing.assert_allclose(got[5], np.log1p(np.float64(huge)), rtol=2e-7)
    assert np.all(np.isnan(fast_log1pf(np.array([np.nan, -2.0, -np.inf], np.float32))))
