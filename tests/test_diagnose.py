import json
import math

import numpy as np
import pytest

import fastloss as fl
from fastloss import Diagnosis, Finding
from conftest import THREAD_COUNTS


def softmax(x, axis):
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x, axis):
    z = x - x.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def finding(diagnosis, code):
    """Return the one finding with ``code``, failing if there is none or more."""
    matches = [f for f in diagnosis.findings if f.code == code]
    assert len(matches) == 1, f"expected one {code!r} finding, got {diagnosis.codes}"
    return matches[0]


def healthy_batch(rng, shape=(4, 5, 8, 8), dtype=np.float32):
    """Return well-scaled random logits and uniformly drawn labels."""
    logits = rng.normal(size=shape).astype(dtype)
    target = rng.integers(0, shape[1], size=shape[:1] + shape[2:])
    return logits, target


def ce_reference(logits, target, axis=1, weight=None, ignore_index=-100):
    """Return float64 mean cross-entropy and its gradient norm, PyTorch style."""
    x = np.moveaxis(np.asarray(logits, dtype=np.float64), axis, -1)
    n_classes = x.shape[-1]
    x = x.reshape(-1, n_classes)
    t = np.asarray(target).reshape(-1)
    w = np.ones(n_classes) if weight is None else np.asarray(weight, dtype=np.float64)
    keep = t != ignore_index
    x, t = x[keep], t[keep]
    lsm = log_softmax(x, axis=1)
    wt = w[t]
    loss = -(wt * lsm[np.arange(len(t)), t]).sum() / wt.sum()
    grad = np.exp(lsm)
    grad[np.arange(len(t)), t] -= 1
    grad *= (wt / wt.sum())[:, None]
    return loss, np.sqrt((grad**2).sum())


# ---------------------------------------------------------------------------
# Findings, one mistake each
# ---------------------------------------------------------------------------


class TestLogitFindings:
    def test_nan_and_inf_logits(self, rng):
        logits, target = healthy_batch(rng)
        logits[0, 1, 2, 3] = np.nan
        logits[1, 0, 0, 0] = np.nan
        logits[2, 4, 7, 7] = np.inf
        d = fl.diagnose(logits, target)
        f = finding(d, "nonfinite-logits")
        assert f.severity == "error"
        assert "2 NaN, 1 +inf and 0 -inf values out of 1280" in f.message
        assert "first at (0, 1, 2, 3), (1, 0, 0, 0), (2, 4, 7, 7)" in f.message
        assert d.stats["n_nan_logits"] == 2
        assert d.stats["n_posinf_logits"] == 1
        assert d.stats["n_nonfinite_positions"] == 3

    def test_masked_logits_are_info(self, rng):
        logits, target = healthy_batch(rng)
        target[...] = 0
        logits[:, 3] = -np.inf
        d = fl.diagnose(logits, target)
        f = finding(d, "masked-logits")
        assert f.severity == "info"
        assert "256 -inf values out of 1280" in f.message
        assert "masked-target-class" not in d.codes
        assert math.isfinite(d.stats["loss"])

    def test_masked_target_class(self, rng):
        logits, target = healthy_batch(rng)
        target[...] = 0
        target[0, 0, :3] = 3
        logits[:, 3] = -np.inf
        d = fl.diagnose(logits, target)
        f = finding(d, "masked-target-class")
        assert f.severity == "error"
        assert "At 3 kept positions" in f.message

    def test_softmax_applied_twice(self, rng):
        raw, target = healthy_batch(rng)
        probs = softmax(raw, axis=1)
        d = fl.diagnose(probs, target)
        f = finding(d, "probabilities-as-logits")
        assert f.severity == "error"
        assert "At 256 of 256 positions (100%)" in f.message
        assert "ln(5) = 1.609" in f.message
        assert d.stats["probability_like_fraction"] == 1.0

    def test_softmax_over_wrong_axis(self, rng):
        raw, target = healthy_batch(rng)
        d = fl.diagnose(softmax(raw, axis=-1), target)
        f = finding(d, "probabilities-as-logits")
        assert "sum to 1 along axis 3, not along the class axis 1" in f.message
        assert "it ran over axis 3" in f.fix

    def test_float16_probabilities(self, rng):
        raw, target = healthy_batch(rng, shape=(2, 40, 4, 4))
        probs = softmax(raw, axis=1).astype(np.float16)
        d = fl.diagnose(probs, target)
        assert "probabilities-as-logits" in d.codes

    def test_log_probabilities_are_info(self, rng):
        raw, target = healthy_batch(rng)
        d = fl.diagnose(log_softmax(raw, axis=1), target)
        f = finding(d, "log-probabilities")
        assert f.severity == "info"
        assert "At 256 of 256 positions (100%)" in f.message
        assert d.ok

    def test_single_class_channel(self, rng):
        logits = rng.normal(size=(4, 1, 8)).astype(np.float32)
        d = fl.diagnose(logits, np.zeros((4, 8), dtype=np.int64))
        f = finding(d, "single-class-channel")
        assert f.severity == "error"
        assert "1 class channel" in f.message
        assert "binary_cross_entropy_with_logits" in f.fix
        assert d.stats["loss"] == 0.0
        assert d.stats["grad_norm"] == 0.0

    def test_one_channel_dice_reads_binary_mode(self, rng):
        logits = rng.normal(size=(4, 1, 8, 8)).astype(np.float32)
        mask = (rng.random((4, 8, 8)) < 0.4).astype(np.int64)
        d = fl.diagnose(logits, mask, loss="dice_loss")
        f = finding(d, "binary-mode")
        assert f.severity == "info"
        assert "mode='binary'" in f.fix
        assert d.ok, str(d)
        assert d.stats["target_class_frequencies"] == [1 - mask.mean(), mask.mean()]

    def test_one_channel_dice_with_0_255_mask(self, rng):
        logits = rng.normal(size=(4, 1, 8, 8)).astype(np.float32)
        mask = np.where(rng.random((4, 8, 8)) < 0.4, 255, 0).astype(np.uint8)
        d = fl.diagnose(logits, mask, loss="dice_loss")
        f = finding(d, "target-not-probabilities")
        assert "Divide the mask by 255" in f.fix


