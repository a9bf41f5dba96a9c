"""float32 ``exp`` and ``sigmoid`` as TIR expressions that vectorize (no libm call).

LLVM has no vector ``exp``: ``T.exp`` in a kernel's store becomes one libm call per
element. These are the classic range-reduced forms, written as expressions so a kernel can
apply them inside its own store loop (a conv's SiLU epilogue): ``exp(x) = 2^n * e^r`` with
``n = round(x / ln 2)``, ``r = x - n ln 2`` (ln 2 in two parts, so ``r`` is exact to a few
ulps), ``e^r`` a degree-7 Taylor polynomial on ``|r| <= ln 2 / 2`` (truncation below
1e-8 relative) and ``2^n`` built in the exponent bits. Inputs are clamped to
``[-87.3, 88.3]``, where ``2^n`` is a normal float32: below, ``exp`` stays near ``2^-126``
instead of a denormal or 0, above near ``2^127`` instead of infinity.
"""

from __future__ import annotations

import math

from tvm import tirx

_LOG2E = 1.0 / math.log(2.0)
_LN2_HI = 0.693359375  # ln 2 split so that n * _LN2_HI is exact for |n| < 2^9
_LN2_LO = math.log(2.0) - 0.693359375


def _f32(v: float) -> tirx.PrimExpr:
    return tirx.const(v, "float32")


def exp_f32(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``exp(x)`` for a float32 expression (see the module docstring for its range)."""
    x = tirx.max(tirx.min(x, _f32(88.3)), _f32(-87.3))
    n = tirx.floor(x * _f32(_LOG2E) + _f32(0.5))
    r = x - n * _f32(_LN2_HI) - n * _f32(_LN2_LO)
    p = _f32(1.0 / math.factorial(7))
    for k in range(6, -1, -1):  # Horner: sum r^k / k!
        p = p * r + _f32(1.0 / math.factorial(k))
    bits = (tirx.Cast("int32", n) + tirx.const(127, "int32")) << tirx.const(23, "int32")
    return p * tirx.reinterpret("float32", bits)


def sigmoid_f32(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``1 / (1 + exp(-x))`` for a float32 expression, never a denormal: 0 below ``x = -87``
    (where the true value falls under float32's smallest normal, 1.2e-38, as a CPU that
    flushes denormals to zero would give it), else at least 1.6e-38. A denormal costs a
    microcode assist per vector on x86, where it is made and again wherever it is read: a
    SiLU that returned ``x * 4e-39`` for very negative ``x`` made the next layer's inputs
    denormal after a squeeze-excite scale, and EfficientNet-B0 ran 1.7x slower."""
    value = _f32(1.0) / (_f32(1.0) + exp_f32(tirx.min(-x, _f32(87.0))))
    return tirx.Select(x < _f32(-87.0), _f32(0.0), value)
