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
dense weight (:func:`tvmq.kernels.pack_weight_vnni`). When the conv's result only feeds
``LowerInt8``'s float requantize (offset add, ReLU, ``astype``, per-channel multiply,
``quantize(scale=1)``, clip: :func:`find_requantize_epilogues`), the dense kernel computes
it before storing and ``acc`` is the int8 / uint8 result itself: bit-identical, and the
int32 sums (4 bytes an output, larger than L2 for an early MobileNet layer) never go to
memory. An int8 ``x`` is shifted by +128 (the padding zeros too), and the dense kernel adds
``-128 * colsum`` per output channel back: the result is the exact integer convolution. A
``strided_slice`` drops the padded rows and channels when there are any. The kernels are
marked ``tirx.is_scheduled`` and opaque to FuseOps.

Where the im2col matrix has 64 KiB or more (UNet's and the YOLO neck's early layers: 7-29 MB)
and each tap is a run of 16-byte multiples, no im2col kernel runs: the
dense kernel reads the NHWC image and copies each row tile's part of it (the input strips
its pixels share, or its im2col rows) into a scratch block in cache before its column tiles
(``im2col`` of :func:`~tvmq.kernels.x86_int8.int8_dense_vnni`), shifting int8 bytes and
writing the padding's zeros as it goes, so neither the matrix nor a padded copy of the image
goes through memory (UNet int8, 1 thread, AMD Zen 4: 60.3 -> 45.3 ms, bit-identical; reading
the unpadded image: 44.55 -> 44.26 ms, no pad kernels; strips: 43.69 -> 42.91 ms).

On AMX targets a conv reads its padded NHWC input straight into the tiles (or gathers it
a block at a time: :mod:`tvmq.kernels.x86_amx_conv`); where the requantized uint8 result of
one AMX conv is read only by another that pads it (a ResNet block's first conv, a
bottleneck's 1x1 reduce), the first writes it with that zero border
(:meth:`_Lowering.find_bordered_outputs`, ``out_border`` of
:class:`~tvmq.kernels.x86_amx_conv.AmxConv`) and no pad kernel runs between them
(bit-identical; ResNet-18 int8 on two threads 1.236 -> 1.185 ms, ResNet-50 3.51 -> 3.47,
one-process A/B on an Intel Xeon with AMX).

The conv's result stays channels last (NHWC) as long as it can, so the epilogue, pooling
and the next conv's im2col read it without a transpose (see
:mod:`tvmq.passes.channels_last`): results are bit-identical.

A depthwise int8 conv (``groups == C``) runs on the NHWC depthwise kernel instead
(:func:`tvmq.kernels.cpu_float_conv.float_depthwise_nhwc` with uint8 / int8 data: exact
int32 sums, vectorized over channels), so MobileNet-style blocks stay channels last.

Everything else is left alone: float convs, other layouts, other grouped convs, non-constant
or non-int8 weights, symbolic shapes, other out dtypes. Where it belongs: next to
:class:`PackInt8DenseX86`, after ``LowerInt8`` and before ``LegalizeOps``. Without
avx512vnni in the target the module is returned unchanged; after a rewrite no int8 conv2d
is left, so running the pass again changes nothing.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tvm
from tvm import relax

from tvmq.kernels.cpu_float_conv import choose_depthwise_tiles
from tvmq.kernels.vnni_intrin import LANES
from tvmq.kernels.x86_amx import X86Int8Dense
from tvmq.kernels.x86_amx_conv import AmxConv, x86_int8_conv
from tvmq.kernels.x86_int8 import with_int_rounding
from tvmq.kernels.x86_int8_conv import OPAQUE, Conv2DGeometry, int8_im2col

from ._int8_dense import shift_bytes
from .channels_last import (
    TO_NCHW,
    ChannelsLastRewriter,
    is_depthwise,
    match_nchw_conv2d,
    rewrite_channels_last,
    rows_in_border,
)
from .pack_float_conv import lower_depthwise, wider_depthwise
from .pack_int8_dense_x86 import VNNIPass
from .relax_utils import RESHAPE, dataflow_bindings, op_name, spatial_pad, static_shape
from .requantize_epilogue import (
    ChannelAxis,
    RequantizeEpilogue,
    requantize_chain,
    with_residual_add,
)

