"""The workloads of each run mode, and the loop that checks and times them."""

import gc
from dataclasses import dataclass

import fastloss
from fastloss._kernels._openmp import max_threads

from . import anchors as anchor_lib
from .classification import bce_workload, cross_entropy_workload
from .overlap import dice_workload
from .regression import (
    regression_workload,
    thread_scaling_workload,
    threshold_workload,
)
from .timing import measure_bandwidth, time_interleaved, wait_for_quiet
from .workload import check_result

SEED = 20261204
MiB = 1 << 20
# Sizes of the parallel-threshold sweep, around MIN_PARALLEL_ITEMS (32768)
# of _common.pxd. Below it a kernel runs on one thread whatever n_threads
# requests, so only the sizes from the threshold up show what 2 threads gain.
THRESHOLD_SIZES = (16_384, 32_768, 49_152, 65_536, 131_072, 262_144)


@dataclass
class Mode:
    """Sizes and sampling of one run mode."""

    name: str
    regression_sizes: tuple
    regression_dtypes: tuple
    cross_entropy_cases: tuple
    bce_size: int
    dice_shape: tuple
    thread_scaling_size: int
    threshold_sizes: tuple
    n_samples: int
    warmup: int
    min_sample_s: float
    pause_s: float
    quiet_cap_s: float
    bandwidth_bytes: int
    bandwidth_repeats: int


def _l3_bytes():
    """Return the size of the last-level cache in bytes, or None if unknown."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
    except OSError:
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text) if text.isdigit() else None


def _bandwidth_bytes(cap):
    """Return an array size for the bandwidth floor: twice the L3, 64 MiB to ``cap``.

    Each of the three arrays gets this size, so ``3 * size`` bytes must fit in
    memory. The cap keeps that within a laptop's memory. On CPUs whose L3 is
    larger than ``cap / 2`` the floor is then measured partly in cache.
    """
    l3 = _l3_bytes() or 32 * MiB
    return int(min(max(64 * MiB, 2 * l3), cap))


def make_mode(name):
    """Return the Mode called ``name``: ``full``, ``quick`` or ``tiny``."""
    if name == "full":
        return Mode(
            name="full",
            regression_sizes=(1_000, 100_000, 10_000_000),
            regression_dtypes=("float32", "float64"),
            cross_entropy_cases=(
                ((1_000_000, 10), 1),
                ((65536, 1000), 1),
                ((8, 21, 256, 256), 1),
                ((8, 256, 256, 21), -1),
            ),
            bce_size=10_000_000,
            dice_shape=(8, 21, 256, 256),
            thread_scaling_size=10_000_000,
            threshold_sizes=THRESHOLD_SIZES,
            n_samples=15,
            warmup=3,
            min_sample_s=0.05,
            pause_s=0.005,
            quiet_cap_s=30.0,
            bandwidth_bytes=_bandwidth_bytes(512 * MiB),
            bandwidth_repeats=10,
        )
    if name == "quick":
        return Mode(
            name="quick",
            regression_sizes=(1_000, 1_000_000),
            regression_dtypes=("float32", "float64"),
            cross_entropy_cases=(
                ((100_000, 10), 1),
                ((8192, 1000), 1),
                ((2, 21, 128, 128), 1),
                ((2, 128, 128, 21), -1),
            ),
            bce_size=1_000_000,
            dice_shape=(2, 21, 128, 128),
            thread_scaling_size=1_000_000,
            threshold_sizes=THRESHOLD_SIZES,
            n_samples=7,
            warmup=2,
            min_sample_s=0.01,
            pause_s=0.002,
            quiet_cap_s=2.0,
            bandwidth_bytes=_bandwidth_bytes(256 * MiB),
            bandwidth_repeats=5,
        )
    if name == "tiny":
        # Sizes for the test of the suite itself: every path runs in seconds,
        # and the timings mean nothing.
        return Mode(
            name="tiny",
            regression_sizes=(100,),
            regression_dtypes=("float32", "float64"),
            cross_entropy_cases=(((64, 10), 1), ((2, 3, 4, 4), 1), ((2, 4, 4, 3), -1)),
            bce_size=100,
            dice_shape=(2, 3, 4, 4),
            thread_scaling_size=1_000,
            threshold_sizes=(1_000, 40_000),
            n_samples=7,
            warmup=1,
            min_sample_s=1e-4,
            pause_s=0.002,
            quiet_cap_s=0.0,
            bandwidth_bytes=MiB,
            bandwidth_repeats=2,
        )
    raise ValueError(f"mode must be 'full', 'quick' or 'tiny', got {name!r}")


def workloads(mode, n_threads):
    """Return the workloads of ``mode`` in the order they run."""
    result = []
    for loss in ("mse_loss", "huber_loss"):
        for dtype in mode.regression_dtypes:
            for n in mode.regression_sizes:
                result.append(regression_workload(loss, n, dtype))
    for shape, axis in mode.cross_entropy_cases:
        result.append(cross_entropy_workload(shape, axis))
    result.append(bce_workload(mode.bce_size))
    result.append(dice_workload(mode.dice_shape))
    # Per-call cost on 16 elements, where the Python-level overhead of each
    # implementation dominates.
    result += [
        regression_workload("mse_loss", 16, "float64", group="per-call", per_call=True),
        regression_workload("huber_loss", 16, "float64", group="per-call", per_call=True),
        bce_workload(16, group="per-call", per_call=True),
        cross_entropy_workload((4, 4), 1, group="per-call", per_call=True),
        dice_workload((1, 4, 2, 2), group="per-call", per_call=True),
    ]
    result.append(thread_scaling_workload(mode.thread_scaling_size, "float32", n_threads))
    for n in mode.threshold_sizes:
        result.append(threshold_workload(n, "float32", n_threads))
    return result


def select(all_workloads, pattern):
    """Keep the workloads whose name or group contains ``pattern`` (any case)."""
    if not pattern:
        return list(all_workloads)
    needle = pattern.lower()
    return [w for w in all_workloads if needle in w.name.lower() or needle == w.group]


def _check_implementation(impl, reference_loss, reference_grad, dtype):
    """Run ``impl`` once and check it; return the JSON record's status fields."""
    try:
        result = impl.extract(impl.run())
        ok, error, message = check_result(result, reference_loss, reference_grad, dtype)
    except Exception as exc:  # an implementation that raises is reported
        return {"status": "error", "error": None, "message": f"{type(exc).__name__}: {exc}"}
    return {"status": "ok" if ok else "wrong", "error": error, "message": message}


