"""PackInt8DenseARM: int8 matmuls with a constant weight -> an AArch64 dot-product kernel.

Rewrites, on an AArch64 LLVM target (``mtriple`` ``aarch64-*``) with NEON::

    y = R.matmul(x, W, out_dtype="int32")   # x: (..., K) int8 or uint8, static shape
                                            # W: (K, N) int8 relax.Constant

into a ``call_tir`` to :func:`tvmq.kernels.arm_int8.int8_dense_arm` with ``W`` packed at
compile time as ``[N/4, K/4, 4, 4]`` (zero-padded to multiples of 4). The kernel's inner
step is ``sdot`` when the target has ``+dotprod`` (Cortex-A76/A78, Pi 5, Jetson Orin CPU);
otherwise (Cortex-A72, Raspberry Pi 4) the same kernel with a plain-NEON step
(``smull`` + ``saddlp`` + ``addp``, :data:`tvmq.kernels.arm_dot_intrin.NEON_4X4`). Around
the call: leading dimensions of ``x`` are flattened (``reshape``); ``K`` is padded with a
``nn.pad`` (the padded weight rows are 0); ``M`` is padded when the register tile does not
divide it; a ``strided_slice`` drops the padding of the result.

Unsigned activations: ``sdot`` multiplies *signed* bytes (``usdot`` needs ``+i8mm``, which
the A76/A78 lack), so a uint8 ``x`` is shifted to int8 (``x - 128``) before the kernel and
the kernel adds the constant compensation ``+128 * colsum(W)`` (an int32 per column); the
answer is the exact uint8 x int8 product. Everything else (float matmuls, non-constant or
non-int8 weights, batched weights, symbolic shapes, other out dtypes) is left alone.

Where it belongs: after :class:`LowerInt8` and before ``LegalizeOps`` (it emits Relax ops
such as ``pad`` / ``strided_slice`` that still need legalizing), next to
:class:`PackInt8DenseX86` (each is a no-op on the other's targets). The kernels are marked
``tirx.is_scheduled``, so dlight / MetaSchedule keep their schedule. For a non-AArch64 or
non-LLVM target the module is returned unchanged; after a rewrite no int8 matmul is left,
so running the pass again changes nothing. int8 ``conv2d`` is not rewritten.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvmq.kernels.arm_int8 import (
    Instruction,
    choose_tiles,
    int8_dense_arm,
    pack_weight_arm,
    padded_kn,
)

_MATMUL = tvm.ir.Op.get("relax.matmul")
_ACT_DTYPES = ("uint8", "int8")


def arm_int8_instruction(target: tvm.target.Target | None) -> Instruction | None:
    """``"sdot"`` for an AArch64 LLVM target with dotprod, ``"neon"`` for one without, else None."""
    if target is None or target.kind.name != "llvm":
        return None
    triple = str(target.attrs.get("mtriple", "") or "")
    if not triple.startswith(("aarch64", "arm64")):
        return None
    try:
        return "sdot" if tvm.target.codegen.target_has_features("dotprod", target) else "neon"
    except tvm.error.TVMError:  # e.g. a triple LLVM does not know
        return None


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
    if not isinstance(x.ty, relax.TensorType) or str(x.ty.dtype) not in _ACT_DTYPES:
        return None
    if str(w.ty.dtype) != "int8":
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

    def __init__(self, mod: tvm.IRModule, instruction: Instruction):
        super().__init__(mod)
        self.instruction = instruction
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
            func = int8_dense_arm(m, k, n, instruction=self.instruction, with_offset=with_offset)
            name = f"tvmq_int8_dense_{self.instruction}_{m}x{k}x{n}"
            self.kernels[key] = self.builder_.add_func(
                func, name + ("_offset" if with_offset else "")
            )
        return self.kernels[key]

    def _lower(self, x: relax.Expr, x_shape: tuple[int, ...], w: np.ndarray) -> relax.Expr:
        bb = self.builder_
        k, n = w.shape
        m = math.prod(x_shape[:-1])
        kp, np_ = padded_kn(k, n)
        mp = choose_tiles(m, np_, self.instruction).m_padded
        unsigned = str(x.ty.dtype) == "uint8"
        if len(x_shape) != 2:
            x = bb.emit(relax.op.reshape(x, (m, k)))
        if unsigned:
            # x - 128 as int8; the kernel adds 128 * colsum(W) back.
            wide = bb.emit(relax.op.astype(x, "int16"))
            x = bb.emit(relax.op.astype(relax.op.subtract(wide, relax.const(128, "int16")), "int8"))
        if kp != k or mp != m:
            x = bb.emit(relax.op.nn.pad(x, [0, mp - m, 0, kp - k]))
        args = [x, relax.const(pack_weight_arm(w), "int8")]
        if unsigned:
            offset = np.zeros(np_, dtype=np.int32)
            offset[:n] = 128 * w.astype(np.int32).sum(axis=0)
            args.append(relax.const(offset, "int32"))
        kernel = self._kernel(mp, kp, np_, unsigned)
        y = bb.emit(relax.call_tir(kernel, args, out_ty=relax.TensorType((mp, np_), "int32")))
        if mp != m or np_ != n:
            y = bb.emit(relax.op.strided_slice(y, axes=[0, 1], begin=[0, 0], end=[m, n]))
        if len(x_shape) != 2:
            return relax.op.reshape(y, (*x_shape[:-1], n))
        return y


@tvm.transform.module_pass(opt_level=0, name="PackInt8DenseARM")
class PackInt8DenseARM:
    """Lower ``matmul(int8/uint8 x, const int8 W, out_dtype=int32)`` to an AArch64 kernel.

    Parameters
    ----------
    target : tvm.target.Target or dict or str, optional
        The build target. Defaults to ``tvm.target.Target.current()`` when the pass runs;
        with neither, or for a target that is not AArch64 LLVM, the pass is a no-op.
    """

    def __init__(self, target: tvm.target.Target | dict | str | None = None):
        self.target = tvm.target.Target(target) if target is not None else None

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = self.target or tvm.target.Target.current(allow_none=True)
        instruction = arm_int8_instruction(target)
        if instruction is None:
            return mod
        rewriter = _DenseRewriter(mod, instruction)
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
