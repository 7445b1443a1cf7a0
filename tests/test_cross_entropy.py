import numpy as np
import pytest

import fastloss as fl
from fastloss import softmax as softmax_module

from conftest import THREAD_COUNTS

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - torch is an optional test dependency
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

REDUCTIONS = ("mean", "sum", "none")
SHAPES = [(7,), (6, 5), (3, 4, 5), (2, 3, 4, 5)]
TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}


def log_softmax(x):
    """Log-softmax over the last axis, shifted by the maximum."""
    m = np.max(x, axis=-1, keepdims=True)
    s = x - m
    return s - np.log(np.sum(np.exp(s), axis=-1, keepdims=True))


def reference_ce(logits, target, weight=None, ignore_index=-100, label_smoothing=0.0,
                 axis=1, reduction="mean"):
    """Float64 NumPy cross-entropy with PyTorch's semantics."""
    x = np.asarray(logits, np.float64)
    axis = 0 if x.ndim == 1 else axis
    x = np.moveaxis(x, axis, -1)
    n_classes = x.shape[-1]
    w = np.ones(n_classes) if weight is None else np.asarray(weight, np.float64)
    eps = label_smoothing
    lp = log_softmax(x)
    target = np.asarray(target)

    if target.dtype.kind == "f":
        t = np.moveaxis(target.astype(np.float64), axis, -1)
        coef = w * ((1 - eps) * t + eps / n_classes)
        with np.errstate(invalid="ignore"):
            per = -np.where(coef == 0, 0.0, coef * lp).sum(-1)
        if reduction == "none":
            return per
        if reduction == "sum":
            return per.sum()
        return per.sum() / per.size if per.size else np.nan

    y = target.astype(np.int64)
    keep = y != ignore_index
    y_safe = np.where(keep, y, 0)
    w_y = np.where(keep, w[y_safe], 0.0)
    lp_y = np.take_along_axis(lp, y_safe[..., None], -1)[..., 0]
    smooth = -(w * lp).sum(-1)
    per = np.where(keep, -(1 - eps) * w_y * lp_y + eps / n_classes * smooth, 0.0)
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    total = w_y.sum()
    return per.sum() / total if total != 0 else np.nan


def torch_ce(logits, target, weight=None, axis=1, **kwargs):
    """Return PyTorch's loss and autograd grad, with the class axis at ``axis``."""
    x = np.asarray(logits, np.float64)
    moved = x.ndim > 1 and axis % x.ndim != 1
    if moved:
        x = np.moveaxis(x, axis, 1)
        if np.asarray(target).dtype.kind == "f":
            target = np.moveaxis(target, axis, 1)
    xt = torch.tensor(x, requires_grad=True)
    wt = None if weight is None else torch.tensor(np.asarray(weight, np.float64))
    loss = F.cross_entropy(xt, torch.as_tensor(np.asarray(target)), weight=wt, **kwargs)
    loss.sum().backward()
    grad = xt.grad.numpy()
    if moved:
        grad = np.moveaxis(grad, 1, axis)
    return loss.detach().numpy(), grad


def make_case(rng, shape, probs=False, n_ignored=0):
    logits = rng.standard_normal(shape) * 3
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    index_shape = () if len(shape) == 1 else shape[:1] + shape[2:]
    if probs:
        t = rng.random(shape)
        return logits, t / t.sum(axis=0 if len(shape) == 1 else 1, keepdims=True)
    target = rng.integers(0, n_classes, index_shape)
    if n_ignored and target.ndim:
        flat = target.reshape(-1)
        flat[rng.choice(flat.size, min(n_ignored, flat.size), replace=False)] = -100
    return logits, target


def numeric_grad(f, x, h=1e-6):
    """Central differences of the scalar function ``f`` at ``x``."""
    g = np.empty_like(x)
    for idx in np.ndindex(x.shape):
        xp = x.copy()
        xm = x.copy()
        xp[idx] += h
        xm[idx] -= h
        g[idx] = (f(xp) - f(xm)) / (2 * h)
    return g


# Values against the NumPy reference and PyTorch.


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.25])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_labels_match_reference(rng, shape, reduction, smoothing, weighted, dtype):
    logits, target = make_case(rng, shape, n_ignored=2)
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    weight = rng.random(n_classes) + 0.1 if weighted else None
    x = logits.astype(dtype)
    loss = fl.cross_entropy(x, target, weight=weight, label_smoothing=smoothing,
                            reduction=reduction)
    w = None if weight is None else weight.astype(dtype)
    expected = reference_ce(x, target, w, label_smoothing=smoothing, reduction=reduction)
    np.testing.assert_allclose(loss, expected, **TOL[dtype])
    if reduction == "none":
        assert loss.shape == target.shape
        assert loss.dtype == dtype
    else:
        assert type(loss) is dtype


@needs_torch
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
def test_labels_match_torch(rng, shape, reduction, smoothing, weighted):
    logits, target = make_case(rng, shape, n_ignored=3)
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    weight = rng.random(n_classes) + 0.1 if weighted else None
    loss, grad = fl.cross_entropy(logits, target, weight=weight,
                                  label_smoothing=smoothing, reduction=reduction,
                                  return_grad=True)
    t_loss, t_grad = torch_ce(logits, target, weight, label_smoothing=smoothing,
                              reduction=reduction)
    np.testing.assert_allclose(loss, t_loss, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grad, t_grad, rtol=1e-10, atol=1e-14)


