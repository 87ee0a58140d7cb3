/* Matmuls for CPUs with AVX2 + FMA (+ F16C): y = x @ w.T + bias for inputs x [M, K] (float32 or bf16) and
 * weights w [N, K] stored as bf16 or fp16, as int8 with one scale per output row, or as 4-bit groups with a
 * scale and a minimum each. bf16 and fp16 serve decoding (M small: the rows of a decode batch; prefill
 * converts to torch's float32 GEMM); the integer kernels serve prefill too, where they beat dequantizing into
 * that GEMM. bf16 weights repacked in panels of 16 rows (panel and over_panels, at the end) serve every M: a GEMM's
 * register blocking, each weight converted once per six rows.
 *
 * Decoding reads every weight once per step, so a step's speed is how fast the weights stream from memory
 * and how few instructions each weight costs. A weight row (or tile of 8 rows) is read once for up to four
 * input rows (eight against 4-bit tiles) while it sits in L1, then again from L1 for the next ones. Output
 * rows are split between threads of the OpenMP runtime torch itself uses (one libgomp in the process); for
 * many rows the input's quantization and the output's rounding are split too.
 *
 * bf16: each weight becomes a float32 by a 16-bit shift (fp16: by vcvtph2ps) and meets an FMA with the float32
 * input.
 * int8 and int4 (the scheme of llama.cpp's Q8_0 / Q4_1 dot products): the input row is first quantized to
 * int8 in blocks of QB values with one float scale per block (step max|x_block| / 127); vpmaddubsw then
 * multiplies 32 weight bytes with 32 input bytes and adds pairs, so one instruction does what takes four
 * float FMAs, and each block's exact integer sum is scaled once. vpmaddubsw multiplies unsigned by signed
 * bytes: for signed int8 weights it takes |x| (made once with the quantized row) and the weights with x's
 * signs (vpsignb); 4-bit weights are unsigned already, and their groups' minimum is applied through exact
 * float sums of the input blocks.
 *
 * Every output element is summed in the same order whatever the batch size, the blocking or the thread,
 * and each input row is quantized on its own, so a sequence decodes to the same bits alone or batched.
 *
 * Built a second time with AVX-512 (F, BW, VL, DQ; VNNI and BF16 where the CPU has them: kataru.kernels picks
 * the build by cpuid), the hot loops take 512-bit vectors: bf16 and fp16 weights 16 at a time, and the tiled
 * int8 and 4-bit kernels two 32-byte steps at a time, their integer dot products by vpdpbusd with VNNI (else
 * vpmaddubsw + vpmaddwd; int8 with VNNI meets x + 128 and subtracts the weights' sums). With AVX512-BF16, bf16 weights meet the input rows rounded to bf16, 32 at a time by
 * vdpbf16ps (no widening: two products per lane and instruction), and so do the packed panels
 * (panel_dp), two steps at a time. Integer sums are exact, so the tiled
 * kernels give the AVX2 build's bits; the float kernels sum in another order (still the same order for every
 * batch size).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

enum { BF16 = 0, INT8 = 1, INT4 = 2, F16 = 3 };
#define FLOAT_WEIGHTS(kind) ((kind) == BF16 || (kind) == F16)
#define QB 64 /* input block for int8 and int4 */
#define PARALLEL_MIN (1 << 16) /* elements from which the work around the matmul (prefill) is split between threads */

#ifdef __AVX512BW__
/* acc + the sums of four products of unsigned bytes u and signed bytes s in each 32-bit lane (no pair of
 * products may exceed int16: the callers' operands keep them below 2 * 127 * 127) */
static inline __m512i dot4(__m512i acc, __m512i u, __m512i s) {
#ifdef __AVX512VNNI__
    return _mm512_dpbusd_epi32(acc, u, s);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}

/* the lanes of steps s (low half) and s + 1 (high half) added: 8 exact int32 sums, as the AVX2 code has them */
static inline __m256i fold(__m512i v) {
    return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}

