"""PackInt8DenseCUDA: int8 matmuls with a constant weight -> IMMA tensor cores (sm_80+) or dp4a.

On sm_80 and newer, int8 activations go to the tensor-core kernel
:func:`tvmq.kernels.cuda_mma.int8_dense_imma` (``ldmatrix`` + ``mma.sync.m16n8k32.s32.s8.s8.s32``,
weight packed as ``(N, K)``, static shapes); what it leaves (uint8 activations, symbolic row
counts) and every int8 matmul on sm_61-75 take the dp4a kernel described below.

Rewrites, on a CUDA target with ``dp4a`` (sm_61 or later)::

    y = R.matmul(x, W, out_dtype="int32")   # x: (..., K) int8 or uint8, static shape
                                            # W: (K, N) int8 relax.Constant

into a ``call_tir`` to :func:`tvmq.kernels.cuda_int8.int8_dense_dp4a` (a tiled,
shared-memory GEMM whose reduction is one ``__dp4a`` per 4 bytes) with ``W`` packed at
compile time as ``[K/4, N, 4]``, zero-padded to whole tiles. Around the call: leading
dimensions of ``x`` are flattened (``reshape``), ``M`` and ``K`` are padded with ``nn.pad``
(zeros: the padded weight rows are 0 too), and a ``strided_slice`` drops the padding of the
result.

Unsigned activations: ``dp4a.s32.s32`` multiplies signed bytes, so a uint8 ``x`` is shifted
to int8 (``x - 128``) before the kernel and the kernel adds the constant compensation
``+128 * colsum(W)`` (an int32 per column): the answer is the exact uint8 x int8 product.
Everything else (float matmuls, non-constant or non-int8 weights, batched weights, symbolic
shapes, other out dtypes, int8 ``conv2d``) is left alone and gets TVM's default lowering.

Where it belongs: after :class:`LowerInt8` and before ``LegalizeOps`` (it emits Relax ops
that still need legalizing, and ``LegalizeOps`` would otherwise lower the matmul itself),
i.e. first in ``tvmq.build``'s CUDA fusion phase. The kernels are marked
``tirx.is_scheduled``, so dlight / MetaSchedule keep their schedule. On a non-CUDA target or
a GPU older than sm_61 the module is returned unchanged; after a rewrite no int8 matmul is
left, so running the pass again changes nothing.
"""

from __future__ import annotations

import re

import tvm

from tvmq.kernels.cuda_int8 import (
    choose_cuda_tiles,
    int8_dense_dp4a,
    pack_weight_dp4a,
    padded_mkn,
)
from tvmq.kernels.cuda_mma import (
    choose_mma_tiles,
    int8_dense_imma,
    pack_weight_imma,
    padded_mkn_mma,
)

from ._int8_dense import DenseKernel, rewrite_int8_dense

_DP4A_MIN_SM = 61
_IMMA_MIN_SM = 80  # mma.sync.m16n8k32 s8 with ldmatrix: Ampere and newer
_OPAQUE = 8  # relax OpPatternKind.kOpaque


def cuda_sm(target: tvm.target.Target | None) -> int:
    """The CUDA target's ``sm_XX`` number, 0 for anything else."""
    if target is None or target.kind.name != "cuda":
        return 0
    found = re.match(r"sm_(\d+)", str(target.attrs.get("arch", "")))
    return int(found[1]) if found else 0


def target_has_dp4a(target: tvm.target.Target | None) -> bool:
    """True for a CUDA target whose ``arch`` is ``sm_61`` or later (``dp4a`` exists)."""
    return cuda_sm(target) >= _DP4A_MIN_SM


def target_has_imma(target: tvm.target.Target | None) -> bool:
    """True for a CUDA target whose ``arch`` is ``sm_80`` or later (int8 ``mma.sync`` m16n8k32)."""
    return cuda_sm(target) >= _IMMA_MIN_SM


def _plan(m: int, k: int, n: int):
    tiles = choose_cuda_tiles(m, k, n)
    return (*padded_mkn(m, k, n, tiles), tiles)


def _build(m: int, k: int, n: int, tiles, with_offset: bool):
    func = int8_dense_dp4a(m, k, n, with_offset=with_offset, tiles=tiles)
    # Opaque to FuseOps: FuseTIR cannot merge a scheduled kernel with its neighbours.
    return func.with_attr("op_pattern", _OPAQUE)


_DP4A = DenseKernel(
    name="dp4a",
    operand_dtype="int8",  # dp4a.s32.s32: signed by signed bytes
    plan=_plan,
    pack=pack_weight_dp4a,
    build=_build,
)


def _plan_imma(m: int, k: int, n: int):
    tiles = choose_mma_tiles(m, k, n, "int8")
    return (*padded_mkn_mma(m, k, n, tiles), tiles)


def _build_imma(m: int, k: int, n: int, tiles, with_offset: bool):
    if with_offset:  # shifts=False below: the rewrite never asks for it
        raise ValueError("the IMMA kernel takes int8 activations only (no offset)")
    return int8_dense_imma(m, k, n, tiles=tiles).with_attr("op_pattern", _OPAQUE)


_IMMA = DenseKernel(
    name="imma",
    operand_dtype="int8",  # mma.sync .s8.s8
    plan=_plan_imma,
    pack=pack_weight_imma,
    build=_build_imma,
    shifts=False,  # uint8 activations stay for dp4a
)


@tvm.transform.module_pass(opt_level=0, name="PackInt8DenseCUDA")
class PackInt8DenseCUDA:
    """Lower ``matmul(int8/uint8 x, const int8 W, out_dtype=int32)`` to IMMA (sm_80+) or dp4a.

    Parameters
    ----------
    target : tvm.target.Target or dict or str, optional
        The build target. Defaults to ``tvm.target.Target.current()`` when the pass runs;
        with neither, or for a non-CUDA target or an arch before sm_61, the pass is a no-op.
    """

    def __init__(self, target: tvm.target.Target | dict | str | None = None):
        self.target = tvm.target.Target(target) if target is not None else None

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = self.target or tvm.target.Target.current(allow_none=True)
        if not target_has_dp4a(target):
            return mod
        if target_has_imma(target):
            mod = rewrite_int8_dense(mod, _IMMA)
        return rewrite_int8_dense(mod, _DP4A)
