"""Overlap workload: multiclass soft Dice loss with class-index targets.

The loss is ``segmentation_models_pytorch``'s multiclass Dice with
``smooth=0`` and ``eps=1e-7``: softmax over the class axis, per class
``1 - 2*sum(p*y) / max(sum(p) + sum(y), eps)`` over batch and spatial
positions, classes absent from the target masked to 0, then the mean over
classes. NumPy has no automatic differentiation, so the NumPy anchor writes
the gradient by hand. PyTorch and JAX differentiate their forward pass.
scikit-learn has no equivalent.
"""

from functools import partial

import numpy as np

import fastloss

from .anchors import jax_value_and_grad
from .workload import Implementation, Workload, careful_numpy

EPS = 1e-7


def _inputs(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    index_shape = (shape[0],) + tuple(shape[2:])
    target = rng.integers(0, shape[1], size=index_shape, dtype=np.int64)
    return logits, target


def _dice_loss_grad(logits, target, eps=EPS):
    """Return the Dice loss and its gradient, in the dtype of ``logits``.

    With S_c = max(P_c + Y_c, eps), the gradient of the mean over C classes
    with respect to the probabilities is mask_c / C * (2*I_c/S_c**2 -
    2*y/S_c), where the first term drops when eps clamps S_c; the softmax
    Jacobian then gives p * (g - sum_c(p * g)).
    """
    n_classes = logits.shape[1]
    sum_axes = (0,) + tuple(range(2, logits.ndim))
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    p = e / e.sum(axis=1, keepdims=True)
    y = np.moveaxis(np.eye(n_classes, dtype=logits.dtype)[target], -1, 1)
    intersection = np.sum(p * y, axis=sum_axes)
    cardinality = np.sum(p, axis=sum_axes) + np.sum(y, axis=sum_axes)
    denominator = np.maximum(cardinality, eps)
    present = np.sum(y, axis=sum_axes) > 0
    loss = np.mean((1 - 2 * intersection / denominator) * present)

    expand = (slice(None),) + (None,) * (logits.ndim - 2)
    weight = present / n_classes
    unclamped = cardinality > eps
    slope = (weight * 2 * intersection * unclamped / denominator**2)[expand]
    grad_p = slope - (weight * 2 / denominator)[expand] * y
    grad = p * (grad_p - np.sum(p * grad_p, axis=1, keepdims=True))
    return loss, grad


def _careful_dice(logits, target, work, grad=None, eps=EPS):
    """Compute the Dice loss and gradient with two logits-sized buffers.

    The softmax is built in ``grad``, allocated here when it is None. The per-class sums over target
    positions come from ``np.bincount``, so no one-hot array is formed.
    """
    n_classes = logits.shape[1]
    sum_axes = (0,) + tuple(range(2, logits.ndim))
    index = np.expand_dims(target, 1)
    labels = target.ravel()

    grad = np.subtract(logits, logits.max(axis=1, keepdims=True), out=grad)
    np.exp(grad, out=grad)
    np.divide(grad, grad.sum(axis=1, keepdims=True), out=grad)
    p_target = np.take_along_axis(grad, index, axis=1)
    intersection = np.bincount(labels, weights=p_target.ravel(), minlength=n_classes)
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    cardinality = grad.sum(axis=sum_axes, dtype=np.float64) + counts
    denominator = np.maximum(cardinality, eps)
    present = counts > 0
    loss = np.mean((1 - 2 * intersection / denominator) * present)

    # The gradient with respect to p is slope_c - coefficient_c * y, as in
    # _dice_loss_grad, and sum_c p*g is then dot(p, slope) - coefficient_y * p_y.
    weight = present / n_classes
    slope = weight * 2 * intersection * (cardinality > eps) / denominator**2
    coefficient = weight * 2 / denominator
    expand = (None, slice(None)) + (None,) * (logits.ndim - 2)
    slope_b = slope.astype(logits.dtype)[expand]
    coefficient_target = coefficient.astype(logits.dtype)[index]
    np.multiply(grad, slope_b, out=work)
    inner = work.sum(axis=1, keepdims=True) - coefficient_target * p_target
    np.subtract(work, np.multiply(grad, inner, out=grad), out=grad)
    at_target = np.take_along_axis(grad, index, axis=1)
    np.put_along_axis(grad, index, at_target - coefficient_target * p_target, axis=1)
    return loss, grad


def _numba_dice(logits, target):
    from . import numba_kernels

    n_batch, n_classes = logits.shape[:2]
    grad = np.empty_like(logits)
    x3 = logits.reshape(n_batch, n_classes, -1)
    g3 = grad.reshape(n_batch, n_classes, -1)
    t2 = target.reshape(n_batch, -1)
    kernel = partial(numba_kernels.dice_loss_grad, x3, t2, g3, EPS)

    def run():
        return kernel(), grad

    return run


def _reference(logits, target):
    loss, grad = _dice_loss_grad(logits.astype(np.float64), target)
    return float(loss), grad


def _torch_dice(logits, target):
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(logits).requires_grad_()
    t = torch.from_numpy(target)
    n_classes = logits.shape[1]
    dims = (0,) + tuple(range(2, logits.ndim))

    def run():
        x.grad = None
        p = x.softmax(dim=1)
        y = F.one_hot(t, n_classes).movedim(-1, 1).to(p.dtype)
        intersection = (p * y).sum(dims)
        cardinality = (p + y).sum(dims)
        score = 2 * intersection / cardinality.clamp_min(EPS)
        value = ((1 - score) * (y.sum(dims) > 0)).mean()
        value.backward()
        return value

    return run, lambda value: (value.item(), x.grad.numpy())


def _jax_dice(logits, target):
    import jax
    import jax.numpy as jnp

    n_classes = logits.shape[1]
    dims = (0,) + tuple(range(2, logits.ndim))

    def mean_loss(x, t):
        p = jax.nn.softmax(x, axis=1)
        y = jnp.moveaxis(jax.nn.one_hot(t, n_classes, dtype=x.dtype), -1, 1)
        intersection = jnp.sum(p * y, axis=dims)
        cardinality = jnp.sum(p + y, axis=dims)
        score = 2 * intersection / jnp.maximum(cardinality, EPS)
        return jnp.mean((1 - score) * (jnp.sum(y, axis=dims) > 0))

    return jax_value_and_grad(mean_loss, logits, target)


def dice_workload(shape, dtype="float32", group="overlap", per_call=False):
    """Return the multiclass Dice workload on logits of ``shape``, classes at 1."""
    itemsize = np.dtype(dtype).itemsize
    elements = int(np.prod(shape))
    positions = elements // shape[1]

    def build(ctx):
        anchors = ctx["anchors"]
        logits, target = _inputs(shape, dtype, ctx["seed"])
        reference_loss, reference_grad = _reference(logits, target)
        call = partial(
            fastloss.dice_loss, logits, target, mode="multiclass", eps=EPS, return_grad=True
        )
        impls = [
            Implementation("fastloss", "fastloss", call),
            Implementation(
                "fastloss grad_out", "fastloss", partial(call, grad_out=np.empty_like(logits))
            ),
        ]

        if "numpy-naive" in anchors:
            naive = partial(_dice_loss_grad, logits, target)
            impls.append(Implementation("naive NumPy", "numpy-naive", naive))

        if "numpy-careful" in anchors:
            careful = partial(_careful_dice, logits, target, np.empty_like(logits))
            impls += careful_numpy(careful, logits)

        if "torch" in anchors:
            run, extract = _torch_dice(logits, target)
            impls.append(Implementation("PyTorch", "torch", run, extract))

        if "jax" in anchors:
            run, extract = _jax_dice(logits, target)
            impls.append(Implementation("JAX", "jax", run, extract))

        if "numba" in anchors:
            impls.append(Implementation("numba", "numba", _numba_dice(logits, target)))

        return reference_loss, reference_grad, impls

    shape_text = "(" + ", ".join(str(n) for n in shape) + ")"
    rows = [{"label": "", "fastloss": "fastloss"}]
    if not per_call:
        rows.append({"label": "grad_out", "fastloss": "fastloss grad_out"})
    return Workload(
        name=f"dice_loss {dtype} {shape_text}",
        group=group,
        loss="dice_loss",
        params={"shape": list(shape), "axis": 1, "mode": "multiclass", "eps": EPS},
        dtype=dtype,
        bytes_moved=2 * elements * itemsize + positions * 8,
        bytes_note=f"read logits {elements}*{itemsize} and int64 targets"
        f" {positions}*8, write grad {elements}*{itemsize}",
        build=build,
        rows=rows,
        per_call=per_call,
    )
