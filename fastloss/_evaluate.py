"""Evaluate a loss on arrays that may be larger than memory.

``evaluate`` walks memory-mapped inputs in chunks along their first axis.
Each chunk is passed to the loss with ``reduction="sum"``, the chunk sums
are added in float64 in chunk order, and the mean is formed at the end from
a normaliser that is also summed chunk by chunk:

- elementwise losses (regression): the element count, or ``sum(weight)``
  when sample weights are given;
- elementwise losses whose ``"mean"`` ignores the weights
  (``binary_cross_entropy_with_logits``, ``sigmoid_focal_loss``): the
  element count;
- ``rmse_loss``: ``sqrt`` of the streamed ``mse_loss`` mean (or sum);
- softmax losses over a class axis (``cross_entropy``, ``focal_loss``): the
  number of positions that are not ``ignore_index``, or the sum of their
  targets' class weights.

A gradient requested with ``grad_path`` is written chunk by chunk into an
``.npy`` memory map and rescaled at the end for ``"mean"`` (and for the root
of ``rmse_loss``).

The loss is called once on the whole (memory-mapped) arrays instead for:

- inputs that fit in one chunk;
- losses that need sums over the whole array (Dice, Jaccard, Tversky) and
  losses not listed in ``STREAMING``;
- inputs whose shapes do not line up along the first axis, so that the loss
  itself reports the shape error with the shapes of the whole arrays.
"""

import inspect
import math
import os
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.format import open_memmap

from . import io as fio
from ._validation import compute_dtype

__all__ = ["STREAMING", "DEFAULT_CHUNK_ELEMENTS", "evaluate"]

# Elements per chunk of the largest input: 4 Mi elements, 32 MiB of float64
# per input array, large enough that the per-call overhead is negligible.
DEFAULT_CHUNK_ELEMENTS = 1 << 22

# A progress bar is shown from this many chunks on, 64 Mi elements with the
# default chunk size.
PROGRESS_MIN_CHUNKS = 16

ELEMENTWISE = "elementwise"
ELEMENTWISE_PLAIN_MEAN = "elementwise, plain mean"
ROOT_MEAN_SQUARE = "root mean square"
CLASS_AXIS = "class axis"

# Chunking rule of each loss. A loss missing here is evaluated on the whole
# arrays in one call, which is always correct but not chunked.
STREAMING = {
    "mse_loss": ELEMENTWISE,
    "l1_loss": ELEMENTWISE,
    "smooth_l1_loss": ELEMENTWISE,
    "huber_loss": ELEMENTWISE,
    "log_cosh_loss": ELEMENTWISE,
    "pinball_loss": ELEMENTWISE,
    "rmse_loss": ROOT_MEAN_SQUARE,
    "binary_cross_entropy_with_logits": ELEMENTWISE_PLAIN_MEAN,
    "sigmoid_focal_loss": ELEMENTWISE_PLAIN_MEAN,
    "cross_entropy": CLASS_AXIS,
    "focal_loss": CLASS_AXIS,
}

# Keywords of the elementwise-plain-mean losses that broadcast against the
# logits and so must be cut into the same chunks.
_BROADCAST_KEYWORDS = ("weight", "pos_weight")

# The loss that rmse_loss is streamed through: rmse = sqrt(mse).
_SQUARED_LOSS = "mse_loss"

# Losses whose "mean" over probability targets (a floating target of the
# logits' shape) divides by the number of positions.
_PROBABILITY_TARGETS_BY_POSITION = frozenset({"cross_entropy"})


@dataclass
class _Plan:
    """Chunking plan: the call made on each chunk and the rule that combines them."""

    func: object
    kind: str
    fixed: dict
    chunked: dict = field(default_factory=dict)
    class_axis: int = 1
    ignore_index: object = None
    class_weight: object = None
    probability_targets: bool = False

    def count(self, target):
        """Return the elements or positions of ``target`` that count in ``n``."""
        if self.kind != CLASS_AXIS:
            return target.size
        if self.probability_targets:
            return target.size // max(target.shape[self.class_axis], 1)
        return int(np.count_nonzero(np.asarray(target) != self.ignore_index))

    def normaliser(self, target, chunk_keywords):
        """Return this chunk's share of the denominator of ``"mean"``."""
        if self.kind == ELEMENTWISE or self.kind == ROOT_MEAN_SQUARE:
            weight = chunk_keywords.get("weight")
            if weight is not None:
                return float(np.sum(weight, dtype=np.float64))
            return float(target.size)
        if self.kind == CLASS_AXIS and not self.probability_targets:
            t = np.asarray(target)
            kept_targets = t[t != self.ignore_index]
            if self.class_weight is None:
                return float(kept_targets.size)
            weights = self.class_weight[kept_targets]
            return float(np.sum(weights, dtype=np.float64))
        return float(self.count(target))


