"""QuantizedSoftmax: a softmax quantized per tensor, as one kernel that writes the integers.

Static int8 attention quantizes the probabilities before ``P @ V``::

    s = softmax(x, axis=-1)              # or SafeSoftmax's pattern (PyTorch SDPA)
    v = reshape(s, ...)                  # any reshapes / same-shape broadcast_to
    q = quantize(v, scale, zero, out_dtype="uint8")

TVM lowers that to two kernels, each with a divide per element (by the row sum, then by
the scale). This pass replaces the chain by one kernel,
:func:`quantized_softmax_rows`, whose store is ``min(int(e * r + 0.5) + zero, qmax)`` with
one multiplier per row, ``r = 1 / (scale * sum)``: no divide, and no separate pass over the
float probabilities. Rounding is half up, not half to even, and ``e * r`` rounds once
where the chain rounded twice: a value within a float32 ulp of a rounding boundary may
land one step away (tested against numpy to one step). Probabilities are >= 0, so the
lower clamp is the zero point itself. Rows of only -inf give ``zero`` (probability 0) for
both patterns: PyTorch's SDPA does the same, a plain softmax would give NaN.

Where the softmax's input is int8 attention's ``[add](reshape(dequantize(s)), [mask])``
over the int32 scores ``s`` of ``Q @ K^T`` (each read once), the kernel reads ``s`` and the
mask and computes those ops itself (:func:`quantized_softmax_of_scores`, the same float32
operations: bit-identical), so no float32 pass over the scores runs before it (MiniLM int8,
1 thread: 8.92 -> 8.80 ms). Not for rows the kernel pads (DeiT's 197 keys): each element of
the fused ops would take a branch. The kernel keeps TVM's pattern for it
(``kOutEWiseFusable``, unlike ``row_kernel_attrs``' float softmaxes): marked a reduction,
FuseOps pulled in the mask add but not the scores' dequantize, which sits behind a reshape,
and the softmax got slower (MiniLM int8 9.07 -> 9.13 ms).
On DeiT-tiny int8 (Zen 4, 1 thread) softmax + quantize went from 91 to 66 us a layer with
``fast_exp``, to 47 with :func:`~tvmq.passes.use_fast_math.exp_nonpositive`.

Only float32 scores, scalar constant ``scale`` / ``zero``, int8 / uint8 outputs, and a
chain whose every value is read once. CPU targets (like ``UseFastMath``); it
runs before ``SafeSoftmax``, which handles the softmaxes left float.
"""

from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, te, topi
from tvm.relax.expr_functor import PyExprMutator, mutator

from .relax_utils import (
    QUANTIZE,
    binding_map,
    emit_binding,
    op_name,
    relax_functions,
    scalar_value,
    user_counts,
)
from .safe_softmax import _last_axis, match_safe_softmax
from .use_fast_math import _pads_rows, masked_row, softmax_rows, unpad_rows

_VIEWS = ("relax.reshape", "relax.broadcast_to")


def quantized_softmax_of_scores(s, shape, s_scale: float, mask, scale: float, zero: int, dtype):
    """:func:`quantized_softmax_rows` of ``x = reshape(dequantize(s, s_scale), shape) [+
    mask]`` (int8 attention's int32 scores, the mask broadcast to ``shape``), ``x`` computed
    in the kernel as in the separate ops: no float32 pass over the scores of its own."""
    flat = topi.reshape(s, shape)
    x = te.compute(shape, lambda *i: flat(*i).astype("float32") * s_scale, name="scores")
    return quantized_softmax_rows(x if mask is None else topi.add(x, mask), scale, zero, dtype)


def quantized_softmax_rows(x, scale: float, zero: int, dtype: str):
    """``quantize(softmax(x, -1), scale, zero, dtype)`` in one kernel (module docstring)."""
    padded, top, e, total = softmax_rows(x, flush=False)
    zero_f = tvm.tirx.const(0.0, "float32")
    inv = te.compute(
        top.shape,
        lambda *r: te.if_then_else(masked_row(top[r]), zero_f, (1.0 / scale) / total[r]),
        name="row_scale",
    )
    qmax = int(np.iinfo(dtype).max)

    def store(*i):
        q = (e[i] * inv[i[:-1]] + 0.5).astype("int32")  # >= 0.5: truncation rounds half up
        if zero:
            q = q + zero
        return te.min(q, qmax).astype(dtype)

    return unpad_rows(te.compute(padded.shape, store, name="quantized_softmax"), x)


def _same_shape(a: relax.Expr, b: relax.Expr) -> bool:
    return tvm_ffi.structural_equal(a.ty.shape, b.ty.shape)


