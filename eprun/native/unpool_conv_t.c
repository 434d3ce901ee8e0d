/*
 * The top-down term of a max-pooled conv layer, D = Wᵀ ⋆ Pᵀ(s), from the nonzeros of Pᵀ(s).
 *
 * In the conv EP net, s^{n+1} sends down into s^n the transposed convolution of P_nᵀ(s^{n+1}),
 * the max-pool adjoint: s^{n+1} routed to the argmax of each pooling window of z_n = W_n ⋆ s^n,
 * zero elsewhere. With p × p windows one position in p² is nonzero, so the dense transposed
 * convolution (``max_unpool2d`` then ``conv_transpose2d``) spends (p² − 1)/p² of its
 * multiply-adds on zeros. Here each value v = s^{n+1}[co, i, j], routed to the z position
 * (zy, zx) of its argmax, adds its kernel into the output (stride 1, padding π)::
 *
 *     D[y, x, ci] = Σ_{co, ky, kx}  v(co at z = (y + π − ky, x + π − kx)) · W[co, ci, ky, kx]
 *
 * summed over the z positions that are an argmax, which is the transposed convolution of the
 * unpooled map term by term. Per example the nonzeros are first sorted by z position (a counting
 * sort, branch-free). Then, for each block of 16·V output channels and each kernel row ky (the
 * outermost loop, so that row's weights Wr[ky, ·, ·, block], co·K·16V floats, stay in the
 * first-level cache), every output row y is walked: its W positions are V·W vector accumulators
 * in registers, loaded with the row's partial sums from `out` (zero at ky = 0), then the z row
 * zy = y + π − ky is walked position by position and every value there adds v·W[co, ky, kx] to the
 * accumulator of x = zx − π + kx; the row goes back to `out`. The row's width, the kernel, the
 * padding, the z width and the channel count are compile-time constants (one instantiation per
 * geometry in GEOMETRIES below), so every accumulator index and weight offset is a constant; a
 * loaded weight vector serves one multiply-add (the caller permutes W to Wr once per relaxation).
 * Values of exactly 0 (a saturated hard sigmoid) add nothing. The output is channels-last,
 * D[b, y, x, ci], and may take the rest of its layer's update at the last kernel row: base + α·D,
 * clamped to [0, 1] (s¹ ← g(drive + a·D) in one pass, for the hard sigmoids); `base` must not
 * overlap `out`, which holds the partial sums until then. Each worker allocates its sort's
 * scratch (a few KB to ~100 KB) once a call.
 *
 * Each example is summed on its own in a fixed order, and the batch is split over the OpenMP
 * workers by whole examples, so the split changes no bit. The order differs from torch's, so
 * the two agree to float32 rounding.
 *
 * AVX-512 and AVX2 builds: vectors of VL = 16 or 8 channels, a block of V vectors chosen per
 * geometry and width so that a row's W·V accumulators stay in registers (at most 24 of the 32
 * AVX-512 registers, 12–16 of AVX2's 16). Every output is summed in the same order at either
 * width (ky, then z position, then the entries there, then kx), so the two give the same bits.
 */
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "vector_math.h"

/* s^{n+1} and its argmax indices, per example: co channels of hp × wp, element strides (channel,
 * row, column); the indices are row-major positions in z_n's hz × wz plane. D: h × w × ci. */
typedef struct {
    int64_t co, hp, wp, hz, wz, ci, h, w;
    int64_t s_strides[3], i_strides[3];
} unpool_geometry;

/* What is written: out = base + α·D (base, like out, [h, w, ci] an example; none: α·D), then
 * clamped to [0, 1] when `clamp01` (the hard sigmoids' g): one layer's whole update fused in. */
typedef struct {
    const float *base;
    float alpha;
    int clamp01;
} unpool_output;

/* The nonzeros of one example sorted by z position: those at position r are
 * entries [start[r], start[r + 1]), channel `channel[e]`, value `value[e]`. */
