/* The float32 elementwise work of a decoder layer that torch runs as several passes over memory on
 * the CPU, each here in one: the RMS norm of every row, and gelu(gate) * up (the tanh approximation)
 * of a gated MLP. Rows stay batch-invariant (docs/engine.md, property 6): a row's norm is computed
 * alone, in an order fixed by its width, and every element of gelu_tanh_mul goes through the same
 * vector code wherever it lies (a row's ragged end through a padded copy). A NaN stays in its row.
 * Built and loaded by app/engine/float_kernel.py; figures: bench/README.md. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { LANES = 8 };
enum { PARALLEL_FROM = 1 << 16 };  /* elements below which one thread beats waking the others */

static float lane_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static float sum_of_squares(const float *x, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 4 * LANES <= n; i += 4 * LANES) {
        __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + LANES);
        __m256 v2 = _mm256_loadu_ps(x + i + 2 * LANES), v3 = _mm256_loadu_ps(x + i + 3 * LANES);
        a0 = _mm256_fmadd_ps(v0, v0, a0); a1 = _mm256_fmadd_ps(v1, v1, a1);
        a2 = _mm256_fmadd_ps(v2, v2, a2); a3 = _mm256_fmadd_ps(v3, v3, a3);
    }
    for (; i + LANES <= n; i += LANES) {
        __m256 v = _mm256_loadu_ps(x + i);
        a0 = _mm256_fmadd_ps(v, v, a0);
    }
    float sum = lane_sum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; i++) sum += x[i] * x[i];
    return sum;
}

/* out = x / sqrt(mean(x^2) + eps) * scale, row by row: x and out [rows, width], scale [width]. */
void rms_norm(const float *x, const float *scale, float *out, int64_t rows, int64_t width, float eps, int threads) {
#pragma omp parallel for num_threads(threads) if (rows * width >= PARALLEL_FROM) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * width;
        float *to = out + r * width;
        float inverse = 1.0f / sqrtf(sum_of_squares(row, width) / (float)width + eps);
        __m256 by = _mm256_set1_ps(inverse);
        int64_t i = 0;
        for (; i + LANES <= width; i += LANES)
            _mm256_storeu_ps(to + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(row + i), by),
                                                   _mm256_loadu_ps(scale + i)));
        for (; i < width; i++) to[i] = row[i] * inverse * scale[i];
    }
}

/* e^x, as Cephes' expf (about 1 ulp); x is clamped to where 2^n stays a normal float. */
static __m256 exp_lanes(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
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