_SHIFT = 128  # int8 -> uint8: vpdpbusd multiplies unsigned by signed bytes
# Activations whose result an AMX target's conv kernels quantize again themselves (Requantize's
# rescale): MobileNetV3-small int8's hardswish blocks on an Intel Xeon with AMX, one thread
# 1.7% faster, two 1.7-6.9% (no quantize kernel, no float32 tensor between the layers). Not
# SiLU in general: its exp made EfficientNet-B0's 1x1 VNNI convs slower there by more than the
# quantize kernel they saved (12544x28x32: 184 + 71 -> 253 + 25 us, the model 2.6% slower on
# one thread) -- but a SiLU whose float32 result outgrows a core's L2 (_SILU_QUANTIZED_BYTES)
# would go to memory and be read back: EfficientNet-B0's 112x112x96 expand conv + quantize kernel
# 619 + 345 -> 787 us. Nor on VNNI-only targets: on Zen 4 the quantize after the activation cost
# more than the pass it saves.
_QUANTIZED_ACTIVATIONS_AMX = ("hardswish", "hardswish_divide_first")
_SILU_QUANTIZED_BYTES = 2 << 20  # the L2 of a Sapphire / Emerald Rapids core


def _quantized_activations(result: relax.Var) -> tuple[str, ...]:
    """The activations whose quantize an AMX target's kernel storing ``result`` takes."""
    shape = static_shape(result)
    large = shape is not None and 4 * int(np.prod(shape)) > _SILU_QUANTIZED_BYTES
    return _QUANTIZED_ACTIVATIONS_AMX + (("silu",) if large else ())


def find_requantize_epilogues(
    mod: tvm.IRModule, amx: bool = False
) -> dict[relax.Var, RequantizeEpilogue]:
    """The int8 convs whose result only feeds ``LowerInt8``'s float requantize (per output
    channel along NCHW axis 1; see :func:`requantize_chain`): the conv's kernel stores the
    int8 / uint8 (or float32) result, the int32 sums never go to memory (a pass over 4 bytes
    an output less, and one kernel less). For an ``amx`` target a hardswish (a large SiLU)
    after the dequantize and its quantize join too (:func:`_quantized_activations`)."""
    found = {}
    bindings = list(dataflow_bindings(mod))
    values = {b.var: b.value for b, _ in bindings}
    position = {b.var: i for i, (b, _) in enumerate(bindings)}
    for i, (b, only_user) in enumerate(bindings):
        dense = match_int8_conv2d(b.value)
        conv = dense or match_int8_depthwise(b.value)
        where = conv and ChannelAxis(1, 4, conv[2].shape[0])
        epilogue = where and requantize_chain(
            (b.var,), where, only_user, _quantized_activations(b.var) if amx else ()
        )
        if epilogue and dense:  # a residual add joins the dense kernel's epilogue
            before = lambda v, i=i: position.get(v, -1) < i  # noqa: E731
            epilogue = with_residual_add(epilogue, only_user, values, before)
        if epilogue:
            found[b.var] = epilogue
    return found


def match_int8_conv2d(call: relax.Expr) -> tuple[relax.Expr, Conv2DGeometry, np.ndarray] | None:
    """(x, geometry, W as numpy OIHW) for a lowerable int8 NCHW conv2d, else None."""
    found = match_nchw_conv2d(call, ("uint8", "int8"), "int8", "int32")
    if found is None:
        return None
    x, geo, w, groups = found
    return (x, geo, w) if groups == 1 and w.shape[1] == geo.x_shape[1] else None


def match_int8_depthwise(call: relax.Expr) -> tuple[relax.Expr, Conv2DGeometry, np.ndarray] | None:
    """(x, geometry, W as numpy (C, 1, KH, KW)) for an int8 NCHW depthwise conv2d (one
    filter per channel, ``groups == C``) with a static shape, else None."""
    found = match_nchw_conv2d(call, ("uint8", "int8"), "int8", "int32")
    if found is None:
        return None
    x, geo, w, groups = found
    return (x, geo, w) if is_depthwise(geo, w, groups) else None


