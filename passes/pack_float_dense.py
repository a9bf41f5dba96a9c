"""PackFloatDense: float32 matmul with a constant weight -> tvmq's register-blocked kernel.

Rewrites, on LLVM CPU targets with SIMD::

    y = R.matmul(x, W)     # x: (..., K) float32; W: (K, N) float32 constant
                           # (seen through permute_dims / reshape: torch's Linear is x @ W.T)

into the 1x1 case of :func:`tvmq.kernels.cpu_float_conv.float_conv2d_nhwc`::

    x4 = reshape(x, (1, 1, M, K))  [+ nn.pad of M up to a register tile of > 9 rows;
                                   # smaller tiles clamp their reads of the last rows]
    y4 = call_tir(float_conv2d_nhwc, x4, W packed as [N'/L, 1, 1, K, L])
    y = reshape(strided_slice(y4), (..., N))

The weight is packed at compile time; each task keeps an ``mr x (nr * L)`` output tile in
registers over the whole K (see the kernel's docstring). On one Emerald Rapids core the BERT
FFN pair (128x768x3072, 128x3072x768, with GELU) took 16 ms against PyTorch's 16-21 ms in
the same run; TVM's default schedule without tuning records took 91-148 ms.

An int16 ``matmul(x, W)`` with an int32 result (:class:`Int8AsInt16`'s int8 products on AVX2
CPUs) takes the same kernel in ``int16`` mode: ``W`` packed in channel pairs as int16, each
reduction step one ``vpmaddwd``, the exact int32 sums stored (static ``x`` only).

Only matmuls of at least ``2**20`` multiply-adds are rewritten: below that the default
schedule is as fast (the call dominates), and it stays a kernel that ``tvmq tune`` can tune.
A symbolic ``M`` (dynamic batch / sequence) gets the same kernel with a run-time row count
(:func:`~tvmq.kernels.cpu_float_conv.float_dense_rows`; rows padded to its tile by a
``concat`` of zeros). Left alone: batched or non-constant weights, other dtypes, a symbolic
``K``. Where it
belongs: with the other target kernels, after quantization and before ``LegalizeOps``; a
no-op on non-LLVM targets; idempotent (no float matmul with a constant weight is left).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from tvmq.kernels.cpu_float_conv import (
    CLAMP_MAX_ROWS,
    ConvShape,
    choose_conv_tiles,
    choose_int16_tiles,
    float_conv2d_nhwc,
    float_dense_rows,
    pack_conv_weight,
    pack_conv_weight_pairs,
    pixel_major_pays,
    rows_tiles,
    simd_lanes_and_registers,
)
from tvmq.kernels.x86_int8_conv import OPAQUE
from tvmq.kernels.x86_madd_intrin import LANES as INT16_LANES

from ._int8_dense import KernelRewriter, is_symbolic, rewrite_functions, rows_shape
from .relax_utils import const_value

_MATMUL = tvm.ir.Op.get("relax.matmul")
MIN_MACS = 1 << 20
"""Smaller matmuls keep the default (tunable) schedule."""


_OPERANDS = {"float32": "float32", "int32": "int16"}
"""Result dtype -> the operands' dtype of the matmuls the kernel takes (int16:
:class:`~tvmq.passes.Int8AsInt16`'s, exact int32 sums)."""


def match_float_dense(call: relax.Expr, lookup_binding, min_macs: int = MIN_MACS) -> tuple | None:
    """``(x, x shape, W as numpy)`` for a float32 ``matmul(x, W)`` with a constant ``(K, N)``
    weight (seen through views) and at least ``min_macs`` multiply-adds, else None; the
    leading dims of ``x`` may be symbolic. The same for an int16 one with an int32 result
    and a static ``x`` (an even ``K``)."""
    if not isinstance(call, relax.Call) or not call.op.same_as(_MATMUL):
        return None
    x, w_expr = call.args
    if not isinstance(call.ty, relax.TensorType):
        return None
    operands = _OPERANDS.get(str(call.ty.dtype))
    if not isinstance(x.ty, relax.TensorType) or str(x.ty.dtype) != operands:
        return None
    x_shape = rows_shape(x)  # static, or symbolic leading dims
    if x_shape is None or len(x_shape) < 2 or 0 in x_shape:
        return None
    if operands == "int16" and (is_symbolic(x_shape) or x_shape[-1] % 2):
        return None
    w = const_value(w_expr, lookup_binding)
    if w is None or w.ndim != 2 or w.dtype != operands or w.shape[0] != x_shape[-1]:
        return None
    # a symbolic M counts as large: the sizes the library runs are not known here
    m = 1 << 10 if is_symbolic(x_shape) else math.prod(x_shape[:-1])
    if m * w.shape[0] * w.shape[1] < min_macs or w.shape[0] < 2:
        return None
    return x, x_shape, w


