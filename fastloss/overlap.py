"""Overlap losses for segmentation: soft Dice, Jaccard (IoU) and Tversky.

Each public function validates its inputs and views the logits as
``(outer, C, inner)`` around the class axis, with the sample axis leading
``outer``. One kernel then makes two passes over the data. The first sums
``p * y``, ``p`` and ``y`` per (sample,) class in fixed blocks, and the
second writes the gradient from those sums.

Where the contract of these functions is silent they follow
``segmentation_models_pytorch.losses`` (``DiceLoss``, ``JaccardLoss``,
``TverskyLoss``): sums over the batch and the spatial positions, a class
absent from the target contributes 0, and ``max(denominator, eps)`` is a
``clamp_min``.
"""

import math
import operator

import numpy as np

from . import _validation as v
from ._kernels import load as _load_kernels

_overlap = _load_kernels("_overlap")

MODES = ("binary", "multiclass", "multilabel")

# Stand-ins for the gradient when a kernel call writes none. They must be
# writeable, because the kernel's gradient argument is not const.
_PLACEHOLDERS = {
    np.dtype(np.float32): np.zeros((1, 1, 1), np.float32),
    np.dtype(np.float64): np.zeros((1, 1, 1), np.float64),
}

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_I64 = np.dtype(np.int64)

_PARALLEL_MIN_ITEMS = _overlap.PARALLEL_MIN_ITEMS

_INT64_MIN = int(np.iinfo(np.int64).min)
_INT64_MAX = int(np.iinfo(np.int64).max)

_COMMON_DOC = """
    Parameters
    ----------
    logits : array_like
        Raw scores, ``(N, C, d1, ..., dk)`` with the class axis at ``axis``,
        or ``(C,)`` for one sample. Their dtype sets the compute dtype.
    target : array_like
        ``"multiclass"``: integer class indices with the logits' shape minus
        the class axis, or class probabilities (one-hot or soft) with the
        logits' shape. ``"multilabel"``: 0/1 (or soft) labels with the
        logits' shape. ``"binary"``: labels with the logits' shape, or with
        the logits' shape minus a class axis of length 1.
    mode : {"multiclass", "binary", "multilabel"}
        ``"multiclass"`` takes a softmax over the class axis, ``"binary"``
        and ``"multilabel"`` take one sigmoid per element.
    smooth : float
        Added to numerator and denominator, ``>= 0``.
    eps : float
        Lower bound of the denominator, ``>= 0``.
    ignore_index : int, optional
        Positions (elements, in ``"binary"`` and ``"multilabel"`` mode) whose
        target equals it leave every sum and get a zero gradient. It does not
        apply to probability targets.
    axis : int
        Class axis of ``logits``. With ``(C,)`` logits the class axis is 0.
    per_sample : bool
        Sum per sample (axis 0) and class instead of per class over the
        whole batch.
    reduction : {"mean", "sum", "none"}
        Reduction over the classes (and samples). ``"none"`` returns the
        per-class losses, ``(C,)``, or ``(N, C)`` with ``per_sample=True``.
    return_grad : bool
        Also return the gradient with respect to ``logits``. With
        ``reduction="none"`` it is the gradient of the sum of the returned
        losses.
    grad_out : ndarray, optional
        Array to write the gradient into, returned as the gradient. It is
        filled even with ``return_grad=False``, and then only the loss is
        returned.
    n_threads : int, optional
        Thread count. ``None`` uses what OpenMP offers.

    Returns
    -------
    loss : scalar or ndarray
        A scalar of the compute dtype, or the per-class losses for
        ``reduction="none"``.
    grad : ndarray
        Only with ``return_grad=True``, with the logits' shape and compute
        dtype.

    Notes
    -----
    A class whose target sums to 0 (absent, or all its positions ignored)
    contributes a loss of exactly 0 and no gradient but still counts in the
    mean, as in ``segmentation_models_pytorch``, so the gradient is finite
    for empty masks. There NaN logits of an absent class do not reach the
    loss, where ``segmentation_models_pytorch``, which multiplies by a mask,
    returns NaN. The mean over zero (sample, class) pairs is ``nan`` with an
    all-zero gradient. Below ``eps`` the denominator is ``eps`` and, as for
    ``torch.clamp_min``, does not depend on the logits. In ``"multiclass"``
    mode a single ``+inf`` logit takes all of its position's probability,
    the limit of the softmax, where ``torch.softmax`` returns NaN. Several
    ``+inf`` logits at one position have no limit and give NaN.

    NOTE: with ``eps=0`` a present class whose denominator is exactly 0
    (possible only for ``tversky_loss`` with ``beta=0`` and ``smooth=0``)
    gives 0/0, so its loss and gradient are NaN.
"""