def _floor_seconds(workload, threads, bandwidth):
    by_threads = bandwidth["by_threads"]
    key = str(threads) if str(threads) in by_threads else str(max(map(int, by_threads)))
    return workload.bytes_moved / by_threads[key]["bytes_per_s"]


def run_workload(workload, mode, ctx, bandwidth):
    """Check every implementation of ``workload`` and time the correct ones."""
    record = {
        "name": workload.name,
        "group": workload.group,
        "loss": workload.loss,
        "dtype": workload.dtype,
        "params": workload.params,
        "bytes_moved": workload.bytes_moved,
        "bytes_note": workload.bytes_note,
        "per_call": workload.per_call,
    }
    if not hasattr(fastloss, workload.loss):
        record.update(status="skipped", reason=f"fastloss has no {workload.loss} yet")
        return record

    record["quiet"] = wait_for_quiet(mode.quiet_cap_s)
    try:
        reference_loss, reference_grad, impls = workload.build(ctx)
    except Exception as exc:  # building the inputs or an anchor failed
        record.update(status="error", reason=f"{type(exc).__name__}: {exc}")
        return record
    record["reference_loss"] = reference_loss

    # An anchor that belongs to one row is timed only when the workload has
    # that row (the per-call workloads have no grad_out row).
    labels = {spec["label"] for spec in workload.rows}
    impls = [impl for impl in impls if impl.row is None or impl.row in labels]
    entries = []
    timed = []
    for impl in impls:
        threads = impl.threads if impl.threads is not None else ctx["n_threads"]
        entry = {
            "name": impl.name,
            "anchor": impl.anchor,
            "threads": threads,
            "note": impl.note,
            "row": impl.row,
            "floor_s": _floor_seconds(workload, threads, bandwidth),
        }
        entry.update(_check_implementation(impl, reference_loss, reference_grad, workload.dtype))
        entries.append(entry)
        if entry["status"] == "ok":
            timed.append((entry, impl))
    del reference_grad

    if workload.blocks_by_anchor:
        blocks = {}
        for pair in timed:
            blocks.setdefault(pair[1].anchor, []).append(pair)
        blocks = list(blocks.values())
    else:
        blocks = [timed]
    stats = []
    for block in blocks:
        stats += time_interleaved(
            [impl.run for _, impl in block],
            mode.n_samples,
            mode.warmup,
            mode.min_sample_s,
            mode.pause_s,
        )
    timed = [pair for block in blocks for pair in block]
    for (entry, _), summary in zip(timed, stats):
        entry.update(summary)
        entry["floor_multiple"] = entry["median_s"] / entry["floor_s"]
    record.update(status="ok", implementations=entries, rows=_rows(workload, entries))
    return record