class TestTargetValueFindings:
    def test_void_label_255(self, rng):
        logits, target = healthy_batch(rng, shape=(2, 21, 8, 8))
        target[:, 0, :] = 255
        target[0, 1, 0] = 30
        d = fl.diagnose(logits, target)
        f = finding(d, "target-out-of-range")
        assert f.severity == "error"
        assert "17 of 128 target labels (13.3%)" in f.message
        assert "outside [0, 21)" in f.message
        assert "30 (1 times), 255 (16 times)" in f.message
        assert "ignore_index=255" in f.fix
        assert d.stats["n_invalid"] == 17

    def test_void_label_255_fixed_by_ignore_index(self, rng):
        logits, target = healthy_batch(rng, shape=(2, 21, 8, 8))
        target[:, 0, :] = 255
        d = fl.diagnose(logits, target, ignore_index=255)
        assert "target-out-of-range" not in d.codes
        assert d.stats["n_ignored"] == 16
        assert d.stats["n_kept"] == 112

    def test_negative_labels(self, rng):
        logits, target = healthy_batch(rng)
        target[0, 0, :2] = -1
        d = fl.diagnose(logits, target)
        f = finding(d, "target-out-of-range")
        assert "-1 (2 times)" in f.message
        assert "ignore_index=255" not in f.fix

    def test_labels_shifted_by_one(self, rng):
        logits, target = healthy_batch(rng)
        d = fl.diagnose(logits, target + 1)
        f = finding(d, "labels-shifted")
        assert f.severity == "error"
        n_five = int((target + 1 == 5).sum())
        assert f"{n_five} of 256 labels are 5" in f.message
        assert "from 1 to 5" in f.message
        assert "target - 1" in f.fix
        assert "target-out-of-range" not in d.codes

    def test_float_whole_number_labels(self, rng):
        logits, target = healthy_batch(rng)
        d = fl.diagnose(logits, target.astype(np.float32))
        f = finding(d, "target-not-integer")
        assert f.severity == "error"
        assert "all 256 finite values are whole numbers (from 0 to 4)" in f.message
        assert ".astype(np.int64)" in f.fix
        # The rest of the report reads the converted labels.
        assert d.stats["target_kind"] == "class indices"
        assert d.codes == ["target-not-integer"]

    def test_bool_labels(self, rng):
        logits = rng.normal(size=(16, 2)).astype(np.float32)
        d = fl.diagnose(logits, rng.random(16) < 0.5)
        f = finding(d, "target-not-integer")
        assert "bool" in f.message
        assert ".astype(np.int64)" in f.fix

    def test_interpolated_mask(self, rng):
        logits = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
        mask = np.zeros((8, 8))
        mask[:, 4:] = 2
        # Linear resizing blends the labels 0 and 2 across the edge.
        mask[:, 3] = 0.5
        mask[:, 4] = 1.5
        d = fl.diagnose(logits, mask[None])
        f = finding(d, "target-not-labels")
        assert f.severity == "error"
        assert "16 of 64 values (25%) are not whole numbers" in f.message
        assert "such as 0.5, 1.5" in f.message
        assert "nearest-neighbour" in f.fix
        assert d.stats["loss"] is None

    def test_nan_in_float_labels(self, rng):
        logits, target = healthy_batch(rng)
        t = target.astype(np.float64)
        t[1, 2, 3] = np.nan
        d = fl.diagnose(logits, t)
        f = finding(d, "nonfinite-target")
        assert "1 non-finite values (1 NaN, 0 inf) out of 256" in f.message
        assert "(1, 2, 3)" in f.message

    def test_nan_in_probability_target(self, rng):
        logits, target = healthy_batch(rng)
        probs = softmax(rng.normal(size=logits.shape), axis=1).astype(np.float32)
        probs[0, :, 0, 0] = np.nan
        d = fl.diagnose(logits, probs)
        f = finding(d, "nonfinite-target")
        assert "5 non-finite values (5 NaN, 0 inf) out of 1280" in f.message
        assert "first at (0, 0, 0, 0), (0, 1, 0, 0)" in f.message

    def test_probability_target_outside_unit_interval(self, rng):
        logits, _ = healthy_batch(rng)
        t = np.zeros(logits.shape, dtype=np.float32)
        t[:, 0] = 255.0
        d = fl.diagnose(logits, t)
        f = finding(d, "target-not-probabilities")
        assert f.severity == "error"
        assert "256 of 1280 values lie outside [0, 1] (min 0, max 255)" in f.message
        assert "Divide the mask by 255" in f.fix

    def test_integer_one_hot_target(self, rng):
        logits, target = healthy_batch(rng)
        one_hot = np.moveaxis(np.eye(5, dtype=np.int64)[target], -1, 1)
        d = fl.diagnose(logits, one_hot)
        f = finding(d, "target-one-hot")
        assert "256 of 256 positions hold exactly one 1" in f.message
        assert "argmax(axis=1)" in f.fix
        assert d.stats["target_kind"] == "probabilities"

    def test_multilabel_target(self, rng):
        logits, _ = healthy_batch(rng, shape=(64, 4))
        t = (rng.random((64, 4)) < 0.5).astype(np.float32)
        t[0] = [1, 1, 1, 0]
        d = fl.diagnose(logits, t)
        f = finding(d, "multilabel-target")
        n_over = int((t.sum(1) > 1).sum())
        assert f.severity == "warning"
        assert f"{n_over} of {int((t.sum(1) > -1).sum())} target rows" in f.message
        assert "up to" in f.message
        assert "binary_cross_entropy_with_logits" in f.fix

    def test_rows_not_normalized(self, rng):
        logits, _ = healthy_batch(rng, shape=(50, 3))
        t = softmax(rng.normal(size=(50, 3)), axis=1) * 0.8
        d = fl.diagnose(logits, t)
        f = finding(d, "target-rows-not-normalized")
        assert "50 of 50 target rows (100%) sum below 1" in f.message

    def test_smoothed_labels_are_healthy(self, rng):
        logits, target = healthy_batch(rng, shape=(64, 4))
        t = np.eye(4)[target] * 0.9 + 0.1 / 4
        d = fl.diagnose(logits, t)
        assert d.ok, str(d)


