"""One kernel for the run-time range of an activation, one range per row.

Dynamic int8 (:class:`tvmq.passes.quantize_dynamic.QuantizeDynamic`) quantizes each
matmul input with the range of its own rows. As separate Relax ops the range alone is
four kernels (``min``, ``max``, scale, zero point); :func:`row_qparams_u8` is one, which
reads each row twice while it is in cache and writes its scale and zero point::

    lo = min(min_k x[..., k], 0);  hi = max(max_k x[..., k], 0)
    params[..., 0] = s = max((hi - lo) / 255, eps)
    params[..., 1] = z = clip(round(-lo / s), 0, 255)

Both go into one ``[..., 2]`` tensor: a TIR kernel with a single output is one that
tvmq's default CPU schedule (and dlight) can run row by row, the reductions as SIMD
partial results. The function is plain TE: target independent, unscheduled.
"""

from __future__ import annotations

import tvm
from tvm import te, tirx

QMAX = 255


def row_qparams_u8(shape, eps: float) -> tvm.tirx.PrimFunc:
    """PrimFunc ``(x float32 shape) -> params float32 [..., 2]`` (scale, zero point per row).

    ``shape`` is the activation's shape (ints or TIR variables); rows are along its last
    axis, so ``params`` has shape ``shape[:-1] + [2]``.
    """
    # One index type, Relax's int64, for every axis: with the pair axis a plain 2 (int32)
    # dlight binds it to an int32 threadIdx.x beside the reductions' int64 ones, TVM 0.27's
    # UnifyThreadBinding substitutes one for the other without a cast, and the CUDA build
    # fails in StmtSimplify ("mismatched types. int64 vs. int32").
    shape = [tirx.IntImm("int64", d) if isinstance(d, int) else d for d in shape]
    *lead, k = shape
    x = te.placeholder(tuple(shape), "float32", name="x")
    zero, qmax = tirx.const(0.0, "float32"), tirx.const(float(QMAX), "float32")
    r_lo, r_hi = te.reduce_axis((0, k), name="k"), te.reduce_axis((0, k), name="k")
    lo = te.compute(lead, lambda *i: te.min(x[(*i, r_lo)], axis=r_lo), name="row_min")
    hi = te.compute(lead, lambda *i: te.max(x[(*i, r_hi)], axis=r_hi), name="row_max")

    def params(*i):
        row, which = tuple(i[:-1]), i[-1]
        low = tirx.min(lo[row], zero)
        scale = tirx.max((tirx.max(hi[row], zero) - low) / qmax, tirx.const(eps, "float32"))
        zero_point = tirx.max(tirx.min(tirx.round(-low / scale), qmax), zero)
        return tirx.Select(which == 0, scale, zero_point)

    out = te.compute((*lead, tirx.IntImm("int64", 2)), params, name="row_qparams")
    return te.create_prim_func([x, out]).without_attr("global_symbol")
