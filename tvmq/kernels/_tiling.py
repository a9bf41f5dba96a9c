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
