"""Int8AsInt16: int8 matmuls with a constant weight as exact int16 products on AVX2 CPUs.

On an x86 CPU with AVX2 and neither AVX-512 nor avx512vnni (Intel Haswell to Comet Lake, AMD
Zen 1-3) no tvmq byte kernel runs, and :class:`Int8AsFloat` moves int8 products to the
float32 kernels. Where the core has full-width 256-bit integer multipliers (Zen 2 / 3,
Intel's), ``vpmaddwd`` multiplies 16 int16 pairs an instruction where ``vfmadd231ps``
multiplies 8 floats: exact products of bytes widened to int16, summed in int32 (no
saturation, unlike ``vpmaddubsw``'s int16 pair sums). This pass rewrites, on such targets::

    acc = R.matmul(x, W, out_dtype="int32")       # x: uint8 / int8, W: an int8 constant

into::

    acc = R.matmul(R.astype(x, "int16"), W_i16, out_dtype="int32")

which :class:`PackFloatDense` runs on its register-blocked kernel in ``int16`` mode
(:func:`~tvmq.kernels.cpu_float_conv.float_conv2d_nhwc`, the pair reduction tensorized
with :data:`~tvmq.kernels.x86_madd_intrin.MADD_8X2`). The sums are the int32 loops' bits;
the ``astype`` fuses into the kernel that quantized ``x``, which then writes 2 bytes a value
where Int8AsFloat's wrote 4. On one AMD Zen 3 core MiniLM's dense shapes (128 x 384 x 1536,
128 x 1536 x 384) ran 1.66-1.69x faster than on the float32 kernel. The build stores the
int16 weights, of at most 256 values, as 8-bit codes decoded at load (``Int8AsFloat``'s
:data:`~tvmq.passes.int8_as_float.ATTR`), so the library keeps its int8 size.

Convs take the int16 kernel too, without this pass: Int8AsFloat makes them float convs,
and :class:`PackFloatConv` runs those it requantizes in the kernel on the int16 kernel on
the same targets (a direct ``groups`` 1 conv over an even number of channels; Winograd's
3x3 convs stay float, at 4/9 of the multiply-adds), converting their input where its
producer did not store int16 for them.

Left alone (for Int8AsFloat): convs, activation x activation matmuls, symbolic shapes, an
odd reduction length, matmuls below ``MIN_MACS`` and every target but AVX2 without AVX-512.
Where it belongs: with the target kernels, right before Int8AsFloat.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .int8_as_float import ATTR
from .pack_float_dense import MIN_MACS
from .pack_int8_dense_x86 import llvm_target_has, target_has_vnni
from .relax_utils import MATMUL, const_value, map_functions, op_name, static_shape, tensor_dtype

_INT8 = ("int8", "uint8")


def wants_int8_as_int16(target: tvm.target.Target | None) -> bool:
    """True for an LLVM x86 target with AVX2 and FMA and without AVX-512 (nor VNNI)."""
    return (
        llvm_target_has(target, "avx2", "fma")
        and not llvm_target_has(target, "avx512f")
        and not target_has_vnni(target)
    )


@mutator
class _ToInt16(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.rewritten = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if op_name(call) != MATMUL or str(call.attrs.out_dtype) != "int32":
            return call
        x, w_expr = call.args
        x_shape = static_shape(x)
        if tensor_dtype(x) not in _INT8 or x_shape is None or len(x_shape) < 2:
            return call
        w = const_value(w_expr, self.lookup_binding)
        if w is None or w.dtype != np.int8 or w.ndim != 2 or w.shape[0] % 2 or w.shape[0] < 4:
            return call
        if math.prod(x_shape) * w.shape[1] < MIN_MACS:
            return call
        self.rewritten += 1
        x16 = self.builder_.emit(relax.op.astype(x, "int16"))
        return relax.op.matmul(x16, relax.const(w.astype(np.int16)), out_dtype="int32")


@tvm.transform.module_pass(opt_level=0, name="Int8AsInt16")
class Int8AsInt16:
    """Compute int8 matmuls with a constant weight as int16 products on AVX2 targets.

    Parameters
    ----------
    target : tvm.target.Target or dict or str, optional
        The build target. Defaults to ``tvm.target.Target.current()`` when the pass runs;
        the pass is a no-op unless :func:`wants_int8_as_int16` holds for it.
    """

    def __init__(self, target: tvm.target.Target | dict | str | None = None):
        self.target = tvm.target.Target(target) if target is not None else None

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = self.target or tvm.target.Target.current(allow_none=True)
        if not wants_int8_as_int16(target):
            return mod

        def rewrite(_gv, func):
            mutator = _ToInt16(mod)
            new = mutator.visit_expr(func)
            return new.with_attr(ATTR, True) if mutator.rewritten else func

        return map_functions(mod, rewrite)
