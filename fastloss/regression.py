"""Regression losses on ``d = pred - target``, with their gradients.

Each public function validates its inputs, allocates the outputs with NumPy
and calls one compiled kernel from ``fastloss._kernels._regression``.
Unweighted C-contiguous float32 or float64 arrays, with or without a
C-contiguous ``grad_out``, take a short path that skips the general
conversion and layout steps. Every other input goes through
``as_2d_views`` to a strided kernel, which reads it in place. Float32 inputs
are computed per element in float32 (as PyTorch does) and summed in double.
"""

import math

import numpy as np

from ._kernels import load as _load_kernels
from ._validation import (
    _FLOAT32_OVERFLOW,
    REDUCTIONS,
    as_2d_views,
    as_float_array,
    check_grad_out,
    check_reduction,
    check_same_shape,
    check_scalar,
    grad_out_needs_buffer,
    resolve_n_threads,
    to_scalar,
)

_kernels = _load_kernels("_regression")

__all__ = [
    "mse_loss",
    "rmse_loss",
    "l1_loss",
    "smooth_l1_loss",
    "huber_loss",
    "log_cosh_loss",
    "pinball_loss",
]

_ndarray = np.ndarray
_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_PARALLEL_MIN_ITEMS = _kernels.PARALLEL_MIN_ITEMS
_empty = np.empty


class _LossKernels:
    """The contiguous and strided kernels of one loss, per dtype."""

    __slots__ = ("contig_f32", "contig_f64", "strided_f32", "strided_f64")

    def __init__(self, name):
        for attr in self.__slots__:
            layout, dtype = attr.split("_")
            setattr(self, attr, getattr(_kernels, f"{name}_{layout}_{dtype}"))


_MSE = _LossKernels("mse")
_L1 = _LossKernels("l1")
_SMOOTH_L1 = _LossKernels("smooth_l1")
_HUBER = _LossKernels("huber")
_LOG_COSH = _LossKernels("log_cosh")
_PINBALL = _LossKernels("pinball")


def _plain_contiguous_kind(pred, target, weight, grad_out, reduction):
    """Return 32 or 64 when the short contiguous path applies, else 0.

    The path takes unweighted C-contiguous float32 or float64 ndarrays of
    one shape, and a ``grad_out`` that is None or such an array too. The
    kernel module checks the arrays; any other input takes the general path,
    which also raises the errors.
    """
    if weight is not None or type(reduction) is not str:
        return 0
    if reduction not in REDUCTIONS:
        return 0
    if grad_out is not None and _over_input(grad_out, pred, target):
        return 0
    return _kernels.plain_contiguous_kind(pred, target, grad_out)


def _over_input(grad_out, pred, target):
    # A grad_out over an input takes the general path, where _prepare
    # decides whether the gradient needs a buffer.
    return np.may_share_memory(grad_out, pred) or np.may_share_memory(grad_out, target)


def _contiguous_threads(n, n_threads):
    # Below the parallel threshold the kernel uses one thread whatever the
    # count, so None need not be resolved; an explicit count is still checked.
    if n_threads is None and n < _PARALLEL_MIN_ITEMS:
        return 1
    return resolve_n_threads(n_threads)


class _Prepared:
    """Validated inputs and outputs, and 2-D views of them for the kernels."""

    __slots__ = (
        "dtype", "n", "pred", "weight", "grad", "out", "grad_out",
        "pred_view", "target_view", "weight_view", "grad_view", "out_view",
        "n_threads",
    )

    def copy_back(self):
        """Copy grad and out from their views where ``as_2d_views`` copied.

        A gradient computed into a buffer, because ``grad_out`` overlaps an
        input, is then copied to ``grad_out``, which becomes ``self.grad``.
        """
        if self.grad_view is not None and not np.may_share_memory(
            self.grad_view, self.grad
        ):
            self.grad[...] = self.grad_view.reshape(self.grad.shape)
        if self.out_view is not None and not np.may_share_memory(
            self.out_view, self.out
        ):
            self.out[...] = self.out_view.reshape(self.out.shape)
        if self.grad_out is not None:
            self.grad_out[...] = self.grad
            self.grad = self.grad_out
            self.grad_out = None


