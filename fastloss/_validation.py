"""Input checks and array plumbing shared by every loss family.

Each helper takes the name of the argument it checks, so that a message
names the argument, what was expected and what was received. All checks run
before any output is allocated or any kernel is called.
"""

import math
import os
import operator

import numpy as np

from ._kernels._openmp import max_threads

REDUCTIONS = ("mean", "sum", "none")

# dtype.kind values that a floating input may have. Booleans and integers are
# promoted to float64, float16 to float32.
_NUMERIC_KINDS = frozenset("biuf")
_INTEGER_KINDS = frozenset("biu")


def compute_dtype(dtype):
    """Return the float dtype that an input of ``dtype`` is computed in."""
    if dtype.kind == "f":
        if dtype.itemsize <= 4:
            return np.dtype(np.float32)
        return np.dtype(np.float64)
    return np.dtype(np.float64)


def as_array(x, name):
    """Convert ``x`` to an ndarray of a numeric dtype in native byte order.

    Raises TypeError for complex, object, string and other non-numeric data.
    """
    a = x if type(x) is np.ndarray else np.asarray(x)
    kind = a.dtype.kind
    if kind not in _NUMERIC_KINDS:
        raise TypeError(
            f"{name} must be an array of real numbers, got dtype {a.dtype}"
            f" ({_describe_kind(kind)})"
        )
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    return a


def as_float_array(x, name, dtype=None):
    """Convert ``x`` to a float array of ``dtype`` (default: its compute dtype).

    The array is returned as it is, without a copy, when it already has that
    dtype in native byte order. Its strides and read-only flag are then kept.
    """
    a = as_array(x, name)
    if dtype is None:
        dtype = compute_dtype(a.dtype)
    if a.dtype != dtype:
        # A float64 value beyond float32's range becomes inf, the value the
        # kernel would see anyway, so NumPy's overflow warning is noise.
        with np.errstate(over="ignore"):
            a = a.astype(dtype)
    return a


def as_index_array(x, name, hint=""):
    """Convert ``x`` to an integer array of class indices.

    Any integer dtype is accepted and read as its native values. A floating
    array raises TypeError; ``hint`` is appended to that message.
    """
    a = as_array(x, name)
    if a.dtype.kind not in _INTEGER_KINDS or a.dtype.kind == "b":
        raise TypeError(
            f"{name} must hold integer class indices, got dtype {a.dtype}{hint}"
        )
    if a.dtype != np.int64:
        if a.dtype.kind == "u" and a.dtype.itemsize == 8:
            # uint64 above int64's range must stay out of range, not wrap to
            # a valid negative index such as ignore_index.
            too_big = a > np.iinfo(np.int64).max
            a = a.astype(np.int64)
            if too_big.any():
                a[too_big] = np.iinfo(np.int64).max
        else:
            a = a.astype(np.int64)
    return a


def check_reduction(reduction, allowed=REDUCTIONS):
    """Raise ValueError unless ``reduction`` is one of ``allowed``."""
    if isinstance(reduction, str) and reduction in allowed:
        # A str subclass such as numpy.str_ becomes a plain str.
        return str(reduction)
    choices = ", ".join(repr(r) for r in allowed)
    raise ValueError(f"reduction must be one of {choices}, got {reduction!r}")


# The largest thread count a kernel call starts. It is far above any count
# that still gains speed, and a request for 100000 threads failed to start
# on a 2-core machine with the default limits.
MAX_THREADS = max(256, 4 * (os.cpu_count() or 1))


