"""UseFastMath: float32 exp / erf / tanh (and softmax, GELU, sigmoid built on them) as SIMD polynomials.

LLVM has no vector ``exp`` or ``erf``: TVM's default lowering of ``relax.exp``, softmax and
GELU calls the scalar C library once per element, which made softmax and GELU the slowest
kernels of a transformer on x86 (all-MiniLM-L6-v2: 22 of 45 ms). This pass replaces them,
before ``LegalizeOps``, by TOPI's polynomial forms (``topi.fast_exp``, ``fast_erf``,
``fast_tanh``), which vectorize; a softmax over the last axis by :func:`softmax_rows`, whose
:func:`exp_nonpositive` (its argument is ``x - max <= 0``) takes 13 SIMD operations per vector to
``fast_exp``'s ~21 (MiniLM's 12 x 128 x 128 softmax 85 -> 67 us, DeiT-tiny's 3 x 197 x 197
one 69-77 -> 36 us on Zen 4). Their error on float32, measured
over the whole range against float64 references (``tests/passes/test_use_fast_math.py``):
below 3e-7 relative for exp and tanh, below 4e-7 absolute for erf, i.e. a few ulp.

Rewritten (float32 only; other dtypes are left alone): ``relax.exp``, ``relax.erf``,
``relax.tanh``, ``relax.nn.softmax``, ``relax.nn.gelu`` (``x/2 * (1 + erf(x/sqrt 2))``)
``relax.nn.gelu_tanh`` (``x/2 * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``), ``relax.sigmoid``
(``1 / (1 + exp(-x))``) and ``relax.nn.silu`` (``x * sigmoid(x)``: EfficientNet's activation,
whose scalar ``exp`` took a third of its float time), ``relax.power`` by a constant 2, 3 or
4 as repeated multiplication (GPT-2's ``x ** 3`` in GELU-tanh called the scalar ``powf``: 20%
of its float time), and ``relax.round`` by ``tirx.round`` (the same bits, vectorizable: see
:func:`_round`). The build runs it on CPU targets; it is also usable alone in a ``Sequential``.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax, te, topi
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvmq.kernels.fast_math import exp_nonpositive, gelu_f32, sigmoid_f32, silu_f32

__all__ = ["UseFastMath"]


def _gelu(x):
    """GELU (erf form) per element: :func:`tvmq.kernels.fast_math.gelu_f32`."""
    return te.compute(x.shape, lambda *i: gelu_f32(x(*i)), name="gelu")


def _sigmoid(x):
    return te.compute(x.shape, lambda *i: sigmoid_f32(x(*i)), name="sigmoid")


def _silu(x):
    return te.compute(x.shape, lambda *i: silu_f32(x(*i)), name="silu")


def _round(x):
    """Round half to even, as ``topi.round``, but vectorizable: topi writes ``tirx.nearbyint``,
    which TVM 0.27 does not register ``TVectorizable``, so a vector loop over it stays scalar
    and LLVM vectorizes the loop around it instead, with gathers and one store per element
    (dynamic int8's row quantize of MiniLM's 128 x 1536 FFN activation: 131 us, 29 us without
    the rounding). ``tirx.round`` is vectorizable and lowers to the same ``llvm.nearbyint`` on
    LLVM targets (and to it on CUDA); other backends would call ``roundf``, which breaks
    ties away from zero, so this pass is for LLVM CPU builds (where tvmq runs it)."""
    return te.compute(x.shape, lambda *i: tvm.tirx.round(x(*i)), name="round")


def _gelu_tanh(x):
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)
    return x * 0.5 * (1.0 + topi.fast_tanh(inner))


def _softmax(x, axis: int):
    """``fast_softmax`` over any axis but the last; over the last one, :func:`softmax_rows`
    times the row's ``1 / sum``, a row of only -inf giving NaN as in numpy / PyTorch."""
    if axis != len(x.shape) - 1:
        return topi.nn.fast_softmax(x, axis)
    return _normalized_rows(x, float("nan"))


def softmax_rows(x, flush: bool = True):
    """The parts of a softmax over the last axis of `x` that every softmax here shares
    (:func:`_softmax`, :func:`safe_softmax_rows`, ``QuantizedSoftmax``): ``(padded x, row
    max, exponentials, row sum)``, the exponentials :func:`exp_nonpositive` of ``x - max``,
    those below :data:`~tvmq.kernels.fast_math.EXP_FLUSH` 0 with ``flush`` (for
    probabilities stored as floats; a quantized softmax rounds them away).
    A last axis of 32+ elements that 16 does not divide (attention over 197 keys) is padded
    with -inf to whole vectors, which changes no row max and whose exponentials are at most
    4.4e-38 (below float32 rounding of any row sum); the caller slices its result back
    (:func:`unpad_rows`). The default schedule then keeps SIMD partial results for the row
    max and sum (ViT-tiny's 3 x 197 x 197 softmax: 0.22 -> 0.10 ms with ``fast_exp``)."""
    padded = x
    if _pads_rows(x.shape[-1]):
        after = [0] * (len(x.shape) - 1) + [-int(x.shape[-1]) % _SOFTMAX_LANES]
        padded = topi.nn.pad(x, [0] * len(x.shape), after, pad_value=float("-inf"))
    rows, width = padded.shape[:-1], padded.shape[-1]
    k1 = te.reduce_axis((0, width), name="k")
    k2 = te.reduce_axis((0, width), name="k")
    top = te.compute(rows, lambda *r: te.max(padded[(*r, k1)], axis=k1), name="row_max")
    e = te.compute(
        padded.shape, lambda *i: exp_nonpositive(padded[i] - top[i[:-1]], flush), name="exp"
    )
    total = te.compute(rows, lambda *r: te.sum(e[(*r, k2)], axis=k2), name="row_sum")
    return padded, top, e, total


