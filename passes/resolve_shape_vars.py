"""ResolveShapeVars: symbolic dims that the graph computes at run time, resolved to the inputs' dims.

Relax's ONNX frontend turns shape arithmetic on symbolic input dims (a ``Range`` up to the
sequence length, as transformers' attention masks use) into int64 *tensor* arithmetic ending
in ``tensor_to_shape`` and a ``match_cast`` that defines fresh dims (``range_len_0``). Those
dims are data-dependent for TVM: its memory planning and fused kernels cannot use them (the
build fails with "PrimExpr ... has not been computed"), and nothing relates them to
``batch``/``seq``.

This pass evaluates that arithmetic symbolically: int64 tensors of rank <= 1 whose elements
are known ``PrimExpr`` (from ``shape_to_tensor`` of a shape, constants, ``take``/``reshape``/
``concat``/``astype`` and elementwise ``add``/``subtract``/``multiply``/``floor_divide``/
``maximum``/``minimum``/``negative``). Where such a tensor reaches ``tensor_to_shape`` and a
``match_cast`` to fresh dims, each fresh dim is bound to its expression (simplified by
``tvm.sym.Analyzer``, so ``max(0 - (0 - seq) // 1, 0)`` becomes ``seq``) in the whole
function. Dims it cannot resolve are left alone. The numbers computed are unchanged.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx

from .relax_utils import op_name, ordered_bindings

__all__ = ["ResolveShapeVars"]

_MAX_ELEMENTS = 8  # shape vectors are short; anything longer is data, not a shape

_BINARY = {
    "relax.add": lambda a, b: a + b,
    "relax.subtract": lambda a, b: a - b,
    "relax.multiply": lambda a, b: a * b,
    "relax.floor_divide": tirx.floordiv,
    "relax.maximum": tirx.max,
    "relax.minimum": tirx.min,
}


def _const_values(expr) -> list | None:
    if not isinstance(expr, tvm.ir.GenericConst):
        return None
    data = expr.value.numpy()
    if data.dtype.kind not in "iu" or data.ndim > 1 or data.size > _MAX_ELEMENTS:
        return None
    return [tirx.IntImm("int64", int(v)) for v in np.ravel(data)]


def _int64(e):
    dtype = str(getattr(e, "dtype", None) or e.ty)  # a tirx.Var's dtype is its .ty
    return e if dtype == "int64" else tirx.Cast("int64", e)


def _broadcast(a: list, b: list) -> tuple[list, list] | None:
    if len(a) == len(b):
        return a, b
    if len(a) == 1:
        return a * len(b), b
    if len(b) == 1:
        return a, b * len(a)
    return None


def _evaluate(value, known: dict) -> list | None:
    """The elements of an int tensor (or shape) expression, or None when not known."""
    if isinstance(value, relax.Var):
        return known.get(value)
    if isinstance(value, relax.ShapeExpr):
        return [_int64(v) for v in value.values]
    consts = _const_values(value)
    if consts is not None:
        return consts
    if isinstance(value, relax.MatchCast):
        return _evaluate(value.value, known)
    name = op_name(value)
    if name is None:
        return None
    args = [_evaluate(a, known) for a in value.args] if name != "relax.take" else None
    if name in ("relax.shape_to_tensor", "relax.tensor_to_shape", "relax.reshape"):
        return _evaluate(value.args[0], known)
    if name == "relax.astype":
        return args[0] if str(value.attrs.dtype).startswith("int") else None
    if name == "relax.negative" and args[0] is not None:
        return [-a for a in args[0]]
    if name == "relax.concat" and isinstance(value.args[0], relax.Tuple):
        parts = [_evaluate(f, known) for f in value.args[0].fields]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    if name == "relax.take":
        data, index = _evaluate(value.args[0], known), _const_values(value.args[1])
        if data is None or index is None:
            return None
        try:
            return [data[int(i)] for i in index]
        except IndexError:
            return None
    if name in _BINARY and all(a is not None for a in args):
        pair = _broadcast(args[0], args[1])
        return None if pair is None else [_BINARY[name](x, y) for x, y in zip(*pair, strict=True)]
    return None


def _resolve(func: relax.Function) -> dict:
    """Fresh shape vars defined by a match_cast, mapped to the expressions they equal."""
    known: dict = {}
    bound: dict = {}
    analyzer = tvm.sym.Analyzer()
    defined = set()
    for p in func.params:
        for d in getattr(p.ty, "shape", None) or []:
            if isinstance(d, tirx.Var) and d not in defined:
                defined.add(d)
                # a dim is never negative: max(seq, 0) simplifies to seq
                analyzer.update(d, tvm.sym.ConstIntBound(0, tvm.sym.ConstIntBound.POS_INF))
    for b in ordered_bindings(func):
        if isinstance(b, relax.MatchCast):
            values = _evaluate(b.value, known)
            target = b.ty
            dims = getattr(target, "values", None) if isinstance(target, relax.ShapeType) else None
            if values is not None and dims is not None and len(dims) == len(values):
                for d, v in zip(dims, values, strict=True):
                    if isinstance(d, tirx.Var) and d not in defined and d not in bound:
                        bound[d] = analyzer.simplify(v)
            if values is not None:
                known[b.var] = values
            continue
        values = _evaluate(b.value, known)
        if values is not None and len(values) <= _MAX_ELEMENTS:
            known[b.var] = values
    return bound


@tvm.transform.module_pass(opt_level=0, name="ResolveShapeVars")
class ResolveShapeVars:
    """Bind match_cast-defined shape vars to the input dims they are computed from."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = mod
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            bound = _resolve(func)
            if bound:
                out = out.clone() if out is mod else out
                out[gv] = func.bind_symbolic_vars(bound)
        return out