def resolve_n_threads(n_threads):
    """Return the thread count for a kernel call.

    ``None`` means the count OpenMP offers (``OMP_NUM_THREADS`` or all
    cores); an int of 1 or more is used as it is, up to ``MAX_THREADS``.
    A larger count is lowered to that cap: the results are the same for
    every count, and starting tens of thousands of threads can exhaust the
    process's memory or thread limit.
    """
    if n_threads is None:
        return max_threads()
    if isinstance(n_threads, (bool, np.bool_)):
        raise TypeError(f"n_threads must be None or an int, got {n_threads!r}")
    try:
        n = operator.index(n_threads)
    except TypeError:
        raise TypeError(
            f"n_threads must be None or an int, got {type(n_threads).__name__}"
        ) from None
    if n < 1:
        raise ValueError(f"n_threads must be None or an int >= 1, got {n}")
    return n if n <= MAX_THREADS else MAX_THREADS


def check_same_shape(a, b, name_a, name_b):
    """Raise ValueError unless ``a`` and ``b`` have exactly the same shape."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_b} must have the shape of {name_a} {a.shape}, got {b.shape}"
            " (no broadcasting is done)"
        )


def check_grad_out(grad_out, shape, dtype):
    """Validate a preallocated gradient array and return it."""
    if not isinstance(grad_out, np.ndarray):
        raise TypeError(
            f"grad_out must be a numpy.ndarray, got {type(grad_out).__name__}"
        )
    if grad_out.shape != shape:
        raise ValueError(f"grad_out must have shape {shape}, got {grad_out.shape}")
    if grad_out.dtype != dtype or not grad_out.dtype.isnative:
        raise ValueError(
            f"grad_out must have dtype {dtype} in native byte order,"
            f" got {grad_out.dtype.str}"
        )
    if not grad_out.flags.writeable:
        raise ValueError("grad_out must be writeable, got a read-only array")
    return grad_out


def check_scalar(value, name, low=None, high=None, low_open=False):
    """Return ``value`` as a float after checking ``low <= value <= high``.

    ``low_open=True`` makes the lower bound strict. NaN always fails.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    ok = v == v
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v <= high
    if not ok:
        if low is not None and high is not None:
            expected = f"in [{low}, {high}]"
        elif low is not None:
            expected = f"> {low}" if low_open else f">= {low}"
        else:
            expected = f"<= {high}"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return v


# Doubles of at least this magnitude round to +-inf in float32: FLT_MAX plus
# half an ulp (2**104) rounds away under round-half-to-even.
_FLOAT32_OVERFLOW = 2.0**128 - 2.0**103
_float32 = np.float32


def to_scalar(value, dtype):
    """Return the Python float ``value`` as a NumPy scalar of ``dtype``.

    A value beyond float32's range becomes +-inf without NumPy's overflow
    warning. A NaN becomes the positive quiet NaN, because the sign that a
    kernel's NaN gets depends on the order of the operands in the machine
    code, which differs between the SIMD builds and between layouts.
    """
    scalar = dtype.type
    if value != value:
        return scalar(math.nan)
    if scalar is _float32 and not -_FLOAT32_OVERFLOW < value < _FLOAT32_OVERFLOW:
        value = math.copysign(math.inf, value)
    return scalar(value)


def grad_out_needs_buffer(grad_out, arrays):
    """Return True when ``grad_out`` overlaps one of ``arrays`` unsafely.

    This is for kernels that read every input element before they write the
    gradient element at the same index. For them ``grad_out`` may be the
    very same view as an input (same data pointer, shape, strides and
    dtype). Any other overlap, such as a reversed view or a broadcast row,
    would let the kernel read a gradient element that it has already
    written, so the caller computes into a fresh array and copies that to
    ``grad_out``.
    """
    if grad_out is None:
        return False
    for a in arrays:
        if a is None or not np.may_share_memory(grad_out, a):
            continue
        same_view = (
            a.dtype == grad_out.dtype
            and a.shape == grad_out.shape
            and a.strides == grad_out.strides
            and a.__array_interface__["data"][0]
            == grad_out.__array_interface__["data"][0]
        )
        if not same_view:
            return True
    return False