def evaluate(
    func,
    loss_name,
    pred,
    target,
    *,
    weight=None,
    reduction="mean",
    params=None,
    grad_path=None,
    loss_path=None,
    chunk_elements=DEFAULT_CHUNK_ELEMENTS,
    progress=True,
):
    """Evaluate ``func`` on ``pred`` and ``target``, in chunks where possible.

    Parameters
    ----------
    func : callable
        The loss function, called as ``func(pred, target, **keywords)``.
    loss_name : str
        Its public name, which selects the chunking rule in ``STREAMING``.
    pred, target : numpy.ndarray
        Inputs, typically read-only memory maps.
    weight : array-like, optional
        Passed as the ``weight`` keyword.
    reduction : {"mean", "sum", "none"}
    params : dict, optional
        Further keywords for the loss.
    grad_path : str, optional
        ``.npy`` file that receives the gradient of the returned loss.
    loss_path : str, optional
        ``.npy`` file that receives the per-element losses of
        ``reduction="none"``; the returned ``"loss"`` is then None.
    chunk_elements : int
        Largest number of elements of ``pred`` in one chunk.
    progress : bool
        Allow a progress bar on stderr when there are many chunks.

    Returns
    -------
    dict
        ``"loss"`` (a NumPy scalar of the compute dtype, an array for
        ``"none"``, or None when written to ``loss_path``), ``"n"`` (elements
        or positions counted), ``"chunks"`` and, for a weighted mean,
        ``"weight_sum"``.
    """
    params = dict(params or {})
    # Plain ndarray views of memory maps take the losses' fast paths for
    # C-contiguous ndarrays, so a file gives the same bits as in memory.
    pred, target, weight = (
        a.view(np.ndarray) if isinstance(a, np.memmap) else a
        for a in (pred, target, weight)
    )
    plan = _make_plan(func, loss_name, pred, target, weight, reduction, params)
    rows = 0 if plan is None else fio.rows_per_chunk(pred.shape, chunk_elements)
    if plan is None or rows >= pred.shape[0]:
        # No chunking rule applies, or one chunk covers everything. One call
        # gives the library's own result bit for bit.
        return _evaluate_whole(func, loss_name, pred, target, weight, reduction,
                               params, grad_path, loss_path)
    return _evaluate_chunks(plan, pred, target, reduction, rows, grad_path,
                            loss_path, progress)


def _make_plan(func, loss_name, pred, target, weight, reduction, params):
    """Return the chunking plan for this call, or None to use one call."""
    kind = STREAMING.get(loss_name)
    if kind is None or not isinstance(pred, np.ndarray):
        return None
    if not isinstance(target, np.ndarray) or pred.ndim == 0 or pred.shape[0] == 0:
        return None
    if target.ndim == 0 or target.shape[0] != pred.shape[0]:
        return None
    fixed = dict(params)
    if weight is not None:
        fixed["weight"] = weight

    if kind == ELEMENTWISE or kind == ROOT_MEAN_SQUARE:
        if target.shape != pred.shape:
            return None
        plan = _Plan(func, kind, fixed)
        w = fixed.pop("weight", None)
        if w is not None:
            w = np.asarray(w)
            if w.shape != pred.shape:
                return None
            plan.chunked["weight"] = w
        if kind == ROOT_MEAN_SQUARE:
            import fastloss

            squared_loss = getattr(fastloss, _SQUARED_LOSS, None)
            if reduction == "none" or squared_loss is None:
                # rmse_loss rejects "none" itself, with its own message.
                return None
            plan.func = squared_loss
        return plan

    if kind == ELEMENTWISE_PLAIN_MEAN:
        if target.shape != pred.shape:
            return None
        plan = _Plan(func, kind, fixed)
        for name in _BROADCAST_KEYWORDS:
            value = fixed.get(name)
            if value is None:
                continue
            try:
                plan.chunked[name] = np.broadcast_to(np.asarray(value), pred.shape)
            except ValueError:
                return None
            del fixed[name]
        return plan

    return _make_class_axis_plan(func, loss_name, pred, target, fixed)


