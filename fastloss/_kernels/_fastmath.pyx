"""Array wrappers of the fastmath.h functions, for testing their accuracy.

The kernels call the C functions directly; these loops let the tests
compare them with NumPy and mpmath over whole ranges of inputs.
"""

from ._common cimport floating


def exp(const floating[::1] x, floating[::1] out):
    """Write ``e**x`` of each element of ``x`` to ``out``."""
    cdef Py_ssize_t i
    with nogil:
        for i in range(x.shape[0]):
            out[i] = fast_exp(x[i])


def exp_nonpos(const floating[::1] x, floating[::1] out):
    """Write ``e**x`` of each element of ``x`` (at most 0) to ``out``."""
    cdef Py_ssize_t i
    with nogil:
        for i in range(x.shape[0]):
            out[i] = fast_exp_nonpos(x[i])


def log1p(const double[::1] x, double[::1] out):
    """Write ``log(1 + x)`` of each element of ``x`` (float64) to ``out``."""
    cdef Py_ssize_t i
    with nogil:
        for i in range(x.shape[0]):
            out[i] = fl_log1p(x[i])


def log1pf(const float[::1] x, float[::1] out):
    """Write ``log(1 + x)`` of each element of ``x`` (float32) to ``out``."""
    cdef Py_ssize_t i
    with nogil:
        for i in range(x.shape[0]):
            out[i] = fl_log1pf(x[i])
