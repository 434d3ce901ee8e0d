/*
 * The relaxation of a chain of dense EP layers, two examples at a time, in float32.
 *
 * State layers s_0 … s_{L−1} (s_0 the first hidden layer, s_{L−1} the output), row-major
 * [batch, n_i]. Bottom-up matrices U_i [n_i, n_{i−1}] and top-down matrices D_i [n_{i+1}, n_i],
 * row-major. One step of layer i:
 *
 *     z_i = c_i + a·(U_i s_{i−1}) + a·(D_iᵀ s_{i+1}) + ν·s_i  (ν·s_i at the output layer only)
 *     s_i ← g(z_i)
 *
 * or, for the output layer of a net nudged after σ (the authors' discrete-time nets), with no
 * self term and no a·β·y in its constant,
 *
 *     s_{L−1} ← g(z_{L−1}) + β(y − s_{L−1}),  computed fma(−β, s_{L−1}, fma(β, y, g(z_{L−1})))
 *
 * (y one-hot, so fma(β, y, g) is the rounded g + β·y, as torch's g.add_(y, alpha=β)).
 *
 * For the prototypical net U_i = D_{i−1} = W_i (the net's weight between s_{i−1} and s_i);
 * for the vector-field net D_i is the feedback matrix B_{i+1}ᵀ.
 *
 * c_i is the layer's constant (for i = 0 the input drive a·(W_0 x + b_1) + c, for the output
 * layer of a nudged phase a·(b + β y) + c), a the activation's scale, ν = −a·β the MSE nudge,
 * g the base non-linearity. Every example relaxes independently of the others, so a pair of
 * examples runs all its steps with its states, and the couplings of a net with a small output
 * layer, in the first-level cache (each weight loaded serves both examples); the caller splits
 * the batch into row ranges, one per thread. The result of an example does not depend on
 * which other example shares its pass or thread.
 *
 * Schedules: sync (every layer from s_t, the papers') or async (the even-indexed layers from
 * s_t, then the odd-indexed ones from those fresh values).
 *
 * Built with AVX-512, a net of one hidden layer under an output of at most 16 units (the
 * papers' 784-512-10) takes a shorter path: one pass over the hidden units a step, in 16-wide
 * vectors (relax_two_layers below). With AVX2 or AVX-512, every other net of two layers or more
 * (past one hidden layer under a small output) relaxes its examples in blocks of up to 6 (AVX2)
 * or 12 (AVX-512), each load of a weight serving the whole block (relax_rows_blocked).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "block_sums.h"
#include "vector_math.h"

/* Build variants, for the tests and benchmarks that compare paths (eprun.native.build): the
 * default build stops an example at a bitwise fixed point and relaxes wider and deeper nets in
 * blocks. EPRUN_EVERY_STEP computes every step; EPRUN_NO_BLOCKS relaxes them in pairs. */
#ifdef EPRUN_EVERY_STEP
#define FIXED_POINT_STOP 0
#else
#define FIXED_POINT_STOP 1
#endif
#ifdef EPRUN_NO_BLOCKS
#define BLOCK_PATH 0
#else
#define BLOCK_PATH 1
#endif

/* Σ_k u[k] v[k] */
static inline float dot(const float *u, const float *v, int64_t n) {
    int64_t k = 0;
    float total = 0.0f;
#if EPRUN_AVX2
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
    for (; k + 32 <= n; k += 32) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(u + k), _mm256_loadu_ps(v + k), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(u + k + 8), _mm256_loadu_ps(v + k + 8), acc1);
        acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(u + k + 16), _mm256_loadu_ps(v + k + 16), acc2);
        acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(u + k + 24), _mm256_loadu_ps(v + k + 24), acc3);
    }
    for (; k + 8 <= n; k += 8)
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(u + k), _mm256_loadu_ps(v + k), acc0);
    total = hsum8(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
#endif
    for (; k < n; k++) total += u[k] * v[k];
    return total;
}

/* R examples at once (R = 1 or 2, a compile-time constant): each load of a weight serves R
 * examples, which halves the loads of the products for R = 2. Arrays indexed [r] hold one
 * pointer per example. */
#define MAX_R 2

#if EPRUN_AVX2
/* z[r][j + q] = a · U[j + q, :] · u[r] for q = 0 … 3, r < R: four rows of U against R vectors. */
static inline __attribute__((always_inline)) void dot4_rows(const int R, float *const *z, int64_t j, float a,
                                                            const float *m, int64_t stride,
                                                            const float *const *u, int64_t n) {
    const float *row[4] = {m + j * stride, m + (j + 1) * stride, m + (j + 2) * stride, m + (j + 3) * stride};
    __m256 acc[MAX_R][4];
    for (int r = 0; r < R; r++)
        for (int q = 0; q < 4; q++) acc[r][q] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        __m256 w[4];
        for (int q = 0; q < 4; q++) w[q] = _mm256_loadu_ps(row[q] + k);
        for (int r = 0; r < R; r++) {
            __m256 x = _mm256_loadu_ps(u[r] + k);
            for (int q = 0; q < 4; q++) acc[r][q] = _mm256_fmadd_ps(w[q], x, acc[r][q]);
        }
    }
    for (int r = 0; r < R; r++) {
        for (int q = 0; q < 4; q++) {
            float total = hsum8(acc[r][q]);
            for (int64_t kk = k; kk < n; kk++) total += row[q][kk] * u[r][kk];
            z[r][j + q] = a * total;
        }
    }
}
#endif

/* One layer of R examples: out[r] ← g(c[r] + a·(U s_below[r]) + a·(Dᵀ s_above[r]) + ν·self[r]),
 * or with ``target`` not NULL (the output layer nudged after σ; ν = 0) out[r] ← g(…) +
 * β(target[r] − self[r]), β = ``post_beta``.
 * U [n, n_below] (may be NULL), D [n_above, n] (may be NULL); ``self[r]`` is the layer's current
 * state (may alias ``out[r]``: each value is read before it is overwritten); z[r]: n floats of
 * scratch. Two passes over the layer: the affine part into z, then g from z into out
 * (independent iterations, so the exponentials of neighbouring vectors overlap). With
 * ``moved`` not NULL, moved[r] is set to 1 if some |out[r][j] − self[r][j]| is not below ``tol``
 * (a NaN counts as moved), or with tol = 0 if some out[r][j] differs from self[r][j] in any bit. */
