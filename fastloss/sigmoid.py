"""Sigmoid losses on logits: binary cross-entropy and the focal loss.

Each function validates its inputs, lays them out as 3-D strided views that
one compiled kernel walks in step, and returns the loss, or ``(loss, grad)``
from the same pass.
"""

import numpy as np

from . import _validation as v
from ._kernels import load as _load_kernels

_sigmoid = _load_kernels("_sigmoid")

# Stand-ins for the arrays that a kernel call does not read or write.
_PLACEHOLDERS = {
    np.dtype(np.float32): np.zeros((1, 1, 1), np.float32),
    np.dtype(np.float64): np.zeros((1, 1, 1), np.float64),
}

# The BCE kernel's specializations by dtype, for the short path.
_BCE = {
    np.dtype(np.float32): _sigmoid.bce_with_logits["float"],
    np.dtype(np.float64): _sigmoid.bce_with_logits["double"],
}

# Below this many elements every kernel (MIN_PARALLEL_ITEMS in _common.pxd)
# runs on the calling thread whatever the thread count, so None need not be
# resolved there.
_PARALLEL_MIN_ITEMS = _load_kernels("_regression").PARALLEL_MIN_ITEMS
_empty = np.empty
_FLOAT32_OVERFLOW = v._FLOAT32_OVERFLOW


def binary_cross_entropy_with_logits(
    logits,
    target,
    *,
    weight=None,
    pos_weight=None,
    reduction="mean",
    return_grad=False,
    grad_out=None,
    n_threads=None,
):
    """Compute the binary cross-entropy between sigmoid(logits) and target.

    The per-element loss, with ``x`` the logit, ``y`` the target and
    ``p = sigmoid(x)``, is::

        l = -weight * (pos_weight * y * log(p) + (1 - y) * log(1 - p))

    computed as ``(1 - y) * softplus(x) + pos_weight * y * softplus(-x)`` with
    a softplus that neither overflows nor loses ``exp(x)`` for large
    ``abs(x)``, so no probability is clipped. The semantics are those of
    ``torch.nn.functional.binary_cross_entropy_with_logits``.

    Parameters
    ----------
    logits : array_like
        Raw scores of any shape. Their dtype sets the compute dtype.
    target : array_like
        Labels in ``[0, 1]`` (hard or soft) with the shape of ``logits``.
    weight : array_like, optional
        Element weights, broadcast against ``logits`` by NumPy's rules.
    pos_weight : array_like, optional
        Weight of the positive term, broadcast against ``logits`` by NumPy's
        rules, so a ``(C,)`` array applies along the last axis.
    reduction : {"mean", "sum", "none"}
        ``"mean"`` is the plain mean over elements, as in PyTorch: ``weight``
        scales the elements but does not enter the denominator, so an
        all-zero ``weight`` gives a mean of 0. A mean over zero elements is
        ``nan``.
    return_grad : bool
        Also return the gradient with respect to ``logits``.
    grad_out : ndarray, optional
        Array to write the gradient into, returned as the gradient. It is
        filled even with ``return_grad=False``, and then only the loss is
        returned.
    n_threads : int, optional
        Thread count. ``None`` uses what OpenMP offers.

    Returns
    -------
    loss : scalar or ndarray
        A scalar of the compute dtype, or the per-element losses (already
        weighted) with the shape of ``logits`` for ``reduction="none"``.
    grad : ndarray
        Only with ``return_grad=True``.

    Notes
    -----
    An element of zero weight contributes 0 to the loss and gets a zero
    gradient even when its logit or target is NaN, and PyTorch returns NaN
    for such an element. An infinite logit gives the limit of the loss where one exists
    (a logit of ``+inf`` with target 1 costs 0), where PyTorch returns NaN
    (both checked with PyTorch 2.13).
    """
    if weight is None and pos_weight is None and grad_out is None and _is_plain_pair(
        logits, target, reduction
    ):
        return _bce_plain(logits, target, reduction, return_grad, n_threads)

    logits = v.as_float_array(logits, "logits")
    dtype = logits.dtype
    target = v.as_float_array(target, "target", dtype)
    v.check_same_shape(logits, target, "logits", "target")
    weight = _broadcast_weight(weight, "weight", logits.shape, dtype)
    pos_weight = _broadcast_weight(pos_weight, "pos_weight", logits.shape, dtype)
    v.check_reduction(reduction)
    nt = v.resolve_n_threads(n_threads)
    if grad_out is not None:
        v.check_grad_out(grad_out, logits.shape, dtype)

    arrays = [logits, target]
    if weight is not None:
        arrays.append(weight)
    if pos_weight is not None:
        arrays.append(pos_weight)

    def call(views, loss_view, write_loss, grad_view, write_grad, grad_scale):
        placeholder = _PLACEHOLDERS[dtype]
        w = views[2] if weight is not None else placeholder
        pw = views[len(arrays) - 1] if pos_weight is not None else placeholder
        return _sigmoid.bce_with_logits(
            views[0], views[1], w, pw, weight is not None, pos_weight is not None,
            loss_view, write_loss, grad_view, write_grad, grad_scale, nt,
        )

    return _run(call, arrays, logits, reduction, return_grad, grad_out)