/* sixteen bf16 or fp16 values at element offset i, as float32 */
static inline __m512 load16(const uint16_t *w, int64_t i, int f16) {
    __m256i h = _mm256_loadu_si256((const __m256i *)(w + i));
    return f16 ? _mm512_cvtph_ps(h) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

#ifdef __AVX512BF16__
/* x rounded to bf16 (to nearest even, as float_to_bf16; NaN to torch's quiet NaN), 16 values at a time */
static void round_bf16(const float *x, uint16_t *h, int64_t n, int threads) {
    #pragma omp parallel for num_threads(threads) if (n >= PARALLEL_MIN)
    for (int64_t i = 0; i < n; i += 16) {
        if (i + 16 > n) {
            for (int64_t j = i; j < n; j++) h[j] = float_to_bf16(x[j]);
            continue;
        }
        __m512i b = _mm512_castps_si512(_mm512_loadu_ps(x + i));
        __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
        __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(b, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
        r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
        _mm256_storeu_si256((__m256i *)(h + i), _mm512_cvtepi32_epi16(r));
    }
}

/* The n input values rounded to bf16 (to nearest even, as torch rounds), for vdpbf16ps (*h) and, with `wide`,
 * as float32 for the rest of a row (returned; else NULL), in per-thread buffers grown on demand. */
static __thread uint16_t *scratch_h;
static __thread float *scratch_r;
static __thread int64_t scratch_h_cap;

static const float *bf16_rows(const float *x, int64_t n, int threads, int wide, const uint16_t **h) {
    if (n > scratch_h_cap) {
        free(scratch_h);
        free(scratch_r);
        scratch_h_cap = n;
        scratch_h = malloc(n * sizeof(uint16_t));
        scratch_r = malloc(n * sizeof(float));
    }
    round_bf16(x, scratch_h, n, threads);
    *h = scratch_h;
    if (!wide) return 0;
    for (int64_t i = 0; i < n; i++) scratch_r[i] = bf16_to_float(scratch_h[i]);
    return scratch_r;
}
#endif

/* Input rows in int8 blocks: x [M, K] ≈ q * d per block of QB (the last one may be shorter), with the exact
 * float sum of each block (the 4-bit minimum term needs it). Per thread, grown on demand: calls from
 * several Python threads (ctypes releases the GIL) never share it. */
typedef struct { int8_t *q; uint8_t *u; float *d, *sums; int64_t blocks; } Quantized; /* u: |q| */
static __thread int8_t *scratch_q;
static __thread float *scratch_f;
static __thread int64_t scratch_cap;

static Quantized quantize_rows(const float *x, int64_t M, int64_t K, int threads) {
    int64_t blocks = (K + QB - 1) / QB;
    if (M * blocks * QB > scratch_cap) {
        free(scratch_q);
        free(scratch_f);
        scratch_cap = M * blocks * QB;
        scratch_q = malloc(2 * scratch_cap);
        scratch_f = malloc(2 * M * blocks * sizeof(float));
    }
    Quantized r = {scratch_q, (uint8_t *)scratch_q + M * blocks * QB, scratch_f, scratch_f + M * blocks, blocks};
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); /* undoes the lane interleave of packs */
    #pragma omp parallel for num_threads(threads) if (M * K >= PARALLEL_MIN)
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < blocks; b++) {
            const float *xb = x + m * K + b * QB;
            int8_t *qb = r.q + m * K + b * QB;
            uint8_t *ub = r.u + m * K + b * QB;
            int64_t len = K - b * QB < QB ? K - b * QB : QB;
            float amax = 0, sum = 0;
            if (len == QB) {
                __m256 mx = _mm256_setzero_ps(), s = _mm256_setzero_ps();
                for (int i = 0; i < QB; i += 8) {
                    __m256 v = _mm256_loadu_ps(xb + i);
                    mx = _mm256_max_ps(mx, _mm256_and_ps(v, absmask));
                    s = _mm256_add_ps(s, v);
                }
                amax = hmax(mx);
                sum = hsum(s);
            } else {
                for (int64_t i = 0; i < len; i++) {
                    amax = fmaxf(amax, fabsf(xb[i]));
                    sum += xb[i];
                }
            }
            float inv = amax > 0 ? 127.0f / amax : 0.0f;
            r.d[m * blocks + b] = amax / 127.0f;
            r.sums[m * blocks + b] = sum;
            if (len == QB) {
                __m256 vinv = _mm256_set1_ps(inv);
                for (int i = 0; i < QB; i += 32) {
                    __m256i v[4];
                    for (int j = 0; j < 4; j++)
                        v[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 8 * j), vinv));
                    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
                    p = _mm256_permutevar8x32_epi32(p, order);
                    _mm256_storeu_si256((__m256i *)(qb + i), p);
                    _mm256_storeu_si256((__m256i *)(ub + i), _mm256_abs_epi8(p));
                }
            } else {
                for (int64_t i = 0; i < len; i++) {
                    qb[i] = (int8_t)lrintf(xb[i] * inv);
                    ub[i] = (uint8_t)abs(qb[i]);
                }
            }
        }
    return r;
}

/* R weight rows from n against M input rows (M, R, kind constants after inlining; M * R <= 8 accumulators).
 * bf16 and fp16: x float32 (with AVX512-BF16, bf16 weights meet xh, the same rows in bf16, by vdpbf16ps).
 * int8: sm the rows' float32 scales. */
static inline __attribute__((always_inline)) void block(const float *x, const uint16_t *xh, Quantized in,
                                                        const void *w, const void *sm, float *y, int64_t K, int64_t N,
                                                        int64_t n, const int M, const int R, const int kind) {
    (void)xh; /* read by the AVX512-BF16 build only */
    __m256 acc[4][4];
    float extra[4][4]; /* the tail of a row past the last full vector or block */
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) {
            acc[r][m] = _mm256_setzero_ps();
            extra[r][m] = 0;
        }
    if (FLOAT_WEIGHTS(kind)) {
        const uint16_t *wb = w;
        int64_t k = 0;
#ifdef __AVX512BW__
        __m512 wide[4][4];
        for (int r = 0; r < R; r++)
            for (int m = 0; m < M; m++) wide[r][m] = _mm512_setzero_ps();
#ifdef __AVX512BF16__
        /* 32 weights per row and step: each lane adds the two products of its pair of bf16 values (exact in
         * float32) to its sum */
        for (; kind == BF16 && k + 32 <= K; k += 32) {
            __m512i wv[4];
            for (int r = 0; r < R; r++) {
                wv[r] = _mm512_loadu_si512((const void *)(wb + (n + r) * K + k));
                _mm_prefetch((const char *)(wb + (n + r + R) * K + k), _MM_HINT_T0);
            }
            for (int m = 0; m < M; m++) {
                __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(xh + m * K + k));
                for (int r = 0; r < R; r++) wide[r][m] = _mm512_dpbf16_ps(wide[r][m], (__m512bh)wv[r], xv);
            }
        }
