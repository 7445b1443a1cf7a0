"""The checks of ``diagnose`` for the softmax losses.

The target is read first (class indices, class probabilities, or a mistake
in its dtype, shape or class axis), then the ``_stats`` kernel gathers the
numbers of the whole batch, and each check turns them into findings.
"""

import math

import numpy as np

from ._diagnose_common import (
    COLLAPSE_FRACTION,
    COLLAPSE_MIN_POSITIONS,
    COLLAPSE_TARGET_SHARE_LIMIT,
    DOMINANT_CLASS_FRACTION,
    LOSS_FACTOR,
    LOSS_MARGIN,
    MAJORITY,
    MAX_LISTED,
    MIN_BALANCE_POSITIONS,
    OVERLAP_LOSSES,
    RARE_CLASS_FRACTION,
    SOFTMAX_LOSSES,
    SUM_TOLERANCE,
    VANISHING_GRAD_RMS,
    add_nonfinite_target,
    check_nonfinite_logits,
    fill_logit_stats,
    frequencies,
    num,
    pct,
    ratio,
    shape_without_axis,
)
from ._kernels import load as _load_kernels
from ._validation import (
    as_array,
    as_float_array,
    as_index_array,
    class_axis_view,
    index_view,
)

_stats = _load_kernels("_stats")


def _axis_name(axis, ndim):
    return "-1" if axis == ndim - 1 and ndim > 1 else str(axis)


def _other_axes_fitting(logits_shape, target_shape, axis):
    """Return the class axes other than ``axis`` whose index shape fits."""
    ndim = len(logits_shape)
    order = [ndim - 1] + list(range(ndim - 1))
    return [
        k
        for k in order
        if k != axis and shape_without_axis(logits_shape, k) == tuple(target_shape)
    ]


def _read_softmax_target(report, logits, target, axis, ignore_index):
    """Decide how the target reads against the logits.

    Returns ``(mode, target, axis)``. The mode is 1 with an int64 index
    target, 2 with a probability target of the logits' dtype, and 0 when the
    target cannot be used. ``axis`` is the class axis that the rest of the
    diagnosis uses, which differs from the requested one when the class axis
    is misplaced.
    """
    shape = logits.shape
    ndim = logits.ndim
    index_shape = shape_without_axis(shape, axis)
    kind = target.dtype.kind
    loss = report.loss_name

    if target.shape == shape and kind == "f":
        return 2, as_float_array(target, "target", logits.dtype), axis

    if target.shape == shape and kind in "biu" and ndim > 1:
        t = target.astype(np.int64, copy=False)
        if t.size and t.min() >= 0 and t.max() <= 1:
            sums = t.sum(axis=axis)
            n_one_hot = int(np.count_nonzero(sums == 1))
            report.add(
                "target-one-hot",
                "error",
                f"target has the logits' shape {shape} and integer dtype"
                f" {target.dtype} with values 0 and 1 only ({n_one_hot} of"
                f" {sums.size} positions hold exactly one 1): a one-hot"
                f" encoding, which {loss} does not take as class indices.",
                f"pass class indices, target.argmax(axis={axis}), or class"
                " probabilities, target.astype(np.float32).",
            )
            return 2, t.astype(logits.dtype), axis

    if target.shape == index_shape:
        return _read_index_target(report, logits, target, axis, ignore_index)

    # The target does not fit the requested class axis: try the others.
    others = _other_axes_fitting(shape, target.shape, axis)
    if others:
        k = others[0]
        report.add(
            "class-axis-misplaced",
            "error",
            f"target shape {target.shape} does not fit logits {shape} with the"
            f" class axis at {axis} (expected {index_shape}), but fits with the"
            f" class axis at {_axis_name(k, ndim)}, where the logits have"
            f" {shape[k]} channels: the data look channels-last. The rest of"
            f" this report reads the class axis at {_axis_name(k, ndim)}.",
            f"pass axis={_axis_name(k, ndim)}, or move the class axis with"
            f" np.moveaxis(logits, {_axis_name(k, ndim)}, {axis}).",
        )
        report.stats["axis"] = k
        return _read_index_target(report, logits, target, k, ignore_index)

    # A length-1 axis in the target, such as an (N, 1, H, W) mask.
    for j, n in enumerate(target.shape):
        if n == 1:
            squeezed = target.shape[:j] + target.shape[j + 1 :]
            if squeezed == index_shape:
                report.add(
                    "target-extra-axis",
                    "error",
                    f"target shape {target.shape} has a length-1 axis {j};"
                    f" without it the shape {squeezed} fits logits {shape}"
                    f" with the class axis at {axis}.",
                    f"pass target.squeeze({j}).",
                )
                return _read_index_target(
                    report, logits, target.reshape(squeezed), axis, ignore_index
                )

    expected = f"class indices of shape {index_shape}"
    if ndim > 1:
        expected += f" or class probabilities of shape {shape}"
    report.add(
        "target-shape-mismatch",
        "error",
        f"target shape {target.shape} fits logits {shape} under no reading:"
        f" with the class axis at {axis} the target must hold {expected}, and"
        " no other class axis fits either.",
        "check that target and logits come from the same batch and the same"
        " spatial size (resize masks with nearest-neighbour interpolation).",
    )
    return 0, None, axis


