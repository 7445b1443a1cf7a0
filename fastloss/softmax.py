"""Softmax cross-entropy and softmax focal loss.

Both functions take logits with a class axis: ``(C,)``, ``(N, C)`` or
``(N, C, d1, ..., dk)``, or channels-last with ``axis=-1``. They validate
every argument and view the arrays as ``(outer, C, inner)``, without a copy
where the strides allow it. One kernel of ``fastloss._kernels._softmax`` then
computes the loss and the gradient in one pass.
"""

import math
import operator

import numpy as np

from ._kernels import load as _load_kernels
from ._validation import (
    _FLOAT32_OVERFLOW,
    REDUCTIONS,
    as_array,
    as_float_array,
    as_index_array,
    check_grad_out,
    check_reduction,
    check_scalar,
    class_axis_view,
    index_view,
    normalize_axis,
    resolve_n_threads,
    to_scalar,
)

_softmax = _load_kernels("_softmax")

__all__ = ["cross_entropy", "focal_loss"]



# Placeholder outputs for the probability kernel's grad and losses arguments
# when they are not requested, so that the fused kernel still gets one dtype.
_NO_GRAD = {
    np.dtype(np.float32): np.empty((0, 0, 0), np.float32),
    np.dtype(np.float64): np.empty((0, 0, 0), np.float64),
}
_NO_LOSSES = {
    np.dtype(np.float32): np.empty((0, 0), np.float32),
    np.dtype(np.float64): np.empty((0, 0), np.float64),
}

# The class-index kernels' specializations by compute dtype: calling one
# directly skips the fused function's signature matching, and lets None
# stand for an output that is not requested.
_CE_LABELS = {
    np.dtype(np.float32): _softmax.cross_entropy_labels["float"],
    np.dtype(np.float64): _softmax.cross_entropy_labels["double"],
}
_FOCAL_LABELS = {
    np.dtype(np.float32): _softmax.focal_labels["float"],
    np.dtype(np.float64): _softmax.focal_labels["double"],
}
_FLOAT_DTYPES = frozenset(_CE_LABELS)
_is_c_contiguous = _softmax.is_c_contiguous
_INT64 = np.dtype(np.int64)
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_ndarray = np.ndarray
_empty = np.empty
# Below this many logits every kernel (MIN_PARALLEL_ITEMS in _common.pxd)
# runs on the calling thread whatever the thread count, so None need not be
# resolved there.
_PARALLEL_MIN_ITEMS = _load_kernels("_regression").PARALLEL_MIN_ITEMS