class TestShapeFindings:
    def test_channels_last_with_axis_1(self, rng):
        logits = rng.normal(size=(2, 16, 16, 5)).astype(np.float32)
        target = rng.integers(0, 5, size=(2, 16, 16))
        d = fl.diagnose(logits, target)
        f = finding(d, "class-axis-misplaced")
        assert f.severity == "error"
        assert "Target shape (2, 16, 16)" in f.message
        assert "expected (2, 16, 5)" in f.message
        assert "class axis at -1, where the logits have 5 channels" in f.message
        assert "axis=-1" in f.fix
        # The rest of the report reads the channels-last layout.
        assert d.codes == ["class-axis-misplaced"]
        assert d.stats["axis"] == 3
        assert d.stats["n_classes"] == 5

    def test_channels_last_probability_target(self, rng):
        logits = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
        t = softmax(rng.normal(size=(2, 6, 6, 3)), axis=-1)
        d = fl.diagnose(logits, t)
        f = finding(d, "class-axis-misplaced")
        assert "sums to 1 along axis 3, not along the class axis 1" in f.message
        assert "axis=-1" in f.fix

    def test_channels_last_fixed_by_axis(self, rng):
        logits = rng.normal(size=(2, 16, 16, 5)).astype(np.float32)
        target = rng.integers(0, 5, size=(2, 16, 16))
        d = fl.diagnose(logits, target, axis=-1)
        assert d.ok, str(d)

    def test_target_with_channel_axis(self, rng):
        logits, target = healthy_batch(rng)
        d = fl.diagnose(logits, target[:, None])
        f = finding(d, "target-extra-axis")
        assert "Target shape (4, 1, 8, 8) has a length-1 axis 1" in f.message
        assert "target.squeeze(1)" in f.fix
        assert d.stats["loss"] is not None

    def test_target_shape_mismatch(self, rng):
        logits, _ = healthy_batch(rng)
        d = fl.diagnose(logits, np.zeros((4, 16, 16), dtype=np.int64))
        f = finding(d, "target-shape-mismatch")
        assert f.severity == "error"
        assert "Target shape (4, 16, 16) fits logits (4, 5, 8, 8)" in f.message
        assert "class indices of shape (4, 8, 8)" in f.message
        assert d.stats["loss"] is None
        # The logits are still summarised.
        assert d.stats["logits_std"] > 0

    def test_all_positions_ignored(self, rng):
        logits, target = healthy_batch(rng)
        target[...] = -100
        d = fl.diagnose(logits, target)
        f = finding(d, "all-ignored")
        assert "None of the 256 positions is kept: 256 are ignore_index=-100" in f.message
        assert d.stats["loss"] is None

    def test_empty_batch(self):
        d = fl.diagnose(np.zeros((0, 3), dtype=np.float32), np.zeros(0, dtype=np.int64))
        f = finding(d, "empty-batch")
        assert "(0, 3)" in f.message
        assert d.stats["n_positions"] == 0

    def test_weight_wrong_length(self, rng):
        logits, target = healthy_batch(rng)
        d = fl.diagnose(logits, target, weight=np.ones(4))
        f = finding(d, "weight-invalid")
        assert "shape (4,)" in f.message
        assert "shape (5,)" in f.fix

    def test_negative_weight(self, rng):
        logits, target = healthy_batch(rng)
        d = fl.diagnose(logits, target, weight=[1, 1, -2, 1, np.nan])
        f = finding(d, "weight-invalid")
        assert "2 negative or non-finite entries (class 2: -2, class 4: nan)" in f.message


