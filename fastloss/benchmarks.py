"""Benchmark fastloss against the code its users would otherwise run.

``main`` checks and times, in one process, fastloss and every installed
anchor (naive and careful NumPy, PyTorch, scikit-learn, JAX, numba) on the
same inputs, measures the machine's memory-bandwidth floor, and writes a
JSON record, a Markdown page and a plot. ``fastloss bench``,
``python -m bench`` and ``python bench/run.py`` all call it.
"""

import argparse
import datetime
import os
import shlex
import sys
import time

from ._bench import report
from ._bench.anchors import ANCHORS
from ._bench.suite import make_mode, run_suite


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fastloss bench",
        description="Check and time fastloss against NumPy, PyTorch, scikit-learn,"
        " JAX and numba on the same inputs.",
    )
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument(
        "--quick",
        action="store_true",
        help="smaller sizes and 7 samples per implementation (about a minute)",
    )
    sizes.add_argument(
        "--tiny",
        action="store_true",
        help="toy sizes that run in seconds, for testing the suite (timings are meaningless)",
    )
    parser.add_argument("--json", metavar="PATH", help="write the full record as JSON to PATH")
    parser.add_argument(
        "--markdown", metavar="PATH", help="write the Markdown report (BENCHMARKS.md) to PATH"
    )
    parser.add_argument(
        "--plot", metavar="PATH", help="write a PNG plot to PATH (needs matplotlib)"
    )
    parser.add_argument(
        "--filter",
        metavar="NAME",
        help="run only the workloads whose name contains NAME, or whose group is NAME"
        " (regression, classification, overlap, per-call, threads)",
    )
    parser.add_argument(
        "--anchors",
        metavar="LIST",
        default=",".join(ANCHORS),
        help="comma-separated anchors to compare with (default: all of %(default)s);"
        " those not installed are skipped",
    )
    return parser


def describe_command(argv):
    """Return the shell command that reproduces this run."""
    if argv is None:
        argv = sys.argv[1:]
    elif list(sys.argv[len(sys.argv) - len(argv) :]) != list(argv):
        # Called from Python with arguments of its own.
        return f"python -c 'import fastloss.benchmarks as b; b.main({list(argv)!r})'"
    program = sys.argv[0] if sys.argv else "fastloss"
    if program.endswith("__main__.py"):
        package = os.path.basename(os.path.dirname(program))
        words = ["python", "-m", package]
    elif program.endswith(".py"):
        words = ["python", os.path.relpath(program)]
    else:
        words = [os.path.basename(program)]
    prefix = list(sys.argv[1 : len(sys.argv) - len(argv)])
    return shlex.join(words + prefix + list(argv))


def _parse_anchors(parser, text):
    requested = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in requested if a not in ANCHORS]
    if unknown:
        parser.error(f"unknown anchor {unknown[0]!r}; expected some of {', '.join(ANCHORS)}")
    return requested


def main(argv=None):
    """Run the benchmark suite; return the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    requested = _parse_anchors(parser, args.anchors)
    if args.tiny:
        mode = make_mode("tiny")
    elif args.quick:
        mode = make_mode("quick")
    else:
        mode = make_mode("full")

    started = datetime.datetime.now(datetime.timezone.utc)
    clock = time.perf_counter()
    record = {
        "schema": 1,
        "command": describe_command(argv),
        "started": started.isoformat(timespec="seconds"),
        "machine": report.machine_info(),
        "filter": args.filter,
    }

    def progress(message):
        print(message, file=sys.stderr, flush=True)

    record.update(run_suite(mode, args.filter, requested, progress=progress))
    record["wall_s"] = time.perf_counter() - clock

    history = report.kept_history(args.markdown) if args.markdown else ""
    markdown = report.render_markdown(record, history)
    if args.json:
        report.write_json(record, args.json)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown)
    if args.plot and not report.write_plot(record, args.plot):
        print(
            f"no plot written to {args.plot}: matplotlib is not installed"
            " or no workload was timed",
            file=sys.stderr,
        )
    if not args.markdown:
        sys.stdout.write(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