#endif
        for (; k + 16 <= K; k += 16) {
            __m512 wv[4];
            for (int r = 0; r < R; r++) wv[r] = load16(wb, (n + r) * K + k, kind == F16);
            if ((k & 31) == 0)
                for (int r = 0; r < R; r++) _mm_prefetch((const char *)(wb + (n + r + R) * K + k), _MM_HINT_T0);
            for (int m = 0; m < M; m++) {
                __m512 xv = _mm512_loadu_ps(x + m * K + k);
                for (int r = 0; r < R; r++) wide[r][m] = _mm512_fmadd_ps(wv[r], xv, wide[r][m]);
            }
        }
        for (int r = 0; r < R; r++)
            for (int m = 0; m < M; m++) extra[r][m] = _mm512_reduce_add_ps(wide[r][m]);
#endif
        for (; k + 8 <= K; k += 8) {
            __m256 wv[4];
            for (int r = 0; r < R; r++)
                wv[r] = kind == F16 ? load8_f16(wb, (n + r) * K + k) : load8(wb, (n + r) * K + k);
            if ((k & 31) == 0)
                for (int r = 0; r < R; r++) _mm_prefetch((const char *)(wb + (n + r + R) * K + k), _MM_HINT_T0);
            for (int m = 0; m < M; m++) {
                __m256 xv = _mm256_loadu_ps(x + m * K + k);
                for (int r = 0; r < R; r++) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
            }
        }
        for (int r = 0; r < R; r++)
            for (int m = 0; m < M; m++)
                for (int64_t j = k; j < K; j++) {
                    uint16_t h = wb[(n + r) * K + j];
                    extra[r][m] += (kind == F16 ? _cvtsh_ss(h) : bf16_to_float(h)) * x[m * K + j];
                }
    } else if (kind == INT8) {
        const int8_t *wq = w;
        const __m256i ones = _mm256_set1_epi16(1);
        const int64_t full = K / QB;
        for (int64_t b = 0; b < full; b++) {
            __m256i w0[4], w1[4];
            for (int r = 0; r < R; r++) {
                w0[r] = _mm256_loadu_si256((const __m256i *)(wq + (n + r) * K + b * QB));
                w1[r] = _mm256_loadu_si256((const __m256i *)(wq + (n + r) * K + b * QB + 32));
                _mm_prefetch((const char *)(wq + (n + r + R) * K + b * QB), _MM_HINT_T0);
            }
            for (int m = 0; m < M; m++) {
                __m256i a0 = _mm256_loadu_si256((const __m256i *)(in.q + m * K + b * QB));
                __m256i a1 = _mm256_loadu_si256((const __m256i *)(in.q + m * K + b * QB + 32));
                __m256i u0 = _mm256_loadu_si256((const __m256i *)(in.u + m * K + b * QB));
                __m256i u1 = _mm256_loadu_si256((const __m256i *)(in.u + m * K + b * QB + 32));
                __m256 d = _mm256_set1_ps(in.d[m * in.blocks + b]);
                for (int r = 0; r < R; r++) { /* |a| * sign(a) w: pairs of at most 2 * 127 * 127, no saturation */
                    __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(u0, _mm256_sign_epi8(w0[r], a0)), ones);
                    __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(u1, _mm256_sign_epi8(w1[r], a1)), ones);
                    acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1)), d, acc[r][m]);
                }
            }
        }
        if (full * QB < K)
            for (int r = 0; r < R; r++)
                for (int m = 0; m < M; m++) {
                    int32_t dot = 0;
                    for (int64_t j = full * QB; j < K; j++) dot += (int32_t)wq[(n + r) * K + j] * in.q[m * K + j];
                    extra[r][m] = (float)dot * in.d[m * in.blocks + full];
                }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) {
            float t = hsum(acc[r][m]) + extra[r][m];
            y[m * N + n + r] = kind == INT8 ? t * ((const float *)sm)[n + r] : t;
        }
}

/* m <= 4 input rows against weight rows [n, n + R): one input row takes four weight rows at a time (four
 * independent chains), more input rows take two (their own chains are independent already) */