def cross_entropy(
    logits,
    target,
    *,
    weight=None,
    ignore_index=-100,
    label_smoothing=0.0,
    axis=1,
    reduction="mean",
    return_grad=False,
    grad_out=None,
    n_threads=None,
):
    """Compute the softmax cross-entropy between logits and targets.

    Follows ``torch.nn.functional.cross_entropy``. With ``lp`` the log-softmax
    of one position's logits over the class axis, ``y`` its class index and
    ``eps = label_smoothing``, the loss of a position is::

        -(1 - eps) * w[y] * lp[y] - eps / C * sum_c w[c] * lp[c]

    and with class probabilities ``t``, ``-sum_c w[c] * t'[c] * lp[c]`` with
    ``t' = (1 - eps) * t + eps / C``. ``w`` is ``weight`` or all ones. The
    log-softmax is shifted by the maximum logit, so logits of any magnitude
    give a finite loss and gradient.

    Parameters
    ----------
    logits : array_like of shape (C,), (N, C) or (N, C, d1, ..., dk)
        Unnormalized scores. float16 is computed in float32, integers in
        float64.
    target : array_like
        Integer class indices of the logits' shape without the class axis
        (any integer dtype), or floating class probabilities of the logits'
        shape.
    weight : array_like of shape (C,), optional
        Per-class weights.
    ignore_index : int, default -100
        Class-index target that contributes no loss and no gradient and is
        not counted in the mean. Unused for probability targets.
    label_smoothing : float in [0, 1], default 0.0
        Mass moved from the target to the uniform distribution over classes.
    axis : int, default 1
        The class axis; ``axis=-1`` reads channels-last data in place. For
        ``(C,)`` logits the class axis is 0, and ``axis`` must be 0, 1 or -1.
    reduction : {"mean", "sum", "none"}, default "mean"
        With class indices, "mean" divides the sum by the kept targets'
        ``sum(w[y])``; with probabilities, by the number of positions.
        "none" returns the per-position losses with the index shape.
    return_grad : bool, default False
        Also return the gradient of the returned loss with respect to
        ``logits``, in the compute dtype.
    grad_out : ndarray, optional
        Writeable array of the logits' shape and compute dtype that receives
        the gradient; it is the array returned. It is filled even with
        ``return_grad=False``, in which case only the loss is returned.
    n_threads : int, optional
        OpenMP threads; None uses what OpenMP offers. The result is
        bit-identical for every count.

    Returns
    -------
    loss : numpy scalar of the compute dtype, or ndarray for "none"
    grad : ndarray, only with ``return_grad=True``

    Raises
    ------
    TypeError
        For a non-numeric input, or a floating target of the index shape.
    ValueError
        For mismatched shapes, a class index outside [0, C) that is not
        ``ignore_index``, or an invalid keyword value.

    Notes
    -----
    A mean over zero kept targets, or over a total weight of zero, is nan,
    with an all-zero gradient and no warning. Ignored positions and
    positions of zero weight never contribute, even with NaN logits (with
    ``label_smoothing > 0`` a zero-weight target still takes the smoothing
    term, as in PyTorch). Where PyTorch computes ``0 * -inf = nan`` for a
    ``-inf`` logit whose target mass or class weight is 0, this function
    leaves the class out and returns the limit: no cost and zero gradient.
    A ``+inf`` logit likewise takes its position's whole probability, shared
    equally among several, so that a finite target logit there costs
    ``inf`` with a finite gradient. A ``+inf`` target logit takes its share
    of the probability: alone it costs 0, with a zero gradient, where
    PyTorch returns NaN (``inf - inf``). With ``label_smoothing > 0`` a
    finite logit of nonzero weight beside a ``+inf`` one costs ``inf``.
    A class weight is used only through the classes that carry target mass,
    so a NaN or inf weight of a class that no target uses costs nothing
    when ``label_smoothing`` is 0.

    Examples
    --------
    >>> import numpy as np, fastloss as fl
    >>> logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])
    >>> loss, grad = fl.cross_entropy(logits, np.array([0, 2]), return_grad=True)
    >>> round(float(loss), 6)
    0.168117
    """
    if (weight is None and grad_out is None and type(logits) is _ndarray
            and type(target) is _ndarray and type(axis) is int
            and type(ignore_index) is int and type(label_smoothing) is float
            and type(reduction) is str and type(return_grad) is bool):
        result = _cross_entropy_plain(logits, target, ignore_index, label_smoothing,
                                      axis, reduction, return_grad, n_threads)
        if result is not None:
            return result

    x, t, class_axis, probs, dtype = _prepare(logits, target, axis, probabilities=True)
    reduction = check_reduction(reduction)
    if type(label_smoothing) is float and 0.0 <= label_smoothing <= 1.0:
        smoothing = label_smoothing
    else:
        smoothing = check_scalar(label_smoothing, "label_smoothing", 0.0, 1.0)
    ignore = _check_ignore_index(ignore_index)
    n_threads = resolve_n_threads(n_threads)
    n_classes = x.shape[class_axis]
    w = _check_weight(weight, n_classes, dtype)
    grad_out, want_grad = _check_grad_request(return_grad, grad_out, x.shape, dtype)

    if probs:
        result = _run_probs(
            x, t, class_axis, w, smoothing, reduction, want_grad, grad_out,
            n_threads,
        )
    else:
        result = _run_labels(
            _CE_LABELS[dtype], x, t, class_axis, w, ignore, smoothing, reduction,
            want_grad, grad_out, n_threads,
        )
    return result if want_grad == return_grad else result[0]