static inline __attribute__((always_inline)) void update_layer(
        const int R, float *const *out, const float *const *c, int64_t n, float a, const int act, float nu,
        float post_beta, const float *const *target,
        const float *const *self, const float *m_below, const float *const *s_below, int64_t n_below,
        const float *m_above, const float *const *s_above, int64_t n_above, float *const *z, int *moved,
        float tol) {
    int64_t j = 0;
    /* bottom-up, dot form: z[r][j] = a · U[j,:] · s_below[r] */
    if (m_below) {
#if EPRUN_AVX2
        for (; j + 4 <= n; j += 4) dot4_rows(R, z, j, a, m_below, n_below, s_below, n_below);
#endif
        for (; j < n; j++)
            for (int r = 0; r < R; r++) z[r][j] = a * dot(m_below + j * n_below, s_below[r], n_below);
    } else {
        for (int r = 0; r < R; r++) memset(z[r], 0, (size_t)n * sizeof(float));
    }
    /* top-down, axpy form, plus the constant and the nudge:
     * z[r] += c[r] + a · Σ_k s_above[r][k] D[k,:] + ν·self[r]; 32 outputs at a time, four
     * independent accumulators per example, each row load of D shared by the R examples. */
    j = 0;
#if EPRUN_AVX2
    const __m256 va = _mm256_set1_ps(a), vnu = _mm256_set1_ps(nu);
    for (; j + 32 <= n; j += 32) {
        __m256 acc[MAX_R][4];
        for (int r = 0; r < R; r++)
            for (int q = 0; q < 4; q++) acc[r][q] = _mm256_setzero_ps();
        for (int64_t k = 0; k < n_above; k++) {
            const float *row = m_above + k * n + j;
            __m256 w[4];
            for (int q = 0; q < 4; q++) w[q] = _mm256_loadu_ps(row + 8 * q);
            for (int r = 0; r < R; r++) {
                __m256 sk = _mm256_set1_ps(s_above[r][k]);
                for (int q = 0; q < 4; q++) acc[r][q] = _mm256_fmadd_ps(sk, w[q], acc[r][q]);
            }
        }
        for (int r = 0; r < R; r++) {
            for (int q = 0; q < 4; q++) {
                int64_t jq = j + 8 * q;
                __m256 zz = _mm256_fmadd_ps(va, acc[r][q], _mm256_add_ps(_mm256_loadu_ps(c[r] + jq), _mm256_loadu_ps(z[r] + jq)));
                if (nu != 0.0f) zz = _mm256_fmadd_ps(vnu, _mm256_loadu_ps(self[r] + jq), zz);
                _mm256_storeu_ps(z[r] + jq, zz);
            }
        }
    }
    for (; j + 8 <= n; j += 8) {
        for (int r = 0; r < R; r++) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t k = 0; k < n_above; k++)
                acc = _mm256_fmadd_ps(_mm256_set1_ps(s_above[r][k]), _mm256_loadu_ps(m_above + k * n + j), acc);
            __m256 zz = _mm256_fmadd_ps(va, acc, _mm256_add_ps(_mm256_loadu_ps(c[r] + j), _mm256_loadu_ps(z[r] + j)));
            if (nu != 0.0f) zz = _mm256_fmadd_ps(vnu, _mm256_loadu_ps(self[r] + j), zz);
            _mm256_storeu_ps(z[r] + j, zz);
        }
    }
#endif
    for (; j < n; j++) {
        for (int r = 0; r < R; r++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < n_above; k++) acc += s_above[r][k] * m_above[k * n + j];
            z[r][j] += c[r][j] + a * acc;
            if (nu != 0.0f) z[r][j] += nu * self[r][j];
        }
    }
    /* s ← g(z) */
    for (int r = 0; r < R; r++) {
        j = 0;
        if (target) {  /* s ← g(z) + β(y − self), noting (when moved) as below whether s moved */
            int any = 0;
#if EPRUN_AVX2
            const __m256 vb = _mm256_set1_ps(post_beta), vmb = _mm256_set1_ps(-post_beta);
            const __m256 sign = _mm256_set1_ps(-0.0f), vtol = _mm256_set1_ps(tol);
            __m256 far = _mm256_setzero_ps();
            for (; j + 8 <= n; j += 8) {
                const __m256 old = _mm256_loadu_ps(self[r] + j);
                const __m256 g = g8(_mm256_loadu_ps(z[r] + j), act);
                const __m256 s = _mm256_fmadd_ps(vmb, old, _mm256_fmadd_ps(vb, _mm256_loadu_ps(target[r] + j), g));
                if (moved && tol == 0.0f)
                    far = _mm256_or_ps(far, _mm256_castsi256_ps(_mm256_xor_si256(
                        _mm256_cmpeq_epi32(_mm256_castps_si256(s), _mm256_castps_si256(old)), _mm256_set1_epi32(-1))));
                else if (moved)
                    far = _mm256_or_ps(far, _mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_sub_ps(s, old)), vtol,
                                                          _CMP_NLT_UQ));
                _mm256_storeu_ps(out[r] + j, s);
            }
            any = _mm256_movemask_ps(far) != 0;
#endif
            for (; j < n; j++) {
                const float old = self[r][j];
                const float s = fmaf(-post_beta, old, fmaf(post_beta, target[r][j], g_scalar(z[r][j], act)));
                if (moved && (tol == 0.0f ? memcmp(&s, &old, sizeof s) != 0 : !(fabsf(s - old) < tol))) any = 1;
                out[r][j] = s;
            }
            if (moved) moved[r] |= any;
            continue;
        }
        if (moved && tol == 0.0f) {  /* the same, noting whether some g(z) differs from self in a bit */
            int any = 0;
#if EPRUN_AVX2
            __m256i same = _mm256_set1_epi32(-1);
            for (; j + 8 <= n; j += 8) {
                __m256 g = g8(_mm256_loadu_ps(z[r] + j), act);
                __m256i old = _mm256_loadu_si256((const __m256i *)(self[r] + j));
                same = _mm256_and_si256(same, _mm256_cmpeq_epi32(_mm256_castps_si256(g), old));
                _mm256_storeu_ps(out[r] + j, g);
            }
            any = _mm256_movemask_ps(_mm256_castsi256_ps(same)) != 0xFF;
#endif
            for (; j < n; j++) {
                float g = g_scalar(z[r][j], act);
                if (memcmp(&g, self[r] + j, sizeof g) != 0) any = 1;
                out[r][j] = g;
            }
            moved[r] |= any;
            continue;
        }
        if (moved) {  /* the same, noting whether some |g(z) − self| ≥ tol (or is NaN) */
            int any = 0;
#if EPRUN_AVX2
            const __m256 sign = _mm256_set1_ps(-0.0f), vtol = _mm256_set1_ps(tol);
            __m256 far = _mm256_setzero_ps();
            for (; j + 8 <= n; j += 8) {
                __m256 g = g8(_mm256_loadu_ps(z[r] + j), act);
                __m256 d = _mm256_andnot_ps(sign, _mm256_sub_ps(g, _mm256_loadu_ps(self[r] + j)));
                far = _mm256_or_ps(far, _mm256_cmp_ps(d, vtol, _CMP_NLT_UQ));
                _mm256_storeu_ps(out[r] + j, g);
            }
            any = _mm256_movemask_ps(far) != 0;
#endif
            for (; j < n; j++) {
                float g = g_scalar(z[r][j], act);
                if (!(fabsf(g - self[r][j]) < tol)) any = 1;
                out[r][j] = g;
            }
            moved[r] |= any;
            continue;
        }
#if EPRUN_AVX2
        for (; j + 16 <= n; j += 16) {
            __m256 g0 = g8(_mm256_loadu_ps(z[r] + j), act), g1 = g8(_mm256_loadu_ps(z[r] + j + 8), act);
            _mm256_storeu_ps(out[r] + j, g0);
            _mm256_storeu_ps(out[r] + j + 8, g1);
        }
        for (; j + 8 <= n; j += 8) _mm256_storeu_ps(out[r] + j, g8(_mm256_loadu_ps(z[r] + j), act));
