from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastloss as fl

from conftest import THREAD_COUNTS

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - torch is optional
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

LOSSES = {
    "dice": fl.dice_loss,
    "jaccard": fl.jaccard_loss,
    "tversky": fl.tversky_loss,
}
TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-14)}


# ---------------------------------------------------------------- references


def score_terms(name, inter, p_sum, y_sum, alpha=0.5, beta=0.5):
    """Return the numerator (without smooth) and the denominator terms."""
    if name == "dice":
        return 2 * inter, p_sum + y_sum
    if name == "jaccard":
        return inter, p_sum + y_sum - inter
    fp = p_sum - inter
    fn = y_sum - inter
    return inter, inter + alpha * fp + beta * fn


def numpy_reference(name, logits, target, mode="multiclass", smooth=0.0, eps=1e-7,
                    ignore_index=None, axis=1, per_sample=False, reduction="mean",
                    alpha=0.5, beta=0.5):
    """Overlap loss in float64 NumPy, written from the formulas."""
    z = np.asarray(logits, np.float64)
    t = np.asarray(target)
    if mode == "binary" and t.shape == z.shape:
        z = z.reshape(z.shape[0], 1, -1)
        y = t.reshape(z.shape).astype(np.float64)
        keep = np.ones(y.shape, bool) if ignore_index is None else y != ignore_index
    else:
        z = np.moveaxis(z, axis, 1)
        z = z.reshape(z.shape[0], z.shape[1], -1)
        if mode == "multiclass" and t.ndim == np.ndim(logits):
            y = np.moveaxis(t.astype(np.float64), axis, 1).reshape(z.shape)
            keep = np.ones(y.shape, bool)
        elif mode == "multiclass":
            flat = t.reshape(z.shape[0], -1)
            keep_pos = np.ones(flat.shape, bool) if ignore_index is None else flat != ignore_index
            y = (flat[:, None, :] == np.arange(z.shape[1])[None, :, None]).astype(float)
            keep = np.broadcast_to(keep_pos[:, None, :], y.shape)
        elif mode == "binary":
            y = t.reshape(z.shape).astype(np.float64)
            keep = np.ones(y.shape, bool) if ignore_index is None else y != ignore_index
        else:
            y = np.moveaxis(t.astype(np.float64), axis, 1).reshape(z.shape)
            keep = np.ones(y.shape, bool) if ignore_index is None else y != ignore_index
    if mode == "multiclass":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
    else:
        p = np.exp(-np.logaddexp(0.0, -z))
    p = np.where(keep, p, 0.0)
    y = np.where(keep, y, 0.0)
    dims = (2,) if per_sample else (0, 2)
    inter = (p * y).sum(dims)
    p_sum = p.sum(dims)
    y_sum = y.sum(dims)
    num, den = score_terms(name, inter, p_sum, y_sum, alpha, beta)
    loss = 1.0 - (num + smooth) / np.maximum(den + smooth, eps)
    loss = np.where(y_sum > 0, loss, 0.0)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def smp_reference(name, logits, target, mode="multiclass", smooth=0.0, eps=1e-7,
                  ignore_index=None, axis=1, per_sample=False, reduction="mean",
                  alpha=0.5, beta=0.5):
    """segmentation_models_pytorch's formulas in torch; returns (loss, grad).

    Masking and one-hot follow smp's DiceLoss.forward; ``per_sample`` sums
    over dims ``(2,)`` in place of ``(0, 2)``.
    """
    z = torch.tensor(np.asarray(logits, np.float64), requires_grad=True)
    t = torch.tensor(np.asarray(target))
    bs = z.shape[0]
    if mode == "binary" and t.shape == z.shape:
        y_pred = F.logsigmoid(z).exp().view(bs, 1, -1)
        y_true = t.view(bs, 1, -1).double()
        if ignore_index is not None:
            mask = y_true != ignore_index
            y_pred, y_true = y_pred * mask, y_true * mask
    else:
        zm = z.movedim(axis, 1)
        n_classes = zm.shape[1]
        if mode == "multiclass":
            y_pred = zm.log_softmax(dim=1).exp().reshape(bs, n_classes, -1)
        else:
            y_pred = F.logsigmoid(zm).exp().reshape(bs, n_classes, -1)
        if mode == "multiclass" and t.dim() == z.dim():
            y_true = t.movedim(axis, 1).reshape(bs, n_classes, -1).double()
        elif mode == "multiclass":
            y_true = t.reshape(bs, -1)
            if ignore_index is not None:
                mask = y_true != ignore_index
                y_pred = y_pred * mask.unsqueeze(1)
                y_true = F.one_hot((y_true * mask).long(), n_classes).permute(0, 2, 1)
                y_true = y_true * mask.unsqueeze(1)
            else:
                y_true = F.one_hot(y_true.long(), n_classes).permute(0, 2, 1)
            y_true = y_true.double()
        else:
            y_true = t.movedim(axis, 1).reshape(bs, n_classes, -1).double()
            if ignore_index is not None:
                mask = y_true != ignore_index
                y_pred, y_true = y_pred * mask, y_true * mask
    dims = (2,) if per_sample else (0, 2)
    inter = torch.sum(y_pred * y_true, dim=dims)
    if name == "tversky":
        fp = torch.sum(y_pred * (1.0 - y_true), dim=dims)
        fn = torch.sum((1 - y_pred) * y_true, dim=dims)
        score = (inter + smooth) / (inter + alpha * fp + beta * fn + smooth).clamp_min(eps)
    else:
        cardinality = torch.sum(y_pred + y_true, dim=dims)
        if name == "dice":
            score = (2.0 * inter + smooth) / (cardinality + smooth).clamp_min(eps)
        else:
            score = (inter + smooth) / (cardinality - inter + smooth).clamp_min(eps)
    loss = (1.0 - score) * (y_true.sum(dims) > 0).double()
    if reduction == "mean":
        out = loss.mean()
    elif reduction == "sum":
        out = loss.sum()
    else:
        out = loss
    out.sum().backward()
    return out.detach().numpy(), z.grad.numpy()


