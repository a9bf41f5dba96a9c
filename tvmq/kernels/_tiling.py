"""Padding and weight-packing arithmetic shared by tvmq's kernels."""

from __future__ import annotations

import numpy as np
import tvm

DEFAULT_SCHEDULE_ROWS = 4
"""Rows of accumulators :class:`tvmq.cpu_schedule.CPUDefaultSchedule` keeps in registers
(kernel passes leave shapes that tile into them to that schedule)."""


HALF_WIDTH_AVX512_CPUS = frozenset({"znver4"})
"""LLVM CPU names that run each 512-bit instruction as two 256-bit halves (AMD Zen 4): one
zmm FMA or ``vpdpbusd`` a cycle, and a 32 KB L1 data cache. Kernels tuned on Intel cores
(two 512-bit FMA ports, 48 KB L1) choose differently there."""


HALF_WIDTH_ACCUMULATORS = 14
"""Register-tile accumulators the fp32 and VNNI kernels keep at most on those CPUs: tiles of
16 or more zmm accumulators ran 3-30% slower there than 14-accumulator ones (1 thread, warm;
fp32 1x1 1024->256 over 14x14 86 -> 114 GFLOP/s at 7x2 instead of 14x2)."""


def half_width_avx512(target: tvm.target.Target | None = None) -> bool:
    """Whether ``target`` (None: the current target, if any) names a CPU of
    :data:`HALF_WIDTH_AVX512_CPUS`."""
    if target is None:
        target = tvm.target.Target.current(allow_none=True)
    return target is not None and target.attrs.get("mcpu") in HALF_WIDTH_AVX512_CPUS


def simd_bits(target: tvm.target.Target | None) -> int:
    """Bits of one SIMD register of an LLVM CPU target; 0 for none (or not an LLVM target).

    Not TVM 0.27's ``llvm_get_vector_width`` alone: it answers 512 for every x86 CPU, the
    AVX2-only ones (``haswell``, ``znver1``-``znver3``) included. Kernels sized from it
    there got 16-lane vectors that LLVM splits into pairs of ymm registers, and register
    tiles for 32 registers in 16: ResNet-18's 3x3 convs spilled their accumulators to the
    stack every multiply-add (17 GFLOP/s of a measured 39 on a Zen 1 core). x86 is read
    from the target's features instead: 512 with avx512f, 256 with avx, else 128.
    """
    from tvm.target.codegen import llvm_get_vector_width, target_has_features

    if target is None or target.kind.name != "llvm":
        return 0
    try:
        if target_has_features("sse2", target):
            if target_has_features("avx512f", target):
                return 512
            return 256 if target_has_features("avx", target) else 128
        return max(0, int(llvm_get_vector_width(target)))
    except (RuntimeError, ValueError):  # TVM's errors (tvm.error has no TVMError in 0.27)
        return 0


def target_cores(target: tvm.target.Target | None = None) -> int:
    """The ``num-cores`` of ``target`` (default: the current target), 1 where it names none:
    how many threads the built kernels will be run with by default."""
    target = target or tvm.target.Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return 1
    return max(1, int(target.attrs.get("num-cores", 1)))


def round_up(x: int, m: int) -> int:
    """The smallest multiple of ``m`` that is ``>= x``."""
    return -(-x // m) * m


def pack_int8_tiles(w: np.ndarray, lanes: int, reduce: int) -> np.ndarray:
    """Pack an int8 ``(K, N)`` weight as ``[N/lanes, K/reduce, lanes, reduce]``.

    K and N are zero-padded to multiples of ``reduce`` / ``lanes``;
    ``packed[j, q, i, r] == w[reduce * q + r, lanes * j + i]`` (zero outside ``w``), so each
    ``lanes x reduce`` tile a dot-product instruction reads is contiguous.
    """
    if w.ndim != 2 or w.dtype != np.int8:
        raise ValueError(f"expected an int8 (K, N) weight, got {w.dtype} {w.shape}")
    k, n = w.shape
    kp, np_ = round_up(k, reduce), round_up(n, lanes)
    padded = np.zeros((kp, np_), dtype=np.int8)
    padded[:k, :n] = w
    packed = padded.reshape(kp // reduce, reduce, np_ // lanes, lanes).transpose(2, 0, 3, 1)
    return np.ascontiguousarray(packed)