class TestTrainingFindings:
    def test_severe_imbalance(self, rng):
        logits = rng.normal(size=(4, 3, 50, 50)).astype(np.float32)
        target = np.zeros((4, 50, 50), dtype=np.int64)
        target[:, :2, :] = 1  # 4% of the positions
        target[0, 2, :10] = 2  # 10 of 10000 positions
        d = fl.diagnose(logits, target)
        f = finding(d, "class-imbalance")
        assert f.severity == "warning"
        assert "class 0 covers 95.9% of the 10000 kept positions (9590)" in f.message
        assert "classes 2 (0.1%, 10 positions) cover under 0.5%" in f.message
        expected = [10000 / (3 * 9590), 10000 / (3 * 400), 10000 / (3 * 10)]
        assert d.stats["suggested_class_weights"] == [round(v, 4) for v in expected]
        assert "weight=np.array([0.3476, 8.333, 333.3])" in f.fix
        assert "focal_loss" in f.fix

    def test_imbalance_is_info_for_focal_loss(self, rng):
        logits = rng.normal(size=(1, 2, 100, 100)).astype(np.float32)
        target = np.zeros((1, 100, 100), dtype=np.int64)
        target[0, 0, :20] = 1
        assert finding(fl.diagnose(logits, target), "class-imbalance").severity == "warning"
        d = fl.diagnose(logits, target, loss="focal_loss")
        assert finding(d, "class-imbalance").severity == "info"
        d = fl.diagnose(logits, target, weight=[0.5, 250.0])
        assert finding(d, "class-imbalance").severity == "info"

    def test_absent_classes_are_info(self, rng):
        logits = rng.normal(size=(2, 6, 10, 10)).astype(np.float32)
        target = rng.integers(0, 3, size=(2, 10, 10))
        d = fl.diagnose(logits, target)
        f = finding(d, "classes-absent")
        assert "3 of 6 classes never occur among the 200 kept positions" in f.message
        assert "3, 4, 5" in f.message
        assert d.ok

    def test_saturated_logits(self, rng):
        logits, target = healthy_batch(rng, shape=(64, 10))
        d = fl.diagnose(logits * 50, target)
        f = finding(d, "loss-above-uniform")
        assert f.severity == "warning"
        assert "ln(10) = 2.303" in f.message
        loss, _ = ce_reference(logits * 50, target)
        assert f"cross-entropy is {loss:.4g}" in f.message
        n_wrong = d.stats["confident_wrong_fraction"] * 64
        assert f"{round(n_wrong)} of 64 positions" in f.message

    def test_collapsed_predictions(self, rng):
        logits, target = healthy_batch(rng, shape=(200, 4))
        logits[:, 2] += 20
        d = fl.diagnose(logits, target)
        f = finding(d, "collapsed-predictions")
        share = (target == 2).mean()
        assert "Class 2 is the predicted class at 200 of 200 positions (100%)" in f.message
        assert f"only {100 * share:.3g}% of the target is class 2" in f.message

    def test_constant_logits_collapse(self, rng):
        target = rng.integers(0, 3, size=300)
        d = fl.diagnose(np.zeros((300, 3), dtype=np.float32), target)
        f = finding(d, "collapsed-predictions")
        assert "every logit equals 0" in f.message
        assert d.stats["loss"] == pytest.approx(math.log(3))

    def test_vanishing_gradient(self, rng):
        target = rng.integers(0, 5, size=400)
        logits = 40.0 * np.eye(5)[target]
        d = fl.diagnose(logits, target)
        f = finding(d, "vanishing-gradient")
        assert f.severity == "warning"
        assert f"norm is {d.stats['grad_norm']:.4g}" in f.message
        assert "logits spanning [0, 40]" in f.message