def _read_index_target(report, logits, target, axis, ignore_index):
    """Check an index-shaped target; return ``(mode, target, axis)``."""
    kind = target.dtype.kind
    if kind in "iu":
        return 1, as_index_array(target, "target"), axis
    if kind == "b":
        report.add(
            "target-not-integer",
            "error",
            f"target has dtype bool; {report.loss_name} takes integer class"
            " indices and rejects booleans.",
            "pass target.astype(np.int64).",
        )
        return 1, target.astype(np.int64), axis

    # A floating target of the index shape.
    finite = np.isfinite(target)
    n_nonfinite = int(target.size - np.count_nonzero(finite))
    if n_nonfinite:
        add_nonfinite_target(report, target, finite, n_nonfinite)
    values = target[finite]
    whole = values == np.round(values)
    n_fractional = int(values.size - np.count_nonzero(whole))
    if n_fractional == 0:
        report.add(
            "target-not-integer",
            "error",
            f"target has dtype {target.dtype} but all {values.size} finite"
            f" values are whole numbers (from {num(values.min(initial=0))}"
            f" to {num(values.max(initial=0))}); {report.loss_name} takes"
            " integer class indices and raises TypeError on a float target"
            " of this shape.",
            "pass target.astype(np.int64).",
        )
        labels = np.where(finite, target, ignore_index).astype(np.int64)
        return 1, labels, axis

    fractional = values[~whole]
    examples = ", ".join(num(v) for v in np.unique(fractional)[:MAX_LISTED])
    in_01 = bool(fractional.min() >= 0 and fractional.max() <= 1)
    report.add(
        "target-not-labels",
        "error",
        f"target has dtype {target.dtype} and the index shape {target.shape},"
        f" but {n_fractional} of {values.size} values"
        f" ({pct(n_fractional / values.size)}) are not whole numbers (such as"
        f" {examples}): neither class indices nor a probability map of the"
        f" logits' shape {logits.shape}. Interpolated resizing or lossy"
        " compression (JPEG) of a label mask produces such values"
        + (" between classes." if not in_01 else ", here all in [0, 1]."),
        "resize masks with nearest-neighbour interpolation (order=0), store"
        " them losslessly (PNG), and pass integer labels"
        " (np.rint(target).astype(np.int64) recovers them when the damage is"
        " small).",
    )
    return 0, None, axis