def _match(quantize: relax.Call, bindings: dict, users: dict):
    """``(x, scale, zero, dtype)`` when `quantize` ends a chain of the module docstring."""
    dtype = str(quantize.attrs.out_dtype)
    scale, zero = (scalar_value(a) for a in quantize.args[1:])
    if dtype not in ("int8", "uint8") or not isinstance(scale, float) or not scale > 0:
        return None
    if not isinstance(zero, int) or not np.iinfo(dtype).min <= zero <= np.iinfo(dtype).max:
        return None
    var = quantize.args[0]
    while True:
        value = bindings.get(var) if isinstance(var, relax.Var) else None
        if value is None or users.get(var) != 1:
            return None
        name = op_name(value)
        if name == "relax.broadcast_to" and not _same_shape(value, value.args[0]):
            return None
        if name not in _VIEWS:
            break
        var = value.args[0]
    if name == "relax.nn.softmax" and _last_axis(value):
        x = value.args[0]
    else:
        x = match_safe_softmax(value, bindings)
    if x is None or str(x.ty.dtype) != "float32":
        return None
    return x, scale, zero, dtype, _scores(x, bindings, users)


def _scores(x: relax.Expr, bindings: dict, users: dict) -> tuple | None:
    """``(s, s_scale, mask)`` when ``x = [add](reshape(dequantize(s, s_scale, 0)), [mask])``
    (int8 attention's scores before the softmax: ``s`` int32, ``mask`` float32 or None),
    the dequantize and reshape read once, else None. Not for rows that
    :func:`~tvmq.passes.use_fast_math.softmax_rows` pads (each element of the fused ops
    would take a branch)."""

    def once(expr, name):
        value = bindings.get(expr) if isinstance(expr, relax.Var) else None
        return value if op_name(value) == name and users.get(expr) == 1 else None

    shape = x.ty.shape.values if isinstance(x.ty.shape, relax.ShapeExpr) else None
    if shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in shape):
        return None
    if _pads_rows(shape[-1]):
        return None
    mask = None
    add = bindings.get(x) if isinstance(x, relax.Var) else None
    if op_name(add) == "relax.add":
        y, mask = add.args
        if not isinstance(mask, relax.Var) or str(mask.ty.dtype) != "float32":
            return None
        if not _same_shape(y, x):
            return None
    else:
        y = x
    reshape = once(y, "relax.reshape")
    dequantize = once(reshape.args[0] if reshape is not None else y, "relax.dequantize")
    if dequantize is None:
        return None
    s, s_scale, s_zero = dequantize.args
    s_scale, s_zero = scalar_value(s_scale), scalar_value(s_zero)
    if str(s.ty.dtype) != "int32" or not isinstance(s_scale, float) or s_zero != 0:
        return None
    return s, s_scale, mask


def find_quantized_softmax(func: relax.Function) -> dict[relax.Var, tuple]:
    """``{quantize var: (x, scale, zero, dtype, scores)}`` for each chain of the module
    docstring; ``scores``: ``x``'s int32 scores, see :func:`_scores`."""
    bindings = binding_map(func)
    users = user_counts(func)
    found = {}
    for var, value in bindings.items():
        if op_name(value) == QUANTIZE:
            match = _match(value, bindings, users)
            if match is not None:
                found[var] = match
    return found


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.found: dict = {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        var = binding.var
        if var not in self.found:
            super().visit_var_binding_(binding)
            return
        x, scale, zero, dtype, scores = self.found[var]
        bb = self.builder_
        # TVM's op pattern, not row_kernel_attrs (module docstring)
        if scores is None:
            q = bb.call_te(quantized_softmax_rows, self.visit_expr(x), scale, zero, dtype)
        else:
            s, s_scale, mask = (self.visit_expr(a) if a is not None else None for a in scores)
            shape = [int(d) for d in x.ty.shape.values]
            q = bb.call_te(quantized_softmax_of_scores, s, shape, s_scale, mask, scale, zero, dtype)
        q = bb.emit(q)
        if not _same_shape(q, var):
            q = relax.op.reshape(q, var.ty.shape)
        self.set_var_remap(var, emit_binding(bb, var, q))


@tvm.transform.module_pass(opt_level=0, name="QuantizedSoftmax")
class QuantizedSoftmax:
    """A per-tensor quantize of a softmax's output as one kernel (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        found = {gv: find_quantized_softmax(f) for gv, f in relax_functions(mod)}
        if not any(found.values()):
            return mod
        rewriter = _Rewriter(mod)
        for gv, func in relax_functions(mod):
            if found[gv]:
                rewriter.found = found[gv]
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return relax.transform.DeadCodeElimination()(rewriter.builder_.get())
