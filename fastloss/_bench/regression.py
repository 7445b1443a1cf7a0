"""Regression workloads: MSE and Huber loss with the gradient of the mean.

Every implementation returns the mean loss and its gradient with respect to
``pred``. The scikit-learn anchor computes per-sample losses and gradients
of ``HalfSquaredError`` (``0.5 * d**2``, gradient ``d``) or ``HuberLoss``, so
its timed call also does the reduction that turns them into the same
result: one sum over the per-sample losses and one in-place scaling of the
gradient, as a user of those classes has to.
"""

from functools import partial

import numpy as np

import fastloss

from .anchors import jax_value_and_grad, set_threads
from .workload import Implementation, Workload, careful_numpy, format_count

HUBER_DELTA = 1.0


def _inputs(n, dtype, seed):
    rng = np.random.default_rng(seed)
    pred = rng.standard_normal(n).astype(dtype)
    # A spread of 2 puts about a third of the Huber errors past delta = 1.
    target = (pred + 2.0 * rng.standard_normal(n)).astype(dtype)
    return pred, target


def _reference(loss, pred, target):
    d = pred.astype(np.float64) - target.astype(np.float64)
    n = d.size
    if loss == "mse_loss":
        return float(np.mean(d * d)), 2.0 * d / n
    a = np.abs(d)
    per_element = np.where(
        a <= HUBER_DELTA, 0.5 * d * d, HUBER_DELTA * (a - 0.5 * HUBER_DELTA)
    )
    return float(np.mean(per_element)), np.clip(d, -HUBER_DELTA, HUBER_DELTA) / n


def _naive_mse(pred, target):
    d = pred - target
    loss = np.mean(d**2)
    grad = 2 * d / d.size
    return loss, grad


def _naive_huber(pred, target, delta=HUBER_DELTA):
    d = pred - target
    a = np.abs(d)
    quadratic = a <= delta
    loss = np.mean(np.where(quadratic, 0.5 * d**2, delta * (a - 0.5 * delta)))
    grad = np.where(quadratic, d, delta * np.sign(d)) / d.size
    return loss, grad


def _careful_mse(pred, target, grad=None):
    # With grad None the gradient array is allocated per call, as a function
    # that returns a fresh gradient must; otherwise it is reused.
    n = pred.size
    grad = np.subtract(pred, target, out=grad)
    loss = np.dot(grad, grad) / n
    np.multiply(grad, 2.0 / n, out=grad)
    return loss, grad


def _careful_huber(pred, target, absolute, clipped, grad=None, delta=HUBER_DELTA):
    # With m = min(|d|, delta) the Huber loss is m * (|d| - m / 2), so the
    # sum is dot(m, |d|) - dot(m, m) / 2. The scratch arrays absolute and
    # clipped are reused; grad is allocated per call when it is None.
    n = pred.size
    grad = np.subtract(pred, target, out=grad)
    np.abs(grad, out=absolute)
    np.minimum(absolute, delta, out=clipped)
    loss = (np.dot(clipped, absolute) - 0.5 * np.dot(clipped, clipped)) / n
    np.clip(grad, -delta, delta, out=grad)
    np.multiply(grad, 1.0 / n, out=grad)
    return loss, grad


def _torch_impl(loss, pred, target, threads=None):
    import torch
    import torch.nn.functional as F

    p = torch.from_numpy(pred).requires_grad_()
    t = torch.from_numpy(target)
    if loss == "mse_loss":
        forward = partial(F.mse_loss, p, t)
    else:
        forward = partial(F.huber_loss, p, t, delta=HUBER_DELTA)

    def run():
        if threads is not None:
            set_threads("torch", threads)
        p.grad = None
        value = forward()
        value.backward()
        return value

    return run, lambda value: (value.item(), p.grad.numpy())


