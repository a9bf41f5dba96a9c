"""PackBf16ConvX86: float32 convs on bf16 AMX tiles, read from their padded input (``precision="bf16"``).

Rewrites, when the target has ``amx-bf16``, a float32 NCHW ``conv2d(x, const W)`` that
:func:`~tvmq.kernels.x86_amx_bf16.bf16_conv_applies` takes (``groups`` 1, stride 1, no
dilation, ``C`` a multiple of 32) into::

    xb = call_tir(to_bf16_padded, x as NHWC)   # (N, Hp, Wp, C) bf16 bits: the padding and the
                                                # rounding in one pass
    y = call_tir(bf16_conv_amx, xb, W as packed bf16[, bias])   # (N*OH*OW, O') float32

with the kernel reading each tap of 32 channels straight into the tiles (no im2col, see
:mod:`tvmq.kernels.x86_amx_conv`). Any other ``groups`` 1 conv of two tiles of output pixels
or more (strided, dilated, channels off 32: an RGB stem) takes ``bf16_conv_amx_gathered``,
which im2cols each block of output pixels into a panel in cache before the tiles read it:
ResNet-18's 7x7 stem and strided convs, left to the float32 kernels, were half of its bf16
time (3.7 of 7.6 ms on one thread). A bias add (a folded batch norm) and a ReLU / clip, SiLU
or hardswish after the conv, and a ResNet block's skip added to its sum
(``find_epilogues(residual=True, activations=True)``: the float32 add of two activations was
~12% of ResNet-50's bf16 time), are computed before the store, as :class:`PackFloatConv`
does it. Results stay channels last between convs (:mod:`tvmq.passes.channels_last`).

Activations between convs stay bf16 where only convs read them
(:meth:`_Lowering.find_bf16_inputs`): a conv whose result only a conv of this pass reads
stores it as that conv's padded bf16 input (rounded in the store, zero border written by the
kernel: no float32 result, no ``to_bf16_padded``; bit-identical), and a depthwise conv
between two of them (MobileNet's block) runs on the float32 depthwise kernel reading the bf16
bits its producer stored and storing bf16 bits for the projection (its input rounded to bf16
like every conv's: MobileNetV2's SQNR to PyTorch 20.5 -> 20.1 dB, OpenVINO's bf16 18.4; 2.91
-> 2.55 ms on one thread, 2.01 -> 1.60 on two). Left to the float32 kernels: other grouped
and depthwise convs, and convs of fewer than 32 output pixels. Not part of the default
pipeline: :func:`tvmq.pipeline.run` applies it for ``precision="bf16"`` after
``FoldBatchNorm``. A no-op without AMX-BF16; idempotent.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from tvmq.kernels._tiling import round_up
from tvmq.kernels.cpu_float_conv import ConvEpilogue, choose_depthwise_tiles
from tvmq.kernels.x86_amx import TILE
from tvmq.kernels.x86_amx_bf16 import (
    bf16_conv_amx,
    bf16_conv_amx_gathered,
    bf16_conv_applies,
    bf16_conv_gathered_applies,
    from_bf16,
    pack_weight_bf16,
    to_bf16_padded,
)
from tvmq.kernels.x86_int8_conv import OPAQUE

from .channels_last import TO_NCHW, ChannelsLastRewriter, rewrite_channels_last, rows_in_border
from .pack_bf16_dense_x86 import AmxBf16Pass
from .pack_float_conv import find_epilogues, lower_depthwise, match_float_conv2d
from .relax_utils import dataflow_bindings


class _Lowering:
    """The ``lower`` callback of :class:`ChannelsLastRewriter`: the bf16 AMX conv for a
    matched conv, else None."""

    def __init__(self, epilogues):
        self.epilogues = epilogues
        # var -> the padding of its only reader, a bf16 conv (find_bf16_inputs)
        self.wanted: dict[relax.Var, tuple[int, int, int, int]] = {}
        # NHWC float32 value -> (the same as padded bf16 bits, written by its conv; padding)
        self.as_bf16: dict[relax.Var, tuple[relax.Var, tuple[int, int, int, int]]] = {}
        # (NHWC float32 value, padding) -> its to_bf16_padded conversion
        self.converted: dict[tuple[relax.Var, tuple[int, int, int, int]], relax.Var] = {}
        # values that all their readers take as unpadded bf16 bits (find_bf16_inputs)
        self.bits_only: set[relax.Var] = set()

    def find_bf16_inputs(self, mod: tvm.IRModule) -> None:
        """Note the values read only by a conv this pass lowers, with that conv's padding: a
        bf16 conv whose result such a value is stores it as that conv's padded bf16 input
        (no float32 result, no conversion kernel between the two)."""
        for b, only_user in dataflow_bindings(mod):
            found = match_float_conv2d(b.value)
            if found is None or only_user(found[0]) is None:
                continue
            x, geo, _ = found
            if int(b.value.attrs.groups) != 1:  # a depthwise conv reads bf16 bits, pads itself
                self.wanted[x] = (0, 0, 0, 0)
            elif _takes(geo):
                self.wanted[x] = geo.padding
        self._find_bits_only(mod)

    def _find_bits_only(self, mod: tvm.IRModule) -> None:
        """Note the values all of whose readers take them as unpadded bf16 bits: bf16 convs
        without padding, and bf16 convs that add them in their store (a ResNet block's input:
        the next block's first conv and its skip, or its downsampling conv). A bf16 conv
        whose result such a value is stores bf16 bits, as OpenVINO keeps the skip in bf16:
        ResNet-50 then converts no block input (19 of its 21 ``to_bf16_padded`` kernels, the
        stem pool's two readers sharing one) and moves half the bytes of each skip. The
        skip's sum rounds its input to bf16."""
        skips = {}  # a residual add's var -> the skip it adds, for the convs that keep it
        for b, _ in dataflow_bindings(mod):
            found = match_float_conv2d(b.value)
            fused = self.epilogues.get(b.var)
            if found is None or fused is None or fused.residual is None:
                continue
            _, geo, w = found
            if int(b.value.attrs.groups) == 1 and _takes(geo) and w.shape[0] % TILE == 0:
                skips[fused.chain[1]] = fused.residual

        def takes_bits(var, reader, value) -> bool:
            if reader in skips:
                return skips[reader].same_as(var)
            found = match_float_conv2d(value)
            if found is None or not found[0].same_as(var) or int(value.attrs.groups) != 1:
                return False
            return _takes(found[1]) and not any(found[1].padding)

        for b, users in dataflow_bindings(mod):
            readers = users.readers(b.var)
            if readers and all(takes_bits(b.var, *r) for r in readers):
                self.bits_only.add(b.var)

    def __call__(self, rw: ChannelsLastRewriter, call: relax.Expr) -> relax.Expr | None:
        found = match_float_conv2d(call)
        if found is None:
            return None
        if int(call.attrs.groups) != 1:
            return self._depthwise(rw, *found)
        x, geo, w = found
        if not _takes(geo):
            return None
        direct = bf16_conv_applies(geo)
        bb = rw.builder_
        o, k = w.shape[0], geo.k
        np_ = round_up(o, TILE)
        fused = self.epilogues.get(rw.current_var)
        if fused is not None and np_ != o:  # the residual would need padding: added apart
            fused = fused.without_residual()
        chain, bias, epilogue, residual = fused[:4] if fused else ((), None, None, None)
        n, c, h, wd = geo.x_shape
        xb = self._bf16_input(rw, x, geo)
        w2 = np.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(o, k).T)  # (ky, kx, c) rows
        args = [xb, relax.const(pack_weight_bf16(w2), "uint16")]
        if epilogue is not None:
            args.append(relax.const(np.pad(bias, (0, np_ - o)).astype(np.float32), "float32"))
        residual_bits = False
        if residual is not None:  # a ResNet block's skip, added in the store
            r = rw.nhwc_input(rw.visit_expr(residual))
            ready = self.as_bf16.get(r)
            residual_bits = ready is not None and not any(ready[1])
            r = ready[0] if residual_bits else r  # the bf16 bits its conv stored
            args.append(bb.emit(relax.op.reshape(r, (geo.m, o))))
        kh, kw = geo.kernel
        kernel, label = (
            (bf16_conv_amx, "conv_amx") if direct else (bf16_conv_amx_gathered, "conv_amx_gathered")
        )
        # The next conv's padded bf16 input, where it is this result's only reader; bf16
        # bits where all its readers take them unpadded.
        result = chain[-1] if chain else rw.current_var
        border = self.wanted.get(result)
        if border is None and result in self.bits_only:
            border = (0, 0, 0, 0)
        if np_ != o or (residual is not None and border is not None and any(border)):
            border = None
        fn = rw.kernel_var(
            ("bf16_conv", geo, np_, epilogue, border, residual_bits),
            f"tvmq_bf16_{label}_{kh}x{kw}_{c}x{o}"
            + _suffix(epilogue)
            + ("_bf16" * residual_bits)
            + ("_to_bf16" * (border is not None)),
            lambda: kernel(geo, np_, epilogue, border, residual_bits).with_attr(
                "op_pattern", OPAQUE
            ),
        )
        if border is not None:
            y = self._emit_bf16(rw, fn, args, geo, o, border)
        else:
            y = bb.emit(relax.call_tir(fn, args, out_ty=relax.TensorType((geo.m, np_), "float32")))
        if np_ != o:
            y = bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[o]))
        oh, ow = geo.out_hw
        if border is None:
            y = bb.emit(relax.op.reshape(y, (n, oh, ow, o)))
        for var in chain:  # the bias add and activation are this kernel's result now
            rw.aliases[var] = rw.current_var
        return relax.op.permute_dims(y, TO_NCHW)

    def _bf16_input(self, rw: ChannelsLastRewriter, x: relax.Expr, geo) -> relax.Expr:
        """The conv's padded bf16 input: its producer's result where that conv wrote it so,
        else :func:`to_bf16_padded` of ``x``."""
        x = rw.nhwc_input(x)
        ready = self.as_bf16.get(x)
        if ready is not None and ready[1] == geo.padding:
            return ready[0]
        convert = rw.kernel_var(
            ("to_bf16", geo), "tvmq_to_bf16_padded", lambda: to_bf16_padded(geo)
        )
        n, c, h, wd = geo.x_shape
        top, left, bottom, right = geo.padding
        padded = relax.TensorType((n, h + top + bottom, wd + left + right, c), "uint16")
        key = (x, geo.padding)
        if key not in self.converted:  # once for all its readers (ResNet's stem pool)
            self.converted[key] = rw.builder_.emit(relax.call_tir(convert, [x], out_ty=padded))
        return self.converted[key]

    def _emit_bf16(self, rw, fn, args, geo, o: int, border) -> relax.Expr:
        """Emit the conv ``fn`` writing its result as bf16 bits inside ``border`` (the next
        conv's input, noted in ``self.as_bf16``); return the NHWC float32 value, which that
        conv does not read (it is computed only where something else does)."""
        bb = rw.builder_
        n, (oh, ow) = geo.x_shape[0], geo.out_hw
        top, left, bottom, right = border
        rows = n * (top + oh + bottom) * (left + ow + right)
        bits = bb.emit(relax.call_tir(fn, args, out_ty=relax.TensorType((rows, o), "uint16")))
        bits, inside = rows_in_border(bb, bits, n, oh, ow, border)
        return self._float_view(rw, inside, bits, border)

    def _float_view(self, rw, inside: relax.Expr, bits: relax.Expr, border) -> relax.Expr:
        """The float32 value of the bf16 bits ``inside`` (NHWC), noted in ``self.as_bf16``
        with ``bits``, the same with ``border`` around: a decode that its bf16 reader does not
        need (dropped unless something else reads it)."""
        shape = tuple(int(d) for d in inside.ty.shape)
        decode = rw.kernel_var(("from_bf16", shape), "tvmq_from_bf16", lambda: from_bf16(shape))
        y = rw.builder_.emit(
            relax.call_tir(decode, [inside], out_ty=relax.TensorType(shape, "float32"))
        )
        self.as_bf16[y] = (bits, tuple(border))
        return y

    def _depthwise(self, rw, x, geo, w) -> relax.Expr | None:
        """A depthwise conv next to bf16 convs: the float32 kernel reading its input as the
        bf16 bits its producer wrote (MobileNet's expansion), and / or storing bf16 bits for
        the bf16 conv that alone reads its result, unpadded (the projection): no conversion
        kernel, half the bytes; else None (left to :class:`PackFloatConv`)."""
        fused = self.epilogues.get(rw.current_var)
        chain, bias, epilogue = fused[:3] if fused else ((), None, None)
        bf16_out = self.wanted.get(chain[-1] if chain else rw.current_var) == (0, 0, 0, 0)
        ready = self.as_bf16.get(rw.nhwc_input(x))
        if ready is not None and ready[1] == (0, 0, 0, 0):
            x = rw.builder_.emit(relax.op.permute_dims(ready[0], TO_NCHW))
            rw.nhwc[x] = ready[0]  # the bits are its channels-last twin
        elif not bf16_out:
            return None
        c = geo.x_shape[1]
        # AMX CPUs have AVX-512: 16 float lanes, 32 vector registers
        tiles = choose_depthwise_tiles(geo.out_hw[1], c, 16, 32)
        if tiles is None:
            return None
        w_hwc = np.ascontiguousarray(w[:, 0].transpose(1, 2, 0))
        lowered = lower_depthwise(rw, x, geo, w_hwc, tiles, bias, epilogue, bf16_out=bf16_out)
        for var in chain:  # the bias add and activation are this kernel's result now
            rw.aliases[var] = rw.current_var
        if not bf16_out:
            return lowered
        bits = lowered.args[0]  # NHWC
        return relax.op.permute_dims(self._float_view(rw, bits, bits, (0, 0, 0, 0)), TO_NCHW)


