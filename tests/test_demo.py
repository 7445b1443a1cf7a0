"""Tests of the segmentation section of ``fastloss demo``."""

import importlib.resources

import numpy as np
import pytest

from fastloss import cli, demo


@pytest.fixture(scope="module")
def section_lines():
    """Return the lines that the segmentation section writes, run once."""
    pytest.importorskip("skimage")
    (section,) = [s for s in demo.SECTIONS if s.title.startswith("Segmentation")]
    lines = []

    def write(line=""):
        lines.append(line)

    section.write_section(write)
    return lines


def _table_after(lines, header):
    """Return the split rows under the line whose words are ``header``."""
    (start,) = [i for i, line in enumerate(lines) if line.split() == header]
    rows = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def _synthetic_problem(rng, n_classes=3, height=6, width=7, n_features=4):
    features = rng.standard_normal((n_features, height * width))
    labels = rng.integers(0, n_classes, (height, width))
    return features, labels


# --- the bundled image and the label rule ------------------------------------


def test_coins_image_ships_with_scikit_image():
    skimage = pytest.importorskip("skimage")
    from skimage import io
    from skimage.data import coins

    path = importlib.resources.files("skimage") / "data" / "coins.png"

    assert path.is_file(), (
        f"{path} is missing from scikit-image {skimage.__version__}")
    np.testing.assert_array_equal(coins(), io.imread(str(path)))


def test_coin_labels_rule():
    pytest.importorskip("skimage")
    from scipy import ndimage
    from skimage.data import coins

    image = coins()
    labels = demo.coin_labels(image)

    assert labels.dtype == np.int64
    assert labels.shape == image.shape
    assert set(np.unique(labels)) == {0, 1, 2}
    _, n_coins = ndimage.label(labels > 0)
    assert n_coins == 24
    # The rim is the coin pixels within RIM_WIDTH of the background, by
    # chessboard distance. The distance transform is 1 next to the background.
    distance = ndimage.distance_transform_cdt(labels > 0, metric="chessboard")
    assert np.all(distance[labels == 2] <= demo.RIM_WIDTH)
    assert np.all(distance[labels == 1] > demo.RIM_WIDTH)
    assert np.all(distance[labels == 0] == 0)