class _Lowering:
    """The ``lower`` callback of :class:`ChannelsLastRewriter`: im2col -> VNNI dense for a
    matched int8 conv (see the module docstring), with its requantize when it has one, the
    depthwise kernel for a depthwise conv, else None."""

    def __init__(self, epilogues: dict[relax.Var, RequantizeEpilogue], amx: bool):
        self.epilogues = epilogues
        self.amx = amx
        # var -> the zero border its only reader, an AMX conv, reads around it
        self.wanted_borders: dict[relax.Var, tuple[int, int, int, int]] = {}

    def find_bordered_outputs(self, mod: tvm.IRModule) -> None:
        """Note the uint8 values read only by an AMX conv that pads them, with the zero border
        that conv reads (:attr:`AmxConv.input_padding`): an AMX conv or a depthwise conv whose
        requantized result such a value is writes it with that border, and no pad kernel runs
        between them (ResNet-50 int8: 16 pads, ~100 us of ~6.4 ms on one thread; MobileNetV2
        int8: the slack row its projections read, 3 pads of whole 56x56 / 28x28 tensors)."""
        for b, only_user in dataflow_bindings(mod):
            found = match_int8_conv2d(b.value)
            if found is None or str(found[0].ty.dtype) != "uint8" or only_user(found[0]) is None:
                continue
            x, geo, w = found
            conv = x86_int8_conv(geo, w.shape[0], self.amx)
            if isinstance(conv, AmxConv) and any(conv.input_padding):
                self.wanted_borders[x] = conv.input_padding

    def __call__(self, rw: ChannelsLastRewriter, call: relax.Expr) -> relax.Expr | None:
        found = match_int8_conv2d(call)
        epilogue = self.epilogues.get(rw.current_var)
        if found is None:
            return self._depthwise(rw, call, epilogue)
        x, geo, w = found
        bb = rw.builder_
        o = w.shape[0]
        m, k = geo.m, geo.k
        dense = x86_int8_conv(geo, o, self.amx)
        mp, kp, np_ = dense.m_padded, dense.k_padded, dense.n_padded
        if epilogue is not None and (mp, np_) != (m, o):  # R would need padding: add apart
            epilogue = epilogue.without_residual()
        border = self._out_border(dense, epilogue, o)
        if border is not None:
            dense = dataclasses.replace(dense, out_border=border)
        x_dtype = str(x.ty.dtype)
        x = rw.nhwc_input(x)
        own = _is_its_own_im2col(geo, x_dtype, mp, kp)
        in_kernel = not own and _im2col_in_kernel(geo, dense)
        if isinstance(dense, AmxConv):  # the kernel reads the padded input itself
            cols = _padded_uint8(rw, x, dense.input_padding, x_dtype)
        elif own:
            cols = bb.emit(relax.op.reshape(x, (m, k)))
        elif in_kernel:  # the kernel reads the image itself, its padding and shift included
            cols = x
        else:
            cols_fn = rw.kernel_var(
                ("im2col", geo, x_dtype, mp, kp),
                f"tvmq_int8_im2col_{mp}x{kp}",
                lambda: int8_im2col(geo, x_dtype, mp, kp),
            )
            out_ty = relax.TensorType((mp, kp), "uint8")
            cols = bb.emit(relax.call_tir(cols_fn, [x], out_ty=out_ty))
        w2 = w.transpose(0, 2, 3, 1).reshape(o, k).T  # (K, O), K in cols' (ky, kx, c) order
        args = [cols, relax.const(dense.pack(np.ascontiguousarray(w2)), "int8")]
        shift = _SHIFT if x_dtype == "int8" else 0
        offset = np.zeros(np_, dtype=np.int32)
        offset[:o] = -shift * w2.astype(np.int32).sum(axis=0)
        requantize, out_dtype = None, "int32"
        name = f"tvmq_int8_{dense.label}_{mp}x{kp}x{np_}"
        if epilogue is not None:  # int32 sums wrap the same in either order
            offset[:o] += epilogue.offset
            requantize = with_int_rounding(epilogue.requantize, w2, offset, epilogue.multiplier)
            out_dtype = requantize.out_dtype
            name += requantize.kernel_suffix
            name += "_residual" if epilogue.residual is not None else ""
        with_offset = bool(offset.any())
        if with_offset:
            args.append(relax.const(offset, "int32"))
            name += "_offset"
        if epilogue is not None:
            args.append(relax.const(np.pad(epilogue.multiplier, (0, np_ - o)), "float32"))
        if epilogue is not None and epilogue.residual is not None:
            r = rw.nhwc_input(rw.visit_expr(epilogue.residual))
            args.append(bb.emit(relax.op.reshape(r, (m, o))))
        # Fewer than 16 output channels (a classifier's): the VNNI kernel stores exactly those
        # (predicated stores), not 16 to be sliced and re-read.
        n_out = (
            o
            if isinstance(dense, X86Int8Dense) and dense.amx is None and np_ == LANES and o < np_
            else np_
        )
        vnni = {"n_out": n_out} if n_out != np_ else {}
        if in_kernel:
            vnni.update(im2col=geo, x_dtype=x_dtype)
            name += "_im2col"
        if border is not None:
            name += "_bordered"
        dense_fn = rw.kernel_var(
            ("dense", dense, with_offset, requantize, n_out, vnni.get("im2col"), x_dtype),
            name + (f"_n{n_out}" if "n_out" in vnni else ""),
            lambda: dense.build(with_offset, requantize, **vnni).with_attr("op_pattern", OPAQUE),
        )
        rows = dense.output_rows if border is not None else mp
        out_ty = relax.TensorType((rows, n_out), out_dtype)
        y = bb.emit(relax.call_tir(dense_fn, args, out_ty=out_ty))
        full = y
        if mp != m or n_out != o:
            y = bb.emit(relax.op.strided_slice(y, axes=[0, 1], begin=[0, 0], end=[m, o]))
        oh, ow = geo.out_hw
        if border is not None:
            y = _unbordered(rw, y, geo.x_shape[0], oh, ow, border)
        else:
            y = bb.emit(relax.op.reshape(y, (geo.x_shape[0], oh, ow, o)))
            if mp == m and n_out != o:  # whole vectors of channels, for a depthwise reader
                shape = (geo.x_shape[0], oh, ow, n_out)
                rw.channel_padded[y] = bb.emit(relax.op.reshape(full, shape))
        _alias(rw, epilogue)
        return relax.op.permute_dims(y, TO_NCHW)

    def _out_border(self, dense, epilogue: RequantizeEpilogue | None, o: int):
        """:meth:`_reader_border` of an AMX conv (only it stores rows with a border), where
        it stores the result's exact channels."""
        whole = isinstance(dense, AmxConv) and dense.n_padded == o
        return self._reader_border(epilogue, whole)

    def _reader_border(self, epilogue: RequantizeEpilogue | None, whole: bool):
        """The zero border a conv writes around its requantized uint8 result, where the
        result's only reader is an AMX conv that pads it (:meth:`find_bordered_outputs`) and
        the kernel stores exactly the result's pixels and channels (``whole``); None where
        it writes none (no such reader, padded rows or channels, a residual read row for
        row)."""
        if not whole or epilogue is None or epilogue.residual is not None:
            return None
        if epilogue.requantize.out_dtype != "uint8":
            return None
        return self.wanted_borders.get(epilogue.chain[-1])

    def _depthwise(self, rw, call, epilogue: RequantizeEpilogue | None) -> relax.Expr | None:
        """A depthwise int8 conv on the NHWC depthwise kernel (vectorized over channels)."""
        found = match_int8_depthwise(call)
        if found is None:
            return None
        x, geo, w = found
        # This pass runs only on AVX-512 VNNI targets: 16 int32 lanes, 32 vector registers.
        tiles = choose_depthwise_tiles(geo.out_hw[1], geo.x_shape[1], 16, 32)
        if tiles is None:
            return None
        c = geo.x_shape[1]
        padded_to, geo, fill = _zero_point_padded(rw, x, geo)
        w_hwc = np.ascontiguousarray(w[:, 0].transpose(1, 2, 0))
        taps = w_hwc.reshape(-1, c)  # (KH * KW, C): each channel's own weights
        nhwc = None
        if padded_to is x:  # the producer's padded channels along (AVX-512: 16 lanes, 32 zmm)
            geo, w_hwc, tiles, nhwc = wider_depthwise(rw, x, geo, w_hwc, tiles, 16, 32)
        x = padded_to
        if epilogue is None:
            return lower_depthwise(rw, x, geo, w_hwc, tiles, pad_value=fill, nhwc=nhwc, channels=c)
        args = (epilogue.offset, epilogue.multiplier)
        requantize = with_int_rounding(epilogue.requantize, taps, *args)
        border = self._reader_border(epilogue, nhwc is None and tiles.ow_padded == geo.out_hw[1])
        lowered = lower_depthwise(
            rw, x, geo, w_hwc, tiles, args, requantize, pad_value=fill, nhwc=nhwc, channels=c,
            out_pad=border,
        )  # fmt: skip
        _alias(rw, epilogue)
        return lowered


