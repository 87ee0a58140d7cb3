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

/* Where the cache's keys and values come from: float32, bf16 eight values at a time, or bf16 in pairs (D % 16
 * == 0): one 32-bit lane holds values 2i and 2i + 1, a shift makes the first a float32 and a mask the second,
 * so sixteen values take one load and two integer operations instead of two loads and four. */
enum { F32 = 0, BF16 = 1, PAIRS = 2 };

/* sixteen bf16 values at element offset i of p, as PAIRS reads them: values 2i in *even, 2i + 1 in *odd */
static inline __attribute__((always_inline)) void load_pairs(const void *p, int64_t i, __m256 *even, __m256 *odd) {
    __m256i x = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32((int)0xffff0000)));
}

/* the first slot a query at `slot` sees: slot - window + 1 with a sliding window, else 0 */
static inline int64_t first_slot(int64_t slot, int64_t window) {
    return window > 0 && slot - window + 1 > 0 ? slot - window + 1 : 0;
}

/* Ask for the bytes [from, to) of p in L2. The hardware's prefetcher alone leaves the memory idle while a
 * block's FMAs run: reading the keys, then the values, a step took the time of both (a read-only pass over the
 * same bytes runs at 45-50 GB/s, the kernel ran at 25-30). So the values of a block of keys, and the next
 * pair's keys while the values are summed, are requested ahead. */
static inline __attribute__((always_inline)) void prefetch(const char *p, int64_t from, int64_t to) {
    for (int64_t l = from; l < to; l += 64) _mm_prefetch(p + l, _MM_HINT_T1);
}

/* o[d, d + 8C) = sum_i p_i v_i[d, d + 8C) / sum: C vectors of every value row in registers, rows in order
 * (PAIRS: C / 2 pairs of vectors, values 2i and 2i + 1 apart, put back in order at the end). Row i of `ahead`
 * (if any) is prefetched with value row i. */
static inline __attribute__((always_inline)) void weighted_sum(const float *p, const char *v, int64_t n, int64_t D,
                                                               int64_t d, float inv, float *o, const int mode,
                                                               const int C, const char *ahead) {
    __m256 acc[8];
    const int64_t row_bytes = D * (mode == F32 ? 4 : 2);
    for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i++) {
        if (ahead) prefetch(ahead, i * row_bytes, (i + 1) * row_bytes);
        __m256 w = _mm256_set1_ps(p[i]);
        if (mode == PAIRS) {
            for (int c = 0; c < C; c += 2) {
                __m256 even, odd;
                load_pairs(v, i * D + d + 8 * c, &even, &odd);
                acc[c] = _mm256_fmadd_ps(w, even, acc[c]);
                acc[c + 1] = _mm256_fmadd_ps(w, odd, acc[c + 1]);
            }
        } else {
            for (int c = 0; c < C; c++) acc[c] = _mm256_fmadd_ps(w, load8_of(v, i * D + d + 8 * c, mode), acc[c]);
        }
    }
    const __m256 scale = _mm256_set1_ps(inv);
    for (int c = 0; c < C; c++) acc[c] = _mm256_mul_ps(acc[c], scale);
    if (mode == PAIRS) {
        for (int c = 0; c < C; c += 2) {
            __m256 lo = _mm256_unpacklo_ps(acc[c], acc[c + 1]), hi = _mm256_unpackhi_ps(acc[c], acc[c + 1]);
            acc[c] = _mm256_permute2f128_ps(lo, hi, 0x20), acc[c + 1] = _mm256_permute2f128_ps(lo, hi, 0x31);
        }
    }
    for (int c = 0; c < C; c++) _mm256_storeu_ps(o + d + 8 * c, acc[c]);
}

/* Head h of a token (D values at element offset at of src) with the rotary embedding on its first rot values,
 * as torch's x * cos + rotate_half(x) * sin computes it: each product and the sum rounded to the activation
 * type (this file is built with -ffp-contract=off, so no FMA merges them), the result bit for bit the same.
 * Eight values at a time where the halves of the rotated part are whole vectors (rot % 16 == 0). */
