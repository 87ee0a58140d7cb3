/* Decode-time matmuls for CPUs with AVX2 + FMA: y = x @ w.T for inputs x [M, K] (M small: the rows of a
 * decode batch) and weights w [N, K] stored as bf16, or as int8 with one float32 scale per output row.
 *
 * Decoding reads every weight once per step, so a step's speed is how fast the weights stream from
 * memory and how few instructions each weight costs. A weight row is read once for up to four input
 * rows while it sits in L1, then again from L1 for the next four. Output rows are split between threads
 * of the OpenMP runtime torch itself uses (one libgomp in the process).
 *
 * bf16: each weight becomes a float32 by a 16-bit shift and meets an FMA with the float32 input.
 * int8: the input row is given as int16 with one scale per row (quantized by the caller, relative error
 * 2^-16 of the row's largest value); sixteen int8 x int16 products are summed exactly by one vpmaddwd
 * into int32, flushed to float32 every CHUNK steps before they could overflow, and scaled at the end.
 *
 * Every output element is summed in the same order whatever the batch size, the blocking or the thread,
 * so a sequence decodes to the same bits alone or batched with others.
 */
#include <immintrin.h>
#include <stdint.h>

enum { BF16 = 0, INT8 = 1 };
#define CHUNK 128 /* int8 steps summed in int32: per lane 128 * 2 products of at most 127 * 32767 < 2^31 */

/* eight bf16 weights at element offset i, as float32 */
static inline __m256 load8(const uint16_t *w, int64_t i) {
    __m128i h = _mm_loadu_si128((const __m128i *)(w + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float load1(const uint16_t *w, int64_t i) {
    union { uint32_t i; float f; } c;
    c.i = (uint32_t)w[i] << 16;
    return c.f;
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* R weight rows from n against M input rows (M, R, kind constants after inlining; M * R <= 8 accumulators).
 * bf16: x float32. int8: x int16 with per-row scales xs, s the weight rows' scales. */
static inline __attribute__((always_inline)) void block(const void *x, const void *w, const float *s,
                                                        const float *xs, float *y, int64_t K, int64_t N,
                                                        int64_t n, const int M, const int R, const int kind) {
    __m256 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) acc[r][m] = _mm256_setzero_ps();
    int64_t k = 0;
    if (kind == BF16) {
        const float *xf = x;
        const uint16_t *wb = w;
        for (; k + 8 <= K; k += 8) {
            __m256 wv[4];
            for (int r = 0; r < R; r++) wv[r] = load8(wb, (n + r) * K + k);
            for (int m = 0; m < M; m++) {
                __m256 xv = _mm256_loadu_ps(xf + m * K + k);
                for (int r = 0; r < R; r++) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
            }
        }
        for (int r = 0; r < R; r++)
            for (int m = 0; m < M; m++) {
                float t = hsum(acc[r][m]);
                for (int64_t j = k; j < K; j++) t += load1(wb, (n + r) * K + j) * xf[m * K + j];
                y[m * N + n + r] = t;
            }
        return;
    }
    const int16_t *xi = x;
    const int8_t *wq = w;
    while (k + 16 <= K) {
        __m256i iacc[4][4];
        for (int r = 0; r < R; r++)
            for (int m = 0; m < M; m++) iacc[r][m] = _mm256_setzero_si256();
        int64_t end = k + 16 * CHUNK < K ? k + 16 * CHUNK : K;
        for (; k + 16 <= end; k += 16) {
            __m256i wv[4];
            for (int r = 0; r < R; r++)
                wv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wq + (n + r) * K + k)));
            for (int m = 0; m < M; m++) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xi + m * K + k));
                for (int r = 0; r < R; r++) iacc[r][m] = _mm256_add_epi32(iacc[r][m], _mm256_madd_epi16(wv[r], xv));
            }
        }
        for (int r = 0; r < R; r++)
            for (int m = 0; m < M; m++) acc[r][m] = _mm256_add_ps(acc[r][m], _mm256_cvtepi32_ps(iacc[r][m]));
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) {
            int32_t rest = 0;
            for (int64_t j = k; j < K; j++) rest += (int32_t)wq[(n + r) * K + j] * xi[m * K + j];
            y[m * N + n + r] = (hsum(acc[r][m]) + (float)rest) * s[n + r] * xs[m];
        }
}

/* m <= 4 input rows against weight rows [n, n + R): one input row takes four weight rows at a time (four
 * independent FMA chains), more input rows take two (their own chains are independent already) */
static inline __attribute__((always_inline)) void rows(const void *x, const void *w, const float *s,
                                                       const float *xs, float *y, int64_t K, int64_t N, int64_t n,
                                                       int m, int R, const int kind) {
#define B(M_, R_) block(x, w, s, xs, y, K, N, n, M_, R_, kind)
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

static inline __attribute__((always_inline)) void linear(const void *x, const void *w, const float *s,
                                                         const float *xs, float *y, int64_t M, int64_t K, int64_t N,
                                                         int threads, const int kind) {
    const int64_t xsize = kind == BF16 ? sizeof(float) : sizeof(int16_t);
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
                rows((const char *)x + m0 * K * xsize, w, s, xs ? xs + m0 : 0, y + m0 * N, K, N, n,
                     M - m0 < 4 ? (int)(M - m0) : 4, R, kind);
            n += R;
        }
    }
}

void kataru_linear_bf16(const float *x, const uint16_t *w, float *y, int64_t M, int64_t K, int64_t N, int threads) {
    linear(x, w, 0, 0, y, M, K, N, threads, BF16);
}

/* x int16 [M, K] with x_scales [M]: the input is x * x_scales[:, None] */
void kataru_linear_int8(const int16_t *x, const float *x_scales, const int8_t *w, const float *scales, float *y,
                        int64_t M, int64_t K, int64_t N, int threads) {
    linear(x, w, scales, x_scales, y, M, K, N, threads, INT8);
}
