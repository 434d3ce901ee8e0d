/*
 * G += α · Aᵀ X  for a short batch: G [n, m], A [batch, n], X [batch, m], all row-major float32.
 *
 * EP's update of the first weight matrix is one such product a batch: A = s¹* − s¹β (batch 50,
 * n = 512 hidden units), X = the input (m = 784 pixels), α = 1/(β·batch). Its inner dimension is
 * the batch, so each element of G takes only 50 multiply-adds and G (1.6 MB) is read and written
 * once; torch's MKL runs its AVX2 kernels for it on AMD CPUs. Here, with AVX-512: tiles of 8 rows
 * of G by 32 columns, 16 vector accumulators, each load of X serving 8 rows and each broadcast
 * of A two vectors; the columns of X for one tile column (batch × 32 floats) stay in the first
 * level cache while the row tiles go by. The sum over the batch runs in order b = 0, 1, …, and
 * each element of G belongs to one thread, so the split over threads changes no bit.
 */
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__FMA__)
#include <immintrin.h>
#define EPRUN_OUTER_AVX512 1
#else
#define EPRUN_OUTER_AVX512 0
#endif

#define TILE_ROWS 8

#if EPRUN_OUTER_AVX512
/* rows [i, i + R) by the 32 columns at j (lanes of the second vector in `second`, of the first
 * in `first`): G[i + r, j + q] += α Σ_b A[b, i + r] X[b, j + q]. R is a compile-time constant
 * after inlining (TILE_ROWS, or the tail's count through the switch below). */
static inline __attribute__((always_inline)) void tile(const int R, float *G, const float *A, const float *X,
                                                       int64_t batch, int64_t n, int64_t m, float alpha, int64_t i,
                                                       int64_t j, __mmask16 first, __mmask16 second) {
    __m512 acc[TILE_ROWS][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < batch; b++) {
        const __m512 x0 = _mm512_maskz_loadu_ps(first, X + b * m + j);
        const __m512 x1 = _mm512_maskz_loadu_ps(second, X + b * m + j + 16);
        const float *a = A + b * n + i;
        for (int r = 0; r < R; r++) {
            const __m512 ar = _mm512_set1_ps(a[r]);
            acc[r][0] = _mm512_fmadd_ps(ar, x0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(ar, x1, acc[r][1]);
        }
    }
    const __m512 va = _mm512_set1_ps(alpha);
    for (int r = 0; r < R; r++) {
        float *g = G + (i + r) * m + j;
        _mm512_mask_storeu_ps(g, first, _mm512_fmadd_ps(va, acc[r][0], _mm512_maskz_loadu_ps(first, g)));
        _mm512_mask_storeu_ps(g + 16, second, _mm512_fmadd_ps(va, acc[r][1], _mm512_maskz_loadu_ps(second, g + 16)));
    }
}

/* rows [row_begin, row_end) of G, every column */
static void add_outer_rows(float *G, const float *A, const float *X, int64_t batch, int64_t n, int64_t m, float alpha,
                           int64_t row_begin, int64_t row_end) {
    for (int64_t j = 0; j < m; j += 32) {
        const int64_t left = m - j;
        const __mmask16 first = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
        const __mmask16 second = left >= 32 ? (__mmask16)0xFFFF
                                 : left > 16 ? (__mmask16)((1u << (left - 16)) - 1u) : (__mmask16)0;
        int64_t i = row_begin;
        if (first == 0xFFFF && second == 0xFFFF)
            for (; i + TILE_ROWS <= row_end; i += TILE_ROWS)
                tile(TILE_ROWS, G, A, X, batch, n, m, alpha, i, j, 0xFFFF, 0xFFFF);
        else
            for (; i + TILE_ROWS <= row_end; i += TILE_ROWS)
                tile(TILE_ROWS, G, A, X, batch, n, m, alpha, i, j, first, second);
        switch (row_end - i) {  /* the last rows, fewer than a tile */
        case 7: tile(7, G, A, X, batch, n, m, alpha, i, j, first, second); break;
        case 6: tile(6, G, A, X, batch, n, m, alpha, i, j, first, second); break;
        case 5: tile(5, G, A, X, batch, n, m, alpha, i, j, first, second); break;
        case 4: tile(4, G, A, X, batch, n, m, alpha, i, j, first, second); break;
        case 3: tile(3, G, A, X, batch, n, m, alpha, i, j, first, second); break;
        case 2: tile(2, G, A, X, batch, n, m, alpha, i, j, first, second); break;
        case 1: tile(1, G, A, X, batch, n, m, alpha, i, j, first, second); break;
        default: break;
        }
    }
}
#endif

/* G += α Aᵀ X on up to `threads` OpenMP threads (rows split in whole tiles). Returns 0, or −1
 * when the library was built without AVX-512 (the caller then uses torch). */
int eprun_add_outer(float *G, const float *A, const float *X, int64_t batch, int64_t n, int64_t m, float alpha,
                    int threads) {
#if EPRUN_OUTER_AVX512
    int64_t tiles = (n + TILE_ROWS - 1) / TILE_ROWS;
    if (threads > tiles) threads = (int)tiles;
#ifdef _OPENMP
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
        {
            int64_t k = omp_get_thread_num(), count = omp_get_num_threads();
            int64_t lo = TILE_ROWS * (tiles * k / count), hi = TILE_ROWS * (tiles * (k + 1) / count);
            if (hi > n) hi = n;
            if (lo < hi) add_outer_rows(G, A, X, batch, n, m, alpha, lo, hi);
        }
        return 0;
    }
#endif
    (void)threads;
    add_outer_rows(G, A, X, batch, n, m, alpha, 0, n);
    return 0;
#else
    (void)G, (void)A, (void)X, (void)batch, (void)n, (void)m, (void)alpha, (void)threads;
    return -1;
#endif
}

/* 1 if eprun_add_outer was compiled with AVX-512. */
int eprun_add_outer_available(void) { return EPRUN_OUTER_AVX512; }