class TestSigmoidFindings:
    def test_healthy(self, rng):
        logits = rng.normal(size=(8, 3, 16)).astype(np.float32)
        target = (rng.random((8, 3, 16)) < 0.4).astype(np.float32)
        d = fl.diagnose(logits, target, loss="binary_cross_entropy_with_logits")
        assert d.ok, str(d)
        x = logits.astype(np.float64)
        ref = np.mean(np.maximum(x, 0) - x * target + np.log1p(np.exp(-np.abs(x))))
        assert d.stats["loss"] == pytest.approx(ref, rel=1e-12)

    def test_zero_logits_are_not_probabilities(self):
        logits = np.zeros((8, 16), dtype=np.float32)
        target = np.tile([0.0, 1.0], (8, 8)).astype(np.float32)
        d = fl.diagnose(logits, target, loss="binary_cross_entropy_with_logits")
        assert d.ok, str(d)
        assert d.stats["loss"] == pytest.approx(math.log(2))

    def test_matches_fastloss_loss(self, rng):
        logits = rng.normal(scale=2, size=(6, 3, 5))
        target = rng.random((6, 3, 5))
        d = fl.diagnose(logits, target, loss="binary_cross_entropy_with_logits")
        loss, grad = fl.binary_cross_entropy_with_logits(logits, target, return_grad=True)
        assert d.stats["loss"] == pytest.approx(float(loss), rel=1e-12)
        assert d.stats["grad_norm"] == pytest.approx(np.linalg.norm(grad), rel=1e-10)

    def test_sigmoid_applied_twice(self, rng):
        logits = 1 / (1 + np.exp(-rng.normal(size=(8, 16))))
        target = (rng.random((8, 16)) < 0.5).astype(np.float64)
        d = fl.diagnose(logits, target, loss="binary_cross_entropy_with_logits")
        f = finding(d, "probabilities-as-logits")
        assert "128 of 128 logits (100%) lie strictly between 0 and 1" in f.message

    def test_mask_in_0_255(self, rng):
        logits = rng.normal(size=(2, 1, 8, 8)).astype(np.float32)
        target = np.where(rng.random((2, 1, 8, 8)) < 0.5, 255, 0).astype(np.uint8)
        d = fl.diagnose(logits, target, loss="binary_cross_entropy_with_logits")
        f = finding(d, "target-not-probabilities")
        n = int((target == 255).sum())
        assert f"{n} of 128 target values lie outside [0, 1] (min 0, max 255)" in f.message
        assert "Divide the mask by 255" in f.fix

    def test_rare_positives(self, rng):
        logits = rng.normal(size=(1, 1, 100, 100)).astype(np.float32)
        target = np.zeros((1, 1, 100, 100), dtype=np.float32)
        target[0, 0, 0, :20] = 1
        d = fl.diagnose(logits, target, loss="binary_cross_entropy_with_logits")
        f = finding(d, "class-imbalance")
        assert "20 of 10000 targets (0.2%) are positive" in f.message
        assert "pos_weight=499" in f.fix

    def test_class_index_target(self, rng):
        logits = rng.normal(size=(4, 3)).astype(np.float32)
        d = fl.diagnose(logits, np.array([0, 2, 1, 1]),
                        loss="binary_cross_entropy_with_logits")
        f = finding(d, "target-shape-mismatch")
        assert "class-index shape of logits (4, 3)" in f.message
        assert "np.eye(3" in f.fix

    def test_nan_logits(self, rng):
        logits = rng.normal(size=(4, 3)).astype(np.float32)
        logits[1, 1] = np.nan
        logits[2, 0] = -np.inf
        target = np.zeros((4, 3), dtype=np.float32)
        d = fl.diagnose(logits, target, loss="binary_cross_entropy_with_logits")
        f = finding(d, "nonfinite-logits")
        assert "1 NaN, 0 +inf and 1 -inf values out of 12" in f.message
        assert "(1, 1), (2, 0)" in f.message


# ---------------------------------------------------------------------------
# No false alarms on healthy input
# ---------------------------------------------------------------------------


class TestHealthyInput:
    @pytest.mark.parametrize(
        "shape, axis",
        [((64, 10), 1), ((4, 5, 8, 8), 1), ((2, 8, 8, 21), -1), ((7,), 0),
         ((3, 4, 5, 6, 7), 1)],
    )
    @pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
    def test_random_logits(self, rng, shape, axis, dtype):
        logits = rng.normal(size=shape).astype(dtype)
        ax = axis % len(shape)
        n_classes = shape[ax]
        index_shape = shape[:ax] + shape[ax + 1 :]
        target = rng.integers(0, n_classes, size=index_shape)
        d = fl.diagnose(logits, target, axis=axis)
        for f in d.findings:
            # A few positions may miss a class by chance; nothing else.
            assert f.code == "classes-absent", str(d)
        assert d.ok

    @pytest.mark.parametrize("layout", ["F", "strided", "reversed", "readonly", "bigendian"])
    def test_layouts_give_same_stats(self, rng, layout):
        logits, target = healthy_batch(rng, shape=(3, 4, 6, 10))
        base = fl.diagnose(logits, target).stats
        if layout == "F":
            x, t = np.asfortranarray(logits), np.asfortranarray(target)
        elif layout == "strided":
            big = np.zeros((3, 8, 6, 20), dtype=np.float32)
            big[:, ::2, :, ::2] = logits
            x, t = big[:, ::2, :, ::2], target
        elif layout == "reversed":
            x = np.ascontiguousarray(logits[:, ::-1])[:, ::-1]
            t = target
        elif layout == "readonly":
            x, t = logits.copy(), target.copy()
            x.flags.writeable = False
            t.flags.writeable = False
        else:
            x, t = logits.astype(">f4"), target.astype(">i8")
        assert fl.diagnose(x, t).stats == base

    def test_zero_stride_batch(self, rng):
        # 400000 positions that share one row of logits, read in place.
        row = np.array([2.0, -1.0, 0.5, 0.0], dtype=np.float32)
        logits = np.broadcast_to(row, (400000, 4))
        target = np.broadcast_to(np.int64(0), (400000,))
        d = fl.diagnose(logits, target)
        expected = np.log(np.exp(row.astype(np.float64)).sum()) - 2.0
        assert d.stats["loss"] == pytest.approx(expected, rel=1e-12)
        assert d.stats["n_kept"] == 400000
        assert "collapsed-predictions" not in d.codes

    def test_concurrent_calls(self, rng):
        from concurrent.futures import ThreadPoolExecutor

        logits, target = healthy_batch(rng, shape=(2, 5, 64, 64))
        expected = fl.diagnose(logits, target).stats
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(lambda _: fl.diagnose(logits, target).stats, range(8)))
        for stats in results:
            assert stats == expected

    def test_fitted_logistic_regression(self):
        sklearn = pytest.importorskip("sklearn")
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import train_test_split

        del sklearn
        X, y = load_digits(return_X_y=True)
        X_train, X_test, y_train, y_test = train_test_split(
            X / 16.0, y, test_size=0.3, random_state=0, stratify=y
        )
        model = LogisticRegression(max_iter=2000).fit(X_train, y_train)
        logits = model.decision_function(X_test)
        d = fl.diagnose(logits, y_test)
        assert d.ok, str(d)
        assert d.findings == []
        proba = model.predict_proba(X_test)
        ref = -np.mean(np.log(proba[np.arange(len(y_test)), y_test]))
        assert d.stats["loss"] == pytest.approx(ref, rel=1e-9)
        assert d.stats["loss"] < d.stats["uniform_loss"]

    def test_realistic_segmentation_batch(self, rng):
        # Eight 64x64 scenes: background, a few rectangular objects of five
        # foreground classes, 255 on the object borders as in VOC masks, and
        # logits of a half-trained model (the true class raised by 2, noise).
        n, n_classes, size = 8, 6, 64
        target = np.zeros((n, size, size), dtype=np.uint8)
        for i in range(n):
            for j in range(3):
                # Round-robin classes: each appears in about five objects.
                c = (3 * i + j) % (n_classes - 1) + 1
                r0, c0 = rng.integers(0, size - 24, size=2)
                h, w = rng.integers(10, 24, size=2)
                target[i, r0 : r0 + h, c0 : c0 + w] = 255
                target[i, r0 + 1 : r0 + h - 1, c0 + 1 : c0 + w - 1] = c
        logits = rng.normal(scale=1.5, size=(n, n_classes, size, size))
        labels = np.where(target == 255, 0, target).astype(np.int64)
        np.put_along_axis(
            logits, labels[:, None], np.take_along_axis(logits, labels[:, None], 1) + 2, 1
        )
        logits = logits.astype(np.float32)
        d = fl.diagnose(logits, target, ignore_index=255)
        assert d.ok, str(d)
        freq = d.stats["target_class_frequencies"]
        assert 0.5 < freq[0] < 0.95
        assert min(freq) > 0.005
        assert d.stats["n_ignored"] == int((target == 255).sum())

    def test_healthy_probability_target(self, rng):
        logits, _ = healthy_batch(rng)
        t = softmax(rng.normal(size=logits.shape), axis=1)
        d = fl.diagnose(logits, t)
        assert d.ok, str(d)

    def test_healthy_overlap_losses(self, rng):
        logits, target = healthy_batch(rng)
        for loss in ("dice_loss", "jaccard_loss", "tversky_loss", "focal_loss"):
            d = fl.diagnose(logits, target, loss=loss)
            assert d.ok, str(d)