def sigmoid_focal_loss(
    logits,
    target,
    *,
    alpha=0.25,
    gamma=2.0,
    reduction="mean",
    return_grad=False,
    grad_out=None,
    n_threads=None,
):
    """Compute the focal loss on sigmoid outputs.

    The loss is that of Lin et al., "Focal Loss for Dense Object Detection"
    (ICCV 2017). With ``y`` the target, ``p = sigmoid(logits)``, ``ce`` the
    binary cross-entropy and ``p_t = p * y + (1 - p) * (1 - y)``, the
    per-element loss is::

        l = alpha_t * (1 - p_t)**gamma * ce,
        alpha_t = alpha * y + (1 - alpha) * (1 - y),

    as ``torchvision.ops.sigmoid_focal_loss`` computes it, except that the
    default reduction here is ``"mean"`` (torchvision's is ``"none"``).

    Parameters
    ----------
    logits : array_like
        Raw scores of any shape. Their dtype sets the compute dtype.
    target : array_like
        Labels in ``[0, 1]`` (hard or soft) with the shape of ``logits``.
    alpha : float
        Weight of the positive class in ``[0, 1]``, or ``-1`` to turn the
        class balance off (``alpha_t = 1``).
    gamma : float
        Focusing exponent, ``>= 0``. ``gamma=0`` is the binary cross-entropy
        scaled by ``alpha_t``.
    reduction : {"mean", "sum", "none"}
        ``"mean"`` is the plain mean over elements, and over zero elements it is
        ``nan``.
    return_grad, grad_out, n_threads
        As for :func:`binary_cross_entropy_with_logits`.

    Returns
    -------
    loss : scalar or ndarray
        A scalar of the compute dtype, or the per-element losses with the
        shape of ``logits`` for ``reduction="none"``.
    grad : ndarray
        Only with ``return_grad=True``.

    Notes
    -----
    ``1 - p_t`` is formed from ``sigmoid(x)`` and ``sigmoid(-x)`` without
    subtracting from 1, and the gradient is written without
    ``(1 - p_t)**(gamma - 1)``, so it is finite for every ``gamma >= 0``,
    ``0 < gamma < 1`` and ``p_t`` rounding to 1 included. torchvision
    computes ``1 - p_t`` directly, which in float32 rounds to 0 for logits
    beyond about 17 where this function keeps a tiny positive value.
    """
    logits = v.as_float_array(logits, "logits")
    dtype = logits.dtype
    target = v.as_float_array(target, "target", dtype)
    v.check_same_shape(logits, target, "logits", "target")
    alpha = v.check_scalar(alpha, "alpha")
    if alpha != -1.0 and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], or -1 to disable it, got {alpha!r}")
    gamma = v.check_scalar(gamma, "gamma", low=0.0)
    v.check_reduction(reduction)
    nt = v.resolve_n_threads(n_threads)
    if grad_out is not None:
        v.check_grad_out(grad_out, logits.shape, dtype)

    def call(views, loss_view, write_loss, grad_view, write_grad, grad_scale):
        return _sigmoid.sigmoid_focal(
            views[0], views[1], alpha, gamma, loss_view, write_loss, grad_view,
            write_grad, grad_scale, nt,
        )

    return _run(call, [logits, target], logits, reduction, return_grad, grad_out)


def _is_plain_pair(logits, target, reduction):
    """Return True when ``_bce_plain`` may take these arguments.

    That needs two ndarrays (not subclasses) of one shape and one native
    float32 or float64 dtype, both C-contiguous, and a ``reduction`` that
    is a valid plain str. Any other input takes the general path, which
    also raises the errors.
    """
    return (
        type(logits) is np.ndarray
        and type(target) is np.ndarray
        and type(reduction) is str
        and reduction in v.REDUCTIONS
        and logits.dtype in _PLACEHOLDERS
        and target.dtype == logits.dtype
        and logits.shape == target.shape
        and logits.flags.c_contiguous
        and target.flags.c_contiguous
    )


