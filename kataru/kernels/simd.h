/* Helpers the kernels share: bf16 loads and stores, horizontal reductions, each OpenMP thread's share of a
 * range. */
#pragma once
#include <immintrin.h>
#include <stdint.h>

static inline float bf16_to_float(uint16_t v) {
    union { uint32_t i; float f; } c;
    c.i = (uint32_t)v << 16;
    return c.f;
}

/* float32 to bf16, rounding to nearest even as torch does (NaN to torch's quiet NaN) */
static inline uint16_t float_to_bf16(float f) {
    union { float f; uint32_t i; } c = {f};
    if ((c.i & 0x7fffffff) > 0x7f800000) return 0x7fc0;
    return (uint16_t)((c.i + 0x7fff + ((c.i >> 16) & 1)) >> 16);
}

/* element i of a bf16 (bf16 != 0) or float32 array, as float32; and the store back */
static inline float load1(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store1(void *p, int64_t i, float x, int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = float_to_bf16(x);
    else
        ((float *)p)[i] = x;
}

/* eight bf16 values at element offset i, as float32 */
static inline __m256 load8(const uint16_t *w, int64_t i) {
    __m128i h = _mm_loadu_si128((const __m128i *)(w + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* eight fp16 values at element offset i, as float32 (F16C) */
static inline __m256 load8_f16(const uint16_t *w, int64_t i) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i)));
}

/* eight values at element offset i of a bf16 (bf16 != 0) or float32 array, as float32 */
static inline __m256 load8_of(const void *p, int64_t i, int bf16) {
    return bf16 ? load8((const uint16_t *)p, i) : _mm256_loadu_ps((const float *)p + i);
}

/* eight float32 values rounded to bf16 (to nearest even, as float_to_bf16; NaN to torch's quiet NaN): the
 * bf16 bit patterns, one in the low half of each 32-bit lane */
static inline __m256i bf16_bits8(__m256 x) {
    __m256i b = _mm256_castps_si256(x);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
}

/* the same values rounded to bf16, as float32 */
static inline __m256 round8_bf16(__m256 x) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(x), 16));
}

/* eight float32 values stored at element offset i of a bf16 (bf16 != 0, rounded) or float32 array */
static inline void store8_of(void *p, int64_t i, __m256 x, int bf16) {
    if (!bf16) {
        _mm256_storeu_ps((float *)p + i, x);
        return;
    }
    __m256i r = bf16_bits8(x);
    r = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08); /* lanes 0-3 and 4-7 in the low half */
    _mm_storeu_si128((__m128i *)((uint16_t *)p + i), _mm256_castsi256_si128(r));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* [*first, *end): the calling thread's contiguous share of count items, inside an OpenMP parallel region */
static inline void thread_share(int64_t count, int64_t *first, int64_t *end) {
    int64_t t = 0, T = 1;
#ifdef _OPENMP
    extern int omp_get_thread_num(void);
    extern int omp_get_num_threads(void);
    t = omp_get_thread_num();
    T = omp_get_num_threads();
#endif
    int64_t chunk = (count + T - 1) / T;
    *first = t * chunk < count ? t * chunk : count;
    *end = *first + chunk < count ? *first + chunk : count;
}
