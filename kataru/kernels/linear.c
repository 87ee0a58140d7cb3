/* Decode-time matmuls for CPUs with AVX2 + FMA: y[m, n] = s[n] * sum_k x[m, k] * w[n, k] for float32 inputs
 * x [M, K] (M small: the rows of a decode batch) and weights w [N, K] stored as bf16 (s = 1) or as int8
 * with one float32 scale per output row.
 *
 * Decoding reads every weight once per step, so a step's speed is how fast the weights stream from
 * memory. Each weight becomes a float32 in a register (bf16: a 16-bit shift; int8: sign extension and a
 * conversion) and meets an FMA; a weight row is read once for up to four input rows while it sits in L1,
 * then again from L1 for the next four. Output rows are split between threads of the OpenMP runtime
 * torch itself uses (one libgomp in the process).
 *
 * Every output element is summed in the same order whatever the batch size, the blocking or the thread
 * (one 8-lane accumulator along k, the lanes, then the k % 8 tail), so a sequence decodes to the same
 * bits alone or batched with others.
 */
#include <immintrin.h>
#include <stdint.h>

enum { BF16 = 0, INT8 = 1 };

/* eight weights from row-major storage at element offset i, as float32 */
static inline __m256 load8(const void *w, int64_t i, const int kind) {
    if (kind == INT8) {
        __m128i q = _mm_loadl_epi64((const __m128i *)((const int8_t *)w + i));
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    }
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float load1(const void *w, int64_t i, const int kind) {
    if (kind == INT8) return (float)((const int8_t *)w)[i];
    union { uint32_t i; float f; } c;
    c.i = (uint32_t)((const uint16_t *)w)[i] << 16;
    return c.f;
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* R weight rows from n against M input rows (M, R, kind constants after inlining; M * R <= 8 accumulators) */
static inline __attribute__((always_inline)) void block(const float *x, const void *w, const float *s, float *y,
                                                        int64_t K, int64_t N, int64_t n, const int M, const int R,
                                                        const int kind) {
    __m256 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) acc[r][m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv[4];
        for (int r = 0; r < R; r++) wv[r] = load8(w, (n + r) * K + k, kind);
        for (int m = 0; m < M; m++) {
            __m256 xv = _mm256_loadu_ps(x + m * K + k);
            for (int r = 0; r < R; r++) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) {
            float t = hsum(acc[r][m]);
            for (int64_t j = k; j < K; j++) t += load1(w, (n + r) * K + j, kind) * x[m * K + j];
            y[m * N + n + r] = kind == INT8 ? t * s[n + r] : t;
        }
}

/* m <= 4 input rows against weight rows [n, n + R): one input row takes four weight rows at a time (four
 * independent FMA chains), more input rows take two (their own chains are independent already) */
static inline __attribute__((always_inline)) void rows(const float *x, const void *w, const float *s, float *y,
                                                       int64_t K, int64_t N, int64_t n, int m, int R,
                                                       const int kind) {
#define B(M_, R_) block(x, w, s, y, K, N, n, M_, R_, kind)
    if (R == 4) {
        B(1, 4);
    } else if (R == 2) {
        switch (m) {
            case 1: B(1, 2); break;
            case 2: B(2, 2); break;
            case 3: B(3, 2); break;
            case 4: B(4, 2); break;
        }
    } else {
        switch (m) {
            case 1: B(1, 1); break;
            case 2: B(2, 1); break;
            case 3: B(3, 1); break;
            case 4: B(4, 1); break;
        }
    }
#undef B
}

static inline __attribute__((always_inline)) void linear(const float *x, const void *w, const float *s, float *y,
                                                         int64_t M, int64_t K, int64_t N, int threads,
                                                         const int kind) {
    #pragma omp parallel num_threads(threads)
    {
        int64_t t = 0, T = 1;
#ifdef _OPENMP
        extern int omp_get_thread_num(void);
        extern int omp_get_num_threads(void);
        t = omp_get_thread_num();
        T = omp_get_num_threads();
#endif
        int64_t chunk = (N + T - 1) / T, n0 = t * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        int wide = M == 1 ? 4 : 2;
        for (int64_t n = n0; n < n1;) {
            int R = n + wide <= n1 ? wide : 1;
            for (int64_t m0 = 0; m0 < M; m0 += 4)
                rows(x + m0 * K, w, s, y + m0 * N, K, N, n, M - m0 < 4 ? (int)(M - m0) : 4, R, kind);
            n += R;
        }
    }
}

void kataru_linear_bf16(const float *x, const uint16_t *w, float *y, int64_t M, int64_t K, int64_t N, int threads) {
    linear(x, w, 0, y, M, K, N, threads, BF16);
}

void kataru_linear_int8(const float *x, const int8_t *w, const float *scales, float *y, int64_t M, int64_t K,
                        int64_t N, int threads) {
    linear(x, w, scales, y, M, K, N, threads, INT8);
}