#endif
        for (; j < n; j++) out[r][j] = g_scalar(z[r][j], act);
    }
}

#if EPRUN_AVX512
/* ------------------------------------------- two layers with a small output, one pass a step
 *
 * The common net of the papers, one hidden layer s_0 (n_0 units) under an output s_1 of
 * n_1 ≤ 16 units, has a step that fits one pass over the hidden units. The hidden layer has no
 * layer below it (its input drive is the constant c_0) and no self term, so
 *
 *     s_0 ← g(c_0 + a·(D s_1))          D = down[0], [n_1, n_0], read as columns
 *     s_1 ← g(c_1 + a·(U s_0) + ν·s_1)  U = up[1], [n_1, n_0]
 *
 * and for each block of 16 hidden units the kernel loads the block of D (and of U, the same
 * matrix for the prototypical net), computes the 16 new hidden states from the old output
 * (broadcast from memory), and adds the block's share of U s_0 into 16 running sums of the
 * output, one vector register each: from the old hidden states for the synchronous schedule,
 * from the new ones for the even/odd schedule (layer 0 first, then layer 1 from its fresh
 * values). The old block is read before the new one is written, so both schedules run in place.
 * One example at a time: a second example in the same pass measured slower (its sums no longer
 * fit in the registers), as did two passes a step (products, then g) and examples taking their
 * steps in turns. The output's n_1 sums are then reduced and g applied to them in one masked
 * vector. */

/* e^x for 16 floats: exp8's reduction and polynomial (Cephes' constants), evaluated for a short
 * dependency chain: x = n ln2 + r, e^r = 1 + r + r²·q(r) with q's six terms in Estrin's scheme,
 * and 2^n applied by vscalefps; a NaN stays NaN */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(88.0f), x);
    x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    const __m512 r2 = _mm512_mul_ps(r, r), r4 = _mm512_mul_ps(r2, r2);
    const __m512 q01 = _mm512_fmadd_ps(_mm512_set1_ps(1.6666665459e-1f), r, _mm512_set1_ps(5.0000001201e-1f));
    const __m512 q23 = _mm512_fmadd_ps(_mm512_set1_ps(8.3334519073e-3f), r, _mm512_set1_ps(4.1665795894e-2f));
    const __m512 q45 = _mm512_fmadd_ps(_mm512_set1_ps(1.9875691500e-4f), r, _mm512_set1_ps(1.3981999507e-3f));
    const __m512 q = _mm512_fmadd_ps(q45, r4, _mm512_fmadd_ps(q23, r2, q01));
    const __m512 e_r = _mm512_add_ps(_mm512_fmadd_ps(q, r2, r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(e_r, n);
}

/* 1/d for d ≥ 1: the 14-bit hardware estimate refined by one Newton step, r ← r·(2 − d·r) */
static inline __m512 reciprocal16(__m512 d) {
    __m512 r = _mm512_rcp14_ps(d);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

static inline __m512 g16(__m512 z, int act) {
    const __m512 one = _mm512_set1_ps(1.0f);
    if (act == ACT_LOGISTIC)  /* 1 / (1 + e^{−z}) */
        return reciprocal16(_mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), z))));
    if (act == ACT_CLAMP01)  /* NaN in, NaN out, as torch's clamp */
        return _mm512_min_ps(one, _mm512_max_ps(_mm512_setzero_ps(), z));
    /* tanh, as g8: 1 − 2 / (1 + e^{2z}), and z + z³·p(z²) for |z| < 0.625 */
    __m512 e = exp16(_mm512_add_ps(z, z));
    __m512 far = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(one, e)));
    __m512 z2 = _mm512_mul_ps(z, z);
    __m512 p = _mm512_set1_ps(-5.70498872745e-3f);
    p = _mm512_fmadd_ps(p, z2, _mm512_set1_ps(2.06390887954e-2f));
    p = _mm512_fmadd_ps(p, z2, _mm512_set1_ps(-5.37397155531e-2f));
    p = _mm512_fmadd_ps(p, z2, _mm512_set1_ps(1.33314422036e-1f));
    p = _mm512_fmadd_ps(p, z2, _mm512_set1_ps(-3.33332819422e-1f));
    __m512 near = _mm512_fmadd_ps(_mm512_mul_ps(p, z2), z, z);
    __m512 abs_z = _mm512_abs_ps(z);
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(abs_z, _mm512_set1_ps(0.625f), _CMP_LT_OQ), far, near);
}

/* the lanes of a vector where new differs from old: in some bit (tol = 0), or by tol or more
 * (or a NaN) */
static inline __mmask16 moved16(__m512 new_values, __m512 old, float tol, __mmask16 lanes) {
    if (tol == 0.0f)
        return _mm512_mask_cmpneq_epi32_mask(lanes, _mm512_castps_si512(new_values), _mm512_castps_si512(old));
    __m512 d = _mm512_abs_ps(_mm512_sub_ps(new_values, old));
    return _mm512_mask_cmp_ps_mask(lanes, d, _mm512_set1_ps(tol), _CMP_NLT_UQ);
}

#define FUSED_MAX_OUT 16

/* One block of up to 16 hidden units (the lanes set), h, c0, U and D offset to it:
 * h ← g(c0 + a·(D s_1)) and acc[k] += U[k]·(old or fresh h), k < n1; returns the lanes that
 * moved when check is set. The old block is loaded before the fresh one is stored. */
static inline __attribute__((always_inline)) __mmask16 two_layer_block(
        float *h, const float *y, const float *c0, int64_t n0, int n1, const float *U, const float *D, __m512 va,
        const int act, int async_order, int check, float tol, __mmask16 lanes, __m512 *acc) {
    const __m512 old = _mm512_maskz_loadu_ps(lanes, h);
    /* D s_1 for this block: two chains of multiply-adds, k even and k odd */
    __m512 top0 = _mm512_setzero_ps(), top1 = _mm512_setzero_ps();
    for (int k = 0; k < FUSED_MAX_OUT; k++) {
        if (k >= n1) break;
        const __m512 col = _mm512_maskz_loadu_ps(lanes, D + k * n0);
        if (k & 1) top1 = _mm512_fmadd_ps(_mm512_set1_ps(y[k]), col, top1);
        else top0 = _mm512_fmadd_ps(_mm512_set1_ps(y[k]), col, top0);
    }
    const __m512 fresh = g16(_mm512_fmadd_ps(va, _mm512_add_ps(top0, top1), _mm512_maskz_loadu_ps(lanes, c0)), act);
    _mm512_mask_storeu_ps(h, lanes, fresh);
    /* U s_0: from the old states (sync) or the fresh ones (even/odd); masked-off lanes add 0 */
    const __m512 src = async_order ? _mm512_maskz_mov_ps(lanes, fresh) : old;
    for (int k = 0; k < FUSED_MAX_OUT; k++) {
        if (k >= n1) break;
        acc[k] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lanes, U + k * n0), src, acc[k]);
    }
    return check ? moved16(fresh, old, tol, lanes) : (__mmask16)0;
}