@needs_torch
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_probs_match_torch(rng, shape, reduction, smoothing, weighted):
    logits, target = make_case(rng, shape, probs=True)
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    weight = rng.random(n_classes) + 0.1 if weighted else None
    loss, grad = fl.cross_entropy(logits, target, weight=weight,
                                  label_smoothing=smoothing, reduction=reduction,
                                  return_grad=True)
    t_loss, t_grad = torch_ce(logits, target, weight, label_smoothing=smoothing,
                              reduction=reduction)
    np.testing.assert_allclose(loss, t_loss, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grad, t_grad, rtol=1e-10, atol=1e-14)
    expected = reference_ce(logits, target, weight, label_smoothing=smoothing,
                            reduction=reduction)
    np.testing.assert_allclose(loss, expected, rtol=1e-12, atol=1e-14)


@needs_torch
@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_channels_last_matches_torch(rng, probs, reduction):
    logits, target = make_case(rng, (2, 5, 3, 4), probs=probs, n_ignored=2)
    last = np.moveaxis(logits, 1, -1).copy()
    t = np.moveaxis(target, 1, -1).copy() if probs else target
    weight = rng.random(5) + 0.5
    loss, grad = fl.cross_entropy(last, t, weight=weight, label_smoothing=0.1,
                                  axis=-1, reduction=reduction, return_grad=True)
    t_loss, t_grad = torch_ce(last, t, weight, axis=-1, label_smoothing=0.1,
                              reduction=reduction)
    np.testing.assert_allclose(loss, t_loss, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grad, t_grad, rtol=1e-10, atol=1e-14)


def test_channels_last_read_in_place(rng):
    last = rng.standard_normal((2, 3, 4, 5))
    view, base = softmax_module._class_view(last, 3)
    assert base is last
    assert view.shape == (24, 5, 1)
    assert np.shares_memory(view, last)
    strided = rng.standard_normal((2, 3, 4, 10))[..., ::2]
    view, base = softmax_module._class_view(strided, 3)
    assert base is strided
    assert np.shares_memory(view, strided)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_every_axis_matches_reference(rng, axis):
    logits = rng.standard_normal((3, 4, 5))
    n_classes = logits.shape[axis]
    index_shape = tuple(n for k, n in enumerate(logits.shape) if k != axis % 3)
    target = rng.integers(0, n_classes, index_shape)
    loss = fl.cross_entropy(logits, target, axis=axis, reduction="none")
    np.testing.assert_allclose(loss, reference_ce(logits, target, axis=axis,
                                                  reduction="none"), rtol=1e-12)


def test_one_dim_logits_accept_axis_spellings(rng):
    logits = rng.standard_normal(6)
    expected = reference_ce(logits, np.int64(2))
    for axis in (0, 1, -1):
        np.testing.assert_allclose(fl.cross_entropy(logits, 2, axis=axis), expected,
                                   rtol=1e-13)
    losses = fl.cross_entropy(logits, 2, reduction="none")
    assert losses.shape == ()


# Gradients.


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("probs", [False, True])
def test_grad_matches_finite_differences(rng, reduction, probs):
    logits, target = make_case(rng, (4, 3, 2), probs=probs, n_ignored=2)
    weight = rng.random(3) + 0.2
    kwargs = dict(weight=weight, label_smoothing=0.15, reduction=reduction)
    _, grad = fl.cross_entropy(logits, target, return_grad=True, **kwargs)
    numeric = numeric_grad(lambda x: reference_ce(x, target, **kwargs), logits)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_grad_none_is_per_position_derivative(rng):
    logits, target = make_case(rng, (5, 4), n_ignored=1)
    weight = rng.random(4) + 0.2
    _, grad = fl.cross_entropy(logits, target, weight=weight, reduction="none",
                               return_grad=True)
    _, grad_sum = fl.cross_entropy(logits, target, weight=weight, reduction="sum",
                                   return_grad=True)
    np.testing.assert_allclose(grad, grad_sum, rtol=1e-14)


def test_grad_out_is_written_and_returned(rng):
    logits, target = make_case(rng, (2, 3, 4, 5))
    expected = fl.cross_entropy(logits, target, return_grad=True)[1]
    out = np.full_like(logits, np.nan)
    loss, grad = fl.cross_entropy(logits, target, return_grad=True, grad_out=out)
    assert grad is out
    np.testing.assert_array_equal(out, expected)
    # The trailing axes of this grad_out cannot be merged into one stride, so
    # the kernel writes a copy that is then stored into it.
    big = np.full((2, 3, 8, 10), np.nan)
    odd = big[:, :, ::2, :5]
    loss, grad = fl.cross_entropy(logits, target, return_grad=True, grad_out=odd)
    assert grad is odd
    np.testing.assert_array_equal(odd, expected)
    assert np.isnan(big[:, :, 1::2]).all()


def test_grad_out_filled_without_return_grad(rng):
    logits = rng.standard_normal((4, 3))
    target = np.array([0, 2, 1, 1])
    out = np.full((4, 3), np.nan)
    loss = fl.cross_entropy(logits, target, grad_out=out)
    expected_loss, expected_grad = fl.cross_entropy(logits, target, return_grad=True)
    assert np.isscalar(loss)
    assert loss == expected_loss
    np.testing.assert_array_equal(out, expected_grad)
    focal = fl.focal_loss(logits, target, grad_out=out)
    assert focal == fl.focal_loss(logits, target)
    np.testing.assert_array_equal(out, fl.focal_loss(logits, target, return_grad=True)[1])


