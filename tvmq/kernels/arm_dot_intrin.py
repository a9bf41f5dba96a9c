"""AArch64 int8 dot-product tensor intrinsics: ``sdot`` (dotprod) and a plain-NEON equivalent.

Both compute ``C[4] += sum_k A[4] (int8) * B[4, 4] (int8)`` in int32: lane ``i`` of ``C``
gets the dot product of the four bytes of ``A`` with row ``i`` of ``B``. ``B`` is one
contiguous 16-byte tile (one q register), so a matmul weight is packed as
``[N/4, K/4, 4, 4]`` before tensorizing against it.

- :data:`SDOT_4X4` (needs ``+dotprod``, Cortex-A76/A78/A55 and later): the four activation
  bytes broadcast to all lanes, one ``llvm.aarch64.neon.sdot.v4i32.v16i8``
  (``(<4 x i32>, <16 x i8>, <16 x i8>)`` in LLVM 22).
- :data:`NEON_4X4` (any AArch64, e.g. Cortex-A72 of a Raspberry Pi 4): two widening
  multiplies ``smull`` (rows 0-1 and 2-3), two pairwise widening adds ``saddlp`` and one
  ``addp`` fold the 16 products into the four lanes. About 5 instructions for what
  ``sdot`` does in one, still about twice the work per instruction of a vectorized
  int32 multiply-add.

``sdot`` is signed x signed: uint8 activations must be shifted to int8 first (see
:class:`tvmq.passes.PackInt8DenseARM`). ``udot`` (u8 x u8) does not help with an int8
weight, and ``usdot`` (u8 x s8) needs ``+i8mm``, which the A76/A78 lack.

TVM ships equivalents in ``tvm.s_tir.tensor_intrin.arm_cpu``, but importing that module
registers every CUDA intrinsic too (tens of seconds), so tvmq declares its own. Importing
this module registers nothing: kernels call :func:`register_arm_intrins` when they tensorize
(TVMScript parsing is slow once torch is loaded; ``import tvmq.passes`` should not pay it).
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

SDOT_4X4 = "tvmq_dot_4x4_i8i8s32_sdot"
"""Name of the ``int8 x int8 -> int32`` 4x4 ``sdot`` tensor intrinsic (needs dotprod)."""

NEON_4X4 = "tvmq_dot_4x4_i8i8s32_neon"
"""Name of the same intrinsic built from ``smull`` / ``saddlp`` / ``addp`` (plain NEON)."""

LANES = 4
"""Output lanes (int32) per intrinsic call: the N tile of the packed weight."""

REDUCE = 4
"""Bytes reduced per lane per call: the K tile of the packed weight."""


def _arm_funcs():
    """The description and the sdot / NEON implementations (TVMScript, parsed on first use)."""

    @T.prim_func(s_tir=True)
    def _dot_4x4_desc(
        A: T.Buffer((4,), "int8", offset_factor=1),
        B: T.Buffer((4, 4), "int8", offset_factor=1),
        C: T.Buffer((4,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            for i, k in T.grid(4, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vi, vk])

    @T.prim_func(s_tir=True)
    def _dot_4x4_sdot_impl(
        A: T.Buffer((4,), "int8", offset_factor=1),
        B: T.Buffer((4, 4), "int8", offset_factor=1),
        C: T.Buffer((4,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            # The four activation bytes as one int32, broadcast to the four lanes, seen as 16 bytes.
            a_word = T.reinterpret("int32", A.vload([0], "int8x4"))
            a_i8x16 = T.reinterpret("int8x16", T.broadcast(a_word, 4))
            C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                "int32x4",
                "llvm.aarch64.neon.sdot.v4i32.v16i8",
                C.vload([0], "int32x4"),
                a_i8x16,
                B.vload([0, 0], "int8x16"),
            )

    @T.prim_func(s_tir=True)
    def _dot_4x4_neon_impl(
        A: T.Buffer((4,), "int8", offset_factor=1),
        B: T.Buffer((4, 4), "int8", offset_factor=1),
        C: T.Buffer((4,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            # A twice (8 bytes) against two weight rows at a time.
            a_word = T.reinterpret("int32", A.vload([0], "int8x4"))
            a_i8x8 = T.reinterpret("int8x8", T.broadcast(a_word, 2))
            b = B.vload([0, 0], "int8x16")
            # Rows 0-1: int16 products, then pairwise int32 sums -> [r0 k01, r0 k23, r1 k01, r1 k23].
            rows01 = T.call_llvm_pure_intrin(
                "int32x4",
                "llvm.aarch64.neon.saddlp.v4i32.v8i16",
                T.call_llvm_pure_intrin(
                    "int16x8", "llvm.aarch64.neon.smull.v8i16", a_i8x8, T.vectorlow("int8x8", b)
                ),
            )
            rows23 = T.call_llvm_pure_intrin(
                "int32x4",
                "llvm.aarch64.neon.saddlp.v4i32.v8i16",
                T.call_llvm_pure_intrin(
                    "int16x8", "llvm.aarch64.neon.smull.v8i16", a_i8x8, T.vectorhigh("int8x8", b)
                ),
            )
            # addp folds neighbouring pairs: [r0, r1, r2, r3].
            C[T.ramp(T.int32(0), 1, 4)] = C.vload([0], "int32x4") + T.call_llvm_pure_intrin(
                "int32x4", "llvm.aarch64.neon.addp.v4i32", rows01, rows23
            )

    return _dot_4x4_desc, _dot_4x4_sdot_impl, _dot_4x4_neon_impl


def register_arm_intrins() -> tuple[str, str]:
    """Register :data:`SDOT_4X4` and :data:`NEON_4X4` if not registered yet; return the names."""
    if any(TensorIntrin.get(n, allow_missing=True) is None for n in (SDOT_4X4, NEON_4X4)):
        desc, sdot, neon = _arm_funcs()
        for name, impl in ((SDOT_4X4, sdot), (NEON_4X4, neon)):
            if TensorIntrin.get(name, allow_missing=True) is None:
                TensorIntrin.register(name, desc, impl)
    return SDOT_4X4, NEON_4X4
