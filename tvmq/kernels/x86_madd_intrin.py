"""An AVX2 ``vpmaddwd`` tensor intrinsic: exact int16 pair products summed into int32 lanes.

``C[8] += sum_k A[2] (int16) * B[8, 2] (int16)`` in int32, one ``vpmaddwd`` and one
``vpaddd`` on 256-bit registers: lane ``i`` of ``C`` gets the dot product of the two values
of ``A`` with row ``i`` of ``B``. ``B`` must be one contiguous 32-byte tile, so a weight is
packed as ``[..., K/2, 8, 2]`` before tensorizing against it.

Why int16 and not the byte instruction ``vpmaddubsw``: that one sums each pair of uint8 x
int8 products into a *saturating* int16 (255 * 127 * 2 overflows it), so an AVX2 int8 kernel
built on it is exact only for 7-bit operands. Bytes widened to int16 multiply exactly, and
``vpmaddwd`` takes 16 multiply-adds an instruction where ``vfmadd231ps`` takes 8: on an AMD
Zen 3 core (``bench/cpu_peak.c``-style register loops) 80 G multiply-adds a second against
50 for float32 FMAs.

Kernels call :func:`register_madd_intrin` when they tensorize (parsing TVMScript costs
about a second, too much for every ``import tvmq``).
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

MADD_8X2 = "tvmq_madd_8x2_avx2"
"""Name of the registered ``int16 x int16 -> int32`` 8x2 ``vpmaddwd`` tensor intrinsic."""

LANES = 8
"""Output lanes (int32) per intrinsic call: the N tile of the packed weight."""

PAIR = 2
"""Values reduced per lane per call: the K tile of the packed weight."""


def _madd_funcs():
    @T.prim_func(s_tir=True)
    def _madd_8x2_desc(
        A: T.Buffer((2,), "int16", offset_factor=1),
        B: T.Buffer((8, 2), "int16", offset_factor=1),
        C: T.Buffer((8,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:2], B[0:8, 0:2])
            T.writes(C[0:8])
            for i, k in T.grid(8, 2):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vi, vk])

    @T.prim_func(s_tir=True)
    def _madd_8x2_impl(
        A: T.Buffer((2,), "int16", offset_factor=1),
        B: T.Buffer((8, 2), "int16", offset_factor=1),
        C: T.Buffer((8,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:2], B[0:8, 0:2])
            T.writes(C[0:8])
            # The two activation values as one int32, broadcast to all 8 lanes, seen as 16
            # int16. One expression (no let): see vnni_intrin's note on parallel loops.
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], "int32x8") + T.call_llvm_pure_intrin(
                "int32x8",
                "llvm.x86.avx2.pmadd.wd",
                T.reinterpret(
                    "int16x16", T.broadcast(T.reinterpret("int32", A.vload([0], "int16x2")), 8)
                ),
                B.vload([0, 0], "int16x16"),
            )

    return _madd_8x2_desc, _madd_8x2_impl


def register_madd_intrin() -> str:
    """Register :data:`MADD_8X2` if it is not registered yet; return its name."""
    if TensorIntrin.get(MADD_8X2, allow_missing=True) is None:
        TensorIntrin.register(MADD_8X2, *_madd_funcs())
    return MADD_8X2
