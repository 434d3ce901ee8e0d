/*
 * A 5 × 5 convolution and the 2 × 2 max pooling after it, by Winograd's minimal filtering
 * F(4 × 4, 5 × 5) (Lavin & Gray 2016), the pooling fused into the output transform.
 *
 * In the conv EP net every relaxation step convolves each conv layer's state, v, i = P(W ⋆ s)
 * (bias-free; the bias is added after pooling), and the convolution is the step's largest cost.
 * A direct convolution spends 25 multiply-adds per output, per input channel. Winograd's
 * algorithm computes a 4 × 4 output tile from an 8 × 8 input tile d in the transformed domain::
 *
 *     Y = Aᵀ [ Σ_ci (G W[co, ci] Gᵀ) ⊙ (Bᵀ d[ci] B) ] A          (8 × 8 elementwise products)
 *
 * 64 multiply-adds per tile and channel pair instead of 16 · 25 = 400, plus the transforms, whose
 * cost is shared by all the output (input) channels. Bᵀ (8 × 8), G (8 × 5) and Aᵀ (4 × 8) are the
 * Cook–Toom matrices of the points 0, ±1, ±2, ±½, ∞, built and explained in
 * ``eprun/nets/winograd.py``, which also transforms the weights once per relaxation,
 * U[ξν, ci, co] = (G W[co, ci] Gᵀ)[ξ, ν]; Bᵀ and Aᵀ are written out below. The sum over ci is,
 * for each of the 64 positions ξν, a product of matrices:
 *
 *     M[ξν][tile, co] = Σ_ci V[ξν][tile, ci] · U[ξν][ci, co],    V[ξν][tile, ci] = (Bᵀ d[ci] B)[ξ, ν]
 *
 * Tiles are taken in blocks (a block's V and M stay in the second-level cache): input transform
 * of the block, the 64 products (6 tiles × 64 output channels of accumulators in registers), then
 * the output transform of each tile, whose 4 × 4 outputs are exactly four 2 × 2 pooling windows
 * (the tiles start at multiples of 4): their max and its index (row-major in the z plane, the
 * first in row-major order among equal values, a NaN wins: as torch's max_pool2d) are written,
 * and z itself never is. A NaN or infinity in s reaches every output of the tiles it is in (the
 * transforms mix a tile's 64 inputs), a superset of the windows it reaches directly.
 *
 * Layout: s is channels-last, [batch, h, w, ci]; the pooled values and indices are
 * [batch, hz/2, wz/2, co] (channels-last views of [batch, co, hz/2, wz/2]). Stride 1, zero
 * padding `pad`; z is hz × wz = (h + 2 pad − 4) × (w + 2 pad − 4), multiples of 4; ci a multiple
 * of 16, co of 64.
 *
 * AVX-512 and AVX2 builds: vectors of 16 or 8 channels (`lanes`), the same operations lane by
 * lane in the same order, so the two give the same bits; the products hold 6 tiles × 64 output
 * channels of accumulators (24 of the 32 AVX-512 registers) or 6 × 16 (12 of AVX2's 16).
 *
 * Every tile's sums run in a fixed order whatever block or thread it falls in, so the split over
 * the OpenMP workers changes no bit. The results differ from a direct convolution by rounding
 * (the transforms' round-off: float32, the MNIST net's second layer, max |error| 4e-6 against
 * 9e-7 for torch's; ``tests/test_winograd.py`` bounds it, and any disagreement between the
 * constants below and the Python module's would fail it). What it saves on the MNIST net's second
 * layer is measured in docs/performance.md (``python -m benchmarks.conv_step``).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "vector_math.h"

#define ALPHA 8          /* the transformed tile's side, m + r − 1 */
#define TILE 4           /* m: the output tile's side */
#define KERNEL 5         /* r */
#define CI_MULTIPLE 16   /* input channels: a multiple of this (a whole number of vectors at either width) */
#define GROUP 6          /* tiles whose products share the loaded U vectors */
#define CO_BLOCK 64      /* output channels a product call covers */
#define BLOCK_BYTES (256 * 1024)  /* V and M of one block of tiles */

typedef struct {
    int64_t h, w, ci, co, hz, wz, pad, tiles_y, tiles_x;
} winograd_geometry;

#if EPRUN_AVX2
/* Bᵀ and Aᵀ of the points 0, ±1, ±2, ±½, ∞, exactly as ``eprun/nets/winograd.py`` builds them
 * (a test compares the two): compile-time constants, so that the unrolled transforms skip the zeros
 * and multiply by immediates. */
