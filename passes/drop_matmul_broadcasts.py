"""DropMatmulBroadcasts: a matmul reads its operands, not copies broadcast over its batch dims.

``torch.export`` decomposes a ``Linear`` on a non-contiguous 3-D input (BERT's attention
output projection, after the heads are permuted back) into ``expand`` + ``bmm``; imported::

    a = R.broadcast_to(x, [B, S, K])        # x: [B, S, K] already (a no-op)
    b = R.broadcast_to(W_t, [B, K, N])      # W_t: the [K, N] weight
    y = R.matmul(a, b)
    ==>
    y = R.matmul(x, W_t)                    # the same [B, S, N]: matmul broadcasts itself

Left alone, the weight is no weight site (no scheme quantizes, prunes or packs the layer) and
the build's FoldConstant stores ``B`` copies of it (all-MiniLM-L6-v2 at batch 32: 113 MB of
its six 384 x 384 projections). A broadcast is dropped when it keeps its input's last two
dims (a matrix stays the matrix; a vector is left alone) and the matmul's result type is the
same without it. The call keeps its span (the layer's names).
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .relax_utils import MATMUL, map_functions, op_name, resolve, with_span

_BROADCAST = "relax.broadcast_to"


def _static_shape(expr: relax.Expr) -> tuple | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    return tuple(ty.shape.values)


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.changed = 0

    def _unbroadcast(self, arg: relax.Expr) -> relax.Expr:
        value = resolve(arg, self.lookup_binding)
        if op_name(value) != _BROADCAST:
            return arg
        source, out = _static_shape(value.args[0]), _static_shape(value)
        if source is None or out is None or len(source) < 2:
            return arg
        if not all(_same_dim(a, b) for a, b in zip(source[-2:], out[-2:], strict=True)):
            return arg
        return value.args[0]

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if op_name(call) != MATMUL:
            return call
        args = [self._unbroadcast(a) for a in call.args]
        if all(a.same_as(b) for a, b in zip(args, call.args, strict=True)):
            return call
        new = with_span(relax.Call(call.op, args, call.attrs, call.ty_args), call.span)
        new = self.builder_.normalize(new)
        if not tvm_ffi.structural_equal(new.ty, call.ty):
            return call
        self.changed += 1
        return new


def _same_dim(a, b) -> bool:
    return bool(tvm_ffi.structural_equal(a, b))  # equal ints, or the same symbolic dim


@tvm.transform.module_pass(opt_level=0, name="DropMatmulBroadcasts")
class DropMatmulBroadcasts:
    """Matmul operands read without a ``broadcast_to`` that only repeats batch dims."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        def rewrite(_gv, func: relax.Function) -> relax.Function:
            rewriter = _Rewriter(mod)
            new = rewriter.visit_expr(func)
            return relax.analysis.remove_all_unused(new) if rewriter.changed else func

        return map_functions(mod, rewrite)
