"""PackInt8ConvX86: int8 conv2d with a constant weight -> im2col + the VNNI dense kernel.

Rewrites, when the target has ``avx512vnni``, what :class:`LowerInt8` emits for a conv::

    y = R.nn.conv2d(x, W, strides, padding, dilation, groups=1,
                    data_layout="NCHW", kernel_layout="OIHW", out_dtype="int32")
    # x: (N, C, H, W) uint8 or int8, static shape (LowerInt8 pads it with its zero point
    #    first when that is not 0; the conv's own padding is then 0)
    # W: (O, C, KH, KW) int8 tvm.ir.Constant

into::

    x_t = permute_dims(x, [0, 2, 3, 1])  # NHWC (a reshape when C == 1)
    cols = call_tir(im2col, x_t)         # (M, K) uint8, M = N*OH*OW pixels, K = KH*KW*C
    acc = call_tir(int8_dense_vnni, cols, W packed[, offset])   # (M, O) int32
    y_nhwc = reshape(acc, (N, OH, OW, O))
    y = permute_dims(y_nhwc, [0, 3, 1, 2])

The im2col kernel (:func:`tvmq.kernels.x86_int8_conv.int8_im2col`) also does the conv's
padding, the int8 -> uint8 shift and the padding of M and K to the dense kernel's tiles;
the weight is ``W.transpose(0, 2, 3, 1).reshape(O, K).T``, packed at compile time like a
dense weight (:func:`tvmq.kernels.pack_weight_vnni`). An int8 ``x`` is shifted by +128
(the padding zeros too), and the dense kernel adds ``-128 * colsum`` per output channel
back: the result is the exact integer convolution. A ``strided_slice`` drops the padded
rows and channels when there are any. The kernels are marked ``tirx.is_scheduled`` and
opaque to FuseOps.

The conv's result stays channels last (NHWC) as long as it can: each elementwise op that
follows (bias, relu, requantize: unary ops, binary ops whose other operand is a constant, a
scalar or also NHWC, ``quantize`` / ``dequantize``), ``nn.pad`` and ``max_pool2d`` /
``avg_pool2d`` are computed on the NHWC tensor (constants transposed at compile time), and
a following int8 conv takes it as its im2col input directly. The transpose to NCHW is
emitted after each of these ops but is dead code unless something else (a reshape before a
dense layer, the model's output) reads the NCHW value: there it runs once, on the smallest
tensor. Channels last, the epilogue and pooling loops are contiguous (SIMD over channels);
in NCHW each was a strided transpose of the accumulator. Every value is computed exactly as
before, only stored in another order: results are bit-identical.

Everything else is left alone: float convs, other layouts, ``groups != 1``, non-constant
or non-int8 weights, symbolic shapes, other out dtypes. Where it belongs: next to
:class:`PackInt8DenseX86`, after ``LowerInt8`` and before ``LegalizeOps``. Without
avx512vnni in the target the module is returned unchanged; after a rewrite no int8 conv2d
is left, so running the pass again changes nothing.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvmq.kernels.x86_int8 import choose_tiles, int8_dense_vnni, pack_weight_vnni, padded_kn
from tvmq.kernels.x86_int8_conv import OPAQUE, Conv2DGeometry, int8_im2col

from ._int8_dense import _static_shape, rewrite_functions
from .pack_int8_dense_x86 import VNNIPass
from .relax_utils import is_tensor_const

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_SHIFT = 128  # int8 -> uint8: vpdpbusd multiplies unsigned by signed bytes


def match_int8_conv2d(call: relax.Expr) -> tuple[relax.Expr, Conv2DGeometry, np.ndarray] | None:
    """(x, geometry, W as numpy OIHW) for a lowerable int8 NCHW conv2d, else None."""
    if not isinstance(call, relax.Call) or not call.op.same_as(_CONV2D):
        return None
    x, w = call.args
    a = call.attrs
    if str(a.out_dtype) != "int32" or int(a.groups) != 1 or not isinstance(w, tvm.ir.Constant):
        return None
    if (a.data_layout, a.kernel_layout, a.out_layout) != ("NCHW", "OIHW", "NCHW"):
        return None
    if not isinstance(x.ty, relax.TensorType) or str(x.ty.dtype) not in ("uint8", "int8"):
        return None
    x_shape, w_shape = _static_shape(x), _static_shape(w)
    if str(w.ty.dtype) != "int8" or x_shape is None or w_shape is None:
        return None
    if len(x_shape) != 4 or len(w_shape) != 4 or x_shape[1] != w_shape[1] or 0 in x_shape:
        return None
    geo = Conv2DGeometry(
        x_shape,
        (w_shape[2], w_shape[3]),
        tuple(int(s) for s in a.strides),
        tuple(int(p) for p in a.padding),
        tuple(int(d) for d in a.dilation),
    )
    if min(geo.out_hw) < 1 or 0 in w_shape:
        return None
    return x, geo, w.value.numpy()


_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_TO_NCHW = (0, 3, 1, 2)  # permute_dims axes: NHWC -> NCHW
_TO_NHWC = (0, 2, 3, 1)
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
_PAD = tvm.ir.Op.get("relax.nn.pad")
_QDQ_Q = tvm.ir.Op.get("relax.quantize")


def _permute_axes(expr: relax.Expr) -> tuple[int, ...] | None:
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


def _nhwc_constant(c: tvm.ir.Constant) -> tvm.ir.Constant | None:
    """The constant an NHWC twin of a broadcast NCHW op needs (None: not broadcastable)."""
    value = c.value.numpy()
    if value.ndim == 0:
        return c
    if value.ndim > 4:
        return None
    value = value.reshape((1,) * (4 - value.ndim) + value.shape).transpose(_TO_NHWC)
    return relax.const(np.ascontiguousarray(value), str(c.ty.dtype))


@mutator
class _ConvRewriter(PyExprMutator):
    """Replaces each matched conv2d by im2col -> VNNI dense, keeping NHWC results NHWC.

    ``self.nhwc`` maps a (rewritten) 4-D NCHW var to its NHWC twin: ``var`` is
    ``permute_dims(twin, [0, 3, 1, 2])``. Ops over a var with a twin are emitted over the
    twin (see the module docstring); their NCHW value becomes a permute of the new twin,
    which :func:`relax.analysis.remove_all_unused` drops where nothing reads it.
    """

    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.kernels: dict[tuple, tvm.ir.GlobalVar] = {}
        self.changed = False
        self.nhwc: dict[relax.Var, relax.Var] = {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        bb = self.builder_
        var = binding.var
        value = self.visit_expr(binding.value)
        twin = None
        axes = _permute_axes(value)
        if axes == _TO_NHWC and value.args[0] in self.nhwc:
            value = self.nhwc[value.args[0]]  # NHWC -> NCHW -> NHWC: the twin itself
        elif axes == _TO_NCHW and isinstance(value.args[0], relax.Var):
            twin = value.args[0]
        elif self.changed:  # only once an int8 conv is rewritten (no twin before)
            nhwc_value = self._nhwc_op(value)
            if nhwc_value is not None:
                twin = bb.emit(nhwc_value, var.name + "_nhwc")
                value = relax.op.permute_dims(twin, _TO_NCHW)
        if value.same_as(binding.value):
            bb.emit_normalized(binding)
            new_var = var
        else:
            if isinstance(var, relax.DataflowVar) or not bb.current_block_is_dataflow():
                new_var = bb.emit(value, var.name)
            else:
                new_var = bb.emit_output(value, var.name)
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
                nhwc_w = [v for d in _TO_NHWC for v in w[2 * d : 2 * d + 2]]
                return relax.op.nn.pad(t, nhwc_w, str(a.pad_mode), float(a.pad_value))
            # quantize / dequantize: per-tensor, or per-channel along a moved axis.
            if any(not isinstance(p, tvm.ir.Constant) for p in call.args[1:]):
                return None
            axis = int(a.axis) % 4
            fn = relax.op.quantize if call.op.same_as(_QDQ_Q) else relax.op.dequantize
            return fn(t, call.args[1], call.args[2], _NHWC_POS[axis], str(a.out_dtype))
        if call.op not in _ELEMENTWISE:
            return None
        args, any_twin = [], False
        for arg in call.args:
            if arg in self.nhwc and _shape_of(arg) == out_shape:
                args.append(self.nhwc[arg])
                any_twin = True
            elif is_tensor_const(arg):  # IntImm / FloatImm bounds (clip) are scalars below
                c = _nhwc_constant(arg)
                if c is None:
                    return None
                args.append(c)
            elif isinstance(arg.ty, relax.TensorType) and arg.ty.ndim != 0:
                return None  # a non-constant tensor in NCHW: leave the op alone
            else:
                args.append(arg)  # scalars, PrimValues
        if not any_twin:
            return None
        return relax.Call(call.op, args, call.attrs, call.ty_args)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        found = match_int8_conv2d(call)
        if found is None:
            return call
        self.changed = True
        return self._lower(*found)

    def _kernel_var(self, key: tuple, name: str, build) -> tvm.ir.GlobalVar:
        if key not in self.kernels:
            self.kernels[key] = self.builder_.add_func(build(), name)
        return self.kernels[key]

    def _lower(self, x: relax.Expr, geo: Conv2DGeometry, w: np.ndarray) -> relax.Expr:
        bb = self.builder_
        o = w.shape[0]
        m, k = geo.m, geo.k
        kp, np_ = padded_kn(k, o)
        mp = choose_tiles(m, np_).m_padded
        x_dtype = str(x.ty.dtype)
        cols_fn = self._kernel_var(
            ("im2col", geo, x_dtype, mp, kp),
            f"tvmq_int8_im2col_{mp}x{kp}",
            lambda: int8_im2col(geo, x_dtype, mp, kp),
        )
        n, c, h, wd = geo.x_shape
        if x in self.nhwc:
            x = self.nhwc[x]  # the NHWC twin of an earlier conv's result (see the class)
        elif c == 1:
            x = bb.emit(relax.op.reshape(x, (n, h, wd, c)))
        else:
            x = bb.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
        cols = bb.emit(relax.call_tir(cols_fn, [x], out_ty=relax.TensorType((mp, kp), "uint8")))
        w2 = w.transpose(0, 2, 3, 1).reshape(o, k).T  # (K, O), K in cols' (ky, kx, c) order
        args = [cols, relax.const(pack_weight_vnni(np.ascontiguousarray(w2)), "int8")]
        shift = _SHIFT if x_dtype == "int8" else 0
        if shift:
            offset = np.zeros(np_, dtype=np.int32)
            offset[:o] = -shift * w2.astype(np.int32).sum(axis=0)
            args.append(relax.const(offset, "int32"))
        dense_fn = self._kernel_var(
            ("dense", mp, kp, np_, bool(shift)),
            f"tvmq_int8_dense_vnni_{mp}x{kp}x{np_}" + ("_offset" if shift else ""),
            lambda: int8_dense_vnni(mp, kp, np_, with_offset=bool(shift)).with_attr(
                "op_pattern", OPAQUE
            ),
        )
        y = bb.emit(relax.call_tir(dense_fn, args, out_ty=relax.TensorType((mp, np_), "int32")))
        if mp != m or np_ != o:
            y = bb.emit(relax.op.strided_slice(y, axes=[0, 1], begin=[0, 0], end=[m, o]))
        oh, ow = geo.out_hw
        y = bb.emit(relax.op.reshape(y, (geo.x_shape[0], oh, ow, o)))
        return relax.op.permute_dims(y, _TO_NCHW)


@tvm.transform.module_pass(opt_level=0, name="PackInt8ConvX86")
class PackInt8ConvX86(VNNIPass):
    """Lower ``conv2d(int8/uint8 x, const int8 W, out_dtype=int32)`` to im2col + VNNI dense
    (``target``: see :class:`VNNIPass`)."""

    def rewrite(self, mod: tvm.IRModule) -> tvm.IRModule:
        # Drop the NCHW transposes nothing reads (see _ConvRewriter).
        return rewrite_functions(mod, _ConvRewriter(mod), relax.analysis.remove_all_unused)
