"""Tests of the regression losses against an independent float64 reference."""

import concurrent.futures
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pytest

import fastloss as fl
from conftest import THREAD_COUNTS


# ---------------------------------------------------------------------------
# Float64 NumPy references, written without fastloss. Each returns the
# per-element loss and its derivative with respect to pred, on d = pred - target.
# ---------------------------------------------------------------------------


def ref_mse(d):
    return d * d, 2.0 * d


def ref_l1(d):
    return np.abs(d), np.sign(d)


def ref_smooth_l1(d, beta=1.0):
    if beta == 0:
        return ref_l1(d)
    a = np.abs(d)
    quadratic = a < beta
    loss = np.where(quadratic, 0.5 * d * d / beta, a - 0.5 * beta)
    grad = np.where(quadratic, d / beta, np.sign(d))
    return loss, grad


def ref_huber(d, delta=1.0):
    a = np.abs(d)
    quadratic = a <= delta
    loss = np.where(quadratic, 0.5 * d * d, delta * (a - 0.5 * delta))
    grad = np.where(quadratic, d, delta * np.sign(d))
    return loss, grad


def ref_log_cosh(d):
    # Below 1, cosh(d) - 1 = 2 sinh(d/2)**2 keeps every bit of a small d.
    # Above, logaddexp(d, -d) is log(2 cosh d) without overflow, and the
    # result is at least 0.43, so subtracting log(2) loses under 2 bits.
    with np.errstate(invalid="ignore", over="ignore"):
        small = np.log1p(2.0 * np.sinh(d / 2) ** 2)
        loss = np.where(np.abs(d) < 1.0, small, np.logaddexp(d, -d) - math.log(2))
    return loss, np.tanh(d)


def ref_pinball(d, quantile=0.5):
    u = -d
    with np.errstate(invalid="ignore"):
        loss = np.where(u >= 0, quantile * u, (quantile - 1) * u)
    # A zero slope costs nothing, even times an infinite u.
    loss = np.where((u > 0) & (quantile == 0), 0.0, loss)
    loss = np.where((u < 0) & (quantile == 1), 0.0, loss)
    grad = np.where(d > 0, 1 - quantile, np.where(d < 0, -quantile, 0.0))
    grad = np.where(np.isnan(d), np.nan, grad)
    return loss, grad


@dataclass(frozen=True)
class Case:
    id: str
    func: object
    ref: object
    kwargs: dict = field(default_factory=dict)

    def __call__(self, *args, **kw):
        return self.func(*args, **self.kwargs, **kw)

    def reference(self, d):
        return self.ref(d, **self.kwargs)


CASES = [
    Case("mse", fl.mse_loss, ref_mse),
    Case("l1", fl.l1_loss, ref_l1),
    Case("smooth_l1", fl.smooth_l1_loss, ref_smooth_l1),
    Case("smooth_l1-beta0.5", fl.smooth_l1_loss, ref_smooth_l1, {"beta": 0.5}),
    Case("smooth_l1-beta0", fl.smooth_l1_loss, ref_smooth_l1, {"beta": 0.0}),
    Case("huber", fl.huber_loss, ref_huber),
    Case("huber-delta2", fl.huber_loss, ref_huber, {"delta": 2.0}),
    Case("log_cosh", fl.log_cosh_loss, ref_log_cosh),
    Case("pinball", fl.pinball_loss, ref_pinball),
    Case("pinball-q0.1", fl.pinball_loss, ref_pinball, {"quantile": 0.1}),
    Case("pinball-q1", fl.pinball_loss, ref_pinball, {"quantile": 1.0}),
]
CASE_IDS = [c.id for c in CASES]

# Every public function, for the tests of shared behaviour and input checks.
ALL_FUNCS = [
    fl.mse_loss, fl.rmse_loss, fl.l1_loss, fl.smooth_l1_loss, fl.huber_loss,
    fl.log_cosh_loss, fl.pinball_loss,
]
FUNC_IDS = [f.__name__ for f in ALL_FUNCS]

REDUCTIONS = ["mean", "sum", "none"]
WEIGHTS = ["none", "random", "zeros", "all-zero"]
TOLERANCE = {np.float32: 2e-6, np.float64: 1e-12}


def reference(case, pred, target, weight=None, reduction="mean"):
    """Return the float64 reference ``(loss, grad)`` of a case."""
    d = np.asarray(pred, dtype=np.float64) - np.asarray(target, dtype=np.float64)
    loss, grad = case.reference(d)
    if weight is not None:
        w = np.asarray(weight, dtype=np.float64)
        keep = w != 0
        loss = np.where(keep, w * np.where(keep, loss, 0.0), 0.0)
        grad = np.where(keep, w * np.where(keep, grad, 0.0), 0.0)
        total_weight = w.sum()
    else:
        total_weight = d.size
    if reduction == "none":
        return loss, grad
    if reduction == "sum":
        return loss.sum(), grad
    if total_weight == 0:
        return np.nan, np.zeros_like(grad)
    return loss.sum() / total_weight, grad / total_weight