static inline __attribute__((always_inline)) void rows(const float *x, const uint16_t *xh, Quantized in,
                                                       const void *w, const void *sm, float *y, int64_t K, int64_t N,
                                                       int64_t n, int m, int R, const int kind) {
#define B(M_, R_) block(x, xh, in, w, sm, y, K, N, n, M_, R_, kind)
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

static inline __attribute__((always_inline)) void linear(const float *x, const void *w, const void *sm, float *y,
                                                         int64_t M, int64_t K, int64_t N, int threads,
                                                         const int kind) {
    Quantized in = {0, 0, 0, 0, 0};
    if (!FLOAT_WEIGHTS(kind)) in = quantize_rows(x, M, K, threads);
    const uint16_t *xh = 0;
#ifdef __AVX512BF16__
    if (kind == BF16) x = bf16_rows(x, M * K, threads, 1, &xh); /* every product of a row takes x rounded to bf16 */
#endif
    #pragma omp parallel num_threads(threads)
    {
        int64_t n0, n1;
        thread_share(N, &n0, &n1);
        int wide = M == 1 ? 4 : 2;
        for (int64_t n = n0; n < n1;) {
            int R = n + wide <= n1 ? wide : 1;
            for (int64_t m0 = 0; m0 < M; m0 += 4) {
                Quantized part = in;
                if (!FLOAT_WEIGHTS(kind))
                    part = (Quantized){in.q + m0 * K, in.u + m0 * K, in.d + m0 * in.blocks, in.sums + m0 * in.blocks,
                                       in.blocks};
                rows(x + m0 * K, xh ? xh + m0 * K : 0, part, w, sm, y + m0 * N, K, N, n,
                     M - m0 < 4 ? (int)(M - m0) : 4, R, kind);
            }
            n += R;
        }
    }
}

/* 4-bit weights, one tile of 8 output rows against M <= 8 input rows. The tile's bytes are K/8 steps of 32:
 * byte 4r + j of step s holds row r's value 8s + j in its low and 8s + 4 + j in its high nibble, so one AND
 * gives four values of each of the 8 rows in its own 32-bit lane, and vpmaddubsw against four input bytes
 * broadcast to every lane leaves each row's sums in its own lane: no horizontal adds, one store of 8
 * outputs, and a single sequential stream per thread. Steps add up in int16 (at most 4 * 2 * 2 * 15 * 127
 * = 30480) before vpmaddwd widens them. sm: bf16 [N/8, groups, 2, 8], the tile's scales then minimums,
 * weight = q * scale + min. */
static inline __attribute__((always_inline)) void tile4(Quantized in, const uint8_t *w, const uint16_t *sm,
                                                        float *y, int64_t K, int64_t N, int64_t tile, int64_t group,
                                                        const int M) {
    const int64_t groups = K / group, per_group = group / QB;
    const uint8_t *wt = w + tile * 4 * K;
    const uint16_t *st = sm + tile * groups * 16;
    __m256 acc[8];
    for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < in.blocks; b++) {
        __m256i sums32[8];
#ifdef __AVX512BW__
        /* two steps per 64-byte load: lanes 0-7 step s, 8-15 step s + 1; each lane meets its step's four input
         * bytes (low nibbles: values 8s..8s+3, high: 8s+4..8s+7), picked from 16 input bytes per step pair */
        const __m512i low16 = _mm512_set1_epi8(0x0F);
        const __m512i pick_lo = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
        const __m512i pick_hi = _mm512_setr_epi32(1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3);
        __m512i wide[8];
        for (int m = 0; m < M; m++) wide[m] = _mm512_setzero_si512();
        for (int s = 0; s < 8; s += 2) {
            int64_t step = b * 8 + s;
            const uint8_t *p = wt + step * 32;
            _mm_prefetch((const char *)(p + 1024), _MM_HINT_T0);
            __m512i raw = _mm512_loadu_si512((const void *)p);
            __m512i lo = _mm512_and_si512(raw, low16), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low16);
            for (int m = 0; m < M; m++) {
                __m512i a = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(in.q + m * K + step * 8)));
                wide[m] = dot4(dot4(wide[m], lo, _mm512_permutexvar_epi32(pick_lo, a)), hi,
                               _mm512_permutexvar_epi32(pick_hi, a));
            }
        }
        for (int m = 0; m < M; m++) sums32[m] = fold(wide[m]);
#else
        const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
        for (int m = 0; m < M; m++) sums32[m] = _mm256_setzero_si256();
        for (int half = 0; half < 2; half++) {
            __m256i sums16[8];
            for (int m = 0; m < M; m++) sums16[m] = _mm256_setzero_si256();
            for (int s = 0; s < 4; s++) {
                int64_t step = b * 8 + half * 4 + s;
                const uint8_t *p = wt + step * 32;
                if (s % 2 == 0) _mm_prefetch((const char *)(p + 1024), _MM_HINT_T0);
                __m256i raw = _mm256_loadu_si256((const __m256i *)p);
                __m256i lo = _mm256_and_si256(raw, low), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
                for (int m = 0; m < M; m++) {
                    int32_t a0, a1;
                    memcpy(&a0, in.q + m * K + step * 8, 4);
                    memcpy(&a1, in.q + m * K + step * 8 + 4, 4);
                    __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(a0)),
                                                   _mm256_maddubs_epi16(hi, _mm256_set1_epi32(a1)));
                    sums16[m] = _mm256_add_epi16(sums16[m], p16);
                }
            }
            for (int m = 0; m < M; m++) sums32[m] = _mm256_add_epi32(sums32[m], _mm256_madd_epi16(sums16[m], ones));
        }
#endif
        int64_t g = b / per_group;
        __m256 scale = load8(st, g * 16), min = load8(st, g * 16 + 8);
        for (int m = 0; m < M; m++) {
            __m256 d = _mm256_set1_ps(in.d[m * in.blocks + b]);
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums32[m]), _mm256_mul_ps(scale, d), acc[m]);
            acc[m] = _mm256_fmadd_ps(min, _mm256_set1_ps(in.sums[m * in.blocks + b]), acc[m]);
        }
    }
    for (int m = 0; m < M; m++) _mm256_storeu_ps(y + m * N + tile * 8, acc[m]);
}

/* int8 weights in tiles of 8 rows [N/8, 8K]: byte 4r + j of step s is row r's value 4s + j. As for 4-bit
 * tiles, each row's sums stay in their own lane and each thread reads one sequential stream; |x| meets the
 * weights with x's signs as in block(). */
