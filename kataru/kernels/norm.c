/* RMSNorm for the few rows of a decode step (AVX2): in torch the norm is eight small operations per call,
 * each costing more to dispatch than to compute at one token (a third of what a 4-bit decode step spends
 * between its matmuls). Same arithmetic as `model.RMSNorm`: float32 mean of squares, 1 / sqrt(mean + eps),
 * x * that rounded to the activation type, times the weight rounded again. Only the order of the sum of
 * squares differs from torch's, so a result can differ from torch's by a rounding step, rarely. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "simd.h"

/* x, weight, out: [M, D] / [D] / [M, D] in the activation type (bf16 when act_bf16, else float32) */
void kataru_rms_norm(const void *x, const void *weight, void *out, int64_t M, int64_t D, float eps, int act_bf16) {
    for (int64_t m = 0; m < M; m++) {
        const int64_t row = m * D;
        __m256 acc = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= D; i += 8) {
            __m256 v = load8_of(x, row + i, act_bf16);
            acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v)); /* each square rounded, as torch's pow(2) */
        }
        float sum = hsum(acc);
        for (; i < D; i++) {
            float v = load1(x, row + i, act_bf16);
            sum += v * v;
        }
        float r = 1.0f / sqrtf(sum / (float)D + eps);
        for (i = 0; i + 8 <= D; i += 8) {
            __m256 n = _mm256_mul_ps(load8_of(x, row + i, act_bf16), _mm256_set1_ps(r));
            if (act_bf16) n = round8_bf16(n);
            store8_of(out, row + i, _mm256_mul_ps(load8_of(weight, i, act_bf16), n), act_bf16);
        }
        for (; i < D; i++) {
            float n = load1(x, row + i, act_bf16) * r;
            if (act_bf16) n = bf16_to_float(float_to_bf16(n)); /* torch rounds x * r to bf16 before the weight */
            store1(out, row + i, load1(weight, i, act_bf16) * n, act_bf16);
        }
    }
}
