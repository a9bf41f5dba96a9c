"""LowerInt8: turn QDQ matmul / conv2d regions into int8 x int8 -> int32 integer compute.

Static int8, step 3 of 3: after :class:`AnnotateQDQ` and :class:`FoldQuantScales`, before
``LegalizeOps``. It looks for regions::

    x_f = dequantize(x_q, s_x, z_x)               # x_q int8 or uint8, per-tensor
    w_f = dequantize(W_q, s_w, 0, axis=out_ch)    # W_q a constant int8 tensor, symmetric
    y = matmul(x_f, w_f) | conv2d(x_f, w_f)       # matmul: W is [K, N]; conv2d: NCHW/OIHW
    [y = add(y, bias)]                            # constant, per output channel
    [y = relu(y)]
    [y = quantize(y, s_y, z_y)]                   # the next layer's input, per-tensor

(each optional step only when the previous value has no other reader) and rewrites them
to integer compute::

    acc = matmul(x_q, W_q, out_dtype="int32")     # or conv2d(pad(x_q, value=z_x), W_q, ...)
    acc = acc + (round(bias / (s_x * s_w)) - z_x * sum_k W_q)   # one int32 constant per channel
    acc = relu(acc)                               # in the integer domain
    y = requantize(acc)  or  dequantize(acc, s_x * s_w, 0)      # the latter if not quantized

Weights are symmetric, so ``z_w = 0`` and the zero-point correction is a compile-time
constant. The accumulation is int32 (the operands stay int8/uint8). A quantized output is
requantized with one merged multiplier per output channel, ``m = s_x * s_w / s_y``:

- ``requantize="float"``: ``quantize(float32(acc) * m, 1.0, z_y)`` (round half to even);
- ``requantize="integer"``: fixed-point ``m ~= M * 2**(shift - 31)`` with int64 intermediates,
  bit-exact with ``tvmq.core.qmath.requantize_int`` (gemmlowp/TFLite).

A ``clip`` (``relu6``) between the accumulator and the quantize becomes a clamp of the
requantized integers to ``z_y + round([lo, hi] / s_y)`` -- exact, since rounding is
monotone. A matmul whose activation has more than two dims (``[B, S, K] @ [K, N]``) runs
as the 2-D ``matmul(reshape(x_q, [-1, K]), W_q)`` and its int32 result is reshaped back.

Reshape, permute_dims, broadcast_to (the heads split of a transformer's Q/K/V projections)
and a nearest-neighbour resize2d between the accumulator and the quantize move after the
requantize too.

A matmul of two activations (attention's ``Q @ K^T``, ``P @ V``; batched, any rank >= 2)::

    y = matmul(dequantize(a_q, s_a, z_a), dequantize(b_q, s_b, z_b))   # per-tensor
    [y = reshape | permute_dims | broadcast_to (y) ...]
    [y = quantize(y, s_y, z_y)]

becomes an integer matmul (int8/uint8 x int8/uint8 -> int32, mixed signs allowed) with
the zero-point terms computed at run time (a term whose zero point is 0 is left out)::

    acc = matmul(a_q, b_q, out_dtype="int32")
    acc = acc - z_b * rowsum(a_q) - z_a * colsum(b_q) + K * z_a * z_b
    y = requantize(acc, s_a * s_b / s_y)  or  dequantize(acc, s_a * s_b, 0)

Weightless ops between quantized tensors (see ``AnnotateQDQ``'s tensor sites):

- ``quantize([clip](add(dequantize(a_q, s_a, z_a), dequantize(b_q, s_b, z_b))), s_y, z_y)``
  -> an integer add (TFLite ADD): both operands requantized to the output scale and
  summed -- in float32 (``requantize="float"``) or with fixed-point multipliers and a
  ``2**20`` headroom shift (``"integer"``) -- then clamped to the output dtype (and clip).
- ``quantize(concat(dequantize(x_i, s_i, z_i)...), s_y, z_y)`` -> ``concat`` of the
  integers; an input with other parameters than the output is requantized first.

Anything else stays float: quantize/dequantize of the remaining float ops, and matmul /
conv2d regions that do not fit (non-constant or asymmetric weight, per-channel activation
parameters, other layouts). For every function it lowered, the pass records the matmul /
conv2d ops that still compute in float in the function attribute ``"tvmq.float_ops"``
(``"<op>:<var name>"``). Outputs do not match the pattern (their operands are not
``dequantize``), so the rewrite terminates and running it twice is the same as once.

The regions are recognised by ``int8_regions.find_regions``; the fixed-point requantize
ops come from ``requantize_int``. This module emits the integer compute.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvmq.core import qmath
from tvmq.errors import TvmqError

from .analysis import with_float_ops
from .int8_regions import (
    ActMatmulRegion,
    AddRegion,
    ConcatRegion,
    RequantRegion,
    WeightRegion,
    find_regions,
    weight_offset,
)
from .relax_utils import const_f32, const_i32, const_i64, relax_functions
from .requantize_int import multiply_by_quantized_multiplier, requantize_int_expr


def _clamp_bounds(clip, s_y: float, z_y: int, dtype: str) -> tuple[int, int]:
    """Integer output range of ``quantize(clip(y, lo, hi), s_y, z_y)`` (float32 rounding)."""
    qmin, qmax = qmath.qrange(dtype)
    if clip is None:
        return qmin, qmax
    lo, hi = clip

    def q(v):
        if not np.isfinite(v):
            return qmin if v < 0 else qmax
        return z_y + int(np.rint(np.float32(v) / np.float32(s_y)))

    return max(qmin, min(qmax, q(lo))), max(qmin, min(qmax, q(hi)))


def _channel_shape(kind: str, out_ndim: int, channels: int) -> tuple[int, ...]:
    """Shape of a per-channel constant broadcasting against the op's result."""
    return (channels,) if kind == "matmul" else (1, channels, 1, 1)