def _shares_any(grad, arrays):
    return any(a is not None and np.may_share_memory(grad, a) for a in arrays)


def _as_aligned(a):
    # The kernels read whole floats, so a misaligned view (from a byte
    # buffer at an odd offset, say) is copied.
    return a if a.flags.aligned else a.copy()


def _prepare(pred, target, weight, reduction, return_grad, grad_out, n_threads):
    """Check every argument, allocate the outputs and view them as 2-D.

    ``reduction`` has already been checked. ``grad_out`` makes the gradient
    be computed even when ``return_grad`` is False.
    """
    n_threads = resolve_n_threads(n_threads)
    p = _as_aligned(as_float_array(pred, "pred"))
    # One of the two module-level dtype objects, so that later tests can use
    # ``is``: a byte-swapped input converts to an equal but distinct object.
    dtype = _F64 if p.dtype == _F64 else _F32
    t = _as_aligned(as_float_array(target, "target", dtype))
    check_same_shape(p, t, "pred", "target")
    w = None
    if weight is not None:
        w = _as_aligned(as_float_array(weight, "weight", dtype))
        check_same_shape(p, w, "pred", "weight")
    buffered_grad_out = None
    if grad_out is not None:
        grad = check_grad_out(grad_out, p.shape, dtype)
        # A float32 chunk whose float sum is not trusted is computed again in
        # double, reading pred and target after its gradient was written, so
        # float32 cannot write over an input even element by element. The
        # kernels also read and write whole aligned floats only.
        if (not grad.flags.aligned or grad_out_needs_buffer(grad, (p, t, w))
                or (dtype is _F32 and _shares_any(grad, (p, t, w)))):
            buffered_grad_out = grad
            grad = np.empty_like(p)
    elif return_grad:
        # empty_like keeps pred's memory order, so an F-ordered pred and its
        # gradient still merge into one run.
        grad = np.empty_like(p)
    else:
        grad = None
    out = np.empty_like(p) if reduction == "none" else None

    prep = _Prepared()
    prep.dtype = dtype
    prep.n = p.size
    prep.pred = p
    prep.weight = w
    prep.grad = grad
    prep.grad_out = buffered_grad_out
    prep.out = out
    prep.n_threads = n_threads
    present = [a for a in (p, t, w, grad, out) if a is not None]
    views = iter(as_2d_views(present))
    prep.pred_view = next(views)
    prep.target_view = next(views)
    prep.weight_view = next(views) if w is not None else None
    prep.grad_view = next(views) if grad is not None else None
    prep.out_view = next(views) if out is not None else None
    return prep


def _evaluate(kernels, pred, target, weight, reduction, return_grad, grad_out,
              n_threads, param):
    """Compute an elementwise loss, its reduction and its gradient."""
    if _plain_contiguous_kind(pred, target, weight, grad_out, reduction):
        return _evaluate_contiguous(
            kernels, pred, target, reduction, return_grad, grad_out, n_threads, param
        )

    reduction = check_reduction(reduction)
    prep = _prepare(pred, target, weight, reduction, return_grad, grad_out, n_threads)
    kernel = kernels.strided_f64 if prep.dtype is _F64 else kernels.strided_f32
    n = prep.n

    if reduction == "none":
        kernel(prep.pred_view, prep.target_view, prep.weight_view, prep.grad_view,
               prep.out_view, param, 1.0, prep.n_threads)
        prep.copy_back()
        return (prep.out, prep.grad) if return_grad else prep.out

    if reduction == "sum":
        total, _ = kernel(prep.pred_view, prep.target_view, prep.weight_view,
                          prep.grad_view, None, param, 1.0, prep.n_threads)
    elif prep.weight is None:
        if n == 0:
            total = math.nan
        else:
            total, _ = kernel(prep.pred_view, prep.target_view, None, prep.grad_view,
                              None, param, 1.0 / n, prep.n_threads)
            total /= n
    elif prep.grad is None:
        total, weight_total = kernel(prep.pred_view, prep.target_view,
                                     prep.weight_view, None, None, param, 1.0,
                                     prep.n_threads)
        total = total / weight_total if weight_total != 0 else math.nan
    else:
        # The gradient of a weighted mean needs 1/sum(w) before the main pass.
        # A first pass over w reads n weights. Writing the gradient unscaled
        # and rescaling it would read and write n gradient items instead,
        # twice the memory traffic for the same item size.
        weight_sum = _kernels.weight_sum_f64 if prep.dtype is _F64 else _kernels.weight_sum_f32
        weight_total = weight_sum(prep.weight_view, prep.n_threads)
        if weight_total == 0:
            prep.grad_view[...] = 0
            total = math.nan
        else:
            total, _ = kernel(prep.pred_view, prep.target_view, prep.weight_view,
                              prep.grad_view, None, param, 1.0 / weight_total,
                              prep.n_threads)
            total /= weight_total

    prep.copy_back()
    loss = to_scalar(total, prep.dtype)
    return (loss, prep.grad) if return_grad else loss


