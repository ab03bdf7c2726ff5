/* Exact int8 x int8 products for CPUs with AVX2 but no VNNI, reading an int8 weight in its plain
 * [N, K] layout (no packed copy). Both operands are widened to int16 and multiplied with vpmaddwd:
 * int16 x int16 pair sums cannot saturate, and int32 accumulators hold every sum exactly for
 * K < 2**31 / (2 * 127 * 127). So the results are the very integers torch._int_mm gives, in any row
 * grouping (rows stay batch-invariant), written as float32 as `.float()` converts them.
 * Built and loaded by app/engine/int8_kernel.py; figures: bench/README.md. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { LANES = 16, WEIGHT_ROWS = 4 };  /* int16 lanes per vector; weight rows multiplied together */
enum { CHUNK_BYTES = 256 << 10 };  /* widened input rows kept in L2 at a time (Zen 3: 512 KiB of L2) */

static int16_t *int16_buffer(int64_t count) {  /* aligned_alloc wants a multiple of the alignment */
    return aligned_alloc(64, (size_t)((count * 2 + 63) / 64 * 64));
}

static int32_t lane_sum(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

static void widen(const int8_t *from, int16_t *to, int64_t k, int64_t padded) {
    int64_t i = 0;
    for (; i + LANES <= k; i += LANES)
        _mm256_storeu_si256((__m256i *)(to + i), _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(from + i))));
    for (; i < k; i++) to[i] = from[i];
    for (; i < padded; i++) to[i] = 0;
}

static __m256i lanes(const int16_t *at) { return _mm256_loadu_si256((const __m256i *)at); }

#define ADD_PRODUCT(sum, x, w) sum = _mm256_add_epi32(sum, _mm256_madd_epi16(x, w))

/* Input rows x0 and x1 (int16, zero-padded to `padded`) times WEIGHT_ROWS weight rows (the same),
 * each weight vector loaded once for both rows: their sums into out0 and out1 (`count` of them). */
static void two_rows(const int16_t *x0, const int16_t *x1, const int16_t *w, int64_t padded, int64_t count,
                     float *out0, float *out1) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t i = 0; i < padded; i += LANES) {
        __m256i u = lanes(x0 + i), v = lanes(x1 + i), w0 = lanes(w + i), w1 = lanes(w + padded + i);
        ADD_PRODUCT(a0, u, w0); ADD_PRODUCT(b0, v, w0); ADD_PRODUCT(a1, u, w1); ADD_PRODUCT(b1, v, w1);
        __m256i w2 = lanes(w + 2 * padded + i), w3 = lanes(w + 3 * padded + i);
        ADD_PRODUCT(a2, u, w2); ADD_PRODUCT(b2, v, w2); ADD_PRODUCT(a3, u, w3); ADD_PRODUCT(b3, v, w3);
    }
    __m256i sums[2 * WEIGHT_ROWS] = {a0, a1, a2, a3, b0, b1, b2, b3};
    for (int64_t r = 0; r < count; r++) {
        out0[r] = (float)lane_sum(sums[r]);
        out1[r] = (float)lane_sum(sums[WEIGHT_ROWS + r]);
    }
}

/* One input row x times WEIGHT_ROWS weight rows: their sums into out (`count` of them). */
static void one_row(const int16_t *x, const int16_t *w, int64_t padded, int64_t count, float *out) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < padded; i += LANES) {
        __m256i u = lanes(x + i);
        ADD_PRODUCT(a0, u, lanes(w + i)); ADD_PRODUCT(a1, u, lanes(w + padded + i));
        ADD_PRODUCT(a2, u, lanes(w + 2 * padded + i)); ADD_PRODUCT(a3, u, lanes(w + 3 * padded + i));
    }
    __m256i sums[WEIGHT_ROWS] = {a0, a1, a2, a3};
    for (int64_t r = 0; r < count; r++) out[r] = (float)lane_sum(sums[r]);
}

/* out[m * ldo + n] = sum_k a[m * K + k] * w[n * K + k], for int8 a [M, K] and w [N, K], on `threads`
 * threads (each a share of the weight's rows). Rows are taken CHUNK_BYTES of widened input at a
 * time, so that a chunk stays in L2 while the weight streams past it. Returns 0, or -1 (and writes
 * nothing) where its buffers cannot be allocated. */
int int8_products(const int8_t *a, const int8_t *w, float *out, int64_t m_rows, int64_t n_rows, int64_t k,
                  int64_t ldo, int threads) {
    int64_t padded = (k + LANES - 1) / LANES * LANES;
    int64_t chunk = CHUNK_BYTES / (2 * padded) / 2 * 2;
    if (chunk < 2) chunk = 2;
    int16_t *rows = int16_buffer(m_rows * padded);
    int16_t *blocks_widened = int16_buffer((int64_t)threads * WEIGHT_ROWS * padded);  /* one block per thread */
    if (!rows || !blocks_widened) {
        free(rows);
        free(blocks_widened);
        return -1;
    }
    for (int64_t m = 0; m < m_rows; m++) widen(a + m * k, rows + m * padded, k, padded);
    int64_t blocks = (n_rows + WEIGHT_ROWS - 1) / WEIGHT_ROWS;
#pragma omp parallel num_threads(threads)
    {
        int16_t *weight = blocks_widened + (int64_t)omp_get_thread_num() * WEIGHT_ROWS * padded;
        for (int64_t start = 0; start < m_rows; start += chunk) {
            int64_t end = start + chunk < m_rows ? start + chunk : m_rows;
#pragma omp for schedule(static)
            for (int64_t block = 0; block < blocks; block++) {
                int64_t first = block * WEIGHT_ROWS;
                int64_t count = n_rows - first < WEIGHT_ROWS ? n_rows - first : WEIGHT_ROWS;
                for (int64_t r = 0; r < WEIGHT_ROWS; r++) {
                    if (r < count) widen(w + (first + r) * k, weight + r * padded, k, padded);
                    else memset(weight + r * padded, 0, (size_t)padded * 2);
                }
                int64_t m = start;
                for (; m + 1 < end; m += 2)
                    two_rows(rows + m * padded, rows + (m + 1) * padded, weight, padded, count,
                             out + m * ldo + first, out + (m + 1) * ldo + first);
                if (m < end) one_row(rows + m * padded, weight, padded, count, out + m * ldo + first);
            }
        }
    }
    free(blocks_widened);
    free(rows);
    return 0;
}