def _read_weight(report, weight, n_classes):
    """Return class weights as float64 of length C, ones when unusable."""
    ones = np.ones(n_classes, dtype=np.float64)
    if weight is None:
        return ones, False
    w = as_array(weight, "weight")
    if w.shape != (n_classes,):
        report.add(
            "weight-invalid",
            "error",
            f"weight has shape {w.shape}, but the logits have {n_classes}"
            f" classes, so it must have shape ({n_classes},). The statistics"
            " below use unit weights.",
            f"pass one weight per class, an array of shape ({n_classes},).",
        )
        return ones, False
    w = w.astype(np.float64)
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        idx = np.flatnonzero(bad)[:MAX_LISTED]
        listed = ", ".join(f"class {i}: {num(w[i])}" for i in idx)
        report.add(
            "weight-invalid",
            "error",
            f"weight has {int(bad.sum())} negative or non-finite entries"
            f" ({listed}). The statistics below use unit weights.",
            "pass finite, non-negative class weights.",
        )
        return ones, False
    return np.ascontiguousarray(w), True


def diagnose_softmax(report, logits, target, axis, ignore_index, weight, n_threads):
    """Add the findings and statistics of a softmax loss to ``report``."""
    stats = report.stats
    stats["axis"] = axis
    mode, target, axis = _read_softmax_target(report, logits, target, axis, ignore_index)
    n_classes = logits.shape[axis]
    w, weighted = _read_weight(report, weight, n_classes)

    x3, _ = class_axis_view(logits, axis)
    t_index = np.zeros((1, 1), dtype=np.int64)
    t_prob = np.zeros((1, 1, 1), dtype=logits.dtype)
    if mode == 1:
        t_index = index_view(target, axis)
    elif mode == 2:
        t_prob, _ = class_axis_view(target, axis)
    if x3.shape[2] == 1 and x3.shape[0] > 1:
        # Walk (N, C) data as (1, C, N) so that a tile contains many positions.
        x3 = _swap_outer(x3)
        if mode == 1:
            t_index = np.lib.stride_tricks.as_strided(
                t_index, (1, t_index.shape[0]), (0, t_index.strides[0]), writeable=False
            )
        elif mode == 2:
            t_prob = _swap_outer(t_prob)

    counts, sums, extrema, hist_pred, hist_target = _stats.softmax_stats(
        x3, mode, t_index, t_prob, w, ignore_index, SUM_TOLERANCE, n_threads
    )
    k = dict(zip(_stats.COUNT_FIELDS, (int(c) for c in counts)))
    s = dict(zip(_stats.SUM_FIELDS, (float(v) for v in sums)))
    e = dict(zip(_stats.EXTREMA_FIELDS, (float(v) for v in extrema)))
    n_positions = x3.shape[0] * x3.shape[2]
    _fill_stats(stats, logits, mode, n_classes, n_positions, k, s, e,
                hist_pred, hist_target)
    stats["axis"] = axis

    if logits.size == 0:
        report.add(
            "empty-batch",
            "error",
            f"logits have shape {logits.shape} and hold no values, so there is"
            " nothing to compute a loss on.",
            "check the data loader: the batch is empty.",
        )
        return

    check_nonfinite_logits(report, logits, k)
    if mode == 2:
        _check_probability_target(report, logits, target, axis, k, e)
    if mode == 1 and k["n_invalid"]:
        _check_out_of_range(report, target, n_classes, ignore_index, k, hist_target)
    _check_single_channel(report, n_classes)
    _check_probability_logits(report, logits, axis, n_classes, k)
    if mode == 0:
        return
    _check_ignored(report, mode, n_positions, ignore_index, k)
    _check_balance(report, hist_target, k, weighted)
    _check_training_signal(report, n_classes, hist_pred, hist_target, k, e, stats)


def _swap_outer(v):
    """View ``(outer, C, 1)`` as ``(1, C, outer)``."""
    return np.lib.stride_tricks.as_strided(
        v, (1, v.shape[1], v.shape[0]), (0, v.strides[1], v.strides[0]), writeable=False
    )


