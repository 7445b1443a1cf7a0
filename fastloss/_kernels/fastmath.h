/*
 * Branch-free exp and log1p that gcc and clang can vectorize inside a loop.
 *
 * libm's exp is an opaque call, so a loop that calls it runs one element at
 * a time. These functions use only arithmetic, selects (?: on values) and
 * integer operations on the bit pattern, so the compiler inlines them and
 * runs a loop over an array in SSE2 (or wider) vectors. gcc if-converts the
 * selects only under -fno-trapping-math, which setup.py passes.
 *
 * exp: range reduction x = k ln2 + r with |r| <= ln2 / 2 (Cody-Waite split of
 * ln2, so that k ln2 is exact), a polynomial for e^r, and 2^k built from
 * exponent bits. float uses the degree-6 minimax polynomial of Cephes expf.c
 * (S. L. Moshier); double uses the Taylor polynomial of degree 13, whose
 * truncation error on |r| <= ln2 / 2 is below 5e-18. 2^k is applied as two
 * factors 2^(k/2) and 2^(k - k/2), so that both are normal numbers: a
 * subnormal result rounds once, and the full range needs no branch. Inputs
 * are clamped first, so that overflow gives +inf, underflow gives +0, -inf
 * gives 0, and NaN (which fails both comparisons) propagates through the
 * polynomial. Measured (tests/test_fastmath.py): at most 1 ulp from the
 * correctly rounded result in float and in double, subnormals included.
 *
 * log1p: log1p(x) = log(u) + (x - (u - 1)) / u with u = 1 + x rounded, the
 * second term restoring the bits of x that the rounding of u dropped. log(u)
 * splits u = 2^e m with m in [sqrt(1/2), sqrt(2)) and sums the series
 * log(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716, to s^21, in
 * the arrangement of fdlibm's log. Valid for x >= -1, which is all the
 * softmax kernels need (x is a sum of exps): x < -1 gives NaN, x = -1 gives
 * -inf, +inf gives +inf. Measured: at most 1 ulp from the correctly
 * rounded result. fl_log1pf is the same in float.
 *
 * The rounding constant trick (adding 1.5 * 2^23 or 1.5 * 2^52) relies on
 * strict IEEE evaluation: do not build this file with -ffast-math.
 */
#ifndef FASTLOSS_FASTMATH_H
#define FASTLOSS_FASTMATH_H

#include <math.h>  /* INFINITY and NAN only; no libm calls */
#include <stdint.h>
#include <string.h>