def test_grad_out_channels_last(rng):
    logits = rng.standard_normal((3, 4, 5))
    target = rng.integers(0, 5, (3, 4))
    out = np.empty_like(logits)
    _, grad = fl.cross_entropy(logits, target, axis=-1, return_grad=True, grad_out=out)
    assert grad is out
    numeric = numeric_grad(lambda x: reference_ce(x, target, axis=-1), logits)
    np.testing.assert_allclose(out, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("reversed_view", [False, True])
def test_grad_out_aliasing_logits(rng, reversed_view):
    logits, target = rng.standard_normal((6, 4)), np.array([0, 1, 2, 3, 1, 2])
    expected_loss, expected_grad = fl.cross_entropy(logits, target, return_grad=True)
    grad_out = logits[::-1] if reversed_view else logits
    loss, grad = fl.cross_entropy(logits, target, return_grad=True, grad_out=grad_out)
    assert grad is grad_out
    assert loss == expected_loss
    np.testing.assert_array_equal(grad, expected_grad)


def test_grad_out_aliasing_probability_target(rng):
    logits, target = make_case(rng, (6, 4), probs=True)
    expected_loss, expected_grad = fl.cross_entropy(logits, target, return_grad=True)
    loss, grad = fl.cross_entropy(logits, target, return_grad=True, grad_out=target)
    assert grad is target
    assert loss == expected_loss
    np.testing.assert_array_equal(grad, expected_grad)


def test_grad_out_aliasing_weight(rng):
    logits, target = make_case(rng, (6, 4))
    expected_loss, expected_grad = fl.cross_entropy(logits, target, weight=logits[0],
                                                    return_grad=True)
    grad_out = logits.copy()
    loss, grad = fl.cross_entropy(logits, target, weight=grad_out[0],
                                  return_grad=True, grad_out=grad_out)
    assert grad is grad_out
    assert loss == expected_loss
    np.testing.assert_array_equal(grad, expected_grad)


# ignore_index, weights and reductions at their edges.


def test_all_ignored(rng):
    logits = rng.standard_normal((4, 3))
    logits[1, 2] = np.nan
    target = np.full(4, -100)
    loss, grad = fl.cross_entropy(logits, target, return_grad=True)
    assert np.isnan(loss)
    assert type(loss) is np.float64
    np.testing.assert_array_equal(grad, 0.0)
    loss, grad = fl.cross_entropy(logits, target, reduction="sum", return_grad=True)
    assert loss == 0.0
    np.testing.assert_array_equal(grad, 0.0)
    losses = fl.cross_entropy(logits, target, reduction="none")
    np.testing.assert_array_equal(losses, 0.0)
    assert np.isnan(fl.cross_entropy(logits, target, label_smoothing=0.5))


def test_ignored_positions_never_contribute(rng):
    logits, target = make_case(rng, (6, 4))
    target[[1, 4]] = 3
    expected_loss, expected_grad = fl.cross_entropy(logits, target, return_grad=True,
                                                    ignore_index=3)
    poisoned = logits.copy()
    poisoned[[1, 4]] = [np.nan, np.inf, -np.inf, 1e300]
    loss, grad = fl.cross_entropy(poisoned, target, return_grad=True, ignore_index=3)
    assert loss == expected_loss
    np.testing.assert_array_equal(grad, expected_grad)
    np.testing.assert_array_equal(grad[[1, 4]], 0.0)


def test_zero_weight_class_never_contributes(rng):
    logits, target = make_case(rng, (6, 4))
    target[:3] = 0
    logits[:3] = np.nan
    weight = np.array([0.0, 1.0, 2.0, 0.5])
    loss, grad = fl.cross_entropy(logits, target, weight=weight, return_grad=True)
    expected = reference_ce(logits[3:], target[3:], weight)
    np.testing.assert_allclose(loss, expected, rtol=1e-13)
    np.testing.assert_array_equal(grad[:3], 0.0)
    loss, grad = fl.cross_entropy(logits[:3], target[:3], weight=weight,
                                  return_grad=True)
    assert np.isnan(loss)
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("unused_weight", [np.nan, np.inf])
def test_unused_class_weight_leaves_grad_finite(rng, unused_weight):
    logits = rng.standard_normal((4, 3))
    target = np.array([0, 1, 1, 0])
    loss, grad = fl.cross_entropy(logits, target, weight=[1.0, 2.0, unused_weight],
                                  return_grad=True)
    expected_loss, expected_grad = fl.cross_entropy(
        logits, target, weight=[1.0, 2.0, 5.0], return_grad=True
    )
    assert loss == expected_loss
    np.testing.assert_array_equal(grad, expected_grad)


def test_probs_zero_mass_class_weight_is_unused(rng):
    logits, target = make_case(rng, (5, 3), probs=True)
    target[:, 2] = 0.0
    target /= target.sum(1, keepdims=True)
    expected_loss, expected_grad = fl.cross_entropy(
        logits, target, weight=[1.0, 2.0, 5.0], return_grad=True
    )
    for unused_weight in (np.nan, np.inf):
        loss, grad = fl.cross_entropy(logits, target, weight=[1.0, 2.0, unused_weight],
                                      return_grad=True)
        assert loss == expected_loss
        np.testing.assert_array_equal(grad, expected_grad)
    # Under smoothing every class has mass, so the NaN weight propagates.
    loss = fl.cross_entropy(logits, target, weight=[1.0, 2.0, np.nan],
                            label_smoothing=0.1)
    assert np.isnan(loss)


def test_ignore_index_inside_class_range(rng):
    logits, target = make_case(rng, (8, 3))
    loss = fl.cross_entropy(logits, target, ignore_index=1, reduction="none")
    np.testing.assert_allclose(loss, reference_ce(logits, target, ignore_index=1,
                                                  reduction="none"), rtol=1e-13)
    np.testing.assert_array_equal(loss[target == 1], 0.0)


def test_probs_ignore_index_unused(rng):
    logits, target = make_case(rng, (4, 3), probs=True)
    a = fl.cross_entropy(logits, target, ignore_index=0)
    b = fl.cross_entropy(logits, target)
    assert a == b


def test_one_class(rng):
    logits = rng.standard_normal((5, 1, 2))
    target = np.zeros((5, 2), np.int64)
    for smoothing in (0.0, 0.4):
        loss, grad = fl.cross_entropy(logits, target, label_smoothing=smoothing,
                                      return_grad=True)
        assert loss == 0.0
        np.testing.assert_array_equal(grad, 0.0)


def test_zero_size_batch():
    logits = np.empty((0, 4))
    target = np.empty(0, np.int64)
    loss, grad = fl.cross_entropy(logits, target, return_grad=True)
    assert np.isnan(loss)
    assert grad.shape == (0, 4)
    assert fl.cross_entropy(logits, target, reduction="sum") == 0.0
    assert fl.cross_entropy(logits, target, reduction="none").shape == (0,)
    probs = np.empty((0, 4))
    assert np.isnan(fl.cross_entropy(logits, probs))
    loss, grad = fl.cross_entropy(logits, probs, return_grad=True)
    assert np.isnan(loss)
    assert grad.shape == (0, 4)
    spatial = fl.cross_entropy(np.empty((2, 3, 0)), np.empty((2, 0), np.int64),
                               reduction="none")
    assert spatial.shape == (2, 0)


# Numerical edge cases.


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_huge_logits_float32(rng, smoothing):
    logits = (rng.choice([-1e4, 1e4], (64, 5)) + rng.standard_normal((64, 5))).astype(
        np.float32
    )
    target = rng.integers(0, 5, 64)
    loss, grad = fl.cross_entropy(logits, target, label_smoothing=smoothing,
                                  return_grad=True)
    assert np.isfinite(loss)
    assert np.all(np.isfinite(grad))
    expected = reference_ce(logits, target, label_smoothing=smoothing)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    numeric = numeric_grad(
        lambda x: reference_ce(x, target, label_smoothing=smoothing),
        logits.astype(np.float64), h=1e-3,
    )
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-5)


