/* Measured per-core peak of this CPU for bench_peers' "% peak" column.
 *
 * Register-only loops of 24 independent accumulators (enough to hide each instruction's
 * latency), 512-bit: vfmadd231ps (fp32: 16 lanes x 2 ops) and vpdpbusd (int8 VNNI: 64
 * multiply-adds x 2 ops). Prints "fp32 <GOP/s> int8 <GOP/s>", the best of 5 runs.
 * Built by bench_peers.py with: cc -O2 -mavx512f -mavx512vnni cpu_peak.c
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define ACC 24
#define ITERS 4000000L

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static double fp32_gops(void) {
    __m512 acc[ACC], a = _mm512_set1_ps(1.0001f), b = _mm512_set1_ps(-0.0001f);
    for (int i = 0; i < ACC; i++) acc[i] = _mm512_set1_ps((float)i);
    double t = now();
    for (long it = 0; it < ITERS; it++) {
#pragma GCC unroll 24
        for (int i = 0; i < ACC; i++) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
        __asm__ volatile("" : "+v"(a)); /* keep the loop */
    }
    t = now() - t;
    float sink = 0;
    for (int i = 0; i < ACC; i++) sink += _mm512_reduce_add_ps(acc[i]);
    if (sink == 1234.5f) puts("");
    return (double)ITERS * ACC * 16 * 2 / t / 1e9;
}

static double int8_gops(void) {
    __m512i acc[ACC], a = _mm512_set1_epi32(0x01020304), b = _mm512_set1_epi32(0x01ff01ff);
    for (int i = 0; i < ACC; i++) acc[i] = _mm512_set1_epi32(i);
    double t = now();
    for (long it = 0; it < ITERS; it++) {
#pragma GCC unroll 24
        for (int i = 0; i < ACC; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
        __asm__ volatile("" : "+v"(a));
    }
    t = now() - t;
    int sink = 0;
    for (int i = 0; i < ACC; i++) sink += _mm512_reduce_add_epi32(acc[i]);
    if (sink == 1234567) puts("");
    return (double)ITERS * ACC * 64 * 2 / t / 1e9;
}

int main(void) {
    double fp32 = 0, int8 = 0;
    for (int r = 0; r < 5; r++) {
        double f = fp32_gops(), q = int8_gops();
        if (f > fp32) fp32 = f;
        if (q > int8) int8 = q;
    }
    printf("fp32 %.1f int8 %.1f\n", fp32, int8);
    return 0;
}
