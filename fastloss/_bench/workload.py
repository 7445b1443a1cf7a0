"""Workload and implementation records, and the check against a reference."""

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np

# Tolerance of the check against the float64 reference, per compute dtype:
# the loss must agree to this relative error, and every gradient element to
# this share of the largest gradient magnitude. The check exists to catch a
# wrong formula or a wrong reduction, whose errors are of order 1, and not
# to rank accuracy.
TOLERANCE = {"float32": 1e-4, "float64": 1e-9}


def format_count(n):
    """Write a power of ten of 1000 or more as ``1e6``, other counts as digits."""
    if n >= 1000 and 10 ** round(math.log10(n)) == n:
        return f"1e{round(math.log10(n))}"
    return str(n)


@dataclass
class Implementation:
    """One way of computing a workload's loss and gradient.

    ``run`` takes no arguments and does the timed work. ``extract`` turns
    what ``run`` returned into ``(loss, grad)``, a float and an ndarray of
    the inputs' shape. It runs only for the check, outside the timing.
    """

    name: str
    anchor: str
    run: Callable[[], object]
    extract: Callable[[object], tuple] = lambda result: result
    threads: object = None
    note: str = ""
    # The label of the one report row this anchor belongs to, or None for
    # every row: an anchor that writes into a preallocated buffer is
    # compared with fastloss's grad_out row only.
    row: object = None


@dataclass
class Workload:
    """One benchmarked problem: inputs, the bytes it must move, its rows.

    ``build`` is called only when the workload runs. It creates the inputs
    and returns ``(reference_loss, reference_grad, implementations)``, the
    reference computed in float64.
    """

    name: str
    group: str
    loss: str
    params: dict
    dtype: str
    bytes_moved: int
    bytes_note: str
    build: Callable[[dict], tuple]
    # Rows of the report: each pairs one fastloss implementation with the
    # anchors. A workload timed once can feed several rows (with and without
    # ``grad_out``).
    rows: list = field(default_factory=lambda: [{"label": "", "fastloss": "fastloss"}])
    per_call: bool = False
    # Time each library's implementations in a block of their own instead of
    # interleaving all of them. A thread row compares a library with itself
    # at several thread counts, as a user's repeated calls would run, with
    # no other runtime's threads spinning on the cores.
    blocks_by_anchor: bool = False


def check_result(result, reference_loss, reference_grad, dtype):
    """Compare ``(loss, grad)`` with the float64 reference.

    Returns ``(ok, error, message)``: ``error`` is the larger of the loss's
    relative error and the gradient's largest error relative to the largest
    reference gradient magnitude.
    """
    loss, grad = result
    grad = np.asarray(grad)
    if grad.shape != reference_grad.shape:
        return False, None, f"grad has shape {grad.shape}, expected {reference_grad.shape}"
    loss = float(loss)
    scale = abs(reference_loss) if reference_loss != 0 else 1.0
    loss_error = abs(loss - reference_loss) / scale
    grad_scale = float(np.max(np.abs(reference_grad))) if reference_grad.size else 1.0
    grad_scale = grad_scale if grad_scale > 0 else 1.0
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(grad.astype(np.float64) - reference_grad)
        grad_error = float(np.max(diff)) / grad_scale if diff.size else 0.0
    error = max(loss_error, grad_error)
    if not np.isfinite(error):
        error = float("inf")
    ok = error <= TOLERANCE[dtype]
    if ok:
        return True, error, ""
    return (
        False,
        error,
        f"loss {loss!r} against reference {reference_loss!r}, largest gradient"
        f" error {grad_error:.3g} of the largest gradient",
    )


def careful_numpy(run, like):
    """Return the careful-NumPy implementations for a plain and a grad_out row.

    ``run(grad=None)`` allocates its gradient per call, as fastloss does
    without ``grad_out``; ``run(grad=buffer)`` writes into one preallocated
    array of ``like``'s shape, as fastloss does with it.
    """
    return [
        Implementation("careful NumPy", "numpy-careful", run, row=""),
        Implementation("careful NumPy into a buffer", "numpy-careful",
                       partial(run, grad=np.empty_like(like)), row="grad_out"),
    ]
