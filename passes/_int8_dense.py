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
The result is exact. A kernel with ``epilogues`` (x86 VNNI / AMX) also stores the requantize
``LowerInt8`` emits after the layer (:func:`find_dense_epilogues`), which then replaces those
ops. Kernels with the same shapes are shared; after a rewrite no int8 matmul is left, so the
passes are idempotent.
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

from tvmq.kernels.x86_int8 import Requantize, with_int_rounding

from .dynamic_epilogue import DynamicEpilogue, find_dynamic_epilogues
from .relax_utils import alias_binding, dataflow_bindings, op_name, static_shape
from .requantize_epilogue import ChannelAxis, RequantizeEpilogue, requantize_chain

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
    # The epilogue kinds (``Requantize``, ``DynamicDequantize``) the kernel of a plan's
    # ``tiles`` can store: ``build`` / ``build_rows`` then take a keyword ``requantize`` and
    # the kernel stores the ops LowerInt8 / QuantizeDynamic emit after the layer (its extra
    # inputs follow the offset: :mod:`requantize_epilogue`, :mod:`dynamic_epilogue`).
    epilogues: Callable[[Any], tuple[type, ...]] | None = None
    # Kernels of at most this many padded rows are GEMVs, where a little more work per element
    # costs less than one more kernel: ``build`` then takes an int8 ``x`` as is (keyword
    # ``x_dtype="int8"``, bytes flipped in registers, no shift op; x86 GEMMs would pay a
    # port-5 uop per broadcast) and, for a last tile of columns (``np <= 64``), stores
    # exactly ``n`` columns (keyword ``n_out``, predicated stores, no slice). 0: never.
    gemv_rows: int = 0
    # Whether the kernel of a plan's ``tiles`` stores only the first ``m`` rows of a product
    # it pads to ``mp`` (keyword ``m_out``, a predicated last row tile): no slice of the
    # result then copies it (DeiT-tiny's 197 tokens, 203 padded: 11.1 -> 10.65 ms). None: never.
    exact_rows: Callable[[Any], bool] | None = None
    # Whether the kernel of a plan's ``tiles`` quantizes its own float32 rows where that pays
    # (a ``DynamicDequantize`` with ``quantize``, see :mod:`dynamic_epilogue`): it then reads a
    # dynamic layer's float32 input, not QuantizeDynamic's uint8 one. None: never.
    quantizes: Callable[[Any], bool] | None = None


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
    x_shape = rows_shape(x) if symbolic_rows else static_shape(x)
    w_shape = static_shape(w)
    if x_shape is None or w_shape is None or len(w_shape) != 2 or len(x_shape) < 2:
        return None
    if x_shape[-1] != w_shape[0] or 0 in x_shape or 0 in w_shape:
        return None
    return x, x_shape, w.value.numpy()


def find_dense_epilogues(
    mod: tvm.IRModule, symbolic_rows: bool = False
) -> dict[relax.Var, RequantizeEpilogue]:
    """The int8 dense layers whose result only feeds ``LowerInt8``'s float requantize (after
    its reshape back to the leading dims, when there is one), per output channel along the
    last axis (see :func:`requantize_chain`): a kernel with ``epilogues`` stores the int8 /
    uint8 (or float32) result itself, one kernel instead of about five."""
    found = {}
    for b, only_user in dataflow_bindings(mod):
        dense = match_int8_dense(b.value, symbolic_rows)
        if dense is None:
            continue
        n = dense[2].shape[1]
        start = [b.var]
        nxt = only_user(b.var)
        if nxt is not None and op_name(nxt[1]) == "relax.reshape":
            shape = rows_shape(nxt[0])
            if nxt[1].args[0].same_as(b.var) and shape is not None and shape[-1] == n:
                start.append(nxt[0])  # LowerInt8's reshape of a 3-D layer's result
        ndim = len(rows_shape(start[-1]))
        epilogue = requantize_chain(start, ChannelAxis(ndim - 1, ndim, n), only_user)
        if epilogue is not None:
            found[b.var] = epilogue
    return found


