"""PackFloatBatchMatmul: float32 matmuls of two activations -> tvmq's register-blocked kernel.

Attention's ``Q @ K^T`` and ``P @ V`` are float32 ``R.matmul(a, b)`` with both operands
computed at run time; TVM's default schedule ran DeiT-tiny's ``Q @ K^T`` at about a third of
the core's FMA peak. On x86 LLVM targets with SIMD this pass rewrites::

    y = R.matmul(a, b)      # a: (*batch, M, K), b: (*batch, K, N) float32, static shapes

into the batched 1x1 case of :func:`tvmq.kernels.cpu_float_conv.float_conv2d_nhwc` (the
kernel :class:`PackFloatDense` uses, with one weight panel set per batch)::

    x = pad(reshape(a, (B, 1, M, K)))   # rows to the tile (or the kernel clamps them)
    w = permute_dims(reshape(pad(b), (B, K, N'/L, L)))      # [B, N'/L, K, L] panels
    y = reshape(strided_slice(call_tir(float_batch_matmul, x, w)), (*batch, M, N))

``b`` is packed at run time by plain Relax ops, which FuseOps merges into one injective
kernel with whatever produced ``b`` (the head split). When ``b`` is a ``permute_dims``
swapping the last two axes of some ``k`` (``K^T``), seen through reshapes of the batch
dims and no-op ``broadcast_to``, the panels are read from ``k`` directly: one transpose
instead of two. ``N`` is zero-padded to whole register tiles of ``L``-lane vectors.

Rewritten: same static batch dims (no broadcasting), at least
:data:`~tvmq.passes.pack_float_dense.MIN_MACS` multiply-adds, a non-constant ``b`` (a
constant one is :class:`PackFloatDense`'s), and a ragged shape: ``N`` not a multiple of
the lanes or ``M`` not of the 4 rows that :class:`~tvmq.cpu_schedule.CPUDefaultSchedule`
keeps in registers. On aligned shapes that default tile needs no packing and was as fast
(BERT's 12 x 128 x 128 x 64 ``Q @ K^T`` alone: 129 us default, 138 us packed plus 59 us of
packing); on ragged ones it pads the operands with copies, and the packed kernel won
(DeiT-tiny in situ, one core: ``Q @ K^T`` 185 -> 118 us, ``P @ V`` 119 -> 82 us a layer;
the whole model about 4% faster).
A no-op on non-x86 or non-LLVM targets; idempotent (no ragged float activation matmul is
left).
"""

from __future__ import annotations

import contextlib
import math

import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from tvmq.kernels._tiling import DEFAULT_SCHEDULE_ROWS as DEFAULT_ROWS
from tvmq.kernels.cpu_float_conv import (
    CLAMP_MAX_ROWS,
    ConvShape,
    choose_conv_tiles,
    float_conv2d_nhwc,
    simd_lanes_and_registers,
)
from tvmq.kernels.x86_int8_conv import OPAQUE

from ._int8_dense import KernelRewriter, batch_matmul_dims, rewrite_functions
from .pack_float_dense import MIN_MACS
from .relax_utils import MATMUL, PERMUTE_DIMS, RESHAPE, const_source, op_name, resolve, static_shape

_BROADCAST = "relax.broadcast_to"


def _is_float32(expr: relax.Expr) -> bool:
    return isinstance(expr.ty, relax.TensorType) and str(expr.ty.dtype) == "float32"


def match_activation_matmul(call: relax.Expr, lookup_binding) -> tuple | None:
    """``(a, b, batch dims, M, K, N)`` for a float32 matmul of two activations with the
    same static batch dims and at least :data:`MIN_MACS` multiply-adds, else None."""
    if op_name(call) != MATMUL or not all(map(_is_float32, (call, *call.args))):
        return None
    a, b = call.args
    if const_source(b, lookup_binding) is not None:
        return None
    dims = batch_matmul_dims(a, b)
    if dims is None:
        return None
    batch, m, k, n = dims
    if k < 2 or math.prod(batch) * m * k * n < MIN_MACS:
        return None
    return a, b, *dims


def match_float_batch_matmul(call: relax.Expr, lookup_binding, lanes: int) -> tuple | None:
    """:func:`match_activation_matmul`'s tuple for a matmul worth the kernel (``lanes``:
    float32 lanes of the target's vectors)."""
    found = match_activation_matmul(call, lookup_binding)
    if found is None:
        return None
    *_, m, _k, n = found
    if n % lanes == 0 and m % DEFAULT_ROWS == 0:
        return None  # the default schedule's own register tile, no packing
    return found


def transposed_source(b: relax.Expr, lookup_binding) -> relax.Expr | None:
    """The ``k`` with ``b == swap of k's last two axes`` (through batch reshapes and no-op
    broadcasts), else None."""
    *_, rows, cols = static_shape(b)
    expr = resolve(b, lookup_binding)
    while op_name(expr) in (RESHAPE, _BROADCAST):
        shape = static_shape(expr.args[0])
        if shape is None or shape[-2:] != (rows, cols):
            return None
        if op_name(expr) == _BROADCAST and shape != static_shape(expr):
            return None
        expr = resolve(expr.args[0], lookup_binding)
    if op_name(expr) != PERMUTE_DIMS or expr.attrs.axes is None:
        return None
    count = len(expr.attrs.axes)
    swap = [*range(count - 2), count - 1, count - 2]
    return expr.args[0] if [int(i) for i in expr.attrs.axes] == swap else None