def _make_class_axis_plan(func, loss_name, logits, target, fixed):
    defaults = _keyword_defaults(func)
    axis = fixed.get("axis", defaults.get("axis", 1))
    ignore_index = fixed.get("ignore_index", defaults.get("ignore_index"))
    if type(axis) is not int or logits.ndim < 2:
        return None
    if not -logits.ndim <= axis < logits.ndim or axis % logits.ndim == 0:
        # The batch axis is the class axis: chunks would split the classes.
        return None
    axis %= logits.ndim
    plan = _Plan(func, CLASS_AXIS, fixed, class_axis=axis, ignore_index=ignore_index)

    index_shape = logits.shape[:axis] + logits.shape[axis + 1 :]
    if target.shape == logits.shape and target.dtype.kind == "f":
        if loss_name not in _PROBABILITY_TARGETS_BY_POSITION:
            return None
        plan.probability_targets = True
    elif target.shape != index_shape or target.dtype.kind not in "iu":
        return None

    class_weight = fixed.get("weight")
    if class_weight is not None:
        class_weight = np.asarray(class_weight)
        if class_weight.shape != (logits.shape[axis],):
            return None
        plan.class_weight = class_weight.astype(np.float64)
    return plan


def _keyword_defaults(func):
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return {}
    return {
        name: p.default
        for name, p in signature.parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _evaluate_whole(func, loss_name, pred, target, weight, reduction, params,
                    grad_path, loss_path):
    keywords = dict(params)
    if weight is not None:
        keywords["weight"] = weight
    with _OutputFile(grad_path) as grad_file, _OutputFile(loss_path) as loss_file:
        loss = _call_whole(func, pred, target, reduction, keywords, grad_file,
                           loss_file)
    n = _count_whole(func, loss_name, pred, target, params)
    return {"loss": loss, "n": n, "chunks": 1}


def _call_whole(func, pred, target, reduction, keywords, grad_file, loss_file):
    # The memory maps are reached only through grad_file and loss_file, so
    # that no local reference keeps them open once this function returns.
    if grad_file.path is not None:
        grad_file.create(pred.shape, compute_dtype(np.asarray(pred).dtype))
        loss = func(pred, target, reduction=reduction, return_grad=True,
                    grad_out=grad_file.array, **keywords)[0]
    else:
        loss = func(pred, target, reduction=reduction, **keywords)
    if loss_file.path is None:
        return loss
    loss_file.create(loss.shape, loss.dtype)[...] = loss
    return None


def _count_whole(func, loss_name, pred, target, params):
    """Return ``n`` for a loss evaluated in one call."""
    if STREAMING.get(loss_name) == CLASS_AXIS and isinstance(target, np.ndarray):
        plan = _make_class_axis_plan(func, loss_name, pred, target, dict(params))
        if plan is not None:
            return plan.count(target)
    return int(np.size(target))


def _evaluate_chunks(plan, pred, target, reduction, rows, grad_path, loss_path,
                     progress):
    n_chunks = -(-pred.shape[0] // rows)
    show_progress = progress and n_chunks >= PROGRESS_MIN_CHUNKS
    with _OutputFile(grad_path) as grad_file, _OutputFile(loss_path) as loss_file, \
            _ProgressBar(pred.shape[0], show_progress) as bar:
        total, normaliser, count, pieces = _call_chunks(
            plan, pred, target, reduction, rows, grad_file, loss_file, bar
        )
        result = {"n": count, "chunks": n_chunks}
        if reduction == "none":
            result["loss"] = None if loss_path is not None else np.concatenate(pieces)
            return result

        loss, scale = _combine(plan, total, normaliser, reduction)
        dtype = compute_dtype(pred.dtype)
        if grad_file.array is not None and scale != 1.0:
            _rescale(grad_file.array, dtype.type(scale), rows)
    weighted = plan.chunked.get("weight") is not None or plan.class_weight is not None
    if weighted and plan.kind != ELEMENTWISE_PLAIN_MEAN:
        result["weight_sum"] = normaliser
    result["loss"] = dtype.type(loss)
    return result


def _call_chunks(plan, pred, target, reduction, rows, grad_file, loss_file, bar):
    """Call the loss on each chunk and return the float64 sums and the pieces.

    The pieces are the per-element losses of ``"none"`` when they are not
    written to a file.
    """
    chunk_reduction = "none" if reduction == "none" else "sum"
    names = list(plan.chunked)
    arrays = [pred, target] + [plan.chunked[name] for name in names]
    if grad_file.path is not None:
        grad_file.create(pred.shape, compute_dtype(pred.dtype))

    total = 0.0
    normaliser = 0.0
    count = 0
    pieces = []
    for start, stop, chunks in fio.iter_chunks(arrays, rows):
        p, t = chunks[0], chunks[1]
        keywords = dict(plan.fixed)
        keywords.update(zip(names, chunks[2:]))
        if grad_file.array is not None:
            value = plan.func(p, t, reduction=chunk_reduction, return_grad=True,
                              grad_out=grad_file.array[start:stop], **keywords)[0]
        else:
            value = plan.func(p, t, reduction=chunk_reduction, **keywords)

        if reduction == "none" and loss_file.path is not None:
            if loss_file.array is None:
                loss_file.create((pred.shape[0],) + value.shape[1:], value.dtype)
            loss_file.array[start:stop] = value
        elif reduction == "none":
            pieces.append(value)
        else:
            total += float(value)
            normaliser += plan.normaliser(t, keywords)
        count += plan.count(t)
        bar.update(stop - start)
    return total, normaliser, count, pieces


def _combine(plan, total, normaliser, reduction):
    """Return the reduced loss and the factor that turns chunk grads into its grad."""
    if reduction == "sum":
        loss, scale = total, 1.0
    elif normaliser == 0.0:
        # A mean over nothing: nan, and an all-zero gradient.
        return math.nan, 0.0
    else:
        loss, scale = total / normaliser, 1.0 / normaliser
    if plan.kind == ROOT_MEAN_SQUARE:
        # d sqrt(m) / dp = (dm / dp) / (2 sqrt(m)); the grad is 0 at zero error.
        loss = math.sqrt(loss) if loss >= 0.0 else math.nan
        scale = 0.0 if loss == 0.0 else scale / (2.0 * loss)
    return loss, scale


def _rescale(array, scale, rows):
    for start in range(0, array.shape[0], rows):
        array[start : start + rows] *= scale


class _OutputFile:
    """An ``.npy`` memory map that replaces ``path`` only on success.

    ``create`` writes the array to a temporary file beside ``path``, which is
    moved onto ``path`` when the ``with`` block ends without an exception and
    removed otherwise, so a failed run leaves any earlier file untouched.
    With ``path=None`` nothing is written and ``array`` stays None.
    """

    def __init__(self, path):
        self.path = path
        self.array = None
        self._temporary = None

    def __enter__(self):
        return self

    def create(self, shape, dtype):
        directory, base = os.path.split(os.path.abspath(self.path))
        self._temporary = os.path.join(directory, f".{base}.{os.getpid()}.partial")
        self.array = open_memmap(self._temporary, mode="w+", dtype=dtype,
                                 shape=shape)
        return self.array

    def __exit__(self, exc_type, exc, tb):
        if self._temporary is None:
            return False
        self.array.flush()
        # Drop the memory map before moving the file: Windows cannot rename
        # or delete a file that is still mapped.
        self.array = None
        if exc_type is None:
            os.replace(self._temporary, self.path)
            return False
        try:
            os.unlink(self._temporary)
        except OSError:
            # NOTE: on Windows the traceback of the pending exception can
            # still reference the map, which leaves the temporary file behind.
            pass
        return False


class _ProgressBar:
    """A tqdm bar on stderr when ``enabled``, otherwise a no-op."""

    def __init__(self, total, enabled):
        self.total = total
        self.enabled = enabled
        self._bar = None

    def __enter__(self):
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, unit="row", leave=False,
                             dynamic_ncols=True)
        return self

    def update(self, n):
        if self._bar is not None:
            self._bar.update(n)

    def __exit__(self, exc_type, exc, tb):
        if self._bar is not None:
            self._bar.close()
        return False
