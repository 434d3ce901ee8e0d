/*
 * Sums over the couplings for a block of examples at once, shared by the compiled dense and
 * energy-based relaxations (dense_relax.c, energy_relax.c): the vector width, the packed layout
 * of the couplings and the block's sums. AVX2 and AVX-512 builds only.
 */
#ifndef EPRUN_BLOCK_SUMS_H
#define EPRUN_BLOCK_SUMS_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vector_math.h"

#if EPRUN_AVX2
/* ----------------------------------------------- blocks of examples for wider and deeper nets
 *
 * Past one hidden layer the couplings no longer fit the caches near a core (784-512-512-512-10:
 * 2 MB of W_1 … W_3), and a step that streams every weight once per pair of examples is bound
 * by that stream. Here a thread's examples relax in blocks of up to BLOCK_ROWS together, and each
 * vector load of a weight serves every example of the block: for a block of R examples and the
 * CHUNK units j … j+CHUNK−1 of layer i (two vectors), 2R vector sums
 *
 *     acc[r] = Σ_k Uᵀ_i[k, j…] s_{i−1}[r, k] + Σ_k D_i[k, j…] s_{i+1}[r, k]
 *
 * (the dense relaxation then sets s_i ← g(c_i + a·acc [+ ν·s_i]); the energy-based one takes the
 * same sums over ρ(s) for its h_i). The couplings are packed once a call (pack_chunk):
 * for each chunk the rows of Uᵀ_i, then of D_i, one after the other, so the k loop reads one
 * contiguous stream (read in place, rows of Uᵀ_i 4·n_i bytes apart, the stream would cross a
 * page every few rows). The sums run in order k = 0, 1, … for each example whatever R is, so an
 * example's result does not depend on its block.
 *
 * Widths: AVX-512, chunks of 32 units and blocks of up to 12 examples (24 sums in 32 registers);
 * AVX2, chunks of 16 and blocks of up to 6 (12 sums in 16 registers, two for the weights and one
 * for the broadcast state). */
#if EPRUN_AVX512
#define BLOCK_ROWS 12
#define CHUNK 32
typedef __m512 Lanes;
static inline Lanes lanes_load(const float *p) { return _mm512_loadu_ps(p); }
static inline Lanes lanes_set1(float v) { return _mm512_set1_ps(v); }
static inline Lanes lanes_zero(void) { return _mm512_setzero_ps(); }
static inline Lanes lanes_fmadd(Lanes a, Lanes b, Lanes c) { return _mm512_fmadd_ps(a, b, c); }
static inline void lanes_store(float *p, Lanes v) { _mm512_storeu_ps(p, v); }
#else
#define BLOCK_ROWS 6
#define CHUNK 16
typedef __m256 Lanes;
static inline Lanes lanes_load(const float *p) { return _mm256_loadu_ps(p); }
static inline Lanes lanes_set1(float v) { return _mm256_set1_ps(v); }
static inline Lanes lanes_zero(void) { return _mm256_setzero_ps(); }
static inline Lanes lanes_fmadd(Lanes a, Lanes b, Lanes c) { return _mm256_fmadd_ps(a, b, c); }
static inline void lanes_store(float *p, Lanes v) { _mm256_storeu_ps(p, v); }
#endif
#define HALF (CHUNK / 2)  /* the floats of one vector */

/* acc[r] += Σ_{k < count} s[r·count + k] · (the two vectors of row k of P), in order k = 0, 1, …;
 * returns P past its `count` rows */
static inline __attribute__((always_inline)) const float *block_accumulate(const int R, Lanes (*acc)[2],
                                                                           const float *s, int64_t count,
                                                                           const float *P) {
    for (int64_t k = 0; k < count; k++, P += CHUNK) {
        const Lanes w0 = lanes_load(P), w1 = lanes_load(P + HALF);
        for (int r = 0; r < R; r++) {
            const Lanes sk = lanes_set1(s[r * count + k]);
            acc[r][0] = lanes_fmadd(sk, w0, acc[r][0]);
            acc[r][1] = lanes_fmadd(sk, w1, acc[r][1]);
        }
    }
    return P;
}

/* The sums of the CHUNK units at j of layer i for the R examples of a block (R a compile-time
 * constant after inlining), into z[r·CHUNK + q]. P: this chunk's packed couplings, nb + na rows
 * of CHUNK floats (zeros past the layer's last unit): row k < nb is Uᵀ_i[k, j…], row nb + k is
 * D_i[k, j…]. below / above: the block's states of layers i−1 and i+1, rows of nb / na. */