def _fill_stats(stats, logits, mode, n_classes, n_positions, k, s, e, hist_pred,
                hist_target):
    n_loss = k["n_loss_positions"]
    weight_sum = s["weight_sum"]
    stats["n_classes"] = n_classes
    stats["uniform_loss"] = math.log(n_classes) if n_classes > 0 else None
    stats["target_kind"] = {0: "unusable", 1: "class indices", 2: "probabilities"}[mode]
    if mode and weight_sum > 0:
        stats["loss"] = s["loss_sum"] / weight_sum
        stats["grad_norm"] = math.sqrt(s["grad_sq_sum"]) / weight_sum
        # RMS of the positions' own gradients, free of the 1/N of the mean.
        stats["grad_rms"] = math.sqrt(s["grad_sq_sum"] / n_loss) * n_loss / weight_sum
    else:
        stats["loss"] = None
        stats["grad_norm"] = None
        stats["grad_rms"] = None
    fill_logit_stats(stats, k, s, e)
    n_finite_positions = n_positions - k["n_nonfinite_positions"]
    stats["n_positions"] = n_positions
    stats["n_kept"] = k["n_kept"] if mode else None
    stats["n_ignored"] = k["n_ignored"]
    stats["n_invalid"] = k["n_invalid"]
    stats["n_nonfinite_positions"] = k["n_nonfinite_positions"]
    stats["n_nonfinite_target"] = k["n_nonfinite_target"]
    stats["probability_like_fraction"] = ratio(k["n_probability_like"], n_finite_positions)
    stats["log_probability_like_fraction"] = ratio(
        k["n_log_probability_like"], n_finite_positions
    )
    stats["confident_wrong_fraction"] = ratio(k["n_confident_wrong"], n_loss)
    stats["target_class_frequencies"] = (
        frequencies(hist_target) if mode else None
    )
    stats["predicted_class_frequencies"] = frequencies(hist_pred)


def _check_probability_target(report, logits, target, axis, k, e):
    loss = report.loss_name
    if k["n_nonfinite_target"]:
        finite = np.isfinite(target)
        add_nonfinite_target(report, target, finite, k["n_nonfinite_target"])
    n_rows = k["n_kept"]
    n_out = k["n_target_outside_01"]
    if n_out:
        tmin, tmax = e["target_min"], e["target_max"]
        fix = "pass class probabilities in [0, 1] that sum to 1 along the class axis."
        if tmax == 255:
            fix = "divide the mask by 255, or pass class indices."
        report.add(
            "target-not-probabilities",
            "error",
            f"target is floating with the logits' shape, so it is read as class"
            f" probabilities, but {n_out} of {target.size} values lie outside"
            f" [0, 1] (min {num(tmin)}, max {num(tmax)}).",
            fix,
        )
        return
    if n_rows == 0:
        return
    n_over = k["n_rows_over_1"]
    n_under = k["n_rows_under_1"]
    if n_over + n_under:
        moved = _axis_where_rows_sum_to_one(target, axis)
        if moved is not None:
            n_off = n_over + n_under
            report.add(
                "class-axis-misplaced",
                "error",
                f"the probability target sums to 1 along axis {moved}, not"
                f" along the class axis {axis}, where {n_off} of {n_rows} rows"
                f" sum to between {num(e['row_sum_min'])} and"
                f" {num(e['row_sum_max'])}: the data look channels-last.",
                f"pass axis={_axis_name(moved, logits.ndim)}.",
            )
            return
    if n_over and loss in SOFTMAX_LOSSES and loss not in OVERLAP_LOSSES:
        report.add(
            "multilabel-target",
            "warning",
            f"{n_over} of {n_rows} target rows ({pct(n_over / n_rows)}) sum"
            f" above 1 along axis {axis} (up to {num(e['row_sum_max'])}):"
            f" several classes are on at once, which a softmax loss such as"
            f" {loss} cannot model.",
            "use binary_cross_entropy_with_logits (one sigmoid per class) for"
            " multi-label targets.",
        )
    if n_under and n_under / n_rows >= 0.01:
        report.add(
            "target-rows-not-normalized",
            "warning",
            f"{n_under} of {n_rows} target rows ({pct(n_under / n_rows)}) sum"
            f" below 1 along axis {axis} (down to {num(e['row_sum_min'])}),"
            " so they are not probability distributions.",
            "normalise soft labels along the class axis, and give positions"
            " without a label an ignore_index in an index target.",
        )