def normalize_axis(axis, ndim, name="axis"):
    """Return ``axis`` as a non-negative index into ``ndim`` dimensions.

    A bool raises TypeError, as it does for NumPy's reductions.
    """
    if isinstance(axis, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        a = operator.index(axis)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(axis).__name__}") from None
    if not -ndim <= a < ndim:
        raise ValueError(
            f"{name} {a} is out of bounds for an array with {ndim} dimensions"
        )
    return a % ndim


def collapse(shape, strides):
    """Collapse dimensions into one ``(size, stride)`` pair, or return None.

    Returns None when the dimensions cannot be walked with a single stride.
    Dimensions of length 1 are ignored; an empty product has stride 0.
    """
    size = 1
    stride = 0
    have = False
    for n, s in zip(reversed(shape), reversed(strides)):
        if n == 1:
            continue
        if n == 0:
            return 0, 0
        if not have:
            size, stride, have = n, s, True
        elif s == stride * size:
            size *= n
        else:
            return None
        # stride stays the innermost stride; size grows.
    return size, stride


def as_2d_views(arrays):
    """Return 2-D views of same-shaped arrays that walk them in step.

    The views have shape ``(rows, cols)`` and visit the elements of every
    array in the same logical order. Axes are merged wherever every array
    allows it, in C order or, failing that, in F order. When no split into
    two mergeable runs exists, the arrays that are not C-contiguous are
    copied to C order, and only those.
    """
    shape = arrays[0].shape
    if len(shape) <= 1:
        n = shape[0] if shape else 1
        return [a.reshape(1, n) for a in arrays]
    if arrays[0].size == 0:
        return [a.reshape(1, 0) for a in arrays]
    if all(a.flags.c_contiguous for a in arrays):
        return [a.reshape(1, -1) for a in arrays]
    if all(a.flags.f_contiguous for a in arrays):
        return [a.T.reshape(1, -1) for a in arrays]

    axes = [i for i, n in enumerate(shape) if n != 1]
    strides_list = [a.strides for a in arrays]
    for ordered in (axes, axes[::-1]):
        split = _split_point(ordered, shape, strides_list)
        if split is not None:
            return [_view_2d(a, ordered, split) for a in arrays]

    arrays = [a if a.flags.c_contiguous else np.ascontiguousarray(a) for a in arrays]
    return [a.reshape(1, -1) for a in arrays]


def as_3d_views(arrays):
    """Return 3-D views of same-shaped arrays that walk them in step.

    Like ``as_2d_views``, but the axes may form up to three mergeable runs,
    so an array broadcast along a middle axis, such as a ``(1, C, 1)``
    weight against ``(N, C, L)`` data, is read in place. When more than
    three runs remain, the arrays that are not C-contiguous are copied to
    C order, and only those.
    """
    shape = arrays[0].shape
    if len(shape) <= 1 or arrays[0].size == 0:
        n = arrays[0].size
        return [a.reshape(1, 1, n) for a in arrays]
    if all(a.flags.c_contiguous for a in arrays):
        return [a.reshape(1, 1, -1) for a in arrays]
    if all(a.flags.f_contiguous for a in arrays):
        return [a.T.reshape(1, 1, -1) for a in arrays]

    axes = [i for i, n in enumerate(shape) if n != 1]
    strides_list = [a.strides for a in arrays]
    for ordered in (axes, axes[::-1]):
        breaks = _run_breaks(ordered, shape, strides_list)
        if len(breaks) <= 2:
            return [_view_3d(a, ordered, breaks) for a in arrays]

    arrays = [a if a.flags.c_contiguous else np.ascontiguousarray(a) for a in arrays]
    return [a.reshape(1, 1, -1) for a in arrays]


def _run_breaks(axes, shape, strides_list):
    """Return the indices into ``axes`` where a new mergeable run starts."""
    return [
        i + 1
        for i in range(len(axes) - 1)
        if any(
            st[axes[i]] != st[axes[i + 1]] * shape[axes[i + 1]] for st in strides_list
        )
    ]