/* Steps first+1 … steps of one example of the two-layer net, in place on h (n_0) and y (n_1),
 * stopping as relax_examples does (tol and check_every, or exact with tol = 0): returns the
 * steps taken. */
static inline __attribute__((always_inline)) int relax_two_layers(
        float *h, float *y, const float *c0, const float *c1, int64_t n0, int n1, const float *U, const float *D,
        float a, const int act, float nu, float post_beta, const float *target, int steps, int async_order,
        float tol, int check_every, int exact) {
    const __m512 va = _mm512_set1_ps(a);
    const __mmask16 out_lanes = (__mmask16)((1u << n1) - 1u);
    for (int t = 0; t < steps; t++) {
        const int check = tol > 0.0f ? (t + 1) % check_every == 0 : exact;
        __m512 acc[FUSED_MAX_OUT];
        for (int k = 0; k < FUSED_MAX_OUT; k++) acc[k] = _mm512_setzero_ps();
        __mmask16 moved = 0;
        int64_t j = 0;
        for (; j + 16 <= n0; j += 16)  /* whole blocks: constant all-ones lanes, plain loads */
            moved |= two_layer_block(h + j, y, c0 + j, n0, n1, U + j, D + j, va, act, async_order, check, tol,
                                     (__mmask16)0xFFFF, acc);
        if (j < n0)
            moved |= two_layer_block(h + j, y, c0 + j, n0, n1, U + j, D + j, va, act, async_order, check, tol,
                                     (__mmask16)((1u << (n0 - j)) - 1u), acc);
        float sums[FUSED_MAX_OUT];
        for (int k = 0; k < FUSED_MAX_OUT; k++) {
            if (k >= n1) break;
            sums[k] = _mm512_reduce_add_ps(acc[k]);
        }
        const __m512 old_y = _mm512_maskz_loadu_ps(out_lanes, y);
        __m512 z = _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(out_lanes, sums), _mm512_maskz_loadu_ps(out_lanes, c1));
        if (nu != 0.0f) z = _mm512_fmadd_ps(_mm512_set1_ps(nu), old_y, z);
        __m512 fresh_y = g16(z, act);
        if (target)  /* nudged after σ: g(z) + β(y − s_1) */
            fresh_y = _mm512_fmadd_ps(_mm512_set1_ps(-post_beta), old_y,
                                      _mm512_fmadd_ps(_mm512_set1_ps(post_beta),
                                                      _mm512_maskz_loadu_ps(out_lanes, target), fresh_y));
        if (check) moved |= moved16(fresh_y, old_y, tol, out_lanes);
        _mm512_mask_storeu_ps(y, out_lanes, fresh_y);
        if (check && !moved) return t + 1;
    }
    return steps;
}

/* relax_rows for the two-layer net with n_1 ≤ FUSED_MAX_OUT, in place on the caller's rows, one
 * example at a time (a second example in the same pass was slower: its sums no longer fit in
 * the registers) */
static inline __attribute__((always_inline)) void relax_rows_two_layers(
        const int64_t *sizes, float *const *state, const float *const *constant, const int *constant_per_row,
        const float *const *up, const float *const *down, float a, const int act, float nudge, float post_beta,
        const float *target, int steps, int async_order, float tol, int check_every, int exact,
        int32_t *steps_taken, int64_t row_begin, int64_t row_end) {
    const int64_t n0 = sizes[0];
    const int n1 = (int)sizes[1];
    for (int64_t row = row_begin; row < row_end; row++) {
        float *h = state[0] + row * n0, *y = state[1] + row * n1;
        const float *c0 = constant[0] + (constant_per_row[0] ? row * n0 : 0);
        const float *c1 = constant[1] + (constant_per_row[1] ? row * n1 : 0);
        const float *ty = target ? target + row * n1 : NULL;
        int taken;
        if (n1 == 10)  /* ten classes: the loops over the output unrolled, its sums kept in registers */
            taken = relax_two_layers(h, y, c0, c1, n0, 10, up[1], down[0], a, act, nudge, post_beta, ty, steps,
                                     async_order, tol, check_every, exact);
        else
            taken = relax_two_layers(h, y, c0, c1, n0, n1, up[1], down[0], a, act, nudge, post_beta, ty, steps,
                                     async_order, tol, check_every, exact);
        if (steps_taken) steps_taken[row] = taken;
    }
}
#endif

#if EPRUN_AVX2
/* ----------------------------------------------- blocks of examples for wider and deeper nets
 *
 * The sums of block_sums.h, then z = c_i + a·sums [+ ν·s_i], s_i ← g(z) [+ β(y − s_i) for the
 * output nudged after σ], for every example of the block. An example that stops (tol, or a
 * bitwise fixed point with exact) leaves the block, its last slot taking its place. */
typedef struct {
    float *cur[64], *nxt[64];        /* BLOCK_ROWS rows of n_i each */
    const float *c[64][BLOCK_ROWS];  /* each slot's constant of layer i */
    int64_t row[BLOCK_ROWS];         /* each slot's example (row of the batch) */
    const float *y[BLOCK_ROWS];      /* each slot's target row (the output nudged after σ), or NULL */
} Block;

/* The first `lanes` (≤ HALF) units of one vector of a layer for one example: z = c + a·sum
 * [+ ν·old], fresh = g(z) [+ β(y − old) with ``target`` not NULL, β = post_beta] stored into out
 * (which may be self: old is read first); returns whether a lane moved (see moved16; only when
 * check). */
#if EPRUN_AVX512
static inline int block_vector(float *out, const float *self, const float *c, const float *sum, int64_t lanes,
                               float a, int act, float nu, float post_beta, const float *target, int check,
                               float tol) {
    const __mmask16 m = lanes >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << lanes) - 1u);
    const __m512 old = _mm512_maskz_loadu_ps(m, self);
    __m512 zz = _mm512_fmadd_ps(_mm512_set1_ps(a), _mm512_loadu_ps(sum), _mm512_maskz_loadu_ps(m, c));
    if (nu != 0.0f) zz = _mm512_fmadd_ps(_mm512_set1_ps(nu), old, zz);
    __m512 fresh = g16(zz, act);
    if (target)
        fresh = _mm512_fmadd_ps(_mm512_set1_ps(-post_beta), old,
                                _mm512_fmadd_ps(_mm512_set1_ps(post_beta), _mm512_maskz_loadu_ps(m, target), fresh));
    _mm512_mask_storeu_ps(out, m, fresh);
    return check && moved16(fresh, old, tol, m);
}
#else
/* the lanes of a vector where new differs from old: in some bit (tol = 0), or by tol or more
 * (or a NaN); only the lanes set in `lanes` (all bits set) count */
static inline int moved8(__m256 new_values, __m256 old, float tol, __m256i lanes) {
    __m256 moved;
    if (tol == 0.0f)
        moved = _mm256_castsi256_ps(_mm256_xor_si256(
            _mm256_cmpeq_epi32(_mm256_castps_si256(new_values), _mm256_castps_si256(old)), _mm256_set1_epi32(-1)));
    else
        moved = _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_sub_ps(new_values, old)),
                              _mm256_set1_ps(tol), _CMP_NLT_UQ);
    return !_mm256_testz_ps(moved, _mm256_castsi256_ps(lanes));
}

