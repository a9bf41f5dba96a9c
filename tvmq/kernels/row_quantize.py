"""Dynamic int8's per-row quantize as one vectorized kernel without a divide per value.

:func:`row_quantize_u8` computes ``QuantizeDynamic``'s bytes, ``uint8(clip(round(x / s) +
z, 0, 255))`` with each row's scale and zero point (:func:`~tvmq.kernels.dynamic_quant.row_qparams_u8`'s),
its division :func:`exact_quotient`: one reciprocal a row, a multiply and two FMAs a value.
Used by :class:`tvmq.passes.FastRowQuantize`.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from tvmq.kernels.dynamic_quant import stored_u8
from tvmq.kernels.x86_int8 import KERNEL_ATTR
from tvmq.kernels.x86_int8_conv import OPAQUE


def _fma(a, b, c):
    return tirx.call_llvm_pure_intrin("float32", "llvm.fma.f32", a, b, c)


def exact_quotient(x, scale, reciprocal):
    """``x / scale`` correctly rounded, from ``reciprocal = 1 / scale`` (itself correctly
    rounded) by a multiply and two fused multiply-adds (Markstein's correction: ``q = x * r``,
    then ``q + fma(-q, scale, x) * r``): the bits of the division, for a ``scale`` whose
    reciprocal is a normal float32 and a quotient that is neither subnormal nor overflows,
    at a third of a 512-bit ``vdivps``'s cost (checked against numpy on 2.5e8 random pairs,
    ``tests/kernels/test_row_quantize.py``)."""
    q = x * reciprocal
    return _fma(_fma(-q, scale, x), reciprocal, q)


LANES = 16
"""float32 values a step of :func:`row_quantize_u8`'s row loop: one 512-bit register."""

# Below this many values one thread quantizes them: a parallel launch costs more.
_PARALLEL_MIN_VALUES = 1 << 16
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def row_quantize_u8(rows: int, k: int) -> tvm.tirx.PrimFunc:
    """Kernel ``(X (rows, k) float32, params (rows, 2) float32) -> Y (rows, k) uint8``: each
    row quantized with its own scale and zero point (:func:`row_qparams_u8`'s), the bytes
    of ``QuantizeDynamic``'s Relax ops, ``uint8(clip(round(x / s) + z, 0, 255))``, in one
    vectorized pass whose division is :func:`exact_quotient` (one ``1 / s`` a row).

    A scale is at least ``eps`` (float32's, 1.2e-7: its reciprocal is normal) and every
    ``|x / s|`` at most 255 (the row's range made it); a quotient so small that it is
    subnormal rounds to 0 either way. A row whose scale is not finite (an inf or NaN in the
    row) divides."""
    with IRBuilder() as ib, T.prim_func():
        T.func_name("row_quantize_u8")
        T.func_attr({"tirx.noalias": True})
        x2 = T.arg("X", T.Buffer((rows, k), "float32"))
        p2 = T.arg("params", T.Buffer((rows, 2), "float32"))
        y2 = T.arg("Y", T.Buffer((rows, k), "uint8"))
        with T.sblock("root"):  # one root block, as Relax's analyses expect
            T.reads(x2[0:rows, 0:k], p2[0:rows, 0:2])
            T.writes(y2[0:rows, 0:k])
            x = T.decl_buffer((rows * k,), "float32", data=x2.data)
            p = T.decl_buffer((rows * 2,), "float32", data=p2.data)
            y = T.decl_buffer((rows * k,), "uint8", data=y2.data)
            loop = T.parallel if rows > 1 and rows * k >= _PARALLEL_MIN_VALUES else T.serial
            with loop(0, rows) as i:
                scale, zero = p[i * 2], p[i * 2 + 1]
                reciprocal = tirx.const(1.0, "float32") / scale

                def store(j, quotient):
                    T.buffer_store(y, stored_u8(quotient(x[j]), zero), [j])

                def row(quotient):
                    with T.serial(0, k // LANES) as jo, T.vectorized(0, LANES) as ji:
                        store(i * k + jo * LANES + ji, quotient)
                    with T.serial(k - k % LANES, k) as j:
                        store(i * k + j, quotient)

                with T.If(scale <= tirx.const(_FLOAT32_MAX, "float32")):
                    with T.Then():
                        row(lambda v: exact_quotient(v, scale, reciprocal))
                    with T.Else():
                        row(lambda v: v / scale)
    return (
        ib.get()
        .with_attr("tirx.is_scheduled", True)
        .with_attr("op_pattern", OPAQUE)
        .with_attr(KERNEL_ATTR, "row_quantize_u8")
        .without_attr("global_symbol")
    )