def finite_difference(fn, x, h=1e-5):
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


def make_case(rng, mode, shape=(3, 4, 5, 6), axis=1, absent=(2,), ignore=None,
              binary_layout="channel"):
    """Return logits and a target for ``mode``, with ``absent`` classes unused."""
    axis = axis % len(shape)
    n_classes = shape[axis]
    logits = 2.0 * rng.standard_normal(shape)
    index_shape = shape[:axis] + shape[axis + 1 :]
    if mode == "multiclass":
        present = [c for c in range(n_classes) if c not in absent]
        target = rng.choice(present, size=index_shape)
        if ignore is not None:
            target[rng.random(index_shape) < 0.2] = ignore
        return logits, target
    if mode == "multilabel":
        target = (rng.random(shape) < 0.4).astype(np.float64)
        for c in absent:
            np.moveaxis(target, axis, 0)[c] = 0.0
        if ignore is not None:
            target[rng.random(shape) < 0.2] = ignore
        return logits, target
    if binary_layout == "channel":
        logits = logits[:, :1]
        target = (rng.random(index_shape) < 0.4).astype(np.float64)
    else:
        target = (rng.random(shape) < 0.4).astype(np.float64)
    if ignore is not None:
        target[rng.random(target.shape) < 0.2] = ignore
    return logits, target


CASES = [
    ("multiclass", {}),
    ("multiclass", dict(ignore=-1)),
    ("multiclass", dict(ignore=255, axis=-1, shape=(3, 5, 6, 4))),
    ("multilabel", {}),
    ("multilabel", dict(ignore=-1)),
    ("multilabel", dict(axis=-1, shape=(3, 5, 6, 4))),
    ("binary", {}),
    ("binary", dict(ignore=255)),
    ("binary", dict(binary_layout="own")),
    ("binary", dict(binary_layout="own", ignore=-1)),
]
CASE_IDS = [f"{mode}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for mode, kw in CASES]


def case_kwargs(case_kw):
    kwargs = {}
    if "ignore" in case_kw:
        kwargs["ignore_index"] = case_kw["ignore"]
    if "axis" in case_kw:
        kwargs["axis"] = case_kw["axis"]
    return kwargs


def loss_kwargs(name):
    return dict(alpha=0.3, beta=0.7) if name == "tversky" else {}


# ------------------------------------------------------------------- values


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("mode, case_kw", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_numpy_reference(rng, name, mode, case_kw, per_sample, reduction):
    logits, target = make_case(rng, mode, **case_kw)
    kwargs = dict(mode=mode, per_sample=per_sample, reduction=reduction, smooth=0.5,
                  **case_kwargs(case_kw), **loss_kwargs(name))
    loss = LOSSES[name](logits, target, **kwargs)
    expected = numpy_reference(name, logits, target, **kwargs)
    np.testing.assert_allclose(loss, expected, rtol=1e-12, atol=1e-14)


@needs_torch
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("mode, case_kw", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_smp_in_torch(rng, name, mode, case_kw, per_sample, reduction):
    logits, target = make_case(rng, mode, **case_kw)
    kwargs = dict(mode=mode, per_sample=per_sample, reduction=reduction,
                  **case_kwargs(case_kw), **loss_kwargs(name))
    loss, grad = LOSSES[name](logits, target, return_grad=True, **kwargs)
    expected_loss, expected_grad = smp_reference(name, logits, target, **kwargs)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-10, atol=1e-15)


@needs_torch
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("mode", ["multiclass", "multilabel", "binary"])
def test_eps_clamp_matches_smp(rng, name, mode):
    # An eps above some denominators makes clamp_min cut their gradient.
    logits, target = make_case(rng, mode, shape=(2, 4, 3, 3))
    kwargs = dict(mode=mode, eps=8.0, per_sample=True, **loss_kwargs(name))
    loss, grad = LOSSES[name](logits, target, return_grad=True, **kwargs)
    expected_loss, expected_grad = smp_reference(name, logits, target, **kwargs)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-10, atol=1e-15)


@needs_torch
@pytest.mark.parametrize("name", LOSSES)
def test_probability_targets_match_smp(rng, name):
    logits = rng.standard_normal((2, 4, 5, 3))
    labels = rng.integers(0, 3, size=(2, 5, 3))
    one_hot = np.moveaxis(np.eye(4)[labels], -1, 1)
    soft = rng.dirichlet(np.ones(4), size=(2, 5, 3))
    soft = np.moveaxis(soft, -1, 1)
    for target in (one_hot, soft):
        loss, grad = LOSSES[name](logits, target, return_grad=True, **loss_kwargs(name))
        expected_loss, expected_grad = smp_reference(
            name, logits, target, **loss_kwargs(name)
        )
        np.testing.assert_allclose(loss, expected_loss, rtol=1e-12)
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-10, atol=1e-15)
    # A one-hot target gives what its class indices give.
    np.testing.assert_allclose(
        LOSSES[name](logits, one_hot), LOSSES[name](logits, labels), rtol=1e-13
    )


