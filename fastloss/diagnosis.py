"""Find the input mistake behind a loss that is huge or does not go down.

``diagnose(logits, target)`` reads one batch in a small constant number of
passes of the compiled ``_stats`` kernel and returns a ``Diagnosis``. It
contains a list of findings and a dictionary of statistics. Each finding has
a stable code, a severity, a message with the numbers that triggered it and
a fix. Extra passes in NumPy run only on the failure paths, to list the
offending values and positions.
"""

import json
import operator

import numpy as np

from ._diagnose_common import (
    LOSSES,
    OVERLAP_LOSSES,
    SEVERITIES,
    SIGMOID_LOSSES,
    Finding,
    Report,
)
from ._diagnose_sigmoid import diagnose_sigmoid
from ._diagnose_softmax import diagnose_softmax
from ._validation import as_array, as_float_array, normalize_axis, resolve_n_threads

__all__ = ["Diagnosis", "Finding", "diagnose"]


class Diagnosis:
    """The findings and statistics of one ``diagnose`` call.

    ``ok`` is False when any finding is an error or a warning; info findings
    leave it True. ``findings`` are sorted by severity, errors first, and
    ``stats`` is a dict of plain Python numbers, lists and None.
    """

    __slots__ = ("findings", "stats")

    def __init__(self, findings, stats):
        rank = {s: i for i, s in enumerate(SEVERITIES)}
        self.findings = sorted(findings, key=lambda f: rank[f.severity])
        self.stats = stats

    @property
    def ok(self):
        return not any(f.severity in ("error", "warning") for f in self.findings)

    @property
    def codes(self):
        """Codes of the findings, in the order of ``findings``."""
        return [f.code for f in self.findings]

    def has_errors(self):
        """Return True if any finding is an error."""
        return any(f.severity == "error" for f in self.findings)

    def to_dict(self):
        """Return ``{"ok", "findings", "stats"}`` as a JSON-serializable dict."""
        return {
            "ok": self.ok,
            "findings": [f.to_dict() for f in self.findings],
            "stats": self.stats,
        }

    def to_json(self, **kwargs):
        """Return ``to_dict()`` as JSON text; ``kwargs`` go to ``json.dumps``."""
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

    def __str__(self):
        counts = {s: 0 for s in SEVERITIES}
        for f in self.findings:
            counts[f.severity] += 1
        verdict = "ok" if self.ok else "not ok"
        tally = ", ".join([
            _plural(counts["error"], "error"),
            _plural(counts["warning"], "warning"),
            f"{counts['info']} info",
        ])
        lines = [
            f"fastloss diagnosis of {self.stats.get('loss_name')}: {verdict}"
            f" ({tally})"
        ]
        for f in self.findings:
            lines.append(f"{f.severity.upper():7} [{f.code}] {f.message}")
            lines.append(f"        fix: {f.fix}")
        lines.append("stats:")
        for key, value in self.stats.items():
            lines.append(f"  {key}: {_format_stat(value)}")
        return "\n".join(lines)

    def __repr__(self):
        return f"<Diagnosis ok={self.ok} codes={self.codes}>"