def _axis_where_rows_sum_to_one(target, axis):
    """Return another axis along which every row sums to 1, or None."""
    for k in [target.ndim - 1] + list(range(target.ndim - 1)):
        if k == axis or target.shape[k] < 2:
            continue
        with np.errstate(invalid="ignore"):
            sums = target.sum(axis=k, dtype=np.float64)
        if np.all(np.abs(sums - 1) <= SUM_TOLERANCE):
            return k
    return None


def _check_out_of_range(report, target, n_classes, ignore_index, k, hist_target):
    invalid = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    values, value_counts = np.unique(target[invalid], return_counts=True)
    n_invalid = k["n_invalid"]
    listed = ", ".join(
        f"{v} ({c} times)" for v, c in zip(values[:MAX_LISTED], value_counts[:MAX_LISTED])
    )
    if len(values) > MAX_LISTED:
        listed += f" and {len(values) - MAX_LISTED} more values"
    n_labels = n_invalid + k["n_kept"]

    if list(values) == [n_classes] and hist_target[0] == 0 and n_classes > 1:
        report.add(
            "labels-shifted",
            "error",
            f"target labels run from 1 to {n_classes} ({n_invalid} of"
            f" {n_labels} labels are {n_classes}, and class 0 never occurs),"
            f" but the logits have {n_classes} classes numbered 0 to"
            f" {n_classes - 1}: the labels are shifted by one.",
            "pass target - 1 (and shift ignore_index the same way if the mask"
            " has one).",
        )
        return

    message = (
        f"{n_invalid} of {n_labels} target labels ({pct(n_invalid / n_labels)})"
        f" lie outside [0, {n_classes}) and are not ignore_index={ignore_index}:"
        f" {listed}. {report.loss_name} raises ValueError on them."
    )
    if 255 in values:
        fix = (
            "pass ignore_index=255: 255 marks void or border pixels in VOC-style"
            " masks (if 255 marks the object class of a 0/255 binary mask,"
            " divide the mask by 255 instead)."
        )
    else:
        fix = (
            f"map those labels into [0, {n_classes}) or to ignore_index, or"
            " check that the model's class count matches the data set's."
        )
    report.add("target-out-of-range", "error", message, fix)


def _check_single_channel(report, n_classes):
    if n_classes != 1:
        return
    loss = report.loss_name
    fix = (
        "use binary_cross_entropy_with_logits for a one-channel output, or"
        " give the model two output channels."
    )
    report.add(
        "single-class-channel",
        "error",
        f"the logits have 1 class channel, so the softmax is 1 everywhere:"
        f" {loss} then has a constant value and a zero gradient, and the"
        " model learns nothing.",
        fix,
    )


def _check_probability_logits(report, logits, axis, n_classes, k):
    if n_classes < 2:
        return
    n = k["n_nonfinite_positions"]
    n_positions = report.stats["n_positions"]
    n_finite = n_positions - n
    if n_finite == 0:
        return
    n_prob = k["n_probability_like"]
    n_logprob = k["n_log_probability_like"]
    if n_prob / n_finite >= MAJORITY:
        report.add(
            "probabilities-as-logits",
            "error",
            f"at {n_prob} of {n_finite} positions ({pct(n_prob / n_finite)})"
            f" the logits lie in [0, 1] and sum to 1 along axis {axis}: they"
            f" are already softmax probabilities, and {report.loss_name}"
            " applies a softmax again, which squeezes the predictions towards"
            " uniform and shrinks the gradients"
            + _uniform_note(report.stats, n_classes)
            + ".",
            "pass the raw scores from before the final softmax (remove the"
            " softmax layer from the model's output).",
        )
    elif n_logprob / n_finite >= MAJORITY:
        report.add(
            "log-probabilities",
            "info",
            f"at {n_logprob} of {n_finite} positions"
            f" ({pct(n_logprob / n_finite)}) the logits are all <= 0 and"
            f" their log-sum-exp is 0 along axis {axis}: they are"
            " log_softmax output. Since log_softmax is idempotent, the loss"
            " and gradient are the same as on the raw scores.",
            "nothing to fix. Passing the raw scores saves one log_softmax.",
        )
    elif (
        k["n_nonfinite_positions"] == 0
        and report.stats["logits_min"] >= 0.0
        and report.stats["logits_max"] <= 1.0
    ):
        # Logits in [0, 1] are rare enough that the extra NumPy pass over
        # the other axes costs nothing on healthy input.
        moved = _axis_where_rows_sum_to_one(logits, axis)
        if moved is not None:
            report.add(
                "probabilities-as-logits",
                "error",
                f"every logit lies in [0, 1] and they sum to 1 along axis"
                f" {moved}, not along the class axis {axis}: a softmax was"
                f" applied over the wrong axis, and {report.loss_name} applies"
                f" its own over axis {axis}.",
                "pass the raw scores from before the softmax, and check the"
                f" axis of the model's softmax (it ran over axis {moved}).",
            )


