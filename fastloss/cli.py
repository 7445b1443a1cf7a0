"""The ``fastloss`` command line.

Subcommands::

    fastloss eval LOSS PRED TARGET [--weight FILE] [--reduction R]
                  [--param NAME=VALUE ...] [--grad-out FILE] [--json]
    fastloss diagnose LOGITS TARGET [--loss NAME] [--axis N]
                      [--ignore-index N] [--weight FILE] [--json]
    fastloss demo
    fastloss bench [--quick] [ARGS ...]

Each subcommand is a pair of functions, ``_add_<name>(subparsers)`` that
declares its arguments and ``_run_<name>(args, extra)`` that returns the exit
status, listed in ``SUBCOMMANDS``. Exit status 0 means success and 2 a usage
or input error, reported in one line on stderr without a traceback.
``diagnose`` exits with 1 when it finds an error in its input.
"""

import argparse
import difflib
import importlib
import inspect
import json
import math
import os
import re
import sys

import numpy as np

EXIT_OK = 0
EXIT_ERROR_FOUND = 1
EXIT_USAGE = 2
# The shell's conventions: 128 + SIGINT, and 1 for a closed output pipe.
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 1

# Keywords that eval sets from its own options, never through --param.
_MANAGED_KEYWORDS = {
    "reduction": "--reduction",
    "return_grad": "--grad-out",
    "grad_out": "--grad-out",
}

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_INTEGER = re.compile(r"[+-]?[0-9]+\Z")


class CommandError(Exception):
    """A usage or input error, reported as one line with exit status 2."""