def test_nan_logit_propagates(rng):
    logits, target = make_case(rng, (4, 3))
    logits[2, 1] = np.nan
    loss, grad = fl.cross_entropy(logits, target, return_grad=True)
    assert np.isnan(loss)
    assert np.all(np.isnan(grad[2]))
    assert np.all(np.isfinite(grad[[0, 1, 3]]))
    losses = fl.cross_entropy(logits, target, reduction="none")
    assert np.isnan(losses[2])
    assert np.all(np.isfinite(losses[[0, 1, 3]]))


@pytest.mark.parametrize("probs", [False, True])
def test_neg_inf_non_target_logit_is_free(rng, probs):
    logits = rng.standard_normal((4, 4))
    if probs:
        target = rng.random((4, 4))
        target[:, 2] = 0.0
        target /= target.sum(1, keepdims=True)
    else:
        target = np.array([0, 1, 3, 3])
    kept = [0, 1, 3]
    expected = fl.cross_entropy(logits[:, kept], target[:, kept] if probs else
                                np.array([0, 1, 2, 2]), reduction="none")
    logits[:, 2] = -np.inf
    loss, grad = fl.cross_entropy(logits, target, reduction="none", return_grad=True)
    np.testing.assert_allclose(loss, expected, rtol=1e-14)
    np.testing.assert_array_equal(grad[:, 2], 0.0)
    assert np.all(np.isfinite(grad))


def test_neg_inf_target_logit_costs_inf():
    logits = np.array([[-np.inf, 0.0, 1.0]])
    loss, grad = fl.cross_entropy(logits, np.array([0]), return_grad=True)
    assert loss == np.inf
    np.testing.assert_allclose(grad, [[-1.0, 1 / (1 + np.e), np.e / (1 + np.e)]],
                               rtol=1e-15)


@pytest.mark.parametrize("probs", [False, True])
def test_pos_inf_target_logit_is_free(probs):
    logits = np.array([[np.inf, 0.0, -1.0], [2.0, 0.0, 1.0]])
    target = np.array([0, 2])
    if probs:
        target = np.eye(3)[target]
    loss, grad = fl.cross_entropy(logits, target, reduction="none", return_grad=True)
    finite_loss, finite_grad = fl.cross_entropy(
        np.where(np.isinf(logits), 1e4, logits), target, reduction="none",
        return_grad=True,
    )
    assert loss[0] == 0.0
    np.testing.assert_array_equal(loss, finite_loss)
    np.testing.assert_array_equal(grad, finite_grad)


def test_target_near_certain_keeps_precision():
    logits = np.array([[40.0, 0.0, 0.0]])
    _, grad = fl.cross_entropy(logits, np.array([0]), return_grad=True)
    # 1 - p_0 = 2 e^-40 / (1 + 2 e^-40), which p_0 - 1 would round to 0.
    np.testing.assert_allclose(grad[0, 0], -2 * np.exp(-40.0), rtol=1e-14)
    loss = fl.cross_entropy(logits, np.array([0]))
    np.testing.assert_allclose(loss, np.log1p(2 * np.exp(-40.0)), rtol=1e-14)


@pytest.mark.parametrize("probs", [False, True])
def test_float16_computed_in_float32(rng, probs):
    logits, target = make_case(rng, (6, 4, 3), probs=probs)
    x16 = logits.astype(np.float16)
    t = target.astype(np.float16) if probs else target
    loss, grad = fl.cross_entropy(x16, t, return_grad=True)
    assert type(loss) is np.float32
    assert grad.dtype == np.float32
    t32 = t.astype(np.float32) if probs else t
    loss32, grad32 = fl.cross_entropy(x16.astype(np.float32), t32, return_grad=True)
    assert loss == loss32
    np.testing.assert_array_equal(grad, grad32)


