# Shared pieces of every fastloss kernel module.
#
# Deterministic reductions: a kernel cuts its flat iteration space into blocks
# of BLOCK_SIZE items, sums each block alone in double precision into
# ``partials[b]``, and then combines the partials with ``sum_partials`` in a
# fixed pairwise order. The block boundaries depend only on the problem size,
# never on the thread count, so the result is bit-identical for every
# ``n_threads``. Block sums of at most BLOCK_SIZE doubles and a pairwise tree
# over the blocks keep the rounding error near O(log n) ulp, which holds 6+
# correct digits for a float32 mean over 1e8 elements.

from libc.stdlib cimport malloc, free
from libc.math cimport fabs, exp, log, log1p, expm1, sqrt, tanh, isnan, isinf, INFINITY, NAN

ctypedef fused floating:
    float
    double

# Items per reduction block. Large enough that the per-block overhead (one
# store and a scheduling step) is noise, small enough that 2 threads get
# balanced work on 1e5 elements.
cdef enum:
    BLOCK_SIZE = 4096

# Below this many items a kernel runs on the calling thread: starting an
# OpenMP team costs a few microseconds, more than the work itself.
cdef enum:
    MIN_PARALLEL_ITEMS = 32768


cdef inline Py_ssize_t n_blocks(Py_ssize_t n_items) noexcept nogil:
    """Number of BLOCK_SIZE blocks that cover ``n_items`` (0 for 0 items)."""
    return (n_items + BLOCK_SIZE - 1) // BLOCK_SIZE


cdef inline int threads_for(Py_ssize_t n_items, int n_threads) noexcept nogil:
    """Thread count for ``n_items`` of work: 1 below MIN_PARALLEL_ITEMS.

    Never more than one thread per BLOCK_SIZE items, because a thread
    without a block of its own only costs its start.
    """
    if n_items < MIN_PARALLEL_ITEMS or n_threads < 1:
        return 1
    if n_threads > n_items // BLOCK_SIZE:
        return <int>(n_items // BLOCK_SIZE)
    return n_threads


cdef inline double sum_partials(const double* x, Py_ssize_t n) noexcept nogil:
    """Sum ``x[0:n]`` in a fixed pairwise order that depends only on ``n``."""
    cdef Py_ssize_t half
    cdef double acc
    cdef Py_ssize_t i
    if n <= 8:
        acc = 0.0
        for i in range(n):
            acc += x[i]
        return acc
    half = n // 2
    return sum_partials(x, half) + sum_partials(x + half, n - half)
