import json
import subprocess
import sys

import numpy as np
import pytest

import fastloss as fl
from fastloss import cli


def softmax(x, axis):
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def run_diagnose(capsys, *args):
    """Run ``fastloss diagnose`` in process and return (status, stdout, stderr)."""
    status = cli.main(["diagnose", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def assert_usage_error(status, out, err, match):
    assert status == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fastloss: error: ")
    assert match in lines[0], lines[0]


@pytest.fixture
def batch(tmp_path, rng):
    """Return a function that saves logits and a label mask as .npy files."""

    def save(logits=None, target=None):
        if logits is None:
            logits = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
        if target is None:
            target = rng.integers(0, 3, size=(2, 8, 8))
        np.save(tmp_path / "logits.npy", logits)
        np.save(tmp_path / "target.npy", target)
        return tmp_path / "logits.npy", tmp_path / "target.npy"

    return save


def test_healthy_batch_exits_0(capsys, batch):
    logits, target = batch()
    status, out, err = run_diagnose(capsys, logits, target)
    assert status == 0, err
    assert out.startswith("fastloss diagnosis of cross_entropy: ok (0 errors")
    assert "uniform_loss: 1.09861" in out
    assert err == ""


def test_error_exits_1_with_report(capsys, batch, rng):
    mask = rng.integers(0, 3, size=(2, 8, 8))
    mask[:, 0] = 255
    logits, target = batch(target=mask)
    status, out, err = run_diagnose(capsys, logits, target)
    assert status == 1
    assert "ERROR   [target-out-of-range] 16 of 128 target labels" in out
    assert "fix: Pass ignore_index=255" in out
    assert err == ""


def test_ignore_index_option(capsys, batch, rng):
    mask = rng.integers(0, 3, size=(2, 8, 8))
    mask[:, 0] = 255
    logits, target = batch(target=mask)
    status, out, err = run_diagnose(capsys, logits, target, "--ignore-index", "255")
    assert status == 0, out
    assert "n_ignored: 16" in out


def test_warnings_alone_exit_0(capsys, batch, rng):
    mask = np.zeros((2, 50, 50), dtype=np.int64)
    mask[0, 0, :10] = 1
    logits, target = batch(logits=rng.normal(size=(2, 2, 50, 50)), target=mask)
    status, out, _ = run_diagnose(capsys, logits, target)
    assert status == 0
    assert "not ok (0 errors, 1 warning, 0 info)" in out
    assert "WARNING [class-imbalance]" in out


def test_json_output(capsys, batch, rng):
    raw = rng.normal(size=(2, 3, 8, 8))
    logits, target = batch(logits=softmax(raw, axis=1))
    status, out, err = run_diagnose(capsys, logits, target, "--json")
    assert status == 1
    payload = json.loads(out)
    assert set(payload) == {"ok", "findings", "stats"}
    assert payload["ok"] is False
    assert [f["code"] for f in payload["findings"]] == ["probabilities-as-logits"]
    for f in payload["findings"]:
        assert set(f) == {"code", "severity", "message", "fix"}
    expected = fl.diagnose(np.load(logits), np.load(target)).to_dict()
    assert payload == json.loads(json.dumps(expected))


def test_axis_option(capsys, batch, rng):
    logits, target = batch(logits=rng.normal(size=(2, 8, 8, 3)))
    status, out, _ = run_diagnose(capsys, logits, target)
    assert status == 1
    assert "[class-axis-misplaced]" in out
    status, out, _ = run_diagnose(capsys, logits, target, "--axis", "-1")
    assert status == 0, out


def test_loss_option(capsys, batch, rng):
    targets = (rng.random((2, 3, 8, 8)) < 0.5).astype(np.float32)
    logits, target = batch(target=targets)
    status, out, _ = run_diagnose(
        capsys, logits, target, "--loss", "binary_cross_entropy_with_logits", "--json"
    )
    assert status == 0, out
    assert json.loads(out)["stats"]["loss_name"] == "binary_cross_entropy_with_logits"


def test_weight_option(capsys, batch, tmp_path):
    logits, target = batch()
    np.save(tmp_path / "weight.npy", np.array([1.0, 2.0]))
    status, out, _ = run_diagnose(capsys, logits, target, "--weight",
                                  tmp_path / "weight.npy")
    assert status == 1
    assert "[weight-invalid] Weight has shape (2,)" in out


def test_npz_key(capsys, tmp_path, rng):
    logits = rng.normal(size=(20, 4))
    labels = np.arange(20) % 4
    np.savez(tmp_path / "batch.npz", logits=logits, labels=labels + 1)
    status, out, _ = run_diagnose(capsys, f"{tmp_path / 'batch.npz'}:logits",
                                  f"{tmp_path / 'batch.npz'}:labels")
    assert status == 1
    assert "ERROR   [labels-shifted] Target labels run from 1 to 4" in out


def test_missing_file(capsys, batch, tmp_path):
    logits, _ = batch()
    status, out, err = run_diagnose(capsys, logits, tmp_path / "nowhere.npy")
    assert_usage_error(status, out, err, "TARGET: file not found")


def test_unknown_loss(capsys, batch):
    logits, target = batch()
    status, out, err = run_diagnose(capsys, logits, target, "--loss", "mse_loss")
    assert_usage_error(status, out, err, "argument --loss: invalid choice: 'mse_loss'")


def test_axis_out_of_bounds(capsys, batch):
    logits, target = batch()
    status, out, err = run_diagnose(capsys, logits, target, "--axis", "5")
    assert_usage_error(status, out, err, "diagnose: axis 5 is out of bounds")


def test_axis_not_an_integer(capsys, batch):
    logits, target = batch()
    status, out, err = run_diagnose(capsys, logits, target, "--axis", "last")
    assert_usage_error(status, out, err, "argument --axis: invalid int value: 'last'")


def test_missing_target_argument(capsys, batch):
    logits, _ = batch()
    status, out, err = run_diagnose(capsys, logits)
    assert_usage_error(status, out, err, "the following arguments are required: TARGET")


def test_python_m_fastloss_diagnose(batch, rng):
    mask = rng.integers(0, 3, size=(2, 8, 8))
    logits, target = batch(target=mask + 1)
    done = subprocess.run(
        [sys.executable, "-m", "fastloss", "diagnose", str(logits), str(target),
         "--json"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1, done.stderr
    payload = json.loads(done.stdout)
    assert [f["code"] for f in payload["findings"]] == ["labels-shifted"]
    assert done.stderr == ""


def test_demo_diagnosis_section():
    pytest.importorskip("skimage")
    from fastloss import demo

    lines = []
    demo._write_diagnosis(lambda line="": lines.append(line))
    text = "\n".join(lines)
    assert "ERROR [target-out-of-range]" in text
    assert "ERROR [probabilities-as-logits]" in text
    assert "fix: Pass ignore_index=255" in text
    assert "ok, findings: none" in text
    assert all(len(line) <= demo.REPORT_WIDTH for line in lines)


def test_demo_batch_is_consistent():
    pytest.importorskip("skimage")
    from fastloss import demo

    logits, mask = demo.segmentation_batch()
    assert logits.shape == (2, 3) + mask.shape[1:]
    assert set(np.unique(mask)) == {0, 1, 2, 255}
