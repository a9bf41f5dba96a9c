"""Shared Relax helpers of tvmq's passes: bindings, constants, op names, functions to rewrite.

Nothing here rewrites a module by itself; the passes (and the driver's analyses) build on it.
What a *site* is (the matmul / conv2d ops that compression and quantization work on) is
:mod:`tvmq.passes.sites`.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

MATMUL = "relax.matmul"
CONV2D = "relax.nn.conv2d"
QUANTIZE = "relax.quantize"
DEQUANTIZE = "relax.dequantize"
ADD = "relax.add"
ASTYPE = "relax.astype"
PAD = "relax.nn.pad"
CONCAT = "relax.concat"
RELU = "relax.nn.relu"
GELU = "relax.nn.gelu"
CLIP = "relax.clip"
PERMUTE_DIMS = "relax.permute_dims"
RESHAPE = "relax.reshape"


def op_name(expr: relax.Expr) -> str | None:
    """The op name of a Call to a Relax op, else None."""
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def binding_map(func: relax.Function) -> dict[relax.Var, relax.Expr]:
    """Every var bound in `func` (all blocks) to its value."""
    table: dict[relax.Var, relax.Expr] = {}
    if isinstance(func.body, relax.SeqExpr):
        for block in func.body.blocks:
            for b in block.bindings:
                table[b.var] = b.value
    return table


def ordered_bindings(func: relax.Function) -> list[relax.Binding]:
    """The bindings of `func` in program order."""
    if not isinstance(func.body, relax.SeqExpr):
        return []
    return [b for block in func.body.blocks for b in block.bindings]


def user_counts(func: relax.Function) -> dict[relax.Var, int]:
    """How many times each var is read (a var returned by the function counts once more)."""
    counts: dict[relax.Var, int] = {}

    def count(expr):
        if isinstance(expr, relax.Var):
            counts[expr] = counts.get(expr, 0) + 1

    for b in ordered_bindings(func):
        relax.analysis.post_order_visit(b.value, count)
    if isinstance(func.body, relax.SeqExpr):
        relax.analysis.post_order_visit(func.body.body, count)
    return counts


class BlockUsers:
    """Who reads a dataflow block's vars. Called with a var: ``(user, its value)`` of a
    dataflow var read by exactly one binding of the block, else None (a fused epilogue may
    take only such a chain of ops); :meth:`readers` lists every reader."""

    def __init__(self, block: relax.DataflowBlock):
        self._users = relax.analysis.udchain(block)
        self._values = {b.var: b.value for b in block.bindings}

    def __call__(self, var: relax.Var):
        used = self.readers(var)
        return used[0] if len(used) == 1 else None

    def readers(self, var: relax.Var) -> list:
        """``(user, its value)`` of each binding of the block reading the dataflow var ``var``
        (none for a var outside the block, or an output, which the code after it may read)."""
        if not isinstance(var, relax.DataflowVar):
            return []
        return [(u, self._values.get(u)) for u in self._users.get(var, [])]


def dataflow_bindings(mod: tvm.IRModule):
    """Each binding of the dataflow blocks of ``mod``'s Relax functions, with that block's
    :class:`BlockUsers` (``only_user(var)``: the one reader of ``var``, else None)."""
    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            continue
        for block in func.body.blocks:
            if not isinstance(block, relax.DataflowBlock):
                continue
            only_user = BlockUsers(block)
            for binding in block.bindings:
                yield binding, only_user


def static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    """The shape of a tensor whose dims are all static ints, else None."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    dims = getattr(ty.shape, "values", None)
    if dims is None or not all(isinstance(d, tvm.tirx.IntImm) for d in dims):
        return None
    return tuple(int(d) for d in dims)


def is_tensor_const(expr: relax.Expr) -> bool:
    """Whether `expr` is a constant tensor (``R.const`` / bound weights)."""
    return isinstance(expr, tvm.ir.Constant) and isinstance(expr.ty, relax.TensorType)


def tensor_dtype(expr: relax.Expr) -> str | None:
    """The dtype of a tensor-typed `expr` (``"int8"``...), else None."""
    ty = expr.ty
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def float_dtype(expr: relax.Expr) -> bool:
    """Whether `expr` is a float32 tensor (the only float type the int8 passes handle)."""
    return tensor_dtype(expr) == "float32"


def resolve(expr: relax.Expr, bindings) -> relax.Expr:
    """Follow var bindings (a dict or a lookup callable) to the bound value."""
    lookup = bindings.get if isinstance(bindings, dict) else bindings
    while isinstance(expr, relax.Var):
        value = lookup(expr)
        if value is None:
            break
        expr = value
    return expr


