/* The float32 work of a decoder layer that torch runs as several passes over memory on the CPU:
 * an RMS norm and rotary position embedding in one pass each (torch's own bits), gelu(gate) * up
 * (the tanh approximation) of a gated MLP in one pass, and decoding rows' attention read in place
 * from the paged cache. Rows stay
 * batch-invariant (docs/engine.md, property 6): a row is normed and rotated alone, every element of
 * gelu_tanh_mul goes through the same vector code wherever it lies (a row's ragged end through a
 * padded copy), and a row attends alone. A NaN stays in its row.
 * Built and loaded by app/engine/float_kernel.py; figures: bench/README.md. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { LANES = 8 };
enum { PARALLEL_FROM = 1 << 16 };  /* elements below which one thread beats waking the others */

static float lane_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* e^x, as Cephes' expf (about 1 ulp); x is clamped to where 2^n stays a normal float. */
static __m256 exp_lanes(__m256 x) {
    x = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-87.0f), x));  /* NaN stays NaN */
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    __m256i two_to_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_to_n));
}

/* gelu(g) * u, with gelu(g) = 0.5 g (1 + tanh(y)) = g / (1 + e^(-2y)), y = sqrt(2/pi) (g + 0.044715 g^3):
 * the same function as torch's approximate="tanh", without its cancellation where tanh(y) nears -1. */
static __m256 gelu_tanh_times(__m256 g, __m256 u) {
    __m256 cube = _mm256_mul_ps(_mm256_mul_ps(g, g), g);
    __m256 minus_2y = _mm256_mul_ps(_mm256_set1_ps(-2.0f * 0.7978845608028654f),
                                    _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), cube, g));
    return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp_lanes(minus_2y))), u);
}

enum { ILP = 4, LEVELS = 4, LEVEL_POWER = 4 };

/* torch's float32 sum of x[0..width)^2 on the CPU, bit for bit: pow(x, 2), then aten's cascade_sum
 * over a contiguous row (SumKernel.cpp: vectorized_inner_sum, row_sum, multi_row_sum) with vectors of
 * LANES floats (torch's order under its AVX2 and its AVX-512 capability alike, as measured), or of
 * one where the row is narrower. Each square is rounded before it is added (this file is built with
 * -ffp-contract=off). The cascade's level step is 2^LEVEL_POWER for rows under 2^20 vectors. */
static float cascade_sum_of_squares(const float *x, int64_t width) {
    int lanes = width < LANES ? 1 : LANES;
    int64_t vectors = width / lanes, size = vectors / ILP, step = 1 << LEVEL_POWER, i = 0;
    float acc[LEVELS][ILP][LANES];
    memset(acc, 0, sizeof acc);
    while (i + step <= size) {  /* multi_row_sum: vector i * ILP + k into accumulator k, in levels */
        for (int64_t j = 0; j < step; j++, i++)
            for (int k = 0; k < ILP; k++)
                for (int l = 0; l < lanes; l++) {
                    float v = x[(i * ILP + k) * lanes + l];
                    acc[0][k][l] += v * v;
                }
        for (int level = 1; level < LEVELS; level++) {
            for (int k = 0; k < ILP; k++)
                for (int l = 0; l < lanes; l++) {
                    acc[level][k][l] += acc[level - 1][k][l];
                    acc[level - 1][k][l] = 0.0f;
                }
            if (i & ((step - 1) << (level * LEVEL_POWER))) break;
        }
    }
    for (; i < size; i++)
        for (int k = 0; k < ILP; k++)
            for (int l = 0; l < lanes; l++) {
                float v = x[(i * ILP + k) * lanes + l];
                acc[0][k][l] += v * v;
            }
    for (int level = 1; level < LEVELS; level++)
        for (int k = 0; k < ILP; k++)
            for (int l = 0; l < lanes; l++) acc[0][k][l] += acc[level][k][l];
    for (int64_t v = size * ILP; v < vectors; v++)  /* row_sum: vectors past the last ILP, then the partials */
        for (int l = 0; l < lanes; l++) acc[0][0][l] += x[v * lanes + l] * x[v * lanes + l];
    for (int k = 1; k < ILP; k++)
        for (int l = 0; l < lanes; l++) acc[0][0][l] += acc[0][k][l];
    float total = 0.0f;  /* vectorized_inner_sum: the elements past the last vector, then the lanes */
    for (int64_t e = vectors * lanes; e < width; e++) total += x[e] * x[e];
    for (int l = 0; l < lanes; l++) total += acc[0][0][l];
    return total;
}