@mutator
class _DenseRewriter(PyExprMutator):
    """Replaces each matched matmul by pad -> call_tir(kernel) -> slice (and, when the kernel
    ``epilogues``, the requantize ops after it by the kernel's result)."""

    def __init__(self, mod: tvm.IRModule, kernel: DenseKernel):
        super().__init__(mod)
        self.kernel = kernel
        self.kernels: dict[tuple, tvm.ir.GlobalVar] = {}
        self.changed = False
        symbolic = kernel.build_rows is not None
        self.epilogues: dict[relax.Var, RequantizeEpilogue | DynamicEpilogue] = {}
        if kernel.epilogues is not None:
            self.epilogues.update(find_dense_epilogues(mod, symbolic))
            self.epilogues.update(
                find_dynamic_epilogues(mod, lambda call: match_int8_dense(call, symbolic))
            )
        # a requantize op's var -> the dense layer's var, whose new value is the op's result
        self.aliases: dict[relax.Var, relax.Var] = {}
        self.binding: relax.VarBinding | None = None  # the one being rewritten

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        var = binding.var
        if var in self.aliases:
            alias_binding(self, var, self.aliases[var])
            return
        self.binding = binding
        super().visit_var_binding_(binding)
        self.binding = None

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        is_binding = self.binding is not None and call.same_as(self.binding.value)
        call = super().visit_call_(call)
        found = match_int8_dense(call, symbolic_rows=self.kernel.build_rows is not None)
        if found is None or (not self.kernel.shifts and self._shift(found[0])):
            return call
        self.changed = True
        epilogue = self.epilogues.get(self.binding.var) if is_binding else None
        if epilogue is not None and not self._takes(epilogue, found):
            epilogue = None
        if epilogue is not None:  # the requantize ops are this kernel's result now
            for var in epilogue.chain:
                self.aliases[var] = self.binding.var
            if self._quantizes(epilogue, found):  # and it reads the float rows
                epilogue = epilogue.quantized_in_kernel(found[2].shape[0])
                found = (self.visit_expr(epilogue.source), *found[1:])
        if is_symbolic(found[1]):
            return self._lower_rows(*found, epilogue)
        return self._lower(*found, epilogue)

    def _takes(self, epilogue, found) -> bool:
        """Whether the kernel the matched layer runs on stores ``epilogue``: a kind its plan's
        tiles take, and a DynamicEpilogue (a row of params per kernel row) only unpadded."""
        _, x_shape, w = found
        if is_symbolic(x_shape):
            tiles, padded = self.kernel.plan(self.kernel.rows, *w.shape)[3], True
        else:
            m = math.prod(x_shape[:-1])
            mp, _, _, tiles = self.kernel.plan(m, *w.shape)
            padded = mp != m
        if not isinstance(epilogue.requantize, self.kernel.epilogues(tiles)):
            return False
        return not (padded and isinstance(epilogue, DynamicEpilogue))

    def _quantizes(self, epilogue, found) -> bool:
        """Whether the kernel quantizes the float rows the dense layer's bytes come from."""
        if not isinstance(epilogue, DynamicEpilogue) or epilogue.source is None:
            return False
        if self.kernel.quantizes is None or is_symbolic(found[1]):
            return False
        return self.kernel.quantizes(self.kernel.plan(math.prod(found[1][:-1]), *found[2].shape)[3])

    def _shift(self, x: relax.Expr) -> int:
        """+-128 when ``x``'s signedness is not the kernel's operand's, else 0."""
        if str(x.ty.dtype) == self.kernel.operand_dtype:
            return 0
        return 128 if self.kernel.operand_dtype == "uint8" else -128

    def _call(self, key, name, build, args, out_shape, epilogue, w, kp, np_, shift, rows=None):
        """``call_tir`` of the kernel ``build(with_offset, **keywords)`` (shared per ``key``)
        on ``args`` + the packed weight, the int32 column offset (undoing the shift, plus the
        epilogue's) and the epilogue's multiplier; ``(m_out, n_out)`` ``out_shape``, where
        ``m_out`` is below the kernel's padded ``rows`` when it stores exact rows."""
        n = w.shape[1]
        consts = [relax.const(self.kernel.pack(w, kp, np_), "int8")]
        offset = np.zeros(np_, dtype=np.int32)
        offset[:n] = -shift * w.astype(np.int32).sum(axis=0)
        requantize, out_dtype = None, "int32"
        if epilogue is not None:  # int32 sums wrap the same in either order
            offset[:n] += epilogue.offset
            requantize, out_dtype = epilogue.requantize, epilogue.requantize.dtype
            if isinstance(requantize, Requantize):
                requantize = with_int_rounding(requantize, w, offset, epilogue.multiplier)
            name += requantize.kernel_suffix
        with_offset = bool(shift) or bool(offset.any())
        if with_offset:
            consts.append(relax.const(offset, "int32"))
            name += "_offset"
        for arg in epilogue.arguments(np_) if epilogue is not None else ():
            arg = self.visit_expr(arg)  # a DynamicEpilogue's params: the rewritten var
            if len(arg.ty.shape.values) > 2:  # one row of params per row of the kernel
                arg = self.builder_.emit(relax.op.reshape(arg, (out_shape[0], -1)))
            consts.append(arg)
        kw = {"requantize": requantize} if self.kernel.epilogues is not None else {}
        if _quantizing(epilogue):  # float32 rows, quantized in the kernel
            name += "_quantize"
        elif str(args[0].ty.dtype) != self.kernel.operand_dtype:  # a GEMV's int8 x
            kw["x_dtype"] = str(args[0].ty.dtype)
            name += "_" + kw["x_dtype"]
        if out_shape[1] != np_:  # a GEMV's exact columns
            kw["n_out"] = out_shape[1]
            name += f"_n{out_shape[1]}"
        if rows is not None and out_shape[0] != rows:  # exact rows of a padded product
            kw["m_out"] = out_shape[0]
        key = (*key, with_offset, *kw.items())
        if key not in self.kernels:
            # Opaque to FuseOps: fusing a neighbour into a scheduled kernel breaks FuseTIR.
            func = build(with_offset, **kw).with_attr("op_pattern", 8)
            self.kernels[key] = self.builder_.add_func(func, name)
        args = [args[0], *consts, *args[1:]]
        out_ty = relax.TensorType(out_shape, out_dtype)
        return self.builder_.emit(relax.call_tir(self.kernels[key], args, out_ty=out_ty))

    @staticmethod
    def _result_shape(x_shape: tuple, n: int, epilogue: RequantizeEpilogue | None):
        """The shape the layer's (or its epilogue's) result has in the module."""
        if epilogue is not None:
            return rows_shape(epilogue.chain[-1])
        return (*x_shape[:-1], n)

    def _lower_rows(self, x, x_shape: tuple, w: np.ndarray, epilogue) -> relax.Expr:
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
        y = self._call(
            ("rows", kp, np_),
            f"tvmq_int8_dense_{self.kernel.name}_Mx{kp}x{np_}",
            lambda off, **kw: self.kernel.build_rows(kp, np_, off, **kw),
            [x, relax.prim_value(tiles)],
            (mp, np_),
            epilogue, w, kp, np_, shift,
        )  # fmt: skip
        y = bb.emit(relax.op.strided_slice(y, axes=[0, 1], begin=[0, 0], end=[m, n]))
        return relax.op.reshape(y, self._result_shape(x_shape, n, epilogue))

    def _lower(self, x, x_shape: tuple[int, ...], w: np.ndarray, epilogue) -> relax.Expr:
        bb = self.builder_
        k, n = w.shape
        m = math.prod(x_shape[:-1])
        mp, kp, np_, tiles = self.kernel.plan(m, k, n)
        quantizing = _quantizing(epilogue)  # x: float32 rows the kernel pads and quantizes
        shift = 0 if quantizing else self._shift(x)
        gemv = mp <= self.kernel.gemv_rows
        n_out = n if gemv and np_ <= 64 else np_
        exact_rows = self.kernel.exact_rows is not None and self.kernel.exact_rows(tiles)
        m_out = m if exact_rows else mp
        if len(x_shape) != 2:
            x = bb.emit(relax.op.reshape(x, (m, k)))
        if shift and not gemv:
            x = bb.emit(shift_bytes(x, shift, self.kernel.operand_dtype))
        if (kp != k or mp != m) and not quantizing:
            x = bb.emit(relax.op.nn.pad(x, [0, mp - m, 0, kp - k]))
        y = self._call(
            (mp, kp, np_, tiles),
            f"tvmq_int8_dense_{self.kernel.label(tiles) if self.kernel.label else self.kernel.name}"
            f"_{mp}x{kp}x{np_}" + (f"_m{m_out}" if m_out != mp else ""),
            lambda off, **kw: self.kernel.build(mp, kp, np_, tiles, off, **kw),
            [x],
            (m_out, n_out),
            epilogue, w, kp, np_, shift, rows=mp,
        )  # fmt: skip
        if m_out != m or n_out != n:
            y = bb.emit(relax.op.strided_slice(y, axes=[0, 1], begin=[0, 0], end=[m, n]))
        shape = self._result_shape(x_shape, n, epilogue)
        return y if shape == (m, n) else relax.op.reshape(y, shape)