def dice_loss(
    logits,
    target,
    *,
    mode="multiclass",
    smooth=0.0,
    eps=1e-7,
    ignore_index=None,
    axis=1,
    per_sample=False,
    reduction="mean",
    return_grad=False,
    grad_out=None,
    n_threads=None,
):
    return _overlap_loss(
        logits, target, mode, smooth, eps, ignore_index, axis, per_sample,
        reduction, return_grad, grad_out, n_threads, (2.0, 0.0, 1.0, 1.0),
    )


def jaccard_loss(
    logits,
    target,
    *,
    mode="multiclass",
    smooth=0.0,
    eps=1e-7,
    ignore_index=None,
    axis=1,
    per_sample=False,
    reduction="mean",
    return_grad=False,
    grad_out=None,
    n_threads=None,
):
    return _overlap_loss(
        logits, target, mode, smooth, eps, ignore_index, axis, per_sample,
        reduction, return_grad, grad_out, n_threads, (1.0, -1.0, 1.0, 1.0),
    )


def tversky_loss(
    logits,
    target,
    *,
    mode="multiclass",
    alpha=0.5,
    beta=0.5,
    smooth=0.0,
    eps=1e-7,
    ignore_index=None,
    axis=1,
    per_sample=False,
    reduction="mean",
    return_grad=False,
    grad_out=None,
    n_threads=None,
):
    if type(alpha) is not float or not alpha >= 0.0:
        alpha = v.check_scalar(alpha, "alpha", low=0.0)
    if type(beta) is not float or not beta >= 0.0:
        beta = v.check_scalar(beta, "beta", low=0.0)
    return _overlap_loss(
        logits, target, mode, smooth, eps, ignore_index, axis, per_sample,
        reduction, return_grad, grad_out, n_threads,
        (1.0, 1.0 - alpha - beta, alpha, beta),
    )


dice_loss.__doc__ = (
    """Compute the soft Dice loss of each class.

    Per class, with ``p`` the probabilities and ``y`` the one-hot target,
    summed over the batch and the spatial positions (per sample with
    ``per_sample=True``)::

        loss = 1 - (2 * sum(p * y) + smooth) / max(sum(p) + sum(y) + smooth, eps)

    then reduced over the classes (and samples).
"""
    + _COMMON_DOC
)

jaccard_loss.__doc__ = (
    """Compute the soft Jaccard (IoU) loss of each class.

    Per class, with ``I = sum(p * y)`` summed as for :func:`dice_loss`::

        loss = 1 - (I + smooth) / max(sum(p) + sum(y) - I + smooth, eps)

    then reduced over the classes (and samples).
"""
    + _COMMON_DOC
)

tversky_loss.__doc__ = (
    """Compute the Tversky loss of each class.

    Per class, with ``TP = sum(p * y)``, ``FP = sum(p * (1 - y))`` and
    ``FN = sum((1 - p) * y)`` summed as for :func:`dice_loss`::

        loss = 1 - (TP + smooth) / max(TP + alpha * FP + beta * FN + smooth, eps)

    then reduced over the classes (and samples). ``alpha`` (``>= 0``) weighs
    the false positives and ``beta`` (``>= 0``) the false negatives. With
    ``alpha = beta = 0.5`` the loss equals :func:`dice_loss` with twice the
    ``smooth``.
"""
    + _COMMON_DOC
)


