"""Compiled kernels. Private: call the public functions in ``fastloss``.

The modules in ``DISPATCHED`` are built once for the architecture's baseline
and, on x86-64, again with AVX2 and with AVX-512 code generation, as
``<name>_avx2`` and ``<name>_avx512``. ``load`` returns the build for the
highest level that both this CPU and the ``FASTLOSS_SIMD`` environment
variable allow. Every build computes the same bits: the kernels do no
reassociation and no FMA contraction, so a wider vector changes the speed
and not the result. The one exception is the sign of a NaN output, which
x86 takes from the operand order of each instruction.
"""

import importlib
import os

from ._openmp import cpu_simd_level

DISPATCHED = ("_overlap", "_regression", "_sigmoid", "_softmax", "_stats")
LEVELS = ("baseline", "avx2", "avx512")
_SUFFIXES = {"baseline": "", "avx2": "_avx2", "avx512": "_avx512"}


def _requested_level():
    value = os.environ.get("FASTLOSS_SIMD", "").strip().lower()
    if value in ("", "auto"):
        return len(LEVELS) - 1
    if value not in LEVELS:
        raise ImportError(
            f"FASTLOSS_SIMD={value!r} is not a SIMD level; expected one of "
            f"'auto', {', '.join(repr(name) for name in LEVELS)}"
        )
    return LEVELS.index(value)


def _built(level):
    # A level counts as built when every dispatched module has that build;
    # a build without AVX-512 support in the compiler has none of them.
    suffix = _SUFFIXES[level]
    if not suffix:
        return True
    try:
        for name in DISPATCHED:
            importlib.import_module(f"{__name__}.{name}{suffix}")
    except ImportError:
        return False
    return True


def _select_level():
    highest = min(cpu_simd_level(), _requested_level())
    for index in range(highest, 0, -1):
        if _built(LEVELS[index]):
            return LEVELS[index]
    return "baseline"


SIMD_LEVEL = _select_level()


def load(name, level=None):
    """Return the kernel module ``name`` built for ``level``.

    ``level`` defaults to ``SIMD_LEVEL``, the one chosen at import.
    """
    if name not in DISPATCHED:
        raise ValueError(f"{name!r} is not a dispatched kernel module")
    suffix = _SUFFIXES[SIMD_LEVEL if level is None else level]
    return importlib.import_module(f"{__name__}.{name}{suffix}")


def available_levels():
    """Return the levels that are built and that this CPU can run."""
    top = cpu_simd_level()
    return [level for index, level in enumerate(LEVELS)
            if index <= top and _built(level)]