@needs_torch
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtypes_match_smp(rng, name, dtype):
    logits, target = make_case(rng, "multiclass", ignore=-1)
    loss, grad = LOSSES[name](logits.astype(dtype), target, ignore_index=-1,
                              return_grad=True)
    expected_loss, expected_grad = smp_reference(
        name, logits.astype(dtype), target, ignore_index=-1
    )
    assert type(loss) is np.dtype(dtype).type
    assert grad.dtype == dtype
    np.testing.assert_allclose(loss, expected_loss, **TOL[dtype])
    np.testing.assert_allclose(grad, expected_grad, rtol=TOL[dtype]["rtol"] * 10,
                               atol=TOL[dtype]["atol"])


def test_tversky_half_half_is_dice_with_twice_smooth(rng):
    for mode in ("multiclass", "multilabel", "binary"):
        logits, target = make_case(rng, mode, ignore=-1)
        for smooth in (0.0, 0.3, 2.0):
            for per_sample in (False, True):
                kwargs = dict(mode=mode, ignore_index=-1, per_sample=per_sample,
                              reduction="none", return_grad=True)
                tv, tv_grad = fl.tversky_loss(logits, target, alpha=0.5, beta=0.5,
                                              smooth=smooth, **kwargs)
                dice, dice_grad = fl.dice_loss(logits, target, smooth=2 * smooth,
                                               **kwargs)
                np.testing.assert_allclose(tv, dice, rtol=1e-13, atol=1e-15)
                np.testing.assert_allclose(tv_grad, dice_grad, rtol=1e-11, atol=1e-16)


def test_tversky_one_one_is_jaccard(rng):
    logits, target = make_case(rng, "multiclass")
    np.testing.assert_allclose(
        fl.tversky_loss(logits, target, alpha=1.0, beta=1.0),
        fl.jaccard_loss(logits, target),
        rtol=1e-13,
    )


def test_spot_value_binary_dice():
    # p = sigmoid(0) = 0.5 everywhere; y = [1, 0, 1, 1]:
    # I = 1.5, P = 2, Y = 3, dice = 1 - 3 / 5.
    loss = fl.dice_loss(np.zeros((1, 1, 4)), np.array([[1, 0, 1, 1]]), mode="binary")
    np.testing.assert_allclose(loss, 0.4, rtol=1e-15)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("mode, case_kw", CASES[::2], ids=CASE_IDS[::2])
@pytest.mark.parametrize("per_sample", [False, True])
def test_grad_finite_difference(rng, name, mode, case_kw, per_sample):
    case_kw = dict(case_kw)
    shape = case_kw.pop("shape", (3, 4, 5, 6))
    small = shape[:2] + (2, 3) if case_kw.get("axis") != -1 else (2, 2, 3, shape[-1])
    logits, target = make_case(rng, mode, shape=small, **case_kw)
    kwargs = dict(mode=mode, per_sample=per_sample, smooth=0.1,
                  **case_kwargs(case_kw), **loss_kwargs(name))

    _, grad = LOSSES[name](logits, target, return_grad=True, **kwargs)
    numeric = finite_difference(lambda z: LOSSES[name](z, target, **kwargs), logits)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", LOSSES)
def test_none_grad_is_grad_of_sum(rng, name):
    logits, target = make_case(rng, "multiclass")
    _, grad_none = LOSSES[name](logits, target, reduction="none", return_grad=True)
    _, grad_sum = LOSSES[name](logits, target, reduction="sum", return_grad=True)
    np.testing.assert_array_equal(grad_none, grad_sum)


# --------------------------------------------------------------- edge cases


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("mode", ["multiclass", "multilabel", "binary"])
def test_absent_class_contributes_zero(rng, name, mode):
    logits, target = make_case(rng, mode, absent=(1, 2))
    losses = LOSSES[name](logits, target, mode=mode, reduction="none")
    if mode != "binary":
        assert losses[1] == 0.0
        assert losses[2] == 0.0
        assert np.all(losses[[0, 3]] > 0)
        mean = LOSSES[name](logits, target, mode=mode)
        np.testing.assert_allclose(mean, losses.sum() / 4, rtol=1e-15)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("mode", ["multiclass", "multilabel", "binary"])
