"""The libraries fastloss is compared with, imported only when present.

Anchor keys, in report order:

- ``numpy-naive``: loss and gradient written as a tutorial writes them, one
  temporary array per operation.
- ``numpy-careful``: scratch buffers reused with ``out=`` and BLAS dot
  products for the sums. On a plain row the gradient array is allocated per
  call; on a ``grad_out`` row it is one preallocated buffer.
- ``torch``: PyTorch CPU, ``torch.nn.functional`` forward plus ``backward()``.
- ``sklearn``: scikit-learn's private ``sklearn._loss`` classes through
  ``loss_gradient(..., n_threads=...)``, where one computes the same loss.
- ``jax``: ``jax.jit(jax.value_and_grad(...))`` on the CPU backend.
- ``numba``: a fused ``@numba.njit(parallel=True)`` kernel writing into a
  preallocated gradient.
"""

import importlib
import os

ANCHORS = ("numpy-naive", "numpy-careful", "torch", "sklearn", "jax", "numba")

LABELS = {
    "fastloss": "fastloss",
    "numpy-naive": "naive NumPy",
    "numpy-careful": "careful NumPy",
    "torch": "PyTorch",
    "sklearn": "scikit-learn",
    "jax": "JAX",
    "numba": "numba",
}

# The module each optional anchor needs.
_MODULES = {"torch": "torch", "sklearn": "sklearn._loss.loss", "jax": "jax", "numba": "numba"}


def load_anchors(requested):
    """Import the requested anchors that are installed.

    Returns ``(available, missing)``: ``available`` maps each importable
    anchor key to its version string, ``missing`` maps the others to the
    reason. JAX is switched to 64-bit mode so that float64 inputs stay
    float64.
    """
    available = {}
    missing = {}
    for key in requested:
        if key.startswith("numpy"):
            import numpy

            available[key] = numpy.__version__
            continue
        try:
            module = importlib.import_module(_MODULES[key])
        except Exception as exc:  # an anchor that fails to import is skipped
            missing[key] = f"import {_MODULES[key]} failed: {type(exc).__name__}: {exc}"
            continue
        if key == "jax":
            module.config.update("jax_enable_x64", True)
        if key == "sklearn":
            module = importlib.import_module("sklearn")
        available[key] = getattr(module, "__version__", "unknown")
    return available, missing


def set_threads(anchor, n_threads):
    """Set the thread count of an anchor's own thread pool, where it has one."""
    if anchor == "torch":
        import torch

        torch.set_num_threads(n_threads)
    elif anchor == "numba":
        import numba

        numba.set_num_threads(min(n_threads, numba.config.NUMBA_NUM_THREADS))


def thread_settings(available):
    """Return the default thread counts of the available anchors' pools."""
    settings = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    if "torch" in available:
        import torch

        settings["torch"] = torch.get_num_threads()
    if "numba" in available:
        import numba

        settings["numba"] = numba.get_num_threads()
    return settings


def jax_value_and_grad(mean_loss, *arrays):
    """Return ``(run, extract)`` timing ``jax.jit(jax.value_and_grad(mean_loss))``.

    ``run`` calls the jitted function on ``arrays`` (converted to JAX arrays
    once, outside the timing) and waits for the gradient, because JAX
    dispatches asynchronously. ``extract`` turns its result into
    ``(float loss, NumPy grad)`` for the correctness check.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    func = jax.jit(jax.value_and_grad(mean_loss))
    inputs = [jnp.asarray(a) for a in arrays]

    def run():
        value, grad = func(*inputs)
        grad.block_until_ready()
        return value, grad

    return run, lambda result: (float(result[0]), np.asarray(result[1]))