def _overlap_loss(
    logits, target, mode, smooth, eps, ignore_index, axis, per_sample, reduction,
    return_grad, grad_out, n_threads, coefficients,
):
    """Validate, lay out and dispatch one overlap loss.

    ``coefficients`` is ``(a, kI, kP, kY)`` of the shared form
    ``1 - (a*I + smooth) / max(kI*I + kP*P + kY*Y + smooth, eps)``.
    """
    if (
        type(mode) is str
        and mode == "multiclass"
        and type(logits) is np.ndarray
        and type(target) is np.ndarray
        and type(axis) is int
        and axis == 1
        and ignore_index is None
        and type(per_sample) is bool
        and type(smooth) is float
        and smooth >= 0.0
        and type(eps) is float
        and eps >= 0.0
        and type(reduction) is str
        and (reduction == "mean" or reduction == "sum")
    ):
        result = _index_loss_contiguous(
            logits, target, per_sample, reduction, return_grad, grad_out, n_threads,
            smooth, eps, coefficients,
        )
        if result is not None:
            return result

    if not isinstance(mode, str) or mode not in MODES:
        choices = ", ".join(repr(m) for m in MODES)
        raise ValueError(f"mode must be one of {choices}, got {mode!r}")
    logits = v.as_float_array(logits, "logits")
    dtype = logits.dtype
    if logits.ndim == 0:
        raise ValueError(
            "logits must have at least 1 dimension (the class axis), got a 0-d array"
        )
    if logits.ndim == 1 and axis == 1 and not isinstance(axis, (bool, np.bool_)):
        # (C,) logits hold one sample, so the default axis means axis 0. A
        # bool equals 1 but is left to normalize_axis, which rejects it.
        class_axis = 0
    else:
        class_axis = v.normalize_axis(axis, logits.ndim)
    # Plain non-negative floats, the common case, skip the general check.
    if type(smooth) is not float or not smooth >= 0.0:
        smooth = v.check_scalar(smooth, "smooth", low=0.0)
    if type(eps) is not float or not eps >= 0.0:
        eps = v.check_scalar(eps, "eps", low=0.0)
    ignore = _check_ignore_index(ignore_index)
    if type(per_sample) is not bool and not isinstance(per_sample, np.bool_):
        raise TypeError(f"per_sample must be a bool, got {type(per_sample).__name__}")
    reduction = v.check_reduction(reduction)
    nt = v.resolve_n_threads(n_threads)
    if per_sample and class_axis == 0 and logits.ndim > 1 and mode != "binary":
        raise ValueError(
            "per_sample=True needs the sample axis 0 before the class axis,"
            f" got axis={axis}"
        )
    if grad_out is not None:
        v.check_grad_out(grad_out, logits.shape, dtype)

    original_target = target
    if mode == "multiclass":
        layout = _multiclass_layout(logits, target, class_axis, ignore, dtype)
    elif mode == "multilabel":
        layout = _multilabel_layout(logits, target, class_axis, dtype)
    else:
        layout = _binary_layout(logits, target, class_axis, dtype)
    kind, logits3, target_view, grad_axis = layout

    # The sample axis is axis 0, which leads the ``outer`` axis of logits3
    # unless the class axis is axis 0 itself.
    n_classes = logits3.shape[1]
    n_samples = 1
    if per_sample:
        n_samples = logits.shape[0] if grad_axis != 0 else 1
    n_pairs = n_samples * n_classes
    losses = np.empty(n_pairs, np.float64)
    if reduction == "mean":
        grad_scale = 1.0 / n_pairs if n_pairs > 0 else 0.0
    else:
        grad_scale = 1.0

    grad = grad_view = grad_base = None
    # A grad_out is filled even with return_grad=False, as NumPy's out= is.
    # One that overlaps an input other than as its very same view gets the
    # gradient through a buffer, because the second pass reads the inputs.
    write_grad = return_grad or grad_out is not None
    if write_grad:
        if grad_out is not None and not v.grad_out_needs_buffer(
            grad_out, (logits, target_view)
        ):
            grad = grad_out
        else:
            grad = np.empty(logits.shape, dtype)
        grad_view, grad_base = _grad_view(grad, grad_axis)
    kernel_grad = grad_view if grad_view is not None else _PLACEHOLDERS[dtype]
    a, k_i, k_p, k_y = coefficients
    has_ignore = ignore is not None

    if kind == "index":
        kernel = _overlap.overlap_index_f32 if dtype == _F32 else _overlap.overlap_index_f64
        total, bad = kernel(
            logits3, target_view, n_samples, has_ignore,
            ignore if has_ignore else 0, a, k_i, k_p, k_y, smooth, eps, grad_scale,
            losses, kernel_grad, write_grad, nt,
        )
        if bad >= 0:
            _raise_bad_index(original_target, bad, n_classes)
    else:
        kernel = _overlap.overlap_dense_f32 if dtype == _F32 else _overlap.overlap_dense_f64
        total = kernel(
            logits3, target_view, n_samples, kind == "softmax", has_ignore,
            float(ignore) if has_ignore else 0.0, a, k_i, k_p, k_y, smooth, eps,
            grad_scale, losses, kernel_grad, write_grad, nt,
        )
    if grad_base is not None and grad_base is not grad:
        grad[...] = grad_base.reshape(grad.shape)
    if grad_out is not None and grad is not grad_out:
        grad_out[...] = grad
        grad = grad_out

    if reduction == "none":
        shape = (n_samples, n_classes) if per_sample else (n_classes,)
        loss = losses.reshape(shape).astype(dtype)
    elif reduction == "sum":
        loss = v.to_scalar(total, dtype)
    else:
        loss = v.to_scalar(total / n_pairs, dtype) if n_pairs > 0 else dtype.type(np.nan)
    if return_grad:
        return loss, grad
    return loss


