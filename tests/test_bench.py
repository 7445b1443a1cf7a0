"""The benchmark suite runs end to end on toy sizes and writes its outputs.

No test here looks at a timing: the sizes are far too small for the numbers
to mean anything, and the machine running the tests may be busy.

Losses that fastloss does not export yet are replaced by NumPy stand-ins
(written here, computing the same results in float64), so the suite's check,
timing and report paths run whichever kernels have landed.
"""

import json

import numpy as np
import pytest

import fastloss
from fastloss import benchmarks
from fastloss._bench import suite
from fastloss._bench.workload import check_result

FAST_ANCHORS = "numpy-naive,numpy-careful"


def _finish(loss, grad, dtype, return_grad, grad_out):
    loss = dtype.type(loss)
    if not return_grad:
        return loss
    grad = grad.astype(dtype)
    if grad_out is not None:
        grad_out[...] = grad
        grad = grad_out
    return loss, grad


def _standin_mse(pred, target, *, return_grad=False, grad_out=None, n_threads=None):
    d = np.asarray(pred, np.float64) - np.asarray(target, np.float64)
    return _finish(np.mean(d * d), 2 * d / d.size, pred.dtype, return_grad, grad_out)


def _standin_huber(
    pred, target, *, delta=1.0, return_grad=False, grad_out=None, n_threads=None
):
    d = np.asarray(pred, np.float64) - np.asarray(target, np.float64)
    a = np.abs(d)
    loss = np.mean(np.where(a <= delta, 0.5 * d * d, delta * (a - 0.5 * delta)))
    grad = np.clip(d, -delta, delta) / d.size
    return _finish(loss, grad, pred.dtype, return_grad, grad_out)


def _standin_cross_entropy(
    logits, target, *, axis=1, return_grad=False, grad_out=None, n_threads=None
):
    x = np.moveaxis(np.asarray(logits, np.float64), axis, -1)
    rows = x.reshape(-1, x.shape[-1])
    labels = target.reshape(-1)
    shifted = rows - rows.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    picked = log_p[np.arange(rows.shape[0]), labels]
    grad = np.exp(log_p)
    grad[np.arange(rows.shape[0]), labels] -= 1
    grad = np.moveaxis((grad / rows.shape[0]).reshape(x.shape), -1, axis)
    return _finish(-picked.mean(), grad, logits.dtype, return_grad, grad_out)


def _standin_bce(logits, target, *, return_grad=False, grad_out=None, n_threads=None):
    x = np.asarray(logits, np.float64)
    t = np.asarray(target, np.float64)
    loss = np.mean(np.logaddexp(0, x) - t * x)
    grad = (0.5 * np.tanh(0.5 * x) + 0.5 - t) / x.size
    return _finish(loss, grad, logits.dtype, return_grad, grad_out)


def _standin_dice(
    logits, target, *, mode="multiclass", eps=1e-7, return_grad=False, grad_out=None
):
    from fastloss._bench.overlap import _dice_loss_grad

    loss, grad = _dice_loss_grad(np.asarray(logits, np.float64), target, eps=eps)
    return _finish(loss, grad, logits.dtype, return_grad, grad_out)


STANDINS = {
    "mse_loss": _standin_mse,
    "huber_loss": _standin_huber,
    "cross_entropy": _standin_cross_entropy,
    "binary_cross_entropy_with_logits": _standin_bce,
    "dice_loss": _standin_dice,
}


def _add_standins(monkeypatch):
    """Give fastloss a NumPy stand-in for each loss it does not export yet."""
    for name, func in STANDINS.items():
        if not hasattr(fastloss, name):
            monkeypatch.setattr(fastloss, name, func, raising=False)


@pytest.fixture
def standins(monkeypatch):
    _add_standins(monkeypatch)


def _run(tmp_path, *extra):
    paths = {key: tmp_path / f"bench.{key}" for key in ("json", "md", "png")}
    argv = ["--tiny", "--json", str(paths["json"]), "--markdown", str(paths["md"])]
    argv += ["--plot", str(paths["png"])] + list(extra)
    assert benchmarks.main(argv) == 0
    record = json.loads(paths["json"].read_text())
    return record, paths["md"].read_text(), paths


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Run the whole tiny suite once, with every installed anchor."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _add_standins(monkeypatch)
        return _run(tmp_path_factory.mktemp("bench"))


