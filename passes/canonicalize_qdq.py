"""CanonicalizeQDQ: rewrite imported QDQ graphs (ONNX Runtime's) into the form LowerInt8 reads.

Where it belongs: on an imported module that already holds ``quantize`` / ``dequantize``
(e.g. an ONNX model written by ``onnxruntime.quantization.quantize_static(...,
quant_format=QuantFormat.QDQ)``), before :func:`prepare_passes` / :func:`static_int8_passes`
(called without activation parameters) and before ``LegalizeOps``. It rewrites, in every
Relax function:

1. Constant quantization parameters: a scale or zero point whose values are all equal
   (a 0-d or 1-element tensor, or a per-channel vector of one value) becomes a scalar;
   integer zero points become ``int32`` (ONNX gives them in the data's dtype: ``uint8`` /
   ``int8`` tensors). When both are scalars the call is per-tensor and its ``axis`` becomes
   ``-1`` (ONNX writes ``axis=1`` on per-tensor activations); a per-channel ``axis`` is made
   non-negative. A symmetric weight's zero point, a vector of ``int8`` zeros, ends as ``0``.
2. ``permute_dims(dequantize(W_const, s, z, axis=a))`` (``Gemm`` with ``transB=1`` imports
   as the ``[N, K]`` weight's dequantize then a transpose) into
   ``dequantize(transpose(W_const), s, z, axis=a')`` with the channel axis followed through
   the permutation, when the dequantize has no other reader.
3. ``dequantize(B_const)`` of an ``int32`` constant (ONNX biases, ``s_b = s_x * s_w``) into
   the float32 constant it computes, so the bias ``add`` reads a constant.
4. ``quantize(f(dequantize(q, s, z)), s, z)`` with equal per-tensor parameters (``s > 0``),
   ``q`` of the quantize's dtype and ``f`` one of ``max_pool2d``, ``reshape``,
   ``permute_dims``, ``squeeze``, ``expand_dims`` (ops that only select or move elements,
   so they commute with the increasing affine map and the requantize is exact) into
   ``f(q)`` on the integers, and ``f = relu`` into ``maximum(q, z)``, when ``f``'s result
   has no other reader. ONNX Runtime wraps MaxPool / Flatten (and a Relu it cannot drop)
   in their own QDQ pairs; without this they would stay float between two int8 layers.

Everything else is left alone: non-constant parameters, non-float32 scales, zero points
that differ per channel (asymmetric weights stay float in :class:`LowerInt8`), dequantizes
of weights read by other ops too. The rewrites keep values bit for bit (1-3 compute the
same numbers; 4 is exact because ``quantize(dequantize(q))`` is ``q`` for equal parameters).
The output matches none of the input patterns, so running the pass twice is the same as
once, and a module with nothing to rewrite is returned unchanged (the same object).
"""

from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvmq.core import qmath

from .relax_utils import (
    DEQUANTIZE,
    QUANTIZE,
    binding_map,
    const_f32,
    const_i32,
    const_value,
    op_name,
    relax_functions,
    resolve,
    user_counts,
)

_PERMUTE = "relax.permute_dims"
_RELU = "relax.nn.relu"
# Ops that only select or move elements: they commute with a per-tensor affine map.
_MOVE_OPS = frozenset(
    {
        "relax.nn.max_pool2d",
        "relax.reshape",
        "relax.permute_dims",
        "relax.squeeze",
        "relax.expand_dims",
    }
)