def _evaluate_contiguous(kernels, pred, target, reduction, return_grad, grad_out,
                         n_threads, param):
    """Short path of ``_evaluate`` for plain C-contiguous unweighted arrays."""
    dtype = pred.dtype
    kernel = kernels.contig_f64 if dtype is _F64 else kernels.contig_f32
    n = pred.size
    n_threads = _contiguous_threads(n, n_threads)
    if grad_out is not None:
        grad = grad_out
    elif return_grad:
        # np.empty skips the dispatch layer of np.empty_like; for a
        # C-contiguous pred both give a C-contiguous array.
        grad = _empty(pred.shape, dtype)
    else:
        grad = None

    if reduction == "none":
        out = _empty(pred.shape, dtype)
        kernel(pred, target, grad, out, param, 1.0, n_threads)
        return (out, grad) if return_grad else out
    if reduction == "mean":
        total = kernel(pred, target, grad, None, param, 1.0 / n, n_threads) / n
    else:
        total = kernel(pred, target, grad, None, param, 1.0, n_threads)
    if -_FLOAT32_OVERFLOW < total < _FLOAT32_OVERFLOW:
        # to_scalar's result for a value that is neither NaN nor beyond
        # float32's range, without its checks.
        loss = dtype.type(total)
    else:
        loss = to_scalar(total, dtype)
    return (loss, grad) if return_grad else loss


def _root_of_total(total, denominator):
    """Return ``sqrt(total / denominator)``, or NaN where it has no value."""
    if denominator == 0:
        return math.nan
    ratio = total / denominator
    # Negative weights can make the ratio negative, NaN inputs make it NaN.
    return math.sqrt(ratio) if ratio >= 0 else math.nan


