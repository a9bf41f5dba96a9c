"""float32 ``exp``, ``sigmoid``, ``gelu`` and the activations built on them as TIR
expressions that vectorize (no libm call).

LLVM has no vector ``exp``: ``T.exp`` in a kernel's store becomes one libm call per
element. These forms are expressions, so a kernel can apply them inside its own store loop
(a conv's SiLU epilogue, an int8 layer's dequantize + activation + quantize), and every
kernel computing an activation uses the same one: a layer's kernel that stores its
activation gives the same bits as ``UseFastMath``'s separate kernel. :func:`activation_f32`
names them.
"""

from __future__ import annotations

import math

from tvm import tirx

# exp(r) on [-ln2/2, ln2/2]: 1 + a degree-5 polynomial fitted to the relative error
# (Chebyshev-node least squares, reweighted towards equal ripple; the constant term 1, so
# exp(0) = 1 exactly): 9.1e-8 in exact arithmetic.
_EXP_POLY = (
    1.0,
    0.9999997019767761,
    0.4999915063381195,
    0.1666763573884964,
    0.04189793020486832,
    0.008290312252938747,
)


def _f32(v: float) -> tirx.PrimExpr:
    return tirx.const(v, "float32")


def _exp_f32(d: tirx.PrimExpr) -> tirx.PrimExpr:
    """``exp(d)`` for ``-86 <= d <= 86`` (the caller clamps): ``2^n exp(r)``,
    ``n = round(d / ln 2)``, a degree-5 polynomial of ``r = d - n ln 2``, and ``n`` added to
    the exponent bits instead of ``2^n`` built and multiplied. The result is a normal float
    (``n`` within +-124). Relative error below 2e-7 for ``|d| < 20``, below 4e-7 to 86 (one
    ``ln 2`` constant: ``n ln 2`` loses ~2e-9 per unit of ``n``); ``exp(0) = 1``."""
    n = tirx.round(d * (1.0 / math.log(2.0)))
    r = d - n * math.log(2.0)
    p = _f32(_EXP_POLY[-1])
    for c in reversed(_EXP_POLY[:-1]):
        p = p * r + c
    bits = tirx.reinterpret("int32", p) + (n.astype("int32") << 23)
    return tirx.reinterpret("float32", bits)


def exp_nonpositive(d: tirx.PrimExpr, flush: bool = False) -> tirx.PrimExpr:
    """``exp(d)`` for ``d <= 0`` (a softmax's ``x - max``), 13 SIMD operations where
    ``fast_exp`` takes ~21 (:func:`_exp_f32`: no upper clamp). ``d`` below -86 counts as
    -86 (4.4e-38, still a normal float, so the exponent arithmetic stays exact; -inf
    included); with ``flush`` (a compare and a blend more), ``d`` below :data:`EXP_FLUSH`
    (-40) gives exactly 0 instead. Relative error in float32: below 2e-7 for ``d > -20``,
    below 4e-7 down to -86, ``exp(0) = 1`` (``tests/passes/test_use_fast_math.py``)."""
    if not flush:
        return _exp_f32(tirx.max(d, _f32(-86.0)))
    limit = _f32(EXP_FLUSH)
    return tirx.Select(d < limit, _f32(0.0), _exp_f32(tirx.max(d, limit)))


# A float softmax's exponentials below exp(-40) = 4.2e-18 are 0. They are that small only
# against the row's largest, exp(0) = 1: even a million of them sum below 2^-37 of it, 13
# bits under float32's rounding. Kept, the masked scores of a causal mask (-3.4e38, or -inf)
# came out as tiny normals whose normalised probabilities and products in ``P @ V`` were
# denormals, a microcode assist per vector: GPT-2's float ``P @ V`` ran 75x slower (15.5 ms
# a layer instead of 0.21) and its softmax 3.6x. Above the flush, a probability is at least
# 4.2e-18 / (number of keys), so its product with a value is a denormal only for values
# below ~1e-16 in magnitude. (A quantized softmax's products round to integers: it keeps
# the clamp, whose compare and blend cost MiniLM's int8 softmax 6%.)
EXP_FLUSH = -40.0


# The sigmoid and SiLU take their argument clamped to +-20. Beyond, the sigmoid is 1 in
# float32 or below 2.1e-9, and the SiLU x or below 4.2e-8 in magnitude: under an ulp of 1.
# Their exact tails (exp(-80) = 1.8e-35) are tiny numbers whose products in the next layer
# are denormals: EfficientNet-B0's depthwise convs, whose inputs are SiLU outputs, ran 1.8x
# slower on them (a microcode assist per vector). ONNX Runtime's logistic clamps to +-18.
_SIGMOID_CLAMP = 20.0


def _one_plus_exp_of_minus(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``1 + exp(-min(x, 20))`` for ``x >= -20`` (as ``max(-x, -20)``: LLVM makes the
    float ``min`` a compare and a blend, the ``max`` one instruction)."""
    return _f32(1.0) + _exp_f32(tirx.max(-x, _f32(-_SIGMOID_CLAMP)))


def sigmoid_f32(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``1 / (1 + exp(-x))`` of ``x`` clamped to +-20 (no result below 2.06e-9, so none
    makes a denormal downstream; see :data:`_SIGMOID_CLAMP`). Absolute error below 1e-7,
    relative error below 5e-7 for ``|x| <= 20``."""
    return _f32(1.0) / _one_plus_exp_of_minus(tirx.max(x, _f32(-_SIGMOID_CLAMP)))


def silu_f32(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """SiLU ``x * sigmoid(x)`` (EfficientNet's and YOLO's activation), with
    :func:`sigmoid_f32`: the same float32 bits as a model's own ``x * sigmoid(x)`` after
    UseFastMath, so a kernel may store either form for the other. Below ``x = -20`` that is
    ``x * 2.06e-9`` (at least 4.1e-8 in magnitude: no denormal downstream, see
    :data:`_SIGMOID_CLAMP`), above 20 it is ``x``."""
    return x * sigmoid_f32(x)


def hardswish_f32(x: tirx.PrimExpr, divide_first: bool = False) -> tirx.PrimExpr:
    """hardswish ``x * relu6(x + 3) / 6`` (MobileNetV3's activation) in the order of the
    model's ops, which decides the float32 bits: ``(x * t) / 6`` as PyTorch's decomposition
    computes it, ``x * (t / 6)`` with ``divide_first`` (the ONNX ``HardSwish`` import)."""
    t = tirx.min(tirx.max(x + _f32(3.0), _f32(0.0)), _f32(6.0))
    return x * (t / _f32(6.0)) if divide_first else (x * t) / _f32(6.0)


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


ACTIVATIONS = ("gelu", "silu", "hardswish", "hardswish_divide_first", "relu6")
"""The activations a layer's kernel can apply to its float32 result (:func:`activation_f32`)."""


def activation_f32(name: str, x: tirx.PrimExpr) -> tirx.PrimExpr:
    """The activation ``name`` (one of :data:`ACTIVATIONS`) of a float32 expression."""
    if name == "gelu":
        return gelu_f32(x)
    if name == "silu":
        return silu_f32(x)
    if name in ("hardswish", "hardswish_divide_first"):
        return hardswish_f32(x, divide_first=name == "hardswish_divide_first")
    if name == "relu6":  # clip(x, 0, 6) as TVM lowers it
        return tirx.max(tirx.min(x, _f32(6.0)), _f32(0.0))
    raise ValueError(f"unknown activation {name!r} (expected one of {ACTIVATIONS})")
