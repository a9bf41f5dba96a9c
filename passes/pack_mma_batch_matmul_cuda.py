"""PackMmaBatchMatmulCUDA: attention's matmuls of two activations -> tensor-core CUDA kernels.

Rewrites, on a CUDA target with ``mma.sync`` (sm_80 or later), a batched matmul whose
operands are both computed at run time (attention's ``Q @ K^T`` and ``P @ V``)::

    y = R.matmul(a, b, out_dtype=...)   # a: (*batch, M, K), b: (*batch, K, N), static shapes

in two forms:

- fp16 (what ``ToMixedPrecision`` makes of a float matmul under ``--precision fp16``):
  ``a``, ``b`` float16, ``out_dtype`` float32 or float16 ->
  :func:`tvmq.kernels.cuda_mma.fp16_batch_matmul_mma` (``ldmatrix`` + ``mma.sync.m16n8k16``,
  fp32 accumulators; a float16 result is cast after the kernel);
- bf16 (``--precision bf16``, only with ``bf16=True``): ``a``, ``b`` and the result float32
  -> :func:`tvmq.kernels.cuda_mma.bf16_batch_matmul_mma`, the operands cast to bf16 before
  the kernel, fp32 accumulation and result;
- int8 (what ``LowerInt8`` emits for a quantized attention matmul): ``a``, ``b`` int8 or
  uint8, ``out_dtype`` int32 -> :func:`tvmq.kernels.cuda_mma.int8_batch_matmul_imma`
  (``mma.sync.m16n8k32.s32.s8.s8.s32``). The kernel multiplies signed bytes, so a uint8
  operand is shifted to int8 (``a = a_s + 128``) and the product corrected exactly::

      a @ b = a_s @ b_s + s_b * rowsum(a_s) + s_a * colsum(b_s) + K * s_a * s_b

  (``s_a``, ``s_b``: 128 for a uint8 operand, else 0; zero terms are left out). The kernel
  takes ``b`` transposed, ``(batch, N, K)``: when ``b`` is itself a ``permute_dims`` that
  swaps its last two axes (``K^T``), its input is used as it is, else ``b`` is transposed.

Around the call: batch dimensions are flattened, ``M``, ``K`` and ``N`` zero-padded to whole
tiles (zeros add nothing to the sums), and the padding sliced off the result. Only operands
with the same static batch dimensions (no broadcasting, rank >= 3) and a non-constant second
operand are rewritten (a constant one is a dense layer: :class:`PackFp16DenseCUDA`,
:class:`PackInt8DenseCUDA`). On a non-CUDA target or an arch before sm_80 the module is
returned unchanged; no matching matmul is left after a rewrite, so the pass is idempotent.
Run it with the other CUDA target-kernel passes, before ``LegalizeOps``.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from tvmq.kernels.cuda_mma import (
    MmaTiles,
    bf16_batch_matmul_mma,
    choose_mma_tiles,
    fp16_batch_matmul_mma,
    int8_batch_matmul_imma,
    padded_mkn_mma,
)

from ._int8_dense import KernelRewriter, batch_matmul_dims, rewrite_functions, shift_bytes
from .pack_fp16_dense_cuda import MmaPass

_MATMUL = tvm.ir.Op.get("relax.matmul")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_INT8 = ("int8", "uint8")
_OPAQUE = 8  # FuseOps' kOpaque: the scheduled kernel is never fused with its neighbours
_SHIFT = 128
_KERNELS = {
    "float16": ("fp16_batch_matmul_mma", fp16_batch_matmul_mma),
    "bfloat16": ("bf16_batch_matmul_mma", bf16_batch_matmul_mma),
    "int8": ("int8_batch_matmul_imma", int8_batch_matmul_imma),
}


def _out_dtype(call: relax.Call) -> str:
    dtype = str(call.attrs.out_dtype)
    return str(call.args[0].ty.dtype) if dtype in ("", "void", "None") else dtype


def match_mma_batch_matmul(call: relax.Expr, bf16: bool = False):
    """``(a, b, batch dims, M, K, N, operand dtype, out dtype)`` for a rewritable matmul of
    two activations (``operand``: "float16", "int8", or with ``bf16`` "bfloat16" for a
    float32 one), else None."""
    if not isinstance(call, relax.Call) or not call.op.same_as(_MATMUL):
        return None
    a, b = call.args
    if isinstance(a, tvm.ir.Constant) or isinstance(b, tvm.ir.Constant):
        return None
    if any(not isinstance(x.ty, relax.TensorType) for x in (a, b)):
        return None
    dtypes, out_dtype = {str(a.ty.dtype), str(b.ty.dtype)}, _out_dtype(call)
    if dtypes == {"float16"} and out_dtype in ("float16", "float32"):
        operand = "float16"
    elif bf16 and dtypes == {"float32"} and out_dtype == "float32":
        operand = "bfloat16"
    elif dtypes <= set(_INT8) and out_dtype == "int32":
        operand = "int8"
    else:
        return None
    dims = batch_matmul_dims(a, b)
    return None if dims is None else (a, b, *dims, operand, out_dtype)


@mutator
class _Rewriter(KernelRewriter):
    def __init__(self, mod: tvm.IRModule, tiles: MmaTiles | None, bf16: bool):
        super().__init__(mod)
        self.tiles, self.bf16 = tiles, bf16

    def match(self, call: relax.Call):
        return match_mma_batch_matmul(call, self.bf16)

    def _kernel(self, operand: str, nb: int, mkn: tuple, tiles: MmaTiles) -> tvm.ir.GlobalVar:
        name, build = _KERNELS[operand]
        return self.kernel_var(
            (operand, nb, mkn, tiles),
            f"tvmq_{name}_{nb}x" + "x".join(map(str, mkn)),
            lambda: build(nb, *mkn, tiles=tiles).with_attr("op_pattern", _OPAQUE),
        )

    def _transposed(self, b: relax.Expr) -> relax.Expr | None:
        """The input of ``b = permute_dims(t, [..., -1, -2])`` (``t`` is ``b`` transposed)."""
        value = self.lookup_binding(b) if isinstance(b, relax.Var) else None
        if not isinstance(value, relax.Call) or not value.op.same_as(_PERMUTE):
            return None
        ndim = b.ty.ndim
        axes = value.attrs.axes
        if axes is None or [int(x) for x in axes] != [*range(ndim - 2), ndim - 1, ndim - 2]:
            return None
        return value.args[0]

    def rewrite(self, a, b, batch, m, k, n, operand, out_dtype) -> relax.Expr:
        bb = self.builder_
        nb = math.prod(batch)
        tiles = self.tiles or choose_mma_tiles(m, k, n, operand)
        mp, kp, np_ = padded_mkn_mma(m, k, n, tiles)
        s_a = _SHIFT if str(a.ty.dtype) == "uint8" else 0
        s_b = _SHIFT if str(b.ty.dtype) == "uint8" else 0
        a_s = bb.emit(shift_bytes(a, -_SHIFT, "int8")) if s_a else a
        x = bb.emit(relax.op.reshape(a_s, (nb, m, k)))
        if operand == "bfloat16":
            x = bb.emit(relax.op.astype(x, operand))
        if (mp, kp) != (m, k):
            x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, mp - m, 0, kp - k]))
        if operand != "int8":
            w = bb.emit(relax.op.reshape(b, (nb, k, n)))
            if operand == "bfloat16":
                w = bb.emit(relax.op.astype(w, operand))
            w_pad = [0, 0, 0, kp - k, 0, np_ - n]
            b_s = b
        else:
            t = self._transposed(b)
            if t is None:
                t = relax.op.permute_dims(b, [*range(len(batch)), len(batch) + 1, len(batch)])
            b_s = bb.emit(shift_bytes(b, -_SHIFT, "int8")) if s_b else b
            w = bb.emit(shift_bytes(t, -_SHIFT, "int8")) if s_b else t
            w = bb.emit(relax.op.reshape(w, (nb, n, k)))
            w_pad = [0, 0, 0, np_ - n, 0, kp - k]
        if (kp, np_) != (k, n):
            w = bb.emit(relax.op.nn.pad(w, w_pad))
        acc = "int32" if operand == "int8" else "float32"
        kernel = self._kernel(operand, nb, (mp, kp, np_), tiles)
        y = bb.emit(relax.call_tir(kernel, [x, w], out_ty=relax.TensorType((nb, mp, np_), acc)))
        if (mp, np_) != (m, n):
            y = bb.emit(relax.op.strided_slice(y, axes=[1, 2], begin=[0, 0], end=[m, n]))
        y = bb.emit(relax.op.reshape(y, (*batch, m, n)))
        if s_b:  # b = b_s + s_b
            rows = relax.op.sum(relax.op.astype(a_s, "int32"), axis=[-1], keepdims=True)
            y = bb.emit(relax.op.add(y, relax.op.multiply(rows, relax.const(s_b, "int32"))))
        if s_a:  # a = a_s + s_a
            cols = relax.op.sum(relax.op.astype(b_s, "int32"), axis=[-2], keepdims=True)
            y = bb.emit(relax.op.add(y, relax.op.multiply(cols, relax.const(s_a, "int32"))))
        if s_a and s_b:
            y = bb.emit(relax.op.add(y, relax.const(s_a * s_b * k, "int32")))
        return relax.op.astype(y, "float16") if out_dtype == "float16" else y


@tvm.transform.module_pass(opt_level=0, name="PackMmaBatchMatmulCUDA")
class PackMmaBatchMatmulCUDA(MmaPass):
    """Lower fp16 and int8 matmuls of two activations (attention) to tensor-core kernels on
    sm_80 and newer (see the module docstring; parameters: see :class:`MmaPass`); with
    ``bf16=True`` (``--precision bf16``) float32 ones too, on bf16 operands."""

    def __init__(self, target=None, tiles: MmaTiles | None = None, bf16: bool = False):
        super().__init__(target, tiles)
        self.bf16 = bf16

    def rewrite(self, mod: tvm.IRModule) -> tvm.IRModule:
        rewriter = _Rewriter(mod, self.tiles, self.bf16)
        return rewrite_functions(mod, rewriter, relax.analysis.remove_all_unused)