def _cross_entropy_plain(logits, target, ignore, smoothing, axis, reduction,
                         return_grad, n_threads):
    """Compute ``cross_entropy`` for plain valid arguments, or return None.

    This is the path of ``_run_labels`` for C-contiguous non-empty float
    logits with 2 or more axes, C-contiguous int64 class indices, no weight
    and no ``grad_out``, with every scalar argument of its plain type and
    valid. For anything else it returns None, and the general path checks
    the arguments and raises the errors.
    """
    dtype = logits.dtype
    shape = logits.shape
    ndim = len(shape)
    if (dtype not in _FLOAT_DTYPES or ndim < 2 or not -ndim <= axis < ndim
            or target.dtype != _INT64 or reduction not in REDUCTIONS
            or not 0.0 <= smoothing <= 1.0 or not _INT64_MIN <= ignore <= _INT64_MAX
            or logits.size == 0):
        return None
    class_axis = axis % ndim
    index_shape = shape[:class_axis] + shape[class_axis + 1 :]
    if (target.shape != index_shape or not logits.flags.c_contiguous
            or not target.flags.c_contiguous):
        return None

    n_classes = shape[class_axis]
    if ndim == 2 and class_axis == 1:
        outer, inner = shape[0], 1
    else:
        outer = math.prod(shape[:class_axis])
        inner = math.prod(shape[class_axis + 1 :])
    xv = logits.reshape(outer, n_classes, inner)
    tv = target.reshape(outer, inner)
    w = _UNIT_WEIGHTS.get((n_classes, dtype))
    if w is None:
        w = _unit_weight(n_classes, dtype)
    if n_threads is not None or logits.size >= _PARALLEL_MIN_ITEMS:
        n_threads = resolve_n_threads(n_threads)
    else:
        n_threads = 1
    grad = _empty(shape, dtype) if return_grad else None
    gv = grad.reshape(xv.shape) if return_grad else None
    mean = reduction == "mean"
    if reduction == "none":
        losses = _empty(index_shape, dtype)
        lv = losses.reshape(outer, inner)
    else:
        losses = lv = None

    loss_sum, weight_sum, bad = _CE_LABELS[dtype](
        xv, tv, w, ignore, smoothing, gv, lv, return_grad, losses is not None, mean,
        False, n_threads,
    )
    if bad >= 0:
        _raise_bad_label(target, bad, n_classes, ignore)
    if return_grad and mean and weight_sum == 0.0:
        grad[...] = 0

    if reduction == "none":
        return (losses, grad) if return_grad else losses
    if reduction == "sum":
        value = loss_sum
    else:
        value = loss_sum / weight_sum if weight_sum != 0.0 else math.nan
    if -_FLOAT32_OVERFLOW < value < _FLOAT32_OVERFLOW:
        # to_scalar's result for a value that is neither NaN nor beyond
        # float32's range, without its checks.
        loss = dtype.type(value)
    else:
        loss = to_scalar(value, dtype)
    return (loss, grad) if return_grad else loss


