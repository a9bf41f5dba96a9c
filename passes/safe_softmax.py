"""SafeSoftmax: PyTorch's "softmax, but 0 for fully masked rows" as one kernel.

``F.scaled_dot_product_attention`` (the default attention of ``transformers`` models)
decomposes, through ``torch.export`` and Relax's frontend, into a softmax plus a test for
rows with no finite score::

    s = softmax(x, axis=-1)
    m = logical_not(astype(max(astype(logical_not(equal(x, -inf)), int8), axis=-1,
                               keepdims=True), bool))   # the row is all -inf
    y = where(m, full_like(s, 0), s)

That test is a second pass over the scores (its own kernel) and the ``where`` keeps the
softmax from fusing with what follows. This pass replaces ``y`` by one kernel,
:func:`tvmq.passes.use_fast_math.safe_softmax_rows`, which reads the row max the softmax
computes anyway (a row of -inf has max -inf): the same values, including 0 for masked rows.
float32 only, on CPU targets (it uses ``fast_exp``, as :class:`UseFastMath` does).

``SafeSoftmax(one_kernel=False)`` (CUDA targets) keeps TVM's softmax and replaces the test by
``isnan(softmax(x))``: TVM's softmax turns a row of only -inf into 0 / 0 (its max starts from
the lowest finite float32, every ``exp`` is 0), and no row with a finite score gives NaN, so
the ``where`` reads nothing but the softmax and fuses into its kernel. The int8 "any finite"
test ran as dlight's fallback, one thread per row: 68 us per MiniLM layer at batch 32 on an
H200, a fifth of the model's attention time. (Scores that are NaN give 0 here, NaN in PyTorch.)
"""

from __future__ import annotations

import math

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .relax_utils import (
    emit_binding,
    op_name,
    ordered_bindings,
    relax_functions,
    scalar_value,
)
from .use_fast_math import row_kernel_attrs, safe_softmax_rows


def _const_is(expr: relax.Expr, test) -> bool:
    value = scalar_value(expr)
    return value is not None and test(float(value))


def _is_zero(v: float) -> bool:
    return v == 0


def _last_axis(call: relax.Call) -> bool:
    """Whether a softmax (``axis``) or a reduction (``axis`` list) runs over the last axis."""
    axis = call.attrs.axis
    ndim = call.args[0].ty.ndim
    if isinstance(axis, int | tvm.tirx.IntImm):
        return int(axis) in (-1, ndim - 1)
    return axis is not None and len(axis) == 1 and int(axis[0]) in (-1, ndim - 1)


def match_safe_softmax(value: relax.Expr, bindings: dict) -> relax.Expr | None:
    """The scores ``x`` when `value` is the ``where`` of the module docstring, else None."""

    def arg(expr, op: str, dtype: str | None = None) -> relax.Call | None:
        call = bindings.get(expr) if isinstance(expr, relax.Var) else None
        if op_name(call) != op:
            return None
        if dtype is not None and str(call.attrs.dtype) != dtype:
            return None
        return call

    if op_name(value) != "relax.where" or str(value.ty.dtype) != "float32":
        return None
    cond, zero, s = value.args
    soft = arg(s, "relax.nn.softmax")
    if soft is None or not _last_axis(soft):
        return None
    x = soft.args[0]
    full = arg(zero, "relax.full_like")
    zeros = full is not None and full.args[0].same_as(s) and _const_is(full.args[1], _is_zero)
    if not zeros and not _const_is(zero, _is_zero):
        return None
    # cond = logical_not(astype(max(astype(logical_not(equal(x, -inf)), int8)), bool))
    steps = [("relax.logical_not", None), ("relax.astype", "bool"), ("relax.max", None),
             ("relax.astype", None), ("relax.logical_not", None), ("relax.equal", None)]  # fmt: skip
    calls, expr = [], cond
    for op, dtype in steps:
        call = arg(expr, op, dtype)
        if call is None:
            return None
        calls.append(call)
        expr = call.args[0]
    top, eq = calls[2], calls[-1]
    if not top.attrs.keepdims or not _last_axis(top):
        return None
    if not eq.args[0].same_as(x) or not _const_is(eq.args[1], lambda v: v == -math.inf):
        return None
    return x


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, found: dict, one_kernel: bool = True):
        super().__init__(mod)
        self.found = found  # where var -> scores
        self.one_kernel = one_kernel

    def _masked_by_nan(self, x: relax.Expr) -> relax.Expr:
        """``where(isnan(s), 0, s)`` for ``s = softmax(x)`` (the module docstring says why)."""
        soft = self.builder_.emit(relax.op.nn.softmax(x, axis=-1))
        masked = self.builder_.emit(relax.op.isnan(soft))
        return relax.op.where(masked, relax.const(0.0, "float32"), soft)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        var = binding.var
        if var not in self.found:
            super().visit_var_binding_(binding)
            return
        x = self.visit_expr(self.found[var])
        if self.one_kernel:
            attrs = row_kernel_attrs(x)
            value = self.builder_.call_te(safe_softmax_rows, x, primfunc_attrs=attrs)
        else:
            value = self._masked_by_nan(x)
        self.set_var_remap(var, emit_binding(self.builder_, var, value))


def find_safe_softmax(func: relax.Function) -> dict[relax.Var, relax.Expr]:
    """``{where var: scores}`` for each float32 pattern of the module docstring in `func`."""
    bindings = {b.var: b.value for b in ordered_bindings(func)}
    found = {}
    for var, value in bindings.items():
        x = match_safe_softmax(value, bindings)
        if x is not None and str(x.ty.dtype) == "float32":
            found[var] = x
    return found


@tvm.transform.module_pass(opt_level=0, name="SafeSoftmax")
class SafeSoftmax:
    """PyTorch's masked-row-safe softmax as one kernel, or with ``one_kernel=False`` TVM's
    softmax with the masked-row test read off its output (see the module docstring)."""

    def __init__(self, one_kernel: bool = True):
        self.one_kernel = one_kernel

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        found = {gv: find_safe_softmax(f) for gv, f in relax_functions(mod)}
        if not any(found.values()):
            return mod
        rewriter = _Rewriter(mod, {}, self.one_kernel)
        for gv, func in relax_functions(mod):
            if found[gv]:
                rewriter.found = found[gv]
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return relax.transform.DeadCodeElimination()(rewriter.builder_.get())
