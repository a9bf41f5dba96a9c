"""Int8DenseCUDA: int8 matmuls with a constant weight -> a dp4a CUDA kernel on a packed weight.

Rewrites, on a CUDA target with ``dp4a`` (sm_61 or later)::

    y = R.matmul(x, W, out_dtype="int32")   # x: (..., K) int8 or uint8, static shape
                                            # W: (K, N) int8 relax.Constant

into a ``call_tir`` to :func:`tvmq.kernels.cuda_int8.int8_dense_dp4a` (a tiled,
shared-memory GEMM whose reduction is one ``__dp4a`` per 4 bytes) with ``W`` packed at
compile time as ``[K/4, N, 4]``, zero-padded to whole tiles. Around the call: leading
dimensions of ``x`` are flattened (``reshape``), ``M`` and ``K`` are padded with ``nn.pad``
(zeros: the padded weight rows are 0 too), and a ``strided_slice`` drops the padding of the
result.

Unsigned activations: ``dp4a.s32.s32`` multiplies signed bytes, so a uint8 ``x`` is shifted
to int8 (``x - 128``) before the kernel and the kernel adds the constant compensation
``+128 * colsum(W)`` (an int32 per column): the answer is the exact uint8 x int8 product.
Everything else (float matmuls, non-constant or non-int8 weights, batched weights, symbolic
shapes, other out dtypes, int8 ``conv2d``) is left alone and gets TVM's default lowering.

Where it belongs: after :class:`LowerInt8` and before ``LegalizeOps`` (it emits Relax ops
that still need legalizing, and ``LegalizeOps`` would otherwise lower the matmul itself),
i.e. first in ``tvmq.build``'s CUDA fusion phase. The kernels are marked
``tirx.is_scheduled``, so dlight / MetaSchedule keep their schedule. On a non-CUDA target or
a GPU older than sm_61 the module is returned unchanged; after a rewrite no int8 matmul is
left, so running the pass again changes nothing.
"""

from __future__ import annotations

import math
import re

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvmq.kernels.cuda_int8 import (
    choose_cuda_tiles,
    int8_dense_dp4a,
    pack_weight_dp4a,
    padded_mkn,
)

_MATMUL = tvm.ir.Op.get("relax.matmul")
_ACT_DTYPES = ("uint8", "int8")
_DP4A_MIN_SM = 61
_OPAQUE = 8  # relax OpPatternKind.kOpaque


def target_has_dp4a(target: tvm.target.Target | None) -> bool:
    """True for a CUDA target whose ``arch`` is ``sm_61`` or later (``dp4a`` exists)."""
    if target is None or target.kind.name != "cuda":
        return False
    found = re.match(r"sm_(\d+)", str(target.attrs.get("arch", "")))
    return found is not None and int(found[1]) >= _DP4A_MIN_SM


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
    """Replaces each matched matmul by pad -> call_tir(dp4a kernel) -> slice."""

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

    def _kernel(self, m: int, k: int, n: int, tiles, with_offset: bool) -> tvm.ir.GlobalVar:
        key = (m, k, n, tiles, with_offset)
        if key not in self.kernels:
            func = int8_dense_dp4a(m, k, n, with_offset=with_offset, tiles=tiles)
            # Opaque to FuseOps: FuseTIR cannot merge a scheduled kernel with its neighbours.
            func = func.with_attr("op_pattern", _OPAQUE)
            name = f"tvmq_int8_dense_dp4a_{m}x{k}x{n}" + ("_offset" if with_offset else "")
            self.kernels[key] = self.builder_.add_func(func, name)
        return self.kernels[key]

    def _lower(self, x: relax.Expr, x_shape: tuple[int, ...], w: np.ndarray) -> relax.Expr:
        bb = self.builder_
        k, n = w.shape
        m = math.prod(x_shape[:-1])
        tiles = choose_cuda_tiles(m, k, n)
        mp, kp, np_ = padded_mkn(m, k, n, tiles)
        unsigned = str(x.ty.dtype) == "uint8"
        if len(x_shape) != 2:
            x = bb.emit(relax.op.reshape(x, (m, k)))
        if unsigned:
            # x - 128 as int8; the kernel adds 128 * colsum(W) back.
            wide = bb.emit(relax.op.astype(x, "int16"))
            x = bb.emit(relax.op.astype(relax.op.subtract(wide, relax.const(128, "int16")), "int8"))
        if kp != k or mp != m:
            x = bb.emit(relax.op.nn.pad(x, [0, mp - m, 0, kp - k]))
        args = [x, relax.const(pack_weight_dp4a(w, kp, np_), "int8")]
        if unsigned:
            offset = np.zeros(np_, dtype=np.int32)
            offset[:n] = 128 * w.astype(np.int32).sum(axis=0)
            args.append(relax.const(offset, "int32"))
        kernel = self._kernel(mp, kp, np_, tiles, unsigned)
        y = bb.emit(relax.call_tir(kernel, args, out_ty=relax.TensorType((mp, np_), "int32")))
        if mp != m or np_ != n:
            y = bb.emit(relax.op.strided_slice(y, axes=[0, 1], begin=[0, 0], end=[m, n]))
        if len(x_shape) != 2:
            return relax.op.reshape(y, (*x_shape[:-1], n))
        return y


@tvm.transform.module_pass(opt_level=0, name="Int8DenseCUDA")
class Int8DenseCUDA:
    """Lower ``matmul(int8/uint8 x, const int8 W, out_dtype=int32)`` to a dp4a CUDA kernel.

    Parameters
    ----------
    target : tvm.target.Target or dict or str, optional
        The build target. Defaults to ``tvm.target.Target.current()`` when the pass runs;
        with neither, or for a non-CUDA target or an arch before sm_61, the pass is a no-op.
    """

    def __init__(self, target: tvm.target.Target | dict | str | None = None):
        self.target = tvm.target.Target(target) if target is not None else None

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = self.target or tvm.target.Target.current(allow_none=True)
        if not target_has_dp4a(target):
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
