/* Decode attention for CPUs with AVX2 + FMA: one new token per row. Its keys and values go into the KV cache
 * [rows, kv_heads, slots, head_dim] (bf16 or float32) at the row's slot, then its query attends over the
 * row's keys and values read in place.
 *
 * torch's scaled_dot_product_attention for a single query runs far below the memory's speed on this kind of
 * CPU (1.6 ms per layer at 512 keys and 16 heads of 128, where the cache holds 4 MB), and the cache rows of a
 * batch must first be gathered into a new tensor. Here each (row, head) pair reads its keys once for the
 * scores and its values once for the sum, in float32, with a vectorised exp. Splitting the qkv projection,
 * the rotary embedding and the cache write happen in the same call: in torch they are some 25 small
 * operations per layer, each costing more to dispatch than to compute at one token.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

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

/* Head h of a token (D values at element offset at of src) with the rotary embedding on its first rot values,
 * as torch's x * cos + rotate_half(x) * sin computes it: each product and the sum rounded to the activation
 * type (this file is built with -ffp-contract=off, so no FMA merges them), the result bit for bit the same. */
static void rotate(const void *src, int64_t at, const void *cos, const void *sin, int64_t t, int64_t rot, int64_t D,
                   int bf16, float *dst) {
    int64_t half = rot / 2;
    for (int64_t d = 0; d < D; d++) {
        float x = load1(src, at + d, bf16);
        if (d < rot) {
            float other = d < half ? -load1(src, at + d + half, bf16) : load1(src, at + d - half, bf16);
            float a = x * load1(cos, t + d, bf16), b = other * load1(sin, t + d, bf16);
            if (bf16) a = bf16_to_float(float_to_bf16(a)), b = bf16_to_float(float_to_bf16(b));
            x = a + b;
            if (bf16) x = bf16_to_float(float_to_bf16(x));
        }
        dst[d] = x;
    }
}

/* qkv [B, (H + 2 Hkv) D]: each row's queries, keys and values; rope [4, B, rot] its cos and sin tables for
 * queries then keys (xPos scales them apart), ignored when rot is 0; both bf16 when act_bf16, else float32.
 * k, v caches [R, Hkv, S, D]; row b writes cache row rows[b] at slot slots[b], and its query sees slots
 * (slot - window, slot] (window 0: all from 0). out [B, H D] in the activation type. D % 8 == 0, D <= 512. */
void kataru_decode_attention(const void *qkv, const void *rope, int64_t rot, void *k, void *v, const int64_t *rows,
                             const int64_t *slots, void *out, int64_t B, int64_t H, int64_t Hkv, int64_t S, int64_t D,
                             int64_t window, float scale, int act_bf16, int cache_bf16, int threads) {
    const int64_t group = H / Hkv, esize = cache_bf16 ? 2 : 4, width = (H + 2 * Hkv) * D;
    const int64_t table = B * rot * (act_bf16 ? 2 : 4); /* bytes of one of the four tables */
    const char *cos_q = rope, *sin_q = cos_q + table, *cos_k = sin_q + table, *sin_k = cos_k + table;
    #pragma omp parallel num_threads(threads)
    {
        float *scores = 0, head[512];
        int64_t cap = 0;
        #pragma omp for schedule(static)
        for (int64_t bg = 0; bg < B * Hkv; bg++) {
            int64_t b = bg / Hkv, g = bg % Hkv, at = ((rows[b] * Hkv + g) * S + slots[b]) * D;
            rotate(qkv, b * width + (H + g) * D, cos_k, sin_k, b * rot, rot, D, act_bf16, head);
            for (int64_t d = 0; d < D; d++) {
                store1(k, at + d, head[d], cache_bf16);
                store1(v, at + d, load1(qkv, b * width + (H + Hkv + g) * D + d, act_bf16), cache_bf16);
            }
        }
        #pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            int64_t b = bh / H, h = bh % H, slot = slots[b];
            int64_t first = window > 0 && slot - window + 1 > 0 ? slot - window + 1 : 0, n = slot + 1 - first;
            if (n + 8 > cap) {
                free(scores);
                cap = n + 8;
                scores = malloc(cap * sizeof(float));
            }
            float qv[512], o[512];
            rotate(qkv, b * width + h * D, cos_q, sin_q, b * rot, rot, D, act_bf16, qv);
            int64_t base = ((rows[b] * Hkv + h / group) * S + first) * D;
            const char *kb = (const char *)k + base * esize, *vb = (const char *)v + base * esize;
            float best = -INFINITY;
            for (int64_t j = 0; j < n; j++) {
                __m256 acc = _mm256_setzero_ps();
                for (int64_t d = 0; d < D; d += 8)
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(qv + d), load8_of(kb, j * D + d, cache_bf16), acc);
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
            int64_t d = 0;
            for (; d + 64 <= D; d += 64) weighted_sum(scores, vb, n, D, d, 1.0f / sum, o, cache_bf16, 8);
            for (; d < D; d += 8) weighted_sum(scores, vb, n, D, d, 1.0f / sum, o, cache_bf16, 1);
            for (d = 0; d < D; d++) store1(out, bh * D + d, o[d], act_bf16);
        }
        free(scores);
    }
}
