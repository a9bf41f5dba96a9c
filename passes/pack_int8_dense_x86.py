"""PackInt8DenseX86: int8 matmuls with a constant weight -> a VNNI kernel on a packed weight.

Rewrites, when the target has ``avx512vnni``::

    y = R.matmul(x, W, out_dtype="int32")   # x: (..., K) uint8 or int8, static shape
                                            # W: (K, N) int8 relax.Constant

into a ``call_tir`` to :func:`tvmq.kernels.int8_dense_vnni` with ``W`` packed at compile
time as ``[N/16, K/4, 16, 4]`` (zero-padded to multiples of 4 / 16). Around the call:
leading dimensions of ``x`` are flattened (``reshape``); ``K`` is padded with a
``nn.pad`` (any value works, the padded weight rows are 0); ``M`` is padded when the
register tile does not divide it; a ``strided_slice`` drops the padding of the result.

Signed activations: ``vpdpbusd`` multiplies *unsigned* by signed bytes, so an int8 ``x``
is shifted to uint8 (``x + 128``) before the kernel and the kernel adds the constant
compensation ``-128 * colsum(W)`` (an int32 per column) to the result; the answer is the
exact int8 x int8 product. Everything else (float matmuls, non-constant or non-int8
weights, batched weights, symbolic shapes, other out dtypes) is left alone.

Where it belongs: after :class:`LowerInt8` and before ``LegalizeOps`` (it emits Relax
ops such as ``pad`` / ``strided_slice`` that still need legalizing, and ``LegalizeOps``
would otherwise lower the matmul itself). The kernels are marked ``tirx.is_scheduled``,
so dlight / MetaSchedule keep their schedule. Without avx512vnni in the target (or off
x86, or for a non-LLVM target) the module is returned unchanged; after a rewrite no int8
matmul is left, so running the pass again changes nothing.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvmq.kernels.x86_int8 import choose_tiles, int8_dense_vnni, pack_weight_vnni, padded_kn

_MATMUL = tvm.ir.Op.get("relax.matmul")
_ACT_DTYPES = ("uint8", "int8")


def target_has_vnni(target: tvm.target.Target | None) -> bool:
    """True for an LLVM x86 target whose CPU / attributes include ``avx512vnni``."""
    if target is None or target.kind.name != "llvm":
        return False
    try:
        return bool(tvm.target.codegen.target_has_features("avx512vnni", target))
    except tvm.error.TVMError:  # e.g. a triple LLVM does not know
        return False


def _static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    dims = getattr(ty.shape, "values", None)
    if dims is None or not all(isinstance(d, tvm.tirx.IntImm) for d in dims):
        return None
    return tuple(int(d) for d in dims)


def _match(call: relax.Expr) -> tuple[relax.Expr, tuple[int, ...], np.ndarray] | None:
    """(x, x shape, W as numpy) for a lowerable ``matmul(x, W_const, out_dtype=int32)``."""
    if not isinstance(call, relax.Call) or not call.op.same_as(_MATMUL):
        return None
    x, w = call.args
    if str(call.attrs.out_dtype) != "int32" or not isinstance(w, tvm.ir.Constant):
        return None
    if str(x.ty.dtype) not in _ACT_DTYPES or str(w.ty.dtype) != "int8":
        return None
    x_shape, w_shape = _static_shape(x), _static_shape(w)
    if x_shape is None or w_shape is None or len(w_shape) != 2 or len(x_shape) < 2:
        return None
    if x_shape[-1] != w_shape[0] or 0 in x_shape or 0 in w_shape:
        return None
    return x, x_shape, w.value.numpy()


@mutator
class _DenseRewriter(PyExprMutator):
    """Replaces each matched matmul by pad -> call_tir(kernel) -> slice."""

    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.kernels: dict[tuple, tvm.ir.GlobalVar] = {}
        self.changed = False

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        found = _match(call)
        if found is None:
            return call
        self.changed = True
        return self._lower(*found)

    def _kernel(self, m: int, k: int, n: int, with_offset: bool) -> tvm.ir.GlobalVar:
        key = (m, k, n, with_offset)
        if key not in self.kernels:
            func = int8_dense_vnni(m, k, n, with_offset=with_offset)
            name = f"tvmq_int8_dense_vnni_{m}x{k}x{n}" + ("_offset" if with_offset else "")
            self.kernels[key] = self.builder_.add_func(func, name)
        return self.kernels[key]

    def _lower(self, x: relax.Expr, x_shape: tuple[int, ...], w: np.ndarray) -> relax.Expr:
        bb = self.builder_
        k, n = w.shape
        m = math.prod(x_shape[:-1])
        kp, np_ = padded_kn(k, n)
        mp = choose_tiles(m, np_).m_padded
        signed = str(x.ty.dtype) == "int8"
        if len(x_shape) != 2:
            x = bb.emit(relax.op.reshape(x, (m, k)))
        if signed:
            # x + 128 as uint8; the kernel subtracts 128 * colsum(W) again.
            wide = bb.emit(relax.op.astype(x, "int16"))
            x = bb.emit(relax.op.astype(relax.op.add(wide, relax.const(128, "int16")), "uint8"))
        if kp != k or mp != m:
            x = bb.emit(relax.op.nn.pad(x, [0, mp - m, 0, kp - k]))
        args = [x, relax.const(pack_weight_vnni(w), "int8")]
        if signed:
            offset = np.zeros(np_, dtype=np.int32)
            offset[:n] = -128 * w.astype(np.int32).sum(axis=0)
            args.append(relax.const(offset, "int32"))
        kernel = self._kernel(mp, kp, np_, signed)
        y = bb.emit(relax.call_tir(kernel, args, out_ty=relax.TensorType((mp, np_), "int32")))
        if mp != m or np_ != n:
            y = bb.emit(relax.op.strided_slice(y, axes=[0, 1], begin=[0, 0], end=[m, n]))
        if len(x_shape) != 2:
            return relax.op.reshape(y, (*x_shape[:-1], n))
        return y


@tvm.transform.module_pass(opt_level=0, name="PackInt8DenseX86")
class PackInt8DenseX86:
    """Lower ``matmul(int8/uint8 x, const int8 W, out_dtype=int32)`` to a VNNI kernel.

    Parameters
    ----------
    target : tvm.target.Target or dict or str, optional
        The build target. Defaults to ``tvm.target.Target.current()`` when the pass runs;
        with neither, or without ``avx512vnni``, the pass is a no-op.
    """

    def __init__(self, target: tvm.target.Target | dict | str | None = None):
        self.target = tvm.target.Target(target) if target is not None else None

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = self.target or tvm.target.Target.current(allow_none=True)
        if not target_has_vnni(target):
            return mod
        rewriter = _DenseRewriter(mod)
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
            new_mod[gv] = func
        return new_mod