class _ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that reports usage errors in one line."""

    def error(self, message):
        raise CommandError(f"{message} (see '{self.prog} --help')")


# --- fastloss eval -----------------------------------------------------------


def _add_eval(subparsers):
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a loss on arrays stored in files",
        description=(
            "Evaluate a fastloss loss on PRED and TARGET and print it. Files"
            " are .npy (memory-mapped and read in chunks along the first"
            " axis), .npz (FILE.npz or FILE.npz:KEY) or numeric .csv."
        ),
    )
    parser.add_argument("loss", metavar="LOSS",
                        help="loss function name, such as mse_loss")
    parser.add_argument("pred", metavar="PRED",
                        help="predictions or logits (.npy, .npz[:KEY], .csv)")
    parser.add_argument("target", metavar="TARGET", help="targets, same formats")

    parser.add_argument("--weight", metavar="FILE",
                        help="array passed as the loss's weight keyword")
    parser.add_argument("--reduction", default="mean",
                        choices=("mean", "sum", "none"),
                        help="reduction of the per-element losses (default: mean)")
    parser.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE",
        help=(
            "extra keyword for the loss, repeatable: an int, float, true/false,"
            " none, a comma-separated list (1,2,3), @FILE for an array from a"
            " file, or else a string; for example delta=2.0 or n_threads=4"
        ),
    )

    parser.add_argument("--grad-out", metavar="FILE.npy",
                        help="write the gradient of the printed loss to this .npy file")
    parser.add_argument(
        "--loss-out", metavar="FILE.npy",
        help="with --reduction none, write the per-element losses to this .npy"
             " file in place of printing them",
    )
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object in place of the bare loss")

    parser.add_argument(
        "--chunk-size", type=_positive_int, metavar="ELEMENTS",
        default=None,
        help=(
            "largest number of PRED elements per chunk (default: the"
            " FASTLOSS_CHUNK_SIZE environment variable, else 4194304)"
        ),
    )
    parser.add_argument("--no-progress", action="store_true",
                        help="never show a progress bar on stderr")
    parser.set_defaults(run=_run_eval)


def _positive_int(text):
    if not _INTEGER.match(text.strip()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _run_eval(args, extra):
    from . import _evaluate
    from . import io as fio

    func = find_loss(args.loss)
    parsed = parse_params(args.param)
    _check_keywords(func, args.loss, parsed, args.weight is not None)
    if args.loss_out is not None and args.reduction != "none":
        raise CommandError("--loss-out needs --reduction none")
    for option, path in (("--grad-out", args.grad_out), ("--loss-out", args.loss_out)):
        if path is not None:
            _check_output_path(option, path, [args.pred, args.target, args.weight])
    if args.grad_out is not None and args.loss_out is not None:
        if os.path.abspath(args.grad_out) == os.path.abspath(args.loss_out):
            raise CommandError("--grad-out and --loss-out must name different files")

    pred = _load(fio, args.pred, "PRED")
    target = _load(fio, args.target, "TARGET")
    weight = None if args.weight is None else _load(fio, args.weight, "--weight")
    params = dict(parsed)
    for name, value in parsed.items():
        if _is_file_value(value):
            params[name] = _load(fio, value[1:], f"--param {name}")
    chunk_elements = args.chunk_size or _chunk_size_from_environment()

    try:
        result = _evaluate.evaluate(
            func, args.loss, pred, target, weight=weight,
            reduction=args.reduction, params=params, grad_path=args.grad_out,
            loss_path=args.loss_out, chunk_elements=chunk_elements,
            progress=not args.no_progress,
        )
    except (ValueError, TypeError) as exc:
        raise CommandError(f"{args.loss}: {exc}{_diagnose_hint(args)}") from None
    except OSError as exc:
        raise CommandError(f"cannot write output: {exc}") from None

    loss = result["loss"]
    if args.json:
        report = {
            "loss": _json_value(loss),
            "loss_name": args.loss,
            "reduction": args.reduction,
            "n": result["n"],
            "dtype": str(_result_dtype(loss, pred)),
            "shape": list(np.shape(pred)),
            "chunks": result["chunks"],
            "params": {k: _json_param(v) for k, v in parsed.items()},
        }
        if "weight_sum" in result:
            report["weight_sum"] = _json_value(result["weight_sum"])
        if args.grad_out is not None:
            report["grad_out"] = args.grad_out
        if args.loss_out is not None:
            report["loss_out"] = args.loss_out
        print(json.dumps(report, allow_nan=False))
    elif loss is None:
        pass
    elif np.ndim(loss) == 0:
        print(str(loss))
    else:
        _print_array(np.asarray(loss))
    return EXIT_OK


def available_losses():
    """Return the sorted names of the loss functions that fastloss exports.

    A loss is a public callable whose signature has a ``reduction``
    parameter, so losses added to the package later are found without a
    list kept here.
    """
    import fastloss

    names = []
    for name in getattr(fastloss, "__all__", dir(fastloss)):
        obj = getattr(fastloss, name, None)
        if name.startswith("_") or not callable(obj):
            continue
        try:
            parameters = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            continue
        if "reduction" in parameters:
            names.append(name)
    return sorted(names)


def find_loss(name):
    """Return the fastloss loss function called ``name``.

    Raises CommandError naming the known losses when there is none.
    """
    known = available_losses()
    if name in known:
        import fastloss

        return getattr(fastloss, name)
    message = f"unknown loss {name!r}"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    listed = ", ".join(known) if known else "none in this build"
    raise CommandError(f"{message}; known losses: {listed}")


def parse_params(items):
    """Parse ``NAME=VALUE`` strings into a dict of keyword arguments.

    Values become, in this order of preference: None (``none``, ``null``),
    a bool (``true``, ``false``), an int, a float (``nan`` and ``inf``
    included), a list of those when the value contains a comma, and else
    the string itself. A value starting with ``@`` names a file and is
    loaded later; it is kept here as the string. Raises CommandError for a
    malformed item or a repeated name.
    """
    params = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep:
            raise CommandError(f"--param expects NAME=VALUE, got {item!r}")
        if not _NAME.match(name):
            raise CommandError(
                f"--param name must be a Python identifier, got {name!r} in {item!r}"
            )
        if name in params:
            raise CommandError(f"--param {name} is given more than once")
        params[name] = _parse_value(value.strip(), item)
    return params


def _parse_value(text, item):
    if text == "":
        raise CommandError(f"--param {item!r} has an empty value")
    if _is_file_value(text):
        return text
    if "," in text:
        parts = text.split(",")
        if parts[-1].strip() == "":
            # "3," is a one-element list.
            parts = parts[:-1]
        values = []
        for part in parts:
            part = part.strip()
            if part == "":
                raise CommandError(f"--param {item!r} has an empty list element")
            values.append(_parse_scalar(part))
        return values
    return _parse_scalar(text)


def _parse_scalar(text):
    lower = text.lower()
    if lower in ("none", "null"):
        return None
    if lower == "true":
        return True
    if lower == "false":
        return False
    if _INTEGER.match(text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def _is_file_value(value):
    return isinstance(value, str) and value.startswith("@") and len(value) > 1


def _check_keywords(func, loss_name, params, have_weight):
    """Raise CommandError for a --param or --weight the loss does not take."""
    for name, option in _MANAGED_KEYWORDS.items():
        if name in params:
            raise CommandError(f"set {name} with {option}, not with --param")
    if have_weight and "weight" in params:
        raise CommandError("weight is given both by --weight and by --param")
    try:
        parameters = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [
        name for name, p in parameters.items()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                      inspect.Parameter.POSITIONAL_OR_KEYWORD)
        and p.default is not inspect.Parameter.empty
        and name not in _MANAGED_KEYWORDS
    ]
    requested = [(name, f"--param {name}") for name in params]
    if have_weight:
        requested.append(("weight", "--weight"))
    for name, source in requested:
        if name not in accepted:
            raise CommandError(
                f"{source}: {loss_name} has no keyword {name!r};"
                f" it accepts: {', '.join(accepted) or 'none'}"
            )


def _check_output_path(option, path, inputs):
    from . import io as fio

    if not path.lower().endswith(".npy"):
        raise CommandError(f"{option} must name an .npy file, got {path!r}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CommandError(f"{option}: directory not found: {directory!r}")
    if not os.path.exists(path):
        return
    for spec in inputs:
        if spec is None:
            continue
        source = fio.split_spec(spec)[0]
        if os.path.exists(source) and os.path.samefile(source, path):
            raise CommandError(
                f"{option} {path!r} is also an input file; choose another path"
            )


def _load(fio, spec, label):
    try:
        return fio.load_array(spec)
    except (OSError, ValueError) as exc:
        raise CommandError(f"{label}: {exc}") from None


def _chunk_size_from_environment():
    from ._evaluate import DEFAULT_CHUNK_ELEMENTS

    text = os.environ.get("FASTLOSS_CHUNK_SIZE", "").strip()
    if not text:
        return DEFAULT_CHUNK_ELEMENTS
    if not _INTEGER.match(text) or int(text) < 1:
        raise CommandError(
            f"FASTLOSS_CHUNK_SIZE must be an integer >= 1, got {text!r}"
        )
    return int(text)


def _result_dtype(loss, pred):
    if loss is not None:
        return np.asarray(loss).dtype
    from ._validation import compute_dtype

    return compute_dtype(pred.dtype)


def _json_value(value):
    """Return ``value`` as JSON-ready Python data, non-finite floats as None."""
    if value is None:
        return None
    a = np.asarray(value)
    if a.ndim == 0:
        x = float(a)
        return x if math.isfinite(x) else None
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        return [_json_value(row) for row in a]
    return a.tolist()


def _json_param(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_json_param(v) for v in value]
    return value


def _print_array(a):
    """Print ``a`` one value per line in C order, at full precision."""
    digits = 9 if a.dtype == np.float32 else 17
    np.savetxt(sys.stdout, a.reshape(-1), fmt=f"%.{digits}g")


def _diagnose_hint(args):
    """Return a pointer to ``fastloss diagnose`` for the losses it checks."""
    from .diagnosis import LOSSES

    if args.loss not in LOSSES:
        return ""
    return (
        f" (run 'fastloss diagnose {args.pred} {args.target} --loss {args.loss}'"
        " to find the cause and the fix)"
    )


# --- fastloss diagnose -------------------------------------------------------


def _add_diagnose(subparsers):
    from .diagnosis import LOSSES

    parser = subparsers.add_parser(
        "diagnose",
        help="find the input mistakes behind a huge or stuck loss",
        description=(
            "Check one batch of LOGITS and TARGET for the input mistakes behind"
            " a loss that is huge or does not go down, and print a report with"
            " a fix for each finding. Files are .npy, .npz (FILE.npz or"
            " FILE.npz:KEY) or numeric .csv. The exit status is 0 when no error"
            " is found (warnings alone included), 1 when one is, and 2 for a"
            " usage or input error."
        ),
    )
    parser.add_argument("logits", metavar="LOGITS",
                        help="logits of one batch (.npy, .npz[:KEY], .csv)")
    parser.add_argument("target", metavar="TARGET",
                        help="class indices, class probabilities or 0/1 targets")
    parser.add_argument("--loss", default="cross_entropy", choices=LOSSES,
                        metavar="NAME",
                        help="the loss the batch is for (default: cross_entropy;"
                             f" one of {', '.join(LOSSES)})")
    parser.add_argument("--axis", type=int, default=1, metavar="N",
                        help="class axis of LOGITS (default: 1; -1 for"
                             " channels-last data)")
    parser.add_argument("--ignore-index", type=int, default=-100, metavar="N",
                        help="class index whose positions are left out"
                             " (default: -100)")
    parser.add_argument("--weight", metavar="FILE",
                        help="per-class weights, an array of shape (C,)")
    parser.add_argument("--json", action="store_true",
                        help='print one JSON object with "ok", "findings" and'
                             ' "stats" in place of the report')
    parser.set_defaults(run=_run_diagnose)


def _run_diagnose(args, extra):
    import fastloss
    from . import io as fio

    logits = _load(fio, args.logits, "LOGITS")
    target = _load(fio, args.target, "TARGET")
    weight = None if args.weight is None else _load(fio, args.weight, "--weight")
    try:
        diagnosis = fastloss.diagnose(
            logits, target, loss=args.loss, axis=args.axis,
            ignore_index=args.ignore_index, weight=weight,
        )
    except (ValueError, TypeError) as exc:
        raise CommandError(f"diagnose: {exc}") from None

    if args.json:
        print(diagnosis.to_json())
    else:
        print(diagnosis)
    return EXIT_ERROR_FOUND if diagnosis.has_errors() else EXIT_OK


# --- fastloss demo -----------------------------------------------------------


def _add_demo(subparsers):
    parser = subparsers.add_parser(
        "demo",
        help="fit models to bundled data sets with fastloss gradients",
        description=(
            "Run the fastloss demonstration on data sets that scikit-learn"
            " and scikit-image ship, without downloading anything. Needs pip"
            ' install "fastloss[demo]".'
        ),
    )
    parser.set_defaults(run=_run_demo)


def _run_demo(args, extra):
    from . import demo

    try:
        demo.run(sys.stdout)
    except demo.MissingDependencyError as exc:
        raise CommandError(str(exc)) from None
    return EXIT_OK


# --- fastloss bench ----------------------------------------------------------


def _add_bench(subparsers):
    # --help and every option other than --quick belong to
    # fastloss.benchmarks, so they are passed on rather than parsed here.
    parser = subparsers.add_parser(
        "bench",
        add_help=False,
        help="time the losses against NumPy, PyTorch and other installed"
             " implementations",
    )
    parser.add_argument("--quick", action="store_true",
                        help="run a short subset of the benchmarks")
    parser.set_defaults(run=_run_bench, takes_extra=True)


def _run_bench(args, extra):
    argv = (["--quick"] if args.quick else []) + list(extra)
    try:
        benchmarks = importlib.import_module(f"{__package__}.benchmarks")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__package__}.benchmarks":
            raise CommandError(
                "fastloss bench needs the fastloss.benchmarks module,"
                " which this installation does not include"
            ) from None
        raise CommandError(
            f"fastloss bench needs the package {exc.name!r}:"
            ' pip install "fastloss[bench]"'
        ) from None
    status = benchmarks.main(argv)
    return EXIT_OK if status is None else int(status)


# --- entry point -------------------------------------------------------------

# Each entry adds one subcommand to the parser, in the order of --help. The
# run function that a subcommand registers returns the exit status, so a
# command may exit with 1 for a finding in its input, apart from the 2 that
# every usage or input error gets.
SUBCOMMANDS = [_add_eval, _add_diagnose, _add_demo, _add_bench]


def build_parser():
    """Return the ``fastloss`` argument parser with every subcommand."""
    import fastloss

    parser = _ArgumentParser(
        prog="fastloss",
        description="Fused, OpenMP-parallel loss functions and gradients for NumPy.",
    )
    parser.add_argument("--version", action="version",
                        version=f"fastloss {fastloss.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND",
                                       parser_class=_ArgumentParser)
    for add in SUBCOMMANDS:
        add(subparsers)
    parser.command_names = list(subparsers.choices)
    return parser


def main(argv=None):
    """Run the ``fastloss`` command line and return its exit status.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; ``sys.argv[1:]`` by default.
    """
    if argv is None:
        argv = sys.argv[1:]
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if args.command is None:
            raise CommandError(
                f"a command is required, one of: {', '.join(parser.command_names)}"
                " (see 'fastloss --help')"
            )
        if extra and not getattr(args, "takes_extra", False):
            raise CommandError(
                f"unrecognized arguments: {' '.join(extra)}"
                f" (see 'fastloss {args.command} --help')"
            )
        return args.run(args, extra)
    except CommandError as exc:
        message = " ".join(str(exc).split())
        print(f"fastloss: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:
        # argparse exits after --help and --version.
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or EXIT_OK
        raise
    except KeyboardInterrupt:
        print("fastloss: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout has gone, as with `fastloss eval ... | head`.
        # Point stdout at devnull so that the interpreter's final flush does
        # not raise a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