def const_source(expr: relax.Expr, bindings) -> tuple[tvm.ir.Constant, tuple] | None:
    """The constant `expr` reads, seen through vars, ``permute_dims`` and ``reshape``.

    Returns ``(constant, steps)``: the value of `expr` is the constant's with ``steps`` applied
    in order, each ``("permute", axes)`` or ``("reshape", shape)`` (see :func:`apply_layout`),
    or None when `expr` is not such a view of one constant. `bindings` maps vars to their
    values: a dict or a lookup callable.
    """
    return view_source(expr, bindings, is_tensor_const)


def view_source(expr: relax.Expr, bindings, is_root) -> tuple[relax.Expr, tuple] | None:
    """:func:`const_source` for any root: the expression ``is_root`` accepts that `expr` is
    a ``permute_dims`` / ``reshape`` view of, and the steps; None when there is none."""
    expr = resolve(expr, bindings)
    if is_root(expr):
        return expr, ()
    name = op_name(expr)
    if name not in (PERMUTE_DIMS, RESHAPE):
        return None
    inner = view_source(expr.args[0], bindings, is_root)
    if inner is None:
        return None
    root, steps = inner
    if name == PERMUTE_DIMS:
        axes = expr.attrs.axes
        ndim = expr.args[0].ty.ndim
        axes = tuple(reversed(range(ndim))) if axes is None else tuple(int(a) for a in axes)
        return root, (*steps, ("permute", axes))
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        shape = tuple(int(s) for s in ty.shape)
    except TypeError:
        return None
    return root, (*steps, ("reshape", shape))


def apply_layout(value: np.ndarray, steps) -> np.ndarray:
    """`value` with the ``permute`` / ``reshape`` steps of :func:`const_source` applied."""
    for kind, arg in steps:
        value = np.transpose(value, arg) if kind == "permute" else value.reshape(arg)
    return value


def undo_layout(value: np.ndarray, steps, source_shape) -> np.ndarray:
    """The inverse of :func:`apply_layout` for a constant of `source_shape`."""
    shapes = [tuple(source_shape)]
    for kind, arg in steps:
        shape = shapes[-1]
        shapes.append(tuple(shape[a] for a in arg) if kind == "permute" else tuple(arg))
    for (kind, arg), before in zip(reversed(steps), reversed(shapes[:-1]), strict=True):
        value = np.transpose(value, np.argsort(arg)) if kind == "permute" else value.reshape(before)
    return value


def const_value(expr: relax.Expr, bindings) -> np.ndarray | None:
    """The value of `expr` if it is a constant seen through vars, permute_dims and reshape.

    `bindings` maps vars to their values: a dict or a lookup callable.
    """
    found = const_source(expr, bindings)
    if found is None:
        return None
    const, steps = found
    try:
        return apply_layout(const.value.numpy(), steps)
    except ValueError:
        return None


def spatial_pad(call: relax.Call, nchw: bool) -> tuple[tuple[int, int, int, int], float] | None:
    """``((top, left, bottom, right), value)`` of a constant ``nn.pad`` of only the H and W
    axes of a 4-D NCHW (``nchw``) or NHWC tensor, else None (also for another op)."""
    if op_name(call) != PAD or str(call.attrs.pad_mode) != "constant":
        return None
    w = [int(v) for v in call.attrs.pad_width]
    if len(w) != 8:
        return None
    h_at, w_at, idle = (4, 6, (0, 1, 2, 3)) if nchw else (2, 4, (0, 1, 6, 7))
    if any(w[i] for i in idle) or min(w) < 0:
        return None
    return (w[h_at], w[w_at], w[h_at + 1], w[w_at + 1]), float(call.attrs.pad_value)


def scalar_value(expr: relax.Expr) -> float | int | None:
    """The value of a one-element tensor constant (an int for integer dtypes), else None."""
    if not is_tensor_const(expr) or expr.value.numpy().size != 1:
        return None
    return expr.value.numpy().reshape(()).item()


def emit_binding(bb: relax.BlockBuilder, var: relax.Var, value: relax.Expr) -> relax.Var:
    """Emit `value` as the new binding of `var` (named like it): an output of a dataflow
    block stays an output. Returns the new var."""
    if isinstance(var, relax.DataflowVar) or not bb.current_block_is_dataflow():
        return bb.emit(value, var.name)
    return bb.emit_output(value, var.name)


def alias_binding(mutator: PyExprMutator, var: relax.Var, target: relax.Expr) -> relax.Var:
    """In `mutator` (visiting the binding of `var`), make `var` the rewritten `target`
    instead of emitting a binding of its own (``target`` already computes its value); an
    output var of a dataflow block is emitted as an output. Returns the var now standing
    for `var`."""
    new_var = mutator.visit_expr(target)
    bb = mutator.builder_
    if not isinstance(var, relax.DataflowVar) and bb.current_block_is_dataflow():
        new_var = bb.emit_output(new_var, var.name)
    mutator.set_var_remap(var, new_var)
    return new_var