def _zero_point_padded(rw: ChannelsLastRewriter, x, geo: Conv2DGeometry):
    """``(x, geo, fill)`` for a depthwise conv: where ``x`` is a constant pad of the H and W
    axes (``LowerInt8`` pads an int8 conv's input with its zero point and gives the conv no
    padding), the image before it, the conv with that padding and the pad's value, which the
    kernel reads in its taps there: no pad kernel and no padded copy in memory (MobileNetV3's
    and EfficientNet's hardswish / SiLU blocks, whose zero points are not 0). Else as given."""
    if any(geo.padding):
        return x, geo, 0.0
    nchw = False  # the pad of an NHWC image (a conv's result, channels last) ...
    value = _bound(rw, rw.nhwc.get(x))
    found = spatial_pad(value, nchw)
    if found is None:  # ... or of an NCHW one (the model's input)
        nchw, value = True, _bound(rw, x)
        found = spatial_pad(value, nchw)
    if found is None or not _kernel_result(rw, value.args[0]):
        return x, geo, 0.0
    image = value.args[0]
    if nchw:
        n, c, h, wd = (int(d) for d in image.ty.shape)
        x = image
    else:
        n, h, wd, c = (int(d) for d in image.ty.shape)
        x = rw.builder_.emit(relax.op.permute_dims(image, TO_NCHW))  # dead once lowered
        rw.nhwc[x] = image
    (top, left, bottom, right), fill = found
    padded = dataclasses.replace(geo, x_shape=(n, c, h, wd), padding=(top, left, bottom, right))
    return x, padded, fill