def _index_loss_contiguous(
    logits, target, per_sample, reduction, return_grad, grad_out, n_threads,
    smooth, eps, coefficients,
):
    """Short path of ``_overlap_loss`` for plain C-contiguous class-index data.

    The caller has checked every scalar argument of the short path (plain
    float ``smooth`` and ``eps``, ``reduction`` "mean" or "sum", no
    ``ignore_index``). The path needs non-empty C-contiguous float32 or
    float64 logits with the class axis 1 and a C-contiguous int64 target of
    their class-index shape. A ``grad_out`` must be C-contiguous and may
    overlap an input only as its very same view. For any other input this
    returns None before any work, and the general path handles it and
    raises the errors in the same order.
    """
    dtype = logits.dtype
    if dtype is _F32:
        kernel = _overlap.overlap_index_f32
    elif dtype is _F64:
        kernel = _overlap.overlap_index_f64
    else:
        return None
    shape = logits.shape
    if (
        len(shape) < 2
        or target.dtype is not _I64
        or logits.size == 0
        or not logits.flags.c_contiguous
        or not target.flags.c_contiguous
        or target.shape != shape[:1] + shape[2:]
    ):
        return None
    size = logits.size
    if n_threads is None and size < _PARALLEL_MIN_ITEMS:
        # The kernel runs on one thread below this size whatever the count.
        nt = 1
    else:
        nt = v.resolve_n_threads(n_threads)

    if grad_out is not None:
        v.check_grad_out(grad_out, shape, dtype)
        if not grad_out.flags.c_contiguous or v.grad_out_needs_buffer(
            grad_out, (logits, target)
        ):
            return None

    n_outer, n_classes = shape[0], shape[1]
    inner = size // (n_outer * n_classes)
    n_samples = n_outer if per_sample else 1
    n_pairs = n_samples * n_classes
    grad_scale = 1.0 / n_pairs if reduction == "mean" else 1.0
    write_grad = return_grad or grad_out is not None
    if write_grad:
        grad = np.empty(shape, dtype) if grad_out is None else grad_out
        grad_view = grad.reshape(n_outer, n_classes, inner)
    else:
        grad = None
        grad_view = _PLACEHOLDERS[dtype]
    a, k_i, k_p, k_y = coefficients
    total, bad = kernel(
        logits.reshape(n_outer, n_classes, inner), target.reshape(n_outer, inner),
        n_samples, False, 0, a, k_i, k_p, k_y, smooth, eps, grad_scale, None,
        grad_view, write_grad, nt,
    )
    if bad >= 0:
        _raise_bad_index(target, bad, n_classes)
    if reduction == "mean":
        total = total / n_pairs
    loss = v.to_scalar(total, dtype)
    if return_grad:
        return loss, grad
    return loss


def _check_ignore_index(ignore_index):
    """Return ``ignore_index`` as an int in int64's range, or None.

    An index beyond int64's range matches no target, so it is dropped.
    """
    if ignore_index is None:
        return None
    if isinstance(ignore_index, (bool, np.bool_)):
        raise TypeError(f"ignore_index must be None or an int, got {ignore_index!r}")
    try:
        value = operator.index(ignore_index)
    except TypeError:
        raise TypeError(
            f"ignore_index must be None or an int, got {type(ignore_index).__name__}"
        ) from None
    if not _INT64_MIN <= value <= _INT64_MAX:
        return None
    return value