def main_function(mod: tvm.IRModule):
    """``mod``'s function named ``main``, or None."""
    return next((f for gv, f in mod.functions_items() if gv.name_hint == "main"), None)


def relax_functions(mod: tvm.IRModule) -> list[tuple[tvm.ir.GlobalVar, relax.Function]]:
    """The Relax functions of `mod` that passes should rewrite, ``main`` first, then by name."""
    out = []
    for gv, func in mod.functions.items():
        if not isinstance(func, relax.Function):
            continue
        if func.attrs is not None and "Primitive" in func.attrs and int(func.attrs["Primitive"]):
            continue
        out.append((gv, func))
    out.sort(key=lambda item: (item[0].name_hint != "main", item[0].name_hint))
    return out


def site_prefix(gv: tvm.ir.GlobalVar) -> str:
    """Site-name prefix of a function: empty for ``main``."""
    return "" if gv.name_hint == "main" else f"{gv.name_hint}/"


def const_f32(value) -> tvm.ir.Constant:
    """A float32 constant (scalar or tensor)."""
    return relax.const(np.asarray(value, dtype="float32"), "float32")


def const_i32(value) -> tvm.ir.Constant:
    """An int32 constant (scalar or tensor)."""
    return relax.const(np.asarray(value, dtype="int32"), "int32")


def const_i64(value) -> tvm.ir.Constant:
    """An int64 constant (scalar or tensor)."""
    return relax.const(np.asarray(value, dtype="int64"), "int64")


def clip_bounds(call: relax.Call) -> tuple[float, float] | None:
    """(lo, hi) of ``relu`` (0, inf) or a ``clip`` with constant bounds, else None."""
    name = op_name(call)
    if name == RELU:
        return 0.0, float("inf")
    if name != CLIP or len(call.args) != 3:
        return None
    bounds = []
    for arg in call.args[1:]:
        # 0.27: the bounds are IntImm / FloatImm (tvm.ir.Constant subclasses), not PrimValue.
        value = getattr(arg, "value", None)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        bounds.append(float(value))
    return bounds[0], bounds[1]


@mutator
class _ConstantReplacer(PyExprMutator):
    """Swaps constants by identity; everything else is copied."""

    def __init__(self, mod, mapping):
        super().__init__(mod)
        self.mapping = mapping

    def visit_generic_const_(self, const):
        return self.mapping.get(const, const)


def replace_constants(mod: tvm.IRModule, mapping: dict) -> tvm.IRModule:
    """`mod` with each constant in `mapping` (old -> new expr) replaced; same shapes expected."""
    if not mapping:
        return mod
    return map_functions(mod, lambda _gv, func: _ConstantReplacer(mod, mapping).visit_expr(func))


def map_functions(mod: tvm.IRModule, rewrite) -> tvm.IRModule:
    """`mod` with each of its :func:`relax_functions` replaced by ``rewrite(gv, func)``;
    `mod` itself when every result is the same function."""
    updates = {}
    for gv, func in relax_functions(mod):
        new = rewrite(gv, func)
        if not new.same_as(func):
            updates[gv] = new
    return update_functions(mod, updates)


def update_functions(mod: tvm.IRModule, updates: dict) -> tvm.IRModule:
    """A copy of `mod` with some functions replaced."""
    if not updates:
        return mod
    out = tvm.IRModule(dict(mod.functions.items()), mod.attrs)
    for gv, func in updates.items():
        out[gv] = func
    return out


# A weight-bearing call's names in the source model (PyTorch module path, ONNX node name) ride
# on its span: C++ mutators, the block builder and tvmq's passes copy a call's span when they
# rebuild it, so the names survive compression and quantization preparation untouched.
_LAYER_SPAN = "tvmq.layer:"


def layer_span(names) -> tvm.ir.Span:
    """A span carrying a layer's source-model names (see :func:`layer_names`)."""
    return tvm.ir.Span(tvm.ir.SourceName(_LAYER_SPAN + "\n".join(names)), 0, 0, 0, 0)


def layer_names(call: relax.Expr) -> tuple[str, ...]:
    """The source-model names a frontend recorded on `call` (empty when none)."""
    span = getattr(call, "span", None)
    text = str(span.source_name.name) if span is not None else ""
    if not text.startswith(_LAYER_SPAN):
        return ()
    return tuple(n for n in text[len(_LAYER_SPAN) :].split("\n") if n)


def with_span(call: relax.Call, span) -> relax.Call:
    """`call` rebuilt with `span` (the names of the call it replaces)."""
    return relax.Call(call.op, call.args, call.attrs, call.ty_args, span)
