"""float32 ``exp``, ``sigmoid`` and ``gelu`` as TIR expressions that vectorize (no libm call).

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


# fast_erf's rational form, erf(v) = v P(v^2) / Q(v^2) on |v| <= 4 (TOPI's coefficients,
# those of Eigen's float erf; highest power first), rewritten below for GELU.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)  # fmt: skip
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
          -7.37332916720468e-03, -1.42647390514189e-02)  # fmt: skip
# GELU(x) = x (1/2 + x P'(x^2) / Q'(x^2)) with v = x / sqrt 2 and the 1/2 folded into the
# coefficients: P'_k = P_k / 2 / sqrt(2)^(2k+1), Q'_k = Q_k / sqrt(2)^(2k) (k: the power).
_GELU_P = tuple(c / 2 / math.sqrt(2) ** (2 * k + 1) for k, c in enumerate(_ERF_P[::-1]))[::-1]
_GELU_Q = tuple(c / math.sqrt(2) ** (2 * k) for k, c in enumerate(_ERF_Q[::-1]))[::-1]
_GELU_CLAMP = 4.0 * math.sqrt(2.0)  # erf(x / sqrt 2) is +-1 in float32 beyond


def gelu_f32(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """GELU ``x/2 (1 + erf(x / sqrt 2))`` of a float32 expression, as
    ``x (1/2 + x P(x^2) / Q(x^2))``: TOPI's fast_erf rational with the ``1 / sqrt 2`` and
    ``1/2`` folded into its coefficients, 2 multiplies and an add per element fewer
    (DeiT-tiny's 197 x 768 GELU 47.0 -> 40.7 us on Zen 4, where the multiply / FMA port
    bounds it). Error < 1e-6 absolute. The standalone GELU kernel (``UseFastMath``) and a
    dense kernel's dequantize epilogue compute it alike: the same bits."""
    c = tirx.max(tirx.min(x, _f32(_GELU_CLAMP)), _f32(-_GELU_CLAMP))
    c2 = c * c
    num = _f32(_GELU_P[0])
    for coef in _GELU_P[1:]:
        num = num * c2 + _f32(coef)
    den = _f32(_GELU_Q[0])
    for coef in _GELU_Q[1:]:
        den = den * c2 + _f32(coef)
    return x * (c * (num / den) + _f32(0.5))
