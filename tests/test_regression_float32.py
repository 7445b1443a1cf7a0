"""Tests of the float32 regression kernels: chunk sums in float32, the
chunks recomputed in double, and the vectorized log-cosh.

A float32 kernel sums each chunk of 128 items in float32 and adds the chunk
sums in double. A chunk whose float32 sum is NaN, infinite or below 2**-100,
or that contains a negative weight, and every chunk of a loss parameter outside
[2**-60, 2**60], is recomputed in double. These tests reach both sides of
each of those conditions.
"""

import numpy as np
import pytest

import fastloss as fl
from conftest import THREAD_COUNTS
from test_regression import CASES, CASE_IDS, reference

CHUNK = 128
# Lengths that end a chunk early, exactly, and after one item of the next.
LENGTHS = [1, 15, 16, 17, CHUNK - 1, CHUNK, CHUNK + 1, 4095, 4096, 4097, 70_001]


def _bits(x):
    return np.asarray(x).tobytes()


def _float64_reference(case, pred, target, weight=None, reduction="mean"):
    loss, grad = reference(case, pred, target, weight, reduction)
    return np.float64(loss) if np.ndim(loss) == 0 else loss, grad


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float32_1e7_elements_match_float64(case, reduction):
    rng = np.random.default_rng(7)
    n = 10_000_000
    pred = (2 * rng.standard_normal(n)).astype(np.float32)
    target = (2 * rng.standard_normal(n)).astype(np.float32)
    loss, grad = case(pred, target, reduction=reduction, return_grad=True)
    expected, expected_grad = _float64_reference(case, pred, target,
                                                 reduction=reduction)
    assert type(loss) is np.float32
    # The float32 result itself rounds at 6e-8; the chunk sums add about as
    # much again on random data.
    assert abs(float(loss) - expected) <= 2e-7 * abs(expected)
    scale = np.max(np.abs(expected_grad))
    assert np.max(np.abs(grad - expected_grad)) <= 2e-6 * scale


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float32_contiguous_and_strided_bit_identical(case):
    rng = np.random.default_rng(11)
    for n in LENGTHS:
        pred = (2 * rng.standard_normal(n)).astype(np.float32)
        target = (2 * rng.standard_normal(n)).astype(np.float32)
        # Chunks that take the double path: an overflow, a NaN and a chunk
        # of zero loss.
        if n > 3 * CHUNK:
            pred[5] = 3e30
            pred[CHUNK + 7] = np.nan
            target[2 * CHUNK : 3 * CHUNK] = pred[2 * CHUNK : 3 * CHUNK]
        strided = np.repeat(pred, 2)[::2]
        for reduction in ["mean", "sum", "none"]:
            expected = case(pred, target, reduction=reduction, return_grad=True)
            actual = case(strided, target, reduction=reduction, return_grad=True)
            assert _bits(actual[0]) == _bits(expected[0]), (n, reduction)
            assert _bits(actual[1]) == _bits(expected[1]), (n, reduction)