_ADD_LEFT_SHIFT = 20


@mutator
class _Lowerer(PyExprMutator):
    """Emits the integer compute of each region at its tail binding."""

    def __init__(self, mod: tvm.IRModule, regions: dict, requantize: str):
        super().__init__(mod)
        self.regions = regions
        self.requantize = requantize

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        region = self.regions.get(binding.var)
        if region is None:
            super().visit_var_binding_(binding)
            return
        if isinstance(region, AddRegion):
            value = self._lower_add(region)
        elif isinstance(region, ConcatRegion):
            value = self._lower_concat(region)
        elif isinstance(region, ActMatmulRegion):
            value = self._lower_act_matmul(region)
        elif isinstance(region, RequantRegion):
            value = self._requantize(self.visit_expr(region.x_q), region.s, region.z, region.out_q)
        else:
            value = self._lower(region)
        value = self.builder_.normalize(value)
        self.builder_.emit_normalized(relax.VarBinding(binding.var, value))

    def _requantize(self, q, s_in: float, z_in: int, out_q, bounds=None) -> relax.Expr:
        """`q` (per-tensor ``s_in, z_in``) requantized to ``out_q``, clamped to `bounds`."""
        bb = self.builder_
        s_y, z_y, dtype = out_q
        multiplier = np.float64(s_in) / np.float64(s_y)
        if self.requantize == "integer":
            a = bb.emit(relax.op.astype(q, "int64"))
            if z_in != 0:
                a = bb.emit(relax.op.subtract(a, const_i64(z_in)))
            m, sh = qmath.quantize_multiplier(multiplier)
            return requantize_int_expr(bb, a, m, sh, z_y, dtype, (), bounds)
        x = bb.emit(relax.op.astype(q, "float32"))
        if z_in != 0:
            x = bb.emit(relax.op.subtract(x, const_f32(z_in)))
        scaled = bb.emit(relax.op.multiply(x, const_f32(multiplier)))
        return self._quantize_scaled(scaled, z_y, dtype, bounds)

    def _quantize_scaled(self, scaled, z_y: int, dtype: str, bounds) -> relax.Expr:
        """``quantize(scaled, 1, z_y)`` (float requantize), clamped to `bounds` when narrower."""
        out = relax.op.quantize(scaled, const_f32(1.0), const_i32(z_y), axis=-1, out_dtype=dtype)
        if bounds is not None and tuple(bounds) != qmath.qrange(dtype):
            out = relax.op.clip(self.builder_.emit(out), int(bounds[0]), int(bounds[1]))
        return out

    def _lower_add(self, r: AddRegion) -> relax.Expr:
        bb = self.builder_
        s_y, z_y, dtype = r.out_q
        bounds = _clamp_bounds(r.clip, s_y, z_y, dtype)
        (a_q, s_a, z_a), (b_q, s_b, z_b) = r.inputs
        a_q, b_q = self.visit_expr(a_q), self.visit_expr(b_q)
        if self.requantize == "integer":
            # TFLite ADD: shift left by 20, scale each operand by s / (2 max(s_a, s_b)) (< 1),
            # add, then scale the sum by 2 max(s_a, s_b) / (2**20 s_y) into the output.
            twice_max = 2.0 * max(s_a, s_b)
            terms = []
            for q, s, z in ((a_q, s_a, z_a), (b_q, s_b, z_b)):
                t = bb.emit(relax.op.astype(q, "int64"))
                if z != 0:
                    t = bb.emit(relax.op.subtract(t, const_i64(z)))
                t = bb.emit(relax.op.left_shift(t, const_i64(_ADD_LEFT_SHIFT)))
                m, sh = qmath.quantize_multiplier(np.float64(s) / twice_max)
                terms.append(multiply_by_quantized_multiplier(bb, t, m, sh))
            total = bb.emit(relax.op.add(*terms))
            m, sh = qmath.quantize_multiplier(twice_max / (2.0**_ADD_LEFT_SHIFT * s_y))
            return requantize_int_expr(bb, total, m, sh, z_y, dtype, (), bounds)
        terms = []
        for q, s, z in ((a_q, s_a, z_a), (b_q, s_b, z_b)):
            t = bb.emit(relax.op.astype(q, "float32"))
            if z != 0:
                t = bb.emit(relax.op.subtract(t, const_f32(z)))
            terms.append(bb.emit(relax.op.multiply(t, const_f32(np.float64(s) / s_y))))
        total = bb.emit(relax.op.add(*terms))
        return self._quantize_scaled(total, z_y, dtype, bounds)

    def _lower_concat(self, r: ConcatRegion) -> relax.Expr:
        s_y, z_y, dtype = r.out_q
        fields = []
        for q, s, z in r.inputs:
            q = self.visit_expr(q)
            if (np.float32(s), z, str(q.ty.dtype)) != (np.float32(s_y), z_y, dtype):
                q = self.builder_.emit(self._requantize(q, s, z, r.out_q))
            fields.append(q)
        return relax.op.concat(fields, axis=r.axis)

    def _zero_point_term(self, x_q, axis: int, z_other: int) -> relax.Expr:
        """``z_other * sum(x_q, axis, keepdims)`` in int32: one zero-point correction."""
        bb = self.builder_
        x = bb.emit(relax.op.astype(x_q, "int32"))
        total = bb.emit(relax.op.sum(x, axis=[axis], keepdims=True))
        return bb.emit(relax.op.multiply(total, const_i32(z_other)))

    def _lower_act_matmul(self, r: ActMatmulRegion) -> relax.Expr:
        """``sum (a - z_a)(b - z_b) = sum ab - z_b rowsum(a) - z_a colsum(b) + K z_a z_b``."""
        bb = self.builder_
        (a_q, s_a, z_a), (b_q, s_b, z_b) = r.a, r.b
        a_q, b_q = self.visit_expr(a_q), self.visit_expr(b_q)
        acc = bb.emit(relax.op.matmul(a_q, b_q, out_dtype="int32"))
        if z_b != 0:
            term = self._zero_point_term(a_q, a_q.ty.ndim - 1, z_b)
            acc = bb.emit(relax.op.subtract(acc, term))
        if z_a != 0:
            term = self._zero_point_term(b_q, b_q.ty.ndim - 2, z_a)
            acc = bb.emit(relax.op.subtract(acc, term))
        if z_a != 0 and z_b != 0:
            acc = bb.emit(relax.op.add(acc, const_i32(r.k * z_a * z_b)))
        acc_scale = np.float64(s_a) * np.float64(s_b)
        if r.out_q is None:
            return relax.op.dequantize(
                acc, const_f32(acc_scale), const_i32(0), axis=-1, out_dtype="float32"
            )
        out = self._requantize(acc, acc_scale, 0, r.out_q)
        for call in r.passthrough:
            out = relax.Call(call.op, [bb.emit(out), *call.args[1:]], call.attrs)
        return out

    def _lower(self, r: WeightRegion) -> relax.Expr:
        bb = self.builder_
        x_q = self.visit_expr(r.x_q)
        channels = r.s_w.size
        shape = _channel_shape(r.kind, r.call.ty.ndim, channels)
        w_q = relax.const(r.w_q, "int8")
        if r.kind == "matmul":
            out_shape = r.call.ty.shape
            if r.call.ty.ndim > 2 and out_shape is not None:
                # [B, S, K] @ [K, N] as the 2-D int8 matmul the target kernels match.
                x_q = bb.emit(relax.op.reshape(x_q, (-1, int(r.w_q.shape[0]))))
                acc = bb.emit(relax.op.matmul(x_q, w_q, out_dtype="int32"))
                acc = bb.emit(relax.op.reshape(acc, out_shape))
            else:
                acc = bb.emit(relax.op.matmul(x_q, w_q, out_dtype="int32"))
        else:
            a = r.call.attrs
            padding = [int(p) for p in a.padding]
            if r.z_x != 0 and any(padding):
                # Pad with the zero point (the real 0), then convolve without padding.
                top, left, bottom, right = padding
                x_q = bb.emit(
                    relax.op.nn.pad(
                        x_q, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(r.z_x)
                    )
                )
                padding = [0, 0, 0, 0]
            acc = bb.emit(
                relax.op.nn.conv2d(
                    x_q,
                    w_q,
                    strides=a.strides,
                    padding=padding,
                    dilation=a.dilation,
                    groups=a.groups,
                    data_layout="NCHW",
                    kernel_layout="OIHW",
                    out_layout="NCHW",
                    out_dtype="int32",
                )
            )
        acc_scale = np.float64(r.s_x) * r.s_w.astype(np.float64)
        offset = weight_offset(r)
        if np.any(offset != 0):
            acc = bb.emit(relax.op.add(acc, const_i32(offset.reshape(shape))))
        if r.relu:
            acc = bb.emit(relax.op.nn.relu(acc))
        axis = r.call.ty.ndim - 1 if r.kind == "matmul" else 1
        if r.out_q is None:
            return relax.op.dequantize(
                acc, const_f32(acc_scale), const_i32(0), axis=axis, out_dtype="float32"
            )
        s_y, z_y, dtype = r.out_q
        bounds = None if r.clip is None else _clamp_bounds(r.clip, s_y, z_y, dtype)
        multiplier = acc_scale / np.float64(s_y)
        if self.requantize == "integer":
            m, sh = qmath.quantize_multiplier(multiplier)
            out = requantize_int_expr(bb, acc, m, sh, z_y, dtype, shape, bounds)
        else:
            scaled = bb.emit(
                relax.op.multiply(
                    relax.op.astype(acc, "float32"), const_f32(multiplier.reshape(shape))
                )
            )
            out = self._quantize_scaled(scaled, z_y, dtype, bounds)
        for call in r.passthrough:
            out = relax.Call(call.op, [bb.emit(out), *call.args[1:]], call.attrs)
        return out


@tvm.transform.module_pass(opt_level=0, name="LowerInt8")
class LowerInt8:
    """Lower QDQ matmul / conv2d regions (constant weight, or two activations) to
    int8 x int8 -> int32 compute, and QDQ add / concat / requantize between quantized
    tensors to integer ops.

    Parameters
    ----------
    requantize : {"float", "integer"}
        Requantize int32 accumulators with a float multiply, or with a fixed-point
        multiplier and shift (integer-only).
    """

    def __init__(self, requantize: str = "float"):
        if requantize not in ("float", "integer"):
            raise TvmqError(f"requantize must be 'float' or 'integer', got {requantize!r}")
        self.requantize = requantize

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gv, func in relax_functions(mod):
            regions = find_regions(func)
            if not regions:
                continue
            new_func = _Lowerer(mod, regions, self.requantize).visit_expr(func)
            new_func = relax.analysis.remove_all_unused(new_func)
            updates[gv] = with_float_ops(new_func)
        if not updates:
            return mod
        mod = mod.clone()
        for gv, func in updates.items():
            mod[gv] = func
        return mod
