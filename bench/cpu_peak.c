/* Measured per-core peak of this CPU for bench_peers' "% peak" column.
 *
 * Register-only loops (inline assembly, so no compiler can spill or shuffle registers) of
 * independent SIMD instructions. Prints "fp32 <GOP/s> int8 <GOP/s>", best of 5.
 * - AVX-512 VNNI (cc -O2 cpu_peak.c): 24 independent 512-bit vfmadd231ps (fp32: 16 lanes x 2
 *   ops) and vpdpbusd (int8: 64 multiply-adds x 2 ops).
 * - AVX2 (cc -O2 -DAVX2 cpu_peak.c): 12 independent 256-bit vfmadd231ps (8 lanes x 2 ops);
 *   int8 as AVX2 libraries multiply bytes without VNNI: vpmaddubsw + vpmaddwd (by ones) +
 *   vpaddd, 32 multiply-adds per triple, 8 independent accumulators.
 */
#include <stdio.h>
#include <time.h>

#define ITERS 20000000L
#ifndef AVX2
#define R24(op)                                                                          \
    op(4) op(5) op(6) op(7) op(8) op(9) op(10) op(11) op(12) op(13) op(14) op(15) op(16) \
        op(17) op(18) op(19) op(20) op(21) op(22) op(23) op(24) op(25) op(26) op(27)
#define DPBUSD(i) "vpdpbusd %%zmm1, %%zmm2, %%zmm" #i "\n\t"
#define FMA(i) "vfmadd231ps %%zmm1, %%zmm2, %%zmm" #i "\n\t"
#define LOOP(body)                                                              \
    __asm__ volatile("vpxord %%zmm1, %%zmm1, %%zmm1\n\t"                        \
                     "vpxord %%zmm2, %%zmm2, %%zmm2\n\t"                        \
                     "mov %0, %%rcx\n"                                          \
                     "1:\n\t" R24(body) "dec %%rcx\n\t"                         \
                     "jnz 1b\n\t"                                               \
                     :                                                          \
                     : "r"(ITERS)                                               \
                     : "rcx", "xmm1", "xmm2", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", \
                       "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "memory")

#define FP32_OPS (24 * 16 * 2)
#define INT8_OPS (24 * 64 * 2)
#else
#define R12(op) op(4) op(5) op(6) op(7) op(8) op(9) op(10) op(11) op(12) op(13) op(14) op(15)
#define R8(op) op(8, 4) op(9, 5) op(10, 6) op(11, 7) op(12, 4) op(13, 5) op(14, 6) op(15, 7)
#define FMA(i) "vfmadd231ps %%ymm1, %%ymm2, %%ymm" #i "\n\t"
#define MADD(i, t)                                  \
    "vpmaddubsw %%ymm2, %%ymm1, %%ymm" #t "\n\t"    \
    "vpmaddwd %%ymm3, %%ymm" #t ", %%ymm" #t "\n\t" \
    "vpaddd %%ymm" #t ", %%ymm" #i ", %%ymm" #i "\n\t"
#define LOOP_N(body, unroll)                                                    \
    __asm__ volatile("vpxor %%ymm1, %%ymm1, %%ymm1\n\t"                         \
                     "vpxor %%ymm2, %%ymm2, %%ymm2\n\t"                         \
                     "vpxor %%ymm3, %%ymm3, %%ymm3\n\t"                         \
                     "mov %0, %%rcx\n"                                          \
                     "1:\n\t" unroll(body) "dec %%rcx\n\t"                     \
                     "jnz 1b\n\t"                                               \
                     :                                                          \
                     : "r"(ITERS)                                               \
                     : "rcx", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", \
                       "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "memory")
#define LOOP(body) LOOP_N(body, R12)
#define FP32_OPS (12 * 8 * 2)
#define INT8_OPS (8 * 32 * 2)
#endif

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static double fp32_gops(void) {
    double t = now();
    LOOP(FMA);
    return (double)ITERS * FP32_OPS / (now() - t) / 1e9;
}

static double int8_gops(void) {
    double t = now();
#ifdef AVX2
    LOOP_N(MADD, R8);
#else
    LOOP(DPBUSD);
#endif
    return (double)ITERS * INT8_OPS / (now() - t) / 1e9;
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
