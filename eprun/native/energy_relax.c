/*
 * The relaxation of the energy-based dense EP net (Ernoult et al. 2019, nets/energy_mlp.py), in
 * float32.
 *
 * State layers s_0 … s_{L−1} (s_0 the first hidden layer, s_{L−1} the output), row-major
 * [batch, n_i]; weights W_i [n_i, n_{i−1}] for i ≥ 1 (W_0, into s_0, is folded into the drive).
 * With ρ(s) = g(a·s + c) and ρ'(s) = k·d(s), one step updates every layer from s_t:
 *
 *     r_i = ρ(s_i),  d_i = d(s_i)                                      (all layers first)
 *     h_i = drive (i = 0) or b_i + W_i r_{i−1} (i ≥ 1),  + W_{i+1}ᵀ r_{i+1} (i < L − 1)
 *     s_i ← (1 − ε) s_i + ε·k·d_i ⊙ h_i                        [− εβ s_i + εβ y at i = L − 1]
 *     s_i ← clamp(s_i, 0, 1)                                                  (with clamp)
 *
 * d: logistic g: r(1 − r), k = a; tanh: 1 − r², k = 1; clamp to [0, 1]: 1 where 0 ≤ a·s + c ≤ 1
 * (boundaries included), k = a.
 *
 * The rows of the batch are split into ranges, one per thread, and each range is relaxed in
 * blocks of up to BLOCK examples that run all their steps together: every load of a weight
 * serves the whole block. An example's result does not depend on which others share its block.
 * A block stops once a step leaves every one of its states unchanged bit for bit (each further
 * step would return the same states), so the result is that of all the steps, to the bit.
 *
 * Past one hidden layer under a small output (AVX2 and AVX-512 builds) the sums of h run through
 * block_sums.h instead: the couplings packed once a call (U_i = W_i, D_i = W_{i+1}), blocks of up
 * to BLOCK_ROWS examples, each vector load of a weight serving the whole block, the sums taken
 * over ρ(s) (relax_block_packed). EPRUN_NO_BLOCKS builds keep the dot and axpy forms throughout.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "block_sums.h"
#include "vector_math.h"

#define BLOCK 8
#define MAX_LAYERS 64

typedef struct {
    int n_layers;
    const int64_t *sizes;
    float *const *state;
    const float *drive;      /* [batch, n_0] */
    const float *const *bias;     /* bias[i], [n_i], for i ≥ 1 */
    const float *const *weight;   /* weight[i], [n_i, n_{i−1}], for i ≥ 1 */
    const float *target;     /* [batch, n_{L−1}] or NULL */
    float a, c, k, eps, beta;
    int act, clamp, steps;
} Problem;

/* r ← ρ(s), d ← ρ'(s)/k over n values */
static void rho_and_slope(const float *s, float *r, float *d, int64_t n, float a, float c, int act) {
    int64_t j = 0;
#if EPRUN_AVX2
    const __m256 va = _mm256_set1_ps(a), vc = _mm256_set1_ps(c), one = _mm256_set1_ps(1.0f);
    for (; j + 8 <= n; j += 8) {
        __m256 z = _mm256_fmadd_ps(va, _mm256_loadu_ps(s + j), vc);
        __m256 rv = g8(z, act), dv;
        if (act == ACT_LOGISTIC)
            dv = _mm256_mul_ps(rv, _mm256_sub_ps(one, rv));
        else if (act == ACT_TANH)
            dv = _mm256_fnmadd_ps(rv, rv, one);
        else  /* 1 where z = clamp(z, 0, 1): inside [0, 1], boundaries included; NaN gives 0 */
            dv = _mm256_and_ps(_mm256_cmp_ps(z, rv, _CMP_EQ_OQ), one);
        _mm256_storeu_ps(r + j, rv);
        _mm256_storeu_ps(d + j, dv);
    }
#endif
    for (; j < n; j++) {
        float z = a * s[j] + c, rv = g_scalar(z, act);
        r[j] = rv;
        d[j] = act == ACT_LOGISTIC ? rv * (1.0f - rv) : act == ACT_TANH ? 1.0f - rv * rv : (z == rv ? 1.0f : 0.0f);
    }
}

