"""Integer requantization emitted as Relax ops, bit-exact with ``tvmq.core.qmath``.

gemmlowp / TFLite fixed-point arithmetic: a real multiplier ``m ~= M * 2**(shift - 31)``
applied to int32 values with int64 intermediates. ``LowerInt8`` uses it for
``requantize="integer"``; ``qmath.requantize_int`` is the numpy reference it matches.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from tvmq.core import qmath

from .relax_utils import const_i64


def multiply_by_quantized_multiplier(bb, a, multiplier, shift) -> relax.Expr:
    """Emit gemmlowp ``MultiplyByQuantizedMultiplier(a, M, shift)`` on int64 `a` (int32 values).

    ``multiplier`` / ``shift`` are int arrays broadcasting against `a`; returns int64.
    """
    m = np.asarray(multiplier, dtype=np.int64)
    sh = np.asarray(shift, dtype=np.int64)
    left, right = np.maximum(sh, 0), np.maximum(-sh, 0)
    if np.any(left > 0):
        a = bb.emit(relax.op.left_shift(a, const_i64(left)))
        a = bb.emit(relax.op.clip(a, -(2**31), 2**31 - 1))
    # SaturatingRoundingDoublingHighMul for M >= 0: (a*M + 2^30) >> 31 with a floor shift
    # equals gemmlowp's truncating form (a*M + nudge) / 2^31 in both signs.
    ab = bb.emit(relax.op.multiply(a, const_i64(m)))
    high = bb.emit(relax.op.right_shift(relax.op.add(ab, const_i64(1 << 30)), const_i64(31)))
    # RoundingDivideByPOT (half away from zero) as one floor shift with a sign-dependent nudge.
    half = (np.int64(1) << right) >> 1
    nudge_neg = np.maximum(half - 1, 0)
    nudge = bb.emit(
        relax.op.where(relax.op.less(high, const_i64(0)), const_i64(nudge_neg), const_i64(half))
    )
    return bb.emit(relax.op.right_shift(relax.op.add(high, nudge), const_i64(right)))


def requantize_int_expr(
    bb, acc, multiplier, shift, z_y: int, dtype: str, shape, bounds=None
) -> relax.Expr:
    """Emit gemmlowp ``MultiplyByQuantizedMultiplier(acc, M, shift) + z_y``, clamped to `dtype`.

    ``multiplier`` / ``shift`` are per-channel int arrays reshaped to `shape`. The
    intermediates are int64; the result equals ``qmath.requantize_int`` bit for bit.
    ``bounds`` (qmin, qmax) narrows the clamp (a fused relu6 / clip).
    """
    m = np.asarray(multiplier, dtype=np.int64).reshape(shape)
    sh = np.asarray(shift, dtype=np.int64).reshape(shape)
    a = acc if str(acc.ty.dtype) == "int64" else bb.emit(relax.op.astype(acc, "int64"))
    y = multiply_by_quantized_multiplier(bb, a, m, sh)
    qmin, qmax = qmath.qrange(dtype) if bounds is None else bounds
    if z_y != 0:
        y = bb.emit(relax.op.add(y, const_i64(z_y)))
    y = bb.emit(relax.op.clip(y, qmin, qmax))
    return relax.op.astype(y, dtype)