@mutator
class _DenseRewriter(KernelRewriter):
    def __init__(self, mod: tvm.IRModule, lanes: int, registers: int):
        super().__init__(mod)
        self.lanes, self.registers = lanes, registers

    def match(self, call: relax.Call):
        found = match_float_dense(call, self.lookup_binding)
        if found is not None and found[2].dtype == np.int16 and self.lanes != INT16_LANES:
            return None  # the int16 kernel is AVX2's (Int8AsInt16 targets no other)
        return found

    def rewrite(self, x: relax.Expr, x_shape: tuple, w: np.ndarray) -> relax.Expr:
        if is_symbolic(x_shape):
            return self._lower_rows(x, x_shape, w)
        return self._lower(x, x_shape, w)

    def _lower_rows(self, x: relax.Expr, x_shape: tuple, w: np.ndarray) -> relax.Expr:
        """The kernel for a symbolic row count: rows padded to ``mr`` at run time."""
        bb = self.builder_
        k, n = w.shape
        tiles = rows_tiles(n, self.lanes, self.registers)
        m = math.prod(x_shape[:-1])  # a PrimExpr
        mo = tvm.tirx.floordiv(m + tiles.mr - 1, tiles.mr)
        x = bb.emit(relax.op.reshape(x, (m, k)))
        pad = bb.emit(relax.op.zeros(relax.ShapeExpr([mo * tiles.mr - m, k]), "float32"))
        x = bb.emit(relax.op.reshape(relax.op.concat([x, pad], axis=0), (1, 1, mo * tiles.mr, k)))
        kernel = self.kernel_var(
            ("rows", k, tiles),
            f"tvmq_float_dense_Mx{k}x{tiles.o_padded}",
            lambda: float_dense_rows(k, tiles).with_attr("op_pattern", OPAQUE),
        )
        packed = pack_conv_weight(
            np.ascontiguousarray(w.T).reshape(n, k, 1, 1), self.lanes, tiles.o_padded
        )
        args = [x, relax.const(packed, "float32"), relax.prim_value(mo)]
        out_ty = relax.TensorType((1, 1, mo * tiles.mr, tiles.o_padded), "float32")
        y = bb.emit(relax.call_tir(kernel, args, out_ty=out_ty))
        y = bb.emit(relax.op.strided_slice(y, axes=[2, 3], begin=[0, 0], end=[m, n]))
        return relax.op.reshape(y, (*x_shape[:-1], n))

    def _lower(self, x: relax.Expr, x_shape: tuple[int, ...], w: np.ndarray) -> relax.Expr:
        bb = self.builder_
        k, n = w.shape
        m = math.prod(x_shape[:-1])
        int16 = w.dtype == np.int16
        if int16:
            tiles = choose_int16_tiles(m, n)
        else:
            tiles = choose_conv_tiles(m, n, self.lanes, self.registers)
        # Small row tiles read x's last row again for the padded rows (clamped) instead of
        # a padded copy: DeiT-tiny's 197 tokens (9-row tiles) lost 48 pad kernels a run,
        # of the layer norms' outputs (into which no pad fuses).
        clamp = tiles.ow_padded != m and tiles.mr <= CLAMP_MAX_ROWS
        rows = m if clamp else tiles.ow_padded
        x = bb.emit(relax.op.reshape(x, (1, 1, m, k)))
        if rows != m:
            x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, 0, rows - m, 0, 0]))
        shape = ConvShape(1, 1, rows, k, (1, 1), (1, 1), (1, 1), 1)
        pixel_major = pixel_major_pays((1, 1), w.itemsize * k * tiles.o_padded)
        kernel = self.kernel_var(
            (shape, tiles, int16),
            f"tvmq_{'int16' if int16 else 'float'}_dense_{rows}x{k}x{tiles.o_padded}",
            lambda: float_conv2d_nhwc(
                shape, tiles, clamp_columns=clamp, pixel_major=pixel_major, int16=int16
            ).with_attr("op_pattern", OPAQUE),
        )
        pack = pack_conv_weight_pairs if int16 else pack_conv_weight
        packed = pack(np.ascontiguousarray(w.T).reshape(n, k, 1, 1), self.lanes, tiles.o_padded)
        dtype = "int32" if int16 else "float32"
        out_ty = relax.TensorType((1, 1, tiles.ow_padded, tiles.o_padded), dtype)
        y = bb.emit(relax.call_tir(kernel, [x, relax.const(packed)], out_ty=out_ty))
        if tiles.ow_padded != m or tiles.o_padded != n:
            y = bb.emit(relax.op.strided_slice(y, axes=[2, 3], begin=[0, 0], end=[m, n]))
        return relax.op.reshape(y, (*x_shape[:-1], n))


@tvm.transform.module_pass(opt_level=0, name="PackFloatDense")
class PackFloatDense:
    """Lower float32 ``matmul(x, const W)`` of at least :data:`MIN_MACS` multiply-adds to
    tvmq's packed kernel (``target`` as in :class:`~tvmq.passes.PackFloatConv`)."""

    def __init__(self, target: tvm.target.Target | dict | str | None = None):
        self.target = tvm.target.Target(target) if target is not None else None

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        simd = simd_lanes_and_registers(self.target)
        if simd is None:
            return mod
        with self.target or contextlib.nullcontext():  # tiles follow the target's CPU
            return rewrite_functions(
                mod, _DenseRewriter(mod, *simd), relax.analysis.remove_all_unused
            )