def test_tiny_suite_record_keys(tiny_run):
    record, _, _ = tiny_run
    for key in (
        "schema", "command", "started", "machine", "mode", "n_threads", "n_samples",
        "anchors", "missing_anchors", "bandwidth", "workloads", "wall_s",
    ):
        assert key in record, key
    assert record["mode"] == "tiny"
    assert record["n_samples"] >= 7
    assert {"numpy-naive", "numpy-careful"} <= set(record["anchors"])
    for key in ("cpu", "logical_cpus", "openmp_enabled", "numpy", "fastloss"):
        assert key in record["machine"], key
    assert "--tiny" in record["command"]
    assert record["bandwidth"]["by_threads"]["1"]["bytes_per_s"] > 0


def test_tiny_suite_times_every_workload(tiny_run):
    record, _, _ = tiny_run
    groups = {w["group"] for w in record["workloads"]}
    assert groups == {"regression", "classification", "overlap", "per-call", "threads"}
    for workload in record["workloads"]:
        assert workload["status"] == "ok", (workload["name"], workload.get("reason"))
        assert workload["bytes_moved"] > 0
        for entry in workload["implementations"]:
            assert entry["status"] == "ok", (workload["name"], entry)
            assert len(entry["samples_s"]) == record["n_samples"]
            for key in ("median_s", "q1_s", "q3_s", "min_s", "max_s", "floor_multiple"):
                assert key in entry, key
        for row in workload["rows"]:
            assert "median_s" in row
            assert set(row["vs"]) <= set(record["anchors"])


def test_tiny_suite_runs_every_anchor(tiny_run):
    # Each installed anchor passed the reference check on some workload.
    record, _, _ = tiny_run
    seen = {e["anchor"] for w in record["workloads"] for e in w["implementations"]}
    assert set(record["anchors"]) <= seen


def test_tiny_suite_markdown_and_plot(tiny_run):
    record, markdown, paths = tiny_run
    assert markdown.startswith("# fastloss benchmarks")
    assert record["command"] in markdown
    assert "## Memory-bandwidth floor" in markdown
    assert "| workload | bytes moved | fastloss (IQR) | × floor | naive NumPy |" in markdown
    for title in ("Regression losses", "Classification losses", "Overlap losses"):
        assert f"## {title}" in markdown
    assert "## Thread scaling" in markdown
    assert "## Skipped workloads" not in markdown
    pytest.importorskip("matplotlib")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_loss_is_skipped(tmp_path, monkeypatch):
    monkeypatch.delattr(fastloss, "mse_loss", raising=False)
    record, markdown, _ = _run(tmp_path, "--anchors", FAST_ANCHORS, "--filter", "mse_loss")
    assert record["workloads"]
    for workload in record["workloads"]:
        assert workload["status"] == "skipped"
        assert "mse_loss" in workload["reason"]
    assert "## Skipped workloads" in markdown


def test_wrong_implementation_not_timed(tmp_path, monkeypatch, standins):
    def wrong_mse(pred, target, **kwargs):
        loss, grad = _standin_mse(pred, target, **kwargs)
        return loss * 2, grad

    monkeypatch.setattr(fastloss, "mse_loss", wrong_mse)
    record, markdown, _ = _run(
        tmp_path, "--anchors", FAST_ANCHORS, "--filter", "mse_loss float64 n=100"
    )
    (workload,) = record["workloads"]
    entries = {e["name"]: e for e in workload["implementations"]}
    assert entries["fastloss"]["status"] == "wrong"
    assert "median_s" not in entries["fastloss"]
    assert entries["naive NumPy"]["status"] == "ok"
    assert "median_s" in entries["naive NumPy"]
    assert "## Implementations that failed the check" in markdown


def test_check_result_flags_wrong_grad():
    reference = np.array([0.5, -0.25])
    assert check_result((1.0, reference), 1.0, reference, "float64")[0]
    ok, error, message = check_result((1.0, -reference), 1.0, reference, "float64")
    assert not ok
    assert error == pytest.approx(2.0)
    assert "gradient" in message


def test_filter_selects_group():
    workloads = suite.workloads(suite.make_mode("tiny"), 2)
    chosen = suite.select(workloads, "per-call")
    assert chosen
    assert all(w.group == "per-call" for w in chosen)


def test_unknown_anchor_rejected(capsys):
    with pytest.raises(SystemExit) as info:
        benchmarks.main(["--tiny", "--anchors", "numpy-naive,tensorflow"])
    assert info.value.code == 2
    assert "unknown anchor 'tensorflow'" in capsys.readouterr().err