@mutator
class _Rewriter(KernelRewriter):
    def __init__(self, mod: tvm.IRModule, lanes: int, registers: int):
        super().__init__(mod)
        self.lanes, self.registers = lanes, registers

    def match(self, call: relax.Call):
        return match_float_batch_matmul(call, self.lookup_binding, self.lanes)

    def rewrite(self, a, b, batch: tuple[int, ...], m: int, k: int, n: int) -> relax.Expr:
        bb, lanes = self.builder_, self.lanes
        nb = math.prod(batch)
        # N padded to whole tiles of vectors (DeiT's 197 tokens: 2 x 16 lanes, not 1), and
        # the spill-free accumulator budget: on DeiT-tiny's shapes (one core, AVX-512) that
        # ran Q @ K^T in 96 us instead of 119 (28 x 1 tile) and P @ V in 76 instead of 82 (7 x 4).
        tiles = choose_conv_tiles(m, n, lanes, self.registers, epilogue=True, pad_channels=True)
        mp, np_ = tiles.ow_padded, tiles.o_padded
        # Small row tiles read a's last row again for the padded rows (clamped) instead of
        # a padded copy: DeiT's P @ V comes from the softmax, into which no pad fuses (a
        # kernel of 14 us a layer). Each clamped row costs the reduction loop a pointer:
        # the 14-row tile of Q @ K^T ran 4-10% slower clamped, 6-8 rows as fast.
        clamp = mp != m and tiles.mr <= CLAMP_MAX_ROWS
        rows = m if clamp else mp
        x = bb.emit(relax.op.reshape(a, (nb, 1, m, k)))
        if rows != m:
            x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, 0, mp - m, 0, 0]))
        w = self._panels(b, nb, k, n, np_)
        shape = ConvShape(nb, 1, rows, k, (1, 1), (1, 1), (1, 1), 1)
        kernel = self.kernel_var(
            (shape, tiles),
            f"tvmq_float_batch_matmul_{nb}x{rows}x{k}x{np_}",
            lambda: float_conv2d_nhwc(
                shape, tiles, batched_weight=True, clamp_columns=clamp
            ).with_attr("op_pattern", OPAQUE),
        )
        out_ty = relax.TensorType((nb, 1, mp, np_), "float32")
        y = bb.emit(relax.call_tir(kernel, [x, w], out_ty=out_ty))
        if (mp, np_) != (m, n):
            y = bb.emit(relax.op.strided_slice(y, axes=[2, 3], begin=[0, 0], end=[m, n]))
        return relax.op.reshape(y, (*batch, m, n))

    def _panels(self, b: relax.Expr, nb: int, k: int, n: int, np_: int) -> relax.Expr:
        """``b`` as ``[nb, N'/L, 1, 1, K, L]``: the kernel's batched weight, zero-padded."""
        bb, lanes = self.builder_, self.lanes
        source = transposed_source(b, self.lookup_binding)
        if source is not None:  # (.., N, K): rows of N, one transpose
            w = bb.emit(relax.op.reshape(source, (nb, n, k)))
            if np_ != n:
                w = bb.emit(relax.op.nn.pad(w, [0, 0, 0, np_ - n, 0, 0]))
            w = bb.emit(relax.op.reshape(w, (nb, np_ // lanes, lanes, k)))
            w = bb.emit(relax.op.permute_dims(w, [0, 1, 3, 2]))
        else:  # (.., K, N)
            w = bb.emit(relax.op.reshape(b, (nb, k, n)))
            if np_ != n:
                w = bb.emit(relax.op.nn.pad(w, [0, 0, 0, 0, 0, np_ - n]))
            w = bb.emit(relax.op.reshape(w, (nb, k, np_ // lanes, lanes)))
            w = bb.emit(relax.op.permute_dims(w, [0, 2, 1, 3]))
        return bb.emit(relax.op.reshape(w, (nb, np_ // lanes, 1, 1, k, lanes)))


def _x86_simd(target: tvm.target.Target | None) -> tuple[int, int] | None:
    """``(lanes, registers)`` of an x86 LLVM target with SIMD, else None."""
    simd = simd_lanes_and_registers(target)
    if simd is None:
        return None
    from tvm.target.codegen import target_has_features

    target = target if target is not None else tvm.target.Target.current()
    try:
        return simd if target_has_features("sse2", target) else None
    except (RuntimeError, ValueError):  # TVM's errors (tvm.error has no TVMError in 0.27)
        return None


@tvm.transform.module_pass(opt_level=0, name="PackFloatBatchMatmul")
class PackFloatBatchMatmul:
    """Lower float32 ``matmul(a, b)`` of two activations to tvmq's packed kernel (see the
    module docstring; ``target`` as in :class:`~tvmq.passes.PackFloatConv`)."""

    def __init__(self, target: tvm.target.Target | dict | str | None = None):
        self.target = tvm.target.Target(target) if target is not None else None

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        simd = _x86_simd(self.target)
        if simd is None:
            return mod
        with self.target or contextlib.nullcontext():  # tiles follow the target's CPU
            return rewrite_functions(mod, _Rewriter(mod, *simd), relax.analysis.remove_all_unused)
