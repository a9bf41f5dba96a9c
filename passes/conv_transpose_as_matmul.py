"""ConvTransposeAsMatmul: a transposed conv whose kernel equals its stride is a matmul.

A ``conv2d_transpose`` with kernel ``(KH, KW)`` = strides, no padding, no output padding, no
dilation and one group (UNet's 2x2/2 up-convolution) writes each output pixel from exactly
one input pixel and one kernel tap: it is a ``[N*H*W, Cin] x [Cin, KH*KW*Cout]`` matmul
followed by a pixel shuffle (depth to space)::

    y = R.nn.conv2d_transpose(x, W, strides=(2, 2))   # x (N, Cin, H, W), W (Cin, Cout, 2, 2)
    ==>
    a = R.reshape(R.permute_dims(x, [0, 2, 3, 1]), (N*H*W, Cin))
    m = R.matmul(a, W')                                # W' (Cin, KH*KW*Cout), constant
    s = R.permute_dims(R.reshape(m, (N, H, W, KH, KW, Cout)), [0, 1, 3, 2, 4, 5])
    y = R.permute_dims(R.reshape(s, (N, H*KH, W*KW, Cout)), [0, 3, 1, 2])

TVM's default lowering of the transposed conv is a naive loop nest (UNet: 42% of the float
model's time); the matmul runs on tvmq's dense kernels, float, int8 (it is a weight site like
any matmul, so it quantizes) or bf16, and the permutes are channels last
(:mod:`.channels_last`) where the convs around are. Values are the same sums in another order.
The matmul keeps the transposed conv's span (its layer names). Other transposed convs are
left as they are.

A bias added right after the transposed conv (``add(y, b)``, ``b`` a constant per output
channel, ``y`` read by nothing else: PyTorch's ``ConvTranspose2d`` bias) is added to the
matmul's columns instead (``b`` tiled ``KH*KW`` times), before the shuffle: the quantizer
then sees a matmul + bias layer whose only layout ops lead to the next quantize, so its
kernel requantizes (int8 output) and the shuffle moves bytes, not float32.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from ._int8_dense import KernelRewriter
from .relax_utils import (
    ADD,
    alias_binding,
    const_value,
    map_functions,
    op_name,
    ordered_bindings,
    static_shape,
    user_counts,
    with_span,
)

_CONV2D_TRANSPOSE = tvm.ir.Op.get("relax.nn.conv2d_transpose")


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def match_conv_transpose(call: relax.Expr) -> tuple | None:
    """``(x, W as numpy IOHW, (N, Cin, H, W))`` of a transposed conv this pass rewrites (see
    the module docstring), else None."""
    if not isinstance(call, relax.Call) or not call.op.same_as(_CONV2D_TRANSPOSE):
        return None
    x, w = call.args
    a = call.attrs
    if not isinstance(w, tvm.ir.Constant):
        return None
    if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) != ("NCHW", "IOHW", "NCHW"):
        return None
    x_shape, w_shape = static_shape(x), static_shape(w)
    if x_shape is None or w_shape is None or len(x_shape) != 4 or len(w_shape) != 4:
        return None
    if int(a.groups) != 1 or w_shape[0] != x_shape[1] or w_shape[2:] != _ints(a.strides):
        return None
    if any(_ints(a.padding)) or any(_ints(a.output_padding)) or _ints(a.dilation) != (1, 1):
        return None
    dtype = str(x.ty.dtype)
    if str(w.ty.dtype) != dtype or (a.out_dtype and str(a.out_dtype) not in ("", dtype)):
        return None
    return x, w.value.numpy(), x_shape


def _channel_bias(value: np.ndarray | None, channels: int) -> np.ndarray | None:
    """A constant that an NCHW result broadcasts along its channels only, as a vector."""
    if value is None or value.shape not in ((1, channels, 1, 1), (channels, 1, 1)):
        return None
    return value.reshape(channels)


def find_biases(func: relax.Function) -> dict[relax.Var, tuple[relax.Var, np.ndarray]]:
    """``{add var: (transposed conv var, bias vector)}`` for the ``add(y, b)`` bindings that
    follow a transposed conv this pass rewrites, ``y`` read by that add only."""
    bindings = {b.var: b.value for b in ordered_bindings(func)}
    users = user_counts(func)
    found = {}
    for var, value in bindings.items():
        if op_name(value) != ADD:
            continue
        for y, b in (value.args, reversed(value.args)):
            conv = bindings.get(y) if isinstance(y, relax.Var) else None
            if conv is None or users.get(y) != 1 or match_conv_transpose(conv) is None:
                continue
            bias = _channel_bias(const_value(b, bindings), int(conv.args[1].ty.shape[1]))
            if bias is not None:
                found[var] = (y, bias)
                break
    return found


@mutator
class _Rewriter(KernelRewriter):
    def __init__(self, mod: tvm.IRModule, biases: dict):
        super().__init__(mod)
        self.biases = biases  # see find_biases
        self.folded = {conv: bias for conv, bias in biases.values()}
        self.bias: np.ndarray | None = None  # of the transposed conv being rewritten

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        var = binding.var
        if var in self.biases:  # add(y, b): y's matmul already adds b
            alias_binding(self, var, self.biases[var][0])
            return
        self.bias = self.folded.get(var)
        super().visit_var_binding_(binding)
        self.bias = None

    def match(self, call: relax.Call):
        found = match_conv_transpose(call)
        return None if found is None else (*found, call.span, self.bias)

    def rewrite(self, x, w: np.ndarray, x_shape: tuple, span, bias) -> relax.Expr:
        emit = self.builder_.emit
        n, cin, h, wd = x_shape
        _, cout, kh, kw = w.shape
        weight = np.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(cin, kh * kw * cout))
        rows = emit(
            relax.op.reshape(emit(relax.op.permute_dims(x, [0, 2, 3, 1])), (n * h * wd, cin))
        )
        m = emit(with_span(relax.op.matmul(rows, relax.const(weight)), span))
        if bias is not None:
            tiled = np.tile(bias.astype(np.float32), kh * kw)
            m = emit(relax.op.add(m, relax.const(tiled)))
        tiles = emit(relax.op.reshape(m, (n, h, wd, kh, kw, cout)))
        shuffled = emit(relax.op.permute_dims(tiles, [0, 1, 3, 2, 4, 5]))
        nhwc = emit(relax.op.reshape(shuffled, (n, h * kh, wd * kw, cout)))
        return relax.op.permute_dims(nhwc, [0, 3, 1, 2])


def _rewrite(mod: tvm.IRModule, func: relax.Function) -> relax.Function:
    rewriter = _Rewriter(mod, find_biases(func))
    new = rewriter.visit_expr(func)
    return new if rewriter.changed else func


@tvm.transform.module_pass(opt_level=0, name="ConvTransposeAsMatmul")
class ConvTransposeAsMatmul:
    """Transposed convs with kernel = stride as matmuls (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return map_functions(mod, lambda _gv, func: _rewrite(mod, func))