def _bound(rw: ChannelsLastRewriter, expr) -> relax.Expr | None:
    """The value ``expr`` is bound to in the rewritten function, None for an input."""
    return rw.lookup_binding(expr) if isinstance(expr, relax.Var) else None


def _kernel_result(rw: ChannelsLastRewriter, image) -> bool:
    """Whether ``image`` (maybe through reshapes) is a kernel's result or an input, which a
    pad after it would copy in a kernel of its own. A pad after an elementwise op (an
    EfficientNet block's SiLU + quantize) fuses into that op's kernel, and a tap there that
    tests the border costs more than the copy: EfficientNet-B0 int8 1.9% slower on one
    thread with every zero-point pad in its depthwise kernels, MobileNetV3-small int8 (whose
    pads follow its convs' own hardswish + quantize) 6% faster on one and two."""
    value = _bound(rw, image)
    while op_name(value) == RESHAPE:
        value = _bound(rw, value.args[0])
    return value is None or op_name(value) == "relax.call_tir"


def _is_its_own_im2col(geo, x_dtype: str, mp: int, kp: int) -> bool:
    """Whether the NHWC input, seen as ``(N*H*W, C)``, is already the dense kernel's operand:
    a 1x1 stride-1 conv without padding over uint8 data whose sizes need no padding (most
    pointwise convs of a MobileNet), so im2col would only copy it."""
    one = geo.kernel == (1, 1) and geo.strides == (1, 1) and geo.dilation == (1, 1)
    return one and not any(geo.padding) and x_dtype == "uint8" and (mp, kp) == (geo.m, geo.k)


