"""PackFloatConv: float32 conv2d with a constant weight -> tvmq's register-blocked NHWC kernel.

Rewrites, on LLVM CPU targets with SIMD (x86 SSE/AVX2/AVX-512, aarch64 NEON)::

    y = R.nn.conv2d(x, W, strides, padding, dilation, groups=1,
                    data_layout="NCHW", kernel_layout="OIHW", out_dtype="float32")
    # x: (N, C, H, W) float32, static shape;  W: (O, C, KH, KW) float32 tvm.ir.Constant

into::

    x_t = permute_dims(x, [0, 2, 3, 1])        # NHWC (the twin of an earlier conv's result)
    x_p = nn.pad(x_t, ...)                     # the conv's padding (+ columns of a padded OW)
    y_t = call_tir(float_conv2d_nhwc, x_p, W packed)    # (N, OH, OW', O') NHWC
    y = permute_dims(strided_slice(y_t), [0, 3, 1, 2])

with ``W`` packed at compile time as ``[O'/L, KH, KW, C, L]``
(:func:`tvmq.kernels.cpu_float_conv.pack_conv_weight`, ``L`` the target's float lanes,
``O'`` rounded up to them) and ``OW'`` rounded up to the register tile when no good tile
divides ``OW``. TVM's default lowering of an NCHW conv is a scalar loop nest (26-64x
slower than ONNX Runtime on ResNet-18 / MobileNetV2); the kernel runs at 60-110 GFLOP/s
per AVX-512 core. Results stay channels last between convs, pooling and elementwise ops
(:mod:`tvmq.passes.channels_last`). The kernel is marked ``tirx.is_scheduled`` and opaque
to FuseOps (fusing the pad into it would recompute the pad ``KH * KW * O`` times).

A conv whose result is read only by ``add(conv, per-channel constant)`` (a bias, or a folded
batch norm), itself read only by a ``relu`` / ``clip``, gets a kernel that adds the bias and
clamps before storing (:class:`~tvmq.kernels.cpu_float_conv.ConvEpilogue`): the add and the
activation are not separate passes over the output any more.

A conv whose result is only converted to int32 and requantized (:class:`Int8AsFloat`'s
int8 convs on x86 CPUs without VNNI, followed by ``LowerInt8``'s requantize or dequantize:
:func:`find_requantized`) gets a kernel that does that before its store, as the VNNI
kernels do, rounding in the float -> int32 conversion where the weights bound the sums:
bit-identical, and the float32 sums never go to memory (MobileNetV2 int8 on a Zen 1 core,
1 thread: 26.2 -> 19.9 ms). A dequantize followed by a SiLU / hardswish and a quantize
(EfficientNet's, MobileNetV3's blocks) is requantized the same way, the activation between.
Where the int8 result is read only by the next Int8AsFloat conv, through ``astype(float32)``
and maybe a pad with the zero point, the kernel stores the integers as float32 and writes
that border itself (:func:`_float_readers`): no int8 tensor and no quantize / pad / convert
kernel between two convs, bit-identical (EfficientNet-B0 int8 39.5 -> 38.1 ms, MobileNetV2
20.4 -> 19.6, MobileNetV3-small 5.67 -> 5.47; Zen 1, 1 thread). A result dequantized for a
residual add (``astype`` then a subtract / multiply) stays int8, which the add's kernel
converts: a quarter of the bytes to write and read (on an AMD Zen 3 core, 1 thread, A/B,
bit-identical: ResNet-50 int8 1.02-1.11x, ResNet-18 1.017x, MobileNetV2 1.018x).

On AVX2 targets (:func:`~tvmq.passes.int8_as_int16.wants_int8_as_int16`) such a requantized
conv, direct and over an even number of channels, runs on the kernel's int16 mode instead
(exact ``vpmaddwd`` pair products, :meth:`_Lowering.takes_int16`): the image converted to
int16, or stored as int16 by the conv before it (``Requantize.stored_as``). Bit-identical
to the float32 kernel's sums (both exact below 2**24); on an AMD Zen 3 core, 1 thread,
ResNet-18 int8 31.6 -> 29.1 ms (its stride-2 and 1x1 convs; the 3x3 stride-1 ones stay on
Winograd), see the README for the others. A conv over an odd number of channels (an RGB stem,
stride 2) reads them in pairs along the width (:func:`fold_channels_into_width`) to take it
too: ResNet-18 int8 23.1 -> 21.5 ms, ResNet-50 65.7 -> 63.8 (Zen 3, 1 thread, bit-identical).

A 3x3 stride-1 conv of at least 32 input and output channels (ResNet's, UNet's, YOLO's
3x3 convs) takes Winograd's F(2x2, 3x3) instead (:mod:`tvmq.kernels.cpu_winograd`): an
input transform, 16 batched matmuls on the same register-blocked kernel (4/9 of the
multiply-adds) and an output transform that applies the same epilogue (bias, skip,
activation, requantize). ResNet-18 fp32 on a Zen 1 core (AVX2, 1 thread): 103 -> 67 ms,
outputs within 1.5e-6 (relative) of PyTorch's like the direct kernel's; int8 (Int8AsFloat,
requantized in the output transform) 102 -> 65 ms at the same SQNR vs fp32 (sums of
bytes stay exact below 2**22, see :func:`~tvmq.kernels.cpu_winograd.winograd_output`). An
Int8AsFloat conv whose int32 sum is read otherwise stays direct (:func:`find_integer_sums`);
``winograd=False`` keeps every conv direct.

A conv whose result (after that epilogue) is read only by a ``groups`` 1 conv that pads it
(a UNet double conv, a ResNet bottleneck's 1x1 -> 3x3) writes it zero-bordered, as the next
conv's padded input (``out_pad`` of :func:`~tvmq.kernels.cpu_float_conv.float_conv2d_nhwc`,
``_bordered`` kernels): that conv then pads nothing. UNet's nine such pads read and wrote
~50 MB a run (fp32 ~3% faster, bit-identical).

Depthwise convs (``groups == C``, one filter per channel) get their own NHWC kernel
(:func:`~tvmq.kernels.cpu_float_conv.float_depthwise_nhwc`, vectorized over channels),
so MobileNet-style blocks stay channels last too. Left alone: other grouped convs, other
layouts and dtypes, non-constant weights, symbolic shapes, a one-element reduction
(1x1 kernel over one channel). Where it belongs: with the other target kernels, after
quantization and before ``LegalizeOps``; a no-op on non-LLVM targets. After a rewrite no
float conv2d is left, so running the pass again changes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import NamedTuple

import numpy as np
import tvm
from tvm import relax

from tvmq.kernels.cpu_float_conv import (
    ConvEpilogue,
    ConvShape,
    choose_conv_tiles,
    choose_depthwise_tiles,
    choose_int16_tiles,
    float_conv2d_nhwc,
    float_depthwise_nhwc,
    pack_conv_weight,
    pack_conv_weight_pairs,
    pixel_major_pays,
    short_reduction,
    simd_lanes_and_registers,
)
from tvmq.kernels.cpu_float_conv_streamed import (
    float_conv2d_nhwc_streamed,
    streamed_chunk,
    streaming_pays,
)
from tvmq.kernels.cpu_winograd import (
    PANELS_ATTR,
    fused_tiles,
    int16_sums_fit,
    padded_input_hw,
    tiles_hw,
    winograd_fused,
    winograd_input,
    winograd_output,
    winograd_weight,
)
from tvmq.kernels.fast_math import ACTIVATIONS
from tvmq.kernels.x86_int8 import Requantize, with_int_rounding
from tvmq.kernels.x86_int8_conv import OPAQUE, Conv2DGeometry
from tvmq.kernels.x86_madd_intrin import LANES as INT16_LANES

from .channels_last import (
    TO_NCHW,
    ChannelsLastRewriter,
    is_depthwise,
    match_nchw_conv2d,
    rewrite_channels_last,
)
from .int8_as_int16 import wants_int8_as_int16
from .relax_utils import (
    ADD,
    ASTYPE,
    PAD,
    clip_bounds,
    dataflow_bindings,
    is_tensor_const,
    op_name,
    static_shape,
)
from .requantize_epilogue import ChannelAxis, activation_tail, requantize_chain

WINOGRAD_MIN_CHANNELS = 32
"""3x3 convs with fewer input or output channels stay direct: on a Zen 1 core (AVX2) a
16 -> 16 conv over 64x64 ran 0.93x as fast by Winograd, 32 -> 32 over 112x112 1.38x."""


class FloatEpilogue(NamedTuple):
    """What a float conv's kernel computes after its sum: the ops ``chain`` (their vars become
    the kernel's result), the ``bias (O,)`` and the :class:`ConvEpilogue`; with
    ``epilogue.residual``, ``residual`` is the tensor the kernel adds (a ResNet block's skip).
    For a requantize (:func:`find_requantized`) ``bias`` is ``(offset, multiplier)``."""

    chain: tuple[relax.Var, ...]
    bias: np.ndarray | tuple[np.ndarray, np.ndarray]
    epilogue: ConvEpilogue | Requantize
    residual: relax.Var | None = None
    # a requantize stored as float32 for a conv that reads it padded with the zero point:
    # the pad (top, left, bottom, right), the chain's last var being the padded value
    border: tuple[int, int, int, int] | None = None

    def without_residual(self) -> FloatEpilogue:
        """Only the bias (where the kernel cannot take the residual: a padded output)."""
        if self.residual is None:
            return self
        return FloatEpilogue(self.chain[:1], self.bias, ConvEpilogue())


Epilogues = dict[relax.Var, FloatEpilogue]  # conv var -> its fused epilogue


def match_float_conv2d(call: relax.Expr) -> tuple[relax.Expr, Conv2DGeometry, np.ndarray] | None:
    """(x, geometry, W as numpy OIHW) for a float32 NCHW conv2d this pass lowers (``groups``
    1, or depthwise), else None. ``x`` may be int16 where the conv's producer stores int16
    for it (:func:`_store_int16_for_int16_readers`)."""
    found = match_nchw_conv2d(call, ("float32", "int16"), "float32", "float32")
    if found is None:
        return None
    x, geo, w, groups = found
    if groups == 1:
        ok = w.shape[1] == geo.x_shape[1] and w.shape[1] * w.shape[2] * w.shape[3] >= 2
    else:
        ok = is_depthwise(geo, w, groups)  # other grouped convs are left alone
    return (x, geo, w) if ok else None


def find_epilogues(
    mod: tvm.IRModule, residual: bool = False, activations: bool = False
) -> Epilogues:
    """The float convs whose result only feeds ``add(conv, constant bias)``, and that sum
    only a ``relu`` / ``clip`` (the folded batch norm and activation of a CNN block): the
    kernel computes them too (:class:`~tvmq.kernels.cpu_float_conv.ConvEpilogue`). With
    ``residual``, a ``groups`` 1 conv's biased sum read only by an ``add`` of another tensor
    of its shape bound before the conv (a ResNet block's skip), then maybe a ``relu`` /
    ``clip``, gets that add too. With ``activations``, a sum read only by a SiLU or a
    hardswish (:func:`~tvmq.passes.requantize_epilogue.activation_tail`: as PyTorch exports
    them, ``sum * sigmoid(sum)``, or ONNX imports them) gets that."""
    found: Epilogues = {}
    bindings = list(dataflow_bindings(mod))
    position = {b.var: i for i, (b, _) in enumerate(bindings)}
    for i, (b, only_user) in enumerate(bindings):
        found_conv = match_float_conv2d(b.value)
        nxt = only_user(b.var) if found_conv is not None else None
        bias = _bias(nxt[1], b.var, found_conv[2].shape[0]) if nxt else None
        if bias is None:
            continue
        chain, skip = (nxt[0],), None
        if residual and int(b.value.attrs.groups) == 1:
            skip = _residual(only_user(nxt[0]), nxt[0], lambda v, i=i: position.get(v, -1) < i)
            chain = chain + (only_user(nxt[0])[0],) if skip is not None else chain
        epilogue = ConvEpilogue(residual=skip is not None)
        act = only_user(chain[-1])
        bounds = clip_bounds(act[1]) if act and isinstance(act[1], relax.Call) else None
        if bounds is not None and act[1].args[0].same_as(chain[-1]):
            chain, epilogue = chain + (act[0],), ConvEpilogue(*bounds, residual=skip is not None)
        elif activations:
            where = ChannelAxis(1, 4, found_conv[2].shape[0])  # NCHW: no reshape to look past
            ops = list(chain)
            if name := activation_tail(ops, where, only_user):
                chain = tuple(ops)
                epilogue = ConvEpilogue(residual=skip is not None, activation=name)
        found[b.var] = FloatEpilogue(chain, bias, epilogue, skip)
    return found


def find_requantized(mod: tvm.IRModule) -> dict[relax.Var, FloatEpilogue]:
    """The float convs whose result is only converted to int32 and requantized (or
    dequantized): :class:`Int8AsFloat`'s int8 convs, ``astype(conv(x_f32, W_f32), int32)``
    followed by ``LowerInt8``'s requantize (:func:`requantize_chain`). The kernel converts
    its exact integer sum and requantizes it before the store, as the VNNI kernels do: the
    float32 sums never go to memory, and the int8 result is a quarter of their bytes."""
    found = {}
    for b, only_user in dataflow_bindings(mod):
        conv = match_float_conv2d(b.value)
        cast = only_user(b.var) if conv is not None else None
        if cast is None or op_name(cast[1]) != ASTYPE or str(cast[1].attrs.dtype) != "int32":
            continue
        w = conv[2]
        where = ChannelAxis(1, 4, w.shape[0])
        rq = requantize_chain((b.var, cast[0]), where, only_user, quantize_activation=ACTIVATIONS)
        if rq is None:
            continue
        # rounded by the float -> int32 conversion where the weights bound the sums
        taps = w.reshape(w.shape[0], -1).T  # (K, O): each output channel's weights
        requantize = with_int_rounding(rq.requantize, taps, rq.offset, rq.multiplier)
        chain, border = rq.chain, None
        if requantize.dtype != "float32":
            readers, border = _float_readers(rq.chain[-1], requantize.zero_point, only_user)
            if readers:
                chain += readers
                requantize = dataclasses.replace(requantize, stored_as="float32")
        found[b.var] = FloatEpilogue(chain, (rq.offset, rq.multiplier), requantize, None, border)
    return found


def _store_int16_for_int16_readers(mod: tvm.IRModule, epilogues: Epilogues, lowering) -> None:
    """Where a requantized conv's result is stored as float32 for its one reader, a conv
    that reads int16 (``lowering.reads_int16``: the int16 kernel, direct or Winograd), store
    it as int16 instead, so no conversion goes between the two."""
    for b, only_user in dataflow_bindings(mod):
        fused = epilogues.get(b.var)
        if fused is None or getattr(fused.epilogue, "stored_as", "") != "float32":
            continue
        reader = only_user(fused.chain[-1])
        found = match_float_conv2d(reader[1]) if reader is not None else None
        if found is None or int(reader[1].attrs.groups) != 1:
            continue
        _, geo, w = found
        if lowering.reads_int16(geo, w, reader[0], epilogues.get(reader[0])):
            int16 = dataclasses.replace(fused.epilogue, stored_as="int16")
            epilogues[b.var] = fused._replace(epilogue=int16)


_DEQUANTIZING = ("relax.subtract", "relax.multiply")
"""Ops whose reading a requantized conv's ``astype(q, float32)`` makes it a dequantize (for a
residual add): the conv then stores ``q`` itself, a quarter of the bytes to write and read."""


def _float_readers(q: relax.Var, zero_point: int, only_user):
    """``((pad,) cast, border)`` where int8 ``q``'s only reader converts it to float32,
    ``astype(q, float32)`` (``border`` None), or pads it with its zero point first,
    ``astype(nn.pad(q, zero_point), float32)`` around H and W (``border`` the pad's
    (top, left, bottom, right)): Int8AsFloat's next conv. Else ``((), None)``."""
    nxt, border, vars_ = only_user(q), None, []
    if nxt is not None and op_name(nxt[1]) == PAD and str(nxt[1].attrs.pad_mode) == "constant":
        w = [int(v) for v in nxt[1].attrs.pad_width]
        if len(w) != 8 or any(w[:4]) or float(nxt[1].attrs.pad_value) != zero_point:
            return (), None
        border = (w[4], w[6], w[5], w[7])
        vars_.append(nxt[0])
        nxt = only_user(nxt[0])
    if nxt is None or op_name(nxt[1]) != ASTYPE or str(nxt[1].attrs.dtype) != "float32":
        return (), None
    after = only_user(nxt[0])
    if not vars_ and after is not None and op_name(after[1]) in _DEQUANTIZING:
        return (), None  # dequantized for a residual add: that kernel reads the int8 bytes
    return (*vars_, nxt[0]), border


def find_integer_sums(mod: tvm.IRModule) -> list[relax.Var]:
    """The float convs whose result is only converted to an integer type:
    :class:`Int8AsFloat`'s, whose float32 sums of bytes are exact integers up to ``2**24``
    (those not requantized in the kernel stay direct: their int32 sum goes on as it is)."""
    found = []
    for b, only_user in dataflow_bindings(mod):
        user = only_user(b.var) if match_float_conv2d(b.value) is not None else None
        if user is not None and op_name(user[1]) == ASTYPE and "int" in str(user[1].attrs.dtype):
            found.append(b.var)
    return found


def _residual(user, summed: relax.Var, defined) -> relax.Var | None:
    """The other operand of ``user = add(summed, r)`` (either order) when ``r`` is a float32
    var of ``summed``'s static shape that is ``defined`` before the conv, else None."""
    if user is None or op_name(user[1]) != ADD or len(user[1].args) != 2:
        return None
    a, b = user[1].args
    r = b if a.same_as(summed) else a if b.same_as(summed) else None
    if not isinstance(r, relax.Var) or r.same_as(summed) or not defined(r):
        return None
    shape = static_shape(summed)
    if shape is None or static_shape(r) != shape or str(r.ty.dtype) != "float32":
        return None
    return r


def _bias(call, conv: relax.Var, channels: int) -> np.ndarray | None:
    """The ``(O,)`` float32 bias of ``add(conv, c)`` / ``add(c, conv)`` with ``c`` a
    constant broadcast along the channel axis only, else None."""
    if not isinstance(call, relax.Call) or op_name(call) != ADD or len(call.args) != 2:
        return None
    a, b = call.args
    c = b if a.same_as(conv) else a if b.same_as(conv) else None
    if c is None or not is_tensor_const(c) or str(c.ty.dtype) != "float32":
        return None
    value = c.value.numpy()
    if value.ndim > 4 or value.size != channels:
        return None
    full = value.reshape((1,) * (4 - value.ndim) + value.shape)
    if full.shape != (1, channels, 1, 1):
        return None
    return np.ascontiguousarray(full.reshape(channels), dtype=np.float32)


class _Lowering:
    """The ``lower`` callback of :class:`ChannelsLastRewriter` for one target's SIMD width."""

    def __init__(
        self,
        lanes: int,
        registers: int,
        epilogues: Epilogues,
        stream: bool = True,
        exact: frozenset = frozenset(),
        winograd: bool = True,
        int16: bool = False,
    ):
        self.lanes, self.registers, self.epilogues = lanes, registers, epilogues
        self.int16 = int16  # requantized int8 convs may take the int16 kernel (AVX2)
        self.stream = stream  # whether the streamed kernel pays on this target
        self.exact = exact  # convs whose float32 sums must stay exact integers
        self.winograd = winograd
        # var -> the border its only reader, a padding conv, reads (find_bordered_outputs)
        self.wanted_borders: dict[relax.Var, tuple[int, int, int, int]] = {}

    def find_bordered_outputs(self, mod: tvm.IRModule) -> None:
        """Note the values that a conv's kernel can write zero-bordered: those read only by
        a ``groups`` 1 conv that pads them, with the border (top, left, bottom, right) that
        conv reads (its padding, and the columns a padded output width reads too)."""
        for b, only_user in dataflow_bindings(mod):
            found = match_float_conv2d(b.value)
            if found is None or int(b.value.attrs.groups) != 1 or only_user(found[0]) is None:
                continue
            x, geo, w = found
            if self._sampled_row(geo, w.shape[0], self.epilogues.get(b.var)) is not None:
                continue  # it reads its strided pixels, never a border
            if self.takes_winograd(geo, w.shape[0], b.var):
                border = winograd_padding(geo)
            else:
                tiles = self._conv_kernel(geo, w.shape[0], self.epilogues.get(b.var))[0]
                border = conv_input_padding(geo, tiles)
            if any(border):
                self.wanted_borders[x] = border

    def __call__(self, rw: ChannelsLastRewriter, call: relax.Expr) -> relax.Expr | None:
        found = match_float_conv2d(call)
        if found is None:
            return None
        x, geo, w = found
        c, ow, o = geo.x_shape[1], geo.out_hw[1], w.shape[0]
        fused = self.epilogues.get(rw.current_var)
        grouped = int(call.attrs.groups) != 1
        if str(x.ty.dtype) == "int16" and (
            grouped or not self.reads_int16(geo, w, rw.current_var, fused)
        ):
            raise RuntimeError(f"an int16 image reached a conv without the int16 kernel: {geo}")
        if grouped:
            chain, bias, epilogue = fused[:3] if fused else ((), None, None)  # never a residual
            activation = getattr(epilogue, "activation", "")
            tiles = choose_depthwise_tiles(ow, c, self.lanes, self.registers, activation)
            if tiles is None:
                return None
            w_hwc = np.ascontiguousarray(w[:, 0].transpose(1, 2, 0))
            geo, w_hwc, tiles, nhwc = wider_depthwise(
                rw, x, geo, w_hwc, tiles, self.lanes, self.registers, activation
            )
            lowered = lower_depthwise(
                rw, x, geo, w_hwc, tiles, bias, epilogue, nhwc=nhwc, channels=c
            )
            lowered = _bordered(rw, lowered, fused)
        elif self.takes_winograd(geo, o, rw.current_var):
            chain, bias, epilogue, residual = fused[:4] if fused else ((), None, None, None)
            int16 = self.takes_int16_winograd(w, fused)
            lowered = _emit_winograd(
                rw, x, geo, w, self.lanes, self.registers, bias, epilogue, residual, int16
            )
            lowered = _bordered(rw, lowered, fused)
        else:
            geo, w, nhwc, out_shape = self._direct_input(rw, x, geo, w, fused)
            ow = geo.out_hw[1]
            int16 = self.takes_int16(geo, o, fused)
            if int16:
                tiles, kernel, name = self._int16_kernel(geo, o)
            else:
                tiles, kernel, name = self._conv_kernel(geo, o, fused)
            padded = (tiles.ow_padded, tiles.o_padded) != (ow, o)
            if fused is not None and fused.residual is not None and padded:  # R would be too
                fused = fused.without_residual()
            chain, bias, epilogue, residual = fused[:4] if fused else ((), None, None, None)
            pack = pack_conv_weight_pairs if int16 else pack_conv_weight
            packed = pack(w, tiles.lanes, tiles.o_padded)
            border = self.wanted_borders.get(chain[-1] if chain else rw.current_var)
            if isinstance(epilogue, Requantize):  # its padding is the zero point, not 0
                border = fused.border
            if padded or name not in ("float_conv2d", "int16_conv2d") or out_shape:
                border = None  # (one row of pixels: a border is padded after, by _bordered)
            lowered = _emit(
                rw, x, geo, packed, tiles, tiles.o_padded, o, kernel, name, bias, epilogue,
                residual=residual, out_pad=border, nhwc=nhwc,
                in_dtype="int16" if int16 else None,
            )  # fmt: skip
            if out_shape is not None:  # one row of pixels back to the image's rows
                y = rw.builder_.emit(relax.op.reshape(lowered.args[0], out_shape))
                lowered = relax.op.permute_dims(y, TO_NCHW)
            if border is None:
                lowered = _bordered(rw, lowered, fused)
        for var in chain:  # the bias add and activation are this kernel's result now
            rw.aliases[var] = rw.current_var
        return lowered

    def _direct_input(self, rw, x, geo: Conv2DGeometry, w: np.ndarray, fused):
        """``(geometry, OIHW weight, NHWC input or None, NHWC output shape or None)`` of a
        direct conv as its kernel computes it: an image's channels in pairs along its width
        for the int16 kernel (:func:`fold_channels_into_width`), or a 1x1 conv's pixels in
        one row where fewer of them are padding to the register tile (ResNet-50's 14x14
        stage on the int16 kernel: 6x2 tiles over a padded copy of 18 pixels a row, 4x2
        over 196 in one row; 1024 -> 256 alone on a Zen 3 core 930 -> 750 us), after a
        strided 1x1 conv's pixels are sliced out (:func:`subsampled`). Nones where the conv
        reads and writes ``x`` as it is."""
        n, c, h, wd = geo.x_shape
        o = w.shape[0]
        folded = fold_channels_into_width(geo, w) if self.int16 else None
        if folded is not None and self.takes_int16(folded[0], o, fused):
            n, _, h, pairs = folded[0].x_shape
            nhwc = rw.builder_.emit(relax.op.reshape(rw.nhwc_input(x), (n, h, pairs, 2)))
            return *folded, nhwc, None
        sampled = self._sampled_row(geo, o, fused)
        if sampled is None and not self._pays_as_row(geo, o, fused):
            return geo, w, None, None
        image = rw.nhwc_input(x)
        if sampled is not None:  # a strided 1x1 conv: its pixels first, then one row
            image = rw.builder_.emit(
                relax.op.strided_slice(image, [1, 2], [0, 0], [h, wd], geo.strides)
            )
            geo, (n, c, h, wd) = sampled, sampled.x_shape
        nhwc = rw.builder_.emit(relax.op.reshape(image, (n, 1, h * wd, c)))
        return one_row(geo), w, nhwc, (n, h, wd, o)

    def _pays_as_row(self, geo: Conv2DGeometry, o: int, fused) -> bool:
        """Whether a conv takes :func:`one_row`: rows whose tile is exact pad nothing, so
        they stay (and may write their reader's border); one row is taken only where it
        pads fewer pixels than the rows do."""
        row = one_row(geo)
        if row is None:
            return False
        _, _, h, wd = geo.x_shape
        ow = geo.out_hw[1]
        return (
            self._tiles(row, o, fused).ow_padded * ow
            < self._tiles(geo, o, fused).ow_padded * h * wd
        )

    def _sampled_row(self, geo: Conv2DGeometry, o: int, fused) -> Conv2DGeometry | None:
        """A strided 1x1 conv's :func:`subsampled` geometry where it then takes one row
        (ResNet-50's 28x28 -> 14x14 downsample on the int16 kernel: the strided pixels make
        a copy of 196 for a 4x2 tile instead of a padded one of 18 a row for 6x2, 512 ->
        1024 alone on a Zen 3 core 2730 -> 1904 us); None where it reads its input as it is
        (where the rows' tile is exact the strided reads cost no more than the copy)."""
        sampled = subsampled(geo)
        return sampled if sampled is not None and self._pays_as_row(sampled, o, fused) else None

    def _tiles(self, geo: Conv2DGeometry, o: int, fused):
        """The register tile a direct conv's kernel takes."""
        if self.takes_int16(geo, o, fused):
            return self._int16_kernel(geo, o)[0]
        return self._conv_kernel(geo, o, fused)[0]

    def takes_winograd(self, geo: Conv2DGeometry, o: int, conv: relax.Var) -> bool:
        """Whether a ``groups`` 1 conv with ``o`` output channels takes the Winograd kernels:
        3x3, stride 1, undilated, at least :data:`WINOGRAD_MIN_CHANNELS` input and output
        channels in whole vectors, and not one whose int32 sum goes on unrequantized
        (``self.exact``)."""
        c = geo.x_shape[1]
        return (
            self.winograd
            and (geo.kernel, geo.strides, geo.dilation) == ((3, 3), (1, 1), (1, 1))
            and min(c, o) >= WINOGRAD_MIN_CHANNELS
            and c % self.lanes == 0
            and o % self.lanes == 0
            and conv not in self.exact
        )

    def takes_int16(self, geo: Conv2DGeometry, o: int, fused: FloatEpilogue | None) -> bool:
        """Whether a direct ``groups`` 1 conv takes the int16 kernel: an int8 conv of
        :class:`Int8AsFloat` requantized in its kernel, on an AVX2 target
        (:func:`~tvmq.passes.int8_as_int16.wants_int8_as_int16`), over an even number of
        input channels and at least one vector of output channels."""
        requantized = fused is not None and isinstance(fused.epilogue, Requantize)
        c, taps = geo.x_shape[1], geo.kernel[0] * geo.kernel[1]
        pairs = c % 2 == 0 and c // 2 * taps >= 2  # a reduction of one pair: a scale
        return self.int16 and requantized and pairs and o >= self.lanes

    def takes_int16_winograd(self, w: np.ndarray, fused: FloatEpilogue | None) -> bool:
        """Whether a requantized conv that takes Winograd (on an AVX2 target) runs its
        matmuls on the int16 kernel: its transformed input as int16, ``4 U`` as int16
        panels, the sums int32 (where they cannot overflow, :func:`int16_sums_fit`)."""
        requantized = fused is not None and isinstance(fused.epilogue, Requantize)
        return self.int16 and requantized and w.shape[1] % 2 == 0 and int16_sums_fit(w)

    def reads_int16(self, geo: Conv2DGeometry, w: np.ndarray, conv, fused) -> bool:
        """Whether a ``groups`` 1 conv's kernel reads an int16 image: the int16 direct
        kernel, or the int16 Winograd route's input transform."""
        if self.takes_winograd(geo, w.shape[0], conv):
            return self.takes_int16_winograd(w, fused)
        return self.takes_int16(geo, w.shape[0], fused)

    def _int16_kernel(self, geo: Conv2DGeometry, o: int):
        """``(tiles, kernel, name)`` of the int16 conv kernel (see :meth:`takes_int16`)."""
        tiles = choose_int16_tiles(geo.out_hw[1], o)
        kernel = functools.partial(float_conv2d_nhwc, int16=True)
        if pixel_major_pays(geo.kernel, 2 * tiles.o_padded * geo.k):
            kernel = functools.partial(kernel, pixel_major=True)
        return tiles, kernel, "int16_conv2d"

    def _conv_kernel(self, geo: Conv2DGeometry, o: int, fused: FloatEpilogue | None):
        """``(tiles, kernel, name)`` for a ``groups`` 1 conv with ``o`` output channels (and
        the ``fused`` epilogue): the streamed kernel where its weights stream from memory and
        streaming pays on the target (its epilogue a pass of its own, so no registers kept for
        it; never a requantize), else the register-blocked one, pixel-major where that pays."""
        requantize = fused is not None and isinstance(fused.epilogue, Requantize)
        c, ow = geo.x_shape[1], geo.out_hw[1]
        # A few output channels (a segmentation head's classes) take the narrowest vector
        # that holds them, not 16 lanes of which 14 are padding (UNet's 32 -> 2 over
        # 224x224 computed and stored 8x its output).
        lanes = self.lanes if o >= self.lanes else max(4, 1 << (o - 1).bit_length())
        plain = choose_conv_tiles(ow, o, lanes, self.registers)
        pixels = geo.x_shape[0] * geo.out_hw[0] * plain.ow_padded
        kc = streamed_chunk(pixels, c, geo.kernel[0] * geo.kernel[1], plain.o_padded)
        if kc is not None and self.stream and not requantize:
            kernel = lambda shape, t, e=None: float_conv2d_nhwc_streamed(shape, t, kc, e)  # noqa: E731
            return plain, kernel, "float_conv2d_streamed"
        short = short_reduction(c, *geo.kernel)
        tiles = choose_conv_tiles(
            ow, o, lanes, self.registers, epilogue=fused is not None, short=short
        )
        kernel = float_conv2d_nhwc
        if pixel_major_pays(geo.kernel, 4 * tiles.o_padded * geo.k):
            kernel = functools.partial(float_conv2d_nhwc, pixel_major=True)
        return tiles, kernel, "float_conv2d"


def one_row(geo: Conv2DGeometry) -> Conv2DGeometry | None:
    """A 1x1, stride-1, unpadded conv over ``H`` rows of ``W`` pixels as the same conv over
    one row of ``H * W`` (a reshape of the NHWC image either side); None for other convs."""
    n, c, h, wd = geo.x_shape
    if h == 1 or (geo.kernel, geo.strides, geo.padding) != ((1, 1), (1, 1), (0, 0, 0, 0)):
        return None
    return Conv2DGeometry((n, c, 1, h * wd), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1))