def test_empty_masks_give_zero_and_finite_grad(rng, name, mode):
    logits = 3.0 * rng.standard_normal((2, 3, 4, 4))
    if mode == "multiclass":
        target = np.zeros((2, 4, 4), np.int64)
    elif mode == "multilabel":
        target = np.zeros(logits.shape)
    else:
        logits = logits[:, :1]
        target = np.zeros((2, 4, 4))
    for eps in (1e-7, 0.0):
        losses, grad = LOSSES[name](logits, target, mode=mode, eps=eps,
                                    per_sample=True, reduction="none",
                                    return_grad=True)
        assert np.all(np.isfinite(losses))
        assert np.all(np.isfinite(grad))
        if mode != "multiclass":
            assert not losses.any()
            assert not grad.any()


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("mode", ["multiclass", "multilabel", "binary"])
def test_all_positions_ignored(rng, name, mode):
    logits, target = make_case(rng, mode)
    target = np.full(target.shape, 7, target.dtype)
    logits[0, 0, 0, 0] = np.nan
    loss, grad = LOSSES[name](logits, target, mode=mode, ignore_index=7,
                              return_grad=True)
    assert loss == 0.0
    assert not grad.any()


@pytest.mark.parametrize("name", LOSSES)
def test_ignored_positions_do_not_contribute(rng, name):
    logits, target = make_case(rng, "multiclass", ignore=-1)
    ignored = target == -1
    changed = logits.copy()
    changed[:, :, :][np.broadcast_to(ignored[:, None], logits.shape)] = np.nan
    loss, grad = LOSSES[name](changed, target, ignore_index=-1, return_grad=True)
    expected_loss, expected_grad = LOSSES[name](logits, target, ignore_index=-1,
                                                return_grad=True)
    assert loss == expected_loss
    np.testing.assert_array_equal(grad, expected_grad)
    assert not grad[np.broadcast_to(ignored[:, None], logits.shape)].any()


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("mode", ["multiclass", "multilabel", "binary"])
def test_huge_logits_are_finite(rng, name, mode):
    logits, target = make_case(rng, mode)
    logits = np.where(rng.random(logits.shape) < 0.5, 1e4, -1e4)
    for dtype in (np.float32, np.float64):
        loss, grad = LOSSES[name](logits.astype(dtype), target, mode=mode,
                                  return_grad=True)
        assert np.isfinite(loss)
        assert np.all(np.isfinite(grad))
        np.testing.assert_allclose(
            loss, numpy_reference(name, logits, target, mode=mode), rtol=1e-5
        )


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("probabilities", [False, True])
@pytest.mark.parametrize("per_sample", [False, True])
def test_one_inf_logit_gives_softmax_limit(rng, name, probabilities, per_sample):
    # A single +inf logit at a position takes all of its softmax mass, the
    # limit as that logit grows. A logit of 1e4 above finite ones already
    # gives that one-hot softmax exactly in float64.
    logits, target = make_case(rng, "multiclass")
    if probabilities:
        target = np.moveaxis(np.eye(4)[target], -1, 1)
    top = rng.integers(0, 4, (3, 5, 6))
    rows = rng.random((3, 5, 6)) < 0.5
    big = logits.copy()
    np.put_along_axis(big, top[:, None], np.where(rows, 1e4, logits.max(1))[:, None], 1)
    infinite = np.where(big == 1e4, np.inf, big)
    kwargs = dict(per_sample=per_sample, reduction="none", **loss_kwargs(name))
    expected_loss, expected_grad = LOSSES[name](big, target, return_grad=True, **kwargs)
    loss, grad = LOSSES[name](infinite, target, return_grad=True, **kwargs)
    np.testing.assert_array_equal(loss, expected_loss)
    np.testing.assert_array_equal(grad, expected_grad)


@pytest.mark.parametrize("name", LOSSES)
def test_tied_inf_logits_give_nan(name):
    # Two +inf logits at one position have no limiting softmax, and neither
    # do all -inf logits: their class sums, and so the loss, are NaN.
    logits = np.zeros((1, 2, 3))
    logits[0, :, 0] = np.inf
    logits[0, :, 1] = -np.inf
    target = np.array([[0, 1, 1]])
    for position in (0, 1):
        x = logits.copy()
        x[0, :, 1 - position] = 0.0
        loss = LOSSES[name](x, target, **loss_kwargs(name))
        assert np.isnan(loss)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("mode", ["multiclass", "multilabel"])
def test_nan_propagates(rng, name, mode):
    logits, target = make_case(rng, mode, absent=())
    logits[1, 0, 2, 3] = np.nan
    loss, grad = LOSSES[name](logits, target, mode=mode, return_grad=True)
    assert np.isnan(loss)
    assert np.isnan(grad[1, 0, 2, 3])


@pytest.mark.parametrize("name", LOSSES)
def test_float16_computes_in_float32(rng, name):
    logits, target = make_case(rng, "multiclass")
    half = logits.astype(np.float16)
    loss, grad = LOSSES[name](half, target, return_grad=True)
    assert type(loss) is np.float32
    assert grad.dtype == np.float32
    np.testing.assert_allclose(
        loss, numpy_reference(name, half.astype(np.float64), target), rtol=1e-5
    )