def diagnose(
    logits,
    target,
    *,
    loss="cross_entropy",
    axis=1,
    ignore_index=-100,
    weight=None,
    n_threads=None,
):
    """Diagnose the common input mistakes behind a huge or stuck loss.

    Parameters
    ----------
    logits : array_like
        The scores the loss would receive, ``(N, C)``, ``(N, C, d1, ...)``
        with the class axis at ``axis``, or ``(C,)``.
    target : array_like
        The target the loss would receive: class indices, class
        probabilities of the logits' shape, or for
        ``binary_cross_entropy_with_logits`` a 0/1 target of the logits'
        shape.
    loss : str
        The loss the batch is meant for: ``"cross_entropy"``,
        ``"focal_loss"``, ``"dice_loss"``, ``"jaccard_loss"``,
        ``"tversky_loss"`` (all read through a softmax over ``axis``) or
        ``"binary_cross_entropy_with_logits"``.
    axis : int
        The class axis of ``logits`` for the softmax losses. For ``(C,)``
        logits the default ``axis=1`` means axis 0, as in PyTorch.
    ignore_index : int
        Class index whose positions are left out, as in ``cross_entropy``.
    weight : array_like of shape (C,), optional
        Class weights, as in ``cross_entropy``. The sigmoid loss ignores it.
    n_threads : int, optional
        Threads for the statistics kernel; None uses what OpenMP offers. The
        statistics are bit-identical for every count.

    Returns
    -------
    Diagnosis
        ``findings`` with the codes below and ``stats``.

    Raises
    ------
    TypeError
        If ``logits`` or ``target`` is not an array of real numbers, or
        ``loss``, ``axis``, ``ignore_index`` or ``n_threads`` has the wrong
        type.
    ValueError
        If ``loss`` is not a known loss name, ``axis`` is out of bounds,
        ``logits`` is 0-d, or ``n_threads < 1``. A target or weight that does
        not fit the logits is a finding, not an exception.

    Notes
    -----
    Codes, by severity (the severity of a code can depend on ``loss``):

    errors
        ``nonfinite-logits`` (NaN or +inf in the logits; for the sigmoid loss
        -inf as well), ``nonfinite-target``, ``masked-target-class`` (the
        target class has a -inf logit, so the loss is inf),
        ``probabilities-as-logits`` (softmax or sigmoid applied before the
        loss, which applies it again), ``target-out-of-range``,
        ``labels-shifted`` (labels 1..C in place of 0..C-1),
        ``target-not-integer`` (a float or bool target of whole numbers),
        ``target-not-labels`` (a float target of the index shape with
        fractional values), ``target-not-probabilities`` (a probability
        target with values outside [0, 1]), ``target-one-hot`` (an integer
        one-hot target), ``class-axis-misplaced``, ``target-extra-axis``,
        ``target-shape-mismatch``, ``single-class-channel``, ``all-ignored``,
        ``empty-batch``, ``weight-invalid``.
    warnings
        ``multilabel-target`` (probability rows that sum above 1 with a
        softmax loss), ``target-rows-not-normalized``, ``class-imbalance``
        (info for focal and overlap losses, or when ``weight`` is given),
        ``loss-above-uniform``, ``collapsed-predictions``,
        ``vanishing-gradient``.
    info
        ``log-probabilities`` (log_softmax output: the softmax losses give
        the same values on it), ``masked-logits`` (-inf logits that mask
        classes), ``classes-absent``, ``binary-mode`` (an overlap loss on one
        class channel, read in its ``mode="binary"`` with the sigmoid
        checks).

    ``stats["loss"]`` is the mean softmax cross-entropy for the softmax
    losses, whichever of them ``loss`` names, and the mean sigmoid
    cross-entropy for ``binary_cross_entropy_with_logits``; positions with
    non-finite logits or targets are left out of it and counted instead.
    ``stats["grad_norm"]`` is the L2 norm of that mean loss's gradient with
    respect to the logits, and ``stats["grad_rms"]`` the root mean square of
    the positions' own gradients (``grad_norm`` times the square root of the
    position count, for unit weights).

    Examples
    --------
    >>> import numpy as np, fastloss as fl
    >>> logits = np.zeros((2, 3), dtype=np.float32)
    >>> d = fl.diagnose(logits, np.array([0, 3]))
    >>> d.codes
    ['target-out-of-range']
    """
    loss_name = _check_loss(loss)
    logits = as_array(logits, "logits")
    if logits.ndim == 0:
        raise ValueError(
            "logits must have at least 1 dimension (a class axis), got a 0-d array"
        )
    target = as_array(target, "target")
    if logits.ndim == 1 and isinstance(axis, int) and axis == 1:
        # A (C,) input is one sample, as in PyTorch, so the default axis=1
        # means its only axis.
        axis = 0
    axis = normalize_axis(axis, logits.ndim)
    if isinstance(ignore_index, (bool, np.bool_)):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    try:
        ignore_index = operator.index(ignore_index)
    except TypeError:
        raise TypeError(
            f"ignore_index must be an int, got {type(ignore_index).__name__}"
        ) from None
    n_threads = resolve_n_threads(n_threads)
    logits = as_float_array(logits, "logits")

    report = Report(loss_name)
    if loss_name in SIGMOID_LOSSES or (
        loss_name in OVERLAP_LOSSES and logits.shape[axis] == 1
    ):
        diagnose_sigmoid(report, logits, target, axis, n_threads)
    else:
        diagnose_softmax(
            report, logits, target, axis, ignore_index, weight, n_threads
        )
    return Diagnosis(report.findings, report.stats)


def _check_loss(loss):
    if not isinstance(loss, str):
        raise TypeError(f"loss must be a str naming a loss, got {type(loss).__name__}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    return loss


def _plural(n, word):
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _format_stat(value):
    if value is None:
        # A statistic that the input does not define, such as the loss of a
        # batch whose every position is ignored.
        return "n/a"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return "[" + ", ".join(_format_stat(v) for v in value) + "]"
    return str(value)