def reference_rmse(pred, target, weight=None, reduction="mean"):
    d = np.asarray(pred, dtype=np.float64) - np.asarray(target, dtype=np.float64)
    w = np.ones_like(d) if weight is None else np.asarray(weight, dtype=np.float64)
    denominator = w.sum() if reduction == "mean" else 1.0
    value = np.sqrt((w * d * d).sum() / denominator)
    grad = np.zeros_like(d) if value == 0 else w * d / (denominator * value)
    return value, grad


def make_weight(kind, shape, rng):
    if kind == "none":
        return None
    if kind == "random":
        return rng.random(shape) + 0.1
    if kind == "zeros":
        w = rng.random(shape) + 0.1
        w.flat[::3] = 0.0
        return w
    return np.zeros(shape)


def make_inputs(rng, shape, dtype):
    if np.dtype(dtype).kind in "iu":
        pred = rng.integers(-4, 5, size=shape).astype(dtype)
        target = rng.integers(-4, 5, size=shape).astype(dtype)
    else:
        pred = (2 * rng.standard_normal(shape)).astype(dtype)
        target = (2 * rng.standard_normal(shape)).astype(dtype)
    return pred, target


def compute_float(dtype):
    """Return the compute dtype that fastloss uses for inputs of ``dtype``."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f" and dtype.itemsize <= 4:
        return np.float32
    return np.float64


def assert_matches(actual, expected, dtype, err_msg=""):
    rtol = TOLERANCE[compute_float(dtype)]
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * 1e-3,
                               err_msg=err_msg)


# ---------------------------------------------------------------------------
# Values and gradients against the reference.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("weight_kind", WEIGHTS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int64])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_loss_matches_reference(case, dtype, reduction, weight_kind, rng):
    pred, target = make_inputs(rng, (7, 11), dtype)
    weight = make_weight(weight_kind, pred.shape, rng)
    out_dtype = compute_float(dtype)

    loss, grad = case(pred, target, weight=weight, reduction=reduction,
                      return_grad=True)
    expected_loss, expected_grad = reference(case, pred, target, weight, reduction)

    assert grad.dtype == out_dtype
    assert grad.shape == pred.shape
    if reduction == "none":
        assert isinstance(loss, np.ndarray)
        assert loss.dtype == out_dtype
        assert loss.shape == pred.shape
    else:
        assert type(loss) is out_dtype
    assert_matches(loss, expected_loss, dtype)
    assert_matches(grad, expected_grad, dtype)

    loss_only = case(pred, target, weight=weight, reduction=reduction)
    np.testing.assert_array_equal(loss_only, loss)


@pytest.mark.parametrize("weight_kind", WEIGHTS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_rmse_matches_reference(dtype, reduction, weight_kind, rng):
    pred, target = make_inputs(rng, (5, 9), dtype)
    weight = make_weight(weight_kind, pred.shape, rng)

    loss, grad = fl.rmse_loss(pred, target, weight=weight, reduction=reduction,
                              return_grad=True)
    if weight_kind == "all-zero" and reduction == "mean":
        assert np.isnan(loss)
        np.testing.assert_array_equal(grad, 0.0)
        return
    expected_loss, expected_grad = reference_rmse(pred, target, weight, reduction)
    assert type(loss) is compute_float(dtype)
    assert_matches(loss, expected_loss, dtype)
    assert_matches(grad, expected_grad, dtype)


def test_rmse_zero_error_has_zero_grad():
    x = np.array([1.0, -2.0, 3.0])
    for reduction in ["mean", "sum"]:
        loss, grad = fl.rmse_loss(x, x.copy(), reduction=reduction, return_grad=True)
        assert loss == 0.0
        np.testing.assert_array_equal(grad, 0.0)
        loss, grad = fl.rmse_loss(x, x.copy(), weight=[1.0, 2.0, 0.0],
                                  reduction=reduction, return_grad=True)
        assert loss == 0.0
        np.testing.assert_array_equal(grad, 0.0)


def test_rmse_sum_is_euclidean_distance():
    assert fl.rmse_loss([0.0, 0.0], [3.0, 4.0], reduction="sum") == 5.0
    assert fl.rmse_loss([0.0, 0.0], [3.0, 4.0]) == pytest.approx(5.0 / math.sqrt(2))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_large_contiguous_matches_reference(case, rng):
    # Above MIN_PARALLEL_ITEMS, with a length that leaves a partial block
    # and a remainder for the four-way unrolled loop.
    pred, target = make_inputs(rng, (100_003,), np.float64)
    for reduction in REDUCTIONS:
        loss, grad = case(pred, target, reduction=reduction, return_grad=True)
        expected_loss, expected_grad = reference(case, pred, target, None, reduction)
        assert_matches(loss, expected_loss, np.float64, err_msg=reduction)
        assert_matches(grad, expected_grad, np.float64, err_msg=reduction)


# ---------------------------------------------------------------------------
# Layouts: every input is read as its logical values, in place where possible.
# ---------------------------------------------------------------------------

LAYOUTS = ["C", "F", "strided", "negative", "transposed", "zero-stride", "read-only",
           "big-endian", "list"]


def relayout(x, layout):
    """Return the array ``x`` in another memory layout (or as a list)."""
    if layout == "C":
        return np.ascontiguousarray(x)
    if layout == "F":
        return np.asfortranarray(x)
    if layout == "strided":
        big = np.zeros(tuple(2 * n for n in x.shape), x.dtype)
        view = big[tuple(slice(None, None, 2) for _ in x.shape)]
        view[...] = x
        return view
    if layout == "negative":
        return np.ascontiguousarray(x[::-1, :, ::-1])[::-1, :, ::-1]
    if layout == "transposed":
        return np.ascontiguousarray(x.transpose(1, 0, 2)).transpose(1, 0, 2)
    if layout == "zero-stride":
        return np.broadcast_to(x[:1, :, :1], x.shape)
    if layout == "read-only":
        y = x.copy()
        y.flags.writeable = False
        return y
    if layout == "big-endian":
        return x.astype(x.dtype.newbyteorder(">"))
    if layout == "list":
        return x.tolist()
    raise AssertionError(layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_layouts_match_reference(case, layout, rng):
    pred, target = make_inputs(rng, (3, 4, 5), np.float64)
    weight = make_weight("zeros", pred.shape, rng)
    p = relayout(pred, layout)
    w = relayout(weight, layout)
    p_values = np.array(p, dtype=np.float64)
    w_values = np.array(w, dtype=np.float64)
    p_before = np.array(p, copy=True)

    for reduction in REDUCTIONS:
        for weight_in, weight_values in [(None, None), (w, w_values)]:
            loss, grad = case(p, target, weight=weight_in, reduction=reduction,
                              return_grad=True)
            expected_loss, expected_grad = reference(case, p_values, target,
                                                     weight_values, reduction)
            msg = f"{reduction}, weighted={weight_in is not None}"
            assert_matches(loss, expected_loss, np.float64, err_msg=msg)
            assert_matches(grad, expected_grad, np.float64, err_msg=msg)
            assert grad.flags.writeable
    np.testing.assert_array_equal(np.array(p), p_before)


@pytest.mark.parametrize("layout", ["C", "F", "strided", "negative", "transposed"])
def test_layout_of_target_and_weight(layout, rng):
    case = CASES[0]
    pred, target = make_inputs(rng, (3, 4, 5), np.float32)
    weight = make_weight("random", pred.shape, rng).astype(np.float32)
    loss, grad = case(pred, relayout(target, layout), weight=relayout(weight, "F"),
                      return_grad=True)
    expected_loss, expected_grad = reference(case, pred, target, weight)
    assert_matches(loss, expected_loss, np.float32)
    assert_matches(grad, expected_grad, np.float32)


def test_float16_input_computed_in_float32(rng):
    pred, target = make_inputs(rng, (20,), np.float16)
    loss, grad = fl.huber_loss(pred, target, return_grad=True)
    assert type(loss) is np.float32
    assert grad.dtype == np.float32
    assert_matches(loss, reference(CASES[5], pred, target)[0], np.float32)


def test_float32_pred_casts_float64_target(rng):
    pred = rng.standard_normal(10).astype(np.float32)
    target = rng.standard_normal(10)
    loss = fl.mse_loss(pred, target)
    assert type(loss) is np.float32
    assert_matches(loss, reference(CASES[0], pred, target.astype(np.float32))[0],
                   np.float32)


@pytest.mark.parametrize("func", ALL_FUNCS, ids=FUNC_IDS)
def test_float32_target_cast_overflow_is_inf(func):
    # 1e300 has no float32 value: the target becomes inf, with no warning.
    pred = np.zeros(3, np.float32)
    target = np.array([1e300, 0.0, 0.0])
    loss = func(pred, target, reduction="sum")
    assert type(loss) is np.float32
    assert loss == np.inf


@pytest.mark.parametrize("func", ALL_FUNCS, ids=FUNC_IDS)
def test_zero_dim_and_scalars(func):
    loss, grad = func(np.float64(2.5), 1.0, return_grad=True)
    assert type(loss) is np.float64
    assert grad.shape == ()
    loss_sum = func(2.5, 1, reduction="sum")
    assert loss_sum == loss
    if func is not fl.rmse_loss:
        per_element = func(np.array(2.5), np.array(1.0), reduction="none")
        assert per_element.shape == ()
        assert per_element == loss


@pytest.mark.parametrize("func", ALL_FUNCS, ids=FUNC_IDS)
def test_zero_size(func):
    empty = np.zeros((0, 3))
    with np.errstate(all="raise"):
        loss, grad = func(empty, empty, return_grad=True)
        assert np.isnan(loss)
        assert grad.shape == (0, 3)
        assert func(empty, empty, reduction="sum") == 0.0
        loss, grad = func(empty, empty, weight=empty, return_grad=True)
        assert np.isnan(loss)
        if func is not fl.rmse_loss:
            per_element = func(empty, empty, reduction="none")
            assert per_element.shape == (0, 3)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_all_zero_weight_is_nan_with_zero_grad(case, rng):
    pred, target = make_inputs(rng, (6, 5), np.float64)
    pred[0, 0] = np.nan
    pred[1, 1] = np.inf
    weight = np.zeros(pred.shape)
    loss, grad = case(pred, target, weight=weight, return_grad=True)
    assert np.isnan(loss)
    np.testing.assert_array_equal(grad, 0.0)
    assert np.isnan(case(pred, target, weight=weight))
    assert case(pred, target, weight=weight, reduction="sum") == 0.0


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_zero_weight_hides_nan_and_inf(case, reduction, rng):
    pred, target = make_inputs(rng, (50,), np.float32)
    weight = (rng.random(50) + 0.5).astype(np.float32)
    pred[:4] = [np.nan, np.inf, -np.inf, 1e30]
    target[4:6] = [np.nan, np.inf]
    weight[:6] = 0.0
    loss, grad = case(pred, target, weight=weight, reduction=reduction,
                      return_grad=True)
    assert np.all(np.isfinite(loss))
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[:6], 0.0)
    expected_loss, expected_grad = reference(case, pred[6:], target[6:], weight[6:],
                                             reduction)
    if reduction == "none":
        np.testing.assert_array_equal(loss[:6], 0.0)
        loss = loss[6:]
    assert_matches(loss, expected_loss, np.float32)
    assert_matches(grad[6:], expected_grad, np.float32)


def test_inputs_not_modified(rng):
    pred, target = make_inputs(rng, (40,), np.float64)
    weight = make_weight("zeros", pred.shape, rng)
    copies = [pred.copy(), target.copy(), weight.copy()]
    for case in CASES:
        case(pred, target, weight=weight, return_grad=True)
        case(pred, target, reduction="none", return_grad=True)
    fl.rmse_loss(pred, target, weight=weight, return_grad=True)
    for before, after in zip(copies, [pred, target, weight]):
        np.testing.assert_array_equal(before, after)


# ---------------------------------------------------------------------------
# Threads: bit-identical results for every count.
# ---------------------------------------------------------------------------


def _bits(x):
    return np.asarray(x).tobytes()


@pytest.mark.parametrize("layout", ["C", "strided", "weighted"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_threads_bit_identical(case, layout, rng):
    pred, target = make_inputs(rng, (70_001,), np.float32)
    weight = None
    if layout == "strided":
        pred = np.repeat(pred, 2)[::2]
    elif layout == "weighted":
        weight = make_weight("zeros", pred.shape, rng).astype(np.float32)
    for reduction in REDUCTIONS:
        results = [
            case(pred, target, weight=weight, reduction=reduction, return_grad=True,
                 n_threads=n)
            for n in (*THREAD_COUNTS, None)
        ]
        for loss, grad in results[1:]:
            assert _bits(loss) == _bits(results[0][0]), reduction
            assert _bits(grad) == _bits(results[0][1]), reduction


def test_rmse_threads_bit_identical(rng):
    pred, target = make_inputs(rng, (50_001,), np.float64)
    results = [fl.rmse_loss(pred, target, return_grad=True, n_threads=n)
               for n in THREAD_COUNTS]
    for loss, grad in results[1:]:
        assert _bits(loss) == _bits(results[0][0])
        assert _bits(grad) == _bits(results[0][1])


def test_concurrent_calls_bit_identical(rng):
    pred, target = make_inputs(rng, (200_000,), np.float64)
    expected = fl.log_cosh_loss(pred, target, n_threads=2)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: fl.log_cosh_loss(pred, target, n_threads=2),
                                range(8)))
    for loss in results:
        assert _bits(loss) == _bits(expected)


# ---------------------------------------------------------------------------
# grad_out.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("func", ALL_FUNCS, ids=FUNC_IDS)
@pytest.mark.parametrize("order", ["C", "F"])
def test_grad_out_is_written_and_returned(func, order, rng):
    pred, target = make_inputs(rng, (6, 7), np.float64)
    grad_out = np.full(pred.shape, np.nan, order=order)
    loss, grad = func(pred, target, return_grad=True, grad_out=grad_out)
    assert grad is grad_out
    _, expected = func(pred, target, return_grad=True)
    np.testing.assert_array_equal(grad_out, expected)


def test_grad_out_shares_memory_with_result(rng):
    pred, target = make_inputs(rng, (5, 8), np.float32)
    buffer = np.zeros((5, 16), np.float32)
    grad_out = buffer[:, ::2]
    _, grad = fl.huber_loss(pred, target, return_grad=True, grad_out=grad_out,
                            reduction="sum")
    assert np.shares_memory(grad, buffer)
    np.testing.assert_array_equal(buffer[:, 1::2], 0.0)
    assert_matches(grad, reference(CASES[5], pred, target, None, "sum")[1],
                   np.float32)


def test_grad_out_without_return_grad(rng):
    pred, target = make_inputs(rng, (9,), np.float64)
    grad_out = np.zeros(9)
    loss = fl.l1_loss(pred, target, grad_out=grad_out)
    assert np.ndim(loss) == 0
    np.testing.assert_array_equal(grad_out, np.sign(pred - target) / 9)


@pytest.mark.parametrize("func", ALL_FUNCS, ids=FUNC_IDS)
def test_grad_out_of_unmergeable_layout(func, rng):
    # pred is C-ordered and grad_out transposed in memory: no split into two
    # mergeable runs exists, so the kernel writes a copy that is copied back.
    pred, target = make_inputs(rng, (5, 4, 6), np.float64)
    grad_out = np.empty((4, 5, 6)).transpose(1, 0, 2)
    weight = make_weight("zeros", pred.shape, rng)
    loss, grad = func(pred, target, weight=weight, return_grad=True,
                      grad_out=grad_out)
    assert grad is grad_out
    _, expected = func(pred, target, weight=weight, return_grad=True)
    np.testing.assert_allclose(grad_out, expected, rtol=1e-15)


def test_grad_out_equal_to_pred(rng):
    pred, target = make_inputs(rng, (12,), np.float64)
    expected = 2 * (pred - target)
    _, grad = fl.mse_loss(pred, target, reduction="none", return_grad=True,
                          grad_out=pred)
    assert grad is pred
    np.testing.assert_array_equal(pred, expected)


@pytest.mark.parametrize("func", ALL_FUNCS, ids=FUNC_IDS)
@pytest.mark.parametrize("aliased", ["pred", "target", "weight"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_out_overlapping_input(func, aliased, reduction, rng):
    # grad_out is the reversed view of an input, so writing the gradient in
    # order would overwrite elements that are still to be read.
    pred, target = make_inputs(rng, (7, 6), np.float64)
    weight = make_weight("random", pred.shape, rng)
    expected_loss, expected_grad = func(pred, target, weight=weight,
                                        reduction=reduction, return_grad=True)
    inputs = {"pred": pred, "target": target, "weight": weight}
    grad_out = inputs[aliased][::-1, ::-1]
    loss, grad = func(pred, target, weight=weight, reduction=reduction,
                      return_grad=True, grad_out=grad_out)
    assert grad is grad_out
    assert loss == expected_loss
    np.testing.assert_array_equal(grad, expected_grad)


@pytest.mark.parametrize("func", ALL_FUNCS, ids=FUNC_IDS)
def test_grad_out_same_view_as_target(func, rng):
    pred, target = make_inputs(rng, (4, 5), np.float64)
    expected_loss, expected_grad = func(pred, target, reduction="sum",
                                        return_grad=True)
    loss, grad = func(pred, target, reduction="sum", return_grad=True,
                      grad_out=target)
    assert grad is target
    assert loss == expected_loss
    np.testing.assert_array_equal(target, expected_grad)


# ---------------------------------------------------------------------------
# PyTorch and finite differences.
# ---------------------------------------------------------------------------

TORCH_CASES = [
    ("mse", fl.mse_loss, "mse_loss", {}),
    ("l1", fl.l1_loss, "l1_loss", {}),
    ("smooth_l1", fl.smooth_l1_loss, "smooth_l1_loss", {"beta": 1.0}),
    ("smooth_l1-beta0.3", fl.smooth_l1_loss, "smooth_l1_loss", {"beta": 0.3}),
    ("smooth_l1-beta0", fl.smooth_l1_loss, "smooth_l1_loss", {"beta": 0.0}),
    ("huber", fl.huber_loss, "huber_loss", {"delta": 1.0}),
    ("huber-delta2.5", fl.huber_loss, "huber_loss", {"delta": 2.5}),
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name, func, torch_name, kwargs", TORCH_CASES,
                         ids=[c[0] for c in TORCH_CASES])
def test_matches_torch(name, func, torch_name, kwargs, reduction, rng):
    torch = pytest.importorskip("torch")
    pred, target = make_inputs(rng, (4, 25), np.float64)
    # Exact ties and zeros, where the branches meet.
    target[0, :5] = pred[0, :5]
    target[1, :3] = pred[1, :3] - kwargs.get("beta", kwargs.get("delta", 1.0))

    p = torch.tensor(pred, requires_grad=True)
    torch_loss = getattr(torch.nn.functional, torch_name)(
        p, torch.tensor(target), reduction=reduction, **kwargs
    )
    torch_loss.sum().backward()

    loss, grad = func(pred, target, reduction=reduction, return_grad=True, **kwargs)
    np.testing.assert_allclose(loss, torch_loss.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(grad, p.grad.numpy(), rtol=1e-12, atol=1e-15)


def _finite_difference(f, x, h=1e-4):
    """Return the 4th-order central difference gradient of scalar ``f``."""
    grad = np.empty_like(x)
    for i in range(x.size):
        steps = []
        for k in (2, 1, -1, -2):
            shifted = x.copy()
            shifted.flat[i] += k * h
            steps.append(float(f(shifted)))
        grad.flat[i] = (-steps[0] + 8 * steps[1] - 8 * steps[2] + steps[3]) / (12 * h)
    return grad


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_grad_matches_finite_differences(case, reduction, rng):
    # |d| in [0.15, 0.35] or [1.5, 3]: away from every kink (0, 0.5, 1, 2).
    target = rng.standard_normal(12)
    magnitude = np.where(rng.random(12) < 0.5, rng.uniform(0.15, 0.35, 12),
                         rng.uniform(1.5, 3.0, 12))
    pred = target + magnitude * rng.choice([-1.0, 1.0], 12)
    weight = rng.random(12) + 0.5

    def f(p):
        return case(p, target, weight=weight, reduction=reduction)

    _, grad = case(pred, target, weight=weight, reduction=reduction,
                   return_grad=True)
    np.testing.assert_allclose(grad, _finite_difference(f, pred), rtol=1e-8,
                               atol=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_rmse_grad_matches_finite_differences(reduction, rng):
    pred, target = make_inputs(rng, (3, 4), np.float64)
    weight = rng.random((3, 4)) + 0.5

    def f(p):
        return fl.rmse_loss(p, target, weight=weight, reduction=reduction)

    _, grad = fl.rmse_loss(pred, target, weight=weight, reduction=reduction,
                           return_grad=True)
    np.testing.assert_allclose(grad, _finite_difference(f, pred), rtol=1e-8,
                               atol=1e-10)


# ---------------------------------------------------------------------------
# Adversarial values.
# ---------------------------------------------------------------------------

ADVERSARIAL = np.array([
    0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0, 0.1, 1e-30, -1e-30, 1e-300,
    1e30, -1e30, 1e300, 20.0, 710.0, -800.0, np.nan, np.inf, -np.inf,
])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_adversarial_values(case, dtype):
    # pred = target + d for each d in ADVERSARIAL. Where that sum rounds
    # (3 + 1e-30, say), the reference reads the rounded pred.
    target = np.zeros(ADVERSARIAL.size, dtype)
    target[::2] = 3.0
    with np.errstate(over="ignore", invalid="ignore"):
        pred = (target.astype(np.float64) + ADVERSARIAL).astype(dtype)
    loss, grad = case(pred, target, reduction="none", return_grad=True)
    with np.errstate(over="ignore", invalid="ignore"):
        expected_loss, expected_grad = reference(case, pred, target, None, "none")
        expected_loss = expected_loss.astype(dtype)
        expected_grad = expected_grad.astype(dtype)
    rtol = TOLERANCE[dtype]
    np.testing.assert_allclose(loss, expected_loss, rtol=rtol, atol=1e-300)
    np.testing.assert_allclose(grad, expected_grad, rtol=rtol, atol=1e-300)


def test_exact_ties():
    zero = np.zeros(4)
    d = np.array([1.0, -1.0, 0.5, 0.0])
    _, grad = fl.huber_loss(d, zero, delta=1.0, reduction="none", return_grad=True)
    np.testing.assert_array_equal(grad, [1.0, -1.0, 0.5, 0.0])
    loss = fl.huber_loss(d, zero, delta=1.0, reduction="none")
    np.testing.assert_array_equal(loss, [0.5, 0.5, 0.125, 0.0])
    # smooth L1 is linear at |d| == beta: abs(d) - beta/2.
    loss, grad = fl.smooth_l1_loss(d, zero, beta=1.0, reduction="none",
                                   return_grad=True)
    np.testing.assert_array_equal(loss, [0.5, 0.5, 0.125, 0.0])
    np.testing.assert_array_equal(grad, [1.0, -1.0, 0.5, 0.0])
    for func in [fl.l1_loss, fl.pinball_loss]:
        _, grad = func(zero, zero, reduction="none", return_grad=True)
        np.testing.assert_array_equal(grad, 0.0)


def test_smooth_l1_beta_zero_is_l1(rng):
    pred, target = make_inputs(rng, (30,), np.float64)
    target[:4] = pred[:4]
    for reduction in REDUCTIONS:
        smooth = fl.smooth_l1_loss(pred, target, beta=0.0, reduction=reduction,
                                   return_grad=True)
        l1 = fl.l1_loss(pred, target, reduction=reduction, return_grad=True)
        np.testing.assert_array_equal(smooth[0], l1[0])
        np.testing.assert_array_equal(smooth[1], l1[1])


def test_log_cosh_large_and_tiny():
    d = np.array([1e-30, 1e-8, 0.5, 1.0, 1.0000001, 30.0, 1000.0, 1e300])
    loss = fl.log_cosh_loss(d, np.zeros_like(d), reduction="none")
    # Expected values: float(mpmath.log(mpmath.cosh(mpmath.mpf(x)))) with
    # mpmath 1.3.0 at mp.dps = 120, enough digits for cosh(1e-30) - 1.
    np.testing.assert_allclose(loss[:6], [
        5.0000000000000005e-61, 5e-17, 0.12011450695827752, 0.4337808304830272,
        0.43378090664244495, 29.306852819440056,
    ], rtol=4e-16)
    assert loss[6] == 1000.0 - math.log(2)
    assert loss[7] == 1e300


def test_nan_propagates(rng):
    pred, target = make_inputs(rng, (10,), np.float64)
    pred[3] = np.nan
    for case in CASES:
        loss, grad = case(pred, target, return_grad=True)
        assert np.isnan(loss), case.id
        assert np.isnan(grad[3]), case.id
        assert np.all(np.isfinite(np.delete(grad, 3))), case.id


def test_float32_overflow_gives_inf_without_warning():
    big = np.full(4, 1e30, np.float32)
    loss, grad = fl.mse_loss(big, -big, return_grad=True)
    assert type(loss) is np.float32
    assert loss == np.inf
    np.testing.assert_allclose(grad, 1e30, rtol=1e-6)
    assert fl.rmse_loss(big, -big) == np.float32(2e30)


# ---------------------------------------------------------------------------
# Size and accuracy.
# ---------------------------------------------------------------------------


def test_zero_stride_beyond_int32_indexing():
    n = 2**31 + 10
    pred = np.broadcast_to(np.float64(3.0), (n,))
    target = np.broadcast_to(np.float64(1.0), (n,))
    # Exact in double: every partial sum is an integer below 2**53.
    assert fl.l1_loss(pred, target, reduction="sum") == 2.0 * n


def test_float32_mean_of_1e8_elements(rng):
    # 24415 * 4096 = 100,003,840 elements read through zero row strides; a
    # float32 accumulator would drift far from the float64 mean.
    row = rng.standard_normal(4096).astype(np.float32)
    target_row = rng.standard_normal(4096).astype(np.float32)
    shape = (24415, 4096)
    pred = np.broadcast_to(row, shape)
    target = np.broadcast_to(target_row, shape)
    expected = np.mean((row.astype(np.float64) - target_row) ** 2)
    loss = fl.mse_loss(pred, target)
    assert type(loss) is np.float32
    assert abs(float(loss) - expected) <= 1e-6 * expected


# ---------------------------------------------------------------------------
# Invalid input.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("func", ALL_FUNCS, ids=FUNC_IDS)
def test_invalid_inputs_raise(func):
    x = np.zeros(5)
    with pytest.raises(ValueError, match=re.escape(
            "target must have the shape of pred (5,), got (5, 1)")):
        func(x, x.reshape(5, 1))
    with pytest.raises(ValueError, match=re.escape(
            "target must have the shape of pred (5, 1), got (5,)")):
        func(x.reshape(5, 1), x)
    with pytest.raises(ValueError, match=re.escape(
            "weight must have the shape of pred (5,), got (1,)")):
        func(x, x, weight=np.ones(1))
    with pytest.raises(TypeError, match="pred must be an array of real numbers, got dtype"
                       " complex128"):
        func(x + 1j, x)
    with pytest.raises(TypeError, match="target must be .* got dtype object"):
        func(x, np.array([1, None, 2, 3, 4], dtype=object))
    with pytest.raises(TypeError, match="pred must be .* got dtype <U3 .string."):
        func(["abc"] * 5, x)
    with pytest.raises(TypeError, match="weight must be .* got dtype complex"):
        func(x, x, weight=x + 1j)
    with pytest.raises(ValueError, match="reduction must be one of 'mean', 'sum'"):
        func(x, x, reduction="avg")
    with pytest.raises(ValueError, match="n_threads must be None or an int >= 1, got 0"):
        func(x, x, n_threads=0)
    with pytest.raises(TypeError, match="n_threads must be None or an int, got float"):
        func(x, x, n_threads=2.0)
    with pytest.raises(ValueError, match=re.escape("grad_out must have shape (5,), got (4,)")):
        func(x, x, return_grad=True, grad_out=np.zeros(4))
    with pytest.raises(ValueError, match="grad_out must have dtype float64"):
        func(x, x, return_grad=True, grad_out=np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="grad_out must have dtype float32"):
        func(x.astype(np.float16), x, return_grad=True, grad_out=np.zeros(5, np.float16))
    read_only = np.zeros(5)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="grad_out must be writeable"):
        func(x, x, return_grad=True, grad_out=read_only)
    with pytest.raises(TypeError, match="grad_out must be a numpy.ndarray, got list"):
        func(x, x, return_grad=True, grad_out=[0.0] * 5)


def test_invalid_loss_parameters_raise():
    x = np.zeros(3)
    with pytest.raises(ValueError, match="beta must be >= 0.0, got -0.5"):
        fl.smooth_l1_loss(x, x, beta=-0.5)
    with pytest.raises(ValueError, match="beta must be >= 0.0, got nan"):
        fl.smooth_l1_loss(x, x, beta=math.nan)
    with pytest.raises(TypeError, match="beta must be a real number, got str"):
        fl.smooth_l1_loss(x, x, beta="1")
    with pytest.raises(ValueError, match="delta must be > 0.0, got 0.0"):
        fl.huber_loss(x, x, delta=0.0)
    with pytest.raises(ValueError, match="delta must be > 0.0, got -1"):
        fl.huber_loss(x, x, delta=-1)
    for quantile in [-0.1, 1.5, math.nan]:
        with pytest.raises(ValueError, match=r"quantile must be in \[0.0, 1.0\], got"):
            fl.pinball_loss(x, x, quantile=quantile)
    assert fl.pinball_loss(x, x, quantile=np.float32(1)) == 0.0
    assert fl.huber_loss(x, x, delta=2) == 0.0


def test_rmse_rejects_reduction_none():
    x = np.zeros(3)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum' for"
                       " rmse_loss, got 'none'"):
        fl.rmse_loss(x, x, reduction="none")
    with pytest.raises(ValueError, match="reduction must be one of 'mean', 'sum', got"):
        fl.rmse_loss(x.tolist(), x, reduction="max")


@pytest.mark.parametrize("func", ALL_FUNCS, ids=FUNC_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_numpy_str_reduction(func, reduction, rng):
    pred, target = make_inputs(rng, (6,), np.float64)
    expected = func(pred, target, reduction=reduction)
    assert func(pred, target, reduction=np.str_(reduction)) == expected


def test_rmse_rejects_numpy_str_none():
    x = np.zeros(3)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum' for"
                       " rmse_loss, got 'none'"):
        fl.rmse_loss(x, x, reduction=np.str_("none"))


def test_errors_raised_before_grad_out_written():
    x = np.zeros(5)
    grad_out = np.full(5, 7.0)
    with pytest.raises(ValueError):
        fl.mse_loss(x, x, weight=np.ones(4), return_grad=True, grad_out=grad_out)
    np.testing.assert_array_equal(grad_out, 7.0)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_layouts_bit_identical(case, rng):
    # The strided loop sums in the lane order of the contiguous loop, so an
    # unweighted result does not depend on the layout either.
    pred, target = make_inputs(rng, (9, 1001), np.float64)
    expected = case(pred, target, return_grad=True)
    for layout in ["F", "strided", "negative"]:
        p = relayout(pred[None], layout)[0] if layout == "negative" else relayout(
            pred, layout)
        loss, grad = case(p, target, return_grad=True)
        assert _bits(loss) == _bits(expected[0]), layout
        assert _bits(grad) == _bits(expected[1]), layout


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_contiguous_and_strided_bit_identical(case, dtype, rng):
    # Lengths around multiples of the 8 accumulator lanes and of a block, so
    # the vectorized groups, their tails and the strided loop all meet.
    for n in [1, 7, 8, 9, 17, 4095, 4097]:
        pred, target = make_inputs(rng, (n,), dtype)
        target[: min(n, 2)] = pred[: min(n, 2)]
        strided = np.repeat(pred, 2)[::2]
        for reduction in REDUCTIONS:
            expected_loss, expected_grad = case(pred, target, reduction=reduction,
                                                return_grad=True)
            loss, grad = case(strided, target, reduction=reduction, return_grad=True)
            msg = f"n={n}, {reduction}"
            assert _bits(loss) == _bits(expected_loss), msg
            assert _bits(grad) == _bits(expected_grad), msg


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_contiguous_grad_out_is_used(dtype, rng):
    pred, target = make_inputs(rng, (3, 50), dtype)
    grad_out = np.full(pred.shape, np.nan, dtype)
    loss, grad = fl.huber_loss(pred, target, return_grad=True, grad_out=grad_out)
    assert grad is grad_out
    assert np.shares_memory(grad, grad_out)
    expected_loss, expected_grad = fl.huber_loss(pred, target, return_grad=True)
    assert _bits(loss) == _bits(expected_loss)
    assert _bits(grad_out) == _bits(expected_grad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", [-1, 0])
def test_contiguous_path_at_threshold(dtype, offset):
    # The contiguous path resolves n_threads=None only from the parallel
    # threshold up; every count gives the bits of one thread on both sides,
    # and the loss is a scalar of the compute dtype.
    from fastloss import regression

    rng = np.random.default_rng(7)
    n = regression._PARALLEL_MIN_ITEMS + offset
    pred = rng.standard_normal(n).astype(dtype)
    target = rng.standard_normal(n).astype(dtype)
    expected_loss, expected_grad = fl.mse_loss(
        pred, target, return_grad=True, n_threads=1
    )
    assert type(expected_loss) is np.dtype(dtype).type
    for n_threads in (None, 2, 3):
        loss, grad = fl.mse_loss(pred, target, return_grad=True, n_threads=n_threads)
        assert loss.tobytes() == expected_loss.tobytes()
        assert grad.tobytes() == expected_grad.tobytes()
    with pytest.raises(ValueError, match="n_threads must be None or an int >= 1"):
        fl.mse_loss(pred[:16], target[:16], n_threads=0)


def test_contiguous_path_nan_is_positive():
    pred = np.array([np.nan, 1.0])
    loss = fl.mse_loss(pred, np.zeros(2))
    assert np.isnan(loss)
    assert not np.signbit(loss)
