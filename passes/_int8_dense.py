"""The rewrite shared by tvmq's target int8 dense passes (x86 VNNI, AArch64, CUDA dp4a).

Each pass matches what :class:`LowerInt8` emits for a dense layer::

    y = R.matmul(x, W, out_dtype="int32")   # x: (..., K) uint8 or int8, static shape
                                            # W: (K, N) int8 constant

and supplies a :class:`DenseKernel` (its padding, weight packing and TIR kernel); this
module does the rest::

    [reshape x to 2-D] -> [shift x to the kernel's operand dtype] -> [pad M, K]
    -> call_tir(kernel, x, packed W[, offset]) -> [slice off the padding] -> [reshape back]

The kernels multiply one operand signedness (VNNI u8 x s8; sdot and dp4a s8 x s8): an
``x`` of the other kind is shifted by 128, which changes ``x @ W`` by ``shift * colsum(W)``,
a compile-time int32 per column that the kernel subtracts again (its ``offset`` input).
The result is exact. Kernels with the same shapes are shared; after a rewrite no int8
matmul is left, so the passes are idempotent.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

_MATMUL = tvm.ir.Op.get("relax.matmul")
_ACT_DTYPES = ("uint8", "int8")


@dataclass(frozen=True)
class DenseKernel:
    """One target's int8 dense kernel, as the shared rewrite needs it.

    ``plan(m, k, n) -> (mp, kp, np, tiles)``: padded sizes and the kernel's tiling;
    ``pack(w, kp, np)``: the packed int8 weight; ``build(mp, kp, np, tiles, with_offset)``:
    the scheduled PrimFunc (``with_offset``: it adds an int32 ``offset[np]`` per column).
    """

    name: str  # in kernel names: tvmq_int8_dense_<name>_<M>x<K>x<N>
    operand_dtype: str  # the activation dtype the kernel multiplies: "uint8" or "int8"
    plan: Callable[[int, int, int], tuple[int, int, int, Any]]
    pack: Callable[[np.ndarray, int, int], np.ndarray]
    build: Callable[[int, int, int, Any, bool], tvm.tirx.PrimFunc]
    # For a symbolic row count M (dynamic batch / sequence): ``build_rows(kp, np, with_offset)``
    # takes ``M = rows * mo`` rows, ``mo`` its last input (a scalar); None: static M only.
    build_rows: Callable[[int, int, bool], tvm.tirx.PrimFunc] | None = None
    rows: int = 8
    # The kernel's name in function names for a plan's ``tiles``, when it depends on them.
    label: Callable[[Any], str] | None = None
    # False: only activations already of ``operand_dtype`` (no shift, no offset input); the
    # others are left for another kernel (the CUDA IMMA kernel leaves uint8 ones to dp4a).
    shifts: bool = True


def _static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    dims = getattr(ty.shape, "values", None)
    if dims is None or not all(isinstance(d, tvm.tirx.IntImm) for d in dims):
        return None
    return tuple(int(d) for d in dims)


def rows_shape(expr: relax.Expr) -> tuple | None:
    """The shape of a tensor whose last dim is static and leading dims may be symbolic
    (ints where static, ``PrimExpr`` elsewhere), else None."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    dims = getattr(ty.shape, "values", None)
    if not dims or not isinstance(dims[-1], tvm.tirx.IntImm):
        return None
    return tuple(int(d) if isinstance(d, tvm.tirx.IntImm) else d for d in dims)


def is_symbolic(shape) -> bool:
    return any(not isinstance(d, int) for d in shape)


def shift_bytes(x: relax.Expr, by: int, dtype: str) -> relax.Expr:
    """``dtype(int16(x) + by)``: int8 <-> uint8 by +/-128 (vpdpbusd wants unsigned x signed)."""
    step = relax.const(abs(by), "int16")
    wide = relax.op.astype(x, "int16")
    moved = relax.op.add(wide, step) if by > 0 else relax.op.subtract(wide, step)
    return relax.op.astype(moved, dtype)


def match_int8_dense(
    call: relax.Expr, symbolic_rows: bool = False
) -> tuple[relax.Expr, tuple, np.ndarray] | None:
    """(x, x shape, W as numpy) for a lowerable ``matmul(x, W_const, out_dtype=int32)``;
    with ``symbolic_rows`` the leading dims of ``x`` may be symbolic (``PrimExpr`` in the shape)."""
    if not isinstance(call, relax.Call) or not call.op.same_as(_MATMUL):
        return None
    x, w = call.args
    if str(call.attrs.out_dtype) != "int32" or not isinstance(w, tvm.ir.Constant):
        return None
    if not isinstance(x.ty, relax.TensorType) or str(x.ty.dtype) not in _ACT_DTYPES:
        return None
    if str(w.ty.dtype) != "int8":
        return None
    x_shape = rows_shape(x) if symbolic_rows else _static_shape(x)
    w_shape = _static_shape(w)
    if x_shape is None or w_shape is None or len(w_shape) != 2 or len(x_shape) < 2:
        return None
    if x_shape[-1] != w_shape[0] or 0 in x_shape or 0 in w_shape:
        return None
    return x, x_shape, w.value.numpy()