def test_float32_probability_cast_overflow_is_inf():
    # 1e300 has no float32 value, so the target becomes inf, with no warning.
    logits = np.zeros((1, 2), np.float32)
    target = np.array([[1e300, 0.0]])
    loss = fl.cross_entropy(logits, target, reduction="sum")
    assert type(loss) is np.float32
    assert loss == np.inf


def test_float32_loss_sum_overflow_is_inf():
    logits = np.array([[3e38, -3e38]] * 4, np.float32)
    loss = fl.cross_entropy(logits, np.ones(4, np.int64), reduction="sum")
    assert type(loss) is np.float32
    assert loss == np.inf


def test_integer_logits_computed_in_float64(rng):
    logits = rng.integers(-3, 4, (5, 3))
    target = rng.integers(0, 3, 5)
    loss = fl.cross_entropy(logits, target)
    assert type(loss) is np.float64
    np.testing.assert_allclose(loss, reference_ce(logits, target), rtol=1e-13)


# Layouts, dtypes and byte order.


def _layouts(x):
    yield "f-order", np.asfortranarray(x)
    big = np.zeros(tuple(2 * n for n in x.shape))
    strided = big[tuple(slice(None, None, 2) for _ in x.shape)]
    strided[...] = x
    yield "strided", strided
    flipped = np.ascontiguousarray(x[::-1, :, ::-1])
    yield "negative", flipped[::-1, :, ::-1]
    readonly = x.copy()
    readonly.flags.writeable = False
    yield "read-only", readonly
    yield "transposed", np.ascontiguousarray(x.transpose(2, 1, 0)).transpose(2, 1, 0)


@pytest.mark.parametrize("probs", [False, True])
def test_layouts_bit_identical(rng, probs):
    logits, target = make_case(rng, (5, 4, 6), probs=probs, n_ignored=3)
    weight = rng.random(4)
    kwargs = dict(weight=weight, label_smoothing=0.1, return_grad=True)
    expected = fl.cross_entropy(logits, target, **kwargs)
    expected_none = fl.cross_entropy(logits, target, reduction="none", **kwargs)
    targets = list(_layouts(target)) if probs else [("c", target)]
    for name, x in _layouts(logits):
        for tname, t in targets:
            loss, grad = fl.cross_entropy(x, t, **kwargs)
            assert loss == expected[0], (name, tname)
            np.testing.assert_array_equal(grad, expected[1], err_msg=name)
            losses, _ = fl.cross_entropy(x, t, reduction="none", **kwargs)
            np.testing.assert_array_equal(losses, expected_none[0], err_msg=name)


def test_strided_label_targets(rng):
    logits, target = make_case(rng, (5, 4, 6))
    big = np.full((10, 12), 99)
    big[::2, ::2] = target
    expected = fl.cross_entropy(logits, target, reduction="none")
    np.testing.assert_array_equal(
        fl.cross_entropy(logits, big[::2, ::2], reduction="none"), expected
    )
    np.testing.assert_array_equal(
        fl.cross_entropy(logits, np.asfortranarray(target), reduction="none"), expected
    )


def test_broadcast_logits(rng):
    row = rng.standard_normal(5)
    logits = np.broadcast_to(row, (7, 5))
    target = rng.integers(0, 5, 7)
    loss, grad = fl.cross_entropy(logits, target, return_grad=True)
    loss_c, grad_c = fl.cross_entropy(np.ascontiguousarray(logits), target,
                                      return_grad=True)
    assert loss == loss_c
    np.testing.assert_array_equal(grad, grad_c)


def test_inputs_not_modified(rng):
    logits, target = make_case(rng, (5, 4, 3))
    weight = rng.random(4)
    copies = [logits.copy(), target.copy(), weight.copy()]
    fl.cross_entropy(logits, target, weight=weight, label_smoothing=0.2,
                     return_grad=True)
    for before, after in zip(copies, [logits, target, weight]):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize(
    "dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64,
              np.uint64]
)
def test_every_integer_target_dtype(rng, dtype):
    logits, target = make_case(rng, (6, 4, 3))
    expected = fl.cross_entropy(logits, target, reduction="none")
    np.testing.assert_array_equal(
        fl.cross_entropy(logits, target.astype(dtype), reduction="none"), expected
    )


def test_uint8_mask_with_255_ignored(rng):
    logits = rng.standard_normal((2, 3, 4, 4))
    mask = rng.integers(0, 3, (2, 4, 4)).astype(np.uint8)
    mask[0, :2] = 255
    loss = fl.cross_entropy(logits, mask, ignore_index=255)
    expected = reference_ce(logits, mask.astype(np.int64), ignore_index=255)
    np.testing.assert_allclose(loss, expected, rtol=1e-13)
    with pytest.raises(ValueError, match=r"got 255 at position \(0, 0, 0\)"):
        fl.cross_entropy(logits, mask)


def test_non_native_byte_order(rng):
    logits, target = make_case(rng, (5, 4, 3), n_ignored=2)
    weight = rng.random(4)
    expected = fl.cross_entropy(logits, target, weight=weight, return_grad=True)
    swapped = [a.astype(a.dtype.newbyteorder()) for a in (logits, target, weight)]
    loss, grad = fl.cross_entropy(swapped[0], swapped[1], weight=swapped[2],
                                  return_grad=True)
    assert loss == expected[0]
    np.testing.assert_array_equal(grad, expected[1])
    assert grad.dtype.isnative
    probs = make_case(rng, (5, 4, 3), probs=True)[1]
    expected = fl.cross_entropy(logits, probs)
    assert fl.cross_entropy(logits, probs.astype(">f8")) == expected