@pytest.mark.parametrize("name", LOSSES)
def test_float32_target_cast_overflow_is_inf(name):
    # 1e300 has no float32 value, so the target becomes inf, with no warning.
    logits = np.zeros((1, 2, 2), np.float32)
    target = np.array([[[1e300, 0.0], [1.0, 1.0]]])
    losses = LOSSES[name](logits, target, mode="multilabel", reduction="none")
    assert losses.dtype == np.float32
    assert np.isnan(losses[0])
    assert np.isfinite(losses[1])


def _layouts(x):
    yield "c", x
    yield "f", np.asfortranarray(x)
    big = np.zeros(tuple(2 * n for n in x.shape), x.dtype)
    view = big[tuple(slice(None, None, 2) for _ in x.shape)]
    view[...] = x
    yield "strided", view
    flip = (slice(None, None, -1),) * x.ndim
    yield "negative", np.ascontiguousarray(x[flip])[flip]
    ro = x.copy()
    ro.flags.writeable = False
    yield "read-only", ro
    yield "big-endian", x.astype(x.dtype.newbyteorder(">"))


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("mode", ["multiclass", "multilabel", "binary"])
def test_layouts_match_contiguous(rng, name, mode):
    logits, target = make_case(rng, mode, ignore=-1)
    before = logits.copy(), target.copy()
    kwargs = dict(mode=mode, ignore_index=-1, per_sample=True, reduction="none",
                  return_grad=True)
    expected_loss, expected_grad = LOSSES[name](logits, target, **kwargs)
    for label, zl in _layouts(logits):
        for label_t, tl in _layouts(target):
            loss, grad = LOSSES[name](zl, tl, **kwargs)
            np.testing.assert_array_equal(loss, expected_loss, err_msg=f"{label}/{label_t}")
            np.testing.assert_array_equal(grad, expected_grad, err_msg=f"{label}/{label_t}")
    np.testing.assert_array_equal(logits, before[0])
    np.testing.assert_array_equal(target, before[1])


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int32, np.uint64, ">i8"])
def test_index_dtypes(rng, dtype):
    logits, target = make_case(rng, "multiclass")
    expected = fl.dice_loss(logits, target)
    assert fl.dice_loss(logits, target.astype(dtype)) == expected


def test_zero_stride_logits(rng):
    logits = np.broadcast_to(rng.standard_normal((1, 3, 1, 5)), (4, 3, 6, 5))
    target = rng.integers(0, 3, size=(4, 6, 5))
    loss, grad = fl.dice_loss(logits, target, return_grad=True)
    np.testing.assert_allclose(loss, numpy_reference("dice", logits, target), rtol=1e-12)
    assert grad.shape == logits.shape


def test_single_class(rng):
    logits = rng.standard_normal((2, 1, 3, 3))
    target = np.zeros((2, 3, 3), np.int64)
    loss, grad = fl.dice_loss(logits, target, return_grad=True)
    # The softmax over one class is 1 everywhere: a perfect score.
    assert loss == 0.0
    assert not grad.any()
    loss = fl.dice_loss(logits, target, mode="binary")
    np.testing.assert_allclose(
        loss, numpy_reference("dice", logits, target, mode="binary"), rtol=1e-13
    )


def test_one_sample_class_vector(rng):
    logits = rng.standard_normal(5)
    loss, grad = fl.jaccard_loss(logits, np.int64(3), return_grad=True, reduction="none")
    expected = numpy_reference("jaccard", logits[None], np.array([3]), reduction="none")
    np.testing.assert_allclose(loss, expected, rtol=1e-13)
    assert grad.shape == (5,)


