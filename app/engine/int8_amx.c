/* Exact int8 x int8 products on AMX (tdpbssd: signed int8 pairs, int32 sums), reading an int8
 * weight in its plain [N, K] layout, with no repacked copy and nothing repacked per call. The weight
 * is the A operand: 16 of its rows by 64 bytes of K are a tile as they lie in memory. The input rows
 * are the B operand, which AMX wants in groups of four K values per row; they are few, so they are
 * regrouped once per call. A tile of sums is thus 16 weight rows by 16 input rows, written out
 * transposed. int32 sums are exact for K < 2**31 / (128 * 128): the very integers torch._int_mm
 * gives, in any row grouping (rows stay batch-invariant), written as float32 as `.float()` converts
 * them. Built and loaded by app/engine/int8_kernel.py; figures: bench/README.md. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

enum { TILE = 16, K_STEP = 64, BLOCK = 2 * TILE };  /* tile rows; K bytes per tile row; weight rows per block */
enum { CHUNK_STEPS = 16 };  /* K steps per stretch: a block's 32 rows x 1 KiB of weight stay in L1 */

/* Linux hands AMX's tile state to a process only on request (once per process). */
int amx_request(void) { return (int)syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */); }

struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
};

static void configure_tiles(void) {  /* tiles 0-3: sums; 4-5: weight rows; 6-7: input rows */
    struct tile_config config = {.palette = 1};
    for (int t = 0; t < 8; t++) {
        config.rows[t] = TILE;
        config.bytes_per_row[t] = K_STEP;
    }
    _tile_loadconfig(&config);
}

/* Input row m of [M, K] regrouped for the B operand: for every 16 rows and 64 K values, 16 lines
 * of 64 bytes, line r holding K values 4r..4r+3 of each of the 16 rows (`to` is zeroed past K). */
static int8_t *row_start(int8_t *to, int64_t m, int64_t k_padded) {  /* where row m's first group goes */
    return to + (m / TILE) * TILE * k_padded + (m % TILE) * 4;
}

static int8_t *group_of(int8_t *start, int64_t i) {  /* where the group of four holding K value i goes */
    return start + (i / K_STEP) * TILE * K_STEP + (i % K_STEP) / 4 * K_STEP;
}

static void regroup_row(const int8_t *row, int8_t *to, int64_t m, int64_t k, int64_t k_padded) {
    int8_t *start = row_start(to, m, k_padded);
    int64_t whole = k / 4 * 4;  /* K values in whole groups of four; the rest (zero-padded) after them */
    for (int64_t i = 0; i < whole; i += 4) memcpy(group_of(start, i), row + i, 4);
    for (int64_t i = whole; i < k; i++) group_of(start, i)[i % 4] = row[i];
}

static __mmask16 first_lanes(int64_t count) { return count >= 16 ? 0xffff : (__mmask16)((1u << count) - 1); }

/* Float row m of [M, K] quantized as the engine's int8 layers quantize it (app/engine/int8.py,
 * _quantize_rows: scale = absmax * (float)(1/127), values rounded half to even from x / scale, in
 * float32 as torch computes them: the same int8 values and scale) into the B operand's layout (see
 * regroup_row). Its scale goes to *scale; NaN where the row has a NaN, so that its outputs are NaN
 * too and the engine fails the row, as it does through torch. */
static void quantize_row(const float *row, int8_t *to, int64_t m, int64_t k, int64_t k_padded, float *scale) {
    __m512 top = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t i = 0; i < k; i += 16) {
        __m512 v = _mm512_maskz_loadu_ps(first_lanes(k - i), row + i);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        top = _mm512_max_ps(top, _mm512_abs_ps(v));
    }
    *scale = nan ? __builtin_nanf("") : _mm512_reduce_max_ps(top) * (float)(1.0 / 127.0);
    const __m512 by = _mm512_set1_ps(*scale);
    int8_t *start = row_start(to, m, k_padded);
    for (int64_t i = 0; i < k; i += 16) {  /* 16 values: four groups of four, in one 64-value step */
        __m512 v = _mm512_maskz_loadu_ps(first_lanes(k - i), row + i);
        __m512 rounded = _mm512_roundscale_ps(_mm512_div_ps(v, by), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        int32_t groups[4];
        _mm_storeu_si128((__m128i *)groups, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(rounded)));
        for (int g = 0; g < 4 && i + 4 * g < k; g++) memcpy(group_of(start, i + 4 * g), &groups[g], 4);
    }
}

/* A tile of sums (16 weight rows by 16 input rows) into out, transposed: `rows` x `columns` of them,
 * each as float32, times its input row's scale and then its weight row's where `w_scale` is given
 * (the order, and so the rounding, of the engine's dequantization). */