/* h[e][j] = base[e][j] + Σ_k W[j, k] u[e][k] for e < R (dot form: W's rows against the block) */
static void add_rows_dot(int R, float *const *h, const float *const *base, const float *w, int64_t n,
                         const float *const *u, int64_t m) {
    for (int64_t j = 0; j < n; j++) {
        const float *row = w + j * m;
        float total[BLOCK];
        int64_t k = 0;
#if EPRUN_AVX2
        __m256 acc[BLOCK];
        for (int e = 0; e < R; e++) acc[e] = _mm256_setzero_ps();
        for (; k + 8 <= m; k += 8) {
            __m256 wv = _mm256_loadu_ps(row + k);
            for (int e = 0; e < R; e++) acc[e] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(u[e] + k), acc[e]);
        }
        for (int e = 0; e < R; e++) total[e] = hsum8(acc[e]);
#else
        for (int e = 0; e < R; e++) total[e] = 0.0f;
#endif
        for (int e = 0; e < R; e++) {
            float t = total[e];
            for (int64_t kk = k; kk < m; kk++) t += row[kk] * u[e][kk];
            h[e][j] = base[e][j] + t;
        }
    }
}

/* h[e][:] += Σ_j v[e][j] W[j, :] for e < R, W [p, n] (axpy form: Wᵀ against the block) */
static void add_rows_axpy(int R, float *const *h, const float *w, int64_t p, int64_t n, const float *const *v) {
    int64_t k = 0;
#if EPRUN_AVX2
    for (; k + 8 <= n; k += 8) {
        __m256 acc[BLOCK];
        for (int e = 0; e < R; e++) acc[e] = _mm256_loadu_ps(h[e] + k);
        for (int64_t j = 0; j < p; j++) {
            __m256 wv = _mm256_loadu_ps(w + j * n + k);
            for (int e = 0; e < R; e++) acc[e] = _mm256_fmadd_ps(_mm256_set1_ps(v[e][j]), wv, acc[e]);
        }
        for (int e = 0; e < R; e++) _mm256_storeu_ps(h[e] + k, acc[e]);
    }
#endif
    for (; k < n; k++)
        for (int e = 0; e < R; e++) {
            float t = h[e][k];
            for (int64_t j = 0; j < p; j++) t += v[e][j] * w[j * n + k];
            h[e][k] = t;
        }
}

/* s ← clamp?((1 − ε − εβ')·s + ε·k·d⊙h + εβ'·y); returns 1 if some value changed in any bit */
static int update_state(float *s, const float *d, const float *h, const float *y, int64_t n, float decay,
                        float gain, float pull, int clamp) {
    int moved = 0;
    for (int64_t j = 0; j < n; j++) {
        float v = s[j] * decay + gain * (d[j] * h[j]);
        if (y) v += pull * y[j];
        if (clamp) v = v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v);  /* NaN stays NaN, as torch's clamp_ */
        uint32_t before, after;
        memcpy(&before, s + j, 4);
        memcpy(&after, &v, 4);
        moved |= before != after;
        s[j] = v;
    }
    return moved;
}