static inline uint32_t fl_bits_f(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static inline float fl_from_bits_f(uint32_t u) {
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

static inline uint64_t fl_bits_d(double x) {
    uint64_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static inline double fl_from_bits_d(uint64_t u) {
    double x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* e^x in float. */
static inline float fl_expf(float x) {
    const float shift = 12582912.0f;          /* 1.5 * 2^23 */
    const float log2e = 1.44269504088896341f;
    const float ln2_hi = 0.693359375f;        /* 8 significant bits */
    const float ln2_lo = -2.12194440e-4f;
    /* Above 89 e^x overflows, and k = 128 makes the result inf. Below -104
       e^x is under half the smallest subnormal and rounds to 0. */
    float xc = x > 89.0f ? 89.0f : x;
    xc = xc < -104.0f ? -104.0f : xc;

    float kf = xc * log2e + shift;            /* round to nearest integer */
    int32_t k = (int32_t)(fl_bits_f(kf) - fl_bits_f(shift));
    kf -= shift;
    float r = xc - kf * ln2_hi;
    r = r - kf * ln2_lo;

    float r2 = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r2 + r + 1.0f;

    int32_t k1 = k >> 1;
    int32_t k2 = k - k1;
    float s1 = fl_from_bits_f((uint32_t)(k1 + 127) << 23);
    float s2 = fl_from_bits_f((uint32_t)(k2 + 127) << 23);
    return (p * s1) * s2;
}

/* e^x in double. */
static inline double fl_exp(double x) {
    const double shift = 6755399441055744.0;  /* 1.5 * 2^52 */
    const double log2e = 1.4426950408889634074;
    const double ln2_hi = 6.93145751953125e-1;
    const double ln2_lo = 1.42860682030941723212e-6;
    /* Above 710 e^x overflows, and k = 1024 makes the result inf. Below
       -746 e^x is under half the smallest subnormal and rounds to 0. */
    double xc = x > 710.0 ? 710.0 : x;
    xc = xc < -746.0 ? -746.0 : xc;

    double kf = xc * log2e + shift;
    int64_t k = (int64_t)(fl_bits_d(kf) - fl_bits_d(shift));
    kf -= shift;
    double r = xc - kf * ln2_hi;
    r = r - kf * ln2_lo;

    /* Taylor polynomial of degree 13: on |r| <= ln2 / 2 its truncation
       error is below 5e-18 relative. 1 is added last, so the rounding of
       the small terms costs well under one ulp. */
    double q = 1.0 / 6227020800.0;            /* 1 / 13! */
    q = q * r + 1.0 / 479001600.0;
    q = q * r + 1.0 / 39916800.0;
    q = q * r + 1.0 / 3628800.0;
    q = q * r + 1.0 / 362880.0;
    q = q * r + 1.0 / 40320.0;
    q = q * r + 1.0 / 5040.0;
    q = q * r + 1.0 / 720.0;
    q = q * r + 1.0 / 120.0;
    q = q * r + 1.0 / 24.0;
    q = q * r + 1.0 / 6.0;
    q = q * r + 0.5;
    double p = 1.0 + (r + (r * r) * q);

    /* 2^k as 2^k1 * 2^k2, k1 = floor(k / 2). The biased kb = k + 2048 is
       never negative, so only logical shifts are needed (SSE2 has no
       arithmetic shift of 64-bit lanes). */
    uint64_t kb = (uint64_t)(k + 2048);
    uint64_t e1 = (kb >> 1) - 1;               /* k1 + 1023 */
    uint64_t e2 = kb - (kb >> 1) - 1;          /* k - k1 + 1023 */
    double s1 = fl_from_bits_d(e1 << 52);
    double s2 = fl_from_bits_d(e2 << 52);
    return (p * s1) * s2;
}

/* e^x in float for x <= 0, such as a logit minus the max of its softmax.
   Results below the smallest normal float (x < -87.336544) are flushed to
   +0. Then 2^k is a single normal factor and no clamp is needed, which in
   an SSE2 loop takes about a third fewer instructions than fl_expf
   (counted with callgrind). -inf gives 0 and NaN propagates. Positive x is
   outside the domain, and wrong above 88.7. */
static inline float fl_expf_nonpos(float x) {
    const float shift = 12582912.0f;          /* 1.5 * 2^23 */
    const float log2e = 1.44269504088896341f;
    const float ln2_hi = 0.693359375f;
    const float ln2_lo = -2.12194440e-4f;
    /* log(2^-126) rounded down. Between the two the result is a subnormal,
       rounded once. */
    const float min_normal_log = -87.33654475f;

    float kf = x * log2e + shift;
    int32_t k = (int32_t)(fl_bits_f(kf) - fl_bits_f(shift));
    kf -= shift;
    float r = x - kf * ln2_hi;
    r = r - kf * ln2_lo;

    float r2 = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r2 + r + 1.0f;

    /* Below the cut-off k and the bits of 2^k are meaningless. */
    float result = p * fl_from_bits_f((uint32_t)(k + 127) << 23);
    return x < min_normal_log ? 0.0f : result;
}

/* e^x in double for x <= 0: fl_exp's method with fl_expf_nonpos's single
   factor, flushing results below 2^-1022 (x < -708.39642) to +0. */
static inline double fl_exp_nonpos(double x) {
    const double shift = 6755399441055744.0;  /* 1.5 * 2^52 */
    const double log2e = 1.4426950408889634074;
    const double ln2_hi = 6.93145751953125e-1;
    const double ln2_lo = 1.42860682030941723212e-6;
    const double min_normal_log = -708.3964185322641;  /* log(2^-1022) */

    double kf = x * log2e + shift;
    int64_t k = (int64_t)(fl_bits_d(kf) - fl_bits_d(shift));
    kf -= shift;
    double r = x - kf * ln2_hi;
    r = r - kf * ln2_lo;

    double q = 1.0 / 6227020800.0;            /* 1 / 13! */
    q = q * r + 1.0 / 479001600.0;
    q = q * r + 1.0 / 39916800.0;
    q = q * r + 1.0 / 3628800.0;
    q = q * r + 1.0 / 362880.0;
    q = q * r + 1.0 / 40320.0;
    q = q * r + 1.0 / 5040.0;
    q = q * r + 1.0 / 720.0;
    q = q * r + 1.0 / 120.0;
    q = q * r + 1.0 / 24.0;
    q = q * r + 1.0 / 6.0;
    q = q * r + 0.5;
    double p = 1.0 + (r + (r * r) * q);

    double result = p * fl_from_bits_d((uint64_t)(k + 1023) << 52);
    return x < min_normal_log ? 0.0 : result;
}

/* log(1 + x) in double, for x >= -1. */
static inline double fl_log1p(double x) {
    const double ln2_hi = 6.93147180369123816490e-01;  /* 32 significant bits */
    const double ln2_lo = 1.90821492927058770002e-10;
    const uint64_t sqrt_half_bits = 0x3fe6a09e667f3bcdULL;  /* sqrt(1/2) */
    const uint64_t mantissa_mask = 0x000fffffffffffffULL;

    double u = 1.0 + x;
    /* The part of x that rounding 1 + x dropped, divided by u: the first
       order correction of log(u). It is 0 when the sum was exact. */
    double c = (x - (u - 1.0)) / u;

    /* u = 2^e m with m in [sqrt(1/2), sqrt(2)): offsetting the bits of u
       by those of 1 - sqrt(1/2) before reading the exponent field puts m
       in that range. */
    uint64_t shifted = fl_bits_d(u) + (0x3ff0000000000000ULL - sqrt_half_bits);
    /* e = (shifted >> 52) - 1023, converted to double by placing the
       integer in the mantissa of 2^52, which vectorizes without the 64-bit
       integer conversions that SSE2 lacks. */
    double e = fl_from_bits_d((shifted >> 52) | 0x4330000000000000ULL)
               - (4503599627370496.0 + 1023.0);
    double m = fl_from_bits_d((shifted & mantissa_mask) + sqrt_half_bits);

    /* log(m) = log(1 + f) = 2 atanh(s) with s = f / (2 + f) and
       2 atanh(s) = 2s + s R, R = sum_k 2 s^2k / (2k + 1), arranged as in
       fdlibm's log so that the leading terms f - f^2 / 2 stay exact. */
    double f = m - 1.0;
    double s = f / (2.0 + f);
    double s2 = s * s;
    double t = 2.0 / 21.0;
    t = t * s2 + 2.0 / 19.0;
    t = t * s2 + 2.0 / 17.0;
    t = t * s2 + 2.0 / 15.0;
    t = t * s2 + 2.0 / 13.0;
    t = t * s2 + 2.0 / 11.0;
    t = t * s2 + 2.0 / 9.0;
    t = t * s2 + 2.0 / 7.0;
    t = t * s2 + 2.0 / 5.0;
    t = t * s2 + 2.0 / 3.0;
    double big_r = t * s2;
    double hfsq = 0.5 * f * f;
    double result = e * ln2_hi - ((hfsq - (s * (hfsq + big_r) + (e * ln2_lo + c))) - f);

    /* The bit manipulation above is meaningless for these inputs. */
    result = u == INFINITY ? u : result;
    result = u == 0.0 ? -INFINITY : result;
    result = (u < 0.0) | (x != x) ? NAN : result;
    return result;
}

/* log(1 + x) in float, for x >= -1: fl_log1p's method with float constants.
   ln2_hi keeps 17 significant bits. The series stops at s^11, whose next
   term is below 1e-9 of the result for |s| <= 0.1716. */
static inline float fl_log1pf(float x) {
    const float ln2_hi = 6.9313812256e-01f;  /* 0x3f317180 */
    const float ln2_lo = 9.0580006145e-06f;  /* 0x3717f7d1 */
    const uint32_t sqrt_half_bits = 0x3f3504f3u;  /* sqrt(1/2) */
    const uint32_t mantissa_mask = 0x007fffffu;

    float u = 1.0f + x;
    float c = (x - (u - 1.0f)) / u;

    /* u = 2^e m with m in [sqrt(1/2), sqrt(2)), as in fl_log1p. The int32
       to float conversion of e vectorizes in SSE2. */
    uint32_t shifted = fl_bits_f(u) + (0x3f800000u - sqrt_half_bits);
    float e = (float)((int32_t)(shifted >> 23) - 127);
    float m = fl_from_bits_f((shifted & mantissa_mask) + sqrt_half_bits);

    float f = m - 1.0f;
    float s = f / (2.0f + f);
    float s2 = s * s;
    float t = 2.0f / 11.0f;
    t = t * s2 + 2.0f / 9.0f;
    t = t * s2 + 2.0f / 7.0f;
    t = t * s2 + 2.0f / 5.0f;
    t = t * s2 + 2.0f / 3.0f;
    float big_r = t * s2;
    float hfsq = 0.5f * f * f;
    float result = e * ln2_hi - ((hfsq - (s * (hfsq + big_r) + (e * ln2_lo + c))) - f);

    result = u == INFINITY ? u : result;
    result = u == 0.0f ? -INFINITY : result;
    result = (u < 0.0f) | (x != x) ? NAN : result;
    return result;
}

#endif