static inline int block_vector(float *out, const float *self, const float *c, const float *sum, int64_t lanes,
                               float a, int act, float nu, float post_beta, const float *target, int check,
                               float tol) {
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(lanes < 8 ? lanes : 8)),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 old = _mm256_maskload_ps(self, m);
    __m256 zz = _mm256_fmadd_ps(_mm256_set1_ps(a), _mm256_loadu_ps(sum), _mm256_maskload_ps(c, m));
    if (nu != 0.0f) zz = _mm256_fmadd_ps(_mm256_set1_ps(nu), old, zz);
    __m256 fresh = g8(zz, act);
    if (target)
        fresh = _mm256_fmadd_ps(_mm256_set1_ps(-post_beta), old,
                                _mm256_fmadd_ps(_mm256_set1_ps(post_beta), _mm256_maskload_ps(target, m), fresh));
    _mm256_maskstore_ps(out, m, fresh);
    return check && moved8(fresh, old, tol, m);
}
#endif

/* Layer i of the block's R examples, CHUNK units at a time: z = c_i + a·sums [+ ν·s_i], s_i ← g(z)
 * [+ β(y[r] − s_i), y not NULL] into out (which may be self: each value of self is read before it
 * is written); moved[r] set when check and example r moved. P: the layer's packed couplings, chunk
 * after chunk (pack_chunk). */
static void block_layer(int R, float *out, const float *self, const float *below, const float *above, int64_t n,
                        int64_t nb, int64_t na, const float *P, const float *const *c, float a, int act, float nu,
                        float post_beta, const float *const *y, int check, float tol, int *moved) {
    float z[BLOCK_ROWS * CHUNK];
    for (int64_t j = 0; j < n; j += CHUNK, P += CHUNK * (nb + na)) {
        block_sums_any(R, z, below, above, nb, na, P);
        const int64_t left = n - j;
        for (int h = 0; h < 2; h++) {
            const int64_t lanes = left - HALF * h;
            if (lanes <= 0) break;
            for (int r = 0; r < R; r++) {
                const int64_t at = r * n + j + HALF * h;
                if (block_vector(out + at, self + at, c[r] + j + HALF * h, z + CHUNK * r + HALF * h, lanes, a, act,
                                 nu, post_beta, y ? y[r] + j + HALF * h : NULL, check, tol))
                    moved[r] = 1;
            }
        }
    }
}

/* 1 when relax_rows takes the block path for this net: not for one hidden layer under a small
 * output (AVX-512: the one-pass path; AVX2: the pairs, whose few output rows a chunk would pad) */
static int uses_blocks(int n_layers, const int64_t *sizes) {
    return BLOCK_PATH && n_layers >= 2 && !(n_layers == 2 && sizes[1] <= 16);
}

/* Copy slot `from` of the block into slot `to` (every layer's current state, constants, row). */
static void block_move(Block *b, int n_layers, const int64_t *sizes, int from, int to) {
    for (int i = 0; i < n_layers; i++) {
        memcpy(b->cur[i] + to * sizes[i], b->cur[i] + from * sizes[i], (size_t)sizes[i] * sizeof(float));
        b->c[i][to] = b->c[i][from];
    }
    b->row[to] = b->row[from];
    b->y[to] = b->y[from];
}

/* Slot r's states back into the batch's rows, with the steps it took. */
static void block_return(const Block *b, int n_layers, const int64_t *sizes, float *const *state, int r, int taken,
                         int32_t *steps_taken) {
    for (int i = 0; i < n_layers; i++)
        memcpy(state[i] + b->row[r] * sizes[i], b->cur[i] + r * sizes[i], (size_t)sizes[i] * sizeof(float));
    if (steps_taken) steps_taken[b->row[r]] = taken;
}

/* relax_rows for any chain of layers, in blocks of examples (see above). */
static __attribute__((noinline)) int relax_rows_blocked(
        int n_layers, const int64_t *sizes, float *const *state, const float *const *constant,
        const int *constant_per_row, const float *const *P, float a, int act, float nudge, float post_beta,
        const float *target, int steps, int async_order, float tol, int check_every, int exact,
        int32_t *steps_taken, int64_t row_begin, int64_t row_end) {
    const int64_t n_out = sizes[n_layers - 1];
    int64_t total = 0;
    for (int i = 0; i < n_layers; i++) total += sizes[i];
    float *buffer = (float *)malloc((size_t)(2 * BLOCK_ROWS * total) * sizeof(float));
    if (!buffer) return -1;
    Block b;
    float *at = buffer;
    for (int i = 0; i < n_layers; i++) {
        b.cur[i] = at;
        b.nxt[i] = at + BLOCK_ROWS * sizes[i];
        at += 2 * BLOCK_ROWS * sizes[i];
    }
    const int64_t rows = row_end - row_begin, blocks = (rows + BLOCK_ROWS - 1) / BLOCK_ROWS;
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t lo = row_begin + rows * blk / blocks, hi = row_begin + rows * (blk + 1) / blocks;
        int R = (int)(hi - lo);
        for (int r = 0; r < R; r++) {
            b.row[r] = lo + r;
            b.y[r] = target ? target + (lo + r) * n_out : NULL;
            for (int i = 0; i < n_layers; i++) {
                memcpy(b.cur[i] + r * sizes[i], state[i] + (lo + r) * sizes[i], (size_t)sizes[i] * sizeof(float));
                b.c[i][r] = constant[i] + (constant_per_row[i] ? (lo + r) * sizes[i] : 0);
            }
        }
        for (int t = 0; t < steps && R > 0; t++) {
            const int check = tol > 0.0f ? (t + 1) % check_every == 0 : exact;
            int moved[BLOCK_ROWS] = {0};
            for (int half = 0; half < (async_order ? 2 : 1); half++) {
                for (int i = async_order ? half : 0; i < n_layers; i += async_order ? 2 : 1) {
                    block_layer(R, async_order ? b.cur[i] : b.nxt[i], b.cur[i], i > 0 ? b.cur[i - 1] : NULL,
                                i + 1 < n_layers ? b.cur[i + 1] : NULL, sizes[i], below_of(i, sizes),
                                above_of(i, n_layers, sizes), P[i], b.c[i], a, act,
                                i == n_layers - 1 ? nudge : 0.0f, post_beta,
                                i == n_layers - 1 && target ? b.y : NULL, check, tol, moved);
                }
            }
            if (!async_order)
                for (int i = 0; i < n_layers; i++) {
                    float *swap = b.cur[i];
                    b.cur[i] = b.nxt[i];
                    b.nxt[i] = swap;
                }
            if (check) {
                for (int r = R - 1; r >= 0; r--) {
                    if (moved[r]) continue;
                    block_return(&b, n_layers, sizes, state, r, t + 1, steps_taken);  /* stopped: its slot to the last */
                    if (r != R - 1) block_move(&b, n_layers, sizes, R - 1, r);
                    R--;
                }
            }
        }
        for (int r = 0; r < R; r++) block_return(&b, n_layers, sizes, state, r, steps, steps_taken);
    }
    free(buffer);
    return 0;
}
#endif

