"""Report how the kernels were built and how many threads OpenMP offers."""

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


def openmp_enabled():
    """Return True if the kernels were compiled with OpenMP support."""
    return bool(fastloss_openmp_enabled())


def max_threads():
    """Return the thread count OpenMP uses by default (``OMP_NUM_THREADS``)."""
    return int(fastloss_max_threads())