static inline __attribute__((always_inline)) void tile8(Quantized in, const int8_t *w, const float *scales,
                                                        float *y, int64_t K, int64_t N, int64_t tile, const int M) {
    const int8_t *wt = w + tile * 8 * K;
    __m256 acc[4];
    for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < in.blocks; b++) {
        __m256i s32[4];
#ifdef __AVX512BW__
        /* two steps per 64-byte load (lanes 0-7 step s, 8-15 step s + 1). With VNNI, whose vpdpbusd sums in
         * int32 (no int16 pairs to overflow), x + 128 (x with its sign bit flipped) meets the signed weights
         * and 128 times the weights' own sums (a vpdpbusd against ones, shared by every row) comes off at the
         * end of the block. Without it, as AVX-512 has no vpsignb, the weights take x's signs by a masked
         * negation and meet |x|. */
        const __m512i pick = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        __m512i wide[4];
        for (int m = 0; m < M; m++) wide[m] = _mm512_setzero_si512();
#ifdef __AVX512VNNI__
        const __m128i flip = _mm_set1_epi8((char)0x80);
        const __m512i one_bytes = _mm512_set1_epi8(1);
        __m512i weight_sums = _mm512_setzero_si512();
#endif
        for (int s = 0; s < QB / 4; s += 2) {
            int64_t step = b * (QB / 4) + s;
            const int8_t *p = wt + step * 32;
            _mm_prefetch((const char *)(p + 1024), _MM_HINT_T0);
            __m512i raw = _mm512_loadu_si512((const void *)p);
#ifdef __AVX512VNNI__
            weight_sums = dot4(weight_sums, one_bytes, raw);
            for (int m = 0; m < M; m++) {
                __m128i a8 = _mm_loadl_epi64((const __m128i *)(in.q + m * K + step * 4));
                __m512i biased = _mm512_permutexvar_epi32(pick, _mm512_castsi128_si512(_mm_xor_si128(a8, flip)));
                wide[m] = dot4(wide[m], biased, raw);
            }
#else
            for (int m = 0; m < M; m++) {
                __m128i a8 = _mm_loadl_epi64((const __m128i *)(in.q + m * K + step * 4));
                __m128i u8 = _mm_loadl_epi64((const __m128i *)(in.u + m * K + step * 4));
                __m512i a = _mm512_permutexvar_epi32(pick, _mm512_castsi128_si512(a8));
                __m512i u = _mm512_permutexvar_epi32(pick, _mm512_castsi128_si512(u8));
                __m512i signed_w = _mm512_mask_sub_epi8(raw, _mm512_movepi8_mask(a), _mm512_setzero_si512(), raw);
                wide[m] = dot4(wide[m], u, signed_w);
            }
#endif
        }
#ifdef __AVX512VNNI__
        for (int m = 0; m < M; m++) wide[m] = _mm512_sub_epi32(wide[m], _mm512_slli_epi32(weight_sums, 7));
#endif
        for (int m = 0; m < M; m++) s32[m] = fold(wide[m]);
#else
        const __m256i ones = _mm256_set1_epi16(1);
        for (int m = 0; m < M; m++) s32[m] = _mm256_setzero_si256();
        for (int s = 0; s < QB / 4; s++) {
            int64_t step = b * (QB / 4) + s;
            const int8_t *p = wt + step * 32;
            if (s % 2 == 0) _mm_prefetch((const char *)(p + 1024), _MM_HINT_T0);
            __m256i raw = _mm256_loadu_si256((const __m256i *)p);
            for (int m = 0; m < M; m++) {
                int32_t a0, u0;
                memcpy(&a0, in.q + m * K + step * 4, 4);
                memcpy(&u0, in.u + m * K + step * 4, 4);
                __m256i pr = _mm256_maddubs_epi16(_mm256_set1_epi32(u0), _mm256_sign_epi8(raw, _mm256_set1_epi32(a0)));
                s32[m] = _mm256_add_epi32(s32[m], _mm256_madd_epi16(pr, ones));
            }
        }
#endif
        for (int m = 0; m < M; m++)
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[m]), _mm256_set1_ps(in.d[m * in.blocks + b]), acc[m]);
    }
    __m256 sc = _mm256_loadu_ps(scales + tile * 8);
    for (int m = 0; m < M; m++) _mm256_storeu_ps(y + m * N + tile * 8, _mm256_mul_ps(acc[m], sc));
}

/* one tile of 8 output rows after another, the tiles split evenly between the threads; each tile meets up to
 * 8 input rows at once for 4-bit weights (their unpacking is shared) and 4 for int8 (more spill registers) */