def focal_loss(
    logits,
    target,
    *,
    gamma=2.0,
    weight=None,
    ignore_index=-100,
    axis=1,
    reduction="mean",
    return_grad=False,
    grad_out=None,
    n_threads=None,
):
    """Compute the softmax focal loss of Lin et al. (2017).

    The loss of a position with class index ``y`` is::

        -w[y] * (1 - p_t)**gamma * log(p_t),   p_t = softmax(logits)[y]

    with ``1 - p_t`` computed as ``-expm1(log p_t)``, which stays accurate as
    ``p_t`` nears 1. "mean" divides the sum by the kept positions'
    ``sum(w[y])`` for every ``gamma``, so ``gamma=0`` gives
    :func:`cross_entropy`. The gradient is finite for every ``gamma >= 0``,
    including ``0 < gamma < 1`` at ``p_t = 1``, where it tends to 0.

    Parameters
    ----------
    logits : array_like of shape (C,), (N, C) or (N, C, d1, ..., dk)
        Unnormalized scores. float16 is computed in float32, integers in
        float64.
    target : array_like of integers
        Class indices of the logits' shape without the class axis.
    gamma : float >= 0, default 2.0
        Focusing parameter.
    weight : array_like of shape (C,), optional
        Per-class weights ``w``.
    ignore_index : int, default -100
        Class-index target that contributes no loss and no gradient and is
        not counted in the mean.
    axis : int, default 1
        The class axis, as in :func:`cross_entropy`.
    reduction : {"mean", "sum", "none"}, default "mean"
    return_grad : bool, default False
    grad_out : ndarray, optional
    n_threads : int, optional
        As in :func:`cross_entropy`.

    Returns
    -------
    loss : numpy scalar of the compute dtype, or ndarray for "none"
    grad : ndarray, only with ``return_grad=True``

    Notes
    -----
    PyTorch has no softmax focal loss; the keywords and the reductions follow
    :func:`cross_entropy`, as do the limits at infinite logits: a ``+inf``
    target logit alone gives ``p_t = 1``, a loss of 0 and a zero gradient.
    Class-probability targets are not accepted.

    References
    ----------
    T.-Y. Lin, P. Goyal, R. Girshick, K. He, P. Dollar, "Focal Loss for Dense
    Object Detection", ICCV 2017.
    """
    x, t, class_axis, _, dtype = _prepare(logits, target, axis, probabilities=False)
    gamma = check_scalar(gamma, "gamma", low=0.0)
    reduction = check_reduction(reduction)
    ignore = _check_ignore_index(ignore_index)
    n_threads = resolve_n_threads(n_threads)
    n_classes = x.shape[class_axis]
    w = _check_weight(weight, n_classes, dtype)
    grad_out, want_grad = _check_grad_request(return_grad, grad_out, x.shape, dtype)

    result = _run_labels(
        _FOCAL_LABELS[dtype], x, t, class_axis, w, ignore, gamma, reduction,
        want_grad, grad_out, n_threads,
    )
    return result if want_grad == return_grad else result[0]


def _prepare(logits, target, axis, probabilities):
    """Convert and check logits and target.

    Returns ``(x, t, class_axis, probs, dtype)``.

    ``t`` is an int64 index array, or with ``probs`` a float array of the
    logits' shape in the compute dtype.
    """
    # Plain arrays of a compute dtype and int64 targets, the common case,
    # skip the general conversions.
    if type(logits) is np.ndarray and logits.dtype in _FLOAT_DTYPES:
        x = logits
    else:
        x = as_float_array(logits, "logits")
    if x.ndim == 0:
        raise ValueError(
            "logits must have a class axis, of shape (C,), (N, C) or"
            " (N, C, d1, ..., dk), got a 0-d array"
        )
    if x.ndim == 1:
        if isinstance(axis, (bool, np.bool_)) or not isinstance(
            axis, (int, np.integer)
        ):
            raise TypeError(f"axis must be an int, got {type(axis).__name__}")
        if axis not in (0, 1, -1):
            raise ValueError(f"axis must be 0, 1 or -1 for 1-d logits, got {axis}")
        class_axis = 0
    else:
        class_axis = normalize_axis(axis, x.ndim)
    if x.shape[class_axis] == 0:
        raise ValueError(
            f"logits must have at least one class, got shape {x.shape} with"
            f" 0 classes on axis {class_axis}"
        )

    index_shape = x.shape[:class_axis] + x.shape[class_axis + 1 :]
    if type(target) is np.ndarray and target.dtype == _INT64:
        if target.shape != index_shape:
            raise ValueError(
                f"target of class indices must have shape {index_shape} (the"
                f" shape of logits {x.shape} without axis {class_axis}), got"
                f" {target.shape}"
            )
        return x, target, class_axis, False, x.dtype
    t = as_array(target, "target")
    if t.dtype.kind == "f":
        if t.shape == x.shape and probabilities:
            return x, as_float_array(t, "target", x.dtype), class_axis, True, x.dtype
        if t.shape == index_shape:
            raise TypeError(
                f"target of shape {t.shape} must hold integer class indices, got"
                f" dtype {t.dtype}. Convert whole-number labels with"
                " .astype(np.int64). A floating target is read as class"
                f" probabilities only with the logits' shape {x.shape}."
            )
        if t.shape == x.shape:
            raise TypeError(
                f"target must hold integer class indices of shape {index_shape},"
                f" got dtype {t.dtype}, because focal_loss does not accept class"
                " probabilities"
            )
        raise ValueError(
            f"target must have shape {index_shape} (class indices) or"
            f" {x.shape} (class probabilities), got {t.shape}"
        )
    if t.shape != index_shape:
        raise ValueError(
            f"target of class indices must have shape {index_shape} (the shape"
            f" of logits {x.shape} without axis {class_axis}), got {t.shape}"
        )
    return x, as_index_array(t, "target"), class_axis, False, x.dtype