def test_pixel_features_standardized():
    pytest.importorskip("skimage")
    from skimage.data import coins

    image = coins()
    names, features = demo.pixel_features(image)

    assert len(names) == 5
    assert len(set(names)) == 5
    assert features.shape == (5, image.size)
    assert features.dtype == np.float64
    np.testing.assert_allclose(features.mean(axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(features.std(axis=1), 1.0, rtol=1e-12)


# --- scores, gradients and the fit -------------------------------------------


def test_segmentation_scores_by_hand():
    predicted = np.array([[0, 0, 1], [1, 1, 0]])
    labels = np.array([[0, 1, 1], [1, 0, 0]])

    accuracy, iou, dice = demo.segmentation_scores(predicted, labels, 3)

    # Class 0: predicted at 3 pixels, true at 3, both at 2.
    # Class 1: predicted at 3 pixels, true at 3, both at 2.
    # Class 2: absent from both.
    assert accuracy == pytest.approx(4 / 6)
    np.testing.assert_allclose(iou[:2], [2 / 4, 2 / 4])
    np.testing.assert_allclose(dice[:2], [4 / 6, 4 / 6])
    assert np.isnan(iou[2])
    assert np.isnan(dice[2])


def test_segmentation_scores_perfect():
    labels = np.array([[0, 2], [2, 1]])

    accuracy, iou, dice = demo.segmentation_scores(labels, labels, 3)

    assert accuracy == 1.0
    np.testing.assert_array_equal(iou, 1.0)
    np.testing.assert_array_equal(dice, 1.0)


def _reference_loss(weights, bias, features, labels):
    """Return cross-entropy plus multiclass soft Dice, in float64 NumPy."""
    n_classes = weights.shape[0]
    scores = weights @ features + bias[:, None]
    scores = scores - scores.max(axis=0)
    log_p = scores - np.log(np.exp(scores).sum(axis=0))
    onehot = np.eye(n_classes)[labels.ravel()].T
    ce = -np.mean(np.sum(onehot * log_p, axis=0))

    p = np.exp(log_p)
    intersection = np.sum(p * onehot, axis=1)
    cardinality = np.sum(p, axis=1) + np.sum(onehot, axis=1)
    # A class absent from the target contributes 0.
    present = onehot.sum(axis=1) > 0
    dice_per_class = np.where(present, 1.0 - 2.0 * intersection / cardinality, 0.0)
    return ce + np.mean(dice_per_class)


def test_segmenter_loss_matches_reference(rng):
    features, labels = _synthetic_problem(rng)
    weights = rng.standard_normal((3, features.shape[0]))
    bias = rng.standard_normal(3)

    ce, dice, _, _, logits = demo.segmenter_loss_grad(weights, bias, features, labels)

    assert logits.shape == (1, 3) + labels.shape
    np.testing.assert_allclose(float(ce) + float(dice),
                               _reference_loss(weights, bias, features, labels),
                               rtol=1e-12)


def test_segmenter_gradient_finite_differences(rng):
    features, labels = _synthetic_problem(rng)
    weights = rng.standard_normal((3, features.shape[0]))
    bias = rng.standard_normal(3)
    h = 1e-5

    _, _, weight_grad, bias_grad, _ = demo.segmenter_loss_grad(
        weights, bias, features, labels)

    def loss(w, b):
        ce, dice, _, _, _ = demo.segmenter_loss_grad(w, b, features, labels)
        return float(ce) + float(dice)

    numeric_weight_grad = np.empty_like(weights)
    for index in np.ndindex(weights.shape):
        step = np.zeros_like(weights)
        step[index] = h
        numeric_weight_grad[index] = (
            loss(weights + step, bias) - loss(weights - step, bias)) / (2 * h)
    numeric_bias_grad = np.empty_like(bias)
    for c in range(3):
        step = np.zeros_like(bias)
        step[c] = h
        numeric_bias_grad[c] = (
            loss(weights, bias + step) - loss(weights, bias - step)) / (2 * h)

    np.testing.assert_allclose(weight_grad, numeric_weight_grad, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(bias_grad, numeric_bias_grad, rtol=1e-6, atol=1e-9)


def test_fit_softmax_segmenter_synthetic(rng):
    # Labels that a linear model can separate: the argmax of fixed scores.
    features, _ = _synthetic_problem(rng, height=20, width=30)
    true_weights = 3.0 * rng.standard_normal((3, features.shape[0]))
    labels = np.argmax(true_weights @ features, axis=0).reshape(20, 30)

    weights, bias, logits, history = demo.fit_softmax_segmenter(
        features, labels, 3, steps=60, learning_rate=5.0, report_every=20, seed=1)

    assert [row[0] for row in history] == [0, 20, 40, 60]
    ce = [row[1] for row in history]
    dice = [row[2] for row in history]
    assert all(later < earlier for earlier, later in zip(ce, ce[1:])), ce
    assert all(later < earlier for earlier, later in zip(dice, dice[1:])), dice
    assert history[-1][3] > 0.9
    assert weights.shape == (3, features.shape[0])
    assert bias.shape == (3,)
    assert logits.shape == (1, 3, 20, 30)


def test_fit_softmax_segmenter_seeded(rng):
    features, labels = _synthetic_problem(rng)

    first = demo.fit_softmax_segmenter(features, labels, 3, 5, 1.0, 5, seed=7)
    second = demo.fit_softmax_segmenter(features, labels, 3, 5, 1.0, 5, seed=7)
    other = demo.fit_softmax_segmenter(features, labels, 3, 5, 1.0, 5, seed=8)

    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[3] == second[3]
    assert not np.array_equal(first[0], other[0])


# --- the section as the demo prints it ---------------------------------------


def test_segmentation_section_loss_goes_down(section_lines):
    text = "\n".join(section_lines)
    rows = _table_after(section_lines, ["step", "cross-entropy", "dice", "loss",
                                        "pixel", "acc", "mean", "IoU"])
    steps = [int(row[0]) for row in rows]
    ce = [float(row[1]) for row in rows]
    dice = [float(row[2]) for row in rows]
    accuracy = [float(row[3]) for row in rows]
    mean_iou = [float(row[4]) for row in rows]

    assert "coins image: 303 x 384 pixels" in text
    assert "1x3x303x384" in text
    assert steps == list(range(0, demo.SEG_FIT_STEPS + 1, demo.SEG_REPORT_EVERY))
    assert all(later < earlier for earlier, later in zip(ce, ce[1:])), ce
    assert all(later < earlier for earlier, later in zip(dice, dice[1:])), dice
    assert ce[-1] < 0.5 * ce[0]
    assert dice[-1] < 0.5 * dice[0]
    assert accuracy[-1] > 0.9
    assert mean_iou[-1] > mean_iou[0]


def test_segmentation_section_final_scores(section_lines):
    rows = _table_after(section_lines, ["class", "soft", "Dice", "Dice", "IoU"])

    assert [row[0] for row in rows] == list(demo.COIN_CLASSES)
    for row in rows:
        values = [float(value) for value in row[1:]]
        assert len(values) == 3
        assert all(0.5 < value <= 1.0 for value in values), row


def test_segmentation_section_class_counts(section_lines):
    from skimage.data import coins

    labels = demo.coin_labels(coins())
    rows = _table_after(section_lines, ["class", "pixels", "share"])

    assert [row[0] for row in rows] == list(demo.COIN_CLASSES)
    assert [int(row[1]) for row in rows] == np.bincount(labels.ravel()).tolist()


def test_demo_without_scikit_image(capsys, monkeypatch):
    real_find_spec = demo.importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "skimage" else real_find_spec(name, *args)

    monkeypatch.setattr(demo.importlib.util, "find_spec", find_spec)

    status = cli.main(["demo"])
    out, err = capsys.readouterr()

    assert status == 2
    assert out == ""
    assert err.startswith("fastloss: error: fastloss demo needs skimage,")
    assert 'pip install "fastloss[demo]"' in err
    assert "Traceback" not in err


def test_demo_without_both_libraries(capsys, monkeypatch):
    real_find_spec = demo.importlib.util.find_spec

    def find_spec(name, *args):
        if name in ("skimage", "sklearn"):
            return None
        return real_find_spec(name, *args)

    monkeypatch.setattr(demo.importlib.util, "find_spec", find_spec)

    status = cli.main(["demo"])
    out, err = capsys.readouterr()

    assert status == 2
    assert out == ""
    assert err.startswith(
        "fastloss: error: fastloss demo needs skimage, sklearn, which are not"
        " installed:")
    assert 'pip install "fastloss[demo]"' in err