def _sklearn_impl(loss, pred, target, n_threads):
    from sklearn._loss.loss import HalfSquaredError, HuberLoss

    n = pred.size
    loss_out = np.empty_like(pred)
    grad_out = np.empty_like(pred)
    if loss == "mse_loss":
        # HalfSquaredError is 0.5 * d**2, half the MSE summand.
        model, factor = HalfSquaredError(), 2.0
    else:
        # delta is fixed at construction; the quantile only matters when
        # gradient boosting refits delta, which loss_gradient never does.
        model, factor = HuberLoss(delta=HUBER_DELTA), 1.0

    def run():
        model.loss_gradient(
            y_true=target,
            raw_prediction=pred,
            loss_out=loss_out,
            gradient_out=grad_out,
            n_threads=n_threads,
        )
        value = factor * loss_out.sum() / n
        np.multiply(grad_out, factor / n, out=grad_out)
        return value, grad_out

    return run


def _jax_impl(loss, pred, target):
    import jax.numpy as jnp

    if loss == "mse_loss":

        def mean_loss(p, t):
            return jnp.mean((p - t) ** 2)

    else:

        def mean_loss(p, t):
            d = p - t
            a = jnp.abs(d)
            delta = HUBER_DELTA
            return jnp.mean(jnp.where(a <= delta, 0.5 * d**2, delta * (a - 0.5 * delta)))

    return jax_value_and_grad(mean_loss, pred, target)


def _numba_impl(loss, pred, target, threads=None):
    from . import numba_kernels

    grad = np.empty_like(pred)
    if loss == "mse_loss":
        kernel = partial(numba_kernels.mse_loss_grad, pred, target, grad)
    else:
        kernel = partial(numba_kernels.huber_loss_grad, pred, target, grad, HUBER_DELTA)

    def run():
        if threads is not None:
            set_threads("numba", threads)
        return kernel(), grad

    return run


def _implementations(loss, pred, target, ctx):
    """Return every implementation of ``loss`` whose anchor is available."""
    anchors = ctx["anchors"]
    kwargs = {"delta": HUBER_DELTA} if loss == "huber_loss" else {}
    func = getattr(fastloss, loss)
    grad_out = np.empty_like(pred)
    impls = [
        Implementation(
            "fastloss", "fastloss", partial(func, pred, target, return_grad=True, **kwargs)
        ),
        Implementation(
            "fastloss grad_out",
            "fastloss",
            partial(func, pred, target, return_grad=True, grad_out=grad_out, **kwargs),
        ),
    ]

    if "numpy-naive" in anchors:
        naive = _naive_mse if loss == "mse_loss" else _naive_huber
        impls.append(Implementation("naive NumPy", "numpy-naive", partial(naive, pred, target)))

    if "numpy-careful" in anchors:
        if loss == "mse_loss":
            careful = partial(_careful_mse, pred, target)
        else:
            careful = partial(_careful_huber, pred, target, np.empty_like(pred),
                              np.empty_like(pred))
        impls += careful_numpy(careful, pred)

    if "torch" in anchors:
        run, extract = _torch_impl(loss, pred, target)
        impls.append(Implementation("PyTorch", "torch", run, extract))

    if "sklearn" in anchors:
        run = _sklearn_impl(loss, pred, target, ctx["n_threads"])
        note = "HalfSquaredError (0.5*d**2) scaled by 2" if loss == "mse_loss" else "HuberLoss"
        impls.append(Implementation("scikit-learn", "sklearn", run, note=note))

    if "jax" in anchors:
        run, extract = _jax_impl(loss, pred, target)
        impls.append(Implementation("JAX", "jax", run, extract))

    if "numba" in anchors:
        impls.append(Implementation("numba", "numba", _numba_impl(loss, pred, target)))

    return impls


def regression_workload(loss, n, dtype, group="regression", per_call=False):
    """Return the workload of ``loss`` on ``n`` elements of ``dtype``."""
    itemsize = np.dtype(dtype).itemsize

    def build(ctx):
        pred, target = _inputs(n, dtype, ctx["seed"])
        reference_loss, reference_grad = _reference(loss, pred, target)
        return reference_loss, reference_grad, _implementations(loss, pred, target, ctx)

    rows = [{"label": "", "fastloss": "fastloss"}]
    if not per_call:
        rows.append({"label": "grad_out", "fastloss": "fastloss grad_out"})
    return Workload(
        name=f"{loss} {dtype} n={format_count(n)}",
        group=group,
        loss=loss,
        params={"n": n, "delta": HUBER_DELTA} if loss == "huber_loss" else {"n": n},
        dtype=dtype,
        bytes_moved=3 * n * itemsize,
        bytes_note=f"read 2n*{itemsize}, write n*{itemsize}",
        build=build,
        rows=rows,
        per_call=per_call,
    )


