import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastloss as fl
from fastloss import sigmoid as sigmoid_module

from conftest import THREAD_COUNTS

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - torch is optional
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

LOSSES = {
    "bce": fl.binary_cross_entropy_with_logits,
    "focal": fl.sigmoid_focal_loss,
}
TOL = {np.float32: dict(rtol=2e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-14)}


def bce_reference(x, y, weight=None, pos_weight=None):
    """Per-element BCE in float64 from log-sigmoids, as NumPy computes them."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    log_p = -np.logaddexp(0.0, -x)
    log_q = -np.logaddexp(0.0, x)
    pw = 1.0 if pos_weight is None else np.asarray(pos_weight, np.float64)
    w = 1.0 if weight is None else np.asarray(weight, np.float64)
    return -w * (pw * y * log_p + (1.0 - y) * log_q)


def focal_reference(x, y, alpha=0.25, gamma=2.0):
    """Per-element torchvision focal loss in float64."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    p = 1.0 / (1.0 + np.exp(-x))
    ce = bce_reference(x, y)
    p_t = p * y + (1.0 - p) * (1.0 - y)
    loss = ce * (1.0 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * y + (1.0 - alpha) * (1.0 - y)) * loss
    return loss


def reduce(values, reduction):
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def finite_difference(fn, x, h=1e-4):
    """Fourth-order central differences of the scalar ``fn`` at ``x``."""
    grad = np.empty_like(x)
    for i in np.ndindex(x.shape):
        values = []
        for step in (-2, -1, 1, 2):
            shifted = x.copy()
            shifted[i] += step * h
            values.append(fn(shifted))
        grad[i] = (values[0] - 8 * values[1] + 8 * values[2] - values[3]) / (12 * h)
    return grad


def make_data(rng, shape=(4, 3, 5), soft=False):
    x = 3.0 * rng.standard_normal(shape)
    y = rng.random(shape) if soft else (rng.random(shape) < 0.4).astype(np.float64)
    return x, y


# ---------------------------------------------------------------- references


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("soft", [False, True])
def test_bce_matches_numpy_reference(rng, reduction, soft):
    x, y = make_data(rng, soft=soft)
    weight = rng.random((3, 1))
    pos_weight = rng.random(5) + 0.5
    loss = fl.binary_cross_entropy_with_logits(
        x, y, weight=weight, pos_weight=pos_weight, reduction=reduction
    )
    expected = reduce(bce_reference(x, y, weight, pos_weight), reduction)
    np.testing.assert_allclose(loss, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0, 0.0, -1])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.5])
@pytest.mark.parametrize("soft", [False, True])
def test_focal_matches_numpy_reference(rng, alpha, gamma, soft):
    x, y = make_data(rng, soft=soft)
    loss = fl.sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma, reduction="none")
    np.testing.assert_allclose(
        loss, focal_reference(x, y, alpha, gamma), rtol=1e-11, atol=1e-14
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_focal_reductions(rng, reduction):
    x, y = make_data(rng)
    loss = fl.sigmoid_focal_loss(x, y, reduction=reduction)
    expected = reduce(focal_reference(x, y), reduction)
    np.testing.assert_allclose(loss, expected, rtol=1e-12, atol=1e-15)


def test_focal_gamma_zero_is_scaled_bce(rng):
    x, y = make_data(rng)
    focal = fl.sigmoid_focal_loss(x, y, alpha=-1, gamma=0.0, reduction="none")
    bce = fl.binary_cross_entropy_with_logits(x, y, reduction="none")
    np.testing.assert_allclose(focal, bce, rtol=1e-14)


# ------------------------------------------------------------------ PyTorch

WEIGHT_SHAPES = [None, (), (5,), (3, 1), (4, 1, 1), (1, 3, 5), (4, 3, 5)]


@needs_torch
@pytest.mark.parametrize("weight_shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("pos_weight_shape", [None, (5,), (3, 1), (4, 3, 5)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_matches_torch(rng, weight_shape, pos_weight_shape, reduction):
    x, y = make_data(rng)
    kwargs = {}
    torch_kwargs = {}
    if weight_shape is not None:
        kwargs["weight"] = rng.random(weight_shape)
        torch_kwargs["weight"] = torch.tensor(kwargs["weight"])
    if pos_weight_shape is not None:
        kwargs["pos_weight"] = 0.5 + 2 * rng.random(pos_weight_shape)
        torch_kwargs["pos_weight"] = torch.tensor(kwargs["pos_weight"])
    loss, grad = fl.binary_cross_entropy_with_logits(
        x, y, reduction=reduction, return_grad=True, **kwargs
    )

    xt = torch.tensor(x, requires_grad=True)
    expected = F.binary_cross_entropy_with_logits(
        xt, torch.tensor(y), reduction=reduction, **torch_kwargs
    )
    expected.sum().backward()
    np.testing.assert_allclose(loss, expected.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-12, atol=1e-15)


def torchvision_focal(x, y, alpha, gamma, reduction):
    """torchvision.ops.sigmoid_focal_loss, written out in torch."""
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


@needs_torch
@pytest.mark.parametrize("alpha", [0.25, -1])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(4, 3, 5), (3, 70, 67)])
def test_focal_matches_torch(rng, alpha, gamma, reduction, dtype, shape):
    # (3, 70, 67) spans several blocks of whole vectorized groups, and
    # (4, 3, 5) is shorter than one group.
    x, y = make_data(rng, shape=shape, soft=True)
    x, y = x.astype(dtype), y.astype(dtype)
    loss, grad = fl.sigmoid_focal_loss(
        x, y, alpha=alpha, gamma=gamma, reduction=reduction, return_grad=True
    )
    xt = torch.tensor(x, requires_grad=True)
    expected = torchvision_focal(xt, torch.tensor(y), alpha, gamma, reduction)
    expected.sum().backward()
    assert loss.dtype == dtype
    assert grad.dtype == dtype
    np.testing.assert_allclose(loss, expected.detach().numpy(), **TOL[dtype])
    np.testing.assert_allclose(grad, xt.grad.numpy(), **TOL[dtype])


