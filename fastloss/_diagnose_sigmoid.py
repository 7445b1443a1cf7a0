"""The checks of ``diagnose`` for the sigmoid losses.

They cover ``binary_cross_entropy_with_logits`` and the overlap losses on
logits with one class channel.
"""

import math

import numpy as np

from ._diagnose_common import (
    LOSS_FACTOR,
    LOSS_MARGIN,
    MAJORITY,
    MIN_BALANCE_POSITIONS,
    OVERLAP_LOSSES,
    RARE_CLASS_FRACTION,
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
from ._validation import as_2d_views

_stats = _load_kernels("_stats")


def diagnose_sigmoid(report, logits, target, axis, n_threads):
    """Add the findings and statistics of a sigmoid loss to ``report``.

    The loss is ``binary_cross_entropy_with_logits``, or an overlap loss on
    one class channel, which is read in its ``mode="binary"``.
    """
    stats = report.stats
    shape = logits.shape
    binary_overlap = report.loss_name in OVERLAP_LOSSES
    if binary_overlap:
        report.add(
            "binary-mode",
            "info",
            f"the logits have 1 class channel along axis {axis}, so this report"
            f" reads {report.loss_name} in mode='binary' (a sigmoid per"
            " position). In mode='multiclass' the softmax over one channel is 1"
            " everywhere and the loss does not train.",
            f"call {report.loss_name} with mode='binary'.",
        )
        if target.shape == shape_without_axis(shape, axis):
            target = np.expand_dims(target, axis)
    if target.shape != shape:
        index_shape = shape_without_axis(shape, axis)
        if target.shape == index_shape and target.dtype.kind in "iu":
            n_classes = shape[axis]
            fix = (
                f"one-hot encode it: np.moveaxis(np.eye({n_classes},"
                f" dtype=np.float32)[target], -1, {axis}), or use cross_entropy"
                " for single-label classes."
            )
            message = (
                f"target shape {target.shape} is the class-index shape of logits"
                f" {shape}, but binary_cross_entropy_with_logits needs a 0/1"
                f" target of the logits' own shape."
            )
        else:
            fix = "pass a target of the logits' shape; no broadcasting is done."
            message = (
                f"target shape {target.shape} does not match logits shape {shape};"
                f" {report.loss_name} needs the same shape."
            )
        report.add("target-shape-mismatch", "error", message, fix)
        t = np.zeros(shape, dtype=logits.dtype)
        has_target = False
    else:
        t = target.astype(logits.dtype, copy=False)
        has_target = True

    x2, t2 = as_2d_views([logits, t])
    counts, sums, extrema, hist_pred, hist_target = _stats.sigmoid_stats(x2, t2, n_threads)
    k = dict(zip(_stats.COUNT_FIELDS, (int(c) for c in counts)))
    s = dict(zip(_stats.SUM_FIELDS, (float(v) for v in sums)))
    e = dict(zip(_stats.EXTREMA_FIELDS, (float(v) for v in extrema)))

    n = logits.size
    n_loss = k["n_loss_positions"]
    stats["n_classes"] = 2
    stats["uniform_loss"] = math.log(2)
    stats["target_kind"] = "probabilities" if has_target else "unusable"
    if has_target and n_loss:
        stats["loss"] = s["loss_sum"] / n_loss
        stats["grad_norm"] = math.sqrt(s["grad_sq_sum"]) / n_loss
        stats["grad_rms"] = math.sqrt(s["grad_sq_sum"] / n_loss)
    else:
        stats["loss"] = stats["grad_norm"] = stats["grad_rms"] = None
    fill_logit_stats(stats, k, s, e)
    stats["n_positions"] = n
    stats["n_nonfinite_target"] = k["n_nonfinite_target"] if has_target else 0
    stats["probability_like_fraction"] = ratio(k["n_logits_in_01"], k["n_finite_logits"])
    stats["target_class_frequencies"] = frequencies(hist_target) if has_target else None
    stats["predicted_class_frequencies"] = frequencies(hist_pred)

    if n == 0:
        report.add(
            "empty-batch",
            "error",
            f"logits have shape {shape} and hold no values, so there is nothing"
            " to compute a loss on.",
            "check the data loader: the batch is empty.",
        )
        return
    check_nonfinite_logits(report, logits, k, neginf_is_error=True)
    n_finite = k["n_finite_logits"]
    if n_finite and k["n_logits_in_01"] / n_finite >= MAJORITY and n_finite >= 2:
        n_in = k["n_logits_in_01"]
        report.add(
            "probabilities-as-logits",
            "error",
            f"{n_in} of {n_finite} logits ({pct(n_in / n_finite)}) lie"
            " strictly between 0 and 1: they look like sigmoid probabilities, and"
            f" {report.loss_name} applies a sigmoid again.",
            "pass the raw scores from before the final sigmoid.",
        )
    if not has_target:
        return
    if k["n_nonfinite_target"]:
        finite = np.isfinite(t)
        add_nonfinite_target(report, t, finite, k["n_nonfinite_target"])
    if k["n_target_outside_01"]:
        n_out = k["n_target_outside_01"]
        fix = "pass targets in [0, 1]."
        if e["target_max"] == 255:
            fix = "divide the mask by 255: a 0/255 mask is not a 0/1 target."
        report.add(
            "target-not-probabilities",
            "error",
            f"{n_out} of {n} target values lie outside [0, 1] (min"
            f" {num(e['target_min'])}, max {num(e['target_max'])}).",
            fix,
        )
        return
    n_target = int(hist_target.sum())
    if n_target >= MIN_BALANCE_POSITIONS:
        pos = hist_target[1] / n_target
        if pos < RARE_CLASS_FRACTION or pos > 1 - RARE_CLASS_FRACTION:
            n_pos = int(hist_target[1])
            n_neg = int(hist_target[0])
            suggestion = (
                f"pass pos_weight={n_neg / n_pos:.4g} (negatives per positive)"
                if n_pos
                else "check the mask: no position is positive"
            )
            report.add(
                "class-imbalance",
                "info" if binary_overlap else "warning",
                f"{n_pos} of {n_target} targets ({pct(pos)}) are positive"
                f" (above 0.5) and {n_neg} negative.",
                f"{suggestion}, or use dice_loss or sigmoid_focal_loss.",
            )
    if binary_overlap:
        # The cross-entropy checks below do not apply to an overlap loss.
        return
    mean_loss = stats["loss"]
    if mean_loss is not None and mean_loss > LOSS_FACTOR * math.log(2) + LOSS_MARGIN:
        report.add(
            "loss-above-uniform",
            "warning",
            f"the mean sigmoid cross-entropy is {num(mean_loss)},"
            f" {num(mean_loss / math.log(2))} times ln(2) = {num(math.log(2))},"
            " the loss of predicting 0.5 everywhere, with logits spanning"
            f" [{num(e['logit_min'])}, {num(e['logit_max'])}]: the model is"
            " saturated and over-confident.",
            "lower the learning rate, check that the targets belong to these"
            " logits, or scale the logits down.",
        )
    grad_rms = stats["grad_rms"]
    if grad_rms is not None and grad_rms < VANISHING_GRAD_RMS:
        report.add(
            "vanishing-gradient",
            "warning",
            f"the gradient is vanishing: its norm is {num(stats['grad_norm'])}"
            f" and its RMS per element {num(grad_rms)} (below"
            f" {VANISHING_GRAD_RMS:g}), with logits spanning"
            f" [{num(e['logit_min'])}, {num(e['logit_max'])}].",
            "if the model fits this batch on purpose nothing is wrong;"
            " otherwise scale the logits down.",
        )
