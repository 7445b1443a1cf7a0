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
        verb = "is" if len(missing) == 1 else "are"
        raise MissingDependencyError(
            f"fastloss demo needs {', '.join(missing)}, which {verb} not"
            f" installed: {INSTALL_HINT}"
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


# --- segmentation: the coins image -------------------------------------------

# Watershed markers: grey levels below 30 seed the background and above 150
# seed the coins, the thresholds of scikit-image's gallery example
# "Comparing edge-based and region-based segmentation" on the same image.
COIN_BACKGROUND_BELOW = 30
COIN_FOREGROUND_ABOVE = 150
# Connected coin regions smaller than this are specks, not coins, because
# the smallest coin covers more than 1000 pixels.
COIN_MIN_PIXELS = 100
# Coin pixels within this chessboard distance of the background (that many
# 3x3 erosion steps) form the rim class.
RIM_WIDTH = 3
COIN_CLASSES = ("background", "coin", "rim")

# Gaussian scales, in pixels, of the local-mean and gradient features.
FEATURE_SIGMAS = (2.0, 8.0)

# Gradient-descent settings for the softmax model. The features are
# standardized, the cross-entropy is a mean over pixels and the Dice loss a
# ratio of sums over pixels, so one step size suits any image size.
SEG_FIT_STEPS = 60
SEG_LEARNING_RATE = 5.0
SEG_REPORT_EVERY = 10
SEG_INIT_SCALE = 0.01
SEG_SEED = 0


def coin_labels(image):
    """Label each pixel of the coins image as background (0), coin (1) or rim (2).

    A watershed of the Sobel gradient grows markers at grey levels below
    ``COIN_BACKGROUND_BELOW`` (background) and above ``COIN_FOREGROUND_ABOVE``
    (coins). Holes in the coin regions are then filled and connected regions
    of fewer than ``COIN_MIN_PIXELS`` pixels are dropped. Coin pixels that
    ``RIM_WIDTH`` steps of 3x3 binary erosion remove are the rim. Returns an
    int64 array of ``image``'s shape.
    """
    from scipy import ndimage
    from skimage.filters import sobel
    from skimage.segmentation import watershed

    markers = np.zeros(image.shape, dtype=np.int32)
    markers[image < COIN_BACKGROUND_BELOW] = 1
    markers[image > COIN_FOREGROUND_ABOVE] = 2
    regions = watershed(sobel(image), markers)
    coins = ndimage.binary_fill_holes(regions == 2)

    components, _ = ndimage.label(coins)
    keep = np.bincount(components.ravel()) >= COIN_MIN_PIXELS
    keep[0] = False
    coins = keep[components]

    interior = ndimage.binary_erosion(coins, structure=np.ones((3, 3), bool),
                                      iterations=RIM_WIDTH, border_value=1)
    labels = np.zeros(image.shape, dtype=np.int64)
    labels[coins] = 1
    labels[coins & ~interior] = 2
    return labels


def pixel_features(image):
    """Compute standardized per-pixel features of ``image``.

    Returns ``(names, features)``. ``features`` has shape ``(F, H * W)``,
    one row per name: the intensity, its Gaussian local mean at each of
    ``FEATURE_SIGMAS``, the Sobel gradient magnitude, and the Sobel magnitude
    of the image blurred at the first sigma. Each row has mean 0 and standard
    deviation 1 over the image.
    """
    from scipy import ndimage
    from skimage.filters import sobel

    x = image.astype(np.float64) / 255.0
    blurred = ndimage.gaussian_filter(x, FEATURE_SIGMAS[0])
    names = ["intensity"]
    columns = [x]
    for sigma in FEATURE_SIGMAS:
        names.append(f"local mean at sigma {sigma:g}")
        columns.append(blurred if sigma == FEATURE_SIGMAS[0]
                       else ndimage.gaussian_filter(x, sigma))
    names.append("Sobel gradient magnitude")
    columns.append(sobel(x))
    names.append(f"Sobel magnitude at sigma {FEATURE_SIGMAS[0]:g}")
    columns.append(sobel(blurred))

    features = np.stack([column.ravel() for column in columns])
    features -= features.mean(axis=1, keepdims=True)
    features /= features.std(axis=1, keepdims=True)
    return names, features


def segmentation_scores(predicted, labels, n_classes):
    """Compute the pixel accuracy and the per-class IoU and Dice of hard labels.

    ``predicted`` and ``labels`` are integer arrays of the same shape. A
    class absent from both scores an IoU and Dice of ``nan``. Returns
    ``(accuracy, iou, dice)``, the last two of shape ``(n_classes,)``.
    """
    accuracy = float(np.mean(predicted == labels))
    iou = np.empty(n_classes)
    dice = np.empty(n_classes)
    for c in range(n_classes):
        is_predicted = predicted == c
        is_target = labels == c
        overlap = np.count_nonzero(is_predicted & is_target)
        union = np.count_nonzero(is_predicted | is_target)
        total = np.count_nonzero(is_predicted) + np.count_nonzero(is_target)
        iou[c] = overlap / union if union else np.nan
        dice[c] = 2 * overlap / total if total else np.nan
    return accuracy, iou, dice


def segmenter_loss_grad(weights, bias, features, labels):
    """Evaluate the per-pixel softmax model and its loss gradients.

    The logits ``weights @ features + bias`` are viewed as ``(1, C, H, W)``
    for ``labels`` of shape ``(H, W)``, and the loss is ``cross_entropy +
    dice_loss`` (multiclass soft Dice, mean over classes). Both gradients
    with respect to the logits come from ``return_grad=True``. The chain rule
    through the linear model then gives ``g @ features.T`` for the weights
    and the sum of ``g`` over pixels for the bias.

    Returns ``(cross_entropy, dice_loss, weight_grad, bias_grad, logits)``.
    """
    n_classes = weights.shape[0]
    height, width = labels.shape
    target = labels.reshape(1, height, width)
    logits = (weights @ features + bias[:, None]).reshape(
        1, n_classes, height, width)

    ce, ce_grad = fastloss.cross_entropy(logits, target, return_grad=True)
    dice, dice_grad = fastloss.dice_loss(logits, target, return_grad=True)
    grad = (ce_grad + dice_grad).reshape(n_classes, -1)
    return ce, dice, grad @ features.T, grad.sum(axis=1), logits


def fit_softmax_segmenter(features, labels, n_classes, steps, learning_rate,
                          report_every, seed):
    """Fit a per-pixel linear softmax model by gradient descent.

    ``features`` is ``(F, H * W)`` and ``labels`` is ``(H, W)`` of class
    indices. Each step descends on ``cross_entropy + dice_loss`` with the
    gradients of ``segmenter_loss_grad``. The weights start from a normal
    draw of scale ``SEG_INIT_SCALE`` seeded by ``seed``, the bias from 0.

    Returns ``weights``, ``bias``, the final logits and the rows
    ``(step, cross_entropy, dice_loss, pixel_accuracy, mean_iou)`` logged
    every ``report_every`` steps, each for the model before that step.
    """
    rng = np.random.default_rng(seed)
    weights = SEG_INIT_SCALE * rng.standard_normal((n_classes, features.shape[0]))
    bias = np.zeros(n_classes)

    history = []
    for step in range(steps + 1):
        ce, dice, weight_grad, bias_grad, logits = segmenter_loss_grad(
            weights, bias, features, labels)
        if step % report_every == 0:
            predicted = np.argmax(logits[0], axis=0)
            accuracy, iou, _ = segmentation_scores(predicted, labels, n_classes)
            history.append((step, float(ce), float(dice), accuracy,
                            float(np.nanmean(iou))))
        if step == steps:
            break

        weights -= learning_rate * weight_grad
        bias -= learning_rate * bias_grad
    return weights, bias, logits, history


def _write_paragraph(write, text, width=80):
    """Write ``text`` through ``write`` as lines of at most ``width`` characters."""
    for line in textwrap.wrap(text, width):
        write(line)


def _write_segmentation(write):
    from skimage.data import coins

    image = coins()
    labels = coin_labels(image)
    n_classes = len(COIN_CLASSES)
    counts = np.bincount(labels.ravel(), minlength=n_classes)
    height, width = image.shape
    _write_paragraph(
        write,
        f"scikit-image's bundled coins image: {height} x {width} pixels, 8-bit"
        " grey. Labels by rule: a watershed of the Sobel gradient grows markers"
        f" at grey levels below {COIN_BACKGROUND_BELOW} (background) and above"
        f" {COIN_FOREGROUND_ABOVE} (coin), as scikit-image's coins segmentation"
        " example does. Holes are then filled and regions under"
        f" {COIN_MIN_PIXELS} pixels dropped. Coin pixels within {RIM_WIDTH}"
        " pixels (chessboard distance) of the background form the rim class.",
    )
    write(f"  {'class':<12} {'pixels':>8} {'share':>7}")
    for name, count in zip(COIN_CLASSES, counts):
        write(f"  {name:<12} {count:>8} {count / labels.size:>7.1%}")

    names, features = pixel_features(image)
    weights, bias, logits, history = fit_softmax_segmenter(
        features, labels, n_classes, SEG_FIT_STEPS, SEG_LEARNING_RATE,
        SEG_REPORT_EVERY, SEG_SEED)
    write()
    _write_paragraph(
        write,
        f"Linear softmax model with {weights.size + bias.size} parameters over"
        f" {len(names)} standardized per-pixel features: {', '.join(names)}."
        f" It is fitted by {SEG_FIT_STEPS} steps of gradient descent (step size"
        f" {SEG_LEARNING_RATE:g}) on cross_entropy + dice_loss of"
        f" {'x'.join(map(str, logits.shape))} (N, C, H, W) logits, gradients"
        " from return_grad=True:",
    )
    write(f"  {'step':>5}  {'cross-entropy':>13}  {'dice loss':>9}"
          f"  {'pixel acc':>9}  {'mean IoU':>8}")
    for step, ce, dice, accuracy, mean_iou in history:
        write(f"  {step:>5}  {ce:>13.6f}  {dice:>9.6f}  {accuracy:>9.4f}"
              f"  {mean_iou:>8.4f}")

    soft_dice = 1.0 - fastloss.dice_loss(logits, labels[None], reduction="none")
    predicted = np.argmax(logits[0], axis=0)
    _, iou, dice = segmentation_scores(predicted, labels, n_classes)
    write()
    _write_paragraph(
        write,
        "Final per-class scores on the same image. Soft Dice is one minus"
        ' dice_loss(reduction="none") of the logits, and Dice and IoU are'
        " those of the argmax labels:",
    )
    write(f"  {'class':<12} {'soft Dice':>9} {'Dice':>7} {'IoU':>7}")
    for c, name in enumerate(COIN_CLASSES):
        write(f"  {name:<12} {soft_dice[c]:>9.4f} {dice[c]:>7.4f}"
              f" {iou[c]:>7.4f}")


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
        title="Segmentation: coins",
        requires=("skimage", "scipy"),
        write_section=_write_segmentation,
    ),
    DemoSection(
        title="Diagnosis: a broken segmentation pipeline",
        requires=("skimage",),
        write_section=_write_diagnosis,
    ),
]
