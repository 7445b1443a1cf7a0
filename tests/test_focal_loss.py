import numpy as np
import pytest

import fastloss as fl

from conftest import THREAD_COUNTS

REDUCTIONS = ("mean", "sum", "none")
GAMMAS = (0.5, 1.0, 2.0, 5.0)


def reference_focal(logits, target, gamma=2.0, weight=None, ignore_index=-100,
                    axis=1, reduction="mean"):
    """Float64 NumPy softmax focal loss, ``-w[y] (1 - p_t)**gamma log p_t``."""
    x = np.asarray(logits, np.float64)
    axis = 0 if x.ndim == 1 else axis
    x = np.moveaxis(x, axis, -1)
    m = np.max(x, axis=-1, keepdims=True)
    lp = (x - m) - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))
    w = np.ones(x.shape[-1]) if weight is None else np.asarray(weight, np.float64)
    y = np.asarray(target).astype(np.int64)
    keep = y != ignore_index
    y_safe = np.where(keep, y, 0)
    w_y = np.where(keep, w[y_safe], 0.0)
    lp_t = np.take_along_axis(lp, y_safe[..., None], -1)[..., 0]
    per = np.where(keep, -w_y * (-np.expm1(lp_t)) ** gamma * lp_t, 0.0)
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / w_y.sum() if w_y.sum() != 0 else np.nan


def make_case(rng, shape, n_ignored=0):
    logits = rng.standard_normal(shape) * 2
    target = rng.integers(0, shape[1], shape[:1] + shape[2:])
    flat = target.reshape(-1)
    flat[rng.choice(flat.size, n_ignored, replace=False)] = -100
    return logits, target