typedef struct {
    int32_t *start, *channel;
    float *value;
} sorted_nonzeros;

/* Branch-free: whether a value is 0 is data (a saturated unit), so it picks an address instead
 * of a branch; a zero is written to a spare slot past the entries and not counted. */
__attribute__((unused)) /* used by the vector builds only */
static void sort_nonzeros(sorted_nonzeros *nz, const float *s, const int64_t *idx, const unpool_geometry *g) {
    const int64_t positions = g->hz * g->wz, spare = g->co * g->hp * g->wp;
    for (int64_t r = 0; r <= positions; r++) nz->start[r] = 0;
    for (int64_t c = 0; c < g->co; c++)
        for (int64_t i = 0; i < g->hp; i++)
            for (int64_t j = 0; j < g->wp; j++) {
                const int64_t at = c * g->s_strides[0] + i * g->s_strides[1] + j * g->s_strides[2];
                nz->start[idx[c * g->i_strides[0] + i * g->i_strides[1] + j * g->i_strides[2]] + 1] += s[at] != 0.0f;
            }
    for (int64_t r = 0; r < positions; r++) nz->start[r + 1] += nz->start[r];
    /* fill in channel order, so each position's entries are in channel order: a fixed sum order */
    int32_t *next = nz->start + positions + 1;  /* scratch: the next free entry of each position */
    for (int64_t r = 0; r < positions; r++) next[r] = nz->start[r];
    for (int64_t c = 0; c < g->co; c++)
        for (int64_t i = 0; i < g->hp; i++)
            for (int64_t j = 0; j < g->wp; j++) {
                const float v = s[c * g->s_strides[0] + i * g->s_strides[1] + j * g->s_strides[2]];
                int32_t *slot = next + idx[c * g->i_strides[0] + i * g->i_strides[1] + j * g->i_strides[2]];
                const int nonzero = v != 0.0f;
                const int64_t e = nonzero ? *slot : spare;
                *slot += nonzero;
                nz->channel[e] = (int32_t)c;
                nz->value[e] = v;
            }
}

#if EPRUN_AVX2
#if EPRUN_AVX512
typedef __m512 vec;
#define VL 16       /* floats a vector */
#define MAX_ROW 24  /* accumulators a row may hold (32 vector registers, a few for the operands) */
#define vec_zero _mm512_setzero_ps
#define vec_set1 _mm512_set1_ps
#define vec_load _mm512_loadu_ps
#define vec_store _mm512_storeu_ps
#define vec_fmadd _mm512_fmadd_ps
#define vec_mul _mm512_mul_ps
#define vec_min _mm512_min_ps
#define vec_max _mm512_max_ps
#else
typedef __m256 vec;
#define VL 8
#define MAX_ROW 16
#define vec_zero _mm256_setzero_ps
#define vec_set1 _mm256_set1_ps
#define vec_load _mm256_loadu_ps
#define vec_store _mm256_storeu_ps
#define vec_fmadd _mm256_fmadd_ps
#define vec_mul _mm256_mul_ps
#define vec_min _mm256_min_ps
#define vec_max _mm256_max_ps
#endif

/* D of one example for a compile-time geometry: kernel K × K, padding PAD, z width WZ, output
 * width W, CI output channels, V vectors (VL·V output channels) a block. */
