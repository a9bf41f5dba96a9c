"""PackBf16DenseX86: float32 matmuls with a constant weight -> bf16 AMX tiles (``precision="bf16"``).

Rewrites, when the target has ``amx-bf16``, what :class:`PackFloatDense` would take::

    y = R.matmul(x, W)     # x: (..., K) float32, static shape, M >= 16 rows
                           # W: (K, N) float32 constant (seen through permute_dims / reshape)

into::

    xb = call_tir(to_bf16_rows, reshape(x, (M, K)))       # (Mp, Kp) bf16 bits, zero-padded
    y2 = call_tir(bf16_dense_amx, xb, W as packed bf16)   # (Mp, Np) float32
    y = reshape(strided_slice(y2), (..., N))

(:mod:`tvmq.kernels.x86_amx_bf16`): activations and weights are rounded to bf16, the
products and sums stay float32. Everything else is left to the float32 kernels: fewer than
16 rows (a GEMV wastes most of a tile), symbolic shapes, batched or non-constant weights.
It is not part of the default pipeline: :func:`tvmq.pipeline.run` applies it for
``precision="bf16"`` (a numerics choice the user makes), after quantization and before the
target kernel passes. A no-op without AMX-BF16; idempotent.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from tvmq.kernels.x86_amx_bf16 import (
    bf16_dense_amx,
    bf16_padded,
    pack_weight_bf16,
    to_bf16_rows,
)
from tvmq.kernels.x86_int8_conv import OPAQUE

from ._int8_dense import KernelRewriter, is_symbolic, rewrite_functions
from .pack_float_dense import match_float_dense
from .pack_int8_dense_x86 import llvm_target_has

MIN_ROWS = 16


def target_has_amx_bf16(target: tvm.target.Target | None) -> bool:
    """True for an LLVM x86 target with AMX bf16 tiles (``amx-tile`` and ``amx-bf16``)."""
    return llvm_target_has(target, "amx-tile", "amx-bf16")


@mutator
class _Rewriter(KernelRewriter):
    def match(self, call: relax.Call):
        found = match_float_dense(call, self.lookup_binding)
        if found is None or is_symbolic(found[1]) or math.prod(found[1][:-1]) < MIN_ROWS:
            return None
        return found

    def rewrite(self, x: relax.Expr, x_shape: tuple, w: np.ndarray) -> relax.Expr:
        bb = self.builder_
        k, n = w.shape
        m = math.prod(x_shape[:-1])
        mp, kp, np_ = bf16_padded(m, k, n)
        convert = self.kernel_var(
            ("bf16", m, k, mp, kp), f"tvmq_to_bf16_{mp}x{kp}", lambda: to_bf16_rows(m, k, mp, kp)
        )
        dense = self.kernel_var(
            ("dense", mp, kp, np_),
            f"tvmq_bf16_dense_amx_{mp}x{kp}x{np_}",
            lambda: bf16_dense_amx(mp, kp, np_).with_attr("op_pattern", OPAQUE),
        )
        x = bb.emit(relax.op.reshape(x, (m, k)))
        xb = bb.emit(relax.call_tir(convert, [x], out_ty=relax.TensorType((mp, kp), "uint16")))
        packed = relax.const(pack_weight_bf16(w), "uint16")
        y = bb.emit(
            relax.call_tir(dense, [xb, packed], out_ty=relax.TensorType((mp, np_), "float32"))
        )
        if (mp, np_) != (m, n):
            y = bb.emit(relax.op.strided_slice(y, axes=[0, 1], begin=[0, 0], end=[m, n]))
        return relax.op.reshape(y, (*x_shape[:-1], n))


class AmxBf16Pass:
    """Base of the bf16 AMX passes: a no-op unless ``target`` (default: the current target)
    has AMX-BF16, else ``self.rewrite(mod)``."""

    def __init__(self, target: tvm.target.Target | dict | str | None = None):
        self.target = tvm.target.Target(target) if target is not None else None

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = self.target or tvm.target.Target.current(allow_none=True)
        return self.rewrite(mod) if target_has_amx_bf16(target) else mod

    def rewrite(self, mod: tvm.IRModule) -> tvm.IRModule:
        raise NotImplementedError


@tvm.transform.module_pass(opt_level=0, name="PackBf16DenseX86")
class PackBf16DenseX86(AmxBf16Pass):
    """Lower float32 ``matmul(x, const W)`` to bf16 AMX tiles (``target``: see
    :class:`AmxBf16Pass`)."""

    def rewrite(self, mod: tvm.IRModule) -> tvm.IRModule:
        return rewrite_functions(mod, _Rewriter(mod))