static inline __attribute__((always_inline)) void linear_tiled(const float *x, const void *w, const void *sm, float *y,
                                                               int64_t M, int64_t K, int64_t N, int64_t group,
                                                               int threads, const int kind) {
    Quantized in = quantize_rows(x, M, K, threads);
    const int64_t step = kind == INT8 ? 4 : 8;
    #pragma omp parallel num_threads(threads)
    {
        int64_t t0, t1;
        thread_share(N / 8, &t0, &t1);
        for (int64_t tile = t0; tile < t1; tile++)
            for (int64_t m0 = 0; m0 < M; m0 += step) {
                Quantized part = {in.q + m0 * K, in.u + m0 * K, in.d + m0 * in.blocks, in.sums + m0 * in.blocks,
                                  in.blocks};
                float *ym = y + m0 * N;
                int64_t rows = M - m0 < step ? M - m0 : step;
#define T8(M_) tile8(part, w, sm, ym, K, N, tile, M_)
#define T4(M_) tile4(part, w, sm, ym, K, N, tile, group, M_)
                if (kind == INT8) {
                    switch (rows) {
                        case 1: T8(1); break;
                        case 2: T8(2); break;
                        case 3: T8(3); break;
                        default: T8(4); break;
                    }
                } else {
                    switch (rows) {
                        case 1: T4(1); break;
                        case 2: T4(2); break;
                        case 3: T4(3); break;
                        case 4: T4(4); break;
                        case 5: T4(5); break;
                        case 6: T4(6); break;
                        case 7: T4(7); break;
                        default: T4(8); break;
                    }
                }
#undef T8
#undef T4
            }
    }
}

/* bf16 weights packed for batches and prompts (kataru.kernels.pack_bf16): panels of 16 output rows, [N/16, K, 16],
 * the 32-bit lane i of a panel's step k holding row i's weight k in its low and row i + 8's in its high half.
 * A shift and an AND make float32 vectors of the 8 + 8 rows' weights at k, and each meets the values x[m, k] of
 * MR input rows broadcast, so a weight is converted once per MR rows and read from memory once per call (a
 * chunk of PK steps of one or two panels stays in L1 while every group of rows passes over it). The last group
 * over a chunk also asks for the panel's next chunk (one cache line every two steps): the first group would
 * otherwise wait on memory while the others compute from L1 (paired runs: +6-17% at 16-128 rows, no clear
 * change at 1 and 8). Every output is one chain of FMAs in k order, whatever the number of rows, their grouping
 * or the thread: a row gets the same bits alone or batched. */
#ifndef PK
#define PK 512
#endif

/* MR input rows against NP panels from column n, steps [k0, k1) (y holds the sums of the steps before k0);
 * AHEAD: prefetch the chunk after this one */
static inline __attribute__((always_inline)) void panel(const float *x, const uint16_t *p, float *y, int64_t K,
                                                        int64_t N, int64_t n, int64_t k0, int64_t k1, const int MR,
                                                        const int NP, const int AHEAD) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000);
    __m256 lo[6][2], hi[6][2]; /* sums of the panel's rows 0-7 and 8-15 */
    for (int m = 0; m < MR; m++)
        for (int j = 0; j < NP; j++) {
            float *out = y + m * N + n + 16 * j;
            lo[m][j] = k0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(out);
            hi[m][j] = k0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(out + 8);
        }
    const uint16_t *w = p + (n / 16) * K * 16;
    for (int64_t k = k0; k < k1; k++)
        for (int j = 0; j < NP; j++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + (j * K + k) * 16));
            if (AHEAD && !(k & 1)) /* past the panel's end: the next panel's start, never a fault */
                _mm_prefetch((const char *)(w + (j * K + k + PK) * 16), _MM_HINT_T0);
            __m256 wl = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
            __m256 wh = _mm256_castsi256_ps(_mm256_and_si256(v, high));
            for (int m = 0; m < MR; m++) {
                __m256 xv = _mm256_broadcast_ss(x + m * K + k);
                lo[m][j] = _mm256_fmadd_ps(wl, xv, lo[m][j]);
                hi[m][j] = _mm256_fmadd_ps(wh, xv, hi[m][j]);
            }
        }
    for (int m = 0; m < MR; m++)
        for (int j = 0; j < NP; j++) {
            _mm256_storeu_ps(y + m * N + n + 16 * j, lo[m][j]);
            _mm256_storeu_ps(y + m * N + n + 16 * j + 8, hi[m][j]);
        }
}

/* a group of mr <= 6 rows against panels [q, q + np) (np <= 2): up to 12 accumulators, so that enough
 * independent FMA chains hide their latency (three rows or fewer take two panels at once) */
static inline void panel_group(const float *x, const uint16_t *p, float *y, int64_t K, int64_t N, int64_t q,
                               int np, int64_t k0, int64_t k1, int mr, int ahead) {
#define P(MR_, NP_)                                                  \
    (ahead ? panel(x, p, y, K, N, (q + j) * 16, k0, k1, MR_, NP_, 1) \
           : panel(x, p, y, K, N, (q + j) * 16, k0, k1, MR_, NP_, 0))
    if (mr <= 2 && np == 2) {
        const int64_t j = 0;
        if (mr == 1)
            P(1, 2);
        else
            P(2, 2);
        return;
    }
    for (int64_t j = 0; j < np; j++) switch (mr) {
            case 1: P(1, 1); break;
            case 2: P(2, 1); break;
            case 3: P(3, 1); break;
            case 4: P(4, 1); break;
            case 5: P(5, 1); break;
            default: P(6, 1); break;
        }
#undef P
}

