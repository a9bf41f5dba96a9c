"""PackBf16DenseCUDA: float32 matmuls with a constant weight -> bf16 tensor cores (``precision="bf16"``).

Rewrites, on a CUDA target with ``mma.sync`` (sm_80 or later)::

    y = R.matmul(x, W)     # x: (..., K) float32, static shape
                           # W: (K, N) float32 constant (seen through permute_dims / reshape)

into::

    xb = pad(astype(reshape(x, (M, K)), "bfloat16"))      # (Mp, Kp), fused by FuseOps
    y2 = call_tir(bf16_dense_mma, xb, W as bf16 (Kp, Np))  # (Mp, Np) float32
    y = reshape(strided_slice(y2), (..., N))

(:func:`tvmq.kernels.cuda_mma.bf16_dense_mma`: the fp16 kernel with ``mma.sync.m16n8k16
.f32.bf16.bf16.f32``): activations and weights are rounded to bf16, products and sums stay
float32. bf16 has float32's exponent range, so the rest of the model stays float32 and no
``ToMixedPrecision`` is needed. Left alone: symbolic shapes, batched or non-constant weights.
Not part of the default pipeline: :func:`tvmq.pipeline.run` applies it for ``precision="bf16"``
on CUDA presets. A no-op off CUDA and before sm_80; idempotent (no float32 matmul with a
constant weight is left).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from tvmq.kernels.cuda_mma import MmaTiles

from ._int8_dense import KernelRewriter, is_symbolic, rewrite_functions
from .pack_float_dense import match_float_dense
from .pack_fp16_dense_cuda import MmaPass, emit_mma_dense


@mutator
class _Bf16DenseRewriter(KernelRewriter):
    def __init__(self, mod: tvm.IRModule, tiles: MmaTiles | None):
        super().__init__(mod)
        self.tiles = tiles

    def match(self, call: relax.Call):
        found = match_float_dense(call, self.lookup_binding, min_macs=0)
        return None if found is None or is_symbolic(found[1]) else found

    def rewrite(self, x: relax.Expr, x_shape: tuple, w: np.ndarray) -> relax.Expr:
        y = emit_mma_dense(self, x, x_shape, w, self.tiles, "bfloat16")
        if len(x_shape) != 2:
            return relax.op.reshape(y, (*x_shape[:-1], w.shape[1]))
        return y


@tvm.transform.module_pass(opt_level=0, name="PackBf16DenseCUDA")
class PackBf16DenseCUDA(MmaPass):
    """Lower ``matmul(float32 x, const float32 W)`` to the bf16 tensor-core kernel on sm_80
    and newer (parameters: see :class:`~tvmq.passes.pack_fp16_dense_cuda.MmaPass`)."""

    def rewrite(self, mod: tvm.IRModule) -> tvm.IRModule:
        return rewrite_functions(mod, _Bf16DenseRewriter(mod, self.tiles))
