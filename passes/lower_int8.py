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

Reshape, permute_dims and broadcast_to between the accumulator and the quantize (the
heads split of a transformer's Q/K/V projections) move after the requantize too.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvmq.core import qmath
from tvmq.errors import TvmqError

from .analysis import with_float_ops
from .relax_utils import (
    ADD,
    CONCAT,
    CONV2D,
    DEQUANTIZE,
    MATMUL,
    QUANTIZE,
    binding_map,
    clip_bounds,
    const_f32,
    const_i32,
    const_value,
    op_name,
    ordered_bindings,
    relax_functions,
    resolve,
)
from .sites import SITE_OPS

_ACT_DTYPES = ("int8", "uint8")
# Ops that commute with a per-tensor requantize (monotone, or moving elements only):
# between the accumulator and the next quantize they run on the int8 result instead.
_PASSTHROUGH = (
    "relax.nn.max_pool2d",
    "relax.reshape",
    "relax.permute_dims",
    "relax.broadcast_to",
)


@dataclass
class _Region:
    """One matched region, everything computed at compile time except the activation."""

    kind: str  # "matmul" or "conv2d"
    call: relax.Call  # the float op
    x_q: relax.Expr  # the quantized activation (original IR)
    s_x: float
    z_x: int
    w_q: np.ndarray  # int8 weight, in the op's layout
    s_w: np.ndarray  # [C] float32
    bias: np.ndarray | None  # [C] float
    relu: bool
    out_q: tuple[float, int, str] | None  # (s_y, z_y, dtype) when the region ends in quantize
    passthrough: tuple[relax.Call, ...] = ()  # ops moved after the requantize (on int8)
    clip: tuple[float, float] | None = None  # clamps the requantized result (out_q only)


@dataclass
class _ActMatmulRegion:
    """``matmul(dequantize(a_q), dequantize(b_q))`` of two activations, [passthrough, quantize]."""

    a: tuple[relax.Expr, float, int]  # (a_q, s_a, z_a)
    b: tuple[relax.Expr, float, int]  # (b_q, s_b, z_b)
    k: int  # the reduction length (a's last dim)
    out_q: tuple[float, int, str] | None
    passthrough: tuple[relax.Call, ...] = ()


@dataclass
class _AddRegion:
    """``quantize([relu|clip](add(dequantize(a_q), dequantize(b_q))))``."""

    inputs: tuple[tuple[relax.Expr, float, int], ...]  # (x_q, s, z) per operand
    out_q: tuple[float, int, str]
    clip: tuple[float, float] | None


@dataclass
class _RequantRegion:
    """``quantize(dequantize(x_q, s, z), s_y, z_y)`` with other parameters: integer requantize."""

    x_q: relax.Expr
    s: float
    z: int
    out_q: tuple[float, int, str]


@dataclass
class _ConcatRegion:
    """``quantize(concat(dequantize(x_i)...))``."""

    inputs: tuple[tuple[relax.Expr, float, int], ...]
    axis: int
    out_q: tuple[float, int, str]


def _scalar(expr, bindings) -> float | None:
    v = const_value(expr, bindings)
    return None if v is None or v.size != 1 else v.reshape(()).item()


def _match_input(expr, bindings) -> tuple[relax.Expr, float, int] | None:
    """(x_q, s_x, z_x) when `expr` is a per-tensor dequantize of int8/uint8, else None."""
    dq = resolve(expr, bindings)
    if op_name(dq) != DEQUANTIZE or str(dq.attrs.out_dtype) != "float32":
        return None
    x_q = dq.args[0]
    if str(x_q.ty.dtype) not in _ACT_DTYPES or const_value(x_q, bindings) is not None:
        return None
    s, z = _scalar(dq.args[1], bindings), _scalar(dq.args[2], bindings)
    if s is None or z is None or not s > 0:
        return None
    return x_q, float(s), int(z)


def _match_weight(expr, bindings, kind: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(W_q int8, s_w [C]) for a symmetric dequantize of a constant int8 weight, else None."""
    dq = resolve(expr, bindings)
    if op_name(dq) != DEQUANTIZE or str(dq.attrs.out_dtype) != "float32":
        return None
    w = const_value(dq.args[0], bindings)
    s = const_value(dq.args[1], bindings)
    z = const_value(dq.args[2], bindings)
    if w is None or s is None or z is None or w.dtype != np.int8 or np.any(z != 0):
        return None
    ch_axis = 1 if kind == "matmul" else 0
    if w.ndim != (2 if kind == "matmul" else 4):
        return None
    channels = w.shape[ch_axis]
    if s.size == 1:
        s = np.full(channels, s.reshape(()), dtype=np.float32)
    elif s.size != channels or int(dq.attrs.axis) % w.ndim != ch_axis:
        return None
    if not np.all(s.ravel() > 0):
        return None
    return w, s.ravel().astype(np.float32)


def _bias_vector(value: np.ndarray | None, kind: str, channels: int, out_ndim: int):
    """The per-channel bias as a [C] vector if `value` broadcasts only along the channel."""
    if value is None:
        return None
    if kind == "matmul":
        ok = value.ndim <= out_ndim and value.shape[-1:] == (channels,) and value.size == channels
    else:
        ok = value.shape in ((1, channels, 1, 1), (channels, 1, 1))
    return value.reshape(-1).astype(np.float64) if ok else None


class _Users:
    """Which bindings read each var (and whether the function returns it)."""

    def __init__(self, func: relax.Function):
        self.readers: dict[relax.Var, list[relax.Var]] = {}
        self.returned: set[relax.Var] = set()
        for b in ordered_bindings(func):

            def note(e, owner=b.var):
                if isinstance(e, relax.Var):
                    self.readers.setdefault(e, []).append(owner)

            relax.analysis.post_order_visit(b.value, note)
        relax.analysis.post_order_visit(
            func.body.body, lambda e: self.returned.add(e) if isinstance(e, relax.Var) else None
        )

    def only_reader(self, var: relax.Var) -> relax.Var | None:
        readers = self.readers.get(var, [])
        if len(readers) == 1 and var not in self.returned:
            return readers[0]
        return None


def _match_region(var, call, bindings, users: _Users) -> tuple[relax.Var, _Region] | None:
    """(tail var, region) for a lowerable matmul/conv2d binding, else None."""
    kind = SITE_OPS.get(op_name(call))
    if kind is None or len(call.args) != 2 or str(call.ty.dtype) != "float32":
        return None
    if kind == "conv2d":
        a = call.attrs
        if a.data_layout != "NCHW" or a.kernel_layout != "OIHW" or a.out_layout != "NCHW":
            return None
    inp = _match_input(call.args[0], bindings)
    wgt = _match_weight(call.args[1], bindings, kind)
    if inp is None or wgt is None:
        return None
    x_q, s_x, z_x = inp
    w_q, s_w = wgt
    region = _Region(kind, call, x_q, s_x, z_x, w_q, s_w, None, False, None)
    out_ndim = call.ty.ndim
    tail = var

    nxt = users.only_reader(tail)
    value = bindings.get(nxt)
    if op_name(value) == "relax.add":
        lhs, rhs = value.args
        other = rhs if lhs.same_as(tail) else lhs
        bias = _bias_vector(const_value(other, bindings), kind, s_w.size, out_ndim)
        if bias is not None and value.ty.ndim == out_ndim:
            region.bias, tail = bias, nxt
            nxt = users.only_reader(tail)
            value = bindings.get(nxt)
    if op_name(value) == "relax.nn.relu":
        region.relu, tail = True, nxt
        nxt = users.only_reader(tail)
        value = bindings.get(nxt)
    # A clip (relu6) stays float unless the region ends in a quantize: then it clamps ints.
    cur = tail
    clip = clip_bounds(value) if op_name(value) == "relax.clip" else None
    if clip is not None:
        cur = nxt
        nxt = users.only_reader(cur)
        value = bindings.get(nxt)
    # Ops that commute with the requantize may sit between the accumulator and the quantize.
    passthrough = []
    while op_name(value) in _PASSTHROUGH and value.args[0].same_as(cur):
        passthrough.append(value)
        cur = nxt
        nxt = users.only_reader(cur)
        value = bindings.get(nxt)
    out_q = _match_output(value, bindings)
    if out_q is not None:
        region.out_q, region.clip = out_q, clip
        region.passthrough = tuple(passthrough)
        tail = nxt
    # Without a quantize at the end, clip and passthrough ops stay float (not in the region).
    if not _fits_int32(region):
        return None  # a bias far off the accumulator grid, or a huge K: stay float
    return tail, region


def _match_passthrough_quantize(var, bindings, users: _Users):
    """(tail var, passthrough calls, out_q) when `var` reaches a quantize through
    passthrough ops only, else (var, (), None)."""
    cur, passthrough = var, []
    nxt = users.only_reader(cur)
    value = bindings.get(nxt)
    while op_name(value) in _PASSTHROUGH and value.args[0].same_as(cur):
        passthrough.append(value)
        cur = nxt
        nxt = users.only_reader(cur)
        value = bindings.get(nxt)
    out_q = _match_output(value, bindings)
    if out_q is None:
        return var, (), None
    return nxt, tuple(passthrough), out_q


def _act_matmul_fits_int32(k: int) -> bool:
    """Whether ``sum ab``, the zero-point terms and every partial sum fit in int32.

    Each of ``sum ab``, ``z_b * rowsum(a)``, ``z_a * colsum(b)``, ``K z_a z_b`` is at most
    ``K * 255 * 255`` in magnitude.
    """
    return 4 * k * 255 * 255 < 2**31


def _match_act_matmul(var, call, bindings, users: _Users):
    """(tail var, region) for ``matmul(dq(a_q), dq(b_q))`` of two activations, else None."""
    if len(call.args) != 2 or str(call.ty.dtype) != "float32":
        return None
    a, b = (_match_input(x, bindings) for x in call.args)
    if a is None or b is None or min(a[0].ty.ndim, b[0].ty.ndim) < 2:
        return None
    shape = a[0].ty.shape
    k = shape[-1] if shape is not None else None
    if not isinstance(k, tvm.tirx.IntImm) or not _act_matmul_fits_int32(int(k)):
        return None
    tail, passthrough, out_q = _match_passthrough_quantize(var, bindings, users)
    return tail, _ActMatmulRegion(a, b, int(k), out_q, passthrough)


def _match_matmul(var, call, bindings, users: _Users):
    """A weight region (:func:`_match_region`), else an activation matmul, else None."""
    found = _match_region(var, call, bindings, users)
    return found if found is not None else _match_act_matmul(var, call, bindings, users)


def _match_output(value, bindings) -> tuple[float, int, str] | None:
    """(s_y, z_y, dtype) of a per-tensor quantize to int8/uint8, else None."""
    if op_name(value) != QUANTIZE or str(value.attrs.out_dtype) not in _ACT_DTYPES:
        return None
    s_y, z_y = _scalar(value.args[1], bindings), _scalar(value.args[2], bindings)
    if s_y is None or z_y is None or not s_y > 0:
        return None
    return float(s_y), int(z_y), str(value.attrs.out_dtype)


def _match_add(var, call, bindings, users: _Users) -> tuple[relax.Var, _AddRegion] | None:
    """(tail var, region) for ``quantize([clip](add(dq(a), dq(b))))``, else None."""
    if len(call.args) != 2 or str(call.ty.dtype) != "float32":
        return None
    inputs = tuple(_match_input(a, bindings) for a in call.args)
    if any(i is None for i in inputs):
        return None
    cur, lo, hi = var, -np.inf, np.inf
    nxt = users.only_reader(cur)
    value = bindings.get(nxt)
    while op_name(value) in ("relax.nn.relu", "relax.clip") and value.args[0].same_as(cur):
        bounds = clip_bounds(value)
        if bounds is None:
            return None
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
        cur = nxt
        nxt = users.only_reader(cur)
        value = bindings.get(nxt)
    out_q = _match_output(value, bindings)
    if out_q is None:
        return None
    clip = None if (lo, hi) == (-np.inf, np.inf) else (lo, hi)
    return nxt, _AddRegion(inputs, out_q, clip)


def _match_concat(var, call, bindings, users: _Users) -> tuple[relax.Var, _ConcatRegion] | None:
    """(tail var, region) for ``quantize(concat(dq(x_0), dq(x_1), ...))``, else None."""
    fields = resolve(call.args[0], bindings)
    if not isinstance(fields, relax.Tuple) or str(call.ty.dtype) != "float32":
        return None
    inputs = tuple(_match_input(f, bindings) for f in fields.fields)
    if not inputs or any(i is None for i in inputs):
        return None
    nxt = users.only_reader(var)
    out_q = _match_output(bindings.get(nxt), bindings)
    if out_q is None or call.attrs.axis is None:
        return None
    return nxt, _ConcatRegion(inputs, int(call.attrs.axis), out_q)


def _match_requantize(var, call, bindings, _users) -> tuple[relax.Var, _RequantRegion] | None:
    """(var, region) for ``quantize(dequantize(x_q))`` between two int8/uint8 params, else None."""
    inp = _match_input(call.args[0], bindings)
    out_q = _match_output(call, bindings)
    if inp is None or out_q is None:
        return None
    return var, _RequantRegion(*inp, out_q)


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


def _offset(r: _Region) -> np.ndarray:
    """``round(bias / (s_x * s_w)) - z_x * sum_k W_q`` per output channel, in int64."""
    axes = 0 if r.kind == "matmul" else (1, 2, 3)
    offset = -np.int64(r.z_x) * r.w_q.astype(np.int64).sum(axis=axes)
    if r.bias is not None:
        acc_scale = np.float64(r.s_x) * r.s_w.astype(np.float64)
        offset = offset + np.rint(r.bias / acc_scale).astype(np.int64)
    return offset


def _fits_int32(r: _Region) -> bool:
    """Whether the int32 accumulator can hold the offset and any sum of products."""
    k = r.w_q[0].size if r.kind == "conv2d" else r.w_q.shape[0]
    # |x_q| <= 255 and |W_q| <= 128: the raw sum, then the offset added to it.
    bound = k * 255 * 128 + np.abs(_offset(r)).max(initial=0)
    return bool(bound < 2**31)


def _channel_shape(kind: str, out_ndim: int, channels: int) -> tuple[int, ...]:
    """Shape of a per-channel constant broadcasting against the op's result."""
    return (channels,) if kind == "matmul" else (1, channels, 1, 1)


def _i64(value) -> tvm.ir.Constant:
    return relax.const(np.asarray(value, dtype="int64"), "int64")


def _multiply_by_quantized_multiplier(bb, a, multiplier, shift) -> relax.Expr:
    """Emit gemmlowp ``MultiplyByQuantizedMultiplier(a, M, shift)`` on int64 `a` (int32 values).

    ``multiplier`` / ``shift`` are int arrays broadcasting against `a`; returns int64.
    """
    m = np.asarray(multiplier, dtype=np.int64)
    sh = np.asarray(shift, dtype=np.int64)
    left, right = np.maximum(sh, 0), np.maximum(-sh, 0)
    if np.any(left > 0):
        a = bb.emit(relax.op.left_shift(a, _i64(left)))
        a = bb.emit(relax.op.clip(a, -(2**31), 2**31 - 1))
    # SaturatingRoundingDoublingHighMul for M >= 0: (a*M + 2^30) >> 31 with a floor shift
    # equals gemmlowp's truncating form (a*M + nudge) / 2^31 in both signs.
    ab = bb.emit(relax.op.multiply(a, _i64(m)))
    high = bb.emit(relax.op.right_shift(relax.op.add(ab, _i64(1 << 30)), _i64(31)))
    # RoundingDivideByPOT (half away from zero) as one floor shift with a sign-dependent nudge.
    half = (np.int64(1) << right) >> 1
    nudge_neg = np.maximum(half - 1, 0)
    nudge = bb.emit(relax.op.where(relax.op.less(high, _i64(0)), _i64(nudge_neg), _i64(half)))
    return bb.emit(relax.op.right_shift(relax.op.add(high, nudge), _i64(right)))


def requantize_int_expr(
    bb, acc, multiplier, shift, z_y: int, dtype: str, shape, bounds=None
) -> relax.Expr:
    """Emit gemmlowp ``MultiplyByQuantizedMultiplier(acc, M, shift) + z_y``, clamped to `dtype`.

    ``multiplier`` / ``shift`` are per-channel int arrays reshaped to `shape`. The
    intermediates are int64; the result equals ``qmath.requantize_int`` bit for bit.
    ``bounds`` (qmin, qmax) narrows the clamp (a fused relu6 / clip).
    """
    m = np.asarray(multiplier, dtype=np.int64).reshape(shape)
    sh = np.asarray(shift, dtype=np.int64).reshape(shape)
    a = acc if str(acc.ty.dtype) == "int64" else bb.emit(relax.op.astype(acc, "int64"))
    y = _multiply_by_quantized_multiplier(bb, a, m, sh)
    qmin, qmax = qmath.qrange(dtype) if bounds is None else bounds
    if z_y != 0:
        y = bb.emit(relax.op.add(y, _i64(z_y)))
    y = bb.emit(relax.op.clip(y, qmin, qmax))
    return relax.op.astype(y, dtype)


# TFLite ADD: operands scaled by 2**20 before their (< 1) multipliers keep 20 bits of headroom.
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
        if isinstance(region, _AddRegion):
            value = self._lower_add(region)
        elif isinstance(region, _ConcatRegion):
            value = self._lower_concat(region)
        elif isinstance(region, _ActMatmulRegion):
            value = self._lower_act_matmul(region)
        elif isinstance(region, _RequantRegion):
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
                a = bb.emit(relax.op.subtract(a, _i64(z_in)))
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

    def _lower_add(self, r: _AddRegion) -> relax.Expr:
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
                    t = bb.emit(relax.op.subtract(t, _i64(z)))
                t = bb.emit(relax.op.left_shift(t, _i64(_ADD_LEFT_SHIFT)))
                m, sh = qmath.quantize_multiplier(np.float64(s) / twice_max)
                terms.append(_multiply_by_quantized_multiplier(bb, t, m, sh))
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

    def _lower_concat(self, r: _ConcatRegion) -> relax.Expr:
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

    def _lower_act_matmul(self, r: _ActMatmulRegion) -> relax.Expr:
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

    def _lower(self, r: _Region) -> relax.Expr:
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
        offset = _offset(r)
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


_MATCHERS = {
    MATMUL: _match_matmul,
    CONV2D: _match_region,
    ADD: _match_add,
    CONCAT: _match_concat,
    QUANTIZE: _match_requantize,
}


@tvm.transform.module_pass(opt_level=0, name="LowerInt8")
class LowerInt8:
    """Lower QDQ matmul / conv2d regions (constant weight, or two activations) to
    int8 x int8 -> int32 compute, and QDQ add / concat / requantize between quantized
    tensors to integer ops.

    Parameters
    ----------
    scheme : object, optional
        Reads ``requantize`` ("float" or "integer", default "float").
    requantize : str, optional
        Overrides ``scheme.requantize``.
    """

    def __init__(self, scheme=None, requantize: str | None = None):
        mode = requantize or getattr(scheme, "requantize", None) or "float"
        if mode not in ("float", "integer"):
            raise TvmqError(f"requantize must be 'float' or 'integer', got {mode!r}")
        self.requantize = mode

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gv, func in relax_functions(mod):
            bindings = binding_map(func)
            users = _Users(func)
            regions: dict[relax.Var, _Region] = {}
            for b in ordered_bindings(func):
                if not isinstance(b, relax.VarBinding):
                    continue
                match = _MATCHERS.get(op_name(b.value))
                if match is not None:
                    found = match(b.var, b.value, bindings, users)
                    if found is not None:
                        regions[found[0]] = found[1]
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