def _rmse(pred, target, weight, reduction, return_grad, grad_out, n_threads):
    """Compute the root of the (weighted) mean or sum of squared errors.

    The gradient ``w * d / (denominator * rmse)`` needs the total first, so
    this takes two passes: squared-error sum, then the scaled gradient.
    """
    if isinstance(reduction, str) and reduction == "none":
        raise ValueError(
            "reduction must be 'mean' or 'sum' for rmse_loss, got 'none': the"
            " root of one squared error is abs(d), which"
            " l1_loss(..., reduction='none') returns"
        )
    if _plain_contiguous_kind(pred, target, weight, grad_out, reduction):
        dtype = pred.dtype
        kernel = _MSE.contig_f64 if dtype is _F64 else _MSE.contig_f32
        n = pred.size
        n_threads = _contiguous_threads(n, n_threads)
        total = kernel(pred, target, None, None, 0.0, 1.0, n_threads)
        denominator = n if reduction == "mean" else 1
        value = _root_of_total(total, denominator)
        grad = grad_out
        if grad is None and return_grad:
            grad = np.empty_like(pred)
        if grad is not None:
            if value == 0:
                grad.fill(0)
            else:
                kernel(pred, target, grad, None, 0.0, 0.5 / (denominator * value),
                       n_threads)
        loss = to_scalar(value, dtype)
        return (loss, grad) if return_grad else loss

    reduction = check_reduction(reduction, ("mean", "sum"))
    prep = _prepare(pred, target, weight, reduction, return_grad, grad_out, n_threads)
    kernel = _MSE.strided_f64 if prep.dtype is _F64 else _MSE.strided_f32
    total, weight_total = kernel(prep.pred_view, prep.target_view, prep.weight_view,
                                 None, None, 0.0, 1.0, prep.n_threads)
    if reduction == "sum":
        denominator = 1
    elif prep.weight is None:
        denominator = prep.n
    else:
        denominator = weight_total
    value = _root_of_total(total, denominator)

    if prep.grad is not None:
        if denominator == 0 or value == 0:
            # Zero error or zero total weight: the gradient is 0 by convention.
            prep.grad_view[...] = 0
        else:
            kernel(prep.pred_view, prep.target_view, prep.weight_view, prep.grad_view,
                   None, 0.0, 0.5 / (denominator * value), prep.n_threads)
        prep.copy_back()
    loss = to_scalar(value, prep.dtype)
    return (loss, prep.grad) if return_grad else loss


_COMMON_PARAMETERS = """\
    pred : array_like
        Predictions. Their dtype sets the compute dtype: float32 and float64
        are kept, float16 is computed in float32, integers and booleans in
        float64.
    target : array_like
        Targets, of ``pred``'s shape (no broadcasting), cast to the compute
        dtype."""

_COMMON_KEYWORDS = """\
    weight : array_like, optional
        Sample weights of ``pred``'s shape, cast to the compute dtype. They
        make ``"mean"`` the weighted mean ``sum(w * l) / sum(w)``. An element
        of zero weight contributes nothing and gets a zero gradient, even
        where ``pred`` or ``target`` is NaN or inf.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` averages over the elements (or weights), ``"sum"`` adds
        them up, and ``"none"`` returns the per-element losses, each times its
        weight, with ``pred``'s shape. A mean over zero elements or zero total
        weight is NaN, with no warning, and its gradient is all zero.
    return_grad : bool, default False
        Also return the gradient of the returned loss with respect to
        ``pred``, computed in the same pass. With ``reduction="none"`` it is
        the derivative of each element's own loss.
    grad_out : ndarray, optional
        Writeable array of ``pred``'s shape and the compute dtype that
        receives the gradient; it is the array returned as ``grad``. The
        gradient is written there even when ``return_grad`` is False.
    n_threads : int, optional
        OpenMP threads for this call; None uses all that OpenMP offers
        (``OMP_NUM_THREADS``). The result is bit-identical for every count,
        and inputs under 32768 elements run on the calling thread.

    Returns
    -------
    loss : numpy scalar or ndarray
        A scalar of the compute dtype for ``"mean"`` and ``"sum"``, an array
        of ``pred``'s shape for ``"none"``.
    grad : ndarray
        Only with ``return_grad=True``: ``dloss/dpred``, of ``pred``'s shape
        and the compute dtype.

    Raises
    ------
    TypeError
        If an input is complex, object, string or another non-numeric dtype,
        or ``n_threads`` is not an int.
    ValueError
        If shapes differ, ``reduction`` is unknown, ``n_threads`` is below 1,
        or ``grad_out`` has the wrong shape, dtype or is read-only."""


def _fill_docstring(func):
    func.__doc__ = func.__doc__.replace(
        "%(common_parameters)s", _COMMON_PARAMETERS
    ).replace("%(common_keywords)s", _COMMON_KEYWORDS)
    return func


