"""The run's outputs: machine description, JSON record, Markdown table, plot."""

import json
import os
import platform
import sys
import sysconfig

import numpy as np

import fastloss
from fastloss._kernels._openmp import max_threads

from .anchors import ANCHORS, LABELS
from .timing import IDLE_CAP_S

# MIN_PARALLEL_ITEMS of _common.pxd, which the regression kernels export.
THRESHOLD_ITEMS = fastloss.regression._PARALLEL_MIN_ITEMS

GROUP_TITLES = {
    "regression": "Regression losses",
    "classification": "Classification losses",
    "overlap": "Overlap losses",
    "per-call": "Per-call cost on 16 elements",
}


def cpu_model():
    """Return the CPU model name, from /proc/cpuinfo where it exists."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info():
    """Describe the machine, the libraries and the fastloss build."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "fastloss": fastloss.__version__,
        "fastloss_path": os.path.dirname(fastloss.__file__),
        "openmp_enabled": bool(fastloss.openmp_enabled()),
        "openmp_max_threads": max_threads(),
        "simd_level": fastloss.simd_level(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        # The C flags Python was built with, which setuptools passes to every
        # extension before the -O3 -fno-math-errno and OpenMP flags that
        # fastloss's setup.py adds.
        "python_cflags": sysconfig.get_config_var("CFLAGS"),
    }


def write_json(record, path):
    with open(path, "w") as f:
        json.dump(record, f, indent=1, allow_nan=True)
        f.write("\n")


def format_seconds(seconds):
    """Format a duration with a unit that keeps 3 significant digits."""
    if seconds is None:
        return "—"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def format_bytes(n):
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def format_number(x):
    """Format a ratio or multiple with 3 significant digits and no exponent."""
    if x >= 1000:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def _spread(entry):
    return f"{format_seconds(entry['q1_s'])}–{format_seconds(entry['q3_s'])}"


def _versus_cell(versus):
    if versus is None:
        return "—"
    if versus["status"] == "wrong":
        return "wrong"
    if versus["status"] == "error":
        return "error"
    if "ratio" not in versus:
        return format_seconds(versus.get("median_s"))
    return f"{format_seconds(versus['median_s'])} ({format_number(versus['ratio'])}×)"


def _anchors_in(record):
    return [key for key in ANCHORS if key in record["anchors"]]


def _workload_table(workloads, anchors):
    header = ["workload", "bytes moved", "fastloss (IQR)", "× floor"]
    header += [LABELS[a] for a in anchors]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for w in workloads:
        by_name = {e["name"]: e for e in w["implementations"]}
        for row in w["rows"]:
            name = w["name"] + (f", {row['label']}" if row["label"] else "")
            mine = by_name.get(row["fastloss"])
            if mine is None:
                cells = [name, format_bytes(w["bytes_moved"]), "missing", "—"]
            elif mine["status"] != "ok":
                cells = [name, format_bytes(w["bytes_moved"]), mine["status"], "—"]
            else:
                timing = f"{format_seconds(mine['median_s'])} ({_spread(mine)})"
                floor = "—" if w["per_call"] else format_number(mine["floor_multiple"])
                cells = [name, format_bytes(w["bytes_moved"]), timing, floor]
            cells += [_versus_cell(row["vs"].get(a)) for a in anchors]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _thread_table(workload):
    counts = workload["params"]["thread_counts"]
    header = ["library"] + [f"{k} thread{'s' if k > 1 else ''}" for k in counts]
    if len(counts) > 1:
        header.append("speed-up")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    # An implementation is named "<library> <k>t", fastloss also
    # "fastloss grad_out <k>t": one line per name without the count.
    by_line = {}
    for entry in workload["implementations"]:
        label = entry["name"].rsplit(" ", 1)[0]
        by_line.setdefault(label, {})[entry["threads"]] = entry
    for label, entries in by_line.items():
        lines.append("| " + " | ".join([label] + _thread_cells(entries, counts)) + " |")
    return lines