static inline __attribute__((always_inline)) void unpool_conv_t_rows(const int K, const int PAD, const int WZ,
                                                                     const int W, const int CI, const int V,
                                                                     float *restrict out,
                                                                     const sorted_nonzeros *nz, const float *wr,
                                                                     const unpool_geometry *g,
                                                                     const unpool_output *o, const float *base) {
    const vec alpha = vec_set1(o->alpha), zero = vec_zero(), one = vec_set1(1.0f);
    const int64_t ci = CI, tap_stride = CI, channel_stride = K * CI, row_stride = g->co * K * CI;
    const int32_t *restrict channel = nz->channel;
    const float *restrict value = nz->value;
    for (int64_t c0 = 0; c0 < ci; c0 += VL * V) {
        /* kernel rows outermost: the weights of one ky (co·K·16V floats) stay in the first-level
         * cache while every output row takes its share; a row's partial sums wait in `out` */
#pragma GCC unroll 1
        for (int ky = 0; ky < K; ky++) {
            const float *w_row = wr + ky * row_stride + c0;
            for (int64_t y = 0; y < g->h; y++) {
                const int64_t row = y * W * ci + c0;
                vec acc[MAX_ROW];
#pragma GCC unroll 24
                for (int q = 0; q < W * V; q++)
                    acc[q] = ky == 0 ? vec_zero() : vec_load(out + row + (q / V) * ci + VL * (q % V));
                const int64_t zy = y + PAD - ky;
                if (zy >= 0 && zy < g->hz) {
                    const int32_t *start = nz->start + zy * WZ;
#pragma GCC unroll 32
                    for (int zx = 0; zx < WZ; zx++) {
                        for (int32_t e = start[zx]; e < start[zx + 1]; e++) {
                            const vec v = vec_set1(value[e]);
                            const float *w_tap = w_row + channel[e] * channel_stride;
#pragma GCC unroll 8
                            for (int kx = 0; kx < K; kx++) {
                                const int x = zx - PAD + kx;
                                if (x < 0 || x >= W) continue;
#pragma GCC unroll 4
                                for (int u = 0; u < V; u++)
                                    acc[x * V + u] = vec_fmadd(
                                        v, vec_load(w_tap + kx * tap_stride + VL * u), acc[x * V + u]);
                            }
                        }
                    }
                }
#pragma GCC unroll 24
                for (int q = 0; q < W * V; q++) {
                    const int64_t at = row + (q / V) * ci + VL * (q % V);
                    vec value = acc[q];
                    if (ky == K - 1) {  /* the sum is whole: the rest of the update */
                        value = base != NULL ? vec_fmadd(alpha, value, vec_load(base + at)) : vec_mul(alpha, value);
                        if (o->clamp01) value = vec_min(vec_max(value, zero), one);
                    }
                    vec_store(out + at, value);
                }
            }
        }
    }
}

/* The geometries compiled: (kernel, padding, z width, output width, output channels, vectors a
 * block with AVX-512, with AVX2); every stride is then a constant, so the addresses are too. The
 * MNIST net of Ernoult et al. 2019 (5×5, 8 → 12, 32 channels) and the CIFAR-10 net of Laborieux
 * et al. 2021 (3×3 padded: 16 → 16 with 128 channels, 8 → 8 with 256; unpadded 2 → 4 with 512). */
#define GEOMETRY_LIST(X, PICK)            \
    PICK(X, 5, 0, 8, 12, 32, 2, 1)        \
    PICK(X, 3, 1, 16, 16, 128, 1, 1)      \
    PICK(X, 3, 1, 8, 8, 256, 2, 1)        \
    PICK(X, 3, 0, 2, 4, 512, 4, 2)
#if EPRUN_AVX512
#define PICK_WIDTH(X, K, PAD, WZ, W, CI, V16, V8) X(K, PAD, WZ, W, CI, V16)
#else
#define PICK_WIDTH(X, K, PAD, WZ, W, CI, V16, V8) X(K, PAD, WZ, W, CI, V8)
#endif
#define GEOMETRIES(X) GEOMETRY_LIST(X, PICK_WIDTH)

#define DEFINE_ROWS(K, PAD, WZ, W, CI, V)                                                                  \
    static void rows_##K##_##PAD##_##WZ##_##W##_##CI(float *out, const sorted_nonzeros *nz, const float *wr, \
                                                     const unpool_geometry *g, const unpool_output *o,  \
                                                     const float *base) {                               \
        unpool_conv_t_rows(K, PAD, WZ, W, CI, V, out, nz, wr, g, o, base);                               \
    }