@pytest.mark.parametrize("layout", ["C", "strided", "weighted"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float32_double_chunks_thread_independent(case, layout):
    rng = np.random.default_rng(13)
    n = 70_001
    pred = (2 * rng.standard_normal(n)).astype(np.float32)
    target = (2 * rng.standard_normal(n)).astype(np.float32)
    pred[::1000] = 3e30
    target[40_000:41_000] = pred[40_000:41_000]
    weight = None
    if layout == "strided":
        pred = np.repeat(pred, 2)[::2]
    elif layout == "weighted":
        weight = rng.uniform(-0.5, 2.0, n).astype(np.float32)
    results = [
        case(pred, target, weight=weight, reduction="sum", return_grad=True,
             n_threads=k)
        for k in THREAD_COUNTS
    ]
    for loss, grad in results[1:]:
        assert _bits(loss) == _bits(results[0][0])
        assert _bits(grad) == _bits(results[0][1])


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_float32_overflowing_squares_sum_in_double(strided):
    # 1e30**2 overflows float32, so the chunks are recomputed in double and
    # the root of the sum is finite again.
    n = 3 * CHUNK + 5
    big = np.full(n, 1e30, np.float32)
    pred = np.repeat(big, 2)[::2] if strided else big
    zero = np.zeros(n, np.float32)
    assert fl.mse_loss(pred, zero, reduction="sum") == np.inf
    expected = np.sqrt(n) * 1e30
    rmse_sum = fl.rmse_loss(pred, zero, reduction="sum")
    assert abs(float(rmse_sum) - expected) <= 1e-6 * expected


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("d", [1e-21, 1e-16], ids=["below-sum-limit", "above"])
def test_float32_tiny_losses_keep_their_sum(d, strided):
    # 1e-21**2 = 1e-42 is a float32 subnormal, which loses about 1e-3 of its
    # value when rounded element by element, so the chunk sums (1.3e-40)
    # must be below 2**-100 = 7.9e-31 and recomputed in double. 1e-16**2 is
    # a normal float32, and its chunk sums (1.3e-30) stay in float32.
    n = 40 * CHUNK + 3
    target = np.zeros(n, np.float32)
    pred = np.full(n, d, np.float32)
    if strided:
        pred = np.repeat(pred, 2)[::2]
    total = fl.mse_loss(pred, target, reduction="sum")
    expected = n * float(np.float32(d)) ** 2
    assert abs(float(total) - expected) <= 1e-6 * expected


@pytest.mark.parametrize("loss_name, param_name, value", [
    ("huber_loss", "delta", 1e-30),
    ("huber_loss", "delta", 1e30),
    ("huber_loss", "delta", 2.0**-60),
    ("smooth_l1_loss", "beta", 1e-30),
    ("smooth_l1_loss", "beta", 1e30),
    ("smooth_l1_loss", "beta", 2.0**60),
])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_float32_extreme_parameters(loss_name, param_name, value, strided):
    # Outside [2**-60, 2**60] the float32 losses lose accuracy, because
    # 1e-30**2 underflows and 1e30 * 1e30 overflows, so every chunk is
    # computed in double. The bounds themselves stay in float32.
    rng = np.random.default_rng(17)
    n = 5 * CHUNK + 9
    pred = rng.standard_normal(n).astype(np.float32) * np.float32(value)
    pred[:CHUNK] = rng.standard_normal(CHUNK).astype(np.float32)
    pred[CHUNK : CHUNK + 4] = 0.0
    target = np.zeros(n, np.float32)
    case = next(c for c in CASES if c.func is getattr(fl, loss_name) and not c.kwargs)
    func = getattr(fl, loss_name)
    p = np.repeat(pred, 2)[::2] if strided else pred
    for reduction in ["sum", "none"]:
        loss, grad = func(p, target, reduction=reduction, return_grad=True,
                          **{param_name: value})
        expected, expected_grad = reference(
            type(case)(case.id, case.func, case.ref, {param_name: value}),
            pred, target, reduction=reduction,
        )
        # Per-element values and gradients are float32: compare them with
        # the float32 rounding of the reference, which flushes 1e-60 to 0
        # and makes 1e60 inf.
        with np.errstate(over="ignore"):
            expected = np.asarray(expected).astype(np.float32)
            expected_grad = expected_grad.astype(np.float32)
        np.testing.assert_allclose(loss, expected, rtol=2e-6, atol=1e-300)
        np.testing.assert_allclose(grad, expected_grad, rtol=2e-6, atol=1e-300)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float32_negative_weights(case):
    # Negative weights can cancel a chunk's sum, so their chunks are summed
    # in double.
    rng = np.random.default_rng(19)
    n = 20 * CHUNK + 1
    pred = (2 * rng.standard_normal(n)).astype(np.float32)
    target = (2 * rng.standard_normal(n)).astype(np.float32)
    weight = np.where(np.arange(n) % 2 == 0, 1.0, -1.0).astype(np.float32)
    weight[-1] = 0.0
    loss = case(pred, target, weight=weight, reduction="sum")
    expected, _ = reference(case, pred, target, weight, "sum")
    magnitude, _ = reference(case, pred, target, np.abs(weight), "sum")
    # The float32 losses themselves carry 3e-7 of each element's magnitude.
    assert abs(float(loss) - expected) <= 1e-6 * magnitude


def test_log_cosh_against_mpmath():
    mpmath = pytest.importorskip("mpmath")
    rng = np.random.default_rng(23)
    d64 = np.concatenate([
        rng.uniform(0, 3, 400), 10 ** rng.uniform(-40, 2.5, 400),
        [0.5, 0.9999999, 1.0, 1.0000001, 2.0, 9.0, 20.0],
    ])
    d64 = np.concatenate([d64, -d64])
    for dtype, limit, smallest in [(np.float64, 2.0, 1e-300), (np.float32, 2.0, 1e-18)]:
        d = d64.astype(dtype)
        d = d[np.abs(d) >= smallest]
        loss, grad = fl.log_cosh_loss(d, np.zeros_like(d), reduction="none",
                                      return_grad=True)
        with mpmath.workdps(120):
            expected_loss = np.array(
                [float(mpmath.log(mpmath.cosh(mpmath.mpf(float(x))))) for x in d])
            expected_grad = np.array([float(mpmath.tanh(mpmath.mpf(float(x)))) for x in d])
        eps = np.finfo(dtype).eps
        # In units of eps relative to the exact value. The float32 losses of
        # |d| < 1e-18 are float32 subnormals, excluded above.
        loss_error = np.abs(loss - expected_loss) / (np.abs(expected_loss) * eps)
        grad_error = np.abs(grad - expected_grad) / (np.abs(expected_grad) * eps)
        assert np.max(loss_error) <= limit, dtype
        assert np.max(grad_error) <= limit, dtype