static const float BT[ALPHA][ALPHA] = {
    {1, 0, -21.0f / 4, 0, 21.0f / 4, 0, -1, 0},
    {0, -2.0f / 9, -2.0f / 9, 17.0f / 18, 17.0f / 18, -2.0f / 9, -2.0f / 9, 0},
    {0, 2.0f / 9, -2.0f / 9, -17.0f / 18, 17.0f / 18, 2.0f / 9, -2.0f / 9, 0},
    {0, 1.0f / 180, 1.0f / 360, -1.0f / 36, -1.0f / 72, 1.0f / 45, 1.0f / 90, 0},
    {0, -1.0f / 180, 1.0f / 360, 1.0f / 36, -1.0f / 72, -1.0f / 45, 1.0f / 90, 0},
    {0, 64.0f / 45, 128.0f / 45, -16.0f / 9, -32.0f / 9, 16.0f / 45, 32.0f / 45, 0},
    {0, -64.0f / 45, 128.0f / 45, 16.0f / 9, -32.0f / 9, -16.0f / 45, 32.0f / 45, 0},
    {0, -1, 0, 21.0f / 4, 0, -21.0f / 4, 0, 1},
};
static const float AT[TILE][ALPHA] = {
    {1, 1, 1, 1, 1, 1, 1, 0},
    {0, 1, -1, 2, -2, 1.0f / 2, -1.0f / 2, 0},
    {0, 1, 1, 4, 4, 1.0f / 4, 1.0f / 4, 0},
    {0, 1, -1, 8, -8, 1.0f / 8, -1.0f / 8, 1},
};


/* V[ξν][t, c0 .. c0 + LANES] = (Bᵀ d B)[ξ, ν] for one tile (its 8 × 8 input d, zero outside s) and
 * LANES input channels, one vector of them per element. Zero coefficients of Bᵀ are skipped (about
 * half of them; the test is the same for every tile, so the branch is predicted). */
#if EPRUN_AVX512
typedef __m512 lanes;
#define LANES 16         /* channels a vector */
#define PRODUCT_VECTORS 4  /* vectors of output channels a product pass accumulates, per tile */
#define LANES_ZERO() _mm512_setzero_ps()
#define LANES_SET1(c) _mm512_set1_ps(c)
#define LANES_LOAD(p) _mm512_loadu_ps(p)
#define LANES_STORE(p, x) _mm512_storeu_ps(p, x)
#define LANES_FMADD(a, b, acc) _mm512_fmadd_ps(a, b, acc)
#else
typedef __m256 lanes;
#define LANES 8
#define PRODUCT_VECTORS 2
#define LANES_ZERO() _mm256_setzero_ps()
#define LANES_SET1(c) _mm256_set1_ps(c)
#define LANES_LOAD(p) _mm256_loadu_ps(p)
#define LANES_STORE(p, x) _mm256_storeu_ps(p, x)
#define LANES_FMADD(a, b, acc) _mm256_fmadd_ps(a, b, acc)
#endif
#define LANES_FMA(c, x, acc) LANES_FMADD(LANES_SET1(c), x, acc)
#define PRODUCT_COLUMNS (PRODUCT_VECTORS * LANES)  /* output channels a product pass covers */

/* Σ_k c[k] · x[k · stride], k < n, the terms with c[k] = 0 left out: inlined into the unrolled
 * transforms, c is a row of the constant Bᵀ or Aᵀ, so the zeros are dropped at compile time. */
static inline __attribute__((always_inline)) lanes weighted_sum(const float *c, const lanes *x, int n, int stride) {
    lanes acc = LANES_ZERO();
    #pragma GCC unroll 8
    for (int k = 0; k < n; k++)
        if (c[k] != 0.0f) acc = LANES_FMA(c[k], x[k * stride], acc);
    return acc;
}