def _im2col_in_kernel(geo, dense) -> bool:
    """Whether the VNNI dense kernel builds its own im2col rows, a row tile at a time
    (``im2col`` of :func:`~tvmq.kernels.x86_int8.int8_dense_vnni`): where the matrix has 64
    KiB or more (where a separate im2col kernel would run in parallel) and each tap is a run
    of 16-byte multiples. UNet's 224x224 32-channel 3x3 conv (1 thread) 3.05 -> 2.36 ms,
    112x112 64-channel 3.39 -> 2.20; with input strips ResNet's 28x28 128-channel conv 0.545
    -> 0.523 ms (im2col + dense). At 2 threads a separate im2col kernel reads its image and
    writes its rows on both cores and the dense kernel reads them back on the other one:
    ResNet-18's 14x14 and 7x7 im2col kernels ran 2.5-3.5x slower at 2 threads than at 1
    (this AMD EPYC VM, where a cache line moving between the two vCPUs is slow); in the
    kernel, ResNet-18 int8 4.92 -> 4.88 ms at 2 threads, 9.14 -> 9.03 at 1."""
    if not isinstance(dense, X86Int8Dense) or dense.amx is not None:
        return False
    big = dense.m_padded * dense.k_padded >= 1 << 16
    return big and geo.x_shape[1] % LANES == 0 and dense.k_padded == geo.k


def _unbordered(rw: ChannelsLastRewriter, y, n: int, oh: int, ow: int, border) -> relax.Expr:
    """The NHWC result inside the zero ``border`` of a kernel's ``(rows, C)`` output, noted
    in ``rw.bordered`` for the conv that reads it padded (:func:`_padded_uint8`)."""
    bordered, y = rows_in_border(rw.builder_, y, n, oh, ow, border)
    rw.bordered[y] = (bordered, tuple(border))
    return y


def _padded_uint8(rw: ChannelsLastRewriter, x: relax.Expr, padding, x_dtype: str) -> relax.Expr:
    """The NHWC ``x`` with the conv's zero padding, shifted to uint8 when it is int8 (the
    padding too: the kernel's offset takes ``128 * colsum`` off every output); the producer's
    own result where it wrote it with this border."""
    bb = rw.builder_
    bordered = rw.bordered.get(x)
    if bordered is not None and bordered[1] == tuple(padding) and x_dtype == "uint8":
        return bordered[0]
    top, left, bottom, right = padding
    if any(padding):
        x = bb.emit(relax.op.nn.pad(x, [0, 0, top, bottom, left, right, 0, 0]))
    if x_dtype == "int8":
        x = bb.emit(shift_bytes(x, _SHIFT, "uint8"))
    return x


def _alias(rw: ChannelsLastRewriter, epilogue: RequantizeEpilogue | None) -> None:
    """The requantize ops are the current kernel's result now."""
    for var in epilogue.chain if epilogue is not None else ():
        rw.aliases[var] = rw.current_var


@tvm.transform.module_pass(opt_level=0, name="PackInt8ConvX86")
class PackInt8ConvX86(VNNIPass):
    """Lower ``conv2d(int8/uint8 x, const int8 W, out_dtype=int32)`` to im2col + VNNI dense
    (``target``: see :class:`VNNIPass`)."""

    def rewrite(self, mod: tvm.IRModule, amx: bool) -> tvm.IRModule:
        lowering = _Lowering(find_requantize_epilogues(mod, amx), amx)
        if amx:
            lowering.find_bordered_outputs(mod)
        return rewrite_channels_last(mod, lowering)
