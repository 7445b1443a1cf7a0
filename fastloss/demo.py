"""The ``fastloss demo`` report, built from data sets that packages ship.

The demo downloads nothing: every section reads data that an installed
package bundles. The report is a list of ``DemoSection`` objects in
``SECTIONS``. Each declares the modules it imports and writes its own part
of the report, so a new section is one function and one entry in the list.
"""

import importlib.util
import inspect
import textwrap
from dataclasses import dataclass
from typing import Callable

import numpy as np

import fastloss
from fastloss._kernels._openmp import max_threads

__all__ = ["DemoSection", "MissingDependencyError", "SECTIONS", "run"]

INSTALL_HINT = 'pip install "fastloss[demo]"'


class MissingDependencyError(ImportError):
    """A module that a demo section needs is not installed."""


@dataclass(frozen=True)
class DemoSection:
    """One part of the demo report.

    ``write_section(write)`` prints the section through ``write``, a
    function that takes one line of text. ``requires`` lists the importable
    module names the section needs.
    """

    title: str
    requires: tuple
    write_section: Callable


def run(stream):
    """Write the demo report for every section in ``SECTIONS`` to ``stream``.

    Raises MissingDependencyError, naming the modules and the pip command
    that installs them, before any output when a module is missing.
    """
    missing = sorted({
        name
        for section in SECTIONS
        for name in section.requires
        if importlib.util.find_spec(name) is None
    })
    if missing:
        raise MissingDependencyError(
            f"fastloss demo needs {', '.join(missing)}, which is not installed:"
            f" {INSTALL_HINT}"
        )

    def write(line=""):
        print(line, file=stream)

    threads = max_threads()
    openmp = "on" if fastloss.openmp_enabled() else "off"
    write(f"fastloss {fastloss.__version__} demo (OpenMP {openmp},"
          f" {threads} threads available)")
    for section in SECTIONS:
        write()
        write(section.title)
        write("=" * len(section.title))
        section.write_section(write)


# --- regression: the diabetes data set ---------------------------------------

# Gradient-descent settings: the features and the target are standardized, so
# one step size suits every coordinate and Huber's delta of 1.0 is one
# standard deviation of the target.
FIT_STEPS = 300
LEARNING_RATE = 0.2
HUBER_DELTA = 1.0
REPORT_EVERY = 50
TEST_FRACTION = 0.2
SEED = 0


def regression_losses():
    """Return ``(name, function)`` for each regression loss, in ``__all__`` order.

    A regression loss is a public loss whose first parameter is ``pred``;
    the classification losses take ``logits``.
    """
    found = []
    for name in fastloss.__all__:
        func = getattr(fastloss, name, None)
        if not callable(func):
            continue
        try:
            parameters = list(inspect.signature(func).parameters)
        except (TypeError, ValueError):
            continue
        if parameters[:1] == ["pred"] and "reduction" in parameters:
            found.append((name, func))
    return found


