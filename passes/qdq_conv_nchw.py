"""QDQConvToNCHW: channels-last quantized convolutions (TFLite's) into the NCHW form LowerInt8 reads.

Where it belongs: after :class:`CanonicalizeQDQ`, before ``static_int8_passes``, on an
imported QDQ module whose convolutions are NHWC (TVM's TFLite frontend writes them so, with
``HWIO`` kernels, and ``HWOI`` behind a ``reshape`` for depthwise ones). :class:`LowerInt8`
only matches NCHW / OIHW convolutions, so without this pass those layers would stay float
between their quantize / dequantize. A region::

    y = conv2d(dequantize(x_q, s, z), dequantize(W_q, s_w, 0), NHWC, HWIO | HWOI)
    y = add(y, bias)                     # optional, a constant [C] (or [1, 1, 1, C])
    q = quantize(y, s_o, z_o)            # per tensor
    q = clip(q, lo, hi)                  # optional (a fused ReLU / ReLU6)

becomes the same ops on the integers moved to NCHW: ``permute_dims`` of ``x_q``, the
weight constant transposed to ``OIHW`` (its scales along axis 0), the bias reshaped to
``[1, C, 1, 1]``, and one ``permute_dims`` of the (integer) result back to NHWC. Every value
is computed as before, only stored in another order (the channels-last rewriter of the CPU
conv kernels then keeps them NHWC inside the kernels). Each intermediate must have no other
reader; a weight whose rebuilt ``OIHW`` integers times scales do not give back the original
dequantized kernel is left alone. The output matches none of the inputs (it is NCHW), so
running the pass twice is the same as once.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .relax_utils import (
    CLIP,
    CONV2D,
    DEQUANTIZE,
    QUANTIZE,
    RESHAPE,
    binding_map,
    clip_bounds,
    const_f32,
    const_i32,
    const_value,
    op_name,
    ordered_bindings,
    relax_functions,
    resolve,
    update_functions,
    with_span,
)

_TO_NCHW, _TO_NHWC = (0, 3, 1, 2), (0, 2, 3, 1)
_KERNEL_TO_OIHW = {"HWIO": (3, 2, 0, 1), "HWOI": (2, 3, 0, 1)}


def _readers(func: relax.Function) -> dict[relax.Var, list[relax.Var]]:
    """var -> the vars whose bound value reads it (the function's result counts as a reader)."""
    found: dict[relax.Var, list] = {}
    for b in ordered_bindings(func):
        relax.analysis.post_order_visit(
            b.value,
            lambda e, owner=b.var: (
                found.setdefault(e, []).append(owner) if isinstance(e, relax.Var) else None
            ),
        )
    relax.analysis.post_order_visit(
        func.body.body,
        lambda e: found.setdefault(e, []).append(None) if isinstance(e, relax.Var) else None,
    )
    return found


def _scalar(expr, bindings):
    value = const_value(expr, bindings)
    return None if value is None or value.size != 1 else value.reshape(())


def _weight(conv: relax.Call, bindings) -> tuple[np.ndarray, np.ndarray] | None:
    """(int8 OIHW weight, scales [O] or scalar) of a conv's dequantized constant kernel."""
    layout = str(conv.attrs.kernel_layout)
    if layout not in _KERNEL_TO_OIHW:
        return None
    w = resolve(conv.args[1], bindings)
    shape = None
    if op_name(w) == RESHAPE:
        shape = [int(d) for d in w.ty.shape]
        w = resolve(w.args[0], bindings)
    if op_name(w) != DEQUANTIZE:
        return None
    q = const_value(w.args[0], bindings)
    s = const_value(w.args[1], bindings)
    z = const_value(w.args[2], bindings)
    if q is None or s is None or z is None or q.dtype != np.int8 or np.any(z != 0):
        return None
    axis = int(w.attrs.axis) % q.ndim
    view = [1] * q.ndim
    if s.size > 1:
        view[axis] = s.size
    kernel = ((q.astype(np.float64) * s.reshape(view)).reshape(shape or q.shape)).transpose(
        _KERNEL_TO_OIHW[layout]
    )
    q_oihw = (q.reshape(shape or q.shape)).transpose(_KERNEL_TO_OIHW[layout])
    scales = s.reshape(-1) if s.size > 1 else s.reshape(())
    rebuilt = q_oihw.astype(np.float64) * (scales.reshape(-1, 1, 1, 1) if scales.ndim else scales)
    if scales.ndim and scales.size != q_oihw.shape[0] or not np.array_equal(rebuilt, kernel):
        return None
    return np.ascontiguousarray(q_oihw), scales


def _plan(func: relax.Function) -> dict:
    """The last call of each region -> what its NCHW rewrite needs."""
    bindings = binding_map(func)
    readers = _readers(func)

    def only_reader(var):
        found = readers.get(var, [])
        return found[0] if len(found) == 1 and found[0] is not None else None

    plans = {}
    for var, conv in bindings.items():
        if op_name(conv) != CONV2D or str(conv.attrs.data_layout) != "NHWC":
            continue
        if str(conv.attrs.out_layout) != "NHWC":
            continue
        x = resolve(conv.args[0], bindings)
        if op_name(x) != DEQUANTIZE or str(x.args[0].ty.dtype) not in ("int8", "uint8"):
            continue
        s_x, z_x = _scalar(x.args[1], bindings), _scalar(x.args[2], bindings)
        weight = _weight(conv, bindings)
        if s_x is None or z_x is None or weight is None:
            continue
        channels = weight[0].shape[0]
        nxt, bias = only_reader(var), None
        if nxt is not None and op_name(bindings[nxt]) == "relax.add":
            add = bindings[nxt]
            other = add.args[1] if add.args[0].same_as(var) else add.args[0]
            bias = const_value(other, bindings)
            if bias is None or bias.size != channels or bias.shape[-1] != channels:
                continue
            nxt = only_reader(nxt)
        if nxt is None or op_name(bindings[nxt]) != QUANTIZE:
            continue
        quant = bindings[nxt]
        s_o, z_o = _scalar(quant.args[1], bindings), _scalar(quant.args[2], bindings)
        if s_o is None or z_o is None:
            continue
        last, clip = nxt, None
        after = only_reader(nxt)
        if after is not None and op_name(bindings[after]) == CLIP:
            clip, last = clip_bounds(bindings[after]), after
            if clip is None:
                continue
        plans[bindings[last]] = {
            "conv": conv,
            "x_q": x.args[0],
            "x_qparams": (s_x, z_x),
            "weight": weight,
            "bias": bias,
            "out": (s_o, z_o, str(quant.attrs.out_dtype)),
            "clip": clip,
        }
    return plans


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, plans: dict):
        super().__init__(mod)
        self.plans = plans

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        plan = self.plans.get(call)
        if plan is None:
            return super().visit_call_(call)
        emit = self.builder_.emit
        conv, a = plan["conv"], plan["conv"].attrs
        s_x, z_x = plan["x_qparams"]
        x = emit(relax.op.permute_dims(self.visit_expr(plan["x_q"]), _TO_NCHW))
        x = emit(relax.op.dequantize(x, const_f32(s_x), const_i32(z_x), axis=-1))
        w_q, s_w = plan["weight"]
        w = emit(
            relax.op.dequantize(
                relax.const(w_q, "int8"), const_f32(s_w), const_i32(0), axis=0 if s_w.ndim else -1
            )
        )
        new_conv = relax.op.nn.conv2d(
            x, w, a.strides, a.padding, a.dilation, int(a.groups), "NCHW", "OIHW", "NCHW",
            None if str(a.out_dtype) in ("", "None", "void") else str(a.out_dtype),
        )  # fmt: skip
        y = emit(with_span(new_conv, conv.span))
        if plan["bias"] is not None:
            bias = plan["bias"].astype(np.float32).reshape(1, -1, 1, 1)
            y = emit(relax.op.add(y, relax.const(bias, "float32")))
        s_o, z_o, dtype = plan["out"]
        q = emit(relax.op.quantize(y, const_f32(s_o), const_i32(z_o), axis=-1, out_dtype=dtype))
        if plan["clip"] is not None:
            q = emit(relax.op.clip(q, *plan["clip"]))
        return relax.op.permute_dims(q, _TO_NHWC)


@tvm.transform.module_pass(opt_level=0, name="QDQConvToNCHW")
class QDQConvToNCHW:
    """Rewrite NHWC quantized conv2d regions to NCHW (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gv, func in relax_functions(mod):
            plans = _plan(func)
            if plans:
                new = _Rewriter(mod, plans).visit_expr(func)
                updates[gv] = relax.analysis.remove_all_unused(new)
        return update_functions(mod, updates) if updates else mod