static void rotate(const void *src, int64_t at, const void *cos, const void *sin, int64_t t, int64_t rot, int64_t D,
                   int bf16, float *dst) {
    int64_t half = rot / 2, d = 0;
    if (half % 8 == 0) {
        const __m256 sign = _mm256_set1_ps(-0.0f);
        for (; d < rot; d += 8) {
            __m256 x = load8_of(src, at + d, bf16);
            __m256 other = d < half ? _mm256_xor_ps(load8_of(src, at + d + half, bf16), sign)
                                    : load8_of(src, at + d - half, bf16);
            __m256 a = _mm256_mul_ps(x, load8_of(cos, t + d, bf16));
            __m256 b = _mm256_mul_ps(other, load8_of(sin, t + d, bf16));
            if (bf16) a = round8_bf16(a), b = round8_bf16(b);
            x = _mm256_add_ps(a, b);
            _mm256_storeu_ps(dst + d, bf16 ? round8_bf16(x) : x);
        }
        for (; d < D; d += 8) _mm256_storeu_ps(dst + d, load8_of(src, at + d, bf16));
        return;
    }
    for (; d < D; d++) {
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

/* the sums of eight vectors, one per lane: ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)) of each */
static inline __m256 hsum8(const __m256 *a) {
    __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* scores[j] = (q . key j) * scale for the n keys at kb (D values apart; scores has room for n + 8); returns
 * their maximum. Eight keys at a time, one accumulator each: with one chain per key every step waits on the
 * FMA before it, and the keys stream in at a quarter of the memory's speed. Past the last key the block
 * repeats it, so that every score is the same sum in the same order. PAIRS: q in the order the pairs come in
 * (per 16 values: the even ones, then the odd ones). The value rows vb of each block are prefetched. */
static inline __attribute__((always_inline)) float key_scores(const float *q, const char *kb, const char *vb,
                                                              int64_t n, int64_t D, float scale, float *scores,
                                                              const int mode) {
    const int64_t row_bytes = D * (mode == F32 ? 4 : 2);
    __m256 best = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n; j += 8) {
        int64_t key[8];
        __m256 acc[8];
        for (int c = 0; c < 8; c++) key[c] = (j + c < n ? j + c : n - 1) * D, acc[c] = _mm256_setzero_ps();
        prefetch(vb, j * row_bytes, (j + 8 < n ? j + 8 : n) * row_bytes);
        if (mode == PAIRS) {
            for (int64_t d = 0; d < D; d += 16) {
                __m256 q_even = _mm256_loadu_ps(q + d), q_odd = _mm256_loadu_ps(q + d + 8);
                for (int c = 0; c < 8; c++) {
                    __m256 even, odd;
                    load_pairs(kb, key[c] + d, &even, &odd);
                    acc[c] = _mm256_fmadd_ps(q_even, even, acc[c]);
                    acc[c] = _mm256_fmadd_ps(q_odd, odd, acc[c]);
                }
            }
        } else {
            for (int64_t d = 0; d < D; d += 8) {
                __m256 qd = _mm256_loadu_ps(q + d);
                for (int c = 0; c < 8; c++) acc[c] = _mm256_fmadd_ps(qd, load8_of(kb, key[c] + d, mode), acc[c]);
            }
        }
        __m256 s = _mm256_mul_ps(hsum8(acc), _mm256_set1_ps(scale));
        _mm256_storeu_ps(scores + j, s);
        best = _mm256_max_ps(best, s);
    }
    return hmax(best);
}

/* One (row, head) pair: its rotated query qv over n keys and values at kb, vb; out its D results. `ahead`: the
 * next pair's keys (or NULL), prefetched while this pair sums its values. */
static inline __attribute__((always_inline)) void attend(const float *qv, const char *kb, const char *vb, int64_t n,
                                                         int64_t D, float scale, float *scores, float *o,
                                                         const int mode, const char *ahead) {
    float q[512];
    if (mode == PAIRS) {
        for (int64_t d = 0; d < D; d += 16)
            for (int i = 0; i < 8; i++) q[d + i] = qv[d + 2 * i], q[d + 8 + i] = qv[d + 2 * i + 1];
        qv = q;
    }
    float best = key_scores(qv, kb, vb, n, D, scale, scores, mode);
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
    for (; d + 64 <= D; d += 64, ahead = 0) weighted_sum(scores, vb, n, D, d, 1.0f / sum, o, mode, 8, ahead);
    for (; d < D; d += mode == PAIRS ? 16 : 8, ahead = 0)
        weighted_sum(scores, vb, n, D, d, 1.0f / sum, o, mode, mode == PAIRS ? 2 : 1, ahead);
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
            for (int64_t d = 0; d < D; d += 8) {
                store8_of(k, at + d, _mm256_loadu_ps(head + d), cache_bf16);
                store8_of(v, at + d, load8_of(qkv, b * width + (H + Hkv + g) * D + d, act_bf16), cache_bf16);
            }
        }
        #pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            int64_t b = bh / H, h = bh % H, slot = slots[b];
            int64_t first = first_slot(slot, window), n = slot + 1 - first;
            if (n + 8 > cap) {
                free(scores);
                cap = n + 8;
                scores = malloc(cap * sizeof(float));
            }
            float qv[512], o[512];
            rotate(qkv, b * width + h * D, cos_q, sin_q, b * rot, rot, D, act_bf16, qv);
            int64_t base = ((rows[b] * Hkv + h / group) * S + first) * D;
            const char *kb = (const char *)k + base * esize, *vb = (const char *)v + base * esize, *ahead = 0;
            if (bh + 1 < B * H) { /* the next pair's first key: its row, its head's kv head, its window */
                int64_t b2 = (bh + 1) / H, first2 = first_slot(slots[b2], window);
                ahead = (const char *)k + ((rows[b2] * Hkv + (bh + 1) % H / group) * S + first2) * D * esize;
            }
            if (!cache_bf16) attend(qv, kb, vb, n, D, scale, scores, o, F32, ahead);
            else if (D % 16) attend(qv, kb, vb, n, D, scale, scores, o, BF16, ahead);
            else attend(qv, kb, vb, n, D, scale, scores, o, PAIRS, ahead);
            for (int64_t d = 0; d < D; d += 8) store8_of(out, bh * D + d, _mm256_loadu_ps(o + d), act_bf16);
        }
        free(scores);
    }
}
