"""QuantizeEmbedding: embedding tables stored as int8 rows with one scale each.

A transformer's largest constant is often its token embedding table (all-MiniLM-L6-v2:
30522 x 384 float32, 44.7 MiB of its 86 MiB), which no matmul-site quantization touches:
it is read by ``take`` (a gather), not multiplied. This pass rewrites::

    y = R.take(E, ids, axis=0)              # E: float32 [V, D] constant, ids: integer tensor
    ==>
    y = R.multiply(R.astype(R.take(Q, ids, axis=0), "float32"), R.take(S, ids, axis=0))

with ``Q`` int8 ``[V, D]`` and ``S`` float32 ``[V, 1]``: each row symmetric,
``S[v] = max|E[v]| / 127`` (1 for an all-zero row), ``Q = round(E / S)``. Only the gathered
rows are decoded, so the cost per call is ``len(ids) * D`` multiplies; the table shrinks 4x.
Tables of fewer than ``min_size`` elements (position / token-type embeddings) and one-column
tables (such as ``S`` itself) stay float.

Where it belongs: with the quantization passes of the int8 and weight-only schemes, before
``LegalizeOps``; idempotent (an int8 table is not float32). What was rewritten is recorded
on ``main`` as ``"tvmq.int8_embeddings"`` (the tables' shapes).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .relax_utils import const_f32, const_value, map_functions, op_name

ATTR = "tvmq.int8_embeddings"
_TAKE = "relax.take"


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(Q int8 [V, D], S float32 [V, 1])`` with ``Q * S ~ table``, symmetric per row."""
    absmax = np.abs(table).max(axis=1, keepdims=True).astype(np.float32)
    scale = np.where(absmax > 0, absmax / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(table / scale), -127, 127).astype(np.int8)
    return q, scale


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, min_size: int):
        super().__init__(mod)
        self.min_size = min_size
        self.shapes: list[list[int]] = []

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if op_name(call) != _TAKE or int(call.attrs.axis) != 0:
            return call
        table = const_value(call.args[0], self.lookup_binding)
        if table is None or table.dtype != np.float32 or table.ndim != 2:
            return call
        if table.size < self.min_size or table.shape[1] < 2 or not np.isfinite(table).all():
            return call
        q, scale = quantize_rows(table)
        ids, mode = call.args[1], call.attrs.mode
        rows = self.builder_.emit(relax.op.take(relax.const(q, "int8"), ids, axis=0, mode=mode))
        scales = self.builder_.emit(relax.op.take(const_f32(scale), ids, axis=0, mode=mode))
        self.shapes.append([int(d) for d in table.shape])
        return relax.op.multiply(relax.op.astype(rows, "float32"), scales)


@tvm.transform.module_pass(opt_level=0, name="QuantizeEmbedding")
class QuantizeEmbedding:
    """Store float32 embedding tables read by ``take`` as int8 rows + per-row scales.

    Parameters
    ----------
    min_size : int
        Tables with fewer elements stay float32 (default 65536).
    """

    def __init__(self, min_size: int = 1 << 16):
        self.min_size = int(min_size)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        def rewrite(_gv, func: relax.Function) -> relax.Function:
            rewriter = _Rewriter(mod, self.min_size)
            new = rewriter.visit_expr(func)
            if not rewriter.shapes:
                return func
            old = [list(s) for s in func.attrs[ATTR]] if func.attrs and ATTR in func.attrs else []
            return relax.analysis.remove_all_unused(new).with_attr(ATTR, old + rewriter.shapes)

        return map_functions(mod, rewrite)