def _uniform_note(stats, n_classes):
    """Return a parenthesis comparing the loss with ln(C), or "" without a loss."""
    loss = stats.get("loss")
    if loss is None:
        return ""
    return (
        f" (the mean cross-entropy is {num(loss)}, against"
        f" ln({n_classes}) = {num(math.log(n_classes))} for a uniform prediction)"
    )


def _check_ignored(report, mode, n_positions, ignore_index, k):
    if mode != 1 or n_positions == 0 or k["n_kept"]:
        return
    n_ign, n_inv = k["n_ignored"], k["n_invalid"]
    report.add(
        "all-ignored",
        "error",
        f"none of the {n_positions} positions is kept: {n_ign} are"
        f" ignore_index={ignore_index} and {n_inv} are out of range, so the"
        " mean loss is NaN and the gradient is 0.",
        "check the ignore_index value and the mask encoding; skip batches"
        " without any labelled position.",
    )


def _check_balance(report, hist_target, k, weighted):
    n_kept = int(hist_target.sum())
    n_classes = len(hist_target)
    if n_kept < MIN_BALANCE_POSITIONS or n_classes < 2:
        return
    freq = hist_target / n_kept
    present = np.flatnonzero(hist_target)
    absent = np.flatnonzero(hist_target == 0)
    stats = report.stats
    loss = report.loss_name
    dominant = int(np.argmax(freq))
    rare = [int(c) for c in present if freq[c] < RARE_CLASS_FRACTION]

    if freq[dominant] > DOMINANT_CLASS_FRACTION or rare:
        # Inverse-frequency ("balanced") weights over the present classes,
        # n_kept / (n_present * count); absent classes get the largest.
        weights = np.zeros(n_classes)
        weights[present] = n_kept / (len(present) * hist_target[present])
        weights[absent] = weights[present].max()
        stats["suggested_class_weights"] = [round(float(v), 4) for v in weights]
        parts = []
        if freq[dominant] > DOMINANT_CLASS_FRACTION:
            parts.append(
                f"class {dominant} covers {pct(freq[dominant])} of the"
                f" {n_kept} kept positions ({hist_target[dominant]})"
            )
        if rare:
            listed = ", ".join(
                f"{c} ({pct(freq[c])}, {hist_target[c]} positions)"
                for c in rare[:MAX_LISTED]
            )
            more = f" and {len(rare) - MAX_LISTED} more" if len(rare) > MAX_LISTED else ""
            parts.append(
                f"classes {listed}{more} cover under"
                f" {pct(RARE_CLASS_FRACTION)} each"
            )
        remedy = loss in ("focal_loss",) + OVERLAP_LOSSES or weighted
        weight_text = "[" + ", ".join(f"{v:.4g}" for v in weights) + "]"
        if len(present) == 1:
            fix = (
                f"only class {dominant} occurs in this batch: check that the"
                " sampler mixes classes, and take class weights from the whole"
                " training set, or use dice_loss or focal_loss."
            )
        else:
            fix = (
                f"pass weight=np.array({weight_text}) (inverse class"
                " frequencies of this batch; better, count them over the"
                " whole training set), or use dice_loss or focal_loss."
            )
        report.add(
            "class-imbalance",
            "info" if remedy else "warning",
            "the target is severely imbalanced: " + "; ".join(parts) + ".",
            fix,
        )
    if len(absent) and len(absent) < n_classes:
        listed = ", ".join(str(int(c)) for c in absent[: 2 * MAX_LISTED])
        if len(absent) > 2 * MAX_LISTED:
            listed += f" and {len(absent) - 2 * MAX_LISTED} more"
        report.add(
            "classes-absent",
            "info",
            f"{len(absent)} of {n_classes} classes never occur among the"
            f" {n_kept} kept positions of this batch: {listed}.",
            "nothing to fix if they are rare in the data; otherwise check the"
            " label mapping.",
        )


