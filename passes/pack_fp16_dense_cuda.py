"""PackFp16DenseCUDA: fp16 matmuls with a constant weight -> a tensor-core (mma.sync) CUDA kernel.

Rewrites, on a CUDA target with fp16 ``mma.sync`` (sm_80 or later)::

    y = R.matmul(x, W, out_dtype="float32" or "float16")  # x: (..., K) float16, static shape
                                                           # W: (K, N) float16 constant

(what ``relax.transform.ToMixedPrecision(out_dtype="float32")`` makes of a float matmul) into
a ``call_tir`` to :func:`tvmq.kernels.cuda_mma.fp16_dense_mma` (``ldmatrix`` + ``mma.sync
.m16n8k16`` with fp32 accumulators). Around the call: the leading dims of ``x`` are flattened,
``M`` and ``K`` zero-padded to whole tiles (the weight is padded at compile time), the padding
sliced off the fp32 result, and for ``out_dtype="float16"`` the result cast back.

Left alone: other dtypes, non-constant or batched weights, symbolic shapes (they keep TVM's
lowering: dlight's rules). On a non-CUDA target or an arch before sm_80 the module is returned
unchanged; no fp16 matmul is left after a rewrite, so the pass is idempotent. Run it where
:class:`PackInt8DenseCUDA` runs: before ``LegalizeOps``.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from tvmq.kernels.cuda_mma import (
    MmaTiles,
    bf16_dense_mma,
    choose_mma_tiles,
    fp16_dense_mma,
    padded_mkn_mma,
)

from ._int8_dense import KernelRewriter, is_symbolic, rewrite_functions, rows_shape
from .pack_int8_dense_cuda import cuda_sm

_MATMUL = tvm.ir.Op.get("relax.matmul")
_MMA_F16_MIN_SM = 80  # m16n8k16 f16 with ldmatrix: Ampere and newer
_OPAQUE = 8  # relax OpPatternKind.kOpaque: FuseTIR cannot merge a scheduled kernel
_KERNELS = {"float16": fp16_dense_mma, "bfloat16": bf16_dense_mma}
_NUMPY = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
_SHORT = {"float16": "fp16", "bfloat16": "bf16"}


def target_has_fp16_mma(target: tvm.target.Target | None) -> bool:
    """True for a CUDA target whose ``arch`` is ``sm_80`` or later."""
    return cuda_sm(target) >= _MMA_F16_MIN_SM


def match_fp16_dense(call: relax.Expr) -> tuple[relax.Expr, tuple, np.ndarray, str] | None:
    """(x, x shape, W as numpy, out dtype) for a lowerable fp16 ``matmul(x, W_const)``."""
    if not isinstance(call, relax.Call) or not call.op.same_as(_MATMUL):
        return None
    x, w = call.args
    out_dtype = str(call.attrs.out_dtype) or "float16"
    if out_dtype == "void":
        out_dtype = "float16"
    if out_dtype not in ("float16", "float32") or not isinstance(w, tvm.ir.Constant):
        return None
    if not isinstance(x.ty, relax.TensorType) or str(x.ty.dtype) != "float16":
        return None
    if str(w.ty.dtype) != "float16":
        return None
    x_shape, w_shape = rows_shape(x), rows_shape(w)
    if x_shape is None or w_shape is None or is_symbolic(x_shape) or is_symbolic(w_shape):
        return None
    if len(w_shape) != 2 or len(x_shape) < 2 or x_shape[-1] != w_shape[0]:
        return None
    if 0 in x_shape or 0 in w_shape:
        return None
    return x, x_shape, w.value.numpy(), out_dtype


@mutator
class _Fp16DenseRewriter(KernelRewriter):
    def __init__(self, mod: tvm.IRModule, tiles: MmaTiles | None):
        super().__init__(mod)
        self.tiles = tiles

    def match(self, call: relax.Call):
        return match_fp16_dense(call)

    def rewrite(self, x, x_shape: tuple, w: np.ndarray, out_dtype: str) -> relax.Expr:
        y = emit_mma_dense(self, x, x_shape, w, self.tiles, "float16")
        if out_dtype == "float16":
            y = self.builder_.emit(relax.op.astype(y, "float16"))
        if len(x_shape) != 2:
            return relax.op.reshape(y, (*x_shape[:-1], w.shape[1]))
        return y


def emit_mma_dense(
    rw: KernelRewriter, x, x_shape: tuple, w: np.ndarray, tiles: MmaTiles | None, operand: str
) -> relax.Expr:
    """Emit ``x @ w`` on the tensor-core kernel for ``operand`` (``float16`` / ``bfloat16``)
    into ``rw``'s builder: ``x`` flattened to ``(M, K)`` (cast to ``operand`` when it is not),
    padded to whole tiles, ``w`` stored as an ``operand`` constant padded at compile time; the
    result is the fp32 ``(M, N)`` product, padding sliced off."""
    bb = rw.builder_
    k, n = w.shape
    m = math.prod(x_shape[:-1])
    tiles = tiles or choose_mma_tiles(m, k, n, operand)
    mp, kp, np_ = padded_mkn_mma(m, k, n, tiles)
    if len(x_shape) != 2:
        x = bb.emit(relax.op.reshape(x, (m, k)))
    if str(x.ty.dtype) != operand:
        x = bb.emit(relax.op.astype(x, operand))
    if mp != m or kp != k:
        x = bb.emit(relax.op.nn.pad(x, [0, mp - m, 0, kp - k]))
    padded = np.zeros((kp, np_), dtype=_NUMPY[operand])
    padded[:k, :n] = w.astype(_NUMPY[operand])
    short = _SHORT[operand]
    kernel = rw.kernel_var(
        (operand, mp, kp, np_, tiles),
        f"tvmq_{short}_dense_mma_{mp}x{kp}x{np_}",
        lambda: _KERNELS[operand](mp, kp, np_, tiles=tiles).with_attr("op_pattern", _OPAQUE),
    )
    y = bb.emit(
        relax.call_tir(
            kernel, [x, relax.const(padded, operand)], out_ty=relax.TensorType((mp, np_), "float32")
        )
    )
    if mp != m or np_ != n:
        y = bb.emit(relax.op.strided_slice(y, axes=[0, 1], begin=[0, 0], end=[m, n]))
    return y


class MmaPass:
    """Base of the tensor-core passes: a no-op off CUDA and before sm_80, else
    ``self.rewrite(mod)``.

    Parameters
    ----------
    target : tvm.target.Target or dict, optional
        The build target; defaults to ``tvm.target.Target.current()`` when the pass runs.
    tiles : MmaTiles, optional
        One tiling for every kernel; by default :func:`choose_mma_tiles` picks per shape.
    """

    def __init__(self, target=None, tiles: MmaTiles | None = None):
        self.target = tvm.target.Target(target) if target is not None else None
        self.tiles = tiles

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = self.target or tvm.target.Target.current(allow_none=True)
        return self.rewrite(mod) if target_has_fp16_mma(target) else mod

    def rewrite(self, mod: tvm.IRModule) -> tvm.IRModule:
        raise NotImplementedError


@tvm.transform.module_pass(opt_level=0, name="PackFp16DenseCUDA")
class PackFp16DenseCUDA(MmaPass):
    """Lower ``matmul(fp16 x, const fp16 W)`` to the tensor-core kernel on sm_80 and newer
    (parameters: see :class:`MmaPass`)."""

    def rewrite(self, mod: tvm.IRModule) -> tvm.IRModule:
        return rewrite_functions(mod, _Fp16DenseRewriter(mod, self.tiles))