def _quantizing(epilogue) -> bool:
    """Whether ``epilogue`` is a dynamic layer's whose kernel quantizes its float32 rows."""
    return isinstance(epilogue, DynamicEpilogue) and epilogue.requantize.quantize is not None


class KernelRewriter(PyExprMutator):
    """The shell of a pass that replaces calls by tvmq kernels (decorate subclasses with
    ``@mutator``): each call :meth:`match` accepts becomes :meth:`rewrite` ``(*found)``;
    :meth:`kernel_var` adds a kernel to the module once per key; ``changed`` says whether
    anything was rewritten (:func:`rewrite_functions` reads it)."""

    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.kernels: dict[tuple, tvm.ir.GlobalVar] = {}
        self.changed = False

    def match(self, call: relax.Call) -> tuple | None:
        """The arguments of :meth:`rewrite` for a call this pass takes, else None."""
        raise NotImplementedError

    def rewrite(self, *found) -> relax.Expr:
        raise NotImplementedError

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        found = self.match(call)
        if found is None:
            return call
        self.changed = True
        return self.rewrite(*found)

    def kernel_var(self, key: tuple, name: str, build) -> tvm.ir.GlobalVar:
        """The global of the kernel ``build()`` makes, added to the module once per ``key``."""
        if key not in self.kernels:
            self.kernels[key] = self.builder_.add_func(build(), name)
        return self.kernels[key]


def batch_matmul_dims(a: relax.Expr, b: relax.Expr) -> tuple | None:
    """``(batch dims, M, K, N)`` of ``matmul(a, b)`` over static, non-empty 3+-D operands
    with the same batch dims, else None."""
    a_shape, b_shape = static_shape(a), static_shape(b)
    if a_shape is None or b_shape is None or len(a_shape) < 3 or len(a_shape) != len(b_shape):
        return None
    (*batch, m, k), (*b_batch, k2, n) = a_shape, b_shape
    if batch != b_batch or k != k2 or 0 in a_shape or 0 in b_shape:
        return None
    return tuple(batch), m, k, n


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
    finish = relax.analysis.remove_all_unused if kernel.epilogues is not None else None
    return rewrite_functions(mod, _DenseRewriter(mod, kernel), finish)