def thread_scaling_workload(n, dtype, max_threads):
    """Return MSE on ``n`` elements timed with 1 and ``max_threads`` threads.

    Only the implementations with a thread-count setting take part: fastloss
    (``n_threads``), scikit-learn (``n_threads``), PyTorch
    (``torch.set_num_threads``) and numba (``numba.set_num_threads``).
    fastloss is timed twice, with a fresh gradient and with ``grad_out``:
    the kernel zeroes the fresh gradient's pages in whichever thread first
    writes them, and that part scales with the threads differently from the
    loss itself. Each library is timed in a block of its own.
    """
    itemsize = np.dtype(dtype).itemsize
    counts = sorted({1, max_threads})

    def build(ctx):
        pred, target = _inputs(n, dtype, ctx["seed"])
        reference_loss, reference_grad = _reference("mse_loss", pred, target)
        anchors = ctx["anchors"]
        grad_out = np.empty_like(pred)
        impls = []
        for k in counts:
            impls.append(
                Implementation(
                    f"fastloss {k}t",
                    "fastloss",
                    partial(fastloss.mse_loss, pred, target, return_grad=True, n_threads=k),
                    threads=k,
                )
            )
            impls.append(
                Implementation(
                    f"fastloss grad_out {k}t",
                    "fastloss",
                    partial(fastloss.mse_loss, pred, target, return_grad=True,
                            grad_out=grad_out, n_threads=k),
                    threads=k,
                )
            )

            if "torch" in anchors:
                run, extract = _torch_impl("mse_loss", pred, target, threads=k)
                impls.append(Implementation(f"PyTorch {k}t", "torch", run, extract, threads=k))

            if "sklearn" in anchors:
                run = _sklearn_impl("mse_loss", pred, target, k)
                impls.append(Implementation(f"scikit-learn {k}t", "sklearn", run, threads=k))

            if "numba" in anchors:
                run = _numba_impl("mse_loss", pred, target, threads=k)
                impls.append(Implementation(f"numba {k}t", "numba", run, threads=k))

        return reference_loss, reference_grad, impls

    return Workload(
        name=f"mse_loss {dtype} n={format_count(n)}, threads",
        group="threads",
        loss="mse_loss",
        params={"n": n, "thread_counts": counts},
        dtype=dtype,
        bytes_moved=3 * n * itemsize,
        bytes_note=f"read 2n*{itemsize}, write n*{itemsize}",
        build=build,
        rows=[],
        blocks_by_anchor=True,
    )


def threshold_workload(n, dtype, max_threads):
    """Return fastloss's MSE with ``grad_out`` on ``n`` elements, 1 and all threads.

    One point of the sweep that shows where a second thread starts to pay,
    which is what MIN_PARALLEL_ITEMS in ``_common.pxd`` should be. The
    gradient is preallocated so that page faults do not enter the timing.
    """
    itemsize = np.dtype(dtype).itemsize
    counts = sorted({1, max_threads})

    def build(ctx):
        pred, target = _inputs(n, dtype, ctx["seed"])
        reference_loss, reference_grad = _reference("mse_loss", pred, target)
        grad_out = np.empty_like(pred)
        impls = [
            Implementation(
                f"fastloss {k}t",
                "fastloss",
                partial(fastloss.mse_loss, pred, target, return_grad=True,
                        grad_out=grad_out, n_threads=k),
                threads=k,
            )
            for k in counts
        ]
        return reference_loss, reference_grad, impls

    return Workload(
        name=f"mse_loss {dtype} n={n}, parallel threshold",
        group="threshold",
        loss="mse_loss",
        params={"n": n, "thread_counts": counts},
        dtype=dtype,
        bytes_moved=3 * n * itemsize,
        bytes_note=f"read 2n*{itemsize}, write n*{itemsize}",
        build=build,
        rows=[],
    )
