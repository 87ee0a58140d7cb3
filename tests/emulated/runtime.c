/* What linear.c needs from a C library, for running it on an emulated CPU with nothing else: a bump
 * allocator in a static arena (the emulator maps the program's pages, nothing more), and the few libm
 * functions the compiler does not inline. Test-only: tests/emulated/__init__.py builds and runs it. */
#include <immintrin.h>
#include <stddef.h>

static _Alignas(64) unsigned char arena[8 << 20];
static size_t used;

void *malloc(size_t n) {
    void *p = arena + used;
    used += (n + 63) & ~(size_t)63;
    return used <= sizeof arena ? p : 0;
}

void free(void *p) { (void)p; } /* scratch buffers only grow, and each run is a fresh process image */

float fmaxf(float x, float y) { return x != x ? y : y != y ? x : x > y ? x : y; }

long lrintf(float x) { return _mm_cvtss_si32(_mm_set_ss(x)); } /* MXCSR's rounding: to nearest even */