def _multiclass_layout(logits, target, class_axis, ignore, dtype):
    index_shape = logits.shape[:class_axis] + logits.shape[class_axis + 1 :]
    t = v.as_array(target, "target")
    logits3, _ = _class_view(logits, class_axis)
    if t.shape == logits.shape:
        if ignore is not None:
            raise ValueError(
                "ignore_index applies to class-index targets only, got a target"
                f" of class probabilities with the logits' shape {logits.shape}"
            )
        t = v.as_float_array(t, "target", dtype)
        target3, _ = _class_view(t, class_axis)
        return "softmax", logits3, target3, class_axis
    if t.shape != index_shape:
        raise ValueError(
            f"target must have the class-index shape {index_shape} or the logits'"
            f" shape {logits.shape}, got {t.shape}"
        )
    t = v.as_index_array(
        t,
        "target",
        hint=" (convert whole-number labels with .astype(np.int64))",
    )
    return "index", logits3, _index_view(t, class_axis), class_axis


def _multilabel_layout(logits, target, class_axis, dtype):
    t = v.as_float_array(target, "target", dtype)
    v.check_same_shape(logits, t, "logits", "target")
    logits3, _ = _class_view(logits, class_axis)
    target3, _ = _class_view(t, class_axis)
    return "sigmoid", logits3, target3, class_axis


def _binary_layout(logits, target, class_axis, dtype):
    # The class axis of binary data is either a real axis of length 1 or,
    # when target and logits share a shape, a virtual one after axis 0.
    t = v.as_float_array(target, "target", dtype)
    if t.shape == logits.shape:
        logits3 = _insert_class_axis(_index_view(logits, 1))
        target3 = _insert_class_axis(_index_view(t, 1))
        return "sigmoid", logits3, target3, None
    index_shape = logits.shape[:class_axis] + logits.shape[class_axis + 1 :]
    if logits.shape[class_axis] != 1 or t.shape != index_shape:
        raise ValueError(
            "binary mode needs a target with the logits' shape or, for logits"
            f" with one class channel on axis {class_axis}, that shape without"
            f" it, got logits {logits.shape} and target {t.shape}"
        )
    logits3, _ = _class_view(logits, class_axis)
    target3 = _insert_class_axis(_index_view(t, class_axis))
    return "sigmoid", logits3, target3, class_axis


def _class_view(x, axis):
    """Return ``v.class_axis_view(x, axis)``, by a plain reshape when it can.

    ``as_strided`` costs several microseconds a call, which would dominate
    the time of a small input, and a C-contiguous array needs none of it.
    """
    if x.flags.c_contiguous:
        shape = x.shape
        outer = math.prod(shape[:axis])
        inner = math.prod(shape[axis + 1 :])
        return x.reshape(outer, shape[axis], inner), x
    return v.class_axis_view(x, axis)


def _index_view(t, split):
    """Return ``v.index_view(t, split)``, by a plain reshape when it can."""
    if t.flags.c_contiguous:
        return t.reshape(math.prod(t.shape[:split]), math.prod(t.shape[split:]))
    return v.index_view(t, split)


def _insert_class_axis(view2):
    """View an ``(outer, inner)`` array as ``(outer, 1, inner)``."""
    return view2[:, np.newaxis, :]


def _grad_view(grad, grad_axis):
    """Return the kernel's 3-D view of ``grad`` and the array it views.

    The array is ``grad`` itself unless its layout forced a C-order copy,
    which the caller copies back after the kernel ran.
    """
    if grad_axis is None:
        view = _index_view(grad, 1)
        base = grad if np.may_share_memory(view, grad) or grad.size == 0 else view
        return _insert_class_axis(view), base
    view, base = _class_view(grad, grad_axis)
    return view, base


def _raise_bad_index(target, position, n_classes):
    t = np.asarray(target)
    where = tuple(int(i) for i in np.unravel_index(position, t.shape))
    raise ValueError(
        f"target contains class index {t[where]} at position {where},"
        f" outside [0, {n_classes}) and not ignore_index"
    )