/* out = x / sqrt(mean(x^2) + eps) * scale, row by row: torch's rms_norm on the CPU as
 * (x * r) * scale, r = 1 / sqrt(sum / width + eps), each step rounded to float32 as torch's ops
 * round it, the sum as cascade_sum_of_squares. The rows are `outer` groups of
 * `inner` rows of `width` floats; x's and out's own strides (in floats) address them, so a transposed
 * view ([1, heads, T, dim] of [1, T, heads, dim]) is read and written in place. */
void rms_norm(const float *x, int64_t x_outer_stride, int64_t x_inner_stride, const float *scale, float eps,
              float *out, int64_t out_outer_stride, int64_t out_inner_stride, int64_t outer, int64_t inner,
              int64_t width, int threads) {
    int64_t whole = width / LANES * LANES;
#pragma omp parallel for num_threads(threads) if (outer * inner * width >= PARALLEL_FROM) schedule(static)
    for (int64_t r = 0; r < outer * inner; r++) {
        const float *in = x + r / inner * x_outer_stride + r % inner * x_inner_stride;
        float *to = out + r / inner * out_outer_stride + r % inner * out_inner_stride;
        float inverse = 1.0f / sqrtf(cascade_sum_of_squares(in, width) / (float)width + eps);
        __m256 by = _mm256_set1_ps(inverse);
        for (int64_t i = 0; i < whole; i += LANES)
            _mm256_storeu_ps(to + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(in + i), by),
                                                   _mm256_loadu_ps(scale + i)));
        for (int64_t i = whole; i < width; i++) to[i] = in[i] * inverse * scale[i];
    }
}

/* out = x * cos + rotate_half(x) * sin, transformers' apply_rotary_pos_emb for one tensor, with
 * rotate_half(x) = (-x[half:], x[:half]): each product and the sum rounded as torch's ops round them.
 * x and out are [heads, tokens, dim] with their own strides in floats (dim contiguous), cos and sin
 * [tokens, dim] (rows `angle_stride` apart), shared by every head. dim: even. */
void rotary(const float *x, int64_t x_head_stride, int64_t x_token_stride, const float *cos, const float *sin,
            int64_t angle_stride, float *out, int64_t out_head_stride, int64_t out_token_stride, int64_t heads,
            int64_t tokens, int64_t dim, int threads) {
    int64_t half = dim / 2;
#pragma omp parallel for num_threads(threads) if (heads * tokens * dim >= PARALLEL_FROM) schedule(static)
    for (int64_t r = 0; r < heads * tokens; r++) {
        int64_t h = r / tokens, t = r % tokens;
        const float *in = x + h * x_head_stride + t * x_token_stride, *c = cos + t * angle_stride,
                    *s = sin + t * angle_stride;
        float *to = out + h * out_head_stride + t * out_token_stride;
        for (int64_t j = 0; j < half; j++) to[j] = in[j] * c[j] + -in[j + half] * s[j];
        for (int64_t j = half; j < dim; j++) to[j] = in[j] * c[j] + in[j - half] * s[j];
    }
}

/* out = gelu(gate) * up, elementwise over [rows, width]; gate's and up's rows lie `gate_stride` and
 * `up_stride` floats apart (slices of one product), out's `width` apart. */