#ifdef __AVX512BF16__
/* The same panels with AVX512-BF16 (the AVX-512 build, where the CPU has it): a panel's steps k and k + 1 are
 * one cache line, which one vpermw turns into the 16 rows' pairs of weights (k, k + 1), each pair in the lane
 * of its row; vdpbf16ps adds both products of a pair to the row's sum against the input pair (x[m, k],
 * x[m, k + 1]) in bf16, broadcast. Two products per lane and instruction, no conversion of the weights: twice
 * the multiply-adds of the float32 FMAs where the CPU runs both at one rate (Zen 4). The input meets the
 * weights rounded to bf16 (bf16 activations as they are); each output is still one chain in k order, the
 * same bits at any row count. Groups of up to 8 rows against 2 panels: 16 independent sums. */
#define DR 8 /* rows per group */
static const uint16_t PAIRS[32] = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30,
                                   1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};

static inline __attribute__((always_inline)) void panel_dp(const uint16_t *xh, const uint16_t *p, float *y, int64_t K,
                                                           int64_t N, int64_t n, int64_t k0, int64_t k1, const int MR,
                                                           const int NP, const int AHEAD) {
    const __m512i order = _mm512_loadu_si512((const void *)PAIRS);
    __m512 acc[DR][2];
    for (int m = 0; m < MR; m++)
        for (int j = 0; j < NP; j++)
            acc[m][j] = k0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(y + m * N + n + 16 * j);
    const uint16_t *w = p + (n / 16) * K * 16;
    int64_t k = k0;
    for (; k + 2 <= k1; k += 2)
        for (int j = 0; j < NP; j++) {
            __m512i v = _mm512_loadu_si512((const void *)(w + (j * K + k) * 16));
            if (AHEAD) _mm_prefetch((const char *)(w + (j * K + k + PK) * 16), _MM_HINT_T0);
            __m512bh wv = (__m512bh)_mm512_permutexvar_epi16(order, v);
            for (int m = 0; m < MR; m++) {
                int32_t pair;
                memcpy(&pair, xh + m * K + k, sizeof pair);
                acc[m][j] = _mm512_dpbf16_ps(acc[m][j], wv, (__m512bh)_mm512_set1_epi32(pair));
            }
        }
    if (k < k1) /* an odd K's last step, paired with zeros */
        for (int j = 0; j < NP; j++) {
            __m512i v = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(w + (j * K + k) * 16)));
            __m512bh wv = (__m512bh)_mm512_permutexvar_epi16(order, v);
            for (int m = 0; m < MR; m++)
                acc[m][j] = _mm512_dpbf16_ps(acc[m][j], wv, (__m512bh)_mm512_set1_epi32(xh[m * K + k]));
        }
    for (int m = 0; m < MR; m++)
        for (int j = 0; j < NP; j++) _mm512_storeu_ps(y + m * N + n + 16 * j, acc[m][j]);
}

static inline void panel_group_dp(const uint16_t *xh, const uint16_t *p, float *y, int64_t K, int64_t N, int64_t q,
                                  int np, int64_t k0, int64_t k1, int mr, int ahead) {
#define P(MR_, NP_)                                                      \
    (ahead ? panel_dp(xh, p, y, K, N, q * 16, k0, k1, MR_, NP_, 1)       \
           : panel_dp(xh, p, y, K, N, q * 16, k0, k1, MR_, NP_, 0))
#define BY_ROWS(NP_)                   \
    switch (mr) {                      \
        case 1: P(1, NP_); break;      \
        case 2: P(2, NP_); break;      \
        case 3: P(3, NP_); break;      \
        case 4: P(4, NP_); break;      \
        case 5: P(5, NP_); break;      \
        case 6: P(6, NP_); break;      \
        case 7: P(7, NP_); break;      \
        default: P(8, NP_); break;     \
    }
    if (np == 2) {
        BY_ROWS(2)
    } else {
        BY_ROWS(1)
    }
#undef BY_ROWS
#undef P
}

#endif

/* Every thread's panels, two at a time, in chunks of PK steps, each chunk passed over by the input rows in groups
 * of at most GR spread evenly (8 rows over groups of 6 are 4 + 4, not 6 + 2): x float32 for `panel`, or bf16 for
 * `panel_dp` (DP). */
static inline __attribute__((always_inline)) void over_panels(const void *x, const uint16_t *p, float *y, int64_t M,
                                                              int64_t K, int64_t N, int threads, const int GR,
                                                              const int DP) {
    (void)DP; /* read by the AVX512-BF16 build only */
    const int64_t groups = (M + GR - 1) / GR;
    #pragma omp parallel num_threads(threads)
    {
        int64_t q0, q1;
        thread_share(N / 16, &q0, &q1);
        for (int64_t q = q0; q < q1; q += 2) {
            int np = q + 2 <= q1 ? 2 : 1;
            for (int64_t k0 = 0; k0 < K; k0 += PK) {
                int64_t k1 = k0 + PK < K ? k0 + PK : K;
                for (int64_t g = 0, m0 = 0; g < groups; g++) {
                    int mr = (int)(M / groups + (g < M % groups));
#ifdef __AVX512BF16__
                    if (DP)
                        panel_group_dp((const uint16_t *)x + m0 * K, p, y + m0 * N, K, N, q, np, k0, k1, mr,
                                       g == groups - 1);
                    else
#endif
                        panel_group((const float *)x + m0 * K, p, y + m0 * N, K, N, q, np, k0, k1, mr,
                                    g == groups - 1);
                    m0 += mr;
                }
            }
        }
    }
}

/* Inputs and outputs are float32 or bf16 (act_bf16), the model's activations, so that a call needs no
 * conversion around it. bf16 inputs are widened once into a per-thread buffer; the kernels sum into float32
 * and the result, plus the bias (in the activation type, or none), is rounded once to the activation type. */
