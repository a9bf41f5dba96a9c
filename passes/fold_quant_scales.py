"""FoldQuantScales: compile-time folding of a QDQ module's constant quantization.

Static int8, step 2 of 3: after :class:`AnnotateQDQ`, before :class:`LowerInt8` and
``LegalizeOps``. It rewrites, everywhere in every Relax function:

1. ``quantize(W)`` of a constant ``W`` (seen through ``permute_dims`` / ``reshape``) into
   the quantized constant, computed with ``tvmq.core.qmath.quantize`` (the same
   numbers ``R.quantize`` would compute at run time), so weights ship as int8.
2. ``batch_norm`` (inference, result item 0) after an NCHW/OIHW ``conv2d`` -- with or
   without a constant bias ``add`` in between -- into the conv's weight and one bias
   ``add``. For a float weight the weight is scaled; for a QDQ weight
   ``dequantize(Wq, s_w, 0, axis=0)`` the BN factor ``f_c`` goes into the scale:
   ``s_w' = s_w * |f_c|`` and ``Wq' = sign(f_c) * Wq``, which is exactly what quantizing the
   folded float weight gives with symmetric per-channel scales (symmetric int8 weights
   live in [-127, 127], so negation is exact). A channel with ``f_c == 0`` or a
   non-zero weight zero point leaves that batch_norm alone.
3. ``quantize(dequantize(q, s, z), s, z)`` with equal parameters and dtype into ``q``.

The per-output-channel requantize multiplier ``s_x * s_w / s_y`` is merged where integer
compute exists, in :class:`LowerInt8`. Running the pass twice is the same as once.
"""

from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvmq.core import qmath

from .relax_utils import (
    CONV2D,
    DEQUANTIZE,
    QUANTIZE,
    binding_map,
    const_f32,
    const_value,
    op_name,
    relax_functions,
    resolve,
    user_counts,
)

_BATCH_NORM = "relax.nn.batch_norm"
_ADD = "relax.add"


def _fold_quantize(call: relax.Call, lookup) -> tvm.ir.Constant | None:
    """The quantized constant for ``quantize(const, const scale, const zp)``, else None."""
    data = const_value(call.args[0], lookup)
    scale = const_value(call.args[1], lookup)
    zp = const_value(call.args[2], lookup)
    if data is None or scale is None or zp is None or data.dtype != np.float32:
        return None
    dtype = str(call.attrs.out_dtype)
    axis = int(call.attrs.axis)
    per_channel = scale.size > 1 or zp.size > 1
    q = qmath.quantize(data, scale.ravel(), zp.ravel(), dtype, axis if per_channel else None)
    return relax.const(q, dtype)


def _same_qparams(a: relax.Call, b: relax.Call, lookup) -> bool:
    """Whether two quantize/dequantize calls have equal constant scale, zero point and axis."""
    values = []
    for call in (a, b):
        s = const_value(call.args[1], lookup)
        z = const_value(call.args[2], lookup)
        if s is None or z is None:
            return False
        values.append((s, z))
    (s1, z1), (s2, z2) = values
    if s1.shape != s2.shape or z1.shape != z2.shape:
        return False
    if not (np.array_equal(s1, s2) and np.array_equal(z1, z2)):
        return False
    return s1.size == 1 and z1.size == 1 or int(a.attrs.axis) == int(b.attrs.axis)


def _redundant_requantize(call: relax.Call, bindings) -> relax.Expr | None:
    """``q`` for ``quantize(dequantize(q, s, z), s, z)`` with equal params and dtype, else None."""
    src = resolve(call.args[0], bindings)
    if op_name(src) != DEQUANTIZE:
        return None
    q = src.args[0]
    if str(q.ty.dtype) != str(call.attrs.out_dtype) or not _same_qparams(src, call, bindings):
        return None
    return q