void gelu_tanh_mul(const float *gate, int64_t gate_stride, const float *up, int64_t up_stride, float *out,
                   int64_t rows, int64_t width, int threads) {
    int64_t whole = width / LANES * LANES;
#pragma omp parallel for num_threads(threads) if (rows * width >= PARALLEL_FROM) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate + r * gate_stride, *u = up + r * up_stride;
        float *to = out + r * width;
        for (int64_t i = 0; i < whole; i += LANES)
            _mm256_storeu_ps(to + i, gelu_tanh_times(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
        if (whole < width) {
            float g_end[LANES] = {0}, u_end[LANES] = {0}, end[LANES];
            size_t ragged = (size_t)(width - whole) * sizeof(float);
            memcpy(g_end, g + whole, ragged);
            memcpy(u_end, u + whole, ragged);
            _mm256_storeu_ps(end, gelu_tanh_times(_mm256_loadu_ps(g_end), _mm256_loadu_ps(u_end)));
            memcpy(to + whole, end, ragged);
        }
    }
}

enum { MAX_GROUP = 16 };  /* query heads per key/value head this kernel takes */

/* One row's `group` query heads q (head_stride apart) against its keys and values under `bias`,
 * into o (group rows of dim); s: scratch for group * length scores. */
static void attend_row(const float *q, int64_t head_stride, const float *keys, const float *values,
                       const int64_t *slots, const float *bias, float *o, float *s, int64_t group, int64_t kv,
                       int64_t kv_heads, int64_t dim, int64_t length, float scale) {
    float most[MAX_GROUP], total[MAX_GROUP];
    for (int64_t g = 0; g < group; g++) most[g] = -INFINITY;
    for (int64_t j = 0; j < length; j++) {  /* scores, each key loaded once for the group */
        if (bias[j] == -INFINITY) {
            for (int64_t g = 0; g < group; g++) s[g * length + j] = -INFINITY;
            continue;
        }
        const float *k = keys + (slots[j] * kv_heads + kv) * dim;
        __m256 sums[MAX_GROUP];
        for (int64_t g = 0; g < group; g++) sums[g] = _mm256_setzero_ps();
        for (int64_t d = 0; d < dim; d += LANES) {
            __m256 key = _mm256_loadu_ps(k + d);
            for (int64_t g = 0; g < group; g++)
                sums[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * head_stride + d), key, sums[g]);
        }
        for (int64_t g = 0; g < group; g++) {
            float score = lane_sum(sums[g]) * scale + bias[j];
            s[g * length + j] = score;
            most[g] = score > most[g] ? score : most[g];
        }
    }
    for (int64_t g = 0; g < group; g++) {  /* scores become e^(score - most), 0 where masked */
        float *p = s + g * length;
        __m256 top = _mm256_set1_ps(most[g]), sum = _mm256_setzero_ps(), masked = _mm256_set1_ps(-INFINITY);
        int64_t j = 0;
        for (; j + LANES <= length; j += LANES) {
            __m256 v = _mm256_loadu_ps(p + j);
            __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(v, masked, _CMP_EQ_OQ), exp_lanes(_mm256_sub_ps(v, top)));
            _mm256_storeu_ps(p + j, e);
            sum = _mm256_add_ps(sum, e);
        }
        total[g] = lane_sum(sum);
        for (; j < length; j++) {
            p[j] = p[j] == -INFINITY ? 0.0f : expf(p[j] - most[g]);
            total[g] += p[j];
        }
    }
    memset(o, 0, (size_t)(group * dim) * sizeof(float));
    for (int64_t j = 0; j < length; j++) {  /* the weighted values, each loaded once for the group */
        if (bias[j] == -INFINITY) continue;
        const float *v = values + (slots[j] * kv_heads + kv) * dim;
        for (int64_t d = 0; d < dim; d += LANES) {
            __m256 value = _mm256_loadu_ps(v + d);
            for (int64_t g = 0; g < group; g++) {
                float *to = o + g * dim + d;
                _mm256_storeu_ps(to, _mm256_fmadd_ps(_mm256_set1_ps(s[g * length + j]), value, _mm256_loadu_ps(to)));
            }
        }
    }
    for (int64_t g = 0; g < group; g++) {
        __m256 by = _mm256_set1_ps(1.0f / total[g]);
        for (int64_t d = 0; d < dim; d += LANES)
            _mm256_storeu_ps(o + g * dim + d, _mm256_mul_ps(_mm256_loadu_ps(o + g * dim + d), by));
    }
}

/* Attention of decoding rows (one query each) read straight from the paged cache, instead of
 * gathering each row's keys and values into new tensors for torch's kernel. Row r's query is at
 * flat token tokens[r] of `query` (strides in floats), its keys and values at cache slots
 * slots[r, :length] of `keys`/`values` ([slots, kv_heads, dim]), with the additive mask bias[r, :]
 * (0 or -inf: causal, window, padding). A masked key is never read, so nothing another row left in
 * a slot reaches this one. Query heads are grouped under their key/value head. Out: [T, heads,
 * dim], row r's at its token. One (row, key/value head) at a time per thread, with the thread's
 * own scores, so a row's result never depends on its neighbours. dim: a multiple of LANES.
 * Returns 0, or -1 where scratch for the scores could not be allocated. */
int decode_attention(const float *query, int64_t token_stride, int64_t head_stride, const int64_t *tokens,
                     const float *keys, const float *values, const int64_t *slots, const float *bias, float *out,
                     int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim, int64_t length, float scale,
                     int threads) {
    int64_t group = heads / kv_heads;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (rows * length * dim >= PARALLEL_FROM)
    {
        float *scores = malloc((size_t)(group * length) * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t task = 0; task < rows * kv_heads; task++) {
            int64_t r = task / kv_heads, kv = task % kv_heads;
            if (scores == NULL) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            attend_row(query + tokens[r] * token_stride + kv * group * head_stride, head_stride, keys, values,
                       slots + r * length, bias + r * length, out + (tokens[r] * heads + kv * group) * dim, scores,
                       group, kv, kv_heads, dim, length, scale);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