@_fill_docstring
def mse_loss(pred, target, *, weight=None, reduction="mean", return_grad=False,
             grad_out=None, n_threads=None):
    """Compute the mean squared error.

    The per-element loss is ``l = d**2`` with ``d = pred - target``, and its
    derivative is ``2 * d``. Unweighted, this equals
    ``torch.nn.functional.mse_loss`` with the same ``reduction``.

    Parameters
    ----------
%(common_parameters)s
%(common_keywords)s

    See Also
    --------
    rmse_loss : the root of the mean squared error.

    Examples
    --------
    >>> import fastloss as fl
    >>> float(fl.mse_loss([1.0, 2.0, 4.0], [1.0, 3.0, 2.0]))
    1.6666666666666667
    """
    return _evaluate(_MSE, pred, target, weight, reduction, return_grad, grad_out,
                     n_threads, 0.0)


@_fill_docstring
def rmse_loss(pred, target, *, weight=None, reduction="mean", return_grad=False,
              grad_out=None, n_threads=None):
    """Compute the root mean squared error.

    ``sqrt(mean(d**2))`` with ``d = pred - target``, the Euclidean
    distance scaled by ``1/sqrt(n)``; weighted, ``sqrt(sum(w * d**2) /
    sum(w))``. ``reduction="sum"`` gives ``sqrt(sum(w * d**2))``, the
    Euclidean distance itself, and ``"none"`` is rejected because a
    per-element root is ``abs(d)``. The gradient is
    ``w * d / (sum(w) * rmse)`` (``w * d / rmse`` for ``"sum"``) and 0
    everywhere when the error is zero, where the root has no derivative.
    PyTorch has no such function; ``torch.sqrt(F.mse_loss(pred, target))``
    gives the same value.

    This takes two passes over the data, because the gradient needs the
    total first.

    Parameters
    ----------
%(common_parameters)s
%(common_keywords)s

    See Also
    --------
    mse_loss : the mean squared error without the root.

    Examples
    --------
    >>> import fastloss as fl
    >>> float(fl.rmse_loss([0.0, 0.0], [3.0, 4.0], reduction="sum"))
    5.0
    """
    return _rmse(pred, target, weight, reduction, return_grad, grad_out, n_threads)


@_fill_docstring
def l1_loss(pred, target, *, weight=None, reduction="mean", return_grad=False,
            grad_out=None, n_threads=None):
    """Compute the mean absolute error.

    The per-element loss is ``abs(d)`` with ``d = pred - target``; its
    gradient is ``sign(d)``, 0 where ``d == 0``. Unweighted, this equals
    ``torch.nn.functional.l1_loss``, gradient included.

    Parameters
    ----------
%(common_parameters)s
%(common_keywords)s

    See Also
    --------
    smooth_l1_loss, huber_loss : quadratic near zero, linear beyond.

    Examples
    --------
    >>> import fastloss as fl
    >>> float(fl.l1_loss([1.0, 2.0], [0.0, 4.0], reduction="sum"))
    3.0
    """
    return _evaluate(_L1, pred, target, weight, reduction, return_grad, grad_out,
                     n_threads, 0.0)


@_fill_docstring
def smooth_l1_loss(pred, target, *, beta=1.0, weight=None, reduction="mean",
                   return_grad=False, grad_out=None, n_threads=None):
    """Compute the smooth L1 loss.

    With ``d = pred - target``, the per-element loss is::

        0.5 * d**2 / beta     if abs(d) < beta
        abs(d) - 0.5 * beta   otherwise

    with gradient ``d / beta`` or ``sign(d)``. ``beta=0`` is ``l1_loss``.
    Unweighted, this equals ``torch.nn.functional.smooth_l1_loss``, and
    ``huber_loss(delta=beta) / beta``.

    Parameters
    ----------
%(common_parameters)s
    beta : float, default 1.0
        Where the loss turns from quadratic to linear; ``beta >= 0``.
%(common_keywords)s
        Also if ``beta`` is negative or NaN.

    See Also
    --------
    huber_loss : the same shape scaled by ``delta``.

    Examples
    --------
    >>> import fastloss as fl
    >>> float(fl.smooth_l1_loss([0.5, 3.0], [0.0, 0.0], reduction="sum"))
    2.625
    """
    if type(beta) is not float or not beta >= 0.0:
        beta = check_scalar(beta, "beta", low=0.0)
    return _evaluate(_SMOOTH_L1, pred, target, weight, reduction, return_grad,
                     grad_out, n_threads, beta)