def _check_ignore_index(ignore_index):
    if type(ignore_index) is int and -(2**63) <= ignore_index < 2**63:
        return ignore_index
    if isinstance(ignore_index, (bool, np.bool_)):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    try:
        value = operator.index(ignore_index)
    except TypeError:
        raise TypeError(
            f"ignore_index must be an int, got {type(ignore_index).__name__}"
        ) from None
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {value}")
    return value


def _check_weight(weight, n_classes, dtype):
    """Return the class weights as a contiguous array, all ones when None."""
    if weight is None:
        w = _UNIT_WEIGHTS.get((n_classes, dtype))
        return w if w is not None else _unit_weight(n_classes, dtype)
    w = as_float_array(weight, "weight", dtype)
    if w.shape != (n_classes,):
        raise ValueError(
            f"weight must have shape ({n_classes},), one value per class, got"
            f" {w.shape}"
        )
    return np.ascontiguousarray(w)


# Read-only all-ones weights by (n_classes, dtype), so that a call without
# weight allocates nothing; a plain dict lookup costs less than lru_cache.
_UNIT_WEIGHTS = {}


def _unit_weight(n_classes, dtype):
    w = np.ones(n_classes, dtype)
    w.flags.writeable = False
    if len(_UNIT_WEIGHTS) >= 64:
        _UNIT_WEIGHTS.clear()
    _UNIT_WEIGHTS[n_classes, dtype] = w
    return w


def _check_grad_request(return_grad, grad_out, shape, dtype):
    """Return ``(grad_out, want_grad)``: a grad_out is filled even without
    return_grad, as NumPy's ``out=`` is."""
    if grad_out is None:
        return None, bool(return_grad)
    return check_grad_out(grad_out, shape, dtype), True


def _class_view(a, class_axis):
    """Return ``(view, base)``: an ``(outer, C, inner)`` view of ``a``.

    ``base`` is ``a`` itself, or the copy that the view reads when the
    strides of ``a`` could not be walked in place.
    """
    if _is_c_contiguous(a):
        shape = a.shape
        outer = math.prod(shape[:class_axis])
        inner = math.prod(shape[class_axis + 1 :])
        return a.reshape(outer, shape[class_axis], inner), a
    view, base = class_axis_view(a, class_axis)
    if any(s % a.itemsize for s in view.strides):
        base = np.ascontiguousarray(a)
        return _class_view(base, class_axis)
    return view, base


def _label_view(t, class_axis):
    if _is_c_contiguous(t):
        outer = math.prod(t.shape[:class_axis])
        return t.reshape(outer, -1) if outer else t.reshape(0, 0)
    return index_view(t, class_axis)


def _grad_views(return_grad, grad_out, x, class_axis, inputs):
    """Return ``(grad, view, base)`` for the kernel to write the gradient into.

    ``base`` is a fresh array, copied to ``grad_out`` by ``_finish_grad``,
    when ``grad_out`` may share memory with one of ``inputs``.
    """
    if not return_grad:
        return None, _NO_GRAD[x.dtype], None
    if grad_out is None or _overlaps_any(grad_out, inputs):
        base = np.empty(x.shape, x.dtype)
        view, _ = _class_view(base, class_axis)
        return (base if grad_out is None else grad_out), view, base
    view, base = _class_view(grad_out, class_axis)
    return grad_out, view, base


