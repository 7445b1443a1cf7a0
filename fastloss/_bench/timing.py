"""Timing primitives: quiet-machine wait, interleaved samples, bandwidth floor."""

import gc
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# A machine counts as quiet when the other processes use less than this share
# of all cores, over QUIET_WINDOW_S seconds while this process sleeps.
QUIET_BUSY_SHARE = 0.10
QUIET_WINDOW_S = 0.2

# After a parallel region, libgomp's idle workers spin for GOMP_SPINCOUNT
# iterations (300000 when OMP_WAIT_POLICY is unset) before they sleep: 2 to
# 7 ms on a 2-core Xeon, longer than a fixed pause of 2 or 5 ms. A spinning
# worker of one runtime (scikit-learn ships its own libgomp) then occupies
# a core that the next 2-thread sample needs. So after each sample the loop
# waits until no other thread of this process has run for IDLE_WINDOW_S,
# for at most IDLE_CAP_S.
IDLE_WINDOW_S = 0.001
IDLE_CAP_S = 0.1
# A thread counts as asleep when it ran for less than this share of a window
# (a brief wake-up for housekeeping is not spinning).
IDLE_RUN_SHARE = 0.1


def _read_cpu_jiffies():
    """Return ``(busy, total)`` clock ticks of all cores, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    values = [int(v) for v in fields]
    # user nice system idle iowait irq softirq steal: idle and iowait are
    # idle time. guest and guest_nice are already counted in user and nice.
    total = sum(values[:8])
    idle = values[3] + values[4]
    return total - idle, total


def _read_own_jiffies():
    """Return the clock ticks this process (all its threads) has used."""
    with open("/proc/self/stat") as f:
        # The command name may contain spaces, so split after its ")".
        fields = f.read().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of proc(5), utime and stime, are at 11 and 12 here.
    return int(fields[11]) + int(fields[12])


def others_busy_share(window_s=QUIET_WINDOW_S):
    """Return the share of all cores that other processes used over a window.

    This process sleeps during the window, and its own ticks are subtracted,
    so OpenMP worker threads still spinning after a parallel region are not
    counted as load. Returns None where /proc/stat cannot be read.
    """
    try:
        busy0, total0 = _read_cpu_jiffies()
        own0 = _read_own_jiffies()
        time.sleep(window_s)
        busy1, total1 = _read_cpu_jiffies()
        own1 = _read_own_jiffies()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    if total <= 0:
        return None
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / total


def _other_threads_runtime():
    """Return ``{tid: nanoseconds on a CPU}`` for this process's other threads.

    Returns None where /proc/self/task cannot be read.
    """
    own = str(threading.get_native_id())
    result = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tids:
        if tid == own:
            continue
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                result[tid] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
    return result


def wait_for_idle_threads(cap_s=IDLE_CAP_S, window_s=IDLE_WINDOW_S):
    """Wait until no other thread of this process runs, for at most ``cap_s``.

    A thread runs when its CPU time grows by more than IDLE_RUN_SHARE of a
    window of ``window_s``. The wait thus lasts as long as the OpenMP
    workers of the last sample keep spinning. Returns the seconds waited.
    Where the thread times cannot be read, sleeps ``window_s`` and returns
    that.
    """
    start = time.perf_counter()
    before = _other_threads_runtime()
    if before is None:
        time.sleep(window_s)
        return window_s
    limit = IDLE_RUN_SHARE * window_s * 1e9
    while True:
        time.sleep(window_s)
        after = _other_threads_runtime() or {}
        busy = any(after[tid] - before.get(tid, 0) > limit for tid in after)
        waited = time.perf_counter() - start
        if not busy or waited >= cap_s:
            return waited
        before = after


def _spin_seconds(iterations=200_000):
    """Time a fixed pure-Python loop, a probe for CPU contention."""
    start = time.perf_counter()
    acc = 0
    for i in range(iterations):
        acc += i
    return time.perf_counter() - start


def wait_for_quiet(cap_s):
    """Wait until the machine is quiet, for at most ``cap_s`` seconds.

    On Linux the test is the other processes' share of all cores (see
    ``others_busy_share``), which must stay under QUIET_BUSY_SHARE for two
    windows in a row. Elsewhere a fixed spin loop is timed until three runs
    in a row are within 10% of the fastest run seen. Returns a dict with
    ``quiet`` (bool), ``waited_s``, ``method``, ``busy_share`` (the last
    measured share or None) and ``loadavg`` (1-minute load, or None). A cap
    of 0 skips the wait and the measurement, and ``method`` is "skipped".
    """
    if cap_s <= 0:
        return {
            "quiet": False,
            "waited_s": 0.0,
            "method": "skipped",
            "busy_share": None,
            "loadavg": None,
        }
    start = time.perf_counter()
    method = "proc-stat"
    share = None
    quiet = False
    calm_windows = 0
    spins = []
    while True:
        if method == "proc-stat":
            share = others_busy_share()
            if share is None:
                method = "spin-loop"
                continue
            calm_windows = calm_windows + 1 if share < QUIET_BUSY_SHARE else 0
            quiet = calm_windows >= 2
        else:
            spins.append(_spin_seconds())
            best = min(spins)
            quiet = len(spins) >= 3 and all(s <= 1.1 * best for s in spins[-3:])
            time.sleep(0.02)
        waited = time.perf_counter() - start
        if quiet or waited >= cap_s:
            break
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = None
    return {
        "quiet": quiet,
        "waited_s": time.perf_counter() - start,
        "method": method,
        "busy_share": share,
        "loadavg": load,
    }


def summarize(samples):
    """Return median, quartiles, min and max of per-call times in seconds."""
    values = np.sort(np.asarray(samples, dtype=np.float64))
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {
        "median_s": float(median),
        "q1_s": float(q1),
        "q3_s": float(q3),
        "min_s": float(values[0]),
        "max_s": float(values[-1]),
        "samples_s": [float(v) for v in values],
    }


def calls_per_sample(func, min_sample_s):
    """Return how many calls of ``func`` fill ``min_sample_s`` seconds.

    One call is timed, after the caller's warm-up. The count is rounded up
    to 1, 2 or 5 times a power of ten, as ``timeit`` does.
    """
    start = time.perf_counter()
    func()
    once = max(time.perf_counter() - start, 1e-9)
    if once >= min_sample_s:
        return 1
    needed = min_sample_s / once
    power = 10 ** math.floor(math.log10(needed))
    for step in (1, 2, 5, 10):
        if step * power >= needed:
            return int(step * power)
    return int(10 * power)


def time_interleaved(funcs, n_samples, warmup, min_sample_s, pause_s=0.0,
                     idle_cap_s=IDLE_CAP_S):
    """Time several zero-argument callables in round-robin order.

    Each callable is warmed up ``warmup`` times, then calibrated to a number
    of calls per sample. Every round takes one sample of each callable, and
    the starting callable rotates from round to round, so a slow drift of the
    machine spreads over all of them instead of biasing one. After each
    sample, untimed, comes a pause of ``pause_s`` and then a wait of at most
    ``idle_cap_s`` until the OpenMP threads of that sample, which spin for a
    while after a parallel region, are asleep (``wait_for_idle_threads``),
    so that they hold no core when the next sample needs it. The garbage
    collector is off while sampling. Returns, per callable, the summary of
    ``summarize`` plus ``calls_per_sample``, ``idle_wait_s`` (the longest
    wait after one of its samples) and ``others_busy_share`` (the share of
    all cores that other processes used during its samples, from clock
    ticks (usually 100 a second), or None where /proc/stat cannot be read).
    """
    for func in funcs:
        for _ in range(warmup):
            func()
    numbers = [calls_per_sample(func, min_sample_s) for func in funcs]
    samples = [[] for _ in funcs]
    # Per callable: clock ticks of other processes and of all cores.
    ticks = [[0, 0] for _ in funcs]
    waits = [0.0 for _ in funcs]
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for round_index in range(n_samples):
            for offset in range(len(funcs)):
                k = (round_index + offset) % len(funcs)
                func, number = funcs[k], numbers[k]
                before = _cpu_counters()
                start = time.perf_counter()
                for _ in range(number):
                    func()
                samples[k].append((time.perf_counter() - start) / number)
                _add_others_ticks(ticks[k], before, _cpu_counters())
                if pause_s > 0:
                    time.sleep(pause_s)
                if idle_cap_s > 0:
                    waits[k] = max(waits[k], wait_for_idle_threads(idle_cap_s))
    finally:
        if gc_was_enabled:
            gc.enable()
    results = []
    for number, values, wait, (others, total) in zip(numbers, samples, waits, ticks):
        summary = summarize(values)
        summary["calls_per_sample"] = number
        summary["idle_wait_s"] = wait
        summary["others_busy_share"] = others / total if total > 0 else None
        results.append(summary)
    return results


def _cpu_counters():
    """Return ``(busy, total, own)`` clock ticks, or None where unreadable."""
    try:
        busy, total = _read_cpu_jiffies()
        return busy, total, _read_own_jiffies()
    except (OSError, ValueError, IndexError):
        return None


def _add_others_ticks(ticks, before, after):
    """Add to ``ticks`` the clock ticks of other processes and of all cores.

    ``before`` and ``after`` come from ``_cpu_counters``; nothing is added
    where one of them is None.
    """
    if before is None or after is None:
        return
    ticks[0] += max(0, (after[0] - before[0]) - (after[2] - before[2]))
    ticks[1] += after[1] - before[1]


def _add_chunks(a, b, c, n_threads):
    """Run ``np.add(a, b, out=c)`` on ``n_threads`` contiguous chunks at once.

    NumPy releases the GIL inside the add loop, so the chunks run in parallel.
    """
    bounds = np.linspace(0, a.size, n_threads + 1).astype(np.int64)
    chunks = [(a[lo:hi], b[lo:hi], c[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        start = time.perf_counter()
        list(pool.map(lambda abc: np.add(abc[0], abc[1], out=abc[2]), chunks))
        return time.perf_counter() - start


def measure_bandwidth(array_bytes, thread_counts, repeats):
    """Measure a STREAM-like add, ``c = a + b``, on float64 arrays.

    Each of the three arrays has ``array_bytes`` bytes. The bytes moved per
    add are counted as STREAM counts them, ``3 * array_bytes`` (two reads
    and one write), without the extra read that a write-allocate cache makes.
    Returns, per thread count, the best of ``repeats`` runs in bytes per
    second, with the array size used.
    """
    n = max(1, array_bytes // 8)
    a = np.full(n, 1.0)
    b = np.full(n, 2.0)
    c = np.zeros(n)
    moved = 3 * n * 8
    results = {}
    for n_threads in thread_counts:
        if n_threads == 1:
            np.add(a, b, out=c)
            best = math.inf
            for _ in range(repeats):
                start = time.perf_counter()
                np.add(a, b, out=c)
                best = min(best, time.perf_counter() - start)
        else:
            _add_chunks(a, b, c, n_threads)
            best = min(_add_chunks(a, b, c, n_threads) for _ in range(repeats))
        results[str(n_threads)] = {
            "threads": n_threads,
            "best_s": best,
            "bytes_per_s": moved / best,
        }
    return {
        "kernel": "np.add(a, b, out=c), float64, best of %d" % repeats,
        "array_bytes": n * 8,
        "bytes_moved": moved,
        "by_threads": results,
    }
