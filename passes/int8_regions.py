"""The int8 regions :class:`LowerInt8` rewrites, recognised in a Relax function.

:func:`find_regions` walks a function's bindings and returns, for each region, the var of
its last binding (where ``LowerInt8`` emits the integer compute) and what it found: a
weight region (``dequantize -> matmul | conv2d [-> add bias] [-> relu] [-> clip]
[-> reshape...] [-> quantize]``), an activation matmul, a quantized add, a concat or a
requantize. Everything but the quantized activations is read at compile time here: scales,
zero points, int8 weights, the per-channel bias. See ``lower_int8.py`` for the patterns
and the integer compute they become; a region is matched only where each intermediate
value has no other reader, so lowering it removes nothing another op still needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from .relax_utils import (
    ADD,
    CONCAT,
    CONV2D,
    DEQUANTIZE,
    MATMUL,
    QUANTIZE,
    binding_map,
    clip_bounds,
    const_value,
    op_name,
    ordered_bindings,
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


def commutes_with_requantize(value) -> bool:
    """Whether `value` is a call that commutes with a per-tensor requantize: one of
    ``_PASSTHROUGH``, or a nearest-neighbour ``resize2d`` (a gather: YOLO's upsample)."""
    name = op_name(value)
    if name == "relax.image.resize2d":
        a = value.attrs
        return (
            str(a.method) == "nearest_neighbor"
            and str(a.coordinate_transformation_mode) != "tf_crop_and_resize"  # extrapolates
        )
    return name in _PASSTHROUGH


@dataclass
class WeightRegion:
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
class ActMatmulRegion:
    """``matmul(dequantize(a_q), dequantize(b_q))`` of two activations, [passthrough, quantize]."""

    a: tuple[relax.Expr, float, int]  # (a_q, s_a, z_a)
    b: tuple[relax.Expr, float, int]  # (b_q, s_b, z_b)
    k: int  # the reduction length (a's last dim)
    out_q: tuple[float, int, str] | None
    passthrough: tuple[relax.Call, ...] = ()


@dataclass
class AddRegion:
    """``quantize([relu|clip](add(dequantize(a_q), dequantize(b_q))))``."""

    inputs: tuple[tuple[relax.Expr, float, int], ...]  # (x_q, s, z) per operand
    out_q: tuple[float, int, str]
    clip: tuple[float, float] | None


@dataclass
class RequantRegion:
    """``quantize(dequantize(x_q, s, z), s_y, z_y)`` with other parameters: integer requantize."""

    x_q: relax.Expr
    s: float
    z: int
    out_q: tuple[float, int, str]


@dataclass
class ConcatRegion:
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


class Users:
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


def match_region(var, call, bindings, users: Users) -> tuple[relax.Var, WeightRegion] | None:
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
    region = WeightRegion(kind, call, x_q, s_x, z_x, w_q, s_w, None, False, None)
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
    while commutes_with_requantize(value) and value.args[0].same_as(cur):
        passthrough.append(value)
        cur = nxt
        nxt = users.only_reader(cur)
        value = bindings.get(nxt)
    out_q = match_output(value, bindings)
    if out_q is not None:
        region.out_q, region.clip = out_q, clip
        region.passthrough = tuple(passthrough)
        tail = nxt
    # Without a quantize at the end, clip and passthrough ops stay float (not in the region).
    if not _fits_int32(region):
        return None  # a bias far off the accumulator grid, or a huge K: stay float
    return tail, region


def match_passthrough_quantize(var, bindings, users: Users):
    """(tail var, passthrough calls, out_q) when `var` reaches a quantize through
    passthrough ops only, else (var, (), None)."""
    cur, passthrough = var, []
    nxt = users.only_reader(cur)
    value = bindings.get(nxt)
    while commutes_with_requantize(value) and value.args[0].same_as(cur):
        passthrough.append(value)
        cur = nxt
        nxt = users.only_reader(cur)
        value = bindings.get(nxt)
    out_q = match_output(value, bindings)
    if out_q is None:
        return var, (), None
    return nxt, tuple(passthrough), out_q


def _act_matmul_fits_int32(k: int) -> bool:
    """Whether ``sum ab``, the zero-point terms and every partial sum fit in int32.

    Each of ``sum ab``, ``z_b * rowsum(a)``, ``z_a * colsum(b)``, ``K z_a z_b`` is at most
    ``K * 255 * 255`` in magnitude.
    """
    return 4 * k * 255 * 255 < 2**31


def _match_act_matmul(var, call, bindings, users: Users):
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
    tail, passthrough, out_q = match_passthrough_quantize(var, bindings, users)
    return tail, ActMatmulRegion(a, b, int(k), out_q, passthrough)


def _match_matmul(var, call, bindings, users: Users):
    """A weight region (:func:`match_region`), else an activation matmul, else None."""
    found = match_region(var, call, bindings, users)
    return found if found is not None else _match_act_matmul(var, call, bindings, users)


def match_output(value, bindings) -> tuple[float, int, str] | None:
    """(s_y, z_y, dtype) of a per-tensor quantize to int8/uint8, else None."""
    if op_name(value) != QUANTIZE or str(value.attrs.out_dtype) not in _ACT_DTYPES:
        return None
    s_y, z_y = _scalar(value.args[1], bindings), _scalar(value.args[2], bindings)
    if s_y is None or z_y is None or not s_y > 0:
        return None
    return float(s_y), int(z_y), str(value.attrs.out_dtype)


def _match_add(var, call, bindings, users: Users) -> tuple[relax.Var, AddRegion] | None:
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
    out_q = match_output(value, bindings)
    if out_q is None:
        return None
    clip = None if (lo, hi) == (-np.inf, np.inf) else (lo, hi)
    return nxt, AddRegion(inputs, out_q, clip)


def _match_concat(var, call, bindings, users: Users) -> tuple[relax.Var, ConcatRegion] | None:
    """(tail var, region) for ``quantize(concat(dq(x_0), dq(x_1), ...))``, else None."""
    fields = resolve(call.args[0], bindings)
    if not isinstance(fields, relax.Tuple) or str(call.ty.dtype) != "float32":
        return None
    inputs = tuple(_match_input(f, bindings) for f in fields.fields)
    if not inputs or any(i is None for i in inputs):
        return None
    nxt = users.only_reader(var)
    out_q = match_output(bindings.get(nxt), bindings)
    if out_q is None or call.attrs.axis is None:
        return None
    return nxt, ConcatRegion(inputs, int(call.attrs.axis), out_q)


def _match_requantize(var, call, bindings, _users) -> tuple[relax.Var, RequantRegion] | None:
    """(var, region) for ``quantize(dequantize(x_q))`` between two int8/uint8 params, else None."""
    inp = _match_input(call.args[0], bindings)
    out_q = match_output(call, bindings)
    if inp is None or out_q is None:
        return None
    return var, RequantRegion(*inp, out_q)


def weight_offset(r: WeightRegion) -> np.ndarray:
    """``round(bias / (s_x * s_w)) - z_x * sum_k W_q`` per output channel, in int64."""
    axes = 0 if r.kind == "matmul" else (1, 2, 3)
    offset = -np.int64(r.z_x) * r.w_q.astype(np.int64).sum(axis=axes)
    if r.bias is not None:
        acc_scale = np.float64(r.s_x) * r.s_w.astype(np.float64)
        offset = offset + np.rint(r.bias / acc_scale).astype(np.int64)
    return offset


def _fits_int32(r: WeightRegion) -> bool:
    """Whether the int32 accumulator can hold the offset and any sum of products."""
    k = r.w_q[0].size if r.kind == "conv2d" else r.w_q.shape[0]
    # |x_q| <= 255 and |W_q| <= 128: the raw sum, then the offset added to it.
    bound = k * 255 * 128 + np.abs(weight_offset(r)).max(initial=0)
    return bool(bound < 2**31)


_MATCHERS = {
    MATMUL: _match_matmul,
    CONV2D: match_region,
    ADD: _match_add,
    CONCAT: _match_concat,
    QUANTIZE: _match_requantize,
}


def find_regions(func: relax.Function) -> dict[relax.Var, object]:
    """The lowerable regions of `func`: tail var -> region (one of the region dataclasses)."""
    bindings = binding_map(func)
    users = Users(func)
    regions = {}
    for b in ordered_bindings(func):
        if not isinstance(b, relax.VarBinding):
            continue
        match = _MATCHERS.get(op_name(b.value))
        if match is not None:
            found = match(b.var, b.value, bindings, users)
            if found is not None:
                regions[found[0]] = found[1]
    return regions