/* all steps of rows [row, row + R) */
static void relax_block(const Problem *p, int64_t row, int R, float *scratch) {
    const int L = p->n_layers;
    float *r[MAX_LAYERS][BLOCK], *d[MAX_LAYERS][BLOCK], *h[MAX_LAYERS][BLOCK];
    float *s[MAX_LAYERS][BLOCK];
    const float *base[MAX_LAYERS][BLOCK];
    float *cursor = scratch;
    for (int i = 0; i < L; i++) {
        int64_t n = p->sizes[i];
        for (int e = 0; e < R; e++) {
            r[i][e] = cursor; cursor += n;
            d[i][e] = cursor; cursor += n;
            h[i][e] = cursor; cursor += n;
            s[i][e] = p->state[i] + (row + e) * n;
            base[i][e] = i == 0 ? p->drive + (row + e) * n : p->bias[i];
        }
    }
    const int nudged = p->target != NULL && p->beta != 0.0f;
    const float gain = p->eps * p->k;
    for (int t = 0; t < p->steps; t++) {
        for (int i = 0; i < L; i++)
            for (int e = 0; e < R; e++) rho_and_slope(s[i][e], r[i][e], d[i][e], p->sizes[i], p->a, p->c, p->act);
        int moved = 0;
        for (int i = 0; i < L; i++) {
            int64_t n = p->sizes[i];
            if (i == 0)
                for (int e = 0; e < R; e++) memcpy(h[0][e], base[0][e], (size_t)n * sizeof(float));
            else
                add_rows_dot(R, h[i], base[i], p->weight[i], n, (const float *const *)r[i - 1], p->sizes[i - 1]);
            if (i + 1 < L)
                add_rows_axpy(R, h[i], p->weight[i + 1], p->sizes[i + 1], n, (const float *const *)r[i + 1]);
            const int out = i == L - 1 && nudged;
            const float decay = out ? 1.0f - p->eps - p->eps * p->beta : 1.0f - p->eps;
            for (int e = 0; e < R; e++)
                moved |= update_state(s[i][e], d[i][e], h[i][e], out ? p->target + (row + e) * n : NULL, n, decay,
                                      gain, p->eps * p->beta, p->clamp);
        }
        if (!moved) break;  /* a bitwise fixed point of every row of the block */
    }
}

#ifdef EPRUN_NO_BLOCKS
#define ENERGY_BLOCKS 0
#else
#define ENERGY_BLOCKS 1
#endif

/* 1 when the block sums run this net: past one hidden layer under a small output */
static int uses_packed_blocks(int n_layers, const int64_t *sizes) {
    return EPRUN_AVX2 && ENERGY_BLOCKS && n_layers >= 2 && !(n_layers == 2 && sizes[1] <= 16);
}

#if EPRUN_AVX2
/* relax_block for R ≤ BLOCK_ROWS rows from `row` with the packed couplings P (pack_share with
 * up = W, down = W shifted by one): per step ρ and ρ' of every layer, then for each layer and
 * chunk of CHUNK units the block's sums Σ_k W_i[j, k] r_{i−1}[k] + Σ_k W_{i+1}[k, j] r_{i+1}[k]
 * (block_sums_any), and the update of update_state, unit by unit. scratch: 2·R·Σn_i + R·CHUNK
 * floats. */
static void relax_block_packed(const Problem *p, int64_t row, int R, const float *const *P, float *scratch) {
    const int L = p->n_layers;
    float *r[MAX_LAYERS], *d[MAX_LAYERS];
    float *cursor = scratch;
    for (int i = 0; i < L; i++) {
        r[i] = cursor; cursor += R * p->sizes[i];
        d[i] = cursor; cursor += R * p->sizes[i];
    }
    float *z = cursor;
    const int nudged = p->target != NULL && p->beta != 0.0f;
    const float gain = p->eps * p->k, pull = p->eps * p->beta;
    for (int t = 0; t < p->steps; t++) {
        for (int i = 0; i < L; i++)  /* row by row: an example's values come out of the same vector/scalar split */
            for (int e = 0; e < R; e++) {
                const int64_t at = e * p->sizes[i];
                rho_and_slope(p->state[i] + row * p->sizes[i] + at, r[i] + at, d[i] + at, p->sizes[i], p->a, p->c,
                              p->act);
            }
        int moved = 0;
        for (int i = 0; i < L; i++) {
            const int64_t n = p->sizes[i], nb = i > 0 ? p->sizes[i - 1] : 0, na = i + 1 < L ? p->sizes[i + 1] : 0;
            const int out = i == L - 1 && nudged;
            const float decay = out ? 1.0f - p->eps - p->eps * p->beta : 1.0f - p->eps;
            const float *chunk = P[i];
            for (int64_t j = 0; j < n; j += CHUNK, chunk += CHUNK * (nb + na)) {
                block_sums_any(R, z, i > 0 ? r[i - 1] : NULL, i + 1 < L ? r[i + 1] : NULL, nb, na, chunk);
                const int64_t width = n - j < CHUNK ? n - j : CHUNK;
                for (int e = 0; e < R; e++) {
                    float *s = p->state[i] + (row + e) * n + j;
                    const float *de = d[i] + e * n + j, *ze = z + e * CHUNK;
                    const float *base = i == 0 ? p->drive + (row + e) * n + j : p->bias[i] + j;
                    const float *y = out ? p->target + (row + e) * n + j : NULL;
                    for (int64_t q = 0; q < width; q++) {
                        float v = s[q] * decay + gain * (de[q] * (base[q] + ze[q]));
                        if (y) v += pull * y[q];
                        if (p->clamp) v = v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v);  /* NaN stays NaN */
                        uint32_t before, after;
                        memcpy(&before, s + q, 4);
                        memcpy(&after, &v, 4);
                        moved |= before != after;
                        s[q] = v;
                    }
                }
            }
        }
        if (!moved) break;  /* a bitwise fixed point of every row of the block */
    }
}
#endif