def _view_3d(a, axes, breaks):
    """View ``a`` as three runs of ``axes``, cut at ``breaks`` (at most two)."""
    cuts = [0] * (2 - len(breaks)) + list(breaks)
    runs = [axes[: cuts[0]], axes[cuts[0] : cuts[1]], axes[cuts[1] :]]
    sizes = []
    strides = []
    for run in runs:
        size = 1
        for ax in run:
            size *= a.shape[ax]
        sizes.append(size)
        strides.append(a.strides[run[-1]] if run else 0)
    return np.lib.stride_tricks.as_strided(
        a, shape=tuple(sizes), strides=tuple(strides), writeable=a.flags.writeable
    )


def _split_point(axes, shape, strides_list):
    """Return where ``axes`` splits into two runs that merge in every array.

    ``axes`` lists the axes from outermost to innermost. Returns the index of
    the first axis of the inner run, or None when more than two runs remain.
    """
    breaks = [
        i + 1
        for i in range(len(axes) - 1)
        if any(
            st[axes[i]] != st[axes[i + 1]] * shape[axes[i + 1]] for st in strides_list
        )
    ]
    if len(breaks) > 1:
        return None
    return breaks[0] if breaks else 0


def _view_2d(a, axes, split):
    """View ``a`` as ``(rows, cols)``: rows walk ``axes[:split]``, cols the rest."""
    outer, inner = axes[:split], axes[split:]
    rows = 1
    for ax in outer:
        rows *= a.shape[ax]
    cols = 1
    for ax in inner:
        cols *= a.shape[ax]
    outer_stride = a.strides[outer[-1]] if outer else 0
    inner_stride = a.strides[inner[-1]] if inner else 0
    return np.lib.stride_tricks.as_strided(
        a,
        shape=(rows, cols),
        strides=(outer_stride, inner_stride),
        writeable=a.flags.writeable,
    )


def class_axis_view(x, axis):
    """View ``x`` as ``(outer, C, inner)`` around its class axis, in place.

    ``outer`` merges the axes before ``axis`` and ``inner`` those after it.
    The array is copied to C order only when those axes cannot be merged.
    Returns the 3-D view and ``x`` itself or its copy.
    """
    shape, strides = x.shape, x.strides
    outer = collapse(shape[:axis], strides[:axis])
    inner = collapse(shape[axis + 1 :], strides[axis + 1 :])
    if outer is None or inner is None:
        x = np.ascontiguousarray(x)
        shape, strides = x.shape, x.strides
        outer = collapse(shape[:axis], strides[:axis])
        inner = collapse(shape[axis + 1 :], strides[axis + 1 :])
    view = np.lib.stride_tricks.as_strided(
        x,
        shape=(outer[0], shape[axis], inner[0]),
        strides=(outer[1], strides[axis], inner[1]),
        writeable=x.flags.writeable,
    )
    return view, x


def index_view(t, split):
    """View ``t`` as ``(outer, inner)``, splitting its axes at ``split``.

    Copies to C order only when the axes on either side cannot be merged.
    """
    shape, strides = t.shape, t.strides
    outer = collapse(shape[:split], strides[:split])
    inner = collapse(shape[split:], strides[split:])
    if outer is None or inner is None:
        t = np.ascontiguousarray(t)
        shape, strides = t.shape, t.strides
        outer = collapse(shape[:split], strides[:split])
        inner = collapse(shape[split:], strides[split:])
    return np.lib.stride_tricks.as_strided(
        t,
        shape=(outer[0], inner[0]),
        strides=(outer[1], inner[1]),
        writeable=t.flags.writeable,
    )


def _describe_kind(kind):
    return {
        "c": "complex",
        "O": "object",
        "U": "string",
        "S": "bytes",
        "V": "structured or void",
        "M": "datetime",
        "m": "timedelta",
    }.get(kind, "not a real number")