# Threads.


@pytest.mark.parametrize("layout", ["classes-axis-1", "channels-last", "probs"])
def test_thread_counts_bit_identical(rng, layout):
    if layout == "channels-last":
        logits = rng.standard_normal((40, 300, 4))
        target = rng.integers(-1, 4, (40, 300))
        axis = -1
    else:
        logits = rng.standard_normal((3, 4, 60, 70))
        target = rng.integers(-1, 4, (3, 60, 70))
        axis = 1
    if layout == "probs":
        target = rng.random(logits.shape)
    weight = rng.random(4) + 0.5
    kwargs = dict(weight=weight, ignore_index=-1, label_smoothing=0.05, axis=axis)
    results = [
        fl.cross_entropy(logits, target, return_grad=True, n_threads=n, **kwargs)
        for n in THREAD_COUNTS
    ]
    for loss, grad in results[1:]:
        assert loss == results[0][0]
        np.testing.assert_array_equal(grad, results[0][1])
    losses = [fl.cross_entropy(logits, target, reduction="sum", n_threads=n, **kwargs)
              for n in (*THREAD_COUNTS, None)]
    assert len(set(losses)) == 1
    np.testing.assert_allclose(results[0][0], reference_ce(logits, target, **kwargs),
                               rtol=1e-12)


# Bad input.


def test_bad_class_index_names_value_and_position(rng):
    logits = rng.standard_normal((2, 3, 4))
    target = rng.integers(0, 3, (2, 4))
    target[1, 2] = 3
    target[1, 3] = -5
    with pytest.raises(ValueError, match=r"\[0, 3\).*got 3 at position \(1, 2\)"):
        fl.cross_entropy(logits, target)
    with pytest.raises(ValueError, match=r"got 3 at position \(1, 2\)"):
        fl.cross_entropy(logits, target, return_grad=True)
    target[1, 2] = 0
    with pytest.raises(ValueError, match=r"got -5 at position \(1, 3\)"):
        fl.cross_entropy(logits, target, reduction="none")
    with pytest.raises(ValueError, match=r"got 3 at position \(\)"):
        fl.cross_entropy(logits[0, :, 0], 3)


def test_bad_class_index_leaves_grad_out_untouched(rng):
    logits = rng.standard_normal((4, 3))
    out = np.full_like(logits, 7.0)
    with pytest.raises(ValueError, match="got 9 at position"):
        fl.cross_entropy(logits, np.array([0, 9, 1, 2]), return_grad=True,
                         grad_out=out)
    np.testing.assert_array_equal(out, 7.0)


def test_float_labels_raise_type_error(rng):
    logits = rng.standard_normal((4, 3))
    with pytest.raises(TypeError, match=r"\.astype\(np\.int64\)"):
        fl.cross_entropy(logits, np.array([0.0, 1.0, 2.0, 1.0]))


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(target=np.zeros(5, np.int64)), ValueError, r"shape \(4,\).*got \(5,\)"),
        (dict(target=np.zeros((4, 1), np.int64)), ValueError, r"got \(4, 1\)"),
        (dict(target=np.zeros((4, 2))), ValueError, r"\(4, 3\) \(class prob"),
        (dict(target=np.zeros(4, bool)), TypeError, "integer class indices"),
        (dict(target=np.zeros(4, complex)), TypeError, "target must be an array of real"),
        (dict(logits=np.zeros((4, 3), complex)), TypeError, "logits must be"),
        (dict(logits=np.float64(1.0)), ValueError, "0-d"),
        (dict(logits=np.zeros((4, 0))), ValueError, "at least one class"),
        (dict(weight=np.ones(4)), ValueError, r"weight must have shape \(3,\)"),
        (dict(weight=np.ones((1, 3))), ValueError, r"weight must have shape"),
        (dict(weight=["a", "b", "c"]), TypeError, "weight must be an array"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0.0, 1.0\]"),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
        (dict(label_smoothing="0.1"), TypeError, "label_smoothing must be a real"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(axis=2), ValueError, "axis 2 is out of bounds"),
        (dict(axis=1.0), TypeError, "axis must be an int"),
        (dict(axis=True), TypeError, "axis must be an int, got bool"),
        (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
        (dict(ignore_index=True), TypeError, "ignore_index must be an int"),
        (dict(n_threads=0), ValueError, "n_threads"),
        (dict(grad_out=np.empty((3, 4))), ValueError, r"grad_out must have shape"),
        (dict(return_grad=True, grad_out=np.empty((3, 4))), ValueError,
         r"grad_out must have shape \(4, 3\)"),
        (dict(return_grad=True, grad_out=np.empty((4, 3), np.float32)), ValueError,
         "grad_out must have dtype float64"),
        (dict(return_grad=True, grad_out=np.empty((4, 3)).tolist()), TypeError,
         "grad_out must be a numpy.ndarray"),
    ],
)
def test_bad_input_raises(rng, kwargs, error, pattern):
    args = dict(logits=rng.standard_normal((4, 3)), target=np.array([0, 1, 2, 1]))
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        fl.cross_entropy(args.pop("logits"), args.pop("target"), **args)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_numpy_str_reduction(rng, reduction):
    logits, target = rng.standard_normal((4, 3)), np.array([0, 1, 2, 1])
    expected = fl.cross_entropy(logits, target, reduction=reduction)
    np.testing.assert_array_equal(
        fl.cross_entropy(logits, target, reduction=np.str_(reduction)), expected
    )


def test_read_only_grad_out_rejected(rng):
    out = np.empty((4, 3))
    out.flags.writeable = False
    with pytest.raises(ValueError, match="grad_out must be writeable"):
        fl.cross_entropy(rng.standard_normal((4, 3)), np.array([0, 1, 2, 1]),
                         return_grad=True, grad_out=out)


