/* Decode attention for CPUs with AVX2 + FMA: one query per row against that row's keys and values, read in
 * place from the KV cache [rows, kv_heads, slots, head_dim] (bf16 or float32).
 *
 * torch's scaled_dot_product_attention for a single query runs far below the memory's speed on this kind of
 * CPU (1.6 ms per layer at 512 keys and 16 heads of 128, where the cache holds 4 MB), and the cache rows of a
 * batch must first be gathered into a new tensor. Here each (row, head) pair reads its keys once for the
 * scores and its values once for the sum, in float32, with a vectorised exp.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

static inline __m256 load8_of(const void *p, int64_t i, int bf16) {
    return bf16 ? load8((const uint16_t *)p, i) : _mm256_loadu_ps((const float *)p + i);
}

/* e^x for x <= 0 (scores minus their maximum): x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor
 * polynomial (relative error below 2e-7), 2^n through the exponent bits; below -87 the result is 0. */
static inline __m256 exp8(__m256 x) {
    const __m256 ln2 = _mm256_set1_ps(0.69314718056f), inv_ln2 = _mm256_set1_ps(1.44269504089f);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, inv_ln2), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, ln2, x);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

/* o[d, d + 8C) = sum_i p_i v_i[d, d + 8C) / sum: C vectors of every value row in registers, rows in order */
static inline __attribute__((always_inline)) void weighted_sum(const float *p, const char *v, int64_t n, int64_t D,
                                                               int64_t d, float inv, float *o, int bf16, const int C) {
    __m256 acc[8];
    for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i++) {
        __m256 w = _mm256_set1_ps(p[i]);
        for (int c = 0; c < C; c++) acc[c] = _mm256_fmadd_ps(w, load8_of(v, i * D + d + 8 * c, bf16), acc[c]);
    }
    for (int c = 0; c < C; c++) _mm256_storeu_ps(o + d + 8 * c, _mm256_mul_ps(acc[c], _mm256_set1_ps(inv)));
}

/* q float32 [B, H, D]; k, v caches [R, Hkv, S, D]; row b reads cache row rows[b], its query sits at slot
 * slots[b] and sees slots (slot - window, slot] (window 0: all from 0). out float32 [B, H, D]. D % 8 == 0. */
void kataru_decode_attention(const float *q, const void *k, const void *v, const int64_t *rows, const int64_t *slots,
                             float *out, int64_t B, int64_t H, int64_t Hkv, int64_t S, int64_t D, int64_t window,
                             float scale, int bf16, int threads) {
    const int64_t group = H / Hkv, esize = bf16 ? 2 : 4;
    #pragma omp parallel num_threads(threads)
    {
        float *scores = 0;
        int64_t cap = 0;
        #pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            int64_t b = bh / H, h = bh % H, slot = slots[b];
            int64_t first = window > 0 && slot - window + 1 > 0 ? slot - window + 1 : 0, n = slot + 1 - first;
            if (n + 8 > cap) {
                free(scores);
                cap = n + 8;
                scores = malloc(cap * sizeof(float));
            }
            const float *qv = q + bh * D;
            int64_t base = ((rows[b] * Hkv + h / group) * S + first) * D;
            const char *kb = (const char *)k + base * esize, *vb = (const char *)v + base * esize;
            float best = -INFINITY;
            for (int64_t j = 0; j < n; j++) {
                __m256 acc = _mm256_setzero_ps();
                for (int64_t d = 0; d < D; d += 8)
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(qv + d), load8_of(kb, j * D + d, bf16), acc);
                scores[j] = hsum(acc) * scale;
                best = scores[j] > best ? scores[j] : best;
            }
            __m256 total = _mm256_setzero_ps(), top = _mm256_set1_ps(best);
            int64_t j = 0;
            for (; j + 8 <= n; j += 8) {
                __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), top));
                _mm256_storeu_ps(scores + j, p);
                total = _mm256_add_ps(total, p);
            }
            float sum = hsum(total);
            for (; j < n; j++) {
                __m256 p = exp8(_mm256_set1_ps(scores[j] - best));
                scores[j] = _mm_cvtss_f32(_mm256_castps256_ps128(p));
                sum += scores[j];
            }
            float *o = out + bh * D;
            int64_t d = 0;
            for (; d + 64 <= D; d += 64) weighted_sum(scores, vb, n, D, d, 1.0f / sum, o, bf16, 8);
            for (; d < D; d += 8) weighted_sum(scores, vb, n, D, d, 1.0f / sum, o, bf16, 1);
        }
        free(scores);
    }
}
