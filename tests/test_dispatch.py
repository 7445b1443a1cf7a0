"""The SIMD builds of the kernels compute the same bits as the baseline."""

import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import fastloss as fl
from fastloss import _diagnose_sigmoid, _diagnose_softmax, overlap, regression, sigmoid, softmax
from fastloss import _kernels

# The module attributes through which each public module calls its kernels.
BINDINGS = [
    (regression, "_kernels", "_regression"),
    (softmax, "_softmax", "_softmax"),
    (sigmoid, "_sigmoid", "_sigmoid"),
    (overlap, "_overlap", "_overlap"),
    (_diagnose_softmax, "_stats", "_stats"),
    (_diagnose_sigmoid, "_stats", "_stats"),
]

WIDE_LEVELS = [level for level in _kernels.available_levels() if level != "baseline"]


def use_level(monkeypatch, level):
    for module, attribute, name in BINDINGS:
        monkeypatch.setattr(module, attribute, _kernels.load(name, level))


def regression_calls(rng, dtype):
    # Sizes on both sides of the parallel threshold, odd lengths for the
    # vector tails, a strided view, and values around each loss's kink.
    for n in (1, 7, 33, 4099, 70001):
        pred = (rng.standard_normal(n) * 3).astype(dtype)
        target = (rng.standard_normal(n) * 3).astype(dtype)
        weight = rng.random(n).astype(dtype)
        pred[::5] = target[::5]
        for loss, kwargs in [
            (fl.mse_loss, {}), (fl.rmse_loss, {}), (fl.l1_loss, {}),
            (fl.smooth_l1_loss, {"beta": 0.5}), (fl.huber_loss, {"delta": 0.7}),
            (fl.log_cosh_loss, {}), (fl.pinball_loss, {"quantile": 0.3}),
        ]:
            for reduction in ("mean", "sum"):
                yield loss, (pred, target), dict(kwargs, reduction=reduction)
                yield loss, (pred, target), dict(kwargs, reduction=reduction, weight=weight)
            if loss is not fl.rmse_loss:
                yield loss, (pred, target), dict(kwargs, reduction="none")
                yield loss, (pred[::-2], target[::-2]), dict(kwargs)


def classification_calls(rng, dtype):
    for shape in [(37, 5), (3, 7, 33, 5), (2, 21, 64, 64), (600, 1000)]:
        logits = (rng.standard_normal(shape) * 4).astype(dtype)
        index_shape = shape[:1] + shape[2:]
        target = rng.integers(0, shape[1], size=index_shape)
        target.flat[::11] = -100
        probs = rng.random(shape).astype(dtype)
        probs /= probs.sum(axis=1, keepdims=True)
        class_weight = rng.random(shape[1]).astype(dtype) + 0.5
        yield fl.cross_entropy, (logits, target), {}
        yield fl.cross_entropy, (logits, target), {"weight": class_weight, "label_smoothing": 0.1}
        yield fl.cross_entropy, (logits, probs), {"reduction": "none"}
        yield fl.cross_entropy, (np.moveaxis(logits, 1, -1), target), {"axis": -1}
        yield fl.focal_loss, (logits, target), {"gamma": 2.0}
        yield fl.focal_loss, (logits, target), {"gamma": 1.5, "reduction": "sum"}
        binary = (rng.random(shape) < 0.3).astype(dtype)
        yield fl.binary_cross_entropy_with_logits, (logits, binary), {}
        pos_weight = (rng.random(shape[-1]) * 3).astype(dtype)
        yield fl.binary_cross_entropy_with_logits, (logits, binary), {
            "pos_weight": pos_weight, "reduction": "none"}
        yield fl.sigmoid_focal_loss, (logits, binary), {}
        for loss in (fl.dice_loss, fl.jaccard_loss, fl.tversky_loss):
            yield loss, (logits, target), {"ignore_index": -100}
            yield loss, (logits, binary), {"mode": "multilabel", "per_sample": True}


def outputs(loss, args, kwargs):
    value, grad = loss(*args, return_grad=True, **kwargs)
    return np.asarray(value), grad


def assert_same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("level", WIDE_LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("calls", [regression_calls, classification_calls])
def test_wide_builds_match_baseline(monkeypatch, level, dtype, calls):
    cases = list(calls(np.random.default_rng(5), dtype))
    use_level(monkeypatch, "baseline")
    expected = [outputs(*case) for case in cases]
    use_level(monkeypatch, level)
    for case, (value, grad) in zip(cases, expected):
        got_value, got_grad = outputs(*case)
        assert_same_bits(got_value, value)
        assert_same_bits(got_grad, grad)


@pytest.mark.parametrize("level", WIDE_LEVELS)
def test_wide_builds_match_on_diagnose(monkeypatch, level):
    rng = np.random.default_rng(9)
    logits = (rng.standard_normal((2, 21, 64, 64)) * 3).astype(np.float32)
    target = rng.integers(0, 21, size=(2, 64, 64))
    binary = (rng.random(logits.shape) < 0.2).astype(np.float32)
    use_level(monkeypatch, "baseline")
    expected = [fl.diagnose(logits, target).to_dict(),
                fl.diagnose(logits, binary, loss="binary_cross_entropy_with_logits").to_dict()]
    use_level(monkeypatch, level)
    got = [fl.diagnose(logits, target).to_dict(),
           fl.diagnose(logits, binary, loss="binary_cross_entropy_with_logits").to_dict()]
    assert got == expected


@pytest.mark.parametrize("level", WIDE_LEVELS)
@pytest.mark.parametrize("name", _kernels.DISPATCHED)
def test_wide_build_has_its_flags(level, name):
    # The comparison with the baseline proves nothing if a wide build was
    # compiled with the baseline's flags.
    module = _kernels.load(name, level)
    assert module.compiled_simd_level() == _kernels.LEVELS.index(level)


def test_selects_highest_available_level():
    levels = _kernels.available_levels()
    assert levels[0] == "baseline"
    requested = os.environ.get("FASTLOSS_SIMD", "auto").lower()
    if requested in ("", "auto"):
        assert fl.simd_level() == levels[-1]
    else:
        assert fl.simd_level() == min(levels[-1], requested, key=_kernels.LEVELS.index)


def test_x86_64_builds_include_avx2():
    # A wheel for x86-64 that lost its AVX2 kernels would run every loss at
    # half the vector width on every CPU that has AVX2.
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the AVX2 kernels exist only on x86-64")
    if os.environ.get("FASTLOSS_NO_DISPATCH", "0") not in ("", "0"):
        pytest.skip("built with FASTLOSS_NO_DISPATCH=1")
    if _kernels.cpu_simd_level() >= 1:
        assert "avx2" in _kernels.available_levels()


def run_python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True,
        env=dict(os.environ, **env), timeout=120,
    )


def test_simd_variable_caps_level():
    result = run_python("import fastloss; print(fastloss.simd_level())",
                        FASTLOSS_SIMD="baseline")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "baseline"


def test_unknown_simd_level_fails():
    result = run_python("import fastloss", FASTLOSS_SIMD="sse9")
    assert result.returncode != 0
    assert "FASTLOSS_SIMD='sse9' is not a SIMD level" in result.stderr


def test_load_rejects_undispatched_module():
    with pytest.raises(ValueError, match="'_openmp' is not a dispatched"):
        _kernels.load("_openmp")
