"""Int8AsFloat: int8 matmuls and convs on the float32 kernels where the CPU has no int8 dot product.

tvmq's int8 kernels need a byte dot-product instruction: ``vpdpbusd`` (avx512vnni) on x86,
``sdot`` or NEON on aarch64. On an x86 CPU without avx512vnni (every AVX2-only CPU: Intel
Haswell to Comet Lake, AMD Zen 1-3) what :class:`LowerInt8` emits::

    acc = R.matmul(x, W, out_dtype="int32")          # x: uint8 / int8, W: int8
    acc = R.nn.conv2d(x, W, ..., out_dtype="int32")

took TVM's default lowering, widening int32 multiply loops: ResNet-18 int8 ran 4.8x slower
than the same model in float32 on a Zen 1 core. There the byte instructions would not help
much either: ``vpmaddubsw`` saturates pairs of u8 x s8 products at int16 (onnxruntime's
MLAS is wrong by 14 output steps on the QDQ MLP test without VNNI, and its static int8
MiniLM reaches cosine 0.33), and they multiply no more values a cycle than an FMA does
(``bench/cpu_peak.c`` on a Zen 1 core: ``vpmaddubsw`` + ``vpmaddwd`` + ``vpaddd`` 40 GOP/s,
``vfmadd231ps`` 43 GFLOP/s).

(Full-width AVX2 cores, Zen 2 / 3 and Intel's, multiply int16 pairs exactly at 1.6x their
FMA rate: there :class:`Int8AsInt16` takes the constant-weight matmuls first, and
:class:`PackFloatConv` runs this pass's requantized convs on its int16 kernel.)

This pass rewrites each of them, on such targets, into::

    acc = R.astype(R.matmul(R.astype(x, "float32"), W_f32, out_dtype="float32"), "int32")

(the same for conv2d; ``W_f32`` a float32 constant, or ``astype(W)`` where ``W`` is an
activation, as in attention), which the float kernels (:class:`PackFloatConv`,
:class:`PackFloatDense`, :class:`PackFloatBatchMatmul`) then take. Every byte and every
product of two bytes is exact in float32, and so is each partial sum below 2**24 in magnitude
(guaranteed for a layer whose ``max|x| * max over outputs of sum|W|`` stays below it; above,
an add rounds to float32's grid, a relative 6e-8 of a sum that the requantize divides by its
scale: far below one output step). Everything after ``acc`` (offsets, requantize, dequantize)
is unchanged; after a conv, :class:`PackFloatConv` computes it in the kernel's store (and
takes a 3x3 stride-1 conv of 32+ channels by Winograd, whose sums of bytes are exact only
below 2**22: beyond, a relative ~1e-6 off, an output step rarely).
Measured on an AMD Zen 1 core (AVX2), 1 thread: ResNet-18 int8 539 -> 115 ms (its fp32:
113 ms), outputs bit-identical to the int32 loops' (by Winograd since: 65 ms, the same
SQNR vs fp32, not bit-identical); MiniLM int8 273 -> 91 ms (the same SQNR,
outputs within 0.005 after a different fusion of its float tail), int8-dynamic 197 -> 91 ms
(bit-identical). The build stores the rewritten weights, float32
constants of at most 256 values, as 8-bit codes decoded at load (:data:`ATTR`), so the
library keeps its int8 size (ResNet-18: 11.8 MB, 46.8 MB without).

Left alone: targets with an int8 kernel (avx512vnni, aarch64, CUDA, ...), float ops, other
out dtypes, and matmuls of fewer than ``MIN_MACS`` (2**20) multiply-adds, which the float
matmul kernels do not take either (they keep their int8 weights; their time is small). Every
conv2d is rewritten: the float conv kernels take any size, TVM's int8 conv loops are scalar.
Where it belongs: with the target kernels, before the float kernel passes.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .pack_float_dense import MIN_MACS
from .pack_int8_dense_x86 import llvm_target_has, target_has_vnni
from .relax_utils import (
    CONV2D,
    MATMUL,
    is_tensor_const,
    map_functions,
    op_name,
    static_shape,
    tensor_dtype,
)

_INT8 = ("int8", "uint8")

ATTR = "tvmq.int8_as_float"
"""Attribute of a function whose int8 products this pass moved to float32: the build stores
its weights (now float32 constants of at most 256 values) as 8-bit codes decoded at load
(:class:`DecodeAtLoad`), so the library keeps its int8 size."""


def wants_int8_as_float(target: tvm.target.Target | None) -> bool:
    """True for an LLVM x86 target without avx512vnni: no tvmq int8 kernel runs there."""
    return llvm_target_has(target, "sse2") and not target_has_vnni(target)


def _matmul_macs(call: relax.Call) -> int:
    """Multiply-adds of a matmul (a symbolic shape counts as large)."""
    out, x = static_shape(call), static_shape(call.args[0])
    return MIN_MACS if out is None or x is None else math.prod(out) * x[-1]


@mutator
class _ToFloat(PyExprMutator):
    def _as_float(self, expr: relax.Expr) -> relax.Expr:
        if is_tensor_const(expr):
            return relax.const(expr.value.numpy().astype(np.float32), "float32")
        return self.builder_.emit(relax.op.astype(expr, "float32"))

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        op = op_name(call)
        if op not in (MATMUL, CONV2D) or str(call.attrs.out_dtype) != "int32":
            return call
        x, w = call.args
        if tensor_dtype(x) not in _INT8 or tensor_dtype(w) not in _INT8:
            return call
        if op == MATMUL and _matmul_macs(call) < MIN_MACS:
            return call
        xf, wf = self._as_float(x), self._as_float(w)
        if op == MATMUL:
            y = relax.op.matmul(xf, wf, out_dtype="float32")
        else:
            a = call.attrs
            y = relax.op.nn.conv2d(
                xf, wf, a.strides, a.padding, a.dilation, int(a.groups),
                a.data_layout, a.kernel_layout, a.out_layout, "float32",
            )  # fmt: skip
        return relax.op.astype(self.builder_.emit(y), "int32")


@tvm.transform.module_pass(opt_level=0, name="Int8AsFloat")
class Int8AsFloat:
    """Compute int8 matmuls / conv2d on float32 where the x86 target has no avx512vnni.

    Parameters
    ----------
    target : tvm.target.Target or dict or str, optional
        The build target. Defaults to ``tvm.target.Target.current()`` when the pass runs;
        the pass is a no-op unless :func:`wants_int8_as_float` holds for it.
    """

    def __init__(self, target: tvm.target.Target | dict | str | None = None):
        self.target = tvm.target.Target(target) if target is not None else None

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = self.target or tvm.target.Target.current(allow_none=True)
        if not wants_int8_as_float(target):
            return mod

        def rewrite(_gv, func):
            new = _ToFloat(mod).visit_expr(func)
            return func if new.same_as(func) else new.with_attr(ATTR, True)

        return map_functions(mod, rewrite)