def test_empty_batch(rng):
    logits = np.empty((0, 3, 4))
    target = np.empty((0, 4), np.int64)
    loss, grad = fl.dice_loss(logits, target, return_grad=True)
    assert loss == 0.0
    assert grad.shape == (0, 3, 4)
    per_sample = fl.dice_loss(logits, target, per_sample=True, return_grad=True)
    assert np.isnan(per_sample[0])
    assert fl.dice_loss(logits, target, per_sample=True, reduction="none").shape == (0, 3)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("mode", ["multiclass", "multilabel", "binary"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_thread_counts_bit_identical(rng, name, mode, per_sample):
    # 4 * 96 * 96 positions: several blocks per sample, parallel kernels.
    logits, target = make_case(rng, mode, shape=(4, 3, 96, 96), ignore=-1)
    logits = logits.astype(np.float32)
    results = [
        LOSSES[name](logits, target, mode=mode, ignore_index=-1, per_sample=per_sample,
                     return_grad=True, n_threads=n)
        for n in THREAD_COUNTS
    ]
    for loss, grad in results[1:]:
        assert loss.tobytes() == results[0][0].tobytes()
        assert grad.tobytes() == results[0][1].tobytes()
    np.testing.assert_allclose(
        results[0][0],
        numpy_reference(name, logits, target, mode=mode, ignore_index=-1,
                        per_sample=per_sample),
        rtol=1e-5,
    )


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("shape", [(3, 5, 4099), (1, 2, 63), (2, 70, 65)])
def test_index_tiles_match_one_hot(rng, name, shape):
    # Rows whose length is no multiple of the 64-position tile, blocks that
    # cross rows, and more classes than a tile has positions: the tiled
    # class-index kernel must agree with the one-hot (dense) kernel.
    logits = rng.standard_normal(shape) * 3
    labels = rng.integers(0, shape[1], size=(shape[0], shape[2]))
    labels[:, ::7] = -1
    one_hot = np.moveaxis(np.eye(shape[1])[np.where(labels < 0, 0, labels)], -1, 1)
    kwargs = dict(return_grad=True, **loss_kwargs(name))
    loss, grad = LOSSES[name](logits, labels, ignore_index=-1, **kwargs)
    kept = labels >= 0
    logits_kept = np.moveaxis(logits, 1, 2)[kept][None].transpose(0, 2, 1)
    labels_kept = labels[kept][None]
    dense = np.moveaxis(one_hot, 1, 2)[kept][None].transpose(0, 2, 1)
    expected_loss, expected_kept = LOSSES[name](logits_kept, dense, **kwargs)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-12)
    np.testing.assert_allclose(
        np.moveaxis(grad, 1, 2)[kept], expected_kept[0].T, rtol=1e-10, atol=1e-16
    )
    assert np.all(np.moveaxis(grad, 1, 2)[~kept] == 0.0)
    packed_loss, packed_grad = LOSSES[name](
        np.asfortranarray(logits), labels, ignore_index=-1, **kwargs
    )
    assert packed_loss.tobytes() == loss.tobytes()
    assert packed_grad.tobytes() == grad.tobytes()
    loss_kept = LOSSES[name](logits_kept, labels_kept, **loss_kwargs(name))
    np.testing.assert_allclose(loss_kept, expected_loss, rtol=1e-12)


@pytest.mark.parametrize("mode", ["multiclass", "multilabel", "binary"])
def test_grad_out_is_used(rng, mode):
    logits, target = make_case(rng, mode)
    _, expected = fl.dice_loss(logits, target, mode=mode, return_grad=True)
    out = np.empty_like(logits)
    _, grad = fl.dice_loss(logits, target, mode=mode, return_grad=True, grad_out=out)
    assert grad is out
    np.testing.assert_array_equal(out, expected)
    big = np.full(tuple(2 * n for n in logits.shape), np.nan)
    strided = big[::2, ::2, ::2, 1::2]
    _, grad = fl.dice_loss(logits, target, mode=mode, return_grad=True, grad_out=strided)
    assert grad is strided
    assert np.shares_memory(grad, big)
    np.testing.assert_array_equal(strided, expected)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("mode, aliased", [
    ("multiclass", "logits"), ("multilabel", "logits"), ("multilabel", "target"),
    ("binary", "logits"), ("binary", "target"),
])
def test_grad_out_overlapping_input(rng, name, mode, aliased):
    # grad_out is the reversed view of an input, so the second pass would
    # read logits (or targets) that it has already overwritten.
    logits, target = make_case(rng, mode, binary_layout="own")
    kwargs = dict(mode=mode, **loss_kwargs(name))
    expected_loss, expected_grad = LOSSES[name](logits, target, return_grad=True,
                                                **kwargs)
    grad_out = {"logits": logits, "target": target}[aliased][::-1, ::-1]
    loss, grad = LOSSES[name](logits, target, return_grad=True, grad_out=grad_out,
                              **kwargs)
    assert grad is grad_out
    assert loss == expected_loss
    np.testing.assert_array_equal(grad, expected_grad)


@pytest.mark.parametrize("mode", ["multiclass", "multilabel", "binary"])
def test_grad_out_same_view_as_logits(rng, mode):
    logits, target = make_case(rng, mode)
    expected_loss, expected_grad = fl.dice_loss(logits, target, mode=mode,
                                                return_grad=True)
    loss, grad = fl.dice_loss(logits, target, mode=mode, return_grad=True,
                              grad_out=logits)
    assert grad is logits
    assert loss == expected_loss
    np.testing.assert_array_equal(logits, expected_grad)


@pytest.mark.parametrize("mode", ["multiclass", "multilabel", "binary"])
def test_grad_out_filled_without_return_grad(rng, mode):
    logits, target = make_case(rng, mode)
    expected_loss, expected_grad = fl.dice_loss(logits, target, mode=mode,
                                                return_grad=True)
    out = np.full(logits.shape, np.nan)
    loss = fl.dice_loss(logits, target, mode=mode, grad_out=out)
    assert loss == expected_loss
    np.testing.assert_array_equal(out, expected_grad)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("mode", ["multiclass", "multilabel", "binary"])
def test_read_only_inputs_without_grad(rng, name, mode):
    logits, target = make_case(rng, mode)
    expected = LOSSES[name](logits, target, mode=mode)
    logits.flags.writeable = False
    target.flags.writeable = False
    assert LOSSES[name](logits, target, mode=mode) == expected


def test_bad_index_leaves_grad_out_untouched(rng):
    logits, target = make_case(rng, "multiclass")
    target[1, 2, 3] = 9
    out = np.full(logits.shape, 5.0)
    with pytest.raises(ValueError, match=r"class index 9 at position \(1, 2, 3\)"):
        fl.dice_loss(logits, target, return_grad=True, grad_out=out)
    assert np.all(out == 5.0)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
# 2 * 3 * 8 * 8 logits run on one thread; 2 * 3 * 96 * 96 = 55296 are above
# the parallel threshold of 32768 logits.
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 96, 96)])
@pytest.mark.parametrize("n_threads", [None, 1, 2])
def test_contiguous_index_path_matches_general(rng, name, dtype, per_sample,
                                               reduction, shape, n_threads):
    # C-contiguous logits with an int64 target take the short path; Fortran
    # order and an int32 target take the general one. Both give the same bits.
    logits, target = make_case(rng, "multiclass", shape=shape)
    logits = logits.astype(dtype)
    kwargs = dict(per_sample=per_sample, reduction=reduction, return_grad=True,
                  n_threads=n_threads, **loss_kwargs(name))
    loss, grad = LOSSES[name](logits, target, **kwargs)
    for zl, tl in [(np.asfortranarray(logits), target), (logits, target.astype(np.int32))]:
        expected_loss, expected_grad = LOSSES[name](zl, tl, **kwargs)
        assert loss.dtype == expected_loss.dtype
        assert loss.tobytes() == expected_loss.tobytes()
        assert grad.tobytes() == expected_grad.tobytes()
    out = np.empty_like(logits)
    loss_out = LOSSES[name](logits, target, grad_out=out, **dict(kwargs, return_grad=False))
    assert loss_out.tobytes() == loss.tobytes()
    assert out.tobytes() == grad.tobytes()
    np.testing.assert_allclose(
        loss,
        numpy_reference(name, logits, target, per_sample=per_sample,
                        reduction=reduction, **loss_kwargs(name)),
        rtol=1e-5 if dtype == np.float32 else 1e-12,
    )