# ------------------------------------------------------- gradient checks


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bce_grad_finite_difference(rng, reduction):
    x, y = make_data(rng, shape=(3, 4), soft=True)
    weight, pos_weight = rng.random((3, 1)), rng.random(4) + 0.5

    def fn(z):
        return fl.binary_cross_entropy_with_logits(
            z, y, weight=weight, pos_weight=pos_weight, reduction=reduction
        )

    _, grad = fl.binary_cross_entropy_with_logits(
        x, y, weight=weight, pos_weight=pos_weight, reduction=reduction,
        return_grad=True,
    )
    np.testing.assert_allclose(grad, finite_difference(fn, x), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.25, -1])
def test_focal_grad_finite_difference(rng, gamma, alpha):
    x, y = make_data(rng, shape=(3, 4), soft=True)

    def fn(z):
        return fl.sigmoid_focal_loss(z, y, alpha=alpha, gamma=gamma, reduction="sum")

    _, grad = fl.sigmoid_focal_loss(
        x, y, alpha=alpha, gamma=gamma, reduction="sum", return_grad=True
    )
    np.testing.assert_allclose(grad, finite_difference(fn, x), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", LOSSES)
def test_none_grad_is_elementwise(rng, name):
    x, y = make_data(rng)
    _, grad_none = LOSSES[name](x, y, reduction="none", return_grad=True)
    _, grad_sum = LOSSES[name](x, y, reduction="sum", return_grad=True)
    _, grad_mean = LOSSES[name](x, y, reduction="mean", return_grad=True)
    np.testing.assert_array_equal(grad_none, grad_sum)
    np.testing.assert_allclose(grad_mean, grad_sum / x.size, rtol=1e-15)


# ------------------------------------------------------------- edge cases


@pytest.mark.parametrize("gamma", [0.25, 0.5, 0.9, 2.0])
def test_focal_grad_finite_as_p_t_rounds_to_one(gamma):
    x = np.array([-1e4, -800.0, -40.0, -20.0, 20.0, 40.0, 800.0, 1e4])
    for dtype in (np.float32, np.float64):
        for label in (0.0, 1.0):
            y = np.full(x.shape, label)
            loss, grad = fl.sigmoid_focal_loss(
                x.astype(dtype), y, gamma=gamma, reduction="none", return_grad=True
            )
            assert np.all(np.isfinite(loss)), (dtype, label)
            assert np.all(np.isfinite(grad)), (dtype, label)
            assert np.all(loss >= 0), (dtype, label)


def test_focal_grad_finite_for_small_gamma_soft_labels(rng):
    x = np.linspace(-60, 60, 41)
    y = rng.random(x.shape)
    _, grad = fl.sigmoid_focal_loss(x, y, gamma=0.2, return_grad=True)
    assert np.all(np.isfinite(grad))


def test_bce_huge_logits_are_stable():
    x = np.array([1e4, -1e4, 1e4, -1e4, 50.0, -50.0])
    y = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    for dtype in (np.float32, np.float64):
        loss, grad = fl.binary_cross_entropy_with_logits(
            x.astype(dtype), y, reduction="none", return_grad=True
        )
        np.testing.assert_allclose(loss[:4], [0.0, 0.0, 1e4, 1e4], rtol=1e-7)
        np.testing.assert_allclose(grad[:4], [0.0, 0.0, 1.0, -1.0])
        # softplus(-50) = exp(-50) is kept, not rounded to 0 from log(1 + tiny).
        np.testing.assert_allclose(loss[4:], np.exp(-50.0), rtol=1e-6)


def test_infinite_logits_give_limits():
    x = np.array([np.inf, -np.inf, np.inf, -np.inf])
    y = np.array([1.0, 0.0, 0.0, 1.0])
    loss, grad = fl.binary_cross_entropy_with_logits(
        x, y, reduction="none", return_grad=True
    )
    np.testing.assert_array_equal(loss, [0.0, 0.0, np.inf, np.inf])
    np.testing.assert_array_equal(grad, [0.0, 0.0, 1.0, -1.0])
    loss, grad = fl.sigmoid_focal_loss(
        x, y, alpha=-1, reduction="none", return_grad=True
    )
    np.testing.assert_array_equal(loss, [0.0, 0.0, np.inf, np.inf])
    assert not np.any(np.isnan(grad))


@pytest.mark.parametrize("name", LOSSES)
def test_nan_propagates(rng, name):
    x, y = make_data(rng)
    x[1, 2, 3] = np.nan
    loss, grad = LOSSES[name](x, y, return_grad=True)
    assert np.isnan(loss)
    assert np.isnan(grad[1, 2, 3])
    others = np.delete(grad.ravel(), np.ravel_multi_index((1, 2, 3), x.shape))
    assert np.isfinite(others).all()


def test_bce_zero_weight_drops_nan(rng):
    x, y = make_data(rng)
    weight = np.ones(x.shape)
    x[0, 0, 0] = np.nan
    y[0, 0, 1] = np.nan
    weight[0, 0, :2] = 0.0
    loss, grad = fl.binary_cross_entropy_with_logits(
        x, y, weight=weight, reduction="sum", return_grad=True
    )
    clean_x, clean_y = np.nan_to_num(x), np.nan_to_num(y)
    expected = (bce_reference(clean_x, clean_y) * weight).sum()
    np.testing.assert_allclose(loss, expected, rtol=1e-12)
    assert grad[0, 0, 0] == 0.0
    assert grad[0, 0, 1] == 0.0


def test_bce_all_zero_weight_mean_is_zero(rng):
    x, y = make_data(rng)
    loss, grad = fl.binary_cross_entropy_with_logits(
        x, y, weight=0.0, return_grad=True
    )
    assert loss == 0.0
    assert not grad.any()


@pytest.mark.parametrize("name", LOSSES)
def test_empty_mean_is_nan(name):
    x = np.empty((0, 3))
    loss, grad = LOSSES[name](x, x, return_grad=True)
    assert np.isnan(loss)
    assert grad.shape == (0, 3)
    assert LOSSES[name](x, x, reduction="sum") == 0.0
    assert LOSSES[name](x, x, reduction="none").shape == (0, 3)


@pytest.mark.parametrize("name", LOSSES)
def test_zero_dim_inputs(name):
    loss, grad = LOSSES[name](np.float64(0.3), np.float64(1.0), return_grad=True)
    expected = (bce_reference if name == "bce" else focal_reference)(0.3, 1.0)
    np.testing.assert_allclose(loss, expected, rtol=1e-14)
    assert grad.shape == ()
    assert LOSSES[name](0.3, 1.0, reduction="none").shape == ()


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize(
    "dtype, expected",
    [(np.float16, np.float32), (np.float32, np.float32), (np.float64, np.float64),
     (np.int32, np.float64), (">f8", np.float64), (">f4", np.float32)],
)
def test_dtype_rules(rng, name, dtype, expected):
    x, y = make_data(rng)
    x = np.round(x).astype(dtype)
    loss, grad = LOSSES[name](x, y, return_grad=True)
    assert loss.dtype == expected
    assert type(loss) is np.dtype(expected).type
    assert grad.dtype == expected
    assert grad.dtype.isnative
    reference = bce_reference if name == "bce" else focal_reference
    tolerance = 1e-6 if expected == np.float32 else 1e-12
    np.testing.assert_allclose(
        loss, reference(x.astype(np.float64), y).mean(), rtol=tolerance
    )


@pytest.mark.parametrize(
    "name, reduction, kwargs",
    [
        ("bce", "sum", {}),
        ("bce", "mean", {"pos_weight": np.float32(10.0)}),
        ("focal", "sum", {"alpha": -1}),
    ],
)
def test_float32_loss_overflow_is_inf(name, reduction, kwargs):
    # Each element costs about 3e38 (3e39 with pos_weight 10), so the sum,
    # and that mean, exceed float32's range and round to inf.
    logits = np.full(4, -3e38, np.float32)
    target = np.ones(4, np.float32)
    loss = LOSSES[name](logits, target, reduction=reduction, **kwargs)
    assert type(loss) is np.float32
    assert loss == np.inf


@pytest.mark.parametrize("name", LOSSES)
def test_float32_target_cast_overflow_is_inf(name):
    # 1e300 has no float32 value, so the target becomes inf, with no warning.
    # BCE is affine in the target, so it goes to -inf for a positive logit.
    # The focal loss's 1 - p_t meets inf - inf and is NaN, as in torchvision.
    logits = np.ones(3, np.float32)
    target = np.array([1e300, 0.0, 0.0])
    loss = LOSSES[name](logits, target, reduction="none")
    assert loss.dtype == np.float32
    if name == "bce":
        assert loss[0] == -np.inf
    else:
        assert np.isnan(loss[0])
    assert np.isfinite(loss[1:]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weighted", [False, True])
def test_bce_grad_infinite_target(dtype, weighted):
    # The derivative sigmoid(x) - y is -inf for every finite x when y = inf,
    # also where exp(-|x|) underflows to 0 and a product would be inf * 0.
    logits = np.array([20.0, 80.0, 1e4, -20.0, -1e4], dtype)
    target = np.full(logits.shape, np.inf, dtype)
    weight = np.ones(logits.shape, dtype) if weighted else None
    _, grad = fl.binary_cross_entropy_with_logits(
        logits, target, weight=weight, reduction="none", return_grad=True)
    assert np.all(grad == -np.inf)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bce_loss_infinite_target_matches_torch(dtype):
    # softplus(x) - x * y is affine in y: at y = inf it is -inf for x > 0,
    # +inf for x < 0 and NaN at x = 0, which is what PyTorch returns.
    torch = pytest.importorskip("torch")
    logits = np.array([20.0, -20.0, 0.0, 1e4, -1e4], dtype)
    target = np.full(logits.shape, np.inf, dtype)
    loss = fl.binary_cross_entropy_with_logits(logits, target, reduction="none")
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(logits), torch.from_numpy(target), reduction="none").numpy()
    np.testing.assert_array_equal(loss, expected)
    np.testing.assert_array_equal(loss, np.array([-np.inf, np.inf, np.nan, -np.inf, np.inf], dtype))


@pytest.mark.parametrize("x, y, alpha, gamma", [
    (-3.0, -0.5, 0.25, 2.0),
    (3.0, 1.5, -1.0, 1.0),
    (3.0, 1.5, 0.75, 3.0),
])
def test_focal_grad_target_outside_unit(x, y, alpha, gamma):
    # A target outside [0, 1] can make 1 - p_t negative; the gradient is
    # still the derivative of the loss that is returned.
    def loss(value):
        return float(fl.sigmoid_focal_loss(np.array([value]), np.array([y]),
                                           alpha=alpha, gamma=gamma, reduction="sum"))

    _, grad = fl.sigmoid_focal_loss(np.array([x]), np.array([y]), alpha=alpha,
                                    gamma=gamma, reduction="sum", return_grad=True)
    h = 1e-6
    numeric = (loss(x + h) - loss(x - h)) / (2 * h)
    assert grad[0] == pytest.approx(numeric, rel=1e-6)


def _layouts(x):
    yield "c", x
    yield "f", np.asfortranarray(x)
    big = np.zeros(tuple(2 * n for n in x.shape))
    big[::2, ::2, ::2] = x
    yield "strided", big[::2, ::2, ::2]
    yield "negative", np.ascontiguousarray(x[::-1, :, ::-1])[::-1, :, ::-1]
    ro = x.copy()
    ro.flags.writeable = False
    yield "read-only", ro
    yield "big-endian", x.astype(">f8")


@pytest.mark.parametrize("name", LOSSES)
def test_layouts_match_contiguous(rng, name):
    x, y = make_data(rng)
    x_before, y_before = x.copy(), y.copy()
    expected_loss, expected_grad = LOSSES[name](x, y, reduction="none", return_grad=True)
    for label, xl in _layouts(x):
        for label_y, yl in _layouts(y):
            loss, grad = LOSSES[name](xl, yl, reduction="none", return_grad=True)
            np.testing.assert_array_equal(loss, expected_loss, err_msg=f"{label}/{label_y}")
            np.testing.assert_array_equal(grad, expected_grad, err_msg=f"{label}/{label_y}")
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(y, y_before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 63, 64, 4096 * 3 + 77])
def test_bce_contiguous_and_strided_sums_agree(rng, dtype, n):
    # The contiguous loop (no weights) and the strided loop add the same
    # elements into the same lanes, so every reduction gives the same bits.
    x = (rng.standard_normal(n) * 8).astype(dtype)
    y = rng.random(n).astype(dtype)
    x[::7] = np.inf
    x[3::7] = -np.inf
    x[5::7] = 40.0
    spaced_x = np.repeat(x, 2)[::2]
    spaced_y = np.repeat(y, 2)[::2]
    for reduction in ["mean", "sum", "none"]:
        loss, grad = fl.binary_cross_entropy_with_logits(
            x, y, reduction=reduction, return_grad=True
        )
        strided_loss, strided_grad = fl.binary_cross_entropy_with_logits(
            spaced_x, spaced_y, reduction=reduction, return_grad=True
        )
        assert strided_loss.tobytes() == loss.tobytes(), reduction
        assert strided_grad.tobytes() == grad.tobytes(), reduction


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("soft", [False, True])
def test_float32_large_input_accuracy(rng, name, soft):
    # float32 inputs run in float32 end to end, and each block sums its
    # losses in float32 lanes before widening them to double. The mean and
    # the sum of 1e7 elements must still match a float64 reference.
    n = 10**7
    x = (4.0 * rng.standard_normal(n)).astype(np.float32)
    y = rng.random(n, dtype=np.float32)
    if not soft:
        y = (y < 0.4).astype(np.float32)
    reference = (bce_reference if name == "bce" else focal_reference)(x, y)
    for reduction in ["mean", "sum"]:
        loss = LOSSES[name](x, y, reduction=reduction)
        assert loss.dtype == np.float32
        np.testing.assert_allclose(
            loss, reduce(reference, reduction), **TOL[np.float32], err_msg=reduction
        )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 63, 64, 4096 * 3 + 77])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 3.5])
