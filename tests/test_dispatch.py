"""The SIMD builds of the kernels compute the same bits as the baseline."""

import os
import subprocess
import sys

import numpy as np
import pytest

import fastloss as fl
from fastloss import _kernels
from fastloss._kernels._openmp import simd_copies_built

WIDE_LEVELS = [level for level in _kernels.available_levels() if level != "baseline"]


def special(x):
    """Return a copy of ``x`` with NaN, infinities and extremes spread through it."""
    x = x.copy()
    flat = x.reshape(-1)
    values = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30, 88.5, -104.0, 1e-40]
    for offset, value in enumerate(values):
        flat[offset::97] = value
    return x


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
                yield loss, (special(pred), target), dict(kwargs, reduction="none")


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
        yield fl.focal_loss, (special(logits), target), {"gamma": 3.0, "reduction": "none"}
        binary = (rng.random(shape) < 0.3).astype(dtype)
        yield fl.binary_cross_entropy_with_logits, (logits, binary), {}
        pos_weight = (rng.random(shape[-1]) * 3).astype(dtype)
        yield fl.binary_cross_entropy_with_logits, (logits, binary), {
            "pos_weight": pos_weight, "reduction": "none"}
        yield fl.sigmoid_focal_loss, (logits, binary), {}
        yield fl.binary_cross_entropy_with_logits, (special(logits), binary), {"reduction": "none"}
        yield fl.sigmoid_focal_loss, (special(logits), binary), {"reduction": "none"}
        yield fl.cross_entropy, (special(logits), target), {"reduction": "none"}
        for loss in (fl.dice_loss, fl.jaccard_loss, fl.tversky_loss):
            yield loss, (logits, target), {"ignore_index": -100}
            yield loss, (logits, binary), {"mode": "multilabel", "per_sample": True}


def battery_outputs():
    """Return the value and gradient of every call in the battery, in order."""
    results = []
    for calls in (regression_calls, classification_calls):
        for dtype in (np.float32, np.float64):
            for loss, args, kwargs in calls(np.random.default_rng(5), dtype):
                value, grad = loss(*args, return_grad=True, **kwargs)
                results += [np.asarray(value), grad]
    rng = np.random.default_rng(9)
    logits = (rng.standard_normal((2, 21, 64, 64)) * 3).astype(np.float32)
    target = rng.integers(0, 21, size=(2, 64, 64))
    binary = (rng.random(logits.shape) < 0.2).astype(np.float32)
    for report in (fl.diagnose(logits, target),
                   fl.diagnose(logits, binary, loss="binary_cross_entropy_with_logits")):
        results.append(np.frombuffer(report.to_json().encode(), np.uint8))
    return results


def outputs_of_level(level, directory):
    """Return ``battery_outputs()`` from a fresh process that imports ``level``."""
    path = directory / f"{level}.npz"
    code = (
        "import sys, numpy as np\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "import fastloss, test_dispatch\n"
        f"assert fastloss.simd_level() == {level!r}, fastloss.simd_level()\n"
        f"np.savez({str(path)!r}, *test_dispatch.battery_outputs())\n"
    )
    result = run_python(code, FASTLOSS_SIMD=level)
    assert result.returncode == 0, result.stderr
    with np.load(path) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


def assert_same_bits(a, b):
    # NaN outputs may differ in sign: the sign that x86 gives a NaN depends
    # on the operand order of each instruction. Every other bit must match.
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    if a.dtype.kind == "f":
        nan = np.isnan(a)
        np.testing.assert_array_equal(nan, np.isnan(b))
        a, b = a[~nan], b[~nan]
    assert a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def baseline_outputs(tmp_path_factory):
    return outputs_of_level("baseline", tmp_path_factory.mktemp("baseline"))


@pytest.mark.parametrize("level", WIDE_LEVELS)
def test_wide_builds_match_baseline(baseline_outputs, tmp_path, level):
    got = outputs_of_level(level, tmp_path)
    assert len(got) == len(baseline_outputs)
    for a, b in zip(got, baseline_outputs):
        assert_same_bits(a, b)


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


def test_builds_include_avx2():
    # A wheel for x86-64 that lost its AVX2 kernels would run every loss at
    # half the vector width on every CPU that has AVX2.
    if not simd_copies_built():
        assert _kernels.available_levels() == ["baseline"]
    elif _kernels.cpu_simd_level() >= 1:
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
