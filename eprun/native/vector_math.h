/*
 * Vector maths shared by the compiled kernels: the instruction-set switches, the base
 * non-linearities g (logistic, clamp to [0, 1], tanh) one float at a time and eight at a time
 * (AVX2), e^x, 1/d and a horizontal sum.
 */
#ifndef EPRUN_VECTOR_MATH_H
#define EPRUN_VECTOR_MATH_H

#include <math.h>
#include <stdint.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define EPRUN_AVX2 1
#else
#define EPRUN_AVX2 0
#endif
#if EPRUN_AVX2 && defined(__AVX512F__)
#define EPRUN_AVX512 1
#else
#define EPRUN_AVX512 0
#endif

enum { ACT_LOGISTIC = 0, ACT_CLAMP01 = 1, ACT_TANH = 2 };

/* ------------------------------------------------------------------ the base non-linearity g */

static inline float g_scalar(float z, int act) {
    if (act == ACT_LOGISTIC) return 1.0f / (1.0f + expf(-z));
    if (act == ACT_CLAMP01) return z < 0.0f ? 0.0f : (z > 1.0f ? 1.0f : z);
    return tanhf(z);
}

#if EPRUN_AVX2
/* e^x for 8 floats (Cephes' expf: x = n ln2 + r, |r| ≤ ln2/2, e^r by a degree-6 polynomial,
 * 2^n through the exponent bits); relative error ~1e-7. x is clamped to [−87, 88]; a NaN stays
 * NaN (min/max return their second operand when either is NaN). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_set1_ps(88.0f), x);
    x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
    p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

/* 1/d for d ≥ 1: the hardware estimate refined by one Newton step, r ← r·(2 − d·r) (relative
 * error ~2e-7; a division costs several times more on 8 floats) */
static inline __m256 reciprocal8(__m256 d) {
    __m256 r = _mm256_rcp_ps(d);
    return _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f)));
}

static inline __m256 g8(__m256 z, int act) {
    const __m256 one = _mm256_set1_ps(1.0f);
    if (act == ACT_LOGISTIC)  /* 1 / (1 + e^{−z}) */
        return reciprocal8(_mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), z))));
    if (act == ACT_CLAMP01)  /* NaN in, NaN out, as torch's clamp */
        return _mm256_min_ps(one, _mm256_max_ps(_mm256_setzero_ps(), z));
    /* tanh z = 1 − 2 / (1 + e^{2z}); for |z| < 0.625, where that cancels, Cephes' odd polynomial
     * z + z³·p(z²) */
    __m256 e = exp8(_mm256_add_ps(z, z));
    __m256 far = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(one, e)));
    __m256 z2 = _mm256_mul_ps(z, z);
    __m256 p = _mm256_set1_ps(-5.70498872745e-3f);
    p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(2.06390887954e-2f));
    p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(-5.37397155531e-2f));
    p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(1.33314422036e-1f));
    p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(-3.33332819422e-1f));
    __m256 near = _mm256_fmadd_ps(_mm256_mul_ps(p, z2), z, z);
    __m256 abs_z = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), z);
    return _mm256_blendv_ps(far, near, _mm256_cmp_ps(abs_z, _mm256_set1_ps(0.625f), _CMP_LT_OQ));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
#endif

#endif