@pytest.mark.parametrize("alpha", [0.25, -1])
def test_focal_contiguous_and_strided_agree(rng, dtype, n, gamma, alpha):
    # The contiguous loops (one per way of forming m**gamma) and the strided
    # loop add the same elements into the same lanes.
    x = (rng.standard_normal(n) * 8).astype(dtype)
    y = rng.random(n).astype(dtype)
    x[::7] = np.inf
    x[3::7] = -np.inf
    x[5::7] = 40.0
    spaced_x = np.repeat(x, 2)[::2]
    spaced_y = np.repeat(y, 2)[::2]
    kwargs = dict(alpha=alpha, gamma=gamma, return_grad=True)
    for reduction in ["mean", "sum", "none"]:
        loss, grad = fl.sigmoid_focal_loss(x, y, reduction=reduction, **kwargs)
        strided_loss, strided_grad = fl.sigmoid_focal_loss(
            spaced_x, spaced_y, reduction=reduction, **kwargs
        )
        assert strided_loss.tobytes() == loss.tobytes(), reduction
        assert strided_grad.tobytes() == grad.tobytes(), reduction
    finite = np.isfinite(x)
    loss = fl.sigmoid_focal_loss(x[finite], y[finite], alpha=alpha, gamma=gamma,
                                 reduction="none")
    np.testing.assert_allclose(
        loss, focal_reference(x[finite], y[finite], alpha, gamma), **TOL[dtype]
    )