def _qparams(call: relax.Call, lookup) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, zero point) of a quantize/dequantize when both are constants, else None."""
    s = const_value(call.args[1], lookup)
    z = const_value(call.args[2], lookup)
    if s is None or z is None:
        return None
    return s, z


def _uniform(v: np.ndarray) -> bool:
    return v.size >= 1 and bool(np.all(v == v.flat[0]))


def _canonical_qparams(call: relax.Call, lookup) -> tuple[object, object, int] | None:
    """(scale, zero point, axis) in canonical form: numpy scalars or [C] vectors; None to keep."""
    found = _qparams(call, lookup)
    if found is None:
        return None
    s, z = found
    if s.dtype != np.float32 or not np.issubdtype(z.dtype, np.integer) or s.ndim > 1 or z.ndim > 1:
        return None
    if np.any(z < np.iinfo(np.int32).min) or np.any(z > np.iinfo(np.int32).max):
        return None
    scale = np.float32(s.flat[0]) if _uniform(s) else s.astype(np.float32)
    zp = np.int32(z.flat[0]) if _uniform(z) else z.astype(np.int32)
    ndim = call.args[0].ty.ndim
    axis = int(call.attrs.axis)
    if np.ndim(scale) == 0 and np.ndim(zp) == 0:
        axis = -1
    elif ndim < 0 or not -ndim <= axis < ndim:
        return None
    else:
        axis %= ndim
    return scale, zp, axis


def _is_canonical(call: relax.Call, params: tuple[object, object, int]) -> bool:
    """Whether a call's constant args already are exactly ``params`` (nothing to rewrite)."""
    scale, zp, axis = params
    s_arg, z_arg = call.args[1], call.args[2]
    if not (isinstance(s_arg, tvm.ir.Constant) and isinstance(z_arg, tvm.ir.Constant)):
        return False
    s, z = s_arg.value.numpy(), z_arg.value.numpy()
    return (
        int(call.attrs.axis) == axis
        and s.dtype == np.float32
        and z.dtype == np.int32
        and s.shape == np.shape(scale)
        and z.shape == np.shape(zp)
    )


def _permuted_axis(axes: list[int] | None, ndim: int, axis: int) -> int:
    """Where input axis `axis` lands after ``permute_dims(axes)``."""
    order = list(reversed(range(ndim))) if axes is None else [a % ndim for a in axes]
    return order.index(axis % ndim)


def _fold_transposed_weight(perm: relax.Call, bindings, users) -> dict | None:
    """Plan for ``permute_dims(dequantize(W_const))`` (rewrite 2), else None."""
    dq_var = perm.args[0]
    dq = resolve(dq_var, bindings)
    if op_name(dq) != DEQUANTIZE or not isinstance(dq_var, relax.Var):
        return None
    if users.get(dq_var, 0) != 1:
        return None
    w = const_value(dq.args[0], bindings)
    params = _canonical_qparams(dq, bindings)
    if w is None or params is None or not np.issubdtype(w.dtype, np.integer):
        return None
    axes = perm.attrs.axes
    axes = None if axes is None else [int(a) for a in axes]
    scale, zp, axis = params
    if axis != -1:
        axis = _permuted_axis(axes, w.ndim, axis)
    return {
        "weight": np.ascontiguousarray(np.transpose(w, axes)),
        "dtype": str(dq.args[0].ty.dtype),
        "scale": scale,
        "zp": zp,
        "axis": axis,
        "out_dtype": str(dq.attrs.out_dtype),
    }


def _fold_bias(dq: relax.Call, bindings) -> np.ndarray | None:
    """The float32 value of ``dequantize(int32 const)`` (rewrite 3), else None."""
    if str(dq.attrs.out_dtype) != "float32":
        return None
    b = const_value(dq.args[0], bindings)
    params = _canonical_qparams(dq, bindings)
    if b is None or params is None or b.dtype != np.int32:
        return None
    scale, zp, axis = params
    ax = None if axis == -1 else axis
    return qmath.dequantize(b, scale, zp, ax)


def _same_per_tensor(a: relax.Call, b: relax.Call, bindings) -> bool:
    """Whether two quantize/dequantize calls have equal constant per-tensor parameters."""
    pa, pb = _canonical_qparams(a, bindings), _canonical_qparams(b, bindings)
    if pa is None or pb is None or pa[2] != -1 or pb[2] != -1:
        return False
    # A positive scale keeps dequantize increasing, so max_pool2d / relu commute with it.
    return float(pa[0]) == float(pb[0]) > 0 and int(pa[1]) == int(pb[1])


def _integer_move(q: relax.Call, bindings, users) -> tuple[relax.Call, relax.Expr, int] | None:
    """(f, q_in, zp) for ``quantize(f(dequantize(q_in)))`` with equal parameters (rewrite 4)."""
    f_var = q.args[0]
    f = resolve(f_var, bindings)
    if op_name(f) not in (*_MOVE_OPS, _RELU) or not isinstance(f_var, relax.Var):
        return None
    if users.get(f_var, 0) != 1:
        return None
    dq = resolve(f.args[0], bindings)
    if op_name(dq) != DEQUANTIZE:
        return None
    q_in = dq.args[0]
    ty = q_in.ty
    if not isinstance(ty, relax.TensorType) or str(ty.dtype) != str(q.attrs.out_dtype):
        return None
    if const_value(q_in, bindings) is not None or not _same_per_tensor(dq, q, bindings):
        return None
    return f, q_in, int(_canonical_qparams(q, bindings)[1])


