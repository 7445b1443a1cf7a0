"""The benchmark suite runs end to end on toy sizes and writes its outputs.

No test here looks at a timing: the sizes are far too small for the numbers
to mean anything, and the machine running the tests may be busy.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastloss
from fastloss import benchmarks
from fastloss._bench import suite, timing
from fastloss._bench.workload import check_result

FAST_ANCHORS = "numpy-naive,numpy-careful"


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
    assert groups == {
        "regression", "classification", "overlap", "per-call", "threads", "threshold"
    }
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
    assert "| fastloss grad_out |" in markdown
    assert "## Parallel threshold" in markdown
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


def test_wrong_implementation_not_timed(tmp_path, monkeypatch):
    correct_mse = fastloss.mse_loss

    def wrong_mse(pred, target, **kwargs):
        loss, grad = correct_mse(pred, target, **kwargs)
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


@pytest.mark.parametrize(
    "command", [["-m", "bench"], ["bench/run.py"]], ids=["python -m bench", "bench/run.py"]
)
def test_entry_points_print_help(command):
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, *command, "--help"], cwd=root, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "--quick" in result.stdout
    assert "--markdown" in result.stdout


def test_markdown_keeps_history_section(tmp_path):
    from fastloss._bench import report

    page = tmp_path / "BENCHMARKS.md"
    page.write_text(
        "# old table\n\nstale rows\n\n## Optimization history\n\n- kernel: 9 ms -> 3 ms\n"
    )
    history = report.kept_history(page)
    assert history == "## Optimization history\n\n- kernel: 9 ms -> 3 ms\n"
    assert report.kept_history(tmp_path / "missing.md") == ""

    page.write_text("# a page without a history section\n")
    assert report.kept_history(page) == ""


def test_thread_row_blocks_per_library(tiny_run, monkeypatch):
    from fastloss._bench import anchors

    record, _, _ = tiny_run
    (workload,) = [w for w in record["workloads"] if w["group"] == "threads"]
    names = {e["name"] for e in workload["implementations"]}
    assert {"fastloss 1t", "fastloss grad_out 1t"} <= names

    blocks = []
    real = timing.time_interleaved

    def recording(funcs, *args, **kwargs):
        blocks.append(len(funcs))
        return real(funcs, *args, **kwargs)

    monkeypatch.setattr(suite, "time_interleaved", recording)
    mode = suite.make_mode("tiny")
    (thread_workload,) = suite.select(suite.workloads(mode, 2), "threads")
    available, _ = anchors.load_anchors(["torch", "sklearn", "numba"])
    ctx = {"anchors": available, "n_threads": 2, "seed": 1}
    bandwidth = {"by_threads": {"1": {"bytes_per_s": 1e10}, "2": {"bytes_per_s": 2e10}}}
    result = suite.run_workload(thread_workload, mode, ctx, bandwidth)
    # One block for fastloss (fresh and grad_out, 1 and 2 threads), then one
    # per installed anchor (1 and 2 threads).
    assert blocks == [4] + [2] * len(available)
    for entry in result["implementations"]:
        assert entry["status"] == "ok", entry


def test_threshold_sweep_straddles_threshold():
    from fastloss._bench import report

    sizes = suite.make_mode("full").threshold_sizes
    assert min(sizes) < report.THRESHOLD_ITEMS <= max(sizes)
    assert report.THRESHOLD_ITEMS in sizes


def test_break_even_estimate():
    from fastloss._bench import report

    def workload(n, t1, t2):
        return {
            "params": {"n": n, "thread_counts": [1, 2]},
            "implementations": [
                {"threads": 1, "status": "ok", "median_s": t1},
                {"threads": 2, "status": "ok", "median_s": t2},
            ],
        }

    # t2 = t1 / 2 + 3 us at n = 32768 with t1 = 8 us: the team costs 3 us,
    # which the halved work pays back from 2 * 3 / 8 * 32768 = 24576 items.
    sweep = [workload(16384, 4e-6, 4e-6), workload(32768, 8e-6, 7e-6)]
    text = report._break_even(sweep, 32768)
    assert "from about 24576 items" in text
    assert report._break_even(sweep[:1], 32768) is None


def test_idle_wait_sees_busy_thread():
    import threading
    import time

    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    worker = threading.Thread(target=spin)
    worker.start()
    try:
        waited = timing.wait_for_idle_threads(cap_s=0.02)
    finally:
        stop.set()
        worker.join()
    # A thread that never sleeps keeps the wait going up to the cap.
    assert waited >= 0.02
    time.sleep(0.01)
    assert timing.wait_for_idle_threads(cap_s=1.0) < 0.5


def test_others_ticks_exclude_own():
    ticks = [0, 0]
    # 20 busy ticks of 20 in all, 5 of them this process's own.
    timing._add_others_ticks(ticks, (10, 100, 2), (30, 120, 7))
    assert ticks == [15, 20]
    timing._add_others_ticks(ticks, None, (30, 120, 7))
    assert ticks == [15, 20]


def test_tiny_suite_records_busy_share(tiny_run):
    record, _, _ = tiny_run
    for workload in record["workloads"]:
        for entry in workload["implementations"]:
            share = entry["others_busy_share"]
            assert share is None or 0.0 <= share <= 1.0