def test_one_dim_logits_bad_axis():
    with pytest.raises(ValueError, match="axis must be 0, 1 or -1 for 1-d logits"):
        fl.cross_entropy(np.zeros(3), 0, axis=2)


# The tile kernel: axis-1 logits are read in place, every other layout is
# packed tile by tile, and both must run the same arithmetic.


def reference_ce_grad(logits, target, weight=None, axis=1):
    """Float64 gradient of the mean class-index cross-entropy (no smoothing)."""
    x = np.moveaxis(np.asarray(logits, np.float64), axis, -1)
    w = np.ones(x.shape[-1]) if weight is None else np.asarray(weight, np.float64)
    p = np.exp(log_softmax(x))
    onehot = np.eye(x.shape[-1])[target]
    w_y = w[target]
    grad = w_y[..., None] * (p - onehot) / w_y.sum()
    return np.moveaxis(grad, -1, axis)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tile_layouts_bit_identical(rng, dtype):
    # 2 * 40 * 75 = 6000 positions: two reduction blocks, tiles that end at
    # the row ends in place and cross them when packed.
    logits = (3 * rng.standard_normal((2, 7, 40, 75))).astype(dtype)
    target = rng.integers(0, 7, (2, 40, 75))
    target[0, 3, :10] = -100
    weight = rng.random(7)
    for kwargs in (dict(), dict(weight=weight, label_smoothing=0.2)):
        expected = fl.cross_entropy(logits, target, return_grad=True, **kwargs)
        expected_none = fl.cross_entropy(logits, target, reduction="none", **kwargs)
        last = np.ascontiguousarray(np.moveaxis(logits, 1, -1))
        loss, grad = fl.cross_entropy(last, target, axis=-1, return_grad=True, **kwargs)
        assert loss == expected[0]
        np.testing.assert_array_equal(np.moveaxis(grad, -1, 1), expected[1])
        losses = fl.cross_entropy(last, target, axis=-1, reduction="none", **kwargs)
        np.testing.assert_array_equal(losses, expected_none)
        strided = np.repeat(logits, 2, axis=3)[..., ::2]
        loss, grad = fl.cross_entropy(strided, target, return_grad=True, **kwargs)
        assert loss == expected[0]
        np.testing.assert_array_equal(grad, expected[1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tile_matches_reference(rng, dtype):
    logits = (4 * rng.standard_normal((3, 11, 17, 19))).astype(dtype)
    target = rng.integers(0, 11, (3, 17, 19))
    weight = rng.random(11) + 0.1
    loss, grad = fl.cross_entropy(logits, target, weight=weight, return_grad=True)
    np.testing.assert_allclose(loss, reference_ce(logits, target, weight), **TOL[dtype])
    np.testing.assert_allclose(grad, reference_ce_grad(logits, target, weight),
                               **TOL[dtype])


def test_f_order_rows_match_c_order(rng):
    # F-order (N, C) logits have contiguous positions and run in place.
    logits = rng.standard_normal((300, 9))
    target = rng.integers(0, 9, 300)
    expected = fl.cross_entropy(logits, target, return_grad=True)
    loss, grad = fl.cross_entropy(np.asfortranarray(logits), target, return_grad=True)
    assert loss == expected[0]
    np.testing.assert_array_equal(grad, expected[1])
    np.testing.assert_allclose(loss, reference_ce(logits, target), rtol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_many_classes_use_smallest_tile(rng, dtype):
    # Past 1024 classes a tile holds its minimum of 16 positions.
    logits = (2 * rng.standard_normal((37, 1500))).astype(dtype)
    target = rng.integers(0, 1500, 37)
    loss, grad = fl.cross_entropy(logits, target, return_grad=True)
    np.testing.assert_allclose(loss, reference_ce(logits, target), **TOL[dtype])
    np.testing.assert_allclose(grad, reference_ce_grad(logits, target), **TOL[dtype])
    loss_t, grad_t = fl.cross_entropy(np.ascontiguousarray(logits.T), target, axis=0,
                                      return_grad=True)
    assert loss_t == loss
    np.testing.assert_array_equal(grad_t.T, grad)


def test_tile_threads_bit_identical(rng):
    # Enough work for several threads; every count gives the same bits.
    logits = rng.standard_normal((4, 5, 90, 100)).astype(np.float32)
    target = rng.integers(0, 5, (4, 90, 100))
    results = [fl.cross_entropy(logits, target, return_grad=True, n_threads=n)
               for n in THREAD_COUNTS]
    for loss, grad in results[1:]:
        assert loss == results[0][0]
        np.testing.assert_array_equal(grad, results[0][1])


@pytest.mark.parametrize("order", ["C", "F"])
def test_pos_inf_logits_give_the_limit(order):
    # One +inf logit takes all the probability; two share it equally.
    logits = np.array([[np.inf, 0.0, 0.0], [np.inf, np.inf, 0.0]])
    target = np.array([1, 2])
    x = np.asarray(logits, order=order)
    losses, grad = fl.cross_entropy(x, target, reduction="none",
                                    return_grad=True)
    np.testing.assert_array_equal(losses, [np.inf, np.inf])
    np.testing.assert_array_equal(grad, [[1.0, -1.0, 0.0], [0.5, 0.5, -1.0]])


@pytest.mark.parametrize("probs", [False, True])
def test_pos_inf_target_logit_shares_probability(probs):
    # Two +inf logits share the probability, so the target gets 1/2. PyTorch
    # 2.13 returns NaN (inf - inf) for any +inf target logit.
    logits = np.array([[np.inf, np.inf, 0.0]])
    target = np.array([0])
    if probs:
        target = np.eye(3)[target]
    losses, grad = fl.cross_entropy(logits, target, reduction="none",
                                    return_grad=True)
    np.testing.assert_allclose(losses, [np.log(2.0)], rtol=1e-15)
    np.testing.assert_array_equal(grad, [[-0.5, 0.5, 0.0]])


@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("layout", ["2-d", "channels-last", "positions-contiguous"])
def test_pos_inf_max_with_smoothing(probs, layout):
    # A finite logit costs inf under smoothing; the gradient is the limit.
    logits = np.array([[np.inf, 0.0, -1.0], [2.0, np.inf, 1.0], [2.0, 0.0, 1.0]])
    target = np.array([0, 2, 1])
    if probs:
        target = np.eye(3)[target]
    axis = 1
    if layout == "channels-last":
        # The tile kernel packs this layout into a class-major buffer.
        logits, axis = logits[None], -1
        target = target[None]
    elif layout == "positions-contiguous":
        # (1, C, 3): the tile kernel reads the positions in place.
        logits = np.ascontiguousarray(logits.T)[None]
        target = np.ascontiguousarray(np.moveaxis(target, -1, 0))[None] if probs \
            else target[None]
    kwargs = dict(label_smoothing=0.1, axis=axis, reduction="none", return_grad=True)
    loss, grad = fl.cross_entropy(logits, target, **kwargs)
    finite_loss, finite_grad = fl.cross_entropy(
        np.where(np.isinf(logits), 1e4, logits), target, **kwargs
    )
    np.testing.assert_array_equal(loss.ravel()[:2], np.inf)
    assert loss.ravel()[2] == finite_loss.ravel()[2]
    np.testing.assert_array_equal(grad, finite_grad)


@pytest.mark.parametrize("channels_last", [False, True])
def test_nan_logit_poisons_only_its_position(rng, channels_last):
    logits = rng.standard_normal((3, 4, 50))
    target = rng.integers(0, 4, (3, 50))
    logits[1, 2, 7] = np.nan
    x, axis = (np.ascontiguousarray(np.moveaxis(logits, 1, -1)), -1) if channels_last \
        else (logits, 1)
    losses, grad = fl.cross_entropy(x, target, axis=axis, reduction="none",
                                    return_grad=True)
    grad = np.moveaxis(grad, -1, 1) if channels_last else grad
    assert np.isnan(losses[1, 7])
    assert np.all(np.isnan(grad[1, :, 7]))
    finite = np.ones(losses.shape, bool)
    finite[1, 7] = False
    assert np.all(np.isfinite(losses[finite]))
    assert np.all(np.isfinite(np.moveaxis(grad, 1, -1)[finite]))


def test_mean_scan_skipped_for_sum_still_raises(rng):
    # Without grad_out and without the mean, a bad target is found in the
    # main pass; the error is the same.
    logits = rng.standard_normal((5, 3))
    with pytest.raises(ValueError, match=r"got 7 at position \(2,\)"):
        fl.cross_entropy(logits, np.array([0, 1, 7, 2, 1]), reduction="sum",
                         return_grad=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "shape, axis",
    [((5, 4), 1), ((3, 4, 6), 1), ((3, 6, 4), -1), ((8193, 4), 1), ((8192, 4), 1)],
    ids=["2d", "3d", "channels-last", "at-threshold", "below-threshold"],
)
def test_plain_path_matches_general_path(dtype, reduction, shape, axis):
    # Plain C-contiguous arrays take a short path. A target given as a list
    # takes the general one, which must give the same bits. The last two
    # shapes have 32772 and 32768 logits, on both sides of the threshold
    # below which n_threads=None is not resolved.
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(dtype)
    class_axis = axis % len(shape)
    index_shape = shape[:class_axis] + shape[class_axis + 1 :]
    t = rng.integers(0, shape[class_axis], index_shape)
    t.flat[0] = -100
    expected = fl.cross_entropy(x, t.tolist(), axis=axis, reduction=reduction,
                                return_grad=True)
    for n_threads in (None, 1, 2):
        loss, grad = fl.cross_entropy(x, t, axis=axis, reduction=reduction,
                                      return_grad=True, n_threads=n_threads)
        assert np.asarray(loss).tobytes() == np.asarray(expected[0]).tobytes()
        assert grad.tobytes() == expected[1].tobytes()
    loss_only = fl.cross_entropy(x, t, axis=axis, reduction=reduction)
    assert np.asarray(loss_only).tobytes() == np.asarray(expected[0]).tobytes()


def test_plain_path_errors():
    x = np.zeros((4, 3), np.float32)
    message = r"class indices in \[0, 3\).*got 3 at position \(2,\)"
    with pytest.raises(ValueError, match=message):
        fl.cross_entropy(x, np.array([0, 1, 3, 2]))
    with pytest.raises(ValueError, match="n_threads must be None or an int >= 1"):
        fl.cross_entropy(x, np.array([0, 1, 2, 2]), n_threads=0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fl.cross_entropy(x, np.array([0, 1, 2, 2]), reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        fl.cross_entropy(x, np.array([0, 1, 2, 2]), label_smoothing=1.5)
    # All ignored: the mean is NaN and its gradient zero.
    loss, grad = fl.cross_entropy(x, np.full(4, -100), return_grad=True)
    assert np.isnan(loss)
    assert not grad.any()


def test_plain_path_float32_overflow():
    # A loss beyond float32's range becomes inf, with no warning.
    x = np.array([[3e38, -3e38]], np.float32)
    loss = fl.cross_entropy(x, np.array([1]), reduction="sum")
    assert loss.dtype == np.float32
    assert loss == np.inf