def subsampled(geo: Conv2DGeometry) -> Conv2DGeometry | None:
    """A 1x1 unpadded conv of stride ``(SH, SW)`` (not 1x1) as a stride-1 one over the
    pixels it reads, ``x[:, :, ::SH, ::SW]`` (a ResNet downsample); None for other convs."""
    n, c, _, _ = geo.x_shape
    if (geo.kernel, geo.padding, geo.dilation) != ((1, 1), (0, 0, 0, 0), (1, 1)):
        return None
    if geo.strides == (1, 1):
        return None
    return Conv2DGeometry((n, c, *geo.out_hw), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1))


def fold_channels_into_width(
    geo: Conv2DGeometry, w: np.ndarray
) -> tuple[Conv2DGeometry, np.ndarray] | None:
    """An odd number of channels ``C`` (an RGB image's) read as pairs along the width: the
    same conv over the NHWC image reshaped to ``(N, H, W * C / 2, 2)``, with ``KW * C``
    taps a row (rounded up to pairs, the last weight 0) and stride ``SW * C / 2``, so that
    a stem conv takes the int16 kernel's pair products (``(geometry, OIHW weight)``).

    ResNet's 7x7 / 2 stem over RGB: 11 pairs a row for 21 products (147 -> 154 a pixel).
    None where the width does not split into whole pairs (``SW * C``, ``W * C`` or a
    padding times ``C`` odd, dilation), for an even ``C`` (pairs already), or where the
    folded conv would give more output columns."""
    n, c, h, wd = geo.x_shape
    (kh, kw), (sh, sw) = geo.kernel, geo.strides
    top, left, bottom, right = geo.padding
    if c % 2 == 0 or geo.dilation != (1, 1) or any(v * c % 2 for v in (sw, wd, left, right)):
        return None
    taps = -(-kw * c // 2)  # pairs a kernel row
    stride = sw * c // 2
    # the last output's last pair may lie past the padded row: only its 0 weight reads there
    width = (wd + left + right) * c // 2
    right = right * c // 2 + max(0, (geo.out_hw[1] - 1) * stride + taps - width)
    folded = Conv2DGeometry(
        (n, 2, h, wd * c // 2),
        (kh, taps),
        (sh, stride),
        (top, left * c // 2, bottom, right),
        (1, 1),
    )
    if folded.out_hw != geo.out_hw:
        return None
    o = w.shape[0]
    rows = np.zeros((o, kh, 2 * taps), w.dtype)  # (o, kh, kw * C + c), then a 0
    rows[:, :, : kw * c] = w.transpose(0, 2, 3, 1).reshape(o, kh, kw * c)
    return folded, np.ascontiguousarray(rows.reshape(o, kh, taps, 2).transpose(0, 3, 1, 2))


def winograd_padding(geo: Conv2DGeometry) -> tuple[int, int, int, int]:
    """The zeros (top, left, bottom, right) around a conv's NHWC input that the Winograd
    input transform reads: the conv's padding, then whole 4x4 patches at the bottom and
    right (one more row / column for an odd output height / width)."""
    _, _, h, wd = geo.x_shape
    hp, wp = padded_input_hw(*geo.out_hw)
    top, left = geo.padding[:2]
    return top, left, hp - h - top, wp - wd - left


def _emit_winograd(
    rw, x, geo, w, lanes, registers, bias, epilogue, residual, int16=False
) -> relax.Expr:
    """pad -> input transform -> 16 matmuls -> output transform (and the ``epilogue``) ->
    NCHW value, for a 3x3 stride-1 conv with the OIHW weight ``w``
    (:mod:`tvmq.kernels.cpu_winograd`); with ``int16`` the matmuls on the int16 kernel
    (:meth:`_Lowering.takes_int16_winograd`)."""
    bb = rw.builder_
    n, c, _, _ = geo.x_shape
    oh, ow, o = *geo.out_hw, w.shape[0]
    th, tw = tiles_hw(oh, ow)
    x = _padded_input(rw, x, winograd_padding(geo))
    if int16 and str(x.ty.dtype) == "float32" and _fusable(rw, x):
        # integers as float32 from a pad / concat / cast: that kernel writes them as int16
        # instead, half the bytes to write and to read in the transform (UNet's decoder)
        x = bb.emit(relax.op.astype(x, "int16"))
    hp, wp = (int(d) for d in x.ty.shape.values[1:3])
    plan = fused_tiles(th, tw, c, o, lanes, registers, int16)
    if plan is not None:  # large images: the three stages a band of tiles at a time
        return _emit_fused_winograd(rw, x, geo, w, plan, bias, epilogue, residual, int16)
    if int16:
        tiles = choose_int16_tiles(th * tw, o)
    else:
        tiles = choose_conv_tiles(th * tw, o, lanes, registers)
    t_padded = tiles.ow_padded
    gemm = ConvShape(16, n, t_padded, c, (1, 1), (1, 1), (1, 1), n)
    p_dtype, v_dtype, sum_dtype = (
        str(x.ty.dtype),
        *(("int16", "int32") if int16 else ("float32",) * 2),
    )
    kind = "int16_" if int16 else ""

    def opaque(build):
        return lambda: build().with_attr("op_pattern", OPAQUE)

    transform = rw.kernel_var(
        ("winograd_input", n, hp, wp, c, th, tw, t_padded, lanes, p_dtype, v_dtype),
        f"tvmq_winograd_input_{kind}{c}",
        opaque(lambda: winograd_input(n, hp, wp, c, th, tw, t_padded, lanes, p_dtype, v_dtype)),
    )
    # pixel-major as a 1x1 conv's (ResNet-18's 56x56 64 -> 64: 3.54 -> 2.99 ms a call, Zen 1)
    pixel_major = pixel_major_pays((1, 1), (2 if int16 else 4) * c * tiles.o_padded)
    matmul = rw.kernel_var(
        ("winograd_matmul", gemm, tiles, pixel_major, int16),
        f"tvmq_winograd_matmul_3x3_{kind}{c}x{o}",
        opaque(
            lambda: float_conv2d_nhwc(
                gemm, tiles, batched_weight=True, pixel_major=pixel_major, int16=int16
            ).with_attr(PANELS_ATTR, True)
        ),
    )
    suffix = _kernel_suffix(epilogue, residual)
    inverse = rw.kernel_var(
        ("winograd_output", n, th, tw, tiles, oh, ow, o, epilogue, sum_dtype),
        f"tvmq_winograd_output_3x3_{kind}{c}x{o}{suffix}",
        opaque(
            lambda: winograd_output(
                n, th, tw, t_padded, tiles.o_padded, oh, ow, o, lanes, epilogue, sum_dtype
            )
        ),
    )
    v_ty = relax.TensorType((16, n, t_padded, c), v_dtype)
    v = bb.emit(relax.call_tir(transform, [x], v_ty))
    u = relax.const(winograd_weight(w, lanes, tiles.o_padded, int16=int16))
    m_ty = relax.TensorType((16, n, t_padded, tiles.o_padded), sum_dtype)
    m = bb.emit(relax.call_tir(matmul, [v, u], m_ty))
    return _winograd_result(rw, inverse, [m], geo, o, bias, epilogue, residual, sum_dtype)


def _winograd_result(rw, kernel, head, geo, o, bias, epilogue, residual, sum_dtype) -> relax.Expr:
    """The NCHW value of the Winograd ``kernel`` that stores a conv's result: called on the
    ``head`` arguments, then the epilogue's constants [and the residual]."""
    n, (oh, ow) = geo.x_shape[0], geo.out_hw
    args = [*head, *_epilogue_constants(bias, epilogue, o, sum_dtype)]
    if residual is not None:
        args.append(rw.nhwc_input(rw.visit_expr(residual)))
    out_dtype = epilogue.out_dtype if isinstance(epilogue, Requantize) else "float32"
    out_ty = relax.TensorType((n, oh, ow, o), out_dtype)
    y = rw.builder_.emit(relax.call_tir(kernel, args, out_ty))
    return relax.op.permute_dims(y, TO_NCHW)


def _emit_fused_winograd(rw, x, geo, w, plan, bias, epilogue, residual, int16) -> relax.Expr:
    """:func:`_emit_winograd`'s kernels as one :func:`winograd_fused` kernel, with `plan`
    its ``(register tile, band)`` (:func:`fused_tiles`)."""
    tiles, band = plan
    n, c, _, _ = geo.x_shape
    oh, ow, o = *geo.out_hw, w.shape[0]
    hp, wp = (int(d) for d in x.ty.shape.values[1:3])
    p_dtype = str(x.ty.dtype)
    kind = "int16_" if int16 else ""
    key = ("winograd_fused", n, hp, wp, c, oh, ow, o, tiles, band, epilogue, p_dtype, int16)
    kernel = rw.kernel_var(
        key,
        f"tvmq_winograd_fused_3x3_{kind}{c}x{o}{_kernel_suffix(epilogue, residual)}",
        lambda: (
            winograd_fused(n, hp, wp, c, oh, ow, o, tiles, band, epilogue, p_dtype, int16)
            .with_attr(PANELS_ATTR, True)
            .with_attr("op_pattern", OPAQUE)
        ),
    )
    u = relax.const(winograd_weight(w, tiles.lanes, tiles.o_padded, int16=int16))
    sum_dtype = "int32" if int16 else "float32"
    return _winograd_result(rw, kernel, [x, u], geo, o, bias, epilogue, residual, sum_dtype)


def _fusable(rw, x: relax.Expr) -> bool:
    """Whether ``x`` is computed by a Relax op (a pad, concat, cast...) that an ``astype``
    after it fuses into, not by a kernel of tvmq's (``call_tir``, opaque)."""
    value = rw.lookup_binding(x) if isinstance(x, relax.Var) else None
    op = value.op if isinstance(value, relax.Call) else None
    return isinstance(op, tvm.ir.Op) and op.name != "relax.call_tir"


def _bordered(rw, lowered: relax.Expr, fused: FloatEpilogue | None) -> relax.Expr:
    """``lowered`` (``permute_dims(y, TO_NCHW)``) with the zero-point border that ``fused``
    promises its readers (:func:`_float_readers`) where the kernel did not write it: a pad
    of the float32 result."""
    if fused is None or fused.border is None:
        return lowered
    top, left, bottom, right = fused.border
    y, zero = lowered.args[0], float(fused.epilogue.zero_point)
    pad = [0, 0, top, bottom, left, right, 0, 0]
    padded = rw.builder_.emit(relax.op.nn.pad(y, pad, "constant", zero))
    return relax.op.permute_dims(padded, TO_NCHW)


def _padded_input(rw, x, border: tuple[int, int, int, int], nhwc=None) -> relax.Expr:
    """``x`` (NCHW) as the NHWC image with ``border`` zeros around it: the producer's
    bordered output where it wrote this border, else a pad (of ``nhwc`` if given: ``x``
    channels last)."""
    top, left, bottom, right = border
    x = rw.nhwc_input(x) if nhwc is None else nhwc
    bordered = rw.bordered.get(x)
    if bordered is not None and bordered[1] == border:
        return bordered[0]  # the producer wrote it with this border
    if any(border):
        return rw.builder_.emit(relax.op.nn.pad(x, [0, 0, top, bottom, left, right, 0, 0]))
    return x


def _epilogue_constants(bias, epilogue, channels: int, sum_dtype="float32") -> list[relax.Expr]:
    """A conv kernel's epilogue arguments, zero-padded to ``channels``: ``offset`` (of the
    kernel's ``sum_dtype``) and ``multiplier`` float32 for a requantize (``bias`` the pair),
    else the float32 bias."""
    if epilogue is None:
        return []
    values = bias if isinstance(epilogue, Requantize) else (bias,)
    dtypes = (sum_dtype, "float32") if isinstance(epilogue, Requantize) else ("float32",)
    return [
        relax.const(np.pad(v, (0, channels - len(v))).astype(dtype), dtype)
        for v, dtype in zip(values, dtypes, strict=True)
    ]


def _kernel_suffix(epilogue, residual) -> str:
    """What a conv kernel's name says about its epilogue."""
    if isinstance(epilogue, Requantize):
        return epilogue.kernel_suffix
    suffix = "" if epilogue is None else "_bias" if epilogue == ConvEpilogue() else "_bias_act"
    if isinstance(epilogue, ConvEpilogue) and epilogue.activation:
        suffix = f"_bias_{epilogue.activation}"
    if residual is not None:
        suffix = "_bias_residual" + ("_act" if epilogue != ConvEpilogue(residual=True) else "")
    return suffix


def lower_depthwise(
    rw,
    x,
    geo,
    w_hwc: np.ndarray,
    tiles,
    bias=None,
    epilogue=None,
    bf16_out: bool = False,
    pad_value: float = 0.0,
    nhwc: relax.Expr | None = None,
    channels: int | None = None,
    out_pad: tuple[int, int, int, int] | None = None,
) -> relax.Expr:
    """Emit the NHWC depthwise kernel for ``x`` (float32, bf16 bits as uint16, uint8 or int8;
    ``w_hwc`` (KH, KW, C) of float32 or int8) and return its NCHW value; float data may take
    a ``bias`` (C,) and a :class:`ConvEpilogue`, int8 ``bias = (offset, multiplier)`` and a
    ``Requantize``.
    ``bf16_out``: a float32 result stored as bf16 bits (uint16). ``pad_value``: what the
    conv's padding holds (an int8 model's zero point; the kernel reads it in the taps there).
    ``nhwc``: ``x`` channels last with zero channels after its own (``geo`` and ``w_hwc``
    those of all of them), of which the result keeps the first ``channels``. ``out_pad``: the
    kernel writes its requantized result with this zero border (``rw.bordered``; the caller
    checked that the output needs no padding)."""
    x_dtype = str(x.ty.dtype)
    c = geo.x_shape[1]

    def kernel(shape, t, e, pad=None, out_pad=None):
        return float_depthwise_nhwc(shape, t, x_dtype, e, pad, bf16_out, pad_value, out_pad)

    name = "int8_depthwise" if x_dtype in ("uint8", "int8") else "float_depthwise"
    name += "_bf16" * (x_dtype == "uint16") + "_to_bf16" * bf16_out
    if pad_value:  # a kernel name: "_zp11", "_zpm3"
        name += f"_zp{int(pad_value)}".replace("-", "m")
    out_dtype = "uint16" if bf16_out else None
    return _emit(
        rw, x, geo, w_hwc, tiles, c, channels or c, kernel, name, bias, epilogue,
        in_kernel_pad=True, out_pad=out_pad, out_dtype=out_dtype, nhwc=nhwc,
    )  # fmt: skip


def conv_input_padding(geo: Conv2DGeometry, tiles) -> tuple[int, int, int, int]:
    """The zeros (top, left, bottom, right) around a conv's NHWC input that its kernel
    reads: its padding, and on the right the columns a padded output width reads too."""
    top, left, bottom, right = geo.padding
    sw, dw, kw, wd = geo.strides[1], geo.dilation[1], geo.kernel[1], geo.x_shape[3]
    right += max(0, (tiles.ow_padded - 1) * sw + (kw - 1) * dw + 1 - (wd + left + right))
    return top, left, bottom, right


def _emit(
    rw,
    x,
    geo,
    packed,
    tiles,
    o_padded,
    o,
    kernel,
    name,
    bias,
    epilogue,
    in_kernel_pad=False,
    residual=None,
    out_pad=None,
    out_dtype=None,
    nhwc=None,
    in_dtype=None,
) -> relax.Expr:
    """pad -> call_tir(kernel) -> slice -> NCHW value, for a conv with ``packed`` weights
    (and, with an ``epilogue``, its ``bias`` added [, ``residual`` added] and activation
    applied in the kernel). ``in_kernel_pad``: the kernel takes the unpadded image and the
    padding (no pad op). With ``out_pad`` the kernel writes its result zero-bordered for the
    next conv (``rw.bordered``, which then pads nothing). ``out_dtype``: what the kernel
    stores, where that is not its sums' or its requantize's. ``nhwc``: ``x`` channels last
    (``geo``'s channels), in place of its twin. ``in_dtype``: the image the kernel reads,
    converted to it where ``x`` holds another dtype (int16 kernels: integers as float32)."""
    bb = rw.builder_
    n, c, h, wd = geo.x_shape
    oh, ow = geo.out_hw
    kh, kw = geo.kernel
    top, left, bottom, right = conv_input_padding(geo, tiles)
    pad = (top, left, bottom, right) if in_kernel_pad and (top or left or bottom or right) else None
    if pad is None:
        x = _padded_input(rw, x, (top, left, bottom, right), nhwc)
    else:
        x = rw.nhwc_input(x) if nhwc is None else nhwc
    if in_dtype is not None and str(x.ty.dtype) != in_dtype:
        x = bb.emit(relax.op.astype(x, in_dtype))
    shape = ConvShape(
        n, h + top + bottom, wd + left + right, c, geo.kernel, geo.strides, geo.dilation, oh
    )
    sum_dtype = "float32" if packed.dtype == np.float32 else "int32"  # int8 / int16 weights
    suffix = _kernel_suffix(epilogue, residual)
    if out_dtype is None:
        out_dtype = epilogue.out_dtype if isinstance(epilogue, Requantize) else sum_dtype
    if out_pad is not None:
        suffix += "_bordered"
        kernel = functools.partial(kernel, out_pad=out_pad)
    fn = rw.kernel_var(
        (name, shape, tiles, str(x.ty.dtype), epilogue, pad, out_pad),
        f"tvmq_{name}_nhwc_{kh}x{kw}_{c}x{o}{suffix}",
        lambda: (
            kernel(shape, tiles, epilogue, pad) if pad else kernel(shape, tiles, epilogue)
        ).with_attr("op_pattern", OPAQUE),
    )
    out_ty = relax.TensorType((n, oh, tiles.ow_padded, o_padded), out_dtype)
    if out_pad is not None:  # the caller checked that the output needs no padding
        t, left_, b, r = out_pad
        out_ty = relax.TensorType((n, t + oh + b, left_ + ow + r, o), out_dtype)
    args = [x, relax.const(packed, str(packed.dtype))]
    args += _epilogue_constants(bias, epilogue, o_padded, sum_dtype)
    if residual is not None:  # the caller checked that the output needs no padding
        r = rw.nhwc_input(rw.visit_expr(residual))
        if static_shape(r) != (n, oh, ow, o):  # a 1x1 conv's pixels in one row (one_row)
            r = bb.emit(relax.op.reshape(r, (n, oh, ow, o)))
        args.append(r)
    y = bb.emit(relax.call_tir(fn, args, out_ty=out_ty))
    if out_pad is not None and isinstance(epilogue, Requantize) and epilogue.stored_as:
        return relax.op.permute_dims(y, TO_NCHW)  # the padded value is what its readers read
    if out_pad is not None:
        t, left_ = out_pad[:2]
        bordered = y
        y = bb.emit(
            relax.op.strided_slice(y, axes=[1, 2], begin=[t, left_], end=[t + oh, left_ + ow])
        )
        rw.bordered[y] = (bordered, out_pad)
    elif tiles.ow_padded != ow or o_padded != o:
        full = y
        y = bb.emit(relax.op.strided_slice(y, axes=[2, 3], begin=[0, 0], end=[ow, o]))
        if tiles.ow_padded == ow and residual is None and _zero_for_zero(epilogue, out_dtype):
            rw.channel_padded[y] = full
    return relax.op.permute_dims(y, TO_NCHW)


def _zero_for_zero(epilogue, out_dtype: str) -> bool:
    """Whether a float kernel stores 0 for a zero sum (so its channels padded with zero
    weights and bias hold zeros): no requantize (its zero point), bounds around 0."""
    if out_dtype != "float32" or isinstance(epilogue, Requantize):
        return False
    return epilogue is None or (not epilogue.residual and epilogue.lo <= 0.0 <= epilogue.hi)


def wider_depthwise(
    rw, x, geo, w_hwc: np.ndarray, tiles, lanes: int, registers: int, activation=""
):
    """``(geo, w_hwc, tiles, nhwc)`` for a depthwise conv of ``x`` whose producer's kernel
    stored whole vectors of channels (``rw.channel_padded``) that ``tiles`` does not fill:
    the conv over all of them (zero weights for the padded ones, whose values then do not
    matter: each output channel reads only its own), their tiles and the padded result
    ``nhwc`` (for :func:`lower_depthwise`); else as given, ``nhwc`` None. MobileNetV3's 72
    and 88 channels: 16-lane vectors over 80 and 96 instead of 8-lane ones, and no copy of
    the producer's result without its padding (47 us of 1.7 ms for the 56x56x72 fp32 one)."""
    twin = rw.nhwc.get(x) if isinstance(x, relax.Var) else None
    full = rw.channel_padded.get(twin) if twin is not None else None
    if full is None:
        return geo, w_hwc, tiles, None
    n, c, h, w = geo.x_shape
    cp = static_shape(full)[3]
    wide = choose_depthwise_tiles(geo.out_hw[1], cp, lanes, registers, activation)
    if wide is None or wide.lanes <= tiles.lanes:
        return geo, w_hwc, tiles, None
    padded = np.pad(w_hwc, ((0, 0), (0, 0), (0, cp - c)))
    return dataclasses.replace(geo, x_shape=(n, cp, h, w)), padded, wide, full


@tvm.transform.module_pass(opt_level=0, name="PackFloatConv")
class PackFloatConv:
    """Lower float32 ``conv2d(x, const W)`` (``groups`` 1, NCHW) to tvmq's NHWC kernel.

    Parameters
    ----------
    target : tvm.target.Target or dict or str, optional
        The build target. Defaults to ``tvm.target.Target.current()`` when the pass runs;
        with neither, or on a target without a CPU SIMD unit, the pass is a no-op.
    winograd : bool
        Whether 3x3 stride-1 convs may take the Winograd F(2x2, 3x3) kernels
        (:meth:`_Lowering.takes_winograd`); False keeps every conv on the direct kernel.
    int16 : bool
        Whether requantized int8 convs (:class:`Int8AsFloat`'s) may take the int16 kernel on
        AVX2 targets (:meth:`_Lowering.takes_int16`); False keeps them on the float one.
    """

    def __init__(
        self,
        target: tvm.target.Target | dict | str | None = None,
        winograd: bool = True,
        int16: bool = True,
    ):
        self.target = tvm.target.Target(target) if target is not None else None
        self.winograd, self.int16 = winograd, int16

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        simd = simd_lanes_and_registers(self.target)
        if simd is None:
            return mod
        requantized = find_requantized(mod)
        epilogues = {**find_epilogues(mod, residual=True, activations=True), **requantized}
        target = self.target or tvm.target.Target.current(allow_none=True)
        lowering = _Lowering(
            *simd,
            epilogues,
            stream=streaming_pays(self.target),
            exact=frozenset(find_integer_sums(mod)) - requantized.keys(),
            winograd=self.winograd,
            int16=self.int16 and simd[0] == INT16_LANES and wants_int8_as_int16(target),
        )
        if lowering.int16:
            _store_int16_for_int16_readers(mod, epilogues, lowering)
        with self.target or contextlib.nullcontext():  # tiles follow the target's CPU
            lowering.find_bordered_outputs(mod)
            return rewrite_channels_last(mod, lowering)