def test_broadcast_weight_is_a_zero_stride_view():
    w = sigmoid_module._broadcast_weight(np.ones(7), "weight", (1000, 7), np.dtype("f8"))
    assert w.strides == (0, 8)
    w = sigmoid_module._broadcast_weight(2.0, "pos_weight", (10, 7), np.dtype("f4"))
    assert w.strides == (0, 0)
    assert w.dtype == np.float32


def test_bce_zero_stride_logits(rng):
    x = np.broadcast_to(rng.standard_normal(5), (300, 5))
    y = np.broadcast_to((rng.random((300, 1)) < 0.5).astype(float), (300, 5))
    loss, grad = fl.binary_cross_entropy_with_logits(
        x, y, pos_weight=np.arange(1.0, 6.0), return_grad=True
    )
    np.testing.assert_allclose(
        loss, bce_reference(x, y, pos_weight=np.arange(1.0, 6.0)).mean(), rtol=1e-12
    )
    assert grad.shape == (300, 5)


@pytest.mark.parametrize("weight_shape", [(1, 64, 1), (64, 1), (1, 1, 256), ()])
def test_bce_broadcast_weight_is_not_copied(rng, weight_shape):
    # 2**20 float64 logits are 8 MiB, and a copy of a broadcast weight would
    # be as big, so the peak of NumPy's traced allocations shows any copy.
    x = rng.standard_normal((64, 64, 256))
    y = (rng.random(x.shape) < 0.5).astype(np.float64)
    weight = rng.random(weight_shape)
    pos_weight = rng.random(256) + 0.5
    tracemalloc.start()
    try:
        loss = fl.binary_cross_entropy_with_logits(
            x, y, weight=weight, pos_weight=pos_weight
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20
    np.testing.assert_allclose(
        loss, bce_reference(x, y, weight, pos_weight).mean(), rtol=1e-11
    )


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_thread_counts_bit_identical(rng, name, dtype):
    # Large enough for several reduction blocks and a parallel kernel.
    x, y = make_data(rng, shape=(70, 30, 40))
    x = x.astype(dtype)
    kwargs = {"pos_weight": rng.random(40) + 0.5} if name == "bce" else {}
    results = [
        LOSSES[name](x, y, return_grad=True, n_threads=n, **kwargs)
        for n in THREAD_COUNTS
    ]
    for loss, grad in results[1:]:
        assert loss.tobytes() == results[0][0].tobytes()
        assert grad.tobytes() == results[0][1].tobytes()


@pytest.mark.parametrize("name", LOSSES)
def test_grad_out_is_used(rng, name):
    x, y = make_data(rng)
    _, expected = LOSSES[name](x, y, return_grad=True)
    out = np.empty_like(x)
    _, grad = LOSSES[name](x, y, return_grad=True, grad_out=out)
    assert grad is out
    np.testing.assert_array_equal(out, expected)

    # A strided grad_out that the kernel cannot walk with the inputs.
    big = np.full((4, 6, 10), np.nan)
    strided = big[:, ::2, ::2]
    _, grad = LOSSES[name](x, y, return_grad=True, grad_out=strided)
    assert grad is strided
    assert np.shares_memory(grad, big)
    np.testing.assert_array_equal(strided, expected)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("aliased", ["logits", "target"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_grad_out_overlapping_input(rng, name, aliased, reduction):
    # grad_out is the reversed view of an input, so writing the gradient in
    # order would overwrite elements that are still to be read.
    x, y = make_data(rng, soft=True)
    expected_loss, expected_grad = LOSSES[name](x, y, reduction=reduction,
                                                return_grad=True)
    grad_out = {"logits": x, "target": y}[aliased][::-1]
    loss, grad = LOSSES[name](x, y, reduction=reduction, return_grad=True,
                              grad_out=grad_out)
    assert grad is grad_out
    np.testing.assert_array_equal(loss, expected_loss)
    np.testing.assert_array_equal(grad, expected_grad)


def test_bce_grad_out_overlapping_broadcast_weight(rng):
    # The weight is one row of grad_out, broadcast over every row: writing
    # row 0 of the gradient would change the weight of the later rows.
    x, y = make_data(rng, shape=(4, 5))
    grad_out = rng.random((4, 5))
    weight = grad_out[0]
    pos_weight = grad_out[1, ::-1]
    expected_loss, expected_grad = fl.binary_cross_entropy_with_logits(
        x, y, weight=weight.copy(), pos_weight=pos_weight.copy(), return_grad=True
    )
    loss, grad = fl.binary_cross_entropy_with_logits(
        x, y, weight=weight, pos_weight=pos_weight, return_grad=True, grad_out=grad_out
    )
    assert grad is grad_out
    assert loss == expected_loss
    np.testing.assert_array_equal(grad, expected_grad)


@pytest.mark.parametrize("name", LOSSES)
def test_grad_out_same_view_as_logits(rng, name):
    x, y = make_data(rng)
    expected_loss, expected_grad = LOSSES[name](x, y, return_grad=True)
    loss, grad = LOSSES[name](x, y, return_grad=True, grad_out=x)
    assert grad is x
    assert loss == expected_loss
    np.testing.assert_array_equal(x, expected_grad)


@pytest.mark.parametrize("name", LOSSES)
def test_grad_out_filled_without_return_grad(rng, name):
    x, y = make_data(rng)
    expected_loss, expected_grad = LOSSES[name](x, y, return_grad=True)
    out = np.full(x.shape, np.nan)
    loss = LOSSES[name](x, y, grad_out=out)
    assert loss == expected_loss
    np.testing.assert_array_equal(out, expected_grad)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_read_only_inputs_without_grad(rng, name, reduction):
    x, y = make_data(rng)
    expected = LOSSES[name](x, y, reduction=reduction)
    x.flags.writeable = False
    y.flags.writeable = False
    np.testing.assert_array_equal(LOSSES[name](x, y, reduction=reduction), expected)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("name", LOSSES)
def test_common_errors(rng, name):
    fn = LOSSES[name]
    x, y = make_data(rng)
    with pytest.raises(ValueError, match=r"target must have the shape of logits \(4, 3, 5\)"):
        fn(x, y[:, :, :1])
    with pytest.raises(ValueError, match="reduction must be one of"):
        fn(x, y, reduction="avg")
    with pytest.raises(TypeError, match="logits must be an array of real numbers"):
        fn(x.astype(complex), y)
    with pytest.raises(TypeError, match="target must be an array of real numbers"):
        fn(x, y.astype(str))
    with pytest.raises(ValueError, match=r"grad_out must have shape \(4, 3, 5\)"):
        fn(x, y, return_grad=True, grad_out=np.empty((4, 3)))
    with pytest.raises(ValueError, match="grad_out must have dtype float64"):
        fn(x, y, return_grad=True, grad_out=np.empty(x.shape, np.float32))
    with pytest.raises(ValueError, match="n_threads must be None or an int >= 1"):
        fn(x, y, n_threads=0)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_numpy_str_reduction(rng, name, reduction):
    x, y = make_data(rng)
    expected = LOSSES[name](x, y, reduction=reduction)
    np.testing.assert_array_equal(LOSSES[name](x, y, reduction=np.str_(reduction)),
                                  expected)


def test_bce_weight_errors(rng):
    x, y = make_data(rng)
    match = r"weight must broadcast to the logits' shape \(4, 3, 5\), got shape \(4,\)"
    with pytest.raises(ValueError, match=match):
        fl.binary_cross_entropy_with_logits(x, y, weight=np.ones(4))
    with pytest.raises(ValueError, match=r"pos_weight must broadcast .* got shape \(2, 5\)"):
        fl.binary_cross_entropy_with_logits(x, y, pos_weight=np.ones((2, 5)))
    with pytest.raises(TypeError, match="pos_weight must be an array of real numbers"):
        fl.binary_cross_entropy_with_logits(x, y, pos_weight="a")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(alpha=1.5), ValueError, r"alpha must be in \[0, 1\], or -1 .* got 1.5"),
        (dict(alpha=-0.5), ValueError, r"alpha must be in \[0, 1\], or -1 .* got -0.5"),
        (dict(alpha="a"), TypeError, "alpha must be a real number, got str"),
        (dict(gamma=-1.0), ValueError, "gamma must be >= 0.0, got -1.0"),
        (dict(gamma=np.nan), ValueError, "gamma must be >= 0.0, got nan"),
    ],
)
def test_focal_parameter_errors(rng, kwargs, error, match):
    x, y = make_data(rng)
    with pytest.raises(error, match=match):
        fl.sigmoid_focal_loss(x, y, **kwargs)