def test_contiguous_index_path_errors(rng):
    logits, target = make_case(rng, "multiclass")
    with pytest.raises(ValueError, match="n_threads must be None or an int >= 1"):
        fl.dice_loss(logits, target, n_threads=0, grad_out=np.empty(3))
    with pytest.raises(ValueError, match=r"grad_out must have shape \(3, 4, 5, 6\)"):
        fl.dice_loss(logits, target, grad_out=np.empty(3))
    with pytest.raises(ValueError, match="grad_out must be writeable"):
        read_only = np.empty_like(logits)
        read_only.flags.writeable = False
        fl.dice_loss(logits, target, grad_out=read_only)
    target[0, 0, 1] = -3
    with pytest.raises(ValueError, match=r"class index -3 at position \(0, 0, 1\)"):
        fl.dice_loss(logits, target, return_grad=True)


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", LOSSES)
def test_parameter_errors(rng, name):
    fn = LOSSES[name]
    logits, target = make_case(rng, "multiclass")
    cases = [
        (dict(mode="softmax"), ValueError,
         "mode must be one of 'binary', 'multiclass', 'multilabel', got 'softmax'"),
        (dict(smooth=-1.0), ValueError, "smooth must be >= 0.0, got -1.0"),
        (dict(eps=-1e-7), ValueError, "eps must be >= 0.0, got -1e-07"),
        (dict(eps="x"), TypeError, "eps must be a real number, got str"),
        (dict(ignore_index=1.5), TypeError, "ignore_index must be None or an int, got float"),
        (dict(ignore_index=True), TypeError, "ignore_index must be None or an int, got True"),
        (dict(per_sample=1), TypeError, "per_sample must be a bool, got int"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(axis=4), ValueError, "axis 4 is out of bounds for an array with 4 dimensions"),
        (dict(axis=1.0), TypeError, "axis must be an int, got float"),
        (dict(axis=True), TypeError, "axis must be an int, got bool"),
        (dict(n_threads=0), ValueError, "n_threads must be None or an int >= 1, got 0"),
        (dict(return_grad=True, grad_out=np.empty(3)), ValueError,
         r"grad_out must have shape \(3, 4, 5, 6\)"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            fn(logits, target, **kwargs)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("axis", [True, np.bool_(True)])
def test_class_vector_rejects_bool_axis(name, axis):
    with pytest.raises(TypeError, match="axis must be an int, got bool"):
        LOSSES[name](np.zeros(3), np.int64(1), axis=axis)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("mode", ["multiclass", "multilabel", "binary"])
def test_numpy_str_mode_and_reduction(rng, name, mode):
    logits, target = make_case(rng, mode)
    expected = LOSSES[name](logits, target, mode=mode, reduction="none")
    losses = LOSSES[name](logits, target, mode=np.str_(mode), reduction=np.str_("none"))
    np.testing.assert_array_equal(losses, expected)


def test_tversky_parameter_errors(rng):
    logits, target = make_case(rng, "multiclass")
    with pytest.raises(ValueError, match="alpha must be >= 0.0, got -0.1"):
        fl.tversky_loss(logits, target, alpha=-0.1)
    with pytest.raises(ValueError, match="beta must be >= 0.0, got nan"):
        fl.tversky_loss(logits, target, beta=np.nan)


@pytest.mark.parametrize("name", LOSSES)
def test_target_errors(rng, name):
    fn = LOSSES[name]
    logits, target = make_case(rng, "multiclass")
    match = (
        r"target must hold integer class indices, got dtype float64"
        r" \(convert whole-number labels with .astype\(np.int64\)\)"
    )
    with pytest.raises(TypeError, match=match):
        fn(logits, target.astype(np.float64))
    match = (
        r"target must have the class-index shape \(3, 5, 6\)"
        r" or the logits' shape \(3, 4, 5, 6\), got \(3, 5\)"
    )
    with pytest.raises(ValueError, match=match):
        fn(logits, target[:, :, 0])
    with pytest.raises(ValueError, match="ignore_index applies to class-index targets only"):
        fn(logits, np.ones(logits.shape), ignore_index=-1)
    with pytest.raises(TypeError, match="target must be an array of real numbers"):
        fn(logits, target.astype(str))
    with pytest.raises(TypeError, match="logits must be an array of real numbers"):
        fn(logits.astype(complex), target)
    with pytest.raises(ValueError, match="logits must have at least 1 dimension"):
        fn(np.float64(1.0), np.int64(0))
    match = "per_sample=True needs the sample axis 0 before the class axis, got axis=0"
    with pytest.raises(ValueError, match=match):
        fn(logits, target[0], axis=0, per_sample=True)


@pytest.mark.parametrize("bad, where", [(4, (0, 1, 2)), (-1, (2, 4, 5)), (-100, (1, 0, 0))])
def test_out_of_range_index_names_value_and_position(rng, bad, where):
    logits, target = make_case(rng, "multiclass")
    target[where] = bad
    position = rf"\({where[0]}, {where[1]}, {where[2]}\)"
    match = (
        rf"target contains class index {bad} at position {position},"
        r" outside \[0, 4\) and not ignore_index"
    )
    with pytest.raises(ValueError, match=match):
        fl.dice_loss(logits, target, ignore_index=255)


def test_uint64_index_beyond_int64_is_reported(rng):
    logits, target = make_case(rng, "multiclass")
    target = target.astype(np.uint64)
    target[0, 0, 1] = 2**64 - 1
    with pytest.raises(ValueError, match=rf"class index {2**64 - 1} at position \(0, 0, 1\)"):
        fl.dice_loss(logits, target)


def test_mode_shape_errors(rng):
    logits = rng.standard_normal((2, 3, 4))
    match = r"target must have the shape of logits \(2, 3, 4\), got \(2, 4\)"
    with pytest.raises(ValueError, match=match):
        fl.dice_loss(logits, np.zeros((2, 4)), mode="multilabel")
    match = (
        r"binary mode needs a target with the logits' shape"
        r" .* got logits \(2, 3, 4\) and target \(2, 4\)"
    )
    with pytest.raises(ValueError, match=match):
        fl.dice_loss(logits, np.zeros((2, 4)), mode="binary")


def test_huge_ignore_index_matches_nothing(rng):
    logits, target = make_case(rng, "multiclass")
    assert fl.dice_loss(logits, target, ignore_index=2**70) == fl.dice_loss(logits, target)


def test_concurrent_calls_bit_identical(rng):
    # Several Python threads in the kernels at once share no state.
    logits, target = make_case(rng, "multiclass", shape=(4, 3, 96, 96), ignore=-1)

    def run(_):
        return fl.dice_loss(logits, target, ignore_index=-1, per_sample=True,
                            return_grad=True, n_threads=2)

    expected_loss, expected_grad = run(None)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, range(8)))
    for loss, grad in results:
        assert loss.tobytes() == expected_loss.tobytes()
        assert grad.tobytes() == expected_grad.tobytes()


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(sorted(LOSSES)),
    mode=st.sampled_from(["multiclass", "multilabel", "binary"]),
    n=st.integers(1, 3),
    n_classes=st.integers(1, 4),
    length=st.integers(0, 6),
    per_sample=st.booleans(),
    smooth=st.sampled_from([0.0, 0.5]),
    use_ignore=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_cases_match_numpy_reference(name, mode, n, n_classes, length,
                                            per_sample, smooth, use_ignore, seed):
    rng = np.random.default_rng(seed)
    if mode == "binary":
        n_classes = 1
    logits, target = make_case(rng, mode, shape=(n, n_classes, length), absent=(),
                               ignore=-1 if use_ignore else None)
    kwargs = dict(mode=mode, per_sample=per_sample, smooth=smooth,
                  reduction="none", **loss_kwargs(name))
    if use_ignore:
        kwargs["ignore_index"] = -1
    loss, grad = LOSSES[name](logits, target, return_grad=True, **kwargs)
    expected = numpy_reference(name, logits, target, **kwargs)
    np.testing.assert_allclose(loss, expected, rtol=1e-12, atol=1e-14)
    assert np.all(np.isfinite(grad))