def _thread_cells(entries, counts):
    """Return the time per thread count and the speed-up of one table line."""
    cells = []
    for k in counts:
        entry = entries.get(k)
        if entry is None:
            cells.append("—")
        elif entry["status"] != "ok":
            cells.append(entry["status"])
        else:
            cells.append(
                f"{format_seconds(entry['median_s'])}"
                f" ({format_number(entry['floor_multiple'])}× floor)"
            )
    if len(counts) > 1:
        first, last = entries.get(counts[0]), entries.get(counts[-1])
        if first and last and first["status"] == last["status"] == "ok":
            cells.append(f"{format_number(first['median_s'] / last['median_s'])}×")
        else:
            cells.append("—")
    return cells


def _threshold_table(workloads):
    """Return the table of the parallel-threshold sweep, one line per size."""
    counts = workloads[0]["params"]["thread_counts"]
    header = ["n"] + [f"{k} thread{'s' if k > 1 else ''}" for k in counts]
    if len(counts) > 1:
        header.append("speed-up")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for w in sorted(workloads, key=lambda w: w["params"]["n"]):
        entries = {e["threads"]: e for e in w["implementations"]}
        lines.append("| " + " | ".join([str(w["params"]["n"])]
                                       + _thread_cells(entries, counts)) + " |")
    return lines


def _break_even(workloads, threshold):
    """Estimate the size from which all threads beat one, as a sentence.

    The estimate uses the smallest swept size ``n`` from ``threshold`` up,
    with ``t1`` the time on one thread and ``tk`` on ``k``. Starting the
    team costs ``c = tk - t1 / k``. With the work proportional to the size,
    ``k`` threads pay from ``c * n / (t1 * (1 - 1 / k))`` items. Returns
    None when no such size was timed.
    """
    for w in sorted(workloads, key=lambda w: w["params"]["n"]):
        n = w["params"]["n"]
        counts = w["params"]["thread_counts"]
        entries = {e["threads"]: e for e in w["implementations"] if e["status"] == "ok"}
        timed = {counts[0], counts[-1]} <= set(entries)
        if n < threshold or len(counts) < 2 or not timed:
            continue
        k = counts[-1]
        t1 = entries[counts[0]]["median_s"]
        tk = entries[k]["median_s"]
        cost = tk - t1 / k
        items = cost * n / (t1 * (1 - 1 / k))
        return (
            f"From n={n}: starting a team of {k} costs about"
            f" {format_seconds(max(cost, 0.0))},"
            f" so {k} threads pay from about {max(items, 0.0):.0f} items"
            f" (MIN_PARALLEL_ITEMS is {threshold})."
        )
    return None


def _problems(workloads):
    """List every implementation that failed its check or raised."""
    lines = []
    for w in workloads:
        for entry in w.get("implementations", []):
            if entry["status"] in ("wrong", "error"):
                lines.append(
                    f"- {w['name']}, {entry['name']}: {entry['status']}, not timed."
                    f" {entry['message']}"
                )
    return lines


def _method_text(record):
    sample = format_seconds(record["min_sample_s"])
    pause = format_seconds(record["pause_s"])
    return (
        "Each implementation is checked against a float64 NumPy reference before"
        " it is timed, and one that fails the check is reported and not timed."
        " The implementations of a workload are sampled in rotating round-robin"
        f" order, {record['n_samples']} samples each after a warm-up. Every sample"
        f" repeats the call for at least {sample} and is followed by an untimed"
        f" {pause} pause and then a wait (at most {format_seconds(IDLE_CAP_S)}) until"
        " no other thread of the process has run for a millisecond, so that the"
        " OpenMP workers of one sample, which spin for several milliseconds"
        " after a parallel region, are asleep before the next sample runs."
        " The tables give the median per call, the"
        " interquartile range for fastloss, and for each anchor its median with the"
        " ratio `anchor / fastloss` (above 1, fastloss is faster). Each workload"
        " starts after a wait of at most"
        f" {record['quiet_cap_s']:g} s until other processes use under 10% of"
        " all cores. Every implementation may use all cores unless its row says"
        " otherwise, but NumPy itself runs on one core except inside BLAS calls."
    )