@mutator
class _DenseRewriter(PyExprMutator):
    """Replaces each matched matmul by pad -> call_tir(kernel) -> slice."""

    def __init__(self, mod: tvm.IRModule, kernel: DenseKernel):
        super().__init__(mod)
        self.kernel = kernel
        self.kernels: dict[tuple, tvm.ir.GlobalVar] = {}
        self.changed = False

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        found = match_int8_dense(call, symbolic_rows=self.kernel.build_rows is not None)
        if found is None or (not self.kernel.shifts and self._shift(found[0])):
            return call
        self.changed = True
        if is_symbolic(found[1]):
            return self._lower_rows(*found)
        return self._lower(*found)

    def _shift(self, x: relax.Expr) -> int:
        """+-128 when ``x``'s signedness is not the kernel's operand's, else 0."""
        if str(x.ty.dtype) == self.kernel.operand_dtype:
            return 0
        return 128 if self.kernel.operand_dtype == "uint8" else -128

    def _weight_args(self, w: np.ndarray, kp: int, np_: int, shift: int) -> list:
        """The packed weight, and with a shift the int32 column offset that undoes it."""
        args = [relax.const(self.kernel.pack(w, kp, np_), "int8")]
        if shift:
            offset = np.zeros(np_, dtype=np.int32)
            offset[: w.shape[1]] = -shift * w.astype(np.int32).sum(axis=0)
            args.append(relax.const(offset, "int32"))
        return args

    def _lower_rows(self, x: relax.Expr, x_shape: tuple, w: np.ndarray) -> relax.Expr:
        """The kernel for a symbolic row count M: rows padded (at run time) to a multiple
        of ``kernel.rows``, the kernel told how many row tiles, the padding sliced off."""
        bb = self.builder_
        k, n = w.shape
        kp, np_ = self.kernel.plan(self.kernel.rows, k, n)[1:3]
        m = math.prod(x_shape[:-1])  # a PrimExpr
        tiles = tvm.tirx.floordiv(m + self.kernel.rows - 1, self.kernel.rows)
        mp = tiles * self.kernel.rows
        shift = self._shift(x)
        x = bb.emit(relax.op.reshape(x, (m, k)))
        if shift:
            x = bb.emit(shift_bytes(x, shift, self.kernel.operand_dtype))
        if kp != k:
            x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, kp - k]))
        pad = relax.op.zeros(relax.ShapeExpr([mp - m, kp]), self.kernel.operand_dtype)
        x = bb.emit(relax.op.concat([x, bb.emit(pad)], axis=0))
        args = [x, *self._weight_args(w, kp, np_, shift), relax.prim_value(tiles)]
        key = ("rows", kp, np_, bool(shift))
        if key not in self.kernels:
            func = self.kernel.build_rows(kp, np_, bool(shift)).with_attr("op_pattern", 8)
            name = f"tvmq_int8_dense_{self.kernel.name}_Mx{kp}x{np_}"
            self.kernels[key] = self.builder_.add_func(func, name + ("_offset" if shift else ""))
        out_ty = relax.TensorType((mp, np_), "int32")
        y = bb.emit(relax.call_tir(self.kernels[key], args, out_ty=out_ty))
        y = bb.emit(relax.op.strided_slice(y, axes=[0, 1], begin=[0, 0], end=[m, n]))
        return relax.op.reshape(y, (*x_shape[:-1], n))

    def _kernel_var(self, mp: int, kp: int, np_: int, tiles, with_offset: bool):
        key = (mp, kp, np_, tiles, with_offset)
        if key not in self.kernels:
            # Opaque to FuseOps: fusing a neighbour into a scheduled kernel breaks FuseTIR.
            func = self.kernel.build(mp, kp, np_, tiles, with_offset).with_attr("op_pattern", 8)
            label = self.kernel.label(tiles) if self.kernel.label else self.kernel.name
            name = f"tvmq_int8_dense_{label}_{mp}x{kp}x{np_}"
            name += "_offset" if with_offset else ""
            self.kernels[key] = self.builder_.add_func(func, name)
        return self.kernels[key]

    def _lower(self, x: relax.Expr, x_shape: tuple[int, ...], w: np.ndarray) -> relax.Expr:
        bb = self.builder_
        k, n = w.shape
        m = math.prod(x_shape[:-1])
        mp, kp, np_, tiles = self.kernel.plan(m, k, n)
        shift = self._shift(x)
        if len(x_shape) != 2:
            x = bb.emit(relax.op.reshape(x, (m, k)))
        if shift:
            x = bb.emit(shift_bytes(x, shift, self.kernel.operand_dtype))
        if kp != k or mp != m:
            x = bb.emit(relax.op.nn.pad(x, [0, mp - m, 0, kp - k]))
        args = [x, *self._weight_args(w, kp, np_, shift)]
        kernel = self._kernel_var(mp, kp, np_, tiles, bool(shift))
        y = bb.emit(relax.call_tir(kernel, args, out_ty=relax.TensorType((mp, np_), "int32")))
        if mp != m or np_ != n:
            y = bb.emit(relax.op.strided_slice(y, axes=[0, 1], begin=[0, 0], end=[m, n]))
        if len(x_shape) != 2:
            return relax.op.reshape(y, (*x_shape[:-1], n))
        return y


def rewrite_functions(mod: tvm.IRModule, rewriter, finish=None) -> tvm.IRModule:
    """Every Relax function of ``mod`` through ``rewriter`` (a PyExprMutator built on ``mod``
    with a ``changed`` flag): ``mod`` itself when nothing matched, else the module of its
    builder (with the kernels it added) holding the rewritten functions, each passed through
    ``finish`` when given."""
    updates = {}
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            new_func = rewriter.visit_expr(func)
            if not new_func.same_as(func):
                updates[gv] = new_func
    if not rewriter.changed:
        return mod
    new_mod = rewriter.builder_.get()
    for gv, func in updates.items():
        new_mod[gv] = finish(func) if finish is not None else func
    return new_mod


def rewrite_int8_dense(mod: tvm.IRModule, kernel: DenseKernel) -> tvm.IRModule:
    """Every Relax function of ``mod`` with its int8 dense layers on ``kernel``."""
    return rewrite_functions(mod, _DenseRewriter(mod, kernel))