/* Scratch of one example: two state sets (cur, nxt) and the partial sums z. */
typedef struct {
    float *cur[64], *nxt[64], *z;
} Example;

/* Steps first+1 … steps of R examples whose states are in ex[r].cur; c[r][i]: their constants.
 * With tol > 0, after each step t that is a multiple of check_every, an example none of whose
 * states moved by tol or more in that step stops there: done[r] is set and the call returns t
 * (the others of the group have also taken t steps; the caller goes on with them). Otherwise it
 * returns ``steps``.
 *
 * With tol = 0 and ``exact``, an example stops, the same way, after the first step that left its
 * every state bit for bit as it was: a step is a function of the example's state alone (its
 * constants fixed, no other example involved), so from a state it maps to itself every further
 * step would return that same state, and stopping changes no bit of the result of ``steps``
 * steps. Checked after every step. */
static inline __attribute__((always_inline)) int relax_examples(
        const int R, Example *ex, const float *const (*c)[64], int n_layers, const int64_t *sizes,
        const float *const *up, const float *const *down, float a, const int act, float nudge, float post_beta,
        const float *const *target, int first, int steps, int async_order, float tol, int check_every, int exact,
        int *done) {
    float *z[MAX_R], *out[MAX_R];
    const float *self[MAX_R], *below[MAX_R], *above[MAX_R], *cc[MAX_R];
    for (int r = 0; r < R; r++) z[r] = ex[r].z;
    for (int t = first; t < steps; t++) {
        const int check = tol > 0.0f ? (t + 1) % check_every == 0 : exact;
        int moved[MAX_R] = {0};
        /* sync: every layer from s_t into nxt; async: even layers, then odd ones, in place */
        for (int half = 0; half < (async_order ? 2 : 1); half++) {
            for (int i = async_order ? half : 0; i < n_layers; i += async_order ? 2 : 1) {
                float nu = (i == n_layers - 1) ? nudge : 0.0f;
                const float *const *y = (i == n_layers - 1) ? target : NULL;
                for (int r = 0; r < R; r++) {
                    out[r] = async_order ? ex[r].cur[i] : ex[r].nxt[i];
                    self[r] = ex[r].cur[i];
                    below[r] = i > 0 ? ex[r].cur[i - 1] : NULL;
                    above[r] = i + 1 < n_layers ? ex[r].cur[i + 1] : NULL;
                    cc[r] = c[r][i];
                }
                update_layer(R, out, cc, sizes[i], a, act, nu, post_beta, y, self,
                             i > 0 ? up[i] : NULL, below, i > 0 ? sizes[i - 1] : 0,
                             i + 1 < n_layers ? down[i] : NULL, above, i + 1 < n_layers ? sizes[i + 1] : 0, z,
                             check ? moved : NULL, tol);
            }
        }
        if (!async_order) {
            for (int r = 0; r < R; r++) {
                for (int i = 0; i < n_layers; i++) {
                    float *swap = ex[r].cur[i];
                    ex[r].cur[i] = ex[r].nxt[i];
                    ex[r].nxt[i] = swap;
                }
            }
        }
        if (check) {
            int stopped = 0;
            for (int r = 0; r < R; r++)
                if (!moved[r]) done[r] = stopped = 1;
            if (stopped) return t + 1;
        }
    }
    return steps;
}

/*
 * Relax examples [row_begin, row_end) for ``steps`` steps, in place on ``state``.
 *   n_layers          L
 *   sizes[i]          n_i
 *   state[i]          [batch, n_i]
 *   constant[i]       [batch, n_i] if constant_per_row[i], else [n_i]
 *   up[i]             U_i, [n_i, n_{i−1}], i ≥ 1 (up[0] unused)
 *   down[i]           D_i, [n_{i+1}, n_i], i ≤ L−2 (down[L−1] unused)
 *   nudge             ν = −a·β on the output layer (0 for a free phase, and for a nudge after σ)
 *   post_beta, target β and y [batch, n_{L−1}] of the output nudged after σ, s ← g(z) + β(y − s);
 *                     target NULL: no such nudge
 *   async_order       0: sync, 1: even/odd
 *   tol, check_every  tol > 0: each example stops after the first step t, a multiple of
 *                     check_every, in which none of its states moved by tol or more (as the
 *                     torch path with tol_scope "example"); tol = 0: every example takes `steps`
 *   exact             with tol = 0: stop an example once a step leaves its state unchanged bit for
 *                     bit (the result is that of `steps` steps; see relax_examples)
 *   steps_taken       NULL, or [batch] int32: the steps each example took (computed, with exact)
 * Returns 0, or −1 if scratch memory could not be allocated.
 */
static inline __attribute__((always_inline)) int relax_rows(
        int n_layers, const int64_t *sizes, float *const *state, const float *const *constant,
        const int *constant_per_row, const float *const *up, const float *const *down, float a, const int act,
        float nudge, float post_beta, const float *target, int steps, int async_order, float tol, int check_every,
        int exact, int32_t *steps_taken, int64_t row_begin, int64_t row_end, const float *const *packed) {
    if (n_layers > 64) return -1;
    if (check_every < 1) check_every = 1;
#if EPRUN_AVX512
    if (n_layers == 2 && sizes[1] <= FUSED_MAX_OUT) {
        relax_rows_two_layers(sizes, state, constant, constant_per_row, up, down, a, act, nudge, post_beta, target,
                              steps, async_order, tol, check_every, exact, steps_taken, row_begin, row_end);
        return 0;
    }
#endif
#if EPRUN_AVX2
    if (uses_blocks(n_layers, sizes)) {
        if (packed)
            return relax_rows_blocked(n_layers, sizes, state, constant, constant_per_row, packed, a, act, nudge,
                                      post_beta, target, steps, async_order, tol, check_every, exact, steps_taken,
                                      row_begin, row_end);
        const float *P[64] = {NULL};
        float *buffer = packing_space(packed_layout(n_layers, sizes, NULL, NULL));
        if (!buffer) return -1;
        packed_layout(n_layers, sizes, buffer, P);
        pack_share(n_layers, sizes, up, down, P, 0, 1);
        return relax_rows_blocked(n_layers, sizes, state, constant, constant_per_row, P, a, act, nudge, post_beta,
                                  target, steps, async_order, tol, check_every, exact, steps_taken, row_begin,
                                  row_end);
    }
#else
    (void)packed;
#endif
    int64_t total = 0, widest = 0;
    for (int i = 0; i < n_layers; i++) {
        total += sizes[i];
        if (sizes[i] > widest) widest = sizes[i];
    }
    float *buffer = (float *)malloc((size_t)(MAX_R * (2 * total + widest)) * sizeof(float));
    if (!buffer) return -1;
    Example ex[MAX_R];
    for (int r = 0; r < MAX_R; r++) {
        float *base = buffer + r * (2 * total + widest);
        int64_t offset = 0;
        for (int i = 0; i < n_layers; i++) {
            ex[r].cur[i] = base + offset;
            ex[r].nxt[i] = base + total + offset;
            offset += sizes[i];
        }
        ex[r].z = base + 2 * total;
    }
    const float *c[MAX_R][64];
    const float *y[MAX_R];
    const int64_t n_out = sizes[n_layers - 1];
    for (int64_t row = row_begin; row < row_end; row += MAX_R) {
        int R = row + MAX_R <= row_end ? MAX_R : (int)(row_end - row);
        for (int r = 0; r < R; r++) {
            y[r] = target ? target + (row + r) * n_out : NULL;
            for (int i = 0; i < n_layers; i++) {
                memcpy(ex[r].cur[i], state[i] + (row + r) * sizes[i], (size_t)sizes[i] * sizeof(float));
                c[r][i] = constant[i] + (constant_per_row[i] ? (row + r) * sizes[i] : 0);
            }
        }
        int done[MAX_R] = {0}, taken[MAX_R];
        if (R == 2) {
            taken[0] = taken[1] = relax_examples(2, ex, (const float *const (*)[64])c, n_layers, sizes, up, down,
                                                 a, act, nudge, post_beta, target ? y : NULL, 0, steps, async_order,
                                                 tol, check_every, exact, done);
            if (done[0] != done[1]) {  /* one has stopped: the other goes on alone */
                int r = done[0] ? 1 : 0;
                taken[r] = relax_examples(1, &ex[r], (const float *const (*)[64])c[r], n_layers, sizes, up, down,
                                          a, act, nudge, post_beta, target ? &y[r] : NULL, taken[r], steps,
                                          async_order, tol, check_every, exact, &done[r]);
            }
        } else {
            taken[0] = relax_examples(1, ex, (const float *const (*)[64])c, n_layers, sizes, up, down, a, act, nudge,
                                      post_beta, target ? y : NULL, 0, steps, async_order, tol, check_every, exact,
                                      done);
        }
        if (steps_taken)
            for (int r = 0; r < R; r++) steps_taken[row + r] = taken[r];
        for (int r = 0; r < R; r++)
            for (int i = 0; i < n_layers; i++)
                memcpy(state[i] + (row + r) * sizes[i], ex[r].cur[i], (size_t)sizes[i] * sizeof(float));
    }
    free(buffer);
    return 0;
}

