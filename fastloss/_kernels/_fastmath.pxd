# Vectorizable exp and log1p of fastmath.h, and a fused-type exp for kernels.

cdef extern from "fastmath.h" nogil:
    float fl_expf(float x)
    double fl_exp(double x)
    float fl_expf_nonpos(float x)
    double fl_exp_nonpos(double x)
    double fl_log1p(double x)
    float fl_log1pf(float x)

from ._common cimport floating


cdef inline floating fast_exp(floating x) noexcept nogil:
    """Return ``e**x`` in the precision of ``x`` (within 2 ulp of libm)."""
    if floating is float:
        return fl_expf(x)
    else:
        return fl_exp(x)


cdef inline floating fast_exp_nonpos(floating x) noexcept nogil:
    """Return ``e**x`` for ``x <= 0``, flushing results below the smallest
    normal number to 0, in the precision of ``x``."""
    if floating is float:
        return fl_expf_nonpos(x)
    else:
        return fl_exp_nonpos(x)
