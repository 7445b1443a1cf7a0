"""Classification workloads: softmax cross-entropy and BCE with logits.

Cross-entropy takes class-index targets (int64) and returns the mean over
positions with its gradient. The class axis is 1 (PyTorch's layout) or the
last axis (channels-last). BCE with logits takes 0/1 float targets.

scikit-learn's ``HalfMultinomialLoss`` and ``HalfBinomialLoss`` compute the
full cross-entropy and BCE per sample (the "half" in their names refers to
the deviance, not to a factor in the loss); their timed call includes the
mean over the per-sample losses and an in-place scaling of the gradient.
``HalfMultinomialLoss`` needs the class axis last, so it runs on the
``(N, C)`` and channels-last workloads only (there a reshape to
``(positions, C)`` is a view), and it takes the class indices as floats,
converted once outside the timing.
"""

from functools import partial

import numpy as np

import fastloss

from .anchors import jax_value_and_grad
from .workload import Implementation, Workload, careful_numpy, format_count

# Logits are standard normal times this scale. For BCE a scale of 2 keeps
# the naive sigmoid in float32 away from exactly 0 and 1, where its log is
# -inf and the naive anchor would fail the check for a reason unrelated to
# speed.
LOGIT_SCALE = 2.0


def _ce_inputs(shape, axis, dtype, seed):
    rng = np.random.default_rng(seed)
    logits = (LOGIT_SCALE * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
    n_classes = shape[axis]
    index_shape = tuple(n for i, n in enumerate(shape) if i != axis % len(shape))
    target = rng.integers(0, n_classes, size=index_shape, dtype=np.int64)
    return logits, target


def _ce_reference(logits, target, axis):
    x = np.moveaxis(logits.astype(np.float64), axis, -1)
    n_classes = x.shape[-1]
    rows = x.reshape(-1, n_classes)
    labels = target.reshape(-1)
    peak = rows.max(axis=1, keepdims=True)
    shifted = np.exp(rows - peak)
    norm = shifted.sum(axis=1, keepdims=True)
    picked = rows[np.arange(rows.shape[0]), labels]
    loss = float(np.mean(np.log(norm[:, 0]) + peak[:, 0] - picked))
    grad = shifted / norm
    grad[np.arange(rows.shape[0]), labels] -= 1.0
    grad /= rows.shape[0]
    return loss, np.moveaxis(grad.reshape(x.shape), -1, axis)


def _naive_ce(logits, target, axis):
    n_classes = logits.shape[axis]
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    p = e / e.sum(axis=axis, keepdims=True)
    one_hot = np.moveaxis(np.eye(n_classes, dtype=logits.dtype)[target], -1, axis)
    loss = -np.mean(np.sum(one_hot * np.log(p), axis=axis))
    grad = (p - one_hot) / target.size
    return loss, grad


def _careful_ce(logits, target, axis, grad=None):
    # The softmax is built in ``grad`` in place (allocated here when None);
    # only per-position arrays, C times smaller than the logits, are
    # allocated besides.
    positions = target.size
    index = np.expand_dims(target, axis)
    peak = logits.max(axis=axis, keepdims=True)
    grad = np.subtract(logits, peak, out=grad)
    picked = np.take_along_axis(grad, index, axis=axis)
    np.exp(grad, out=grad)
    norm = grad.sum(axis=axis, keepdims=True)
    loss = (np.log(norm).sum() - picked.sum()) / positions
    np.multiply(norm, positions, out=norm)
    np.divide(grad, norm, out=grad)
    at_target = np.take_along_axis(grad, index, axis=axis)
    np.put_along_axis(grad, index, at_target - 1.0 / positions, axis=axis)
    return loss, grad


def _torch_ce(logits, target, axis):
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(logits).requires_grad_()
    t = torch.from_numpy(target)
    if axis % logits.ndim == 1:
        forward = partial(F.cross_entropy, x, t)
    else:
        # Channels-last: a (positions, C) view is free and is the layout
        # F.cross_entropy reads fastest.
        n_classes = logits.shape[axis]
        forward = lambda: F.cross_entropy(x.view(-1, n_classes), t.view(-1))  # noqa: E731

    def run():
        x.grad = None
        value = forward()
        value.backward()
        return value

    return run, lambda value: (value.item(), x.grad.numpy())


def _sklearn_ce(logits, target, n_threads):
    from sklearn._loss.loss import HalfMultinomialLoss

    n_classes = logits.shape[-1]
    rows = logits.reshape(-1, n_classes)
    labels = target.reshape(-1).astype(logits.dtype)
    positions = rows.shape[0]
    model = HalfMultinomialLoss(n_classes=n_classes)
    loss_out = np.empty(positions, dtype=logits.dtype)
    grad_out = np.empty_like(rows)

    def run():
        model.loss_gradient(
            y_true=labels,
            raw_prediction=rows,
            loss_out=loss_out,
            gradient_out=grad_out,
            n_threads=n_threads,
        )
        value = loss_out.sum() / positions
        np.multiply(grad_out, 1.0 / positions, out=grad_out)
        return value, grad_out

    return run, lambda result: (result[0], result[1].reshape(logits.shape))


def _jax_ce(logits, target, axis):
    import jax
    import jax.numpy as jnp

    def mean_loss(x, t):
        log_p = jax.nn.log_softmax(x, axis=axis)
        picked = jnp.take_along_axis(log_p, jnp.expand_dims(t, axis), axis=axis)
        return -jnp.mean(picked)

    return jax_value_and_grad(mean_loss, logits, target)


def _numba_ce(logits, target, axis):
    from . import numba_kernels

    axis = axis % logits.ndim
    outer = int(np.prod(logits.shape[:axis]))
    n_classes = logits.shape[axis]
    inner = int(np.prod(logits.shape[axis + 1 :]))
    grad = np.empty_like(logits)
    x3 = logits.reshape(outer, n_classes, inner)
    g3 = grad.reshape(outer, n_classes, inner)
    t2 = target.reshape(outer, inner)
    kernel = partial(numba_kernels.cross_entropy_loss_grad, x3, t2, g3)

    def run():
        return kernel(), grad

    return run


def cross_entropy_workload(shape, axis, dtype="float32", group="classification", per_call=False):
    """Return the cross-entropy workload on ``shape`` with classes on ``axis``."""
    itemsize = np.dtype(dtype).itemsize
    n_classes = shape[axis]
    elements = int(np.prod(shape))
    positions = elements // n_classes
    channels_last = axis % len(shape) == len(shape) - 1

    def build(ctx):
        anchors = ctx["anchors"]
        logits, target = _ce_inputs(shape, axis, dtype, ctx["seed"])
        reference_loss, reference_grad = _ce_reference(logits, target, axis)
        grad_out = np.empty_like(logits)
        call = partial(fastloss.cross_entropy, logits, target, axis=axis, return_grad=True)
        impls = [
            Implementation("fastloss", "fastloss", call),
            Implementation("fastloss grad_out", "fastloss", partial(call, grad_out=grad_out)),
        ]

        if "numpy-naive" in anchors:
            impls.append(
                Implementation("naive NumPy", "numpy-naive", partial(_naive_ce, logits, target, axis))
            )

        if "numpy-careful" in anchors:
            impls += careful_numpy(partial(_careful_ce, logits, target, axis), logits)

        if "torch" in anchors:
            run, extract = _torch_ce(logits, target, axis)
            impls.append(Implementation("PyTorch", "torch", run, extract))

        if "sklearn" in anchors and channels_last:
            run, extract = _sklearn_ce(logits, target, ctx["n_threads"])
            impls.append(
                Implementation("scikit-learn", "sklearn", run, extract, note="HalfMultinomialLoss")
            )

        if "jax" in anchors:
            run, extract = _jax_ce(logits, target, axis)
            impls.append(Implementation("JAX", "jax", run, extract))

        if "numba" in anchors:
            impls.append(Implementation("numba", "numba", _numba_ce(logits, target, axis)))

        return reference_loss, reference_grad, impls

    shape_text = "(" + ", ".join(str(n) for n in shape) + ")"
    rows = [{"label": "", "fastloss": "fastloss"}]
    if not per_call:
        rows.append({"label": "grad_out", "fastloss": "fastloss grad_out"})
    return Workload(
        name=f"cross_entropy {dtype} {shape_text} axis={axis}",
        group=group,
        loss="cross_entropy",
        params={"shape": list(shape), "axis": axis},
        dtype=dtype,
        bytes_moved=2 * elements * itemsize + positions * 8,
        bytes_note=f"read logits {elements}*{itemsize} and int64 targets"
        f" {positions}*8, write grad {elements}*{itemsize}",
        build=build,
        rows=rows,
        per_call=per_call,
    )


def _bce_inputs(n, dtype, seed):
    rng = np.random.default_rng(seed)
    logits = (LOGIT_SCALE * rng.standard_normal(n)).astype(dtype)
    target = (rng.random(n) < 0.3).astype(dtype)
    return logits, target


def _bce_reference(logits, target):
    x = logits.astype(np.float64)
    t = target.astype(np.float64)
    loss = float(np.mean(np.logaddexp(0.0, x) - t * x))
    sigmoid = 0.5 * np.tanh(0.5 * x) + 0.5
    return loss, (sigmoid - t) / x.size


def _naive_bce(logits, target):
    p = 1 / (1 + np.exp(-logits))
    loss = -np.mean(target * np.log(p) + (1 - target) * np.log(1 - p))
    grad = (p - target) / logits.size
    return loss, grad


def _careful_bce(logits, target, work, grad=None):
    # softplus(x) - t*x with softplus(x) = max(x, 0) + log1p(exp(-|x|)), and
    # sigmoid(x) = (tanh(x/2) + 1) / 2: both stable for any |x|.
    n = logits.size
    np.abs(logits, out=work)
    np.negative(work, out=work)
    np.exp(work, out=work)
    np.log1p(work, out=work)
    total = work.sum()
    np.maximum(logits, 0, out=work)
    total += work.sum() - np.dot(logits, target)
    grad = np.multiply(logits, 0.5, out=grad)
    np.tanh(grad, out=grad)
    np.multiply(grad, 0.5, out=grad)
    np.add(grad, 0.5, out=grad)
    np.subtract(grad, target, out=grad)
    np.multiply(grad, 1.0 / n, out=grad)
    return total / n, grad


def _torch_bce(logits, target):
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(logits).requires_grad_()
    t = torch.from_numpy(target)

    def run():
        x.grad = None
        value = F.binary_cross_entropy_with_logits(x, t)
        value.backward()
        return value

    return run, lambda value: (value.item(), x.grad.numpy())


def _sklearn_bce(logits, target, n_threads):
    from sklearn._loss.loss import HalfBinomialLoss

    n = logits.size
    model = HalfBinomialLoss()
    loss_out = np.empty_like(logits)
    grad_out = np.empty_like(logits)

    def run():
        model.loss_gradient(
            y_true=target,
            raw_prediction=logits,
            loss_out=loss_out,
            gradient_out=grad_out,
            n_threads=n_threads,
        )
        value = loss_out.sum() / n
        np.multiply(grad_out, 1.0 / n, out=grad_out)
        return value, grad_out

    return run


def _jax_bce(logits, target):
    import jax
    import jax.numpy as jnp

    def mean_loss(x, t):
        return jnp.mean(jax.nn.softplus(x) - t * x)

    return jax_value_and_grad(mean_loss, logits, target)


def bce_workload(n, dtype="float32", group="classification", per_call=False):
    """Return the BCE-with-logits workload on ``n`` elements."""
    itemsize = np.dtype(dtype).itemsize
    loss = "binary_cross_entropy_with_logits"

    def build(ctx):
        anchors = ctx["anchors"]
        logits, target = _bce_inputs(n, dtype, ctx["seed"])
        reference_loss, reference_grad = _bce_reference(logits, target)
        call = partial(getattr(fastloss, loss), logits, target, return_grad=True)
        impls = [
            Implementation("fastloss", "fastloss", call),
            Implementation(
                "fastloss grad_out", "fastloss", partial(call, grad_out=np.empty_like(logits))
            ),
        ]

        if "numpy-naive" in anchors:
            impls.append(
                Implementation("naive NumPy", "numpy-naive", partial(_naive_bce, logits, target))
            )

        if "numpy-careful" in anchors:
            careful = partial(_careful_bce, logits, target, np.empty_like(logits))
            impls += careful_numpy(careful, logits)

        if "torch" in anchors:
            run, extract = _torch_bce(logits, target)
            impls.append(Implementation("PyTorch", "torch", run, extract))

        if "sklearn" in anchors:
            run = _sklearn_bce(logits, target, ctx["n_threads"])
            impls.append(Implementation("scikit-learn", "sklearn", run, note="HalfBinomialLoss"))

        if "jax" in anchors:
            run, extract = _jax_bce(logits, target)
            impls.append(Implementation("JAX", "jax", run, extract))

        if "numba" in anchors:
            from . import numba_kernels

            grad = np.empty_like(logits)
            kernel = partial(numba_kernels.bce_with_logits_loss_grad, logits, target, grad)
            impls.append(Implementation("numba", "numba", lambda: (kernel(), grad)))

        return reference_loss, reference_grad, impls

    rows = [{"label": "", "fastloss": "fastloss"}]
    if not per_call:
        rows.append({"label": "grad_out", "fastloss": "fastloss grad_out"})
    return Workload(
        name=f"{loss} {dtype} n={format_count(n)}",
        group=group,
        loss=loss,
        params={"n": n},
        dtype=dtype,
        bytes_moved=3 * n * itemsize,
        bytes_note=f"read 2n*{itemsize}, write n*{itemsize}",
        build=build,
        rows=rows,
        per_call=per_call,
    )