def split_train_test(n, test_fraction, seed):
    """Return train and test row indices from a seeded shuffle of ``range(n)``."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def fit_linear_huber(x, y, steps, learning_rate, delta, report_every):
    """Fit ``y ~ x @ w + b`` by gradient descent on ``fastloss.huber_loss``.

    Each step takes the gradient ``g`` with respect to the predictions from
    one fused ``huber_loss(..., return_grad=True)`` call. The chain rule
    through the linear model then gives ``x.T @ g`` for ``w`` and ``sum(g)``
    for ``b``. Returns ``w``, ``b`` and the ``(step, loss)`` pairs logged every
    ``report_every`` steps, the loss being that of the model before the step.
    """
    w = np.zeros(x.shape[1])
    b = 0.0
    history = []
    for step in range(steps + 1):
        loss, g = fastloss.huber_loss(x @ w + b, y, delta=delta, return_grad=True)
        if step % report_every == 0:
            history.append((step, float(loss)))
        if step == steps:
            break
        w -= learning_rate * (x.T @ g)
        b -= learning_rate * float(np.sum(g))
    return w, b, history


def _write_regression(write):
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import LinearRegression

    x, y = load_diabetes(return_X_y=True)
    train, test = split_train_test(len(y), TEST_FRACTION, SEED)
    write(f"scikit-learn's bundled diabetes data: {x.shape[0]} patients,"
          f" {x.shape[1]} features,")
    write(f"target = disease progression after one year ({y.min():.0f} to"
          f" {y.max():.0f}). {len(train)} train / {len(test)} test rows.")

    # Standardize with training statistics only.
    x_mean, x_std = x[train].mean(axis=0), x[train].std(axis=0)
    y_mean, y_std = y[train].mean(), y[train].std()
    xs = (x - x_mean) / x_std
    ys = (y - y_mean) / y_std

    w, b, history = fit_linear_huber(xs[train], ys[train], FIT_STEPS,
                                     LEARNING_RATE, HUBER_DELTA, REPORT_EVERY)
    write()
    write(f"Linear model fitted by {FIT_STEPS} steps of gradient descent"
          f" (step size {LEARNING_RATE})")
    write(f"on huber_loss(delta={HUBER_DELTA}) of the standardized target,"
          " gradients from return_grad=True:")
    write(f"  {'step':>5}  {'train huber':>12}")
    for step, loss in history:
        write(f"  {step:>5}  {loss:>12.6f}")

    fitted = (xs[test] @ w + b) * y_std + y_mean
    baseline = np.full(len(test), y_mean)
    write()
    write("Held-out losses in target units, each with its default keywords,")
    write("against predicting the training mean:")
    write(f"  {'loss':<16} {'fitted':>12} {'train mean':>12}")
    for name, func in regression_losses():
        write(f"  {name:<16} {float(func(fitted, y[test])):>12.4f}"
              f" {float(func(baseline, y[test])):>12.4f}")

    least_squares = LinearRegression().fit(x[train], y[train]).predict(x[test])
    rmse = float(np.sqrt(np.mean((least_squares - y[test]) ** 2)))
    write()
    write("For comparison, scikit-learn's least-squares LinearRegression has"
          f" a held-out RMSE of {rmse:.4f}.")


# --- diagnosis: a broken segmentation pipeline -------------------------------

# The coins photograph's intensities fall into three classes (background,
# coin body, coin highlight), and the toy model scores each pixel by its
# distance to a class's mean intensity, in units of INTENSITY_SCALE.
N_SEGMENTATION_CLASSES = 3
INTENSITY_SCALE = 0.08
REPORT_WIDTH = 78


def _softmax(x, axis):
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def segmentation_batch():
    """Return ``(logits, mask)`` of a two-image batch built from skimage's coins.

    The mask labels each pixel 0, 1 or 2 by multi-Otsu thresholds and marks
    the region borders with 255, as VOC-style masks do. The logits are
    float32 of shape ``(2, 3, 303, 384)``, the mask uint8 of shape
    ``(2, 303, 384)``; the second image is the first mirrored.
    """
    from skimage import data, filters, segmentation

    image = data.coins().astype(np.float64) / 255.0
    thresholds = filters.threshold_multiotsu(image, classes=N_SEGMENTATION_CLASSES)
    labels = np.digitize(image, thresholds)
    mask = labels.astype(np.uint8)
    mask[segmentation.find_boundaries(labels, mode="inner")] = 255

    means = np.array([image[labels == c].mean() for c in range(N_SEGMENTATION_CLASSES)])
    batch = np.stack([image, image[:, ::-1]])
    distance = (batch[:, None] - means[None, :, None, None]) / INTENSITY_SCALE
    logits = (-(distance**2)).astype(np.float32)
    return logits, np.stack([mask, mask[:, ::-1]])


def _write_findings(write, diagnosis):
    for finding in diagnosis.findings:
        write(f"  {finding.severity.upper()} [{finding.code}]")
        for text in (finding.message, "fix: " + finding.fix):
            for line in textwrap.wrap(text, REPORT_WIDTH - 4):
                write(f"    {line}")


def _write_diagnosis(write):
    logits, mask = segmentation_batch()
    n_border = int(np.count_nonzero(mask == 255))
    write(f"A batch of 2 images of scikit-image's coins photograph,"
          f" {N_SEGMENTATION_CLASSES} classes")
    write(f"(background, coin body, coin highlight), with {n_border} border"
          " pixels marked 255.")
    write("The pipeline has two mistakes: the model's output went through a"
          " softmax")
    write("before the loss, and the loss keeps the default ignore_index=-100.")
    write()
    write("fastloss.diagnose(softmax(logits), mask):")
    _write_findings(write, fastloss.diagnose(_softmax(logits, axis=1), mask))

    write()
    fixed = fastloss.diagnose(logits, mask, ignore_index=255)
    loss = fastloss.cross_entropy(logits, mask.astype(np.int64), ignore_index=255)
    verdict = "ok" if fixed.ok else "not ok"
    write("fastloss.diagnose(logits, mask, ignore_index=255), the fixed pipeline:")
    write(f"  {verdict}, findings: {', '.join(fixed.codes) or 'none'}")
    write(f"  cross_entropy = {float(loss):.4f}, against"
          f" ln({N_SEGMENTATION_CLASSES}) = {np.log(N_SEGMENTATION_CLASSES):.4f}"
          " for a uniform prediction")


SECTIONS = [
    DemoSection(
        title="Regression: diabetes progression",
        requires=("sklearn",),
        write_section=_write_regression,
    ),
    DemoSection(
        title="Diagnosis: a broken segmentation pipeline",
        requires=("skimage",),
        write_section=_write_diagnosis,
    ),
]
