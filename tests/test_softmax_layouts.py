"""Cross-entropy and focal loss across the kernel's layouts.

The class-index kernels walk their arrays in three ways. Class-major tiles
are read in place when positions are contiguous (F-order ``(N, C)``, class
axis 1 of ``(N, C, d)``). Tiles are copied to a class-major buffer for
C-order ``(N, C)`` or channels-last logits with fewer than 48 classes, and
for strided arrays. Rows are read in place when at least 48 classes are
contiguous. All of them add a position's exps in the same order, so every
layout gives the same bits. The class-probability kernel uses the tiles
alone: in place when positions are contiguous in the logits, the targets
and the gradient, packed otherwise.
"""

import numpy as np
import pytest

import fastloss as fl

from conftest import THREAD_COUNTS

# Rows of contiguous classes run in place from this many classes on.
ROW_MIN_CLASSES = 48

# Both sides of the row threshold, one or two classes, odd counts, and
# counts that are not a multiple of the 8 lanes of a sum. The last count
# exceeds the positions of a class-major tile, which holds at most 256
# positions, and 16 from 1025 classes on.
CLASS_COUNTS = (1, 2, 7, 9, ROW_MIN_CLASSES - 1, ROW_MIN_CLASSES, 61, 300, 1031)

TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}


def reference_ce(logits, target, weight=None, ignore_index=-100, smoothing=0.0):
    """Float64 per-row cross-entropy and mean gradient of ``(N, C)`` logits."""
    x = np.asarray(logits, np.float64)
    n_classes = x.shape[1]
    w = np.ones(n_classes) if weight is None else np.asarray(weight, np.float64)
    keep = target != ignore_index
    y = np.where(keep, target, 0)
    m = x.max(axis=1, keepdims=True)
    lp = (x - m) - np.log(np.exp(x - m).sum(axis=1, keepdims=True))
    onehot = np.eye(n_classes)[y]
    coef = w * ((1 - smoothing) * onehot + smoothing / n_classes)
    coef *= keep[:, None]
    losses = -(coef * lp).sum(axis=1)
    w_y = np.where(keep, w[y], 0.0)
    grad = (coef.sum(axis=1, keepdims=True) * np.exp(lp) - coef) / w_y.sum()
    return losses, grad, w_y.sum()


def _layouts(logits):
    """Yield ``(name, array, axis)`` for the same ``(N, C)`` logits."""
    yield "c-order", logits, 1
    yield "f-order", np.asfortranarray(logits), 1
    yield "class-major", np.ascontiguousarray(logits.T), 0
    wide = np.zeros((logits.shape[0], 2 * logits.shape[1]), logits.dtype)
    wide[:, ::2] = logits
    yield "strided classes", wide[:, ::2], 1
    tall = np.zeros((2 * logits.shape[0], logits.shape[1]), logits.dtype)
    tall[::2] = logits
    yield "strided rows", tall[::2], 1