static void write_sums(const int32_t *sums, float *out, int64_t ldo, int64_t rows, int64_t columns,
                       const float *x_scale, const float *w_scale) {
    const __m512i lines = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                             _mm512_set1_epi32(TILE));
    __mmask16 mask = first_lanes(columns);
    for (int64_t m = 0; m < rows; m++) {
        __m512 value = _mm512_cvtepi32_ps(_mm512_i32gather_epi32(lines, sums + m, 4));
        if (w_scale)
            value = _mm512_mul_ps(_mm512_mul_ps(value, _mm512_set1_ps(x_scale[m])), _mm512_maskz_loadu_ps(mask, w_scale));
        _mm512_mask_storeu_ps(out + m * ldo, mask, value);
    }
}

/* Tile t's sums, for weight rows first + n_off and input rows m + m_off, into out. */
#define STORE(t, n_off, m_off)                                                                        \
    do {                                                                                              \
        _tile_stored(t, sums, TILE * 4);                                                              \
        int64_t m0 = m + (m_off), n0 = first + (n_off);                                               \
        if (m0 < m_rows && n0 < n_rows)                                                               \
            write_sums(sums, out + m0 * ldo + n0, ldo, m_rows - m0 < TILE ? m_rows - m0 : TILE,       \
                       n_rows - n0 < TILE ? n_rows - n0 : TILE, x_scale ? x_scale + m0 : 0,                \
                       w_scale ? w_scale + n0 : 0);                                                \
    } while (0)

/* Sums carried between stretches of K: tile t's for the input rows from m, in `partial`. */
#define CARRY(op, t) op(t, partial + ((m / TILE) * 2 + (t) % 2 + (t) / 2 * 2) * TILE * TILE, TILE * 4)

/* out[m * ldo + n] = sum_k a[m * K + k] * w[n * K + k] for int8 rows a [M, K] and weight w [N, K];
 * or, given float rows x instead, those rows quantized (quantize_row) and the sums rescaled by the
 * row's scale and w_scale[n]. On `threads` threads (each a share of the weight's
 * blocks of 32 rows). K is taken CHUNK_STEPS * 64 at a time, so that a block's stretch of weight
 * stays in L1 while all the input rows pass it. Returns 0; -1 (writing nothing) where its buffers
 * cannot be allocated. The caller has had amx_request() succeed. */