def _pads_rows(n) -> bool:
    """Whether :func:`softmax_rows` pads rows of `n` elements (32+, not whole vectors)."""
    return isinstance(n, int | tvm.tirx.IntImm) and int(n) >= 32 and int(n) % _SOFTMAX_LANES != 0


def row_kernel_attrs(x: relax.Expr) -> dict:
    """``primfunc_attrs`` for a :func:`softmax_rows` kernel over `x`: marked a reduction
    (``op_pattern`` kCommReduce), so FuseOps fuses the elementwise producers of `x` (int8
    attention's dequantize of the scores, the mask add) into it instead of writing `x` to
    memory first (MiniLM: 22 us a layer for that pass, +4 us fused); not when the rows are
    padded: the padded copy of fused producers then runs a branch per element (3.5x slower)."""
    shape = x.ty.shape.values if isinstance(x.ty.shape, relax.ShapeExpr) else None
    if shape is None or _pads_rows(shape[-1]):
        return {}
    return {"op_pattern": _COMM_REDUCE}


def masked_row(top) -> tvm.tirx.PrimExpr:
    """Whether a row whose max is `top` has no finite score: ``te.max`` starts from the
    lowest finite float32, so a row of -inf has that max."""
    return top <= tvm.tirx.min_value("float32")


def unpad_rows(out, x):
    """`out` (computed on :func:`softmax_rows`' padded rows) cut back to the shape of `x`."""
    if tuple(out.shape) == tuple(x.shape):
        return out
    return topi.strided_slice(out, [0] * len(x.shape), [int(d) for d in x.shape])


def safe_softmax_rows(x):
    """Softmax over the last axis whose rows of only -inf give 0 (not NaN): PyTorch's
    ``scaled_dot_product_attention`` for fully masked rows. The -inf test reads the row max
    the softmax computes anyway, so it costs no pass of its own (a row whose max is
    float32's lowest finite value counts as masked too: a score of -3.4e38 is a mask, not a
    logit)."""
    return _normalized_rows(x, 0.0)


def _normalized_rows(x, masked_value: float):
    """:func:`softmax_rows`' exponentials times their row's ``1 / sum`` (a divide per element
    cost 5% of the kernel on Zen 4); `masked_value` for rows of only -inf."""
    padded, top, e, total = softmax_rows(x)
    masked = tvm.tirx.const(masked_value, "float32")
    inv = te.compute(
        top.shape,
        lambda *r: te.if_then_else(masked_row(top[r]), masked, 1.0 / total[r]),
        name="inv",
    )
    out = te.compute(padded.shape, lambda *i: e[i] * inv[i[:-1]], name="softmax")
    return unpad_rows(out, x)


# Softmax rows are padded to a multiple of this (AVX-512's float32 lanes; 2 AVX2 vectors).
_SOFTMAX_LANES = 16
_COMM_REDUCE = 3  # relax's OpPatternKind for a reduction

_ELEMENTWISE = {
    "relax.exp": topi.fast_exp,
    "relax.erf": topi.fast_erf,
    "relax.tanh": topi.fast_tanh,
    "relax.nn.gelu": _gelu,
    "relax.nn.gelu_tanh": _gelu_tanh,
    "relax.sigmoid": _sigmoid,
    "relax.nn.silu": _silu,
    "relax.round": _round,
}


@mutator
class _UseFastMathRewriter(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        op = call.op
        if not isinstance(op, tvm.ir.Op) or not _is_float32(call):
            return call
        if op.name in _ELEMENTWISE:
            return self.builder_.call_te(_ELEMENTWISE[op.name], call.args[0])
        if op.name == "relax.power":
            n = _small_integer_exponent(call.args[1])
            if n is not None:
                return self.builder_.call_te(_integer_power, call.args[0], n)
            return call
        if op.name == "relax.nn.softmax":
            axis = int(call.attrs.axis) % call.ty.ndim
            last = axis == call.ty.ndim - 1
            attrs = row_kernel_attrs(call.args[0]) if last else {}
            return self.builder_.call_te(_softmax, call.args[0], axis, primfunc_attrs=attrs)
        return call


def _small_integer_exponent(exponent: relax.Expr) -> int | None:
    """``n`` for a scalar constant exponent equal to an integer 2..4, else None."""
    if not isinstance(exponent, tvm.ir.Constant):
        return None
    value = exponent.value.numpy()
    if value.size != 1:
        return None
    n = float(value.reshape(()))
    return int(n) if n in (2.0, 3.0, 4.0) else None


def _integer_power(x, n: int):
    out = x
    for _ in range(n - 1):
        out = out * x
    return out


def _is_float32(call: relax.Call) -> bool:
    ty = call.ty
    return isinstance(ty, relax.TensorType) and ty.dtype == "float32"


@tvm.transform.module_pass(opt_level=0, name="UseFastMath")
class UseFastMath:
    """Replace float32 exp / erf / tanh / softmax / GELU by vectorizable polynomial forms."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _UseFastMathRewriter(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get()
