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

:func:`quantized_rows` builds the same range, then the row's quantize
(``uint8(clip(round(x / s) + z, 0, 255))``, as ``QuantizeDynamic``'s Relax ops compute it),
as TE stages for a kernel that quantizes its own input (the x86 VNNI dense kernel:
:func:`tvmq.kernels.x86_int8.int8_dense_vnni` with a ``DynamicDequantize`` whose ``quantize``
is a ``RowQuantize``): the same float32 operations, so the same bytes, scales and zero points.
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
    r_lo, r_hi = te.reduce_axis((0, k), name="k"), te.reduce_axis((0, k), name="k")
    lo = te.compute(lead, lambda *i: te.min(x[(*i, r_lo)], axis=r_lo), name="row_min")
    hi = te.compute(lead, lambda *i: te.max(x[(*i, r_hi)], axis=r_hi), name="row_max")

    def params(*i):
        row, which = tuple(i[:-1]), i[-1]
        scale = row_scale(lo[row], hi[row], eps)
        return tirx.Select(which == 0, scale, row_zero_point(lo[row], scale))

    out = te.compute((*lead, tirx.IntImm("int64", 2)), params, name="row_qparams")
    return te.create_prim_func([x, out]).without_attr("global_symbol")


def row_scale(lo, hi, eps: float):
    """A row's scale from its min and max: ``max((max(hi, 0) - min(lo, 0)) / 255, eps)``."""
    zero, qmax = tirx.const(0.0, "float32"), tirx.const(float(QMAX), "float32")
    return tirx.max((tirx.max(hi, zero) - tirx.min(lo, zero)) / qmax, tirx.const(eps, "float32"))


def row_zero_point(lo, scale):
    """A row's zero point (float32): ``clip(round(-min(lo, 0) / scale), 0, 255)``."""
    zero, qmax = tirx.const(0.0, "float32"), tirx.const(float(QMAX), "float32")
    return tirx.max(tirx.min(tirx.round(-tirx.min(lo, zero) / scale), qmax), zero)


def quantize_u8(x, scale, zero_point):
    """``uint8(clip(round(x / scale) + zero_point, 0, 255))`` in Relax's order (``clip`` is
    ``max(min(v, 255), 0)`` as topi has it)."""
    return stored_u8(x / scale, zero_point)


def stored_u8(quotient, zero_point):
    """``uint8(clip(round(quotient) + zero_point, 0, 255))``, as :func:`quantize_u8`."""
    zero, qmax = tirx.const(0.0, "float32"), tirx.const(float(QMAX), "float32")
    v = tirx.round(quotient) + zero_point
    return tirx.max(tirx.min(v, qmax), zero).astype("uint8")


def quantized_rows(x: te.Tensor, k_padded: int, eps: float, lanes: int = 16):
    """TE stages quantizing each row of a 2-D float32 ``x (m, k)`` with its own range:
    ``(x_q (m, k_padded) uint8, scale (m,), zero_point (m,) float32)``, ``x_q`` zero past
    ``k``. The range reductions keep ``lanes`` partial results per row (stages
    ``row_min_part`` / ``row_max_part``, a vector loop each), then fold them and the
    ``k % lanes`` tail (``row_min`` / ``row_max``); ``row_scale``, ``row_zero`` and
    ``row_quantize`` follow. Bit-identical to :func:`row_qparams_u8` and the Relax quantize
    (min and max do not depend on the order)."""
    m, k = (int(d) for d in x.shape)
    body, tail = k // lanes, k % lanes

    def reduce(combine, name):
        if body <= 1:  # at most one vector: the row itself
            r = te.reduce_axis((0, k), name="k")
            return te.compute((m,), lambda i: combine(x[i, r], axis=r), name=name)
        ko = te.reduce_axis((0, body), name="ko")
        part = te.compute(
            (m, lanes), lambda i, v: combine(x[i, ko * lanes + v], axis=ko), name=name + "_part"
        )
        r = te.reduce_axis((0, lanes + tail), name="r")

        def fold(i):  # the partials, then the tail (if_then_else: only one side is read)
            if tail == 0:
                return combine(part[i, r], axis=r)
            value = tirx.if_then_else(r < lanes, part[i, r], x[i, body * lanes + r - lanes])
            return combine(value, axis=r)

        return te.compute((m,), fold, name=name)

    lo, hi = reduce(te.min, "row_min"), reduce(te.max, "row_max")
    scale = te.compute((m,), lambda i: row_scale(lo[i], hi[i], eps), name="row_scale")
    zp = te.compute((m,), lambda i: row_zero_point(lo[i], scale[i]), name="row_zero")

    def q(i, j):
        if k_padded == k:
            return quantize_u8(x[i, j], scale[i], zp[i])
        inside = quantize_u8(x[i, j], scale[i], zp[i])  # read only inside the row
        return tirx.if_then_else(j < k, inside, tirx.const(0, "uint8"))

    return te.compute((m, k_padded), q, name="row_quantize"), scale, zp