def _bce_plain(logits, target, reduction, return_grad, n_threads):
    """Compute the unweighted BCE of a pair that ``_is_plain_pair`` accepts.

    This is the general path of ``_run`` without its conversions: the
    inputs are read as the ``(1, 1, n)`` views that ``as_3d_views`` would
    make of them. The kernel's specialization for the dtype is called
    directly, which skips the fused function's signature matching, and None
    stands for every array it does not read or write, which saves the
    acquisition of a typed memoryview each.
    """
    nt = 1 if n_threads is None and logits.size < _PARALLEL_MIN_ITEMS else (
        v.resolve_n_threads(n_threads))
    dtype = logits.dtype
    n = logits.size
    shape = (1, 1, n)
    write_loss = reduction == "none"
    loss_out = _empty(logits.shape, dtype) if write_loss else None
    grad = _empty(logits.shape, dtype) if return_grad else None
    grad_scale = 1.0 / n if reduction == "mean" and n > 0 else 1.0
    total = _BCE[dtype](
        logits.reshape(shape), target.reshape(shape), None, None, False, False,
        loss_out.reshape(shape) if write_loss else None, write_loss,
        grad.reshape(shape) if return_grad else None, return_grad,
        grad_scale, nt,
    )
    if write_loss:
        loss = loss_out
    elif n == 0 and reduction == "mean":
        loss = dtype.type(np.nan)
    else:
        value = total / n if reduction == "mean" else total
        if -_FLOAT32_OVERFLOW < value < _FLOAT32_OVERFLOW:
            # to_scalar's result for a value that is neither NaN nor beyond
            # float32's range, without its checks.
            loss = dtype.type(value)
        else:
            loss = v.to_scalar(value, dtype)
    if return_grad:
        return loss, grad
    return loss


def _broadcast_weight(weight, name, shape, dtype):
    """Return ``weight`` as a (zero-stride where possible) view of ``shape``."""
    if weight is None:
        return None
    w = v.as_float_array(weight, name, dtype)
    try:
        return np.broadcast_to(w, shape)
    except ValueError:
        raise ValueError(
            f"{name} must broadcast to the logits' shape {shape}, got shape {w.shape}"
        ) from None


def _run(call, arrays, logits, reduction, return_grad, grad_out):
    """Allocate the outputs, run ``call`` on 3-D views and reduce the result.

    The outputs join ``arrays`` in one ``as_3d_views`` call, so the kernel
    visits them in the inputs' order. When that call had to copy an output
    to C order, the result is copied back into the caller's array.
    """
    shape, dtype = logits.shape, logits.dtype
    n = logits.size
    write_loss = reduction == "none"
    outputs = []
    if write_loss:
        loss_out = np.empty_like(logits, dtype=dtype)
        outputs.append(loss_out)
    # A grad_out is filled even with return_grad=False, as NumPy's out= is.
    # One that overlaps an input other than as its very same view gets the
    # gradient through a buffer.
    write_grad = return_grad or grad_out is not None
    if write_grad:
        if grad_out is not None and not v.grad_out_needs_buffer(grad_out, arrays):
            grad = grad_out
        else:
            grad = np.empty_like(logits, dtype=dtype)
        outputs.append(grad)

    views = v.as_3d_views(arrays + outputs)
    out_views = views[len(arrays):]
    placeholder = _PLACEHOLDERS[dtype]
    loss_view = out_views[0] if write_loss else placeholder
    grad_view = out_views[-1] if write_grad else placeholder
    grad_scale = 1.0 / n if reduction == "mean" and n > 0 else 1.0
    total = call(views, loss_view, write_loss, grad_view, write_grad, grad_scale)

    for output, view in zip(outputs, out_views):
        if not np.may_share_memory(output, view):
            output[...] = view.reshape(shape)
    if grad_out is not None and grad is not grad_out:
        grad_out[...] = grad
        grad = grad_out
    if write_loss:
        loss = loss_out
    elif reduction == "sum":
        loss = v.to_scalar(total, dtype)
    else:
        loss = v.to_scalar(total / n, dtype) if n > 0 else dtype.type(np.nan)
    if return_grad:
        return loss, grad
    return loss