# ---------------------------------------------------------------------------
# Statistics against independent references
# ---------------------------------------------------------------------------


class TestStats:
    @pytest.mark.parametrize("dtype", [np.float32, np.float64])
    def test_loss_and_grad_norm(self, rng, dtype):
        logits, target = healthy_batch(rng, shape=(3, 4, 5, 7), dtype=dtype)
        target[0, 0, :3] = -100
        weight = np.array([0.5, 1.0, 2.0, 3.0])
        d = fl.diagnose(logits, target, weight=weight)
        loss, grad_norm = ce_reference(logits, target, weight=weight)
        assert d.stats["loss"] == pytest.approx(loss, rel=1e-12)
        assert d.stats["grad_norm"] == pytest.approx(grad_norm, rel=1e-10)
        assert d.stats["n_ignored"] == 3
        assert d.stats["n_kept"] == 3 * 5 * 7 - 3

    @pytest.mark.parametrize("target_kind", ["index", "probability"])
    def test_matches_fastloss_cross_entropy(self, rng, target_kind):
        logits = rng.normal(size=(3, 4, 5, 7))
        if target_kind == "index":
            target = rng.integers(0, 4, size=(3, 5, 7))
            target[0, 0, :3] = -100
        else:
            target = softmax(rng.normal(size=logits.shape), axis=1)
        weight = np.array([0.5, 1.0, 2.0, 3.0])
        d = fl.diagnose(logits, target, weight=weight)
        loss, grad = fl.cross_entropy(logits, target, weight=weight, return_grad=True)
        assert d.stats["loss"] == pytest.approx(float(loss), rel=1e-12)
        assert d.stats["grad_norm"] == pytest.approx(np.linalg.norm(grad), rel=1e-10)

    def test_torch_cross_entropy(self, rng):
        torch = pytest.importorskip("torch")
        logits, target = healthy_batch(rng, shape=(4, 5, 6, 6), dtype=np.float64)
        d = fl.diagnose(logits, target)
        x = torch.tensor(logits, requires_grad=True)
        loss = torch.nn.functional.cross_entropy(x, torch.tensor(target))
        loss.backward()
        assert d.stats["loss"] == pytest.approx(loss.item(), rel=1e-12)
        assert d.stats["grad_norm"] == pytest.approx(x.grad.norm().item(), rel=1e-10)

    def test_torch_probability_target(self, rng):
        torch = pytest.importorskip("torch")
        logits = rng.normal(size=(6, 4, 5))
        t = softmax(rng.normal(size=(6, 4, 5)), axis=1)
        weight = np.array([1.0, 2.0, 0.5, 1.5])
        d = fl.diagnose(logits, t, weight=weight)
        x = torch.tensor(logits, requires_grad=True)
        loss = torch.nn.functional.cross_entropy(
            x, torch.tensor(t), weight=torch.tensor(weight)
        )
        loss.backward()
        assert d.stats["loss"] == pytest.approx(loss.item(), rel=1e-12)
        assert d.stats["grad_norm"] == pytest.approx(x.grad.norm().item(), rel=1e-10)

    def test_torch_binary_cross_entropy(self, rng):
        torch = pytest.importorskip("torch")
        logits = rng.normal(scale=3, size=(5, 7))
        t = rng.random((5, 7))
        d = fl.diagnose(logits, t, loss="binary_cross_entropy_with_logits")
        x = torch.tensor(logits, requires_grad=True)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x, torch.tensor(t))
        loss.backward()
        assert d.stats["loss"] == pytest.approx(loss.item(), rel=1e-12)
        assert d.stats["grad_norm"] == pytest.approx(x.grad.norm().item(), rel=1e-10)

    def test_logit_moments_and_frequencies(self, rng):
        logits, target = healthy_batch(rng, shape=(6, 3, 9), dtype=np.float64)
        d = fl.diagnose(logits, target)
        s = d.stats
        assert s["logits_min"] == logits.min()
        assert s["logits_max"] == logits.max()
        assert s["logits_mean"] == pytest.approx(logits.mean(), rel=1e-12)
        assert s["logits_std"] == pytest.approx(logits.std(), rel=1e-9)
        expected = np.bincount(target.ravel(), minlength=3) / target.size
        assert s["target_class_frequencies"] == pytest.approx(expected.tolist(), abs=0)
        pred = np.bincount(logits.argmax(1).ravel(), minlength=3) / target.size
        assert s["predicted_class_frequencies"] == pytest.approx(pred.tolist(), abs=0)

    @pytest.mark.parametrize("dtype", [np.float32, np.float64])
    def test_nonfinite_logit_stats_across_layouts(self, rng, dtype):
        # Rows of 300 positions span a full 256-position tile and a partial
        # one. NaN, +inf and -inf logits, and positions whose logits all lie
        # in [0, 1] or are all non-positive, exercise every flag of the
        # logit scan, on the contiguous path and on the strided one.
        logits = rng.normal(size=(2, 4, 3, 100)).astype(dtype)
        logits[0, :, 0, :40] = rng.random((4, 40))
        logits[1, :, 1, 50:90] = -rng.random((4, 40))
        flat = logits.reshape(-1)
        flat[rng.choice(flat.size, 30, replace=False)] = np.nan
        flat[rng.choice(flat.size, 20, replace=False)] = np.inf
        flat[rng.choice(flat.size, 25, replace=False)] = -np.inf
        logits[1, :, 2, 7] = -np.inf
        target = rng.integers(0, 4, size=(2, 3, 100))
        stats = fl.diagnose(logits, target).stats
        finite = logits[np.isfinite(logits)].astype(np.float64)
        assert stats["n_nan_logits"] == np.isnan(logits).sum()
        assert stats["n_posinf_logits"] == np.isposinf(logits).sum()
        assert stats["n_neginf_logits"] == np.isneginf(logits).sum()
        assert stats["logits_min"] == finite.min()
        assert stats["logits_max"] == finite.max()
        assert stats["logits_mean"] == pytest.approx(finite.mean(), rel=1e-12)
        assert stats["logits_std"] == pytest.approx(finite.std(), rel=1e-9)
        bad = (np.isnan(logits) | np.isposinf(logits)).any(axis=1)
        bad |= np.isneginf(logits).all(axis=1)
        assert stats["n_nonfinite_positions"] == bad.sum()
        big = np.zeros((2, 4, 3, 200), dtype=dtype)
        big[..., ::2] = logits
        assert fl.diagnose(big[..., ::2], target).stats == stats
        assert fl.diagnose(np.asfortranarray(logits), target).stats == stats

    @pytest.mark.parametrize("kind", ["index", "probability", "sigmoid", "two_d"])
    def test_thread_counts_bit_identical(self, rng, kind):
        # Above the kernels' parallel threshold of 32768 items.
        logits = rng.normal(size=(3, 5, 48, 64)).astype(np.float32)
        target = rng.integers(0, 5, size=(3, 48, 64))
        loss = "cross_entropy"
        if kind == "probability":
            target = softmax(rng.normal(size=logits.shape), axis=1)
        elif kind == "sigmoid":
            target = (rng.random(logits.shape) < 0.3).astype(np.float32)
            loss = "binary_cross_entropy_with_logits"
        elif kind == "two_d":
            logits = rng.normal(size=(20000, 5))
            target = rng.integers(0, 5, size=20000)
        results = [
            fl.diagnose(logits, target, loss=loss, n_threads=n).stats
            for n in THREAD_COUNTS
        ]
        for stats in results[1:]:
            assert stats == results[0]


