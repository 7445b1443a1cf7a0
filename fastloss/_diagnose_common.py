"""Thresholds, the Finding record and helpers shared by the diagnosis checks."""

import math

import numpy as np

SOFTMAX_LOSSES = (
    "cross_entropy",
    "focal_loss",
    "dice_loss",
    "jaccard_loss",
    "tversky_loss",
)
SIGMOID_LOSSES = ("binary_cross_entropy_with_logits",)
OVERLAP_LOSSES = ("dice_loss", "jaccard_loss", "tversky_loss")
LOSSES = SOFTMAX_LOSSES + SIGMOID_LOSSES
SEVERITIES = ("error", "warning", "info")

# Tolerance of the "sums to 1" and "log-sum-exp is 0" checks. A softmax
# output rounded to float16 has a relative error of at most 2**-11 per
# element, so its row sum is within 4.9e-4 of 1 for any class count.
SUM_TOLERANCE = 1e-3

# A check on a per-position property fires when this fraction of the
# positions with finite logits has it. Raw logits almost never lie in [0, 1]
# and sum to 1, so the threshold is far above chance and tolerates a few
# positions that were produced differently.
MAJORITY = 0.9

# Class balance thresholds, as fractions of the kept positions, and the
# number of kept positions below which a batch's balance is not checked.
DOMINANT_CLASS_FRACTION = 0.95
RARE_CLASS_FRACTION = 0.005
MIN_BALANCE_POSITIONS = 100

# The loss is "far above" the uniform-prediction loss ln(C) when it exceeds
# 2 ln(C) + 1. A freshly initialised model sits near ln(C), and random logits
# of unit scale give about ln(C) + 0.5.
LOSS_FACTOR = 2.0
LOSS_MARGIN = 1.0

# Gradient RMS per kept position (the norm of each position's own gradient,
# |softmax - target| for cross-entropy) below which training stalls.
VANISHING_GRAD_RMS = 1e-5

# Predictions "collapse" when one class is predicted at this fraction of the
# positions, while the target gives that class at most TARGET_SHARE_LIMIT.
COLLAPSE_FRACTION = 0.99
COLLAPSE_TARGET_SHARE_LIMIT = 0.9
COLLAPSE_MIN_POSITIONS = 100

# Values and positions listed in a message at most.
MAX_LISTED = 5


class Finding:
    """One detected problem: a stable ``code``, a ``severity``, a ``message``
    with the numbers that triggered it and a ``fix``."""

    __slots__ = ("code", "severity", "message", "fix")

    def __init__(self, code, severity, message, fix):
        if severity not in SEVERITIES:
            raise ValueError(
                f"severity must be one of {', '.join(SEVERITIES)}, got {severity!r}"
            )
        self.code = code
        self.severity = severity
        self.message = message
        self.fix = fix

    def to_dict(self):
        """Return the finding as a JSON-serializable dict."""
        return {
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "fix": self.fix,
        }

    def __eq__(self, other):
        if not isinstance(other, Finding):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"Finding({self.code!r}, {self.severity!r}, {self.message!r})"


class Report:
    """Findings and statistics collected while one batch is diagnosed."""

    def __init__(self, loss_name):
        self.loss_name = loss_name
        self.findings = []
        self.stats = {"loss_name": loss_name}

    def add(self, code, severity, message, fix):
        """Record a finding, its message and fix capitalised as sentences."""
        self.findings.append(
            Finding(code, severity, _capitalize(message), _capitalize(fix))
        )


def _capitalize(text):
    return text[:1].upper() + text[1:]


def fill_logit_stats(stats, k, s, e):
    n = k["n_finite_logits"]
    stats["logits_min"] = e["logit_min"] if n else None
    stats["logits_max"] = e["logit_max"] if n else None
    if n:
        mean = s["logit_sum"] / n
        var = max(s["logit_sq_sum"] / n - mean * mean, 0.0)
        stats["logits_mean"] = mean
        stats["logits_std"] = math.sqrt(var)
    else:
        stats["logits_mean"] = None
        stats["logits_std"] = None
    stats["n_nan_logits"] = k["n_nan_logits"]
    stats["n_posinf_logits"] = k["n_posinf_logits"]
    stats["n_neginf_logits"] = k["n_neginf_logits"]


def check_nonfinite_logits(report, logits, k, neginf_is_error=False):
    n_nan, n_pos, n_neg = k["n_nan_logits"], k["n_posinf_logits"], k["n_neginf_logits"]
    if n_nan or n_pos or (neginf_is_error and n_neg):
        bad = np.isnan(logits) | (logits == np.inf)
        if neginf_is_error:
            bad |= logits == -np.inf
        report.add(
            "nonfinite-logits",
            "error",
            f"logits contain {n_nan} NaN, {n_pos} +inf and {n_neg} -inf values"
            f" out of {logits.size}, first at {positions(bad)}; the loss is"
            " NaN or inf wherever they take part.",
            "find where the model first produces them (a too-high learning"
            " rate, log(0) or division by zero upstream, float16 overflow);"
            " enable np.seterr(all='raise') or torch.autograd.detect_anomaly.",
        )
    elif n_neg and not neginf_is_error:
        n_masked = k["n_masked_target"]
        report.add(
            "masked-logits",
            "info",
            f"logits contain {n_neg} -inf values out of {logits.size}, first at"
            f" {positions(logits == -np.inf)}; they mask their classes out of"
            " the softmax and cost nothing unless the target class is masked.",
            "nothing to fix if the masking is intended.",
        )
        if n_masked:
            report.add(
                "masked-target-class",
                "error",
                f"at {n_masked} kept positions the target class has a -inf"
                " logit, so the loss there is inf and its gradient NaN.",
                "do not mask the target class, or mark those positions with"
                " ignore_index.",
            )


def add_nonfinite_target(report, target, finite, n_nonfinite):
    n_nan = int(np.count_nonzero(np.isnan(target)))
    report.add(
        "nonfinite-target",
        "error",
        f"target contains {n_nonfinite} non-finite values ({n_nan} NaN,"
        f" {n_nonfinite - n_nan} inf) out of {target.size}, first at"
        f" {positions(~finite)}.",
        "fix the target pipeline (a division by a zero sum when normalising"
        " soft labels is a common cause), or mark those positions with"
        " ignore_index.",
    )


def shape_without_axis(shape, axis):
    """Return ``shape`` with ``axis`` removed: the class-index shape."""
    return shape[:axis] + shape[axis + 1 :]


def ratio(a, b):
    return a / b if b else None


def frequencies(hist):
    total = int(hist.sum())
    if total == 0:
        return [0.0] * len(hist)
    return [float(c) / total for c in hist]


def pct(fraction):
    """Format a fraction as a percentage with three significant digits."""
    p = 100.0 * float(fraction)
    if p == 0 or p >= 0.01:
        return f"{p:.3g}%" if p < 100 else "100%"
    return f"{p:.2g}%"


def num(value):
    """Format a number compactly: integers as integers, floats to 4 digits."""
    v = float(value)
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.4g}"


def positions(mask):
    """Return the first MAX_LISTED positions where ``mask`` is set, as text."""
    where = np.argwhere(mask)
    listed = ", ".join(str(tuple(int(i) for i in row)) for row in where[:MAX_LISTED])
    if len(where) > MAX_LISTED:
        listed += ", ..."
    return listed
