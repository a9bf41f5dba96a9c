"""PackBf16DenseX86: float32 matmuls with a constant weight -> bf16 AMX tiles (``precision="bf16"``).

Rewrites, when the target has ``amx-bf16``, what :class:`PackFloatDense` would take::

    y = R.matmul(x, W)     # x: (..., K) float32, static shape, M >= 16 rows
                           # W: (K, N) float32 constant (seen through permute_dims / reshape)

into::

    xb = call_tir(to_bf16_rows, reshape(x, (M, K)))       # (Mp, Kp) bf16 bits, zero-padded
    y2 = call_tir(bf16_dense_amx, xb, W as packed bf16)   # (Mp, Np) float32
    y = reshape(strided_slice(y2), (..., N))

(:mod:`tvmq.kernels.x86_amx_bf16`): activations and weights are rounded to bf16, the
products and sums stay float32. A matmul of fewer than 16 rows (a classifier's one row: a
GEMV wastes most of a tile) keeps its weight in bf16 and decodes it in a float32 kernel
(the ``bf16`` format of :func:`~tvmq.kernels.cpu_decoded_dense.decoded_dense`), its
activations unrounded: the weight streams half the bytes (MobileNetV2's 1280 x 1000
classifier alone, one thread, 200 -> 84 us). Everything else is left to the float32
kernels: symbolic shapes, batched or non-constant weights.
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

from tvmq.kernels.cpu_decoded_dense import DecodedWeight
from tvmq.kernels.x86_amx_bf16 import (
    bf16_bits,
    bf16_dense_amx,
    bf16_padded,
    pack_weight_bf16,
    to_bf16_rows,
)
from tvmq.kernels.x86_int8_conv import OPAQUE

from ._int8_dense import KernelRewriter, is_symbolic, rewrite_functions
from .pack_decoded_dense import emit_decoded_dense
from .pack_float_dense import MIN_MACS, match_float_dense
from .pack_int8_dense_x86 import llvm_target_has

MIN_ROWS = 16
# A bf16 weight of a few rows' matmul pays from 64K multiply-adds: ResNet-18's 512 x 1000
# classifier (under PackFloatDense's MIN_MACS) took 96 us in TVM's default schedule.
GEMV_MIN_MACS = 1 << 16


def target_has_amx_bf16(target: tvm.target.Target | None) -> bool:
    """True for an LLVM x86 target with AMX bf16 tiles (``amx-tile`` and ``amx-bf16``)."""
    return llvm_target_has(target, "amx-tile", "amx-bf16")


@mutator
class _Rewriter(KernelRewriter):
    def match(self, call: relax.Call):
        found = match_float_dense(call, self.lookup_binding, GEMV_MIN_MACS)
        if found is None or is_symbolic(found[1]):
            return None
        rows, (k, n) = math.prod(found[1][:-1]), found[2].shape
        if rows >= MIN_ROWS and rows * k * n < MIN_MACS:  # left to the default schedule
            return None
        return found

    def rewrite(self, x: relax.Expr, x_shape: tuple, w: np.ndarray) -> relax.Expr:
        bb = self.builder_
        k, n = w.shape
        m = math.prod(x_shape[:-1])
        if m < MIN_ROWS:  # AVX-512 on an AMX CPU: 16 float lanes, 32 vector registers
            weight = DecodedWeight("bf16", 16, "uint16")
            return emit_decoded_dense(
                bb, self.kernel_var, x, x_shape, n, bf16_bits(w), weight, [], 16, 32
            )
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
        if not target_has_amx_bf16(target):
            return mod
        with target:  # tile choices follow the target's CPU
            return self.rewrite(mod)

    def rewrite(self, mod: tvm.IRModule) -> tvm.IRModule:
        raise NotImplementedError


@tvm.transform.module_pass(opt_level=0, name="PackBf16DenseX86")
class PackBf16DenseX86(AmxBf16Pass):
    """Lower float32 ``matmul(x, const W)`` to bf16 AMX tiles (``target``: see
    :class:`AmxBf16Pass`)."""

    def rewrite(self, mod: tvm.IRModule) -> tvm.IRModule:
        return rewrite_functions(mod, _Rewriter(mod))
