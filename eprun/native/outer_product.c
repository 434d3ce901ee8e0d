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

/*
 * EP's one-sided update of a dense chain, accumulated into the gradients (−Δθ, scaled by
 * c = 1/(β·batch)), for the layers s⁰ = x, s¹ … s^L (sizes[0] … sizes[L]) from the free states
 * s* (``free``) and the nudged ones s^β (``nudged``), each [batch, sizes[n]]:
 *
 *     G_0 += c·(s¹* − s¹β)ᵀ x                       (the input is shared: one product)
 *     G_n += c·(s^{n+1}*ᵀ s^n* − s^{n+1}βᵀ s^nβ)     n ≥ 1
 *     g_{n+1} += c·Σ_b (s^{n+1}* − s^{n+1}β)[b]       (biases, summed in order b = 0, 1, …)
 *
 * ``diff`` is [batch, sizes[1]] scratch for s¹* − s¹β. Rows of every G split over `threads`
 * OpenMP threads in whole tiles; each element belongs to one thread, so the split changes no
 * bit. Returns 0, or −1 when built without AVX-512 (the caller then uses torch).
 */
#if EPRUN_OUTER_AVX512
static void bias_rows(float *g, const float *a, const float *b, int64_t batch, int64_t n, float c, int64_t lo,
                      int64_t hi) {
    for (int64_t j = lo; j < hi; j++) {
        float sum = 0.0f;
        for (int64_t r = 0; r < batch; r++) sum += a[r * n + j] - b[r * n + j];
        g[j] += c * sum;
    }
}

static void ep_update_share(int n_layers, const int64_t *sizes, const float *x, const float *const *free_state,
                            const float *const *nudged, float *const *weight_grads, float *const *bias_grads,
                            float *diff, float c, int64_t batch, int64_t k, int64_t count) {
    const int64_t n1 = sizes[1];
    for (int64_t n = 0; n < n_layers; n++) {
        const int64_t rows = sizes[n + 1], tiles = (rows + TILE_ROWS - 1) / TILE_ROWS;
        int64_t lo = TILE_ROWS * (tiles * k / count), hi = TILE_ROWS * (tiles * (k + 1) / count);
        if (hi > rows) hi = rows;
        if (lo >= hi) continue;
        if (n == 0) {
            /* this thread's columns of diff are the rows of G_0 it owns: no other thread reads them */
            for (int64_t r = 0; r < batch; r++)
                for (int64_t j = lo; j < hi; j++) diff[r * n1 + j] = free_state[0][r * n1 + j] - nudged[0][r * n1 + j];
            add_outer_rows(weight_grads[0], diff, x, batch, n1, sizes[0], c, lo, hi);
        } else {
            add_outer_rows(weight_grads[n], free_state[n], free_state[n - 1], batch, rows, sizes[n], c, lo, hi);
            add_outer_rows(weight_grads[n], nudged[n], nudged[n - 1], batch, rows, sizes[n], -c, lo, hi);
        }
        bias_rows(bias_grads[n], free_state[n], nudged[n], batch, rows, c, lo, hi);
    }
}
#endif

int eprun_ep_dense_update(int n_layers, const int64_t *sizes, const float *x, const float *const *free_state,
                          const float *const *nudged, float *const *weight_grads, float *const *bias_grads,
                          float *diff, float c, int64_t batch, int threads) {
#if EPRUN_OUTER_AVX512
#ifdef _OPENMP
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
        ep_update_share(n_layers, sizes, x, free_state, nudged, weight_grads, bias_grads, diff, c, batch,
                        omp_get_thread_num(), omp_get_num_threads());
        return 0;
    }
#endif
    (void)threads;
    ep_update_share(n_layers, sizes, x, free_state, nudged, weight_grads, bias_grads, diff, c, batch, 0, 1);
    return 0;
#else
    (void)n_layers, (void)sizes, (void)x, (void)free_state, (void)nudged, (void)weight_grads, (void)bias_grads;
    (void)diff, (void)c, (void)batch, (void)threads;
    return -1;
#endif
}

/* 1 if eprun_add_outer was compiled with AVX-512. */
int eprun_add_outer_available(void) { return EPRUN_OUTER_AVX512; }
