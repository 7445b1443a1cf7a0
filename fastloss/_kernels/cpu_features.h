/* Which SIMD instruction sets this CPU and its operating system support.
 *
 * fl_simd_level() returns the highest level whose kernels may run here.
 * Level 0 is the baseline of the architecture (SSE2 on x86-64, or any
 * non-x86 CPU). Level 1 is AVX2 with FMA and F16C, with the OS saving the
 * YMM registers. Level 2 is AVX-512 F, CD, BW, DQ and VL, with the OS
 * saving the ZMM registers.
 *
 * The test of XCR0 matters as much as the CPUID bits: a CPU can have AVX-512
 * while a hypervisor or an old kernel does not save its registers, and then
 * the first AVX-512 instruction faults.
 */
#ifndef FASTLOSS_CPU_FEATURES_H
#define FASTLOSS_CPU_FEATURES_H

#if defined(__x86_64__) || defined(_M_X64) || defined(_M_AMD64)
#define FL_X86_64 1
#if defined(_MSC_VER)
#include <intrin.h>
#include <immintrin.h>
static inline void fl_cpuid(int leaf, int subleaf, unsigned int r[4]) {
    int regs[4];
    __cpuidex(regs, leaf, subleaf);
    r[0] = (unsigned int)regs[0]; r[1] = (unsigned int)regs[1];
    r[2] = (unsigned int)regs[2]; r[3] = (unsigned int)regs[3];
}
static inline unsigned long long fl_xgetbv(void) { return _xgetbv(0); }
#else
#include <cpuid.h>
static inline void fl_cpuid(int leaf, int subleaf, unsigned int r[4]) {
    __cpuid_count(leaf, subleaf, r[0], r[1], r[2], r[3]);
}
static inline unsigned long long fl_xgetbv(void) {
    unsigned int lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}
#endif
#endif

static inline int fl_simd_level(void) {
#ifdef FL_X86_64
    unsigned int r[4];
    unsigned long long xcr0;
    int max_leaf;

    fl_cpuid(0, 0, r);
    max_leaf = (int)r[0];
    if (max_leaf < 7) {
        return 0;
    }
    fl_cpuid(1, 0, r);
    /* ECX: FMA (12), OSXSAVE (27), AVX (28), F16C (29). */
    if ((r[2] & (1u << 27)) == 0) {
        return 0;
    }
    if ((r[2] & ((1u << 12) | (1u << 28) | (1u << 29))) !=
            ((1u << 12) | (1u << 28) | (1u << 29))) {
        return 0;
    }
    xcr0 = fl_xgetbv();
    if ((xcr0 & 0x6) != 0x6) {          /* XMM and YMM state */
        return 0;
    }
    fl_cpuid(7, 0, r);
    /* EBX: AVX2 (5), AVX512F (16), AVX512DQ (17), AVX512CD (28),
     * AVX512BW (30), AVX512VL (31). */
    if ((r[1] & (1u << 5)) == 0) {
        return 0;
    }
    {
        unsigned int avx512 = (1u << 16) | (1u << 17) | (1u << 28) |
                              (1u << 30) | (1u << 31);
        if ((r[1] & avx512) == avx512 && (xcr0 & 0xe6) == 0xe6) {
            return 2;                   /* opmask, ZMM_Hi256, Hi16_ZMM */
        }
    }
    return 1;
#else
    return 0;
#endif
}

/* The level that the including file is being compiled for, from the
 * compiler's own macros. */
static inline int fl_compiled_level(void) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__)
    return 2;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

#endif /* FASTLOSS_CPU_FEATURES_H */
