"""ShareQuantize: a matmul / conv2d result read by several quantizes is quantized once.

Static int8, in QDQ form after :class:`FoldQuantScales` and before :class:`LowerInt8`. A
conv's result read by several quantizes with different parameters -- a UNet encoder's
output, quantized for the next conv through ``max_pool2d`` and for the decoder's skip
``concat`` with the concat's parameters -- stays float: ``LowerInt8`` ends a region in a
requantize only when its result has one reader, so the conv stores float32, the pool runs
in float and each reader quantizes on its own. This pass rewrites::

    x = relu(conv2d(dequantize(a_q), W) + b)         # a region LowerInt8 lowers, float32
    p = max_pool2d(x) ; q1 = quantize(p, s1, z1)     # any chain of moves (see below)
    q2 = quantize(x, s2, z2)
    ==>
    x = relu(conv2d(dequantize(a_q), W) + b)
    q0 = quantize(x, s1, z1)                         # the primary parameters, once
    q1 = max_pool2d(q0)                              # on the integers
    q2 = quantize(dequantize(q0, s1, z1), s2, z2)    # an integer requantize in LowerInt8

so the region ends in its requantize epilogue and stores int8. It applies when ``x`` is
the float result of a matmul / conv2d region (``int8_regions.match_region`` without a
quantize at its end), a DataflowVar, and every one of its (two or more) readers is a
per-tensor quantize to int8/uint8, directly or through a chain of ops that commute with
it (``int8_regions.commutes_with_requantize``: ``max_pool2d`` -- max commutes with a
non-decreasing map, rounding and clamping included -- element moves and a
nearest-neighbour ``resize2d``), each link of the chain read only by the next. Other
producers are left alone: a float elementwise one (YOLO's SiLU) is fused into its readers
anyway, and sharing its quantize made YOLO's neck 7% slower (1 thread).

The primary parameters are the readers' finest scale: every reader's parameters were
calibrated on a tensor that holds ``x`` (the concat's hold ``x`` and the other inputs), so
``x``'s values lie in each reader's range and the finest one loses nothing to clipping;
the other readers requantize from it (a second rounding: at most one step of their own
scale off the single rounding). Readers with the primary parameters read ``q0`` as it is.

The moves are exact (``quantize(max_pool2d(x)) == max_pool2d(quantize(x))``). Anything
else -- a float reader, per-channel or non-constant parameters -- is left alone. After the
rewrite ``x`` has one reader, so running the pass twice is the same as once.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .int8_regions import (
    Users,
    commutes_with_requantize,
    match_output,
    match_passthrough_quantize,
    match_region,
)
from .relax_utils import (
    CONV2D,
    MATMUL,
    QUANTIZE,
    binding_map,
    const_f32,
    const_i32,
    op_name,
    ordered_bindings,
    relax_functions,
    update_functions,
)


@dataclass(frozen=True)
class _Reader:
    """One quantize reading the shared tensor: its binding var, the moves before it, params."""

    var: relax.Var
    moves: tuple[relax.Call, ...]  # the passthrough calls between the tensor and the quantize
    out_q: tuple[float, int, str]  # (scale, zero point, dtype)


@dataclass(frozen=True)
class _Share:
    primary: tuple[float, int, str]
    readers: tuple[_Reader, ...]


def _reader(var: relax.Var, x: relax.Var, bindings, users: Users) -> _Reader | None:
    """`var` (a reader of `x`) as a quantize, direct or through passthrough ops, else None."""
    value = bindings.get(var)
    if op_name(value) == QUANTIZE and value.args[0].same_as(x):
        out_q = match_output(value, bindings)
        return None if out_q is None else _Reader(var, (), out_q)
    if not commutes_with_requantize(value) or not value.args[0].same_as(x):
        return None
    tail, moves, out_q = match_passthrough_quantize(var, bindings, users)
    if out_q is None:
        return None
    return _Reader(tail, (value, *moves), out_q)


def _float_region_results(func: relax.Function, bindings, users: Users) -> list[relax.Var]:
    """The float results of the matmul / conv2d regions LowerInt8 would end in a dequantize."""
    results = []
    for b in ordered_bindings(func):
        if op_name(b.value) in (MATMUL, CONV2D):
            found = match_region(b.var, b.value, bindings, users)
            if found is not None and found[1].out_q is None:
                results.append(found[0])
    return results


def _plan(func: relax.Function) -> dict[relax.Var, _Share]:
    """Shared float tensor -> how its readers read it."""
    bindings = binding_map(func)
    users = Users(func)
    shares = {}
    for x in _float_region_results(func, bindings, users):
        if not isinstance(x, relax.DataflowVar):
            continue
        readers = users.readers.get(x, [])
        if len(readers) < 2 or len(set(readers)) != len(readers):
            continue  # one reader: LowerInt8's region already ends in its quantize
        found = [_reader(r, x, bindings, users) for r in readers]
        if any(r is None for r in found):
            continue
        primary = min((r.out_q for r in found), key=lambda q: q[0])
        shares[x] = _Share(primary, tuple(found))
    return shares


@mutator
class _Sharer(PyExprMutator):
    """Emits the primary quantize after each shared tensor and rebuilds its readers."""

    def __init__(self, mod: tvm.IRModule, shares: dict[relax.Var, _Share]):
        super().__init__(mod)
        self.shares = shares
        self.tails = {r.var: (x, r) for x, s in shares.items() for r in s.readers}
        self.dropped = {m for s in shares.values() for r in s.readers for m in r.moves}
        self.primary_q: dict[relax.Var, relax.Var] = {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.value in self.dropped:
            return  # a move, re-emitted on the integers at its reader's quantize
        found = self.tails.get(binding.var)
        if found is not None:
            x, reader = found
            value = self._reader_value(x, reader)
            self.builder_.emit_normalized(relax.VarBinding(binding.var, value))
            return
        super().visit_var_binding_(binding)
        share = self.shares.get(binding.var)
        if share is not None:
            s, z, dtype = share.primary
            x = self.visit_expr(binding.var)
            q = relax.op.quantize(x, const_f32(s), const_i32(z), axis=-1, out_dtype=dtype)
            self.primary_q[binding.var] = self.builder_.emit(q)

    def _reader_value(self, x: relax.Var, reader: _Reader) -> relax.Expr:
        bb = self.builder_
        out: relax.Expr = self.primary_q[x]
        for call in reader.moves:
            args = [bb.emit(out) if not isinstance(out, relax.Var) else out]
            args += [self.visit_expr(a) for a in call.args[1:]]
            out = relax.Call(call.op, args, call.attrs, call.ty_args, call.span)
        primary = self.shares[x].primary
        if reader.out_q == primary:
            return bb.normalize(out)
        s0, z0, _ = primary
        s, z, dtype = reader.out_q
        out = out if isinstance(out, relax.Var) else bb.emit(out)
        dq = bb.emit(relax.op.dequantize(out, const_f32(s0), const_i32(z0), axis=-1))
        return bb.normalize(
            relax.op.quantize(dq, const_f32(s), const_i32(z), axis=-1, out_dtype=dtype)
        )


@tvm.transform.module_pass(opt_level=0, name="ShareQuantize")
class ShareQuantize:
    """Quantize a float tensor read by several quantizes once; see the module docstring."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gv, func in relax_functions(mod):
            shares = _plan(func)
            if shares:
                new_func = _Sharer(mod, shares).visit_expr(func)
                updates[gv] = relax.analysis.remove_all_unused(new_func)
        return update_functions(mod, updates)