def _overlaps_any(grad_out, inputs):
    # _validation.grad_out_needs_buffer lets grad_out be the very same view
    # as an input, which is safe only for kernels that read each input
    # element before writing its gradient. These kernels are not: they store
    # exp(z - max) in a position's gradient slots and then read logits[y],
    # the class-probability targets and the weights again.
    for a in inputs:
        if np.may_share_memory(grad_out, a):
            return True
    return False


def _finish_grad(grad, base):
    # The kernel wrote a C-order copy when grad_out could not be viewed in place.
    if base is not grad:
        grad[...] = base


def _run_labels(kernel, x, t, class_axis, w, ignore, param, reduction,
                return_grad, grad_out, n_threads):
    """Run a class-index kernel and reduce its result."""
    dtype = x.dtype
    xv, _ = _class_view(x, class_axis)
    tv = _label_view(t, class_axis)
    mean = reduction == "mean"
    if not return_grad:
        grad = gv = gbase = None
    elif grad_out is None:
        # xv always has the shape (outer, C, inner), which a fresh C-order
        # gradient takes by a plain reshape.
        grad = gbase = np.empty(x.shape, dtype)
        gv = grad.reshape(xv.shape)
    else:
        grad, gv, gbase = _grad_views(True, grad_out, x, class_axis, (x, t, w))

    if reduction == "none":
        losses = np.empty(t.shape, dtype)
        lv = _label_view(losses, class_axis)
    else:
        losses = lv = None

    # A grad_out of the caller's must stay untouched when a target is bad,
    # so the kernel checks the targets before it writes there. A gradient
    # allocated here is simply dropped on error.
    loss_sum, weight_sum, bad = kernel(
        xv, tv, w, ignore, param, gv, lv, return_grad, losses is not None, mean,
        grad_out is not None, n_threads,
    )
    if bad >= 0:
        _raise_bad_label(t, bad, x.shape[class_axis], ignore)
    if return_grad:
        if mean and weight_sum == 0.0:
            grad[...] = 0
        else:
            _finish_grad(grad, gbase)

    if reduction == "none":
        loss = losses
    elif reduction == "sum":
        loss = to_scalar(loss_sum, dtype)
    else:
        loss = to_scalar(loss_sum / weight_sum if weight_sum != 0.0 else math.nan, dtype)
    return (loss, grad) if return_grad else loss


def _run_probs(x, t, class_axis, w, smoothing, reduction, return_grad, grad_out,
               n_threads):
    """Run the class-probability kernel and reduce its result."""
    dtype = x.dtype
    xv, _ = _class_view(x, class_axis)
    tv, _ = _class_view(t, class_axis)
    grad, gv, gbase = _grad_views(return_grad, grad_out, x, class_axis, (x, t, w))
    n_positions = xv.shape[0] * xv.shape[2]

    scale = 1.0
    if reduction == "mean" and return_grad:
        if n_positions == 0:
            return dtype.type(np.nan), grad
        scale = 1.0 / n_positions

    index_shape = x.shape[:class_axis] + x.shape[class_axis + 1 :]
    if reduction == "none":
        losses = np.empty(index_shape, dtype)
        lv = _label_view(losses, class_axis)
    else:
        losses = None
        lv = _NO_LOSSES[dtype]

    loss_sum, _, _ = _softmax.cross_entropy_probs(
        xv, tv, w, smoothing, scale, gv, lv, return_grad, losses is not None,
        n_threads,
    )
    if return_grad:
        _finish_grad(grad, gbase)

    if reduction == "none":
        loss = losses
    elif reduction == "sum":
        loss = to_scalar(loss_sum, dtype)
    else:
        loss = to_scalar(loss_sum / n_positions if n_positions else math.nan, dtype)
    return (loss, grad) if return_grad else loss


def _raise_bad_label(t, flat_index, n_classes, ignore):
    position = np.unravel_index(flat_index, t.shape) if t.ndim else ()
    value = t[position]
    raise ValueError(
        f"target must hold class indices in [0, {n_classes}) or"
        f" ignore_index={ignore}, got {value} at position {tuple(map(int, position))}"
    )
