"""Channels last between convolutions: the NHWC "twins" of NCHW values.

tvmq's CPU conv kernels (:class:`PackInt8ConvX86`, :class:`PackFloatConv`) compute in NHWC;
the model is NCHW. :class:`ChannelsLastRewriter` rewrites each matched conv2d through a
``lower`` callback and keeps its result channels last (NHWC) as long as it can: each
elementwise op that follows (bias, relu, requantize: unary ops, binary ops whose other
operand is a constant, a scalar, a ``(N, C, 1, 1)`` tensor or also NHWC; ``quantize`` /
``dequantize``), ``nn.pad``, ``concat``, ``max_pool2d`` / ``avg_pool2d``, ``image.resize2d``
(upsampling) and a ``mean`` over H and W (global average pooling) are computed on the NHWC
tensor (constants transposed at compile time, ``(N, C, 1, 1)`` tensors reshaped), and a
following conv takes it as its input directly. The transpose to NCHW is emitted after each of these ops but is dead code unless
something else (a reshape before a dense layer, the model's output) reads the NCHW value:
there it runs once, on the smallest tensor. Channels last, the epilogue and pooling loops
are contiguous (SIMD over channels). Every value is computed exactly as before, only stored
in another order.

Several passes can use it one after the other: an NCHW value that is a ``permute_dims`` of
an NHWC value is taken for its twin, so a float conv's output feeds an int8 conv (and back)
without a transpose pair in between.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from tvmq.kernels.x86_int8_conv import Conv2DGeometry

from ._int8_dense import KernelRewriter, rewrite_functions
from .relax_utils import emit_binding, is_tensor_const, static_shape

_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
TO_NCHW = (0, 3, 1, 2)  # permute_dims axes: NHWC -> NCHW
TO_NHWC = (0, 2, 3, 1)
_NHWC_POS = {0: 0, 1: 3, 2: 1, 3: 2}  # NCHW axis -> its position in NHWC


def _ops(names: str) -> frozenset:
    """The relax ops named (space-separated, without ``relax.``) that this TVM has."""
    found = []
    for name in names.split():
        try:
            found.append(tvm.ir.Op.get("relax." + name))
        except Exception:  # an op this TVM build lacks
            continue
    return frozenset(found)


# Elementwise ops whose attributes do not depend on the layout (rebuilt as they are).
_ELEMENTWISE = _ops(
    "abs ceil clip cos erf exp floor log negative round rsqrt sigmoid sign sin sqrt square "
    "tanh astype nn.relu nn.gelu nn.gelu_tanh nn.silu nn.leakyrelu logical_not bitwise_not "
    "add subtract multiply divide floor_divide floor_mod maximum minimum power "
    "left_shift right_shift bitwise_and bitwise_or bitwise_xor"
)
_QDQ = _ops("quantize dequantize")
_POOLS = {
    tvm.ir.Op.get("relax.nn.max_pool2d"): relax.op.nn.max_pool2d,
    tvm.ir.Op.get("relax.nn.avg_pool2d"): relax.op.nn.avg_pool2d,
}
_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_PAD = tvm.ir.Op.get("relax.nn.pad")
_MEAN = tvm.ir.Op.get("relax.mean")
_CONCAT = tvm.ir.Op.get("relax.concat")
_RESIZE2D = tvm.ir.Op.get("relax.image.resize2d")
_QDQ_Q = tvm.ir.Op.get("relax.quantize")


def permute_axes(expr: relax.Expr) -> tuple[int, ...] | None:
    """The axes of a ``permute_dims`` call, else None."""
    if not isinstance(expr, relax.Call) or not expr.op.same_as(_PERMUTE):
        return None
    if expr.attrs.axes is None:
        return None
    return tuple(int(a) for a in expr.attrs.axes)


def _shape_of(expr: relax.Expr) -> tuple[int, ...] | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return tuple(int(d) for d in ty.shape)
    except (TypeError, ValueError, AttributeError):
        return None


def _is_per_channel(arg: relax.Expr, out_shape: tuple[int, ...]) -> bool:
    """Whether ``arg`` is an ``(N, C, 1, 1)`` (or ``(1, C, 1, 1)``: a bias) tensor broadcast
    over an NCHW ``out_shape``."""
    shape = _shape_of(arg) if isinstance(arg.ty, relax.TensorType) else None
    return (
        shape is not None
        and len(shape) == 4
        and shape[2:] == (1, 1)
        and shape[0] in (1, out_shape[0])
        and shape[1] == out_shape[1]
    )


def _tuple_field(bb: relax.BlockBuilder, item: relax.TupleGetItem) -> relax.Expr | None:
    """The element ``item`` takes of a tuple built in this function (``(y, zeros_like(y))[0]``:
    what PyTorch's ``max_pool2d_with_indices`` imports as), else None. Seen through, a max
    pool between NHWC kernels keeps its result NHWC: ResNet-18 bf16 transposed its 56x56x64
    pool result to NCHW and back (0.3 ms of 5 on one thread)."""
    tup = item.tuple_value
    if isinstance(tup, relax.Var):
        tup = bb.lookup_binding(tup)
    if isinstance(tup, relax.Tuple) and item.index < len(tup.fields):
        return tup.fields[item.index]
    return None


def _nhwc_constant(c: tvm.ir.Constant) -> tvm.ir.Constant | None:
    """The constant an NHWC twin of a broadcast NCHW op needs (None: not broadcastable)."""
    value = c.value.numpy()
    if value.ndim == 0:
        return c
    if value.ndim > 4:
        return None
    value = value.reshape((1,) * (4 - value.ndim) + value.shape).transpose(TO_NHWC)
    return relax.const(np.ascontiguousarray(value), str(c.ty.dtype))


Lowering = Callable[["ChannelsLastRewriter", relax.Call], "relax.Expr | None"]
"""``lower(rewriter, call)``: the NCHW value of ``call`` computed by a tvmq kernel (a
``permute_dims`` to NCHW of its NHWC result), or None when ``call`` is not for this pass."""


@mutator
class ChannelsLastRewriter(KernelRewriter):
    """Replaces each conv2d ``lower`` accepts, keeping NHWC results NHWC.

    ``self.nhwc`` maps a (rewritten) 4-D NCHW var to its NHWC twin: ``var`` is
    ``permute_dims(twin, [0, 3, 1, 2])``. Ops over a var with a twin are emitted over the
    twin (see the module docstring); their NCHW value becomes a permute of the new twin,
    which :func:`relax.analysis.remove_all_unused` drops where nothing reads it.
    """

    def __init__(self, mod: tvm.IRModule, lower: Lowering):
        super().__init__(mod)
        self.lower = lower
        self.nhwc: dict[relax.Var, relax.Var] = {}
        self.current_var: relax.Var | None = None  # the binding being rewritten
        # var -> an earlier var whose rewritten value already is var's value (a kernel with
        # a fused epilogue computes the ops after it: they become that kernel's result).
        self.aliases: dict[relax.Var, relax.Var] = {}
        # NHWC value -> (the same zero-bordered, the border (top, left, bottom, right)):
        # a kernel that wrote its result that way for the next conv, which then reads it.
        self.bordered: dict[relax.Var, tuple[relax.Var, tuple[int, int, int, int]]] = {}
        # NHWC value -> the kernel's result it was sliced from (a conv's channels padded to
        # whole vectors; zeros in the float kernels'): a depthwise kernel reads that instead
        # and computes the padded channels along (pack_float_conv, pack_int8_conv_x86).
        self.channel_padded: dict[relax.Var, relax.Var] = {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        bb = self.builder_
        var = binding.var
        if var in self.aliases:
            new_var = self.visit_expr(self.aliases[var])
            twin = self.nhwc.get(new_var)
            if not isinstance(var, relax.DataflowVar) and bb.current_block_is_dataflow():
                new_var = bb.emit_output(new_var, var.name)
                if twin is not None:
                    self.nhwc[new_var] = twin
            self.set_var_remap(var, new_var)
            return
        self.current_var = var
        value = self.visit_expr(binding.value)
        twin = None
        axes = permute_axes(value)
        if axes == TO_NHWC and value.args[0] in self.nhwc:
            value = self.nhwc[value.args[0]]  # NHWC -> NCHW -> NHWC: the twin itself
        elif axes == TO_NCHW and isinstance(value.args[0], relax.Var):
            twin = value.args[0]
        elif isinstance(value, relax.TupleGetItem):
            twin = self.nhwc.get(_tuple_field(bb, value))
        elif self.changed:  # only once a conv is rewritten (no twin before)
            nhwc_value = self._nhwc_op(value)
            if nhwc_value is not None:
                twin = bb.emit(nhwc_value, var.name + "_nhwc")
                value = relax.op.permute_dims(twin, TO_NCHW)
        if value.same_as(binding.value):
            bb.emit_normalized(binding)
            new_var = var
        else:
            new_var = emit_binding(bb, var, value)
            self.set_var_remap(var, new_var)
        twin_shape = _shape_of(twin) if twin is not None else None
        if twin_shape is not None and len(twin_shape) == 4:
            self.nhwc[new_var] = twin

    def _nhwc_op(self, call: relax.Expr) -> relax.Expr | None:
        """``call`` computed over the NHWC twins of its arguments, or None."""
        if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op):
            return None
        out_shape = _shape_of(call)
        if out_shape is None or len(out_shape) != 4 or not call.args:
            return None
        x = call.args[0]
        if call.op.same_as(_MEAN):
            return self._nhwc_mean(call)
        if call.op.same_as(_CONCAT):
            return self._nhwc_concat(call)
        if call.op.same_as(_RESIZE2D):
            return self._nhwc_resize2d(call)
        if call.op in _POOLS or call.op.same_as(_PAD) or call.op in _QDQ:
            if x not in self.nhwc:
                return None
            t = self.nhwc[x]
            a = call.attrs
            if call.op in _POOLS:
                if (str(a.layout), str(a.out_layout)) != ("NCHW", "NCHW"):
                    return None
                return _POOLS[call.op](
                    t,
                    a.pool_size,
                    a.strides,
                    a.padding,
                    a.dilation,
                    bool(a.ceil_mode),
                    bool(a.count_include_pad),
                    "NHWC",
                    "NHWC",
                )
            if call.op.same_as(_PAD):
                w = [int(p) for p in a.pad_width]
                if len(w) != 8:
                    return None
                nhwc_w = [v for d in TO_NHWC for v in w[2 * d : 2 * d + 2]]
                return relax.op.nn.pad(t, nhwc_w, str(a.pad_mode), float(a.pad_value))
            # quantize / dequantize: per-tensor, or per-channel along a moved axis.
            if any(not isinstance(p, tvm.ir.Constant) for p in call.args[1:]):
                return None
            axis = int(a.axis) % 4
            fn = relax.op.quantize if call.op.same_as(_QDQ_Q) else relax.op.dequantize
            return fn(t, call.args[1], call.args[2], _NHWC_POS[axis], str(a.out_dtype))
        if call.op not in _ELEMENTWISE:
            return None
        if not any(arg in self.nhwc and _shape_of(arg) == out_shape for arg in call.args):
            return None
        args = []
        for arg in call.args:
            if arg in self.nhwc and _shape_of(arg) == out_shape:
                args.append(self.nhwc[arg])
            elif is_tensor_const(arg):  # IntImm / FloatImm bounds (clip) are scalars below
                c = _nhwc_constant(arg)
                if c is None:
                    return None
                args.append(c)
            elif _is_per_channel(arg, out_shape):  # (N, C, 1, 1): squeeze-excite scales
                n, c = _shape_of(arg)[:2]
                args.append(self.builder_.emit(relax.op.reshape(arg, (n, 1, 1, c))))
            elif isinstance(arg, relax.Var) and _shape_of(arg) == out_shape:
                args.append(self.nhwc_input(arg))  # e.g. a residual from the model's input
            elif isinstance(arg.ty, relax.TensorType) and arg.ty.ndim != 0:
                return None  # another non-constant tensor in NCHW: leave the op alone
            else:
                args.append(arg)  # scalars, PrimValues
        return relax.Call(call.op, args, call.attrs, call.ty_args)

    def _nhwc_concat(self, call: relax.Call) -> relax.Expr | None:
        """``concat`` of NCHW tensors (UNet's skip connections, a detector's FPN) over their
        twins, when at least one has a twin; the others are transposed once."""
        parts = call.args[0]
        if not isinstance(parts, relax.Tuple) or not any(p in self.nhwc for p in parts.fields):
            return None
        twins = []
        for part in parts.fields:
            shape = _shape_of(part)
            if part not in self.nhwc and (shape is None or len(shape) != 4):
                return None
            twins.append(self.nhwc_input(part))
        axis = int(call.attrs.axis) % 4
        return relax.op.concat(twins, axis=_NHWC_POS[axis])

    def _nhwc_resize2d(self, call: relax.Call) -> relax.Expr | None:
        """``image.resize2d`` (a detector's FPN upsampling) over the twin, ``layout="NHWC"``:
        the same interpolation, its attributes as they were."""
        x, a = call.args[0], call.attrs
        if x not in self.nhwc or str(a.layout) != "NCHW":
            return None
        return relax.op.image.resize2d(
            self.nhwc[x],
            call.args[1],
            [float(r) for r in a.roi],
            "NHWC",
            str(a.method),
            str(a.coordinate_transformation_mode),
            str(a.rounding_method),
            float(a.cubic_alpha),
            int(a.cubic_exclude),
            float(a.extrapolation_value),
            a.out_dtype,  # None: the input's
        )

    def _nhwc_mean(self, call: relax.Call) -> relax.Expr | None:
        """``mean(x, axis=[2, 3] (any order / negative), keepdims=True)`` over the twin."""
        x, a = call.args[0], call.attrs
        if x not in self.nhwc or a.axis is None or not bool(a.keepdims):
            return None
        if sorted(int(d) % 4 for d in a.axis) != [2, 3]:
            return None
        return relax.op.mean(self.nhwc[x], axis=[1, 2], keepdims=True)

    def match(self, call: relax.Call):
        # ``lower`` matches and emits in one step: its result is the rewrite.
        lowered = self.lower(self, call)
        return None if lowered is None else (lowered,)

    def rewrite(self, lowered: relax.Expr) -> relax.Expr:
        return lowered

    def nhwc_input(self, x: relax.Expr) -> relax.Expr:
        """``x`` (N, C, H, W) channels last: its twin when it has one, else a transpose (which
        becomes its twin: each value is transposed once however many convs read it)."""
        if x in self.nhwc:
            return self.nhwc[x]
        n, c, h, w = _shape_of(x)
        if c == 1 or h * w == 1:
            twin = self.builder_.emit(relax.op.reshape(x, (n, h, w, c)))
        else:
            twin = self.builder_.emit(relax.op.permute_dims(x, list(TO_NHWC)))
        if isinstance(x, relax.Var):
            self.nhwc[x] = twin
        return twin


def rewrite_channels_last(mod: tvm.IRModule, lower: Lowering) -> tvm.IRModule:
    """Every Relax function of ``mod`` with the convs ``lower`` takes rewritten, channels
    last between them; ``mod`` itself when ``lower`` took none."""
    return rewrite_functions(
        mod, ChannelsLastRewriter(mod, lower), relax.analysis.remove_all_unused
    )


def rows_in_border(
    bb: relax.BlockBuilder, rows: relax.Expr, n: int, oh: int, ow: int, border
) -> tuple[relax.Expr, relax.Expr]:
    """A kernel's ``(N * H' * W', C)`` result rows stored inside a ``border`` (top, left,
    bottom, right) of ``H' x W'`` images (the next conv's padded input) as ``(bordered,
    inside)``: the NHWC images with their border, and the ``(N, oh, ow, C)`` inside."""
    top, left, bottom, right = border
    c = int(rows.ty.shape[1])
    bordered = bb.emit(relax.op.reshape(rows, (n, top + oh + bottom, left + ow + right, c)))
    end = [top + oh, left + ow]
    inside = bb.emit(relax.op.strided_slice(bordered, axes=[1, 2], begin=[top, left], end=end))
    return bordered, inside


def match_nchw_conv2d(
    call: relax.Expr, data_dtypes: tuple[str, ...], weight_dtype: str, out_dtype: str
) -> tuple[relax.Expr, Conv2DGeometry, np.ndarray, int] | None:
    """``(x, geometry, W as numpy OIHW, groups)`` of an NCHW x OIHW conv2d with a constant
    ``weight_dtype`` weight, data of one of ``data_dtypes``, an ``out_dtype`` result and
    static, non-empty shapes; else None. The callers decide which ``groups`` they take."""
    if not isinstance(call, relax.Call) or not call.op.same_as(_CONV2D):
        return None
    x, w = call.args
    a = call.attrs
    if not isinstance(w, tvm.ir.Constant) or str(w.ty.dtype) != weight_dtype:
        return None
    if (a.data_layout, a.kernel_layout, a.out_layout) != ("NCHW", "OIHW", "NCHW"):
        return None
    if not isinstance(call.ty, relax.TensorType) or str(call.ty.dtype) != out_dtype:
        return None
    if not isinstance(x.ty, relax.TensorType) or str(x.ty.dtype) not in data_dtypes:
        return None
    x_shape, w_shape = static_shape(x), static_shape(w)
    if x_shape is None or w_shape is None or len(x_shape) != 4 or len(w_shape) != 4:
        return None
    if 0 in x_shape or 0 in w_shape:
        return None
    geo = Conv2DGeometry(
        x_shape,
        (w_shape[2], w_shape[3]),
        tuple(int(s) for s in a.strides),
        tuple(int(p) for p in a.padding),
        tuple(int(d) for d in a.dilation),
    )
    if min(geo.out_hw) < 1:
        return None
    return x, geo, w.value.numpy(), int(a.groups)


def is_depthwise(geo: Conv2DGeometry, w: np.ndarray, groups: int) -> bool:
    """One filter per channel (``groups == C``, weight ``(C, 1, KH, KW)``), over a window
    of more than one element (a 1x1 depthwise conv is a per-channel scale)."""
    c = geo.x_shape[1]
    return groups == c > 1 and w.shape[:2] == (c, 1) and w.shape[2] * w.shape[3] >= 2