static void input_transform(float *v, int64_t t, int64_t block, const float *s, int64_t ty, int64_t tx,
                            int64_t c0, const winograd_geometry *g) {
    lanes d[ALPHA][ALPHA], rows[ALPHA][ALPHA];
    const int64_t y0 = ty * TILE - g->pad, x0 = tx * TILE - g->pad;
    #pragma GCC unroll 8
    for (int y = 0; y < ALPHA; y++)
        #pragma GCC unroll 8
        for (int x = 0; x < ALPHA; x++) {
            const int64_t yy = y0 + y, xx = x0 + x;
            d[y][x] = yy >= 0 && yy < g->h && xx >= 0 && xx < g->w ? LANES_LOAD(s + (yy * g->w + xx) * g->ci + c0)
                                                                    : LANES_ZERO();
        }
    #pragma GCC unroll 8
    for (int xi = 0; xi < ALPHA; xi++)  /* rows = Bᵀ d */
        #pragma GCC unroll 8
        for (int x = 0; x < ALPHA; x++) rows[xi][x] = weighted_sum(BT[xi], &d[0][x], ALPHA, ALPHA);
    #pragma GCC unroll 8
    for (int xi = 0; xi < ALPHA; xi++)  /* V = (Bᵀ d) B */
        #pragma GCC unroll 8
        for (int nu = 0; nu < ALPHA; nu++)
            LANES_STORE(v + ((int64_t)(xi * ALPHA + nu) * block + t) * g->ci + c0,
                        weighted_sum(BT[nu], rows[xi], ALPHA, 1));
}

/* M[t0 .. t0 + nt, c0 .. c0 + 64] = V[t0 .. t0 + nt, :] · U[:, c0 .. c0 + 64] for one position ξν
 * (m, v, u already offset to it), in passes of PRODUCT_COLUMNS output channels (one with AVX-512,
 * four with AVX2). Each tile's sum runs over ci in order, whatever nt or the pass is. */
#define DEFINE_PRODUCT(NT)                                                                             \
    static void product_##NT(float *m, const float *v, const float *u, int64_t ci, int64_t co) {       \
        for (int c = 0; c < CO_BLOCK; c += PRODUCT_COLUMNS) {                                          \
            lanes acc[NT][PRODUCT_VECTORS];                                                            \
            for (int i = 0; i < NT; i++)                                                               \
                for (int j = 0; j < PRODUCT_VECTORS; j++) acc[i][j] = LANES_ZERO();                    \
            for (int64_t k = 0; k < ci; k++) {                                                         \
                const float *uk = u + k * co + c;                                                      \
                lanes uv[PRODUCT_VECTORS];                                                             \
                for (int j = 0; j < PRODUCT_VECTORS; j++) uv[j] = LANES_LOAD(uk + LANES * j);          \
                for (int i = 0; i < NT; i++) {                                                         \
                    const lanes b = LANES_SET1(v[i * ci + k]);                                         \
                    for (int j = 0; j < PRODUCT_VECTORS; j++) acc[i][j] = LANES_FMADD(b, uv[j], acc[i][j]); \
                }                                                                                      \
            }                                                                                          \
            for (int i = 0; i < NT; i++)                                                               \
                for (int j = 0; j < PRODUCT_VECTORS; j++) LANES_STORE(m + i * co + c + LANES * j, acc[i][j]); \
        }                                                                                              \
    }
DEFINE_PRODUCT(1)
DEFINE_PRODUCT(2)
DEFINE_PRODUCT(3)
DEFINE_PRODUCT(4)
DEFINE_PRODUCT(5)
DEFINE_PRODUCT(6)
#undef DEFINE_PRODUCT

typedef void (*product_kernel)(float *, const float *, const float *, int64_t, int64_t);
static const product_kernel PRODUCTS[GROUP + 1] = {NULL, product_1, product_2, product_3, product_4, product_5,
                                                   product_6};

/* The max of a 2 × 2 window (LANES channels) and where it is: the first in row-major order among
 * equal values, a NaN taking the place (torch's max_pool2d); `first` is the index of the top-left
 * position, `width` z's row length. */