def _case(rng, n_positions, n_classes, dtype):
    logits = (3 * rng.standard_normal((n_positions, n_classes))).astype(dtype)
    target = rng.integers(0, n_classes, n_positions)
    target[rng.choice(n_positions, n_positions // 10, replace=False)] = -100
    return logits, target


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_classes", CLASS_COUNTS)
def test_layouts_bit_identical(rng, n_classes, dtype):
    # 301 positions: not a multiple of any tile size.
    logits, target = _case(rng, 301, n_classes, dtype)
    weight = rng.random(n_classes) + 0.25
    cases = [
        (fl.cross_entropy, dict()),
        (fl.cross_entropy, dict(weight=weight, label_smoothing=0.15)),
        (fl.focal_loss, dict(weight=weight, gamma=1.5)),
    ]
    for loss_fn, kwargs in cases:
        expected = loss_fn(logits, target, return_grad=True, **kwargs)
        expected_none = loss_fn(logits, target, reduction="none", return_grad=True,
                                **kwargs)
        for name, x, axis in _layouts(logits):
            loss, grad = loss_fn(x, target, axis=axis, return_grad=True, **kwargs)
            grad = grad.T if axis == 0 else grad
            assert loss == expected[0], (name, loss_fn.__name__, kwargs)
            # Without a gradient the exps go to a scratch row instead.
            assert loss_fn(x, target, axis=axis, **kwargs) == expected[0], name
            np.testing.assert_array_equal(grad, expected[1], err_msg=name)
            losses, _ = loss_fn(x, target, axis=axis, reduction="none",
                                return_grad=True, **kwargs)
            np.testing.assert_array_equal(losses, expected_none[0], err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_classes", CLASS_COUNTS)
def test_matches_reference(rng, n_classes, dtype):
    logits, target = _case(rng, 301, n_classes, dtype)
    weight = rng.random(n_classes) + 0.25
    for smoothing in (0.0, 0.2):
        losses, grad, total = reference_ce(logits, target, weight, smoothing=smoothing)
        loss, g = fl.cross_entropy(logits, target, weight=weight,
                                   label_smoothing=smoothing, return_grad=True)
        np.testing.assert_allclose(loss, losses.sum() / total, **TOL[dtype])
        np.testing.assert_allclose(g, grad, **TOL[dtype])
        none = fl.cross_entropy(logits, target, weight=weight,
                                label_smoothing=smoothing, reduction="none")
        np.testing.assert_allclose(none, losses, **TOL[dtype])


@pytest.mark.parametrize("n_classes", [ROW_MIN_CLASSES - 1, ROW_MIN_CLASSES, 300])
def test_focal_gamma_zero_is_cross_entropy(rng, n_classes):
    logits, target = _case(rng, 200, n_classes, np.float64)
    loss, grad = fl.focal_loss(logits, target, gamma=0.0, return_grad=True)
    ce_loss, ce_grad = fl.cross_entropy(logits, target, return_grad=True)
    np.testing.assert_allclose(loss, ce_loss, rtol=1e-14)
    np.testing.assert_allclose(grad, ce_grad, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("loss_fn", [fl.cross_entropy, fl.focal_loss])
@pytest.mark.parametrize("n_classes", [10, ROW_MIN_CLASSES, 300])
def test_thread_counts_bit_identical(rng, loss_fn, n_classes):
    # Several reduction blocks of 4096 positions, and enough work for threads.
    logits, target = _case(rng, 3 * 4096 + 5, n_classes, np.float32)
    results = [loss_fn(logits, target, return_grad=True, n_threads=n)
               for n in THREAD_COUNTS]
    for loss, grad in results[1:]:
        assert loss == results[0][0]
        np.testing.assert_array_equal(grad, results[0][1])


@pytest.mark.parametrize("n_classes", [3, ROW_MIN_CLASSES, 100])
@pytest.mark.parametrize("order", ["C", "F"])
def test_infinite_logits_give_the_limit(n_classes, order):
    logits = np.zeros((4, n_classes))
    logits[0, 1] = np.inf                   # lone +inf target: loss 0, grad 0
    logits[1, :2] = np.inf                  # two +inf share the probability
    logits[2, 1:] = -np.inf                 # -inf elsewhere: p_t = 1
    logits[3, 0] = np.inf                   # finite target beside +inf
    target = np.array([1, 0, 0, 2])
    x = np.asarray(logits, order=order)
    losses, grad = fl.cross_entropy(x, target, reduction="none", return_grad=True)
    np.testing.assert_array_equal(losses[[0, 2]], 0.0)
    np.testing.assert_array_equal(grad[[0, 2]], 0.0)
    np.testing.assert_allclose(losses[1], np.log(2.0), rtol=1e-15)
    np.testing.assert_array_equal(grad[1, :2], [-0.5, 0.5])
    np.testing.assert_array_equal(grad[1, 2:], 0.0)
    assert losses[3] == np.inf
    np.testing.assert_array_equal(grad[3, [0, 2]], [1.0, -1.0])
    focal, focal_grad = fl.focal_loss(x, target, reduction="none", return_grad=True)
    np.testing.assert_array_equal(focal[[0, 2]], 0.0)
    np.testing.assert_array_equal(focal_grad[[0, 2]], 0.0)


@pytest.mark.parametrize("loss_fn", [fl.cross_entropy, fl.focal_loss])
@pytest.mark.parametrize("n_classes", [5, ROW_MIN_CLASSES, 100])
def test_nan_logit_poisons_only_its_position(rng, loss_fn, n_classes):
    logits = rng.standard_normal((6, n_classes))
    logits[2, n_classes // 2] = np.nan
    logits[4, 0] = np.nan
    target = rng.integers(0, n_classes, 6)
    losses, grad = loss_fn(logits, target, reduction="none", return_grad=True)
    bad = np.zeros(6, bool)
    bad[[2, 4]] = True
    assert np.isnan(losses[bad]).all()
    assert np.isnan(grad[bad]).all()
    assert np.isfinite(losses[~bad]).all()
    assert np.isfinite(grad[~bad]).all()


@pytest.mark.parametrize("loss_fn", [fl.cross_entropy, fl.focal_loss])
@pytest.mark.parametrize("n_classes", [5, ROW_MIN_CLASSES, 100])
def test_bad_index_leaves_grad_out_untouched(rng, loss_fn, n_classes):
    logits = rng.standard_normal((50, n_classes))
    target = rng.integers(0, n_classes, 50)
    target[37] = n_classes
    out = np.full_like(logits, 7.0)
    with pytest.raises(ValueError, match=rf"got {n_classes} at position \(37,\)"):
        loss_fn(logits, target, grad_out=out)
    np.testing.assert_array_equal(out, 7.0)
    with pytest.raises(ValueError, match=rf"got {n_classes} at position \(37,\)"):
        loss_fn(logits, target, reduction="sum")


@pytest.mark.parametrize("loss_fn", [fl.cross_entropy, fl.focal_loss])
def test_ignored_and_zero_weight_rows(rng, loss_fn):
    logits = rng.standard_normal((5, 64))
    logits[1] = np.nan
    logits[3] = np.nan
    target = np.array([0, -100, 2, 5, 63])
    weight = np.ones(64)
    weight[5] = 0.0
    losses, grad = loss_fn(logits, target, weight=weight, reduction="none",
                           return_grad=True)
    np.testing.assert_array_equal(losses[[1, 3]], 0.0)
    np.testing.assert_array_equal(grad[[1, 3]], 0.0)
    assert np.isfinite(grad).all()


@pytest.mark.parametrize("shape", [(100_000, 100), (1_000_000, 10)])
def test_float32_accuracy_on_1e7_elements(shape):
    # The exps of a position are summed in float32 lanes; the sums over
    # positions stay in double. Against a float64 reference, the mean and
    # the sum keep the float32 tolerances.
    rng = np.random.default_rng(7)
    logits = (4 * rng.standard_normal(shape)).astype(np.float32)
    target = rng.integers(0, shape[1], shape[0])
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(x - m).sum(axis=1)) + m[:, 0]
    per = log_norm - np.take_along_axis(x, target[:, None], 1)[:, 0]
    mean = fl.cross_entropy(logits, target)
    total = fl.cross_entropy(logits, target, reduction="sum")
    np.testing.assert_allclose(mean, per.mean(), rtol=2e-6)
    np.testing.assert_allclose(total, per.sum(), rtol=2e-6)
    focal = fl.focal_loss(logits, target, gamma=2.0, reduction="sum")
    p_t = np.exp(-per)
    np.testing.assert_allclose(focal, ((1 - p_t) ** 2 * per).sum(), rtol=2e-6)


@pytest.mark.parametrize("loss_fn", [fl.cross_entropy, fl.focal_loss])
@pytest.mark.parametrize("n_classes", (3, 21))
def test_packed_gradient_in_both_orders(rng, loss_fn, n_classes):
    # Strided positions take the packed tiles. Their gradient is copied back
    # position by position where a position's classes are contiguous (a
    # channels-last grad_out) and class by class otherwise (a fresh array).
    logits = rng.standard_normal((3, n_classes, 35)) * 3
    target = rng.integers(0, n_classes, (3, 35))
    strided = np.zeros((3, n_classes, 70))
    strided[..., ::2] = logits
    x = strided[..., ::2]
    expected_loss, expected_grad = loss_fn(np.ascontiguousarray(x), target,
                                           return_grad=True)
    loss, grad = loss_fn(x, target, return_grad=True)
    assert loss == expected_loss
    np.testing.assert_array_equal(grad, expected_grad)
    channels_last = np.empty((3, 35, n_classes)).transpose(0, 2, 1)
    loss_fn(x, target, grad_out=channels_last)
    np.testing.assert_array_equal(channels_last, expected_grad)


def reference_probs(logits, probs, weight, smoothing):
    """Float64 per-row cross-entropy and sum gradient with class probabilities."""
    x = np.asarray(logits, np.float64)
    m = x.max(axis=1, keepdims=True)
    lp = (x - m) - np.log(np.exp(x - m).sum(axis=1, keepdims=True))
    coef = weight * ((1 - smoothing) * np.asarray(probs, np.float64)
                     + smoothing / x.shape[1])
    losses = -(coef * lp).sum(axis=1)
    grad = coef.sum(axis=1, keepdims=True) * np.exp(lp) - coef
    return losses, grad


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_classes", CLASS_COUNTS)
def test_probs_layouts_bit_identical(rng, n_classes, dtype):
    # Class probabilities run in place when positions are contiguous in the
    # logits, the targets and the gradient, and packed otherwise.
    logits, _ = _case(rng, 301, n_classes, dtype)
    probs = rng.random((301, n_classes)).astype(dtype)
    probs /= probs.sum(axis=1, keepdims=True)
    probs[::7, 0] = 0.0
    weight = (rng.random(n_classes) + 0.25).astype(dtype)
    kwargs = dict(weight=weight, label_smoothing=0.1, reduction="sum")
    expected_loss, expected_grad = fl.cross_entropy(logits, probs, return_grad=True,
                                                    **kwargs)
    losses, _ = fl.cross_entropy(logits, probs, return_grad=True,
                                 **dict(kwargs, reduction="none"))
    ref_losses, ref_grad = reference_probs(logits, probs, weight, 0.1)
    np.testing.assert_allclose(losses, ref_losses, **TOL[dtype])
    np.testing.assert_allclose(expected_grad, ref_grad, **TOL[dtype])
    for name, x, axis in _layouts(logits):
        for t_name, t, _ in _layouts(probs):
            if (axis == 0) != (t_name == "class-major"):
                continue
            loss, grad = fl.cross_entropy(x, t, axis=axis, return_grad=True, **kwargs)
            grad = grad.T if axis == 0 else grad
            assert loss == expected_loss, (name, t_name)
            np.testing.assert_array_equal(grad, expected_grad, err_msg=(name, t_name))
            assert fl.cross_entropy(x, t, axis=axis, **kwargs) == expected_loss


@pytest.mark.parametrize("shape", [(100_000, 100), (1_000_000, 10)])
def test_probs_float32_accuracy_on_1e7_elements(shape):
    # With class probabilities too, the exps of a position are summed in
    # float32 lanes and the sums over positions in double.
    rng = np.random.default_rng(8)
    logits = (4 * rng.standard_normal(shape)).astype(np.float32)
    probs = rng.random(shape, dtype=np.float32)
    probs /= probs.sum(axis=1, keepdims=True)
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lp = (x - m) - np.log(np.exp(x - m).sum(axis=1, keepdims=True))
    per = -(probs.astype(np.float64) * lp).sum(axis=1)
    mean = fl.cross_entropy(logits, probs)
    total = fl.cross_entropy(logits, probs, reduction="sum")
    np.testing.assert_allclose(mean, per.mean(), rtol=2e-6)
    np.testing.assert_allclose(total, per.sum(), rtol=2e-6)


def test_probs_limits_at_infinite_logits():
    # A +inf max takes the whole probability, shared among its logits. Every
    # logit -inf gives NaN, and a -inf logit of zero mass costs nothing.
    logits = np.array([
        [np.inf, 0.0, np.inf],
        [-np.inf, -np.inf, -np.inf],
        [-np.inf, 1.0, 2.0],
    ])
    probs = np.array([[0.5, 0.0, 0.5], [0.2, 0.3, 0.5], [0.0, 0.5, 0.5]])
    for x, t in ((logits, probs), (np.asfortranarray(logits), np.asfortranarray(probs))):
        losses, grad = fl.cross_entropy(x, t, reduction="none", return_grad=True)
        np.testing.assert_allclose(losses[0], np.log(2.0), rtol=1e-15)
        np.testing.assert_array_equal(grad[0], [0.0, 0.0, 0.0])
        assert np.isnan(losses[1])
        assert np.isnan(grad[1]).all()
        expected = -0.5 * (1.0 - np.log(np.e + np.e**2)) - 0.5 * (2.0 - np.log(np.e + np.e**2))
        np.testing.assert_allclose(losses[2], expected, rtol=1e-14)
        assert grad[2, 0] == 0.0


@pytest.mark.parametrize("n_classes", (5, ROW_MIN_CLASSES))
def test_probs_thread_counts_bit_identical(rng, n_classes):
    # Packed tiles and rows over several blocks of 4096 positions.
    logits = rng.standard_normal((9000, n_classes))
    probs = rng.random((9000, n_classes))
    results = [
        fl.cross_entropy(logits, probs, label_smoothing=0.05, return_grad=True,
                         n_threads=n)
        for n in THREAD_COUNTS
    ]
    for loss, grad in results[1:]:
        assert loss == results[0][0]
        np.testing.assert_array_equal(grad, results[0][1])