@mutator
class _Canonicalizer(PyExprMutator):
    """Applies the rewrites planned on the original function (keyed by original calls)."""

    def __init__(self, mod: tvm.IRModule, plans: dict, folded: dict):
        super().__init__(mod)
        self.plans = plans
        self.folded = folded  # var -> the constant its readers read instead

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var not in self.folded:
            super().visit_var_binding_(binding)

    def visit_var_(self, var: relax.Var) -> relax.Expr:
        found = self.folded.get(var)
        return found if found is not None else super().visit_var_(var)

    def visit_dataflow_var_(self, var: relax.DataflowVar) -> relax.Expr:
        found = self.folded.get(var)
        return found if found is not None else super().visit_dataflow_var_(var)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        plan = self.plans.get(call)
        if plan is None:
            return super().visit_call_(call)
        kind, data = plan
        if kind == "qparams":
            scale, zp, axis = data
            make = relax.op.quantize if op_name(call) == QUANTIZE else relax.op.dequantize
            x = self.visit_expr(call.args[0])
            out_dtype = str(call.attrs.out_dtype)
            return make(x, const_f32(scale), const_i32(zp), axis=axis, out_dtype=out_dtype)
        if kind == "transposed_weight":
            return relax.op.dequantize(
                relax.const(data["weight"], data["dtype"]),
                const_f32(data["scale"]),
                const_i32(data["zp"]),
                axis=data["axis"],
                out_dtype=data["out_dtype"],
            )
        # "integer_move": f applied to the integer tensor instead of its dequantized copy
        f, q_in, zp = data
        if op_name(f) == _RELU:  # relu(s * (q - z)) = s * (max(q, z) - z)
            dtype = str(call.attrs.out_dtype)
            return relax.op.maximum(self.visit_expr(q_in), relax.const(np.array(zp, dtype), dtype))
        args = [self.visit_expr(q_in), *(self.visit_expr(a) for a in f.args[1:])]
        return relax.Call(f.op, args, f.attrs, f.ty_args, f.span)


def _plan(func: relax.Function) -> tuple[dict, dict]:
    """Rewrites for `func`: original call -> (kind, data), and var -> folded bias constant."""
    bindings = binding_map(func)
    users = user_counts(func)
    plans: dict = {}
    folded: dict = {}
    for var, value in bindings.items():
        name = op_name(value)
        if name == _PERMUTE:
            found = _fold_transposed_weight(value, bindings, users)
            if found is not None:
                plans[value] = ("transposed_weight", found)
        elif name == DEQUANTIZE:
            bias = _fold_bias(value, bindings)
            if bias is not None:
                folded[var] = relax.const(bias, "float32")
                continue
        if name == QUANTIZE:
            found = _integer_move(value, bindings, users)
            if found is not None:
                plans[value] = ("integer_move", found)
        if name in (QUANTIZE, DEQUANTIZE) and value not in plans:
            params = _canonical_qparams(value, bindings)
            if params is not None and not _is_canonical(value, params):
                plans[value] = ("qparams", params)
    return plans, folded


def has_qdq(mod: tvm.IRModule) -> bool:
    """Whether any Relax function of `mod` calls ``quantize`` or ``dequantize``.

    An imported model with such calls was quantized before tvmq saw it (ONNX QDQ): compile
    it with :class:`CanonicalizeQDQ` + ``static_int8_passes()``, without calibration.
    """
    found = []

    def note(expr: relax.Expr) -> None:
        if op_name(expr) in (QUANTIZE, DEQUANTIZE):
            found.append(expr)

    for _, func in relax_functions(mod):
        relax.analysis.post_order_visit(func, note)
        if found:
            return True
    return False


@tvm.transform.module_pass(opt_level=0, name="CanonicalizeQDQ")
class CanonicalizeQDQ:
    """Rewrite imported QDQ graphs into the canonical form :class:`LowerInt8` matches.

    See the module docstring for the four rewrites, where the pass belongs and its limits.
    """

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gv, func in relax_functions(mod):
            plans, folded = _plan(func)
            if not plans and not folded:
                continue
            new_func = _Canonicalizer(mod, plans, folded).visit_expr(func)
            new_func = relax.analysis.remove_all_unused(new_func)
            if not tvm_ffi.structural_equal(new_func, func):
                updates[gv] = new_func
        if not updates:
            return mod
        mod = mod.clone()
        for gv, func in updates.items():
            mod[gv] = func
        return mod