def numeric_grad(f, x, h=1e-6):
    g = np.empty_like(x)
    for idx in np.ndindex(x.shape):
        xp = x.copy()
        xm = x.copy()
        xp[idx] += h
        xm[idx] -= h
        g[idx] = (f(xp) - f(xm)) / (2 * h)
    return g


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(6, 4), (2, 3, 4, 5)], ids=str)
def test_gamma_zero_is_cross_entropy(rng, reduction, weighted, shape):
    logits, target = make_case(rng, shape, n_ignored=2)
    weight = rng.random(shape[1]) + 0.1 if weighted else None
    kwargs = dict(weight=weight, reduction=reduction, return_grad=True)
    loss, grad = fl.focal_loss(logits, target, gamma=0.0, **kwargs)
    ce_loss, ce_grad = fl.cross_entropy(logits, target, **kwargs)
    np.testing.assert_allclose(loss, ce_loss, rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(grad, ce_grad, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_reference(rng, gamma, reduction, dtype):
    logits, target = make_case(rng, (4, 5, 6), n_ignored=3)
    weight = (rng.random(5) + 0.1).astype(dtype)
    x = logits.astype(dtype)
    loss = fl.focal_loss(x, target, gamma=gamma, weight=weight, reduction=reduction)
    expected = reference_focal(x, target, gamma, weight, reduction=reduction)
    tol = dict(rtol=3e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12)
    np.testing.assert_allclose(loss, expected, **tol)
    if reduction == "none":
        assert loss.dtype == dtype
        assert loss.shape == target.shape
    else:
        assert type(loss) is dtype


@pytest.mark.parametrize("gamma", (0.0, 0.5, 1.0, 2.0, 5.0))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_matches_finite_differences(rng, gamma, reduction):
    logits, target = make_case(rng, (4, 3, 2), n_ignored=2)
    weight = rng.random(3) + 0.2
    kwargs = dict(gamma=gamma, weight=weight, reduction=reduction)
    _, grad = fl.focal_loss(logits, target, return_grad=True, **kwargs)
    numeric = numeric_grad(lambda x: reference_focal(x, target, **kwargs), logits)
    # Central differences with h = 1e-6 carry about 1e-9 of rounding noise.
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_grad_none_is_per_position_derivative(rng):
    logits, target = make_case(rng, (5, 4), n_ignored=1)
    _, grad = fl.focal_loss(logits, target, gamma=1.5, reduction="none",
                            return_grad=True)
    _, grad_sum = fl.focal_loss(logits, target, gamma=1.5, reduction="sum",
                                return_grad=True)
    np.testing.assert_array_equal(grad, grad_sum)


@pytest.mark.parametrize("gamma", (0.0, 0.25, 0.5, 1.0, 2.0))
@pytest.mark.parametrize("margin", [30.0, 50.0, 700.0])
def test_certain_target_finite_grad(gamma, margin):
    # Two classes with logits (a, 0): 1 - p_t = sigmoid(-a) exactly.
    logits = np.array([[margin, 0.0]])
    loss, grad = fl.focal_loss(logits, np.array([0]), gamma=gamma, reduction="sum",
                               return_grad=True)
    q = np.exp(-margin) / (1 + np.exp(-margin))
    neg_log_p_t = np.log1p(np.exp(-margin))
    np.testing.assert_allclose(loss, q**gamma * neg_log_p_t, rtol=1e-13)
    assert np.all(np.isfinite(grad))
    # d loss / d a = -q**gamma * q * (1 + gamma * p_t * (-log p_t) / q).
    expected_grad = -(q**gamma) * q * (1 + gamma * (1 - q) * neg_log_p_t / q)
    np.testing.assert_allclose(grad[0, 0], expected_grad, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(grad[0, 1], -expected_grad, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("gamma", (0.0, 0.25, 0.5, 1.0, 2.0))
def test_p_t_exactly_one(gamma):
    # exp(-800) underflows, so p_t is 1 and 1 - p_t is 0 in float64.
    loss, grad = fl.focal_loss(np.array([[800.0, 0.0]]), np.array([0]), gamma=gamma,
                               return_grad=True)
    assert loss == 0.0
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("gamma", (0.5, 2.0))
def test_p_t_rounds_to_one_float32(gamma):
    logits = np.array([[60.0, 0.0, -3.0], [1e4, -1e4, 0.0]], np.float32)
    loss, grad = fl.focal_loss(logits, np.array([0, 0]), gamma=gamma,
                               return_grad=True)
    assert np.isfinite(loss)
    assert loss >= 0
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[1], 0.0)


def test_huge_logits_float32(rng):
    logits = (rng.choice([-1e4, 1e4], (32, 4)) + rng.standard_normal((32, 4))).astype(
        np.float32
    )
    target = rng.integers(0, 4, 32)
    for gamma in GAMMAS:
        loss, grad = fl.focal_loss(logits, target, gamma=gamma, return_grad=True)
        assert np.isfinite(loss)
        assert np.all(np.isfinite(grad))
        np.testing.assert_allclose(loss, reference_focal(logits, target, gamma),
                                   rtol=1e-5)


def test_all_ignored_and_zero_size(rng):
    logits = rng.standard_normal((3, 4))
    logits[0] = np.nan
    target = np.full(3, -100)
    loss, grad = fl.focal_loss(logits, target, return_grad=True)
    assert np.isnan(loss)
    np.testing.assert_array_equal(grad, 0.0)
    assert fl.focal_loss(logits, target, reduction="sum") == 0.0
    loss, grad = fl.focal_loss(np.empty((0, 4)), np.empty(0, np.int64),
                               return_grad=True)
    assert np.isnan(loss)
    assert grad.shape == (0, 4)


def test_one_class(rng):
    loss, grad = fl.focal_loss(rng.standard_normal((5, 1)), np.zeros(5, np.int64),
                               gamma=0.5, return_grad=True)
    assert loss == 0.0
    np.testing.assert_array_equal(grad, 0.0)


def test_nan_and_inf_logits(rng):
    logits, target = make_case(rng, (4, 3))
    target[:] = [0, 1, 2, 0]
    logits[1, 0] = -np.inf
    logits[2, 0] = np.nan
    loss, grad = fl.focal_loss(logits, target, reduction="none", return_grad=True)
    assert np.isnan(loss[2])
    assert np.all(np.isnan(grad[2]))
    assert grad[1, 0] == 0.0
    expected = reference_focal(logits[1:2, 1:], np.array([0]), reduction="none")
    np.testing.assert_allclose(loss[1], expected[0], rtol=1e-14)
    assert np.all(np.isfinite(grad[[0, 1, 3]]))
    logits[3, 0] = -np.inf
    loss, grad = fl.focal_loss(logits, target, reduction="none", return_grad=True)
    assert loss[3] == np.inf
    assert np.all(np.isfinite(grad[3]))


@pytest.mark.parametrize("gamma", (0.0, 0.5, 2.0))
def test_pos_inf_target_logit_is_free(gamma):
    logits = np.array([[np.inf, 0.0, -1.0], [2.0, 0.0, 1.0]])
    target = np.array([0, 2])
    loss, grad = fl.focal_loss(logits, target, gamma=gamma, reduction="none",
                               return_grad=True)
    finite_loss, finite_grad = fl.focal_loss(
        np.where(np.isinf(logits), 1e4, logits), target, gamma=gamma,
        reduction="none", return_grad=True,
    )
    assert loss[0] == 0.0
    np.testing.assert_array_equal(loss, finite_loss)
    np.testing.assert_array_equal(grad, finite_grad)


@pytest.mark.parametrize("gamma", (0.0, 0.5, 2.0))
def test_pos_inf_target_logit_shares_probability(gamma):
    # Two +inf logits share the probability, so p_t = 1/2.
    logits = np.array([[np.inf, np.inf, 0.0]])
    loss, grad = fl.focal_loss(logits, np.array([0]), gamma=gamma, reduction="none",
                               return_grad=True)
    np.testing.assert_allclose(loss, [0.5**gamma * np.log(2.0)], rtol=1e-15)
    factor = 0.5**gamma * (1 + gamma * np.log(2.0))
    np.testing.assert_allclose(grad, [[-0.5 * factor, 0.5 * factor, 0.0]], rtol=1e-15)


def test_ignored_nan_logits_never_contribute(rng):
    logits, target = make_case(rng, (5, 3))
    target[2] = -100
    expected = fl.focal_loss(logits, target, return_grad=True)
    logits[2] = np.nan
    loss, grad = fl.focal_loss(logits, target, return_grad=True)
    assert loss == expected[0]
    np.testing.assert_array_equal(grad, expected[1])


def test_grad_out_aliasing_logits(rng):
    logits, target = make_case(rng, (6, 4))
    target[:] = np.argmin(logits, axis=1)
    expected_loss, expected_grad = fl.focal_loss(logits, target, return_grad=True)
    loss, grad = fl.focal_loss(logits, target, return_grad=True, grad_out=logits)
    assert grad is logits
    assert loss == expected_loss
    np.testing.assert_array_equal(grad, expected_grad)


def test_channels_last_matches_class_axis_1(rng):
    logits, target = make_case(rng, (2, 4, 3, 5), n_ignored=2)
    last = np.moveaxis(logits, 1, -1)
    a = fl.focal_loss(logits, target, gamma=1.5, return_grad=True)
    b = fl.focal_loss(last, target, gamma=1.5, axis=-1, return_grad=True)
    assert a[0] == b[0]
    np.testing.assert_array_equal(np.moveaxis(b[1], -1, 1), a[1])


def test_float16_uint8_and_byte_order(rng):
    logits, target = make_case(rng, (3, 4, 5))
    mask = target.astype(np.uint8)
    mask[0, 0] = 255
    expected = fl.focal_loss(logits.astype(np.float16).astype(np.float32),
                             mask.astype(np.int64), ignore_index=255)
    loss = fl.focal_loss(logits.astype(np.float16), mask, ignore_index=255)
    assert type(loss) is np.float32
    assert loss == expected
    swapped = fl.focal_loss(logits.astype(">f8"), target.astype(">i4"))
    assert swapped == fl.focal_loss(logits, target)


def test_read_only_and_strided(rng):
    logits, target = make_case(rng, (4, 3, 6))
    expected = fl.focal_loss(logits, target, return_grad=True)
    big = np.zeros((8, 3, 12))
    big[::2, :, ::2] = logits
    view = big[::2, :, ::2]
    view.flags.writeable = False
    loss, grad = fl.focal_loss(view, target, return_grad=True)
    assert loss == expected[0]
    np.testing.assert_array_equal(grad, expected[1])
    out = np.empty_like(logits)
    _, grad = fl.focal_loss(logits, target, return_grad=True, grad_out=out)
    assert grad is out


def test_thread_counts_bit_identical(rng):
    logits = rng.standard_normal((3, 5, 50, 60))
    target = rng.integers(-1, 5, (3, 50, 60))
    weight = rng.random(5) + 0.5
    results = [
        fl.focal_loss(logits, target, gamma=0.5, weight=weight, ignore_index=-1,
                      return_grad=True, n_threads=n)
        for n in THREAD_COUNTS
    ]
    for loss, grad in results[1:]:
        assert loss == results[0][0]
        np.testing.assert_array_equal(grad, results[0][1])


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(gamma=-1.0), ValueError, "gamma must be >= 0.0"),
        (dict(gamma=None), TypeError, "gamma must be a real number"),
        (dict(target=np.array([0.0, 1.0, 2.0, 1.0])), TypeError,
         r"\.astype\(np\.int64\)"),
        (dict(target=np.full((4, 3), 1 / 3)), TypeError, "class probabilities"),
        (dict(target=np.array([0, 1, 3, 1])), ValueError, r"got 3 at position \(2,\)"),
        (dict(weight=np.ones(2)), ValueError, r"weight must have shape \(3,\)"),
        (dict(reduction="max"), ValueError, "reduction must be one of"),
        (dict(axis=-3), ValueError, "axis -3 is out of bounds"),
        (dict(return_grad=True, grad_out=np.empty((4, 3), np.float32)), ValueError,
         "grad_out must have dtype float64"),
    ],
)
def test_bad_input_raises(rng, kwargs, error, pattern):
    args = dict(logits=rng.standard_normal((4, 3)), target=np.array([0, 1, 2, 1]))
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        fl.focal_loss(args.pop("logits"), args.pop("target"), **args)