/* relax_rows with the activation a compile-time constant: one copy of the loop per activation,
 * so g is inlined without a branch per vector. ``packed``: the block path's packed couplings
 * (pack_share), or NULL for it to pack its own. */
static int relax_dense_packed(int n_layers, const int64_t *sizes, float *const *state, const float *const *constant,
                              const int *constant_per_row, const float *const *up, const float *const *down, float a,
                              int act, float nudge, float post_beta, const float *target, int steps, int async_order,
                              float tol, int check_every, int exact, int32_t *steps_taken, int64_t row_begin,
                              int64_t row_end, const float *const *packed) {
    if (act == ACT_LOGISTIC)
        return relax_rows(n_layers, sizes, state, constant, constant_per_row, up, down, a, ACT_LOGISTIC, nudge,
                          post_beta, target, steps, async_order, tol, check_every, exact, steps_taken, row_begin,
                          row_end, packed);
    if (act == ACT_CLAMP01)
        return relax_rows(n_layers, sizes, state, constant, constant_per_row, up, down, a, ACT_CLAMP01, nudge,
                          post_beta, target, steps, async_order, tol, check_every, exact, steps_taken, row_begin,
                          row_end, packed);
    return relax_rows(n_layers, sizes, state, constant, constant_per_row, up, down, a, ACT_TANH, nudge,
                      post_beta, target, steps, async_order, tol, check_every, exact, steps_taken, row_begin,
                      row_end, packed);
}

/* Couplings packed once for the threads of a parallel call (the block path), or NULL when the
 * net does not take that path (or memory ran out: each thread then packs its own). The space is
 * packing_space's, kept by the calling thread. */
static const float *const *shared_packing(int n_layers, const int64_t *sizes, const float **P) {
#if EPRUN_AVX2
    if (n_layers <= 64 && uses_blocks(n_layers, sizes)) {
        float *buffer = packing_space(packed_layout(n_layers, sizes, NULL, NULL));
        if (buffer) {
            packed_layout(n_layers, sizes, buffer, P);
            return P;
        }
    }
#else
    (void)n_layers, (void)sizes, (void)P;
#endif
    return NULL;
}

#ifdef _OPENMP
/* This thread's share of the packing, then a barrier (inside a parallel region). */
static void pack_together(int n_layers, const int64_t *sizes, const float *const *up, const float *const *down,
                          const float *const *P, int64_t k, int64_t count) {
#if EPRUN_AVX2
    if (P) pack_share(n_layers, sizes, up, down, P, k, count);
#else
    (void)n_layers, (void)sizes, (void)up, (void)down, (void)P, (void)k, (void)count;
#endif
#ifdef _OPENMP
#pragma omp barrier
#endif
}
#endif

/*
 * Relax the whole batch for ``steps`` steps, in place (the arguments of relax_rows; with tol = 0 an
 * example stops at a bitwise fixed point unless built with EPRUN_EVERY_STEP), its rows split into
 * `threads` contiguous ranges of whole pairs run in one OpenMP parallel region. Built with
 * -fopenmp, the library shares the process's OpenMP runtime (torch's libgomp, loaded first under
 * the same soname), so the region runs on the worker threads that torch's own parallel operations
 * use, which are still spinning from the previous product: no thread is created, and none
 * competes with an idle-spinning one. Without OpenMP the rows run on the calling thread.
 * Returns 0, or −1 if scratch memory could not be allocated.
 */
int eprun_relax_dense(int n_layers, const int64_t *sizes, float *const *state, const float *const *constant,
                      const int *constant_per_row, const float *const *up, const float *const *down, float a, int act,
                      float nudge, float post_beta, const float *target, int steps, int async_order, float tol,
                      int check_every, int32_t *steps_taken, int64_t batch, int threads) {
    const int exact = FIXED_POINT_STOP;
    const float *P[64] = {NULL};
    const float *const *packed = shared_packing(n_layers, sizes, P);
#ifdef _OPENMP
    int failed = 0;
    int64_t pairs = (batch + 1) / 2;
    if (threads > pairs) threads = (int)pairs;
    if (threads > 1) {
#pragma omp parallel num_threads(threads) reduction(| : failed)
        {
            int64_t k = omp_get_thread_num(), n = omp_get_num_threads();
            pack_together(n_layers, sizes, up, down, packed, k, n);
            int64_t lo = 2 * (pairs * k / n), hi = 2 * (pairs * (k + 1) / n);
            if (hi > batch) hi = batch;
            if (lo < hi)
                failed |= relax_dense_packed(n_layers, sizes, state, constant, constant_per_row, up, down, a, act,
                                             nudge, post_beta, target, steps, async_order, tol, check_every, exact,
                                             steps_taken, lo, hi, packed) != 0;
        }
        return failed ? -1 : 0;
    }
#endif
    (void)threads;
#if EPRUN_AVX2
    if (packed) pack_share(n_layers, sizes, up, down, packed, 0, 1);
#endif
    return relax_dense_packed(n_layers, sizes, state, constant, constant_per_row, up, down, a, act, nudge, post_beta,
                              target, steps, async_order, tol, check_every, exact, steps_taken, 0, batch, packed);
}