def _takes(geo) -> bool:
    """Whether this pass puts a ``groups`` 1 conv on tiles (two tiles of output pixels)."""
    return bf16_conv_applies(geo) or bf16_conv_gathered_applies(geo)


def _suffix(epilogue: ConvEpilogue | None) -> str:
    if epilogue is None:
        return ""
    residual = "_residual" if epilogue.residual else ""
    plain = epilogue in (ConvEpilogue(), ConvEpilogue(residual=True))
    return "_bias" + residual + ("" if plain else "_act")


@tvm.transform.module_pass(opt_level=0, name="PackBf16ConvX86")
class PackBf16ConvX86(AmxBf16Pass):
    """Lower float32 stride-1 convs over 32-channel multiples to bf16 AMX tiles (``target``:
    see :class:`~tvmq.passes.pack_bf16_dense_x86.AmxBf16Pass`)."""

    def rewrite(self, mod: tvm.IRModule) -> tvm.IRModule:
        lowering = _Lowering(find_epilogues(mod, residual=True, activations=True))
        lowering.find_bf16_inputs(mod)
        out = rewrite_channels_last(mod, lowering)
        # the bf16 -> float32 decoders of results only bf16 convs read are called nowhere now
        return out if out.same_as(mod) else relax.transform.DeadCodeElimination()(out)