# ---------------------------------------------------------------------------
# The Diagnosis API
# ---------------------------------------------------------------------------


class TestAgreesWithCrossEntropy:
    """A batch that diagnose calls an error makes cross_entropy raise."""

    def test_void_label_raises(self, rng):
        logits, target = healthy_batch(rng)
        target[0, 0, 0] = 255
        assert fl.diagnose(logits, target).has_errors()
        with pytest.raises(ValueError, match="255"):
            fl.cross_entropy(logits, target)

    def test_float_labels_raise(self, rng):
        logits, target = healthy_batch(rng)
        assert fl.diagnose(logits, target.astype(np.float32)).has_errors()
        with pytest.raises(TypeError, match="astype"):
            fl.cross_entropy(logits, target.astype(np.float32))

    def test_healthy_batch_runs(self, rng):
        logits, target = healthy_batch(rng)
        target[0, 0, 0] = -100
        d = fl.diagnose(logits, target)
        assert d.ok
        assert d.stats["loss"] == pytest.approx(float(fl.cross_entropy(logits, target)),
                                                 rel=1e-6)


class TestDiagnosisApi:
    def test_ok_and_str(self, rng):
        raw, target = healthy_batch(rng)
        target[0, 0, 0] = 255
        d = fl.diagnose(softmax(raw, axis=1), target)
        assert isinstance(d, Diagnosis)
        assert not d.ok
        assert d.has_errors()
        text = str(d)
        assert text.startswith("fastloss diagnosis of cross_entropy: not ok (2 errors, 0 warnings")
        assert "[probabilities-as-logits]" in text
        assert "[target-out-of-range]" in text
        assert "fix: Pass ignore_index=255" in text
        assert "uniform_loss: 1.60944" in text
        assert repr(d).startswith("<Diagnosis ok=False")

    def test_info_only_is_ok(self, rng):
        raw, target = healthy_batch(rng)
        d = fl.diagnose(log_softmax(raw, axis=1), target)
        assert d.ok
        assert not d.has_errors()
        assert "ok (0 errors, 0 warnings, 1 info)" in str(d)

    def test_findings_sorted_by_severity(self, rng):
        logits, target = healthy_batch(rng, shape=(2, 6, 10, 10))
        target[...] = 0
        target[0, 0, 0] = 9
        d = fl.diagnose(logits, target)
        ranks = [("error", "warning", "info").index(f.severity) for f in d.findings]
        assert ranks == sorted(ranks)
        assert set(d.codes) >= {"target-out-of-range", "class-imbalance"}

    def test_to_dict_is_json(self, rng):
        logits, target = healthy_batch(rng)
        logits[0, 0, 0, 0] = np.nan
        target[0, 0, 0] = 7
        d = fl.diagnose(logits, target)
        payload = json.loads(json.dumps(d.to_dict(), allow_nan=False))
        assert payload["ok"] is False
        assert set(payload) == {"ok", "findings", "stats"}
        for f in payload["findings"]:
            assert set(f) == {"code", "severity", "message", "fix"}
        assert payload["stats"]["n_nan_logits"] == 1
        assert json.loads(d.to_json()) == payload

    def test_to_dict_without_loss(self, rng):
        logits, _ = healthy_batch(rng)
        d = fl.diagnose(logits, np.zeros(3, dtype=np.int64))
        payload = json.loads(d.to_json())
        assert payload["stats"]["loss"] is None

    def test_finding_fields(self):
        f = Finding("labels-shifted", "error", "message", "fix")
        assert (f.code, f.severity, f.message, f.fix) == (
            "labels-shifted", "error", "message", "fix")
        assert f == Finding("labels-shifted", "error", "message", "fix")
        with pytest.raises(ValueError, match="severity must be one of"):
            Finding("x", "fatal", "m", "f")

    def test_inputs_not_modified(self, rng):
        logits, target = healthy_batch(rng)
        target[0, 0, 0] = 255
        x, t = logits.copy(), target.copy()
        fl.diagnose(logits, target)
        np.testing.assert_array_equal(logits, x)
        np.testing.assert_array_equal(target, t)