static int products(const int8_t *a, const float *x, const int8_t *w, const float *w_scale, float *out,
                    int64_t m_rows, int64_t n_rows, int64_t k, int64_t ldo, int threads) {
    if (m_rows == 0 || n_rows == 0) return 0;
    int64_t k_padded = (k + K_STEP - 1) / K_STEP * K_STEP, m_padded = (m_rows + TILE - 1) / TILE * TILE;
    int64_t steps = k_padded / K_STEP, chunks = (steps + CHUNK_STEPS - 1) / CHUNK_STEPS;
    int64_t partial_ints = chunks > 1 ? m_padded * BLOCK : 0;
    size_t rows_bytes = (size_t)(m_padded * k_padded), last_bytes = (size_t)(BLOCK * k_padded);
    size_t copied_bytes = (size_t)(BLOCK * CHUNK_STEPS * K_STEP);
    size_t scales_bytes = x ? (size_t)m_padded * 4 : 0;
    int8_t *rows = aligned_alloc(64, rows_bytes + last_bytes + scales_bytes
                                 + (size_t)threads * (partial_ints * 4 + copied_bytes));
    if (!rows) return -1;
    /* the last block of weight rows, zero-padded to BLOCK rows and k_padded: tiles never read past the weight */
    int8_t *last = rows + rows_bytes;
    float *x_scale = x ? (float *)(last + last_bytes) : 0;  /* each float row's scale */
    int8_t *copies = last + last_bytes + scales_bytes;  /* a thread's stretch of its block, copied (see below) */
    int32_t *partials = (int32_t *)(copies + threads * copied_bytes);
    memset(rows, 0, rows_bytes);
    int64_t blocks = (n_rows + BLOCK - 1) / BLOCK, last_first = (blocks - 1) * BLOCK;
    memset(last, 0, last_bytes);
    for (int64_t n = last_first; n < n_rows; n++) memcpy(last + (n - last_first) * k_padded, w + n * k, (size_t)k);
#pragma omp parallel num_threads(threads)
    {
        configure_tiles();
        int32_t sums[TILE * TILE] __attribute__((aligned(64)));
        int32_t *partial = partials + omp_get_thread_num() * partial_ints;
        int8_t *copied = copies + omp_get_thread_num() * copied_bytes;
#pragma omp for schedule(static)
        for (int64_t m = 0; m < m_rows; m++) {
            if (x) quantize_row(x + m * k, rows, m, k, k_padded, x_scale + m);
            else regroup_row(a + m * k, rows, m, k, k_padded);
        }
#pragma omp for schedule(static)
        for (int64_t block = 0; block < blocks; block++) {
            int64_t first = block * BLOCK;
            const int8_t *weight = block == blocks - 1 ? last : w + first * k;
            int64_t stride = block == blocks - 1 ? k_padded : k;
            /* The next block's rows are one contiguous stretch: fetched meanwhile, a share per K step
             * (32 row streams at once outrun the hardware prefetcher: the head at 4 rows 16 -> 10 ms). */
            const char *next = (const char *)(w + (first + BLOCK) * k);
            int64_t next_bytes = block + 2 < blocks ? BLOCK * k : 0, share = (next_bytes / steps + 63) / 64 * 64;
            for (int64_t chunk = 0; chunk < chunks; chunk++) {
                int64_t s0 = chunk * CHUNK_STEPS, s1 = s0 + CHUNK_STEPS < steps ? s0 + CHUNK_STEPS : steps;
                /* Tiles of weight rows as they lie (stride K), or, where many input rows reuse them, copied
                 * to lie one after the other: a power-of-two K maps a block's rows to a few cache sets
                 * (K = 2048: 512 input rows took 5x as long). */
                const int8_t *tiles = weight + s0 * K_STEP;
                int64_t tile_stride = stride, step_bytes = K_STEP;
                if (m_padded > 2 * TILE) {
                    for (int64_t s = s0; s < s1; s++)
                        for (int64_t r = 0; r < BLOCK; r++)
                            memcpy(copied + ((s - s0) * BLOCK + r) * K_STEP, weight + r * stride + s * K_STEP, K_STEP);
                    tiles = copied, tile_stride = K_STEP, step_bytes = BLOCK * K_STEP;
                }
                for (int64_t m = 0; m < m_padded; m += 2 * TILE) {
                    int two = m + TILE < m_padded;  /* a second tile of input rows */
                    if (chunk == 0) {
                        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                    } else {
                        CARRY(_tile_loadd, 0); CARRY(_tile_loadd, 1);
                        if (two) { CARRY(_tile_loadd, 2); CARRY(_tile_loadd, 3); }
                    }
                    for (int64_t s = s0; s < s1; s++) {
                        const int8_t *inputs = rows + m * k_padded + s * TILE * K_STEP;
                        if (m == 0)
                            for (int64_t at = s * share; at < (s + 1) * share && at < next_bytes; at += 64)
                                _mm_prefetch(next + at, _MM_HINT_T0);
                        const int8_t *tile = tiles + (s - s0) * step_bytes;
                        _tile_loadd(4, tile, tile_stride);
                        _tile_loadd(5, tile + TILE * tile_stride, tile_stride);
                        _tile_loadd(6, inputs, K_STEP);
                        _tile_dpbssd(0, 4, 6);
                        _tile_dpbssd(1, 5, 6);
                        if (two) {
                            _tile_loadd(7, inputs + TILE * k_padded, K_STEP);
                            _tile_dpbssd(2, 4, 7);
                            _tile_dpbssd(3, 5, 7);
                        }
                    }
                    if (chunk + 1 < chunks) {
                        CARRY(_tile_stored, 0); CARRY(_tile_stored, 1);
                        if (two) { CARRY(_tile_stored, 2); CARRY(_tile_stored, 3); }
                        continue;
                    }
                    STORE(0, 0, 0);
                    STORE(1, TILE, 0);
                    if (two) {
                        STORE(2, 0, TILE);
                        STORE(3, TILE, TILE);
                    }
                }
            }
        }
        _tile_release();
    }
    free(rows);
    return 0;
}

int int8_products(const int8_t *a, const int8_t *w, float *out, int64_t m_rows, int64_t n_rows, int64_t k,
                  int64_t ldo, int threads) {
    return products(a, 0, w, 0, out, m_rows, n_rows, k, ldo, threads);
}

/* x [M, K] float32 times the int8 weight w [N, K] with its scales w_scale [N], as the engine's int8
 * layers compute it (quantize, exact int32 sums, rescale: the same bits), in one call. */
int int8_linear(const float *x, const int8_t *w, const float *w_scale, float *out, int64_t m_rows, int64_t n_rows,
                int64_t k, int64_t ldo, int threads) {
    return products(0, x, w, w_scale, out, m_rows, n_rows, k, ldo, threads);
}