/* Run ``steps`` steps on state (in place). Returns 0, or 1 when scratch memory could not be had. */
int eprun_relax_energy(int n_layers, const int64_t *sizes, float *const *state, const float *drive,
                       const float *const *bias, const float *const *weight, const float *target, float a, float c,
                       float k, int act, float eps, float beta, int clamp, int steps, int64_t batch, int threads) {
    if (n_layers < 1 || n_layers > MAX_LAYERS) return 2;
    Problem p = {n_layers, sizes, state, drive, bias, weight, target, a, c, k, eps, beta, act, clamp, steps};
    int64_t per_row = 0;
    for (int i = 0; i < n_layers; i++) per_row += 3 * sizes[i];
    const float *packed[MAX_LAYERS] = {NULL};
    const int blocks = uses_packed_blocks(n_layers, sizes);
#if EPRUN_AVX2
    if (blocks) {  /* the couplings packed once, by this thread, for every thread of the call */
        const float *down[MAX_LAYERS] = {NULL};
        for (int i = 0; i + 1 < n_layers; i++) down[i] = weight[i + 1];
        float *space = packing_space(packed_layout(n_layers, sizes, NULL, NULL));
        if (!space) return 1;
        packed_layout(n_layers, sizes, space, packed);
        pack_share(n_layers, sizes, weight, down, packed, 0, 1);
    }
#endif
    int64_t scratch_floats = per_row * BLOCK;  /* relax_block's r, d and h of BLOCK rows */
#if EPRUN_AVX2
    if (blocks) scratch_floats = BLOCK_ROWS * (per_row / 3 * 2 + CHUNK);  /* relax_block_packed's r, d and z */
#endif
    (void)packed;
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads > 0 ? threads : 1) reduction(| : failed)
#endif
    {
        int id = 0, count = 1;
#ifdef _OPENMP
        id = omp_get_thread_num();
        count = omp_get_num_threads();
#endif
        int64_t first = batch * id / count, last = batch * (id + 1) / count;
        float *scratch = last > first ? malloc((size_t)scratch_floats * sizeof(float)) : NULL;
        if (last > first && scratch == NULL) {
            failed = 1;
        } else if (!blocks) {
            for (int64_t row = first; row < last; row += BLOCK) {
                int R = last - row < BLOCK ? (int)(last - row) : BLOCK;
                relax_block(&p, row, R, scratch);
            }
        }
#if EPRUN_AVX2
        else {  /* blocks of nearly equal size, at most BLOCK_ROWS */
            const int64_t rows = last - first, count = (rows + BLOCK_ROWS - 1) / BLOCK_ROWS;
            for (int64_t blk = 0; blk < count; blk++) {
                const int64_t lo = first + rows * blk / count, hi = first + rows * (blk + 1) / count;
                relax_block_packed(&p, lo, (int)(hi - lo), packed, scratch);
            }
        }
#endif
        free(scratch);
    }
    (void)threads;
    return failed;
}