def test_concurrent_calls_bit_identical(rng):
    # Several Python threads in the kernels at once share no state.
    x, y = make_data(rng, shape=(70, 30, 40))

    def run(_):
        return fl.sigmoid_focal_loss(x, y, return_grad=True, n_threads=2)

    expected_loss, expected_grad = run(None)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, range(8)))
    for loss, grad in results:
        assert loss.tobytes() == expected_loss.tobytes()
        assert grad.tobytes() == expected_grad.tobytes()


class _ArraySubclass(np.ndarray):
    pass


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_plain_path_matches_general(rng, dtype, reduction):
    # Plain C-contiguous pairs skip the general conversions. Each other
    # layout below takes the general path and must give the same bits.
    logits = rng.standard_normal((6, 7)).astype(dtype)
    target = (rng.random((6, 7)) > 0.5).astype(dtype)
    assert sigmoid_module._is_plain_pair(logits, target, reduction)
    expected_loss, expected_grad = fl.binary_cross_entropy_with_logits(
        logits, target, reduction=reduction, return_grad=True)
    variants = {
        "fortran": (np.asfortranarray(logits), target),
        "swapped": (logits.astype(logits.dtype.newbyteorder(">")), target),
        "strided-target": (logits, np.repeat(target, 2, axis=1)[:, ::2]),
        "subclass": (logits.view(_ArraySubclass), target),
        "other-dtype-target": (logits, target.astype(np.float16)),
    }
    for name, (x, y) in variants.items():
        assert not sigmoid_module._is_plain_pair(x, y, reduction), name
        loss, grad = fl.binary_cross_entropy_with_logits(
            x, y, reduction=reduction, return_grad=True)
        np.testing.assert_array_equal(loss, expected_loss, err_msg=name)
        np.testing.assert_array_equal(grad, expected_grad, err_msg=name)
    assert not sigmoid_module._is_plain_pair(logits, target, np.str_(reduction))
    assert not sigmoid_module._is_plain_pair(logits, target, "avg")