#if EPRUN_AVX512
static inline void pool_window(float *pooled, int64_t *indices, lanes v00, lanes v01, lanes v10, lanes v11,
                               int64_t first, int64_t width) {
    const lanes candidates[3] = {v01, v10, v11};
    const int64_t offsets[3] = {1, width, width + 1};
    lanes best = v00;
    __m512i where = _mm512_set1_epi32((int32_t)first);
    for (int k = 0; k < 3; k++) {
        const __mmask16 take = _mm512_cmp_ps_mask(candidates[k], best, _CMP_GT_OQ) |
                               _mm512_cmp_ps_mask(candidates[k], candidates[k], _CMP_UNORD_Q);
        best = _mm512_mask_mov_ps(best, take, candidates[k]);
        where = _mm512_mask_mov_epi32(where, take, _mm512_set1_epi32((int32_t)(first + offsets[k])));
    }
    _mm512_storeu_ps(pooled, best);
    _mm512_storeu_si512(indices, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(where)));
    _mm512_storeu_si512(indices + 8, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(where, 1)));
}
#else
static inline void pool_window(float *pooled, int64_t *indices, lanes v00, lanes v01, lanes v10, lanes v11,
                               int64_t first, int64_t width) {
    const lanes candidates[3] = {v01, v10, v11};
    const int64_t offsets[3] = {1, width, width + 1};
    lanes best = v00;
    __m256 where = _mm256_castsi256_ps(_mm256_set1_epi32((int32_t)first));  /* int32 lanes, blended as floats */
    for (int k = 0; k < 3; k++) {
        const __m256 take = _mm256_or_ps(_mm256_cmp_ps(candidates[k], best, _CMP_GT_OQ),
                                         _mm256_cmp_ps(candidates[k], candidates[k], _CMP_UNORD_Q));
        best = _mm256_blendv_ps(best, candidates[k], take);
        where = _mm256_blendv_ps(where, _mm256_castsi256_ps(_mm256_set1_epi32((int32_t)(first + offsets[k]))), take);
    }
    const __m256i at = _mm256_castps_si256(where);
    _mm256_storeu_ps(pooled, best);
    _mm256_storeu_si256((__m256i *)indices, _mm256_cvtepi32_epi64(_mm256_castsi256_si128(at)));
    _mm256_storeu_si256((__m256i *)(indices + 4), _mm256_cvtepi32_epi64(_mm256_extracti128_si256(at, 1)));
}
#endif

/* Y = Aᵀ M A for one tile and LANES output channels, then its four 2 × 2 windows pooled into
 * pooled / indices at (b, 2ty + py, 2tx + px, c0 ..). */
static void output_transform_pool(float *pooled, int64_t *indices, const float *m, int64_t t, int64_t block,
                                  int64_t b, int64_t ty, int64_t tx, int64_t c0,
                                  const winograd_geometry *g) {
    lanes cols[TILE][ALPHA];
    lanes y[TILE][TILE];
    #pragma GCC unroll 8
    for (int nu = 0; nu < ALPHA; nu++) {  /* cols = Aᵀ M, a column of M at a time */
        lanes column[ALPHA];
        #pragma GCC unroll 8
        for (int xi = 0; xi < ALPHA; xi++)
            column[xi] = LANES_LOAD(m + ((int64_t)(xi * ALPHA + nu) * block + t) * g->co + c0);
        #pragma GCC unroll 8
        for (int i = 0; i < TILE; i++) cols[i][nu] = weighted_sum(AT[i], column, ALPHA, 1);
    }
    #pragma GCC unroll 8
    for (int i = 0; i < TILE; i++)  /* Y = (Aᵀ M) A */
        #pragma GCC unroll 8
        for (int j = 0; j < TILE; j++) y[i][j] = weighted_sum(AT[j], cols[i], ALPHA, 1);
    const int64_t hp = g->hz / 2, wp = g->wz / 2;
    for (int py = 0; py < 2; py++)
        for (int px = 0; px < 2; px++) {
            const int64_t zy = ty * TILE + 2 * py, zx = tx * TILE + 2 * px;
            const int64_t at_out = ((b * hp + zy / 2) * wp + zx / 2) * g->co + c0;
            pool_window(pooled + at_out, indices + at_out, y[2 * py][2 * px], y[2 * py][2 * px + 1],
                        y[2 * py + 1][2 * px], y[2 * py + 1][2 * px + 1], zy * g->wz + zx, g->wz);
        }
}

/* This thread's scratch of at least `floats` floats, kept for its next call (V and M of a block are
 * a few hundred KB: allocated per call, they came back from the system as fresh pages every time,
 * which cost more than the convolution). NULL if memory is short. */
static float *scratch(size_t floats) {
    static _Thread_local float *kept = NULL;
    static _Thread_local size_t kept_floats = 0;
    if (kept_floats < floats) {
        free(kept);
        kept = aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64);
        kept_floats = kept != NULL ? floats : 0;
    }
    return kept;
}