def _bn_factors(bn: relax.Call, bindings) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale f, shift t) with ``batch_norm(y) = f * y + t`` per channel, if all constant."""
    params = [const_value(a, bindings) for a in bn.args[1:5]]
    if any(p is None for p in params):
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    attrs = bn.attrs
    if not attrs.scale:
        gamma = np.ones_like(gamma)
    if not attrs.center:
        beta = np.zeros_like(beta)
    f = gamma / np.sqrt(var + float(attrs.epsilon))
    return f, beta - mean * f


def _plan_bn_fold(tgi: relax.TupleGetItem, bindings, users) -> dict | None:
    """How to fold ``batch_norm(...)[0]`` into the conv before it, or None."""
    if tgi.index != 0:
        return None
    bn = resolve(tgi.tuple_value, bindings)
    if op_name(bn) != _BATCH_NORM or int(bn.attrs.axis) != 1 or bn.attrs.training:
        return None
    if users.get(tgi.tuple_value, 0) != 1:
        return None
    factors = _bn_factors(bn, bindings)
    if factors is None:
        return None
    f, t = factors

    y = bn.args[0]
    if not isinstance(y, relax.Var) or users.get(y, 0) != 1:
        return None
    node = bindings.get(y)
    bias = np.zeros_like(f)
    if op_name(node) == _ADD:
        lhs, rhs = node.args
        conv_var, bias_val = lhs, const_value(rhs, bindings)
        if bias_val is None:
            conv_var, bias_val = rhs, const_value(lhs, bindings)
        # Only a per-channel bias of an NCHW result: (1, C, 1, 1) or (C, 1, 1).
        if bias_val is None or bias_val.shape not in ((1, f.size, 1, 1), (f.size, 1, 1)):
            return None
        if not isinstance(conv_var, relax.Var) or users.get(conv_var, 0) != 1:
            return None
        bias = bias_val.reshape(-1).astype(np.float64)
        node = bindings.get(conv_var)
    conv = node
    if op_name(conv) != CONV2D:
        return None
    attrs = conv.attrs
    if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" or attrs.out_layout != "NCHW":
        return None
    if str(conv.ty.dtype) != "float32":
        return None

    plan = {"x": conv.args[0], "attrs": attrs, "bias": (bias * f + t).astype(np.float32)}
    w = conv.args[1]
    w_float = const_value(w, bindings)
    if w_float is not None:
        if w_float.shape[0] != f.size or w_float.dtype != np.float32:
            return None
        plan["weight"] = (w_float * f.reshape(-1, 1, 1, 1)).astype(np.float32)
        return plan
    dq = resolve(w, bindings)
    if op_name(dq) != DEQUANTIZE or int(dq.attrs.axis) % 4 != 0:
        return None
    q = resolve(dq.args[0], bindings)
    q_val = const_value(q, bindings)
    if q_val is None and op_name(q) == QUANTIZE:
        folded = _fold_quantize(q, bindings)
        q_val = None if folded is None else folded.value.numpy()
    s = const_value(dq.args[1], bindings)
    z = const_value(dq.args[2], bindings)
    if q_val is None or s is None or z is None or np.any(z != 0) or np.any(f == 0):
        return None
    if q_val.shape[0] != f.size or not np.issubdtype(q_val.dtype, np.signedinteger):
        return None
    sign = np.sign(f).astype(np.int64).reshape(-1, 1, 1, 1)
    qmin, qmax = np.iinfo(q_val.dtype).min, np.iinfo(q_val.dtype).max
    plan["qweight"] = np.clip(q_val.astype(np.int64) * sign, qmin, qmax).astype(q_val.dtype)
    plan["qscale"] = (np.broadcast_to(s.ravel(), f.shape) * np.abs(f)).astype(np.float32)
    plan["qdtype"] = str(dq.args[0].ty.dtype)
    plan["out_dtype"] = str(dq.attrs.out_dtype)
    return plan


@mutator
class _Folder(PyExprMutator):
    """Applies the folds; every decision is made on the original function beforehand."""

    def __init__(self, mod: tvm.IRModule, replace: dict, bn_plans: dict):
        super().__init__(mod)
        self.replace = replace  # var -> what its uses read instead (its binding is dropped)
        self.bn_plans = bn_plans

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var not in self.replace:
            super().visit_var_binding_(binding)

    def visit_var_(self, var: relax.Var) -> relax.Expr:
        if var in self.replace:
            return self.visit_expr(self.replace[var])
        return super().visit_var_(var)

    def visit_dataflow_var_(self, var: relax.DataflowVar) -> relax.Expr:
        if var in self.replace:
            return self.visit_expr(self.replace[var])
        return super().visit_dataflow_var_(var)

    def visit_tuple_getitem_(self, op: relax.TupleGetItem) -> relax.Expr:
        plan = self.bn_plans.get(op)
        if plan is None:
            return super().visit_tuple_getitem_(op)
        x = self.visit_expr(plan["x"])
        if "weight" in plan:
            w = relax.const(plan["weight"], "float32")
        else:
            w = self.builder_.emit(
                relax.op.dequantize(
                    relax.const(plan["qweight"], plan["qdtype"]),
                    const_f32(plan["qscale"]),
                    relax.const(np.int32(0), "int32"),
                    axis=0,
                    out_dtype=plan["out_dtype"],
                )
            )
        attrs = plan["attrs"]
        conv = self.builder_.emit(
            relax.op.nn.conv2d(
                x,
                w,
                strides=attrs.strides,
                padding=attrs.padding,
                dilation=attrs.dilation,
                groups=attrs.groups,
                data_layout=attrs.data_layout,
                kernel_layout=attrs.kernel_layout,
                out_layout=attrs.out_layout,
                out_dtype=attrs.out_dtype,
            )
        )
        bias = relax.const(plan["bias"].reshape(1, -1, 1, 1), "float32")
        return relax.op.add(conv, bias)


def fold_module(mod: tvm.IRModule, *, quantization: bool = True) -> tvm.IRModule:
    """``mod`` with its batch_norms folded into the convs before them and, with
    ``quantization``, its constant quantization folded (rewrites 1-3 of the module
    docstring); ``mod`` itself when nothing changed."""
    updates = {}
    for gv, func in relax_functions(mod):
        bindings = binding_map(func)
        users = user_counts(func)
        bn_plans, replace = {}, {}
        for var, value in bindings.items():
            if isinstance(value, relax.TupleGetItem):
                plan = _plan_bn_fold(value, bindings, users)
                if plan is not None:
                    bn_plans[value] = plan
            elif quantization and op_name(value) == QUANTIZE:
                found = _fold_quantize(value, bindings)
                if found is None:
                    found = _redundant_requantize(value, bindings)
                if found is not None:
                    replace[var] = found
        if not bn_plans and not replace:
            continue
        new_func = _Folder(mod, replace, bn_plans).visit_expr(func)
        new_func = relax.analysis.remove_all_unused(new_func)
        if not tvm_ffi.structural_equal(new_func, func):
            updates[gv] = new_func
    if not updates:
        return mod
    mod = mod.clone()
    for gv, func in updates.items():
        mod[gv] = func
    return mod


@tvm.transform.module_pass(opt_level=0, name="FoldQuantScales")
class FoldQuantScales:
    """Fold constant weight quantization, batch_norm and redundant requantization.

    See the module docstring for the three rewrites and where the pass belongs.
    """

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return fold_module(mod)