def _rows(workload, entries):
    """Pair each fastloss implementation of a row with every anchor's result."""
    by_name = {e["name"]: e for e in entries}
    rows = []
    for spec in workload.rows:
        mine = by_name.get(spec["fastloss"])
        row = {"label": spec["label"], "fastloss": spec["fastloss"], "vs": {}}
        row["status"] = mine["status"] if mine else "missing"
        if mine and mine["status"] == "ok":
            row["median_s"] = mine["median_s"]
            row["floor_multiple"] = mine["floor_multiple"]
        for entry in entries:
            if entry["anchor"] == "fastloss":
                continue
            if entry.get("row") is not None and entry["row"] != spec["label"]:
                continue
            versus = {"name": entry["name"], "status": entry["status"]}
            if entry["status"] == "ok":
                versus["median_s"] = entry["median_s"]
                if "median_s" in row:
                    versus["ratio"] = entry["median_s"] / row["median_s"]
            row["vs"][entry["anchor"]] = versus
        rows.append(row)
    return rows


def run_suite(mode, pattern, requested_anchors, progress=None):
    """Run the selected workloads of ``mode``; return the JSON-ready record."""
    n_threads = max_threads()
    available, missing = anchor_lib.load_anchors(requested_anchors)
    defaults = anchor_lib.thread_settings(available)
    ctx = {"anchors": available, "n_threads": n_threads, "seed": SEED}
    # The anchors' modules add millions of long-lived objects. Frozen, they
    # drop out of every later collection, which otherwise took several tenths
    # of a second each with torch and JAX loaded. They are unfrozen at the end.
    gc.collect()
    gc.freeze()
    try:
        results, bandwidth = _run_selected(mode, pattern, ctx, defaults, progress)
    finally:
        gc.unfreeze()
    return {
        "mode": mode.name,
        "n_threads": n_threads,
        "n_samples": mode.n_samples,
        "min_sample_s": mode.min_sample_s,
        "pause_s": mode.pause_s,
        "quiet_cap_s": mode.quiet_cap_s,
        "anchors": available,
        "missing_anchors": missing,
        "anchor_threads": defaults,
        "bandwidth": bandwidth,
        "workloads": results,
    }


def _run_selected(mode, pattern, ctx, defaults, progress):
    """Measure the bandwidth floor, then run each selected workload."""
    n_threads = ctx["n_threads"]
    available = ctx["anchors"]

    wait_for_quiet(mode.quiet_cap_s)
    bandwidth = measure_bandwidth(
        mode.bandwidth_bytes, sorted({1, n_threads}), mode.bandwidth_repeats
    )
    results = []
    selected = select(workloads(mode, n_threads), pattern)
    for index, workload in enumerate(selected):
        if progress is not None:
            progress(f"[{index + 1}/{len(selected)}] {workload.name}")
        results.append(run_workload(workload, mode, ctx, bandwidth))
        for key in ("torch", "numba"):
            if key in available and key in defaults:
                anchor_lib.set_threads(key, defaults[key])
        gc.collect()
    return results, bandwidth