class TestBadArguments:
    def test_unknown_loss(self, rng):
        logits, target = healthy_batch(rng)
        with pytest.raises(ValueError, match="loss must be one of cross_entropy.*got 'mse'"):
            fl.diagnose(logits, target, loss="mse")

    def test_loss_not_a_string(self, rng):
        logits, target = healthy_batch(rng)
        with pytest.raises(TypeError, match="loss must be a str naming a loss, got int"):
            fl.diagnose(logits, target, loss=3)

    def test_logits_not_numeric(self):
        with pytest.raises(TypeError, match="logits must be an array of real numbers"):
            fl.diagnose(None, [0])
        with pytest.raises(TypeError, match="logits must be an array of real numbers"):
            fl.diagnose(np.zeros((2, 2), dtype=complex), [0, 1])

    def test_target_not_numeric(self):
        with pytest.raises(TypeError, match="target must be an array of real numbers"):
            fl.diagnose(np.zeros((2, 2)), ["a", "b"])

    def test_scalar_logits(self):
        with pytest.raises(ValueError, match="logits must have at least 1 dimension"):
            fl.diagnose(np.float32(1.0), 0)

    def test_axis(self, rng):
        logits, target = healthy_batch(rng)
        with pytest.raises(ValueError, match="axis 4 is out of bounds"):
            fl.diagnose(logits, target, axis=4)
        with pytest.raises(TypeError, match="axis must be an int, got float"):
            fl.diagnose(logits, target, axis=1.0)

    def test_ignore_index(self, rng):
        logits, target = healthy_batch(rng)
        with pytest.raises(TypeError, match="ignore_index must be an int, got float"):
            fl.diagnose(logits, target, ignore_index=255.0)
        with pytest.raises(TypeError, match="ignore_index must be an int, got True"):
            fl.diagnose(logits, target, ignore_index=True)

    def test_n_threads(self, rng):
        logits, target = healthy_batch(rng)
        with pytest.raises(ValueError, match="n_threads must be None or an int >= 1, got 0"):
            fl.diagnose(logits, target, n_threads=0)

    def test_keywords_only(self, rng):
        logits, target = healthy_batch(rng)
        with pytest.raises(TypeError):
            fl.diagnose(logits, target, "cross_entropy")