HISTORY_HEADING = "## Optimization history"


def kept_history(path):
    """Return the hand-written history section of an existing page, or "".

    The section starts at ``HISTORY_HEADING`` and runs to the end of the
    page. Regenerating ``BENCHMARKS.md`` keeps it, because its before/after
    numbers come from runs of older code that a new run cannot repeat.
    """
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return ""
    start = text.find("\n" + HISTORY_HEADING + "\n")
    return text[start + 1 :] if start >= 0 else ""


def render_markdown(record, history=""):
    """Render the record as the Markdown page ``BENCHMARKS.md``.

    ``history`` (a section from ``kept_history``) is appended unchanged.
    """
    machine = record["machine"]
    bandwidth = record["bandwidth"]
    anchors = _anchors_in(record)
    out = [
        "# fastloss benchmarks",
        "",
        f"Produced by `{record['command']}` on {record['started']} ({record['mode']} mode,"
        f" {record['wall_s']:.0f} s).",
        "",
        "## Machine",
        "",
        f"- CPU: {machine['cpu']}, {machine['logical_cpus']} logical CPUs"
        f" ({machine['usable_cpus']} usable by this process)",
        f"- {machine['platform']}, Python {machine['python']}, NumPy {machine['numpy']}",
        f"- fastloss {machine['fastloss']}: openmp_enabled={machine['openmp_enabled']},"
        f" OpenMP max threads {machine['openmp_max_threads']},"
        f" SIMD build {machine.get('simd_level', 'baseline')},"
        f" OMP_NUM_THREADS={machine['OMP_NUM_THREADS']}",
        f"- C flags from Python's build: `{machine['python_cflags']}`",
    ]
    for key in anchors:
        if not key.startswith("numpy"):
            out.append(f"- {LABELS[key]} {record['anchors'][key]}")
    for key, reason in record["missing_anchors"].items():
        out.append(f"- {LABELS[key]}: not run ({reason})")
    pools = ", ".join(f"{k} {v}" for k, v in record["anchor_threads"].items())
    out.append(f"- Default thread counts: {pools}")

    out += ["", "## Memory-bandwidth floor", ""]
    out.append(
        f"`{bandwidth['kernel']}` on three arrays of {format_bytes(bandwidth['array_bytes'])},"
        f" counted as {format_bytes(bandwidth['bytes_moved'])} moved per add (two reads,"
        " one write; the extra read of a write-allocate cache is not counted):"
    )
    out.append("")
    for key, value in bandwidth["by_threads"].items():
        out.append(f"- {key} thread(s): {value['bytes_per_s'] / 1e9:.3g} GB/s")
    out += [
        "",
        "A workload's floor is the bytes it must move divided by this bandwidth at",
        "its thread count; `× floor` is the median time over that floor. Workloads",
        "whose arrays fit in the caches can run below the floor (a multiple under 1).",
    ]

    out += [
        "",
        "## Method",
        "",
        _method_text(record),
        "",
        "The scikit-learn rows include the reduction that its per-sample"
        " `loss_gradient` leaves to the caller: a sum of the per-sample losses and"
        " an in-place scaling of the gradient. Its MSE row uses `HalfSquaredError`,"
        " which is `0.5 * d**2`, and doubles it. PyTorch rows time the forward pass"
        " plus `backward()`, JAX rows a jitted `value_and_grad`, and numba rows a"
        " fused `parallel=True` kernel that writes into a preallocated gradient."
        " Careful NumPy allocates its gradient per call on a plain row, as fastloss"
        " does there, and writes into a preallocated one on a `grad_out` row.",
    ]

    workloads = record["workloads"]
    for group, title in GROUP_TITLES.items():
        members = [w for w in workloads if w["group"] == group and w["status"] == "ok"]
        if not members:
            continue
        out += ["", f"## {title}", ""]
        out += _workload_table(members, anchors)
        notes = sorted(
            {f"{e['name']}: {e['note']}" for w in members for e in w["implementations"] if e["note"]}
        )
        if notes:
            out += [""] + [f"- {n}" for n in notes]

    for w in workloads:
        if w["group"] == "threads" and w["status"] == "ok":
            out += ["", f"## Thread scaling: {w['name'].rsplit(',', 1)[0]}", ""]
            out += [
                "Each library is timed in a block of its own, its thread counts"
                " interleaved. fastloss allocates the gradient per call on its"
                " first line and writes into `grad_out` on the second;"
                " scikit-learn and numba write into preallocated arrays, PyTorch"
                " allocates its gradient.",
                "",
            ]
            out += _thread_table(w)
            busy = [e.get("others_busy_share") for e in w["implementations"]]
            busy = [b for b in busy if b is not None]
            if busy and max(busy) >= 0.1:
                out += [
                    "",
                    f"Other processes used up to {max(busy):.0%} of all cores during"
                    " the samples of one implementation, so a thread"
                    " count above the free cores was time-sliced and its times"
                    " overstate what a quiet machine gives.",
                ]

    sweep = [w for w in workloads if w["group"] == "threshold" and w["status"] == "ok"]
    if sweep:
        out += [
            "",
            "## Parallel threshold: mse_loss float32 with grad_out",
            "",
            f"Below MIN_PARALLEL_ITEMS ({THRESHOLD_ITEMS} items) every kernel"
            " runs on the"
            " calling thread whatever `n_threads` says, so there the two columns"
            " time the same work; from it up, the speed-up is what a second"
            " thread gains.",
            "",
        ]
        out += _threshold_table(sweep)
        estimate = _break_even(sweep, THRESHOLD_ITEMS)
        if estimate is not None:
            out += ["", estimate]

    bytes_lines = sorted({f"- {w['name']}: {w['bytes_note']}" for w in workloads if w["status"] == "ok"})
    if bytes_lines:
        out += ["", "## Bytes each workload must move", ""] + bytes_lines

    skipped = [w for w in workloads if w["status"] != "ok"]
    if skipped:
        out += ["", "## Skipped workloads", ""]
        out += [f"- {w['name']}: {w['status']}, {w['reason']}" for w in skipped]
    problems = _problems(workloads)
    if problems:
        out += ["", "## Implementations that failed the check", ""] + problems
    not_quiet = [
        w["name"]
        for w in workloads
        if w.get("quiet") and w["quiet"]["method"] != "skipped" and not w["quiet"]["quiet"]
    ]
    if not_quiet:
        out += [
            "",
            f"The machine was not quiet at the start of {len(not_quiet)} of"
            f" {len(workloads)} workloads (the wait hit its cap); see `quiet` in the JSON record.",
        ]
    page = "\n".join(out) + "\n"
    if history:
        page += "\n" + history.rstrip("\n") + "\n"
    return page


def write_plot(record, path):
    """Plot fastloss's speed-up over each anchor per row; return False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False

    anchors = _anchors_in(record)
    labels = []
    ratios = {a: [] for a in anchors}
    for w in record["workloads"]:
        if w["status"] != "ok":
            continue
        for row in w["rows"]:
            labels.append(w["name"] + (f", {row['label']}" if row["label"] else ""))
            for a in anchors:
                versus = row["vs"].get(a)
                ratios[a].append(versus.get("ratio", np.nan) if versus else np.nan)
    if not labels:
        return False

    markers = "osD^vP*X"
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(labels) + 1.6))
    positions = np.arange(len(labels))
    for i, a in enumerate(anchors):
        ax.scatter(ratios[a], positions, marker=markers[i % len(markers)], s=22, label=LABELS[a])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(positions)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.grid(axis="x", which="both", alpha=0.3)
    ax.set_xlabel("anchor time / fastloss time (above 1: fastloss is faster)")
    ax.set_title(f"fastloss against each anchor ({record['machine']['cpu']})", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