GEOMETRIES(DEFINE_ROWS)

typedef void (*rows_kernel)(float *, const sorted_nonzeros *, const float *, const unpool_geometry *,
                            const unpool_output *, const float *);

/* The instantiation for this geometry, or NULL. */
static rows_kernel find_rows(int64_t k, int64_t pad, int64_t wz, int64_t w, int64_t ci) {
#define MATCH(K, PAD, WZ, W, CI, V) \
    if (k == K && pad == PAD && wz == WZ && w == W && ci == CI) return rows_##K##_##PAD##_##WZ##_##W##_##CI;
    GEOMETRIES(MATCH)
#undef MATCH
    return NULL;
}
#endif

/* 1 if D for this geometry (kernel k, stride, padding, z width wz, output width w, ci output
 * channels) is compiled here. */
int eprun_unpool_conv_t_available(int64_t k, int64_t stride, int64_t pad, int64_t wz, int64_t w, int64_t ci) {
#if EPRUN_AVX2
    return stride == 1 && find_rows(k, pad, wz, w, ci) != NULL;
#else
    (void)k, (void)stride, (void)pad, (void)wz, (void)w, (void)ci;
    return 0;
#endif
}

/* base + α·D, clamped to [0, 1] when `clamp01`, for `batch` examples into out [batch, h, w, ci]
 * (contiguous; base the same shape, or NULL) from s and idx (element strides: per example, then
 * channel, row, column) and wr [k, co, k, ci]. `shape`: co, hp, wp, hz, wz, ci, h, w, k, padding.
 * Split over up to `threads` OpenMP workers by whole examples. Returns 0; −1 for a geometry that
 * is not compiled; −2 when scratch memory was not available. */
int eprun_unpool_conv_t(float *out, const float *base, float alpha, int clamp01, const float *s, const int64_t *idx,
                        const float *wr, int64_t batch, const int64_t *shape, const int64_t *s_strides,
                        const int64_t *i_strides, int threads) {
#if EPRUN_AVX2
    const unpool_geometry g = {shape[0], shape[1], shape[2], shape[3], shape[4], shape[5], shape[6], shape[7],
                               {s_strides[1], s_strides[2], s_strides[3]}, {i_strides[1], i_strides[2], i_strides[3]}};
    const rows_kernel rows = find_rows(shape[8], shape[9], g.wz, g.w, g.ci);
    const unpool_output o = {base, alpha, clamp01};
    if (rows == NULL) return -1;
    const int64_t positions = g.hz * g.wz, values = g.co * g.hp * g.wp, per_example = g.h * g.w * g.ci;
    if (threads > batch) threads = (int)batch;
    if (threads < 1) threads = 1;
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(| : failed)
#endif
    {
        int32_t *ints = malloc(sizeof(int32_t) * (size_t)(2 * positions + 1 + values + 1));
        float *floats = malloc(sizeof(float) * (size_t)(values + 1));  /* + the spare slot */
        const int ok = ints != NULL && floats != NULL;
        sorted_nonzeros nz = {ints, ok ? ints + 2 * positions + 1 : NULL, floats};
        if (!ok) failed = 1;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t b = 0; b < batch; b++) {  /* every worker meets the loop; one without scratch skips */
            if (!ok) continue;
            sort_nonzeros(&nz, s + b * s_strides[0], idx + b * i_strides[0], &g);
            rows(out + b * per_example, &nz, wr, &g, &o, base != NULL ? base + b * per_example : NULL);
        }
        free(ints);
        free(floats);
    }
    return failed ? -2 : 0;
#else
    (void)out, (void)base, (void)alpha, (void)clamp01, (void)s, (void)idx, (void)wr, (void)batch, (void)shape, (void)s_strides, (void)i_strides, (void)threads;
    return -1;
#endif
}