def test_bce_plain_path_empty_and_loss_only():
    empty = np.zeros((0, 3), np.float32)
    with np.errstate(all="raise"):
        assert np.isnan(fl.binary_cross_entropy_with_logits(empty, empty))
        assert fl.binary_cross_entropy_with_logits(empty, empty, reduction="sum") == 0.0
    x = np.array([0.0, 100.0], np.float32)
    y = np.array([1.0, 1.0], np.float32)
    loss = fl.binary_cross_entropy_with_logits(x, y, reduction="sum")
    assert type(loss) is np.float32
    np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("offset", [-1, 0])
def test_bce_plain_path_at_threshold(rng, dtype, reduction, offset):
    # The plain path resolves n_threads=None only from the parallel threshold
    # up, and the result must be the same bits on both sides and for every
    # count. The general path, which a target given as a list takes, is the
    # reference.
    n = sigmoid_module._PARALLEL_MIN_ITEMS + offset
    x = rng.standard_normal(n).astype(dtype)
    y = (rng.random(n) > 0.5).astype(dtype)
    expected_loss, expected_grad = fl.binary_cross_entropy_with_logits(
        x, y.tolist(), reduction=reduction, return_grad=True, n_threads=1
    )
    for n_threads in (None, *THREAD_COUNTS):
        loss, grad = fl.binary_cross_entropy_with_logits(
            x, y, reduction=reduction, return_grad=True, n_threads=n_threads
        )
        assert np.asarray(loss).tobytes() == np.asarray(expected_loss).tobytes()
        assert grad.tobytes() == expected_grad.tobytes()
        assert grad.dtype == dtype


def test_bce_plain_path_checks_n_threads():
    x = np.zeros(16, np.float32)
    with pytest.raises(ValueError, match="n_threads must be None or an int >= 1"):
        fl.binary_cross_entropy_with_logits(x, x, n_threads=0)
    with pytest.raises(TypeError, match="n_threads must be None or an int"):
        fl.binary_cross_entropy_with_logits(x, x, n_threads=1.5)


def test_bce_plain_path_float32_overflow():
    # A float32 sum beyond float32's range becomes inf, with no warning.
    x = np.full(16, 1e38, np.float32)
    target = np.zeros(16, np.float32)
    loss = fl.binary_cross_entropy_with_logits(x, target, reduction="sum")
    assert loss.dtype == np.float32
    assert loss == np.inf