static inline __attribute__((always_inline)) void block_sums(const int R, float *z, const float *below,
                                                              const float *above, int64_t nb, int64_t na,
                                                              const float *P) {
    Lanes acc[BLOCK_ROWS][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = lanes_zero();
    P = block_accumulate(R, acc, below, nb, P);  /* Uᵀ_i rows against s_{i−1} */
    block_accumulate(R, acc, above, na, P);      /* then D_i rows against s_{i+1}, into the same sums */
    for (int r = 0; r < R; r++) {
        lanes_store(z + CHUNK * r, acc[r][0]);
        lanes_store(z + CHUNK * r + HALF, acc[r][1]);
    }
}

/* block_sums for the block's R examples: one copy of the loops per R, so the 2R sums stay in
 * registers (a copy per activation as well, as relax_rows has, took the build from 10 to 31 s) */
static void block_sums_any(int R, float *z, const float *below, const float *above, int64_t nb, int64_t na,
                           const float *P) {
#define EPRUN_BLOCK_CASE(K) case K: block_sums(K, z, below, above, nb, na, P); break;
    switch (R) {
        EPRUN_BLOCK_CASE(1) EPRUN_BLOCK_CASE(2) EPRUN_BLOCK_CASE(3) EPRUN_BLOCK_CASE(4) EPRUN_BLOCK_CASE(5)
        EPRUN_BLOCK_CASE(6)
#if BLOCK_ROWS > 6
        EPRUN_BLOCK_CASE(7) EPRUN_BLOCK_CASE(8) EPRUN_BLOCK_CASE(9) EPRUN_BLOCK_CASE(10)
        EPRUN_BLOCK_CASE(11) EPRUN_BLOCK_CASE(12)
#endif
        default: break;
    }
#undef EPRUN_BLOCK_CASE
}

/* Chunk `ch` (CHUNK units from CHUNK·ch) of the packed couplings of a layer of n units, nb below
 * (U [n, nb] or NULL) and na above (D [na, n] or NULL): nb rows of Uᵀ then na rows of D, CHUNK
 * floats each, zeros past the last unit; one contiguous stream for the block's k loop. */
static void pack_chunk(float *P, const float *U, const float *D, int64_t n, int64_t nb, int64_t na, int64_t ch) {
    float *dst = P + ch * CHUNK * (nb + na);
    const int64_t j = ch * CHUNK, width = n - j < CHUNK ? n - j : CHUNK;
    if (width < CHUNK) memset(dst, 0, (size_t)(CHUNK * (nb + na)) * sizeof(float));
    for (int64_t k = 0; k < nb; k++)  /* row k of the chunk from CHUNK rows of U, their lines kept in L1 */
        for (int64_t q = 0; q < width; q++) dst[k * CHUNK + q] = U[(j + q) * nb + k];
    for (int64_t k = 0; k < na; k++) memcpy(dst + (nb + k) * CHUNK, D + k * n + j, (size_t)width * sizeof(float));
}

static inline int64_t below_of(int i, const int64_t *sizes) { return i > 0 ? sizes[i - 1] : 0; }
static inline int64_t above_of(int i, int n_layers, const int64_t *sizes) {
    return i + 1 < n_layers ? sizes[i + 1] : 0;
}

/* The floats of every layer's packed couplings; P[i] set to layer i's start in `buffer` (when
 * not NULL). */
static int64_t packed_layout(int n_layers, const int64_t *sizes, float *buffer, const float **P) {
    int64_t total = 0;
    for (int i = 0; i < n_layers; i++) {
        if (buffer) P[i] = buffer + total;
        total += (sizes[i] + CHUNK - 1) / CHUNK * CHUNK * (below_of(i, sizes) + above_of(i, n_layers, sizes));
    }
    return total;
}

/* Pack share k of `count` of all layers' chunks (chunk g of the net, counted layer after layer,
 * goes to share g mod count), so the threads of a parallel region pack one copy together. */
static void pack_share(int n_layers, const int64_t *sizes, const float *const *up, const float *const *down,
                       const float *const *P, int64_t k, int64_t count) {
    int64_t g = 0;
    for (int i = 0; i < n_layers; i++) {
        const int64_t chunks = (sizes[i] + CHUNK - 1) / CHUNK;
        for (int64_t ch = 0; ch < chunks; ch++, g++)
            if (g % count == k)
                pack_chunk((float *)P[i], i > 0 ? up[i] : NULL, i + 1 < n_layers ? down[i] : NULL, sizes[i],
                           below_of(i, sizes), above_of(i, n_layers, sizes), ch);
    }
}

/* Space for `floats` packed floats, kept by the calling thread from one call to the next and
 * grown when a larger net needs it (a fresh allocation of a few MB would pay its page faults at
 * every call); NULL if memory ran out. */
static float *packing_space(int64_t floats) {
    static __thread float *space = NULL;
    static __thread int64_t capacity = 0;
    if (floats > capacity) {
        free(space);
        space = (float *)malloc((size_t)floats * sizeof(float));
        capacity = space ? floats : 0;
    }
    return space;
}

#endif

#endif