def mpmath_focal(row, y, gamma):
    """Return the loss and gradient of one position in 50-digit arithmetic."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(50):
        z = [mpmath.mpf(float(v)) for v in row]
        total = mpmath.fsum(mpmath.exp(v) for v in z)
        p = [mpmath.exp(v) / total for v in z]
        q = mpmath.fsum(p[k] for k in range(len(z)) if k != y)
        lp = mpmath.log(p[y])
        g = mpmath.mpf(gamma)
        loss = -(q**g) * lp
        factor = q**g * (1 + g * p[y] * (-lp) / q)
        grad = [factor * (p[k] - (k == y)) for k in range(len(z))]
    return float(loss), np.array([float(v) for v in grad])


# Integer gammas take products of q, the others exp(gamma * log q). C = 64
# runs the in-place row kernel and C = 5 the class-major tiles.
@pytest.mark.parametrize("gamma", (1.0, 2.0, 3.0, 7.0, 0.25, 1.5, 2.5, 6.3))
@pytest.mark.parametrize("n_classes", (5, 64))
def test_float64_matches_mpmath(rng, gamma, n_classes):
    logits = rng.standard_normal((40, n_classes)) * 3
    target = rng.integers(0, n_classes, 40)
    # p_t near 1 and near 0, where q**gamma and log p_t lose digits first.
    logits[0, target[0]] = 40.0
    logits[1, target[1]] = 15.0
    logits[2, target[2]] = -60.0
    logits[3] = 0.0
    loss, grad = fl.focal_loss(logits, target, gamma=gamma, reduction="none",
                               return_grad=True)
    for j in range(len(target)):
        expected_loss, expected_grad = mpmath_focal(logits[j], target[j], gamma)
        np.testing.assert_allclose(loss[j], expected_loss, rtol=1e-13, atol=1e-300)
        np.testing.assert_allclose(grad[j], expected_grad, rtol=1e-12,
                                   atol=1e-15 * np.abs(expected_grad).max())


@pytest.mark.parametrize("gamma", (2.0**31 - 1.0, 2.0**31, 3.0 - 2.0**-40, 3.0))
def test_large_and_near_integer_gamma(rng, gamma):
    # Both sides of the integer threshold, and a gamma just below an
    # integer, against the float64 reference.
    logits = rng.standard_normal((50, 4))
    target = rng.integers(0, 4, 50)
    logits[np.arange(50), target] += 25.0 if gamma > 100 else 0.0
    loss = fl.focal_loss(logits, target, gamma=gamma, reduction="none")
    expected = reference_focal(logits, target, gamma, reduction="none")
    np.testing.assert_allclose(loss, expected, rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize("gamma", (2.0, 3.0, 1.5))
def test_rows_match_tiles(rng, gamma):
    # C = 48 reads rows in place, and the same classes strided go through
    # class-major tiles. Both must give the same bits.
    logits = rng.standard_normal((300, 48)) * 4
    target = rng.integers(0, 48, 300)
    loss_rows, grad_rows = fl.focal_loss(logits, target, gamma=gamma,
                                         reduction="none", return_grad=True)
    wide = np.zeros((300, 96))
    wide[:, ::2] = logits
    loss_tiles, grad_tiles = fl.focal_loss(wide[:, ::2], target, gamma=gamma,
                                           reduction="none", return_grad=True)
    np.testing.assert_array_equal(loss_rows, loss_tiles)
    np.testing.assert_array_equal(grad_rows, grad_tiles)
