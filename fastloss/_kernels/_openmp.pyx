"""Report how the kernels were built, how many threads OpenMP offers, and
which SIMD instruction sets the CPU supports."""

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int fastloss_openmp_enabled(void) { return 1; }
    static int fastloss_max_threads(void) { return omp_get_max_threads(); }
    #else
    static int fastloss_openmp_enabled(void) { return 0; }
    static int fastloss_max_threads(void) { return 1; }
    #endif
    """
    int fastloss_openmp_enabled() noexcept nogil
    int fastloss_max_threads() noexcept nogil

cdef extern from *:
    """
    #ifndef FASTLOSS_SIMD_COPIES
    #define FASTLOSS_SIMD_COPIES 0
    #endif
    """
    int FASTLOSS_SIMD_COPIES

cdef extern from "cpu_features.h" nogil:
    int fl_simd_level()


def openmp_enabled():
    """Return True if the kernels were compiled with OpenMP support."""
    return bool(fastloss_openmp_enabled())


def max_threads():
    """Return the thread count OpenMP uses by default (``OMP_NUM_THREADS``)."""
    return int(fastloss_max_threads())


def cpu_simd_level():
    """Return 0 (baseline), 1 (AVX2 and FMA) or 2 (AVX-512) for this CPU.

    A level counts only when the operating system saves the registers it
    uses, so the kernels built for it can run here.
    """
    return int(fl_simd_level())


def simd_copies_built():
    """Return True if this build was meant to include the AVX2 and AVX-512 copies."""
    return bool(FASTLOSS_SIMD_COPIES)