/*
 * Both phases of one-sided EP with the MSE read-out, for examples [row_begin, row_end):
 *
 *     free phase     s ← 0, then T steps with the constants c_i               → free_state  (s*)
 *     nudged phase   s ← s*, then K steps with the output layer's constant
 *                    c_{L−1} + a·β·y and the self term ν·s_{L−1}, ν = −a·β     → nudged_state (s^β)
 *
 * y is the one-hot code of labels[row]; the output constant of the nudged phase is written into
 * nudged_out_constant [batch, n_{L−1}] (c_{L−1} + a·β at the label, c_{L−1} elsewhere: the sum
 * torch's c + (a·β)·y rounds to). With post_beta = β ≠ 0 the output is nudged after σ instead:
 * the nudged phase keeps the constants c_i and steps s_{L−1} ← g(z) + β(y − s_{L−1}), y written
 * into nudged_out_constant. free_loss[row], when not NULL, is the MSE loss at s*,
 * ½ Σ_j (y_j − s*_j)², summed in order j = 0, 1, …. The other arguments are those of
 * eprun_relax_dense; taken_free / taken_nudged (NULL, or [batch] int32) receive each phase's
 * steps. Returns 0, or −1 if scratch memory could not be allocated.
 */
static int ep_phases_rows(int n_layers, const int64_t *sizes, float *const *free_state, float *const *nudged_state,
                          const float *const *constant, const int *constant_per_row, float *nudged_out_constant,
                          const int64_t *labels, float a_beta, float post_beta, const float *const *up,
                          const float *const *down, float a, int act, int T, int K, int async_order, float tol,
                          int check_every, int exact, int32_t *taken_free, int32_t *taken_nudged, float *free_loss,
                          int64_t row_begin, int64_t row_end, const float *const *packed) {
    if (n_layers > 64 || n_layers < 1) return -1;
    const int out = n_layers - 1;
    const int64_t n_out = sizes[out];
    for (int i = 0; i < n_layers; i++)
        memset(free_state[i] + row_begin * sizes[i], 0, (size_t)((row_end - row_begin) * sizes[i]) * sizeof(float));
    if (relax_dense_packed(n_layers, sizes, free_state, constant, constant_per_row, up, down, a, act, 0.0f, 0.0f,
                           NULL, T, async_order, tol, check_every, exact, taken_free, row_begin, row_end, packed) != 0)
        return -1;
    for (int i = 0; i < n_layers; i++)
        memcpy(nudged_state[i] + row_begin * sizes[i], free_state[i] + row_begin * sizes[i],
               (size_t)((row_end - row_begin) * sizes[i]) * sizeof(float));
    for (int64_t row = row_begin; row < row_end; row++) {
        const float *c = constant[out] + (constant_per_row[out] ? row * n_out : 0);
        const float *s = free_state[out] + row * n_out;
        float *cn = nudged_out_constant + row * n_out;
        float loss = 0.0f;
        for (int64_t j = 0; j < n_out; j++) {
            const float y = j == labels[row] ? 1.0f : 0.0f;
            if (post_beta != 0.0f) cn[j] = y;
            else cn[j] = j == labels[row] ? c[j] + a_beta : c[j];
            loss += (y - s[j]) * (y - s[j]);
        }
        if (free_loss) free_loss[row] = 0.5f * loss;
    }
    if (post_beta != 0.0f)  /* constants as in the free phase; y in nudged_out_constant */
        return relax_dense_packed(n_layers, sizes, nudged_state, constant, constant_per_row, up, down, a, act, 0.0f,
                                  post_beta, nudged_out_constant, K, async_order, tol, check_every, exact,
                                  taken_nudged, row_begin, row_end, packed);
    const float *nudged_constant[64];
    int nudged_per_row[64];
    for (int i = 0; i < n_layers; i++) {
        nudged_constant[i] = constant[i];
        nudged_per_row[i] = constant_per_row[i];
    }
    nudged_constant[out] = nudged_out_constant;
    nudged_per_row[out] = 1;
    return relax_dense_packed(n_layers, sizes, nudged_state, nudged_constant, nudged_per_row, up, down, a, act,
                              -a_beta, 0.0f, NULL, K, async_order, tol, check_every, exact, taken_nudged, row_begin,
                              row_end, packed);
}

/* ep_phases_rows on the whole batch, split into `threads` ranges of whole pairs in one OpenMP
 * parallel region (as eprun_relax_dense): both phases of a range on one thread, so the
 * nudged phase starts from states still in that core's cache. */
int eprun_ep_dense_phases(int n_layers, const int64_t *sizes, float *const *free_state, float *const *nudged_state,
                          const float *const *constant, const int *constant_per_row, float *nudged_out_constant,
                          const int64_t *labels, float a_beta, float post_beta, const float *const *up,
                          const float *const *down, float a, int act, int T, int K, int async_order, float tol,
                          int check_every, int32_t *taken_free, int32_t *taken_nudged, float *free_loss, int64_t batch,
                          int threads) {
    const int exact = FIXED_POINT_STOP;
    int failed = 0;
    const float *P[64] = {NULL};
    const float *const *packed = shared_packing(n_layers, sizes, P);  /* once for both phases */
#ifdef _OPENMP
    int64_t pairs = (batch + 1) / 2;
    if (threads > pairs) threads = (int)pairs;
    if (threads > 1) {
#pragma omp parallel num_threads(threads) reduction(| : failed)
        {
            int64_t k = omp_get_thread_num(), n = omp_get_num_threads();
            pack_together(n_layers, sizes, up, down, packed, k, n);
            int64_t lo = 2 * (pairs * k / n), hi = 2 * (pairs * (k + 1) / n);
            if (hi > batch) hi = batch;
            if (lo < hi)
                failed |= ep_phases_rows(n_layers, sizes, free_state, nudged_state, constant, constant_per_row,
                                         nudged_out_constant, labels, a_beta, post_beta, up, down, a, act, T, K,
                                         async_order, tol, check_every, exact, taken_free, taken_nudged, free_loss,
                                         lo, hi, packed) != 0;
        }
        return failed ? -1 : 0;
    }
#endif
    (void)threads;
#if EPRUN_AVX2
    if (packed) pack_share(n_layers, sizes, up, down, packed, 0, 1);
#endif
    failed = ep_phases_rows(n_layers, sizes, free_state, nudged_state, constant, constant_per_row, nudged_out_constant,
                            labels, a_beta, post_beta, up, down, a, act, T, K, async_order, tol, check_every, exact,
                            taken_free, taken_nudged, free_loss, 0, batch, packed);
    return failed;
}

/* 1 if the library was built with OpenMP, so eprun_relax_dense runs on several threads. */
int eprun_native_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* 1 if the AVX2 path was compiled in (reported by ``eprun bench``). */
int eprun_native_vectorized(void) { return EPRUN_AVX2; }

/* 1 if the AVX-512 one-pass path for two-layer nets with a small output was compiled in. */
int eprun_native_avx512(void) { return EPRUN_AVX512; }