typedef struct { const float *x; float *y; } Io;
static __thread float *scratch_io;
static __thread int64_t scratch_io_cap;

static Io begin(const void *x, void *y, int64_t M, int64_t K, int64_t N, int act_bf16, int threads) {
    if (!act_bf16) return (Io){x, y};
    if (M * (K + N) > scratch_io_cap) {
        free(scratch_io);
        scratch_io_cap = M * (K + N);
        scratch_io = malloc(scratch_io_cap * sizeof(float));
    }
    const uint16_t *xh = x;
    float *xf = scratch_io;
    #pragma omp parallel for num_threads(threads) if (M * K >= PARALLEL_MIN)
    for (int64_t m = 0; m < M; m++) {
        int64_t i = m * K;
        for (; i + 8 <= (m + 1) * K; i += 8) _mm256_storeu_ps(xf + i, load8(xh, i));
        for (; i < (m + 1) * K; i++) xf[i] = bf16_to_float(xh[i]);
    }
    return (Io){scratch_io, scratch_io + M * K};
}

static void end(Io io, const void *bias, void *y, int64_t M, int64_t N, int act_bf16, int threads) {
    if (!act_bf16 && !bias) return;
    #pragma omp parallel for num_threads(threads) if (M * N >= PARALLEL_MIN)
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            float v = io.y[m * N + n];
            store1(y, m * N + n, bias ? v + load1(bias, n, act_bf16) : v, act_bf16);
        }
}

void kataru_linear_bf16(const void *x, const uint16_t *w, const void *bias, void *y, int64_t M, int64_t K, int64_t N,
                        int act_bf16, int threads) {
    Io io = begin(x, y, M, K, N, act_bf16, threads);
    linear(io.x, w, 0, io.y, M, K, N, threads, BF16);
    end(io, bias, y, M, N, act_bf16, threads);
}

void kataru_linear_f16(const void *x, const uint16_t *w, const void *bias, void *y, int64_t M, int64_t K, int64_t N,
                       int act_bf16, int threads) {
    Io io = begin(x, y, M, K, N, act_bf16, threads);
    linear(io.x, w, 0, io.y, M, K, N, threads, F16);
    end(io, bias, y, M, N, act_bf16, threads);
}

/* w int8 [N, K] with float32 scales [N] */
void kataru_linear_int8(const void *x, const int8_t *w, const float *scales, const void *bias, void *y, int64_t M,
                        int64_t K, int64_t N, int act_bf16, int threads) {
    Io io = begin(x, y, M, K, N, act_bf16, threads);
    linear(io.x, w, scales, io.y, M, K, N, threads, INT8);
    end(io, bias, y, M, N, act_bf16, threads);
}

/* w 4-bit in tiles of 8 rows [N/8, 4K] (N % 8 == 0, K % QB == 0), scale_min bf16 [N/8, K/group, 2, 8]
 * (group % QB == 0) */
void kataru_linear_int4(const void *x, const uint8_t *w, const uint16_t *scale_min, const void *bias, void *y,
                        int64_t M, int64_t K, int64_t N, int64_t group, int act_bf16, int threads) {
    Io io = begin(x, y, M, K, N, act_bf16, threads);
    linear_tiled(io.x, w, scale_min, io.y, M, K, N, group, threads, INT4);
    end(io, bias, y, M, N, act_bf16, threads);
}

/* w int8 in tiles of 8 rows [N/8, 8K] (N % 8 == 0, K % QB == 0) with float32 scales [N] */
void kataru_linear_int8_tiled(const void *x, const int8_t *w, const float *scales, const void *bias, void *y,
                              int64_t M, int64_t K, int64_t N, int act_bf16, int threads) {
    Io io = begin(x, y, M, K, N, act_bf16, threads);
    linear_tiled(io.x, w, scales, io.y, M, K, N, 0, threads, INT8);
    end(io, bias, y, M, N, act_bf16, threads);
}

/* w bf16 packed in panels of 16 rows [N/16, K, 16] (N % 16 == 0; kataru.kernels.pack_bf16) */
void kataru_linear_bf16_packed(const void *x, const uint16_t *w, const void *bias, void *y, int64_t M, int64_t K,
                               int64_t N, int act_bf16, int threads) {
#ifdef __AVX512BF16__
    const uint16_t *xh = x; /* bf16 activations go in as they are; float32 ones rounded first */
    if (!act_bf16) bf16_rows(x, M * K, threads, 0, &xh);
    Io io = begin(0, y, M, 0, N, act_bf16, threads); /* only the float32 output */
    over_panels(xh, w, io.y, M, K, N, threads, DR, 1);
#else
    Io io = begin(x, y, M, K, N, act_bf16, threads);
    over_panels(io.x, w, io.y, M, K, N, threads, 6, 0);
#endif
    end(io, bias, y, M, N, act_bf16, threads);
}

/* what this build's matmuls use beyond its base instruction set (kataru.kernels.extensions): 1 VNNI's vpdpbusd,
 * 2 AVX512-BF16's vdpbf16ps */
int kataru_extensions(void) {
    int bits = 0;
#ifdef __AVX512VNNI__
    bits |= 1;
#endif
#ifdef __AVX512BF16__
    bits |= 2;
#endif
    return bits;
}