@_fill_docstring
def huber_loss(pred, target, *, delta=1.0, weight=None, reduction="mean",
               return_grad=False, grad_out=None, n_threads=None):
    """Compute the Huber loss.

    With ``d = pred - target``, the per-element loss is::

        0.5 * d**2                      if abs(d) <= delta
        delta * (abs(d) - 0.5 * delta)  otherwise

    with gradient ``d`` or ``delta * sign(d)``. Unweighted, this equals
    ``torch.nn.functional.huber_loss``.

    Parameters
    ----------
%(common_parameters)s
    delta : float, default 1.0
        Where the loss turns from quadratic to linear; ``delta > 0``.
%(common_keywords)s
        Also if ``delta`` is not positive or is NaN.

    See Also
    --------
    smooth_l1_loss : the same shape divided by ``beta``.

    Examples
    --------
    >>> import fastloss as fl
    >>> float(fl.huber_loss([0.5, 3.0], [0.0, 0.0], reduction="sum"))
    2.625
    """
    if type(delta) is not float or not delta > 0.0:
        delta = check_scalar(delta, "delta", low=0.0, low_open=True)
    return _evaluate(_HUBER, pred, target, weight, reduction, return_grad, grad_out,
                     n_threads, delta)


@_fill_docstring
def log_cosh_loss(pred, target, *, weight=None, reduction="mean", return_grad=False,
                  grad_out=None, n_threads=None):
    """Compute the log-cosh loss.

    The per-element loss is ``log(cosh(d))`` with ``d = pred - target``,
    close to ``d**2 / 2`` for small ``d`` and to ``abs(d) - log(2)`` for
    large; its gradient is ``tanh(d)``. It is evaluated as
    ``log1p(expm1(a)**2 / (2 * (1 + expm1(a))))`` for ``a = abs(d) <= 1`` and
    ``a + log1p(exp(-2 * a)) - log(2)`` above, so it neither overflows for
    large ``abs(d)`` nor rounds to 0 for tiny ones. PyTorch has no such
    function.

    Parameters
    ----------
%(common_parameters)s
%(common_keywords)s

    Examples
    --------
    >>> import fastloss as fl
    >>> float(fl.log_cosh_loss([1000.0], [0.0]))
    999.3068528194401
    """
    return _evaluate(_LOG_COSH, pred, target, weight, reduction, return_grad,
                     grad_out, n_threads, 0.0)


@_fill_docstring
def pinball_loss(pred, target, *, quantile=0.5, weight=None, reduction="mean",
                 return_grad=False, grad_out=None, n_threads=None):
    """Compute the pinball (quantile) loss.

    With ``u = target - pred``, the per-element loss is::

        quantile * u          if u >= 0
        (quantile - 1) * u    otherwise

    with gradient ``-quantile`` or ``1 - quantile`` with respect to ``pred``,
    and 0 at an exact tie ``u == 0``. A zero slope (``quantile`` 0 or 1)
    gives loss 0 on its side even for an infinite ``u``. ``quantile=0.5`` is
    half of ``l1_loss``. PyTorch has no such function;
    ``sklearn.metrics.mean_pinball_loss`` computes the same mean.

    Parameters
    ----------
%(common_parameters)s
    quantile : float, default 0.5
        The quantile to estimate, in ``[0, 1]``.
%(common_keywords)s
        Also if ``quantile`` is outside ``[0, 1]`` or NaN.

    Examples
    --------
    >>> import fastloss as fl
    >>> float(fl.pinball_loss([0.0, 0.0], [1.0, -1.0], quantile=0.9))
    0.5
    """
    if type(quantile) is not float or not 0.0 <= quantile <= 1.0:
        quantile = check_scalar(quantile, "quantile", low=0.0, high=1.0)
    return _evaluate(_PINBALL, pred, target, weight, reduction, return_grad, grad_out,
                     n_threads, quantile)
