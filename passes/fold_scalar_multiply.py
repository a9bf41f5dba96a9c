"""FoldScalarMultiply: a constant scalar multiply after a matmul layer goes into its weight.

Attention as ``F.scaled_dot_product_attention`` decomposes (Relax's PyTorch frontend) into
``q * s`` and ``k^T * s`` (``s = d ** -0.25``) right after the heads split of the Q and K
projections::

    y = matmul(x, W) [+ b]                 # W (and b) constant, seen through permute_dims
    v = permute_dims(reshape(y, ...), ...) # any reshape / permute_dims chain
    z = multiply(v, c)                     # c a float32 scalar constant
    ==>
    y = matmul(x, W * c) [+ b * c]
    z = permute_dims(reshape(y, ...), ...)

Each value on the chain must have no other reader, and ``W`` / ``b`` no other use (a tied
weight keeps its multiply). Values are the same up to float rounding (``(x @ W) * c``
against ``x @ (W * c)``). For static int8 the projection's requantize then reaches the
next quantize through layout ops only, so its kernel stores integers; for float it is one
elementwise pass less.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .relax_utils import (
    ADD,
    MATMUL,
    PERMUTE_DIMS,
    RESHAPE,
    alias_binding,
    const_source,
    is_tensor_const,
    map_functions,
    op_name,
    ordered_bindings,
    user_counts,
)

MULTIPLY = "relax.multiply"


def _scalar(expr: relax.Expr) -> float | None:
    """The value of a float32 constant with one element, else None."""
    if not is_tensor_const(expr) or str(expr.ty.dtype) != "float32":
        return None
    value = expr.value.numpy()
    return float(value.reshape(-1)[0]) if value.size == 1 else None


def _constant_uses(func: relax.Function) -> dict:
    uses: dict = {}

    def count(e):
        if is_tensor_const(e):
            uses[e] = uses.get(e, 0) + 1

    relax.analysis.post_order_visit(func, count)
    return uses


def find_folds(func: relax.Function) -> tuple[dict, dict]:
    """``({source constant: scaled numpy value}, {multiply var: the var it becomes})``."""
    bindings = {b.var: b.value for b in ordered_bindings(func)}
    users = user_counts(func)
    uses = _constant_uses(func)
    scaled: dict = {}
    aliases: dict = {}

    def single(var) -> bool:
        return isinstance(var, relax.Var) and users.get(var) == 1 and var in bindings

    for var, value in bindings.items():
        if op_name(value) != MULTIPLY:
            continue
        lhs, rhs = value.args
        c = _scalar(rhs)
        v, c = (lhs, c) if c is not None else (rhs, _scalar(lhs))
        if c is None or not single(v) or str(v.ty.dtype) != "float32":
            continue
        cur = v
        while single(cur) and op_name(bindings[cur]) in (RESHAPE, PERMUTE_DIMS):
            cur = bindings[cur].args[0]
        sources = []
        if single(cur) and op_name(bindings[cur]) == ADD:
            a, b = bindings[cur].args
            found = const_source(b, bindings)
            cur = a
            if found is None:
                found, cur = const_source(a, bindings), b
            if found is None:
                continue
            sources.append(found[0])
        if not (single(cur) and op_name(bindings[cur]) == MATMUL):
            continue
        found = const_source(bindings[cur].args[1], bindings)
        if found is None:
            continue
        sources.append(found[0])
        if any(uses.get(s) != 1 or s in scaled for s in sources):
            continue
        for s in sources:
            scaled[s] = s.value.numpy() * np.float32(c)
        aliases[var] = v
    return scaled, aliases


@mutator
class _Folder(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, scaled: dict, aliases: dict):
        super().__init__(mod)
        self.scaled = scaled
        self.aliases = aliases

    def visit_generic_const_(self, const):
        new = self.scaled.get(const)
        return const if new is None else relax.const(new.astype(np.float32))

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        var = binding.var
        if var not in self.aliases:
            super().visit_var_binding_(binding)
            return
        alias_binding(self, var, self.aliases[var])


def _fold(mod: tvm.IRModule, func: relax.Function) -> relax.Function:
    scaled, aliases = find_folds(func)
    if not aliases:
        return func
    return _Folder(mod, scaled, aliases).visit_expr(func)


@tvm.transform.module_pass(opt_level=0, name="FoldScalarMultiply")
class FoldScalarMultiply:
    """Constant scalar multiplies after a matmul layer folded into it (module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return map_functions(mod, lambda _gv, func: _fold(mod, func))