def _check_training_signal(report, n_classes, hist_pred, hist_target, k, e, stats):
    loss_name = report.loss_name
    mean_loss = stats["loss"]
    if mean_loss is None or n_classes < 2:
        return
    uniform = math.log(n_classes)
    n_loss = k["n_loss_positions"]
    if loss_name not in OVERLAP_LOSSES and mean_loss > LOSS_FACTOR * uniform + LOSS_MARGIN:
        n_wrong = k["n_confident_wrong"]
        report.add(
            "loss-above-uniform",
            "warning",
            f"the mean cross-entropy is {num(mean_loss)}, {num(mean_loss / uniform)}"
            f" times ln({n_classes}) = {num(uniform)}, the loss of a uniform"
            f" prediction; {n_wrong} of {n_loss} positions"
            f" ({pct(n_wrong / n_loss)}) are predicted wrong with a probability"
            f" above 0.99, and the logits span [{num(e['logit_min'])},"
            f" {num(e['logit_max'])}]: the model is saturated and over-confident.",
            "lower the learning rate, check that the labels belong to these"
            " logits, scale the logits down (a temperature, or a smaller init"
            " of the last layer), or use label_smoothing.",
        )

    n_pred = int(hist_pred.sum())
    if n_pred >= COLLAPSE_MIN_POSITIONS:
        top = int(np.argmax(hist_pred))
        share = hist_pred[top] / n_pred
        n_target = int(hist_target.sum())
        target_share = hist_target[top] / n_target if n_target else 0.0
        if share >= COLLAPSE_FRACTION and target_share <= COLLAPSE_TARGET_SHARE_LIMIT:
            constant = stats["logits_std"] == 0.0
            report.add(
                "collapsed-predictions",
                "warning",
                f"class {top} is the predicted class at {hist_pred[top]} of"
                f" {n_pred} positions ({pct(share)}), but only"
                f" {pct(target_share)} of the target is class {top}"
                + (
                    f"; every logit equals {num(stats['logits_mean'])}."
                    if constant
                    else "."
                ),
                "the model has collapsed to one class: check for a dead or"
                " zero-initialised final layer, a too-high learning rate, or"
                " severe imbalance (class weights, focal_loss).",
            )

    grad_rms = stats["grad_rms"]
    if (
        loss_name not in OVERLAP_LOSSES
        and grad_rms is not None
        and grad_rms < VANISHING_GRAD_RMS
    ):
        report.add(
            "vanishing-gradient",
            "warning",
            f"the gradient is vanishing: its norm is {num(stats['grad_norm'])}"
            f" and its RMS per position {num(grad_rms)} (below"
            f" {VANISHING_GRAD_RMS:g}), with logits spanning"
            f" [{num(e['logit_min'])}, {num(e['logit_max'])}]: the softmax is"
            " saturated, so training barely moves.",
            "if the model fits this batch on purpose nothing is wrong;"
            " otherwise scale the logits down or add weight decay, and check"
            " for a logit scale multiplied in by mistake.",
        )