/* pooled, indices [batch, hz/2, wz/2, co] ← max-pool 2 × 2 of W ⋆ s (see the top). */
static int conv_pool(float *pooled, int64_t *indices, const float *s, const float *u, int64_t batch,
                     const int64_t *shape, int threads) {
    winograd_geometry g = {shape[0], shape[1], shape[2], shape[3], 0, 0, shape[4], 0, 0};
    g.hz = g.h + 2 * g.pad - (KERNEL - 1);
    g.wz = g.w + 2 * g.pad - (KERNEL - 1);
    g.tiles_y = g.hz / TILE;
    g.tiles_x = g.wz / TILE;
    const int64_t per_example = g.tiles_y * g.tiles_x, tiles = batch * per_example;
    const int64_t positions = ALPHA * ALPHA;
    /* a block: a multiple of GROUP tiles whose V and M fit in BLOCK_BYTES */
    int64_t block = (BLOCK_BYTES / (int64_t)sizeof(float)) / (positions * (g.ci + g.co));
    block = block < GROUP ? GROUP : block / GROUP * GROUP;
    const int64_t blocks = (tiles + block - 1) / block;
    if (threads > blocks) threads = (int)blocks;
    if (threads < 1) threads = 1;
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(| : failed)
#endif
    {
        float *v = scratch((size_t)(positions * block * (g.ci + g.co))), *m = v + positions * block * g.ci;
        const int ok = v != NULL;
        if (!ok) failed = 1;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t k = 0; k < blocks; k++) {  /* every worker meets the loop; one without scratch skips */
            if (!ok) continue;
            const int64_t first = k * block, count = tiles - first < block ? tiles - first : block;
            for (int64_t t = 0; t < count; t++) {
                const int64_t tile = first + t, b = tile / per_example, ty = tile % per_example / g.tiles_x,
                              tx = tile % g.tiles_x;
                for (int64_t c0 = 0; c0 < g.ci; c0 += LANES)
                    input_transform(v, t, block, s + b * g.h * g.w * g.ci, ty, tx, c0, &g);
            }
            for (int64_t p = 0; p < positions; p++)
                for (int64_t t0 = 0; t0 < count; t0 += GROUP) {
                    const int64_t nt = count - t0 < GROUP ? count - t0 : GROUP;
                    for (int64_t c0 = 0; c0 < g.co; c0 += CO_BLOCK)
                        PRODUCTS[nt](m + (p * block + t0) * g.co + c0, v + (p * block + t0) * g.ci,
                                     u + p * g.ci * g.co + c0, g.ci, g.co);
                }
            for (int64_t t = 0; t < count; t++) {
                const int64_t tile = first + t, b = tile / per_example, ty = tile % per_example / g.tiles_x,
                              tx = tile % g.tiles_x;
                for (int64_t c0 = 0; c0 < g.co; c0 += LANES)
                    output_transform_pool(pooled, indices, m, t, block, b, ty, tx, c0, &g);
            }
        }
    }
    return failed ? -2 : 0;
}
#endif

/* 1 if this geometry is computed here (an AVX2 or AVX-512 build): 5 × 5 kernel, stride 1, 2 × 2
 * pooling (the caller's part), z's sides multiples of 4, ci a multiple of 16, co of 64. */
int eprun_winograd_conv_pool_available(int64_t kernel, int64_t stride, int64_t pool, int64_t hz, int64_t wz,
                                       int64_t ci, int64_t co) {
#if EPRUN_AVX2
    return kernel == KERNEL && stride == 1 && pool == 2 && hz > 0 && wz > 0 && hz % TILE == 0 && wz % TILE == 0 &&
           hz * wz <= INT32_MAX && ci > 0 && ci % CI_MULTIPLE == 0 && co > 0 && co % CO_BLOCK == 0;
#else
    (void)kernel, (void)stride, (void)pool, (void)hz, (void)wz, (void)ci, (void)co;
    return 0;
#endif
}

/* pooled, indices [batch, hz/2, wz/2, co] ← max-pool 2 × 2 of W ⋆ s, s [batch, h, w, ci] (both
 * contiguous), u = the transformed weights [64, ci, co], row-major. `shape`: h, w, ci, co, pad.
 * Split over up to `threads` OpenMP workers by blocks of tiles. Returns 0; −1 for a geometry that
 * is not computed here; −2 when scratch memory was not available. */
int eprun_winograd_conv_pool(float *pooled, int64_t *indices, const float *s, const float *u, int64_t batch,
                             const int64_t *shape, int threads) {
    const int64_t hz = shape[0] + 2 * shape[4] - (KERNEL - 1), wz = shape[1] + 2 * shape[4] - (KERNEL - 1);
    if (!eprun_winograd_conv_pool_available(KERNEL, 1, 2, hz, wz, shape[2], shape[3])) return -1;
#if EPRUN_AVX2
    return conv_pool(pooled, indices, s, u, batch, shape, threads);
#else
    (void)pooled, (void)indices, (void)s, (void)u, (void)batch, (void)threads;
    return -1;
#endif
}
