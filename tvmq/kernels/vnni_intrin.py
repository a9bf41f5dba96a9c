"""A VNNI ``vpdpbusd`` tensor intrinsic that verifies under TVM 0.27's LLVM 22.

``C[16] += sum_k A[4] (uint8) * B[16, 4] (int8)`` in int32, one ``vpdpbusd`` on a
512-bit register: lane ``i`` of ``C`` gets the dot product of the four bytes of ``A``
with row ``i`` of ``B``. ``B`` must be one contiguous 64-byte tile, so a matmul weight
is packed as ``[N/16, K/4, 16, 4]`` before tensorizing against it.

Why not the upstream ``dot_16x4_vnni`` (``tvm.s_tir.tensor_intrin.x86``): its
implementation passes the operands to ``llvm.x86.avx512.vpdpbusd.512`` as ``int32x16``,
but LLVM 22 declares the intrinsic as ``(<16 x i32>, <64 x i8>, <64 x i8>)`` and the
module fails to verify. Here the operands are ``uint8x64`` / ``int8x64``. Importing the
upstream module also costs tens of seconds (it registers every CUDA intrinsic), so the
description is declared here as well.

Kernels call :func:`register_vnni_intrin` when they tensorize: parsing TVMScript costs about a
second per function once torch is loaded (the parser walks the call stack), too much to pay
on every ``import tvmq.passes``.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

VNNI_DOT_16X4 = "tvmq_dot_16x4_vnni"
"""Name of the registered ``uint8 x int8 -> int32`` 16x4 VNNI tensor intrinsic."""

LANES = 16
"""Output lanes (int32) per intrinsic call: the N tile of the packed weight."""

REDUCE = 4
"""Bytes reduced per lane per call: the K tile of the packed weight."""


VNNI_DOT_16X4_S8 = "tvmq_dot_16x4_vnni_s8"
"""The same for ``int8`` activations: ``C[i] += (int32(A[k]) + 128) * int32(B[i, k])``. The
activation bytes are flipped to uint8 (``a ^ 0x80``, one ``vpxord`` per broadcast) in
registers; the caller subtracts ``128 * colsum(B)`` again, so no shift op runs before."""

_FLIP = -2139062144  # 0x80808080 as an int32: four bytes a -> a + 128 (mod 256)


def _vnni_funcs(signed: bool):
    """The description and implementation (TVMScript, parsed on first registration) for
    uint8 activations, or int8 ones with ``signed``."""
    a_dtype = "int8" if signed else "uint8"
    a_vector = a_dtype + "x4"
    shift = 128 if signed else 0
    flip = _FLIP if signed else 0

    @T.prim_func(s_tir=True)
    def _dot_16x4_desc(
        A: T.Buffer((4,), a_dtype, offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            for i, k in T.grid(16, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    if signed:
                        C[vi] = C[vi] + (T.Cast("int32", A[vk]) + shift) * T.Cast(
                            "int32", B[vi, vk]
                        )
                    else:
                        C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vi, vk])

    @T.prim_func(s_tir=True)
    def _dot_16x4_vnni_impl(
        A: T.Buffer((4,), a_dtype, offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            # The four activation bytes as one int32, broadcast to all 16 lanes, seen as 64 bytes.
            # One expression: let-bound values inside a parallel loop become a heap-allocated
            # workspace per task (TVMBackendAllocWorkspace), which short-K kernels feel.
            # int8 activations: each byte flipped to uint8 (xor 0x80) by one scalar xor
            # before the broadcast; uint8 ones: xor 0, which LLVM drops.
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                "int32x16",
                "llvm.x86.avx512.vpdpbusd.512",
                C.vload([0], "int32x16"),
                T.reinterpret(
                    "uint8x64",
                    T.broadcast(
                        T.bitwise_xor(
                            T.reinterpret("int32", A.vload([0], a_vector)), T.int32(flip)
                        ),
                        16,
                    ),
                ),
                B.vload([0, 0], "int8x64"),
            )

    return _dot_16x4_desc, _dot_16x4_vnni_impl


def register_vnni_intrin(signed: bool = False) -> str:
    """Register :data:`VNNI_DOT_16X4` (with ``signed``: :data:`VNNI_DOT_16X4_S8`) if it is not
    registered yet; return its name."""
    name = VNNI_DOT_16X4_S8 if signed else VNNI_DOT_16X4
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, *_vnni_funcs(signed))
    return name
