"""An image of a few channels from NCHW to (zero-)padded NHWC, vectorized: a CNN's input.

A CNN's first conv reads its input channels last and padded (the NHWC kernels), so the
NCHW image (3 channels) is transposed and padded first. TVM's lowering of that
``permute_dims`` + ``pad`` walks the NHWC output with the channel innermost: three
elements a pixel, no vector wide enough to pay, a bounds test per element. For a 224x224
RGB image it took 95 us in float32 (MobileNetV3-small fp32, one thread of an Intel Xeon
with AVX-512: 5.7% of the model) and 46-55 us for the uint8 image of an int8 model.

:func:`image_nhwc` reads ``L`` pixels of each channel plane as one vector (contiguous in
NCHW), interleaves the ``C`` vectors with one ``Shuffle`` (LLVM picks the target's
permutes: ``vpermt2ps`` / ``vpermb`` on AVX-512, ``st3`` on NEON) and stores ``L * C``
contiguous values; the border is written apart, whole rows and edge pixels. A row's last
``W % L`` pixels are copied one by one. 224x224x3 with a border of 1: float32 25 us,
uint8 10 us (same core).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from tvmq.kernels.x86_int8 import KERNEL_ATTR
from tvmq.kernels.x86_int8_conv import OPAQUE

MAX_CHANNELS = 4
"""Images of more channels than this keep TVM's transpose (a vector per pixel already)."""

LANES = 16
"""Pixels a step: 16 float32 (one 512-bit register a channel) or 16 bytes."""

# Below this many output bytes one thread writes the image: a parallel launch costs more.
_PARALLEL_MIN_BYTES = 1 << 16


@dataclass(frozen=True)
class ImageQuantize:
    """A float32 image quantized as it is moved: ``dtype(clip(round(x * multiplier) + zero))``
    to the range of ``dtype`` (int8 or uint8), the expression TVM legalizes
    ``quantize(multiply(x, multiplier), 1, zero)`` to, so the bytes are the same."""

    multiplier: float
    zero: int
    dtype: str

    def __call__(self, v: tvm.tirx.PrimExpr) -> tvm.tirx.PrimExpr:
        info = np.iinfo(self.dtype)
        lo, hi = float(info.min), float(info.max)
        v = tirx.round(v * _f32(self.multiplier)) + _f32(float(self.zero))
        lanes = v.ty.dtype.lanes
        out = self.dtype if lanes == 1 else f"{self.dtype}x{lanes}"
        return tirx.Cast(out, tirx.max(tirx.min(v, _f32(hi)), _f32(lo)))


def _f32(value: float) -> tvm.tirx.PrimExpr:
    return tirx.const(value, "float32")


def image_nhwc(
    shape: tuple[int, int, int, int],
    dtype: str,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    fill: float = 0.0,
    quantize: ImageQuantize | None = None,
) -> tvm.tirx.PrimFunc:
    """Kernel ``(X (n, c, h, w)) -> Y (n, top + h + bottom, left + w + right, c)``, both
    ``dtype``: ``Y[b, top + y, left + x, j] = X[b, j, y, x]``, ``fill`` in the border
    (``padding`` = top, left, bottom, right). With ``quantize``, ``X`` is float32 and ``Y``
    its quantized bytes (``fill`` then a value of ``quantize.dtype``)."""
    n, c, h, w = shape
    if quantize is not None and dtype != "float32":
        raise ValueError(f"a quantized image is read as float32, not {dtype}")
    out_dtype = dtype if quantize is None else quantize.dtype
    convert = quantize or (lambda v: v)
    if not 1 <= c <= MAX_CHANNELS:
        raise ValueError(f"an image of 1..{MAX_CHANNELS} channels, not {c}")
    top, left, bottom, right = padding
    hp, wp = top + h + bottom, left + w + right
    row = wp * c  # values of one output row
    value = tirx.const(fill, out_dtype)
    interleave = [tirx.const(j * LANES + p, "int32") for p in range(LANES) for j in range(c)]
    nbytes = n * hp * row * tvm.runtime.DataType(out_dtype).bits // 8
    rows = T.parallel if nbytes >= _PARALLEL_MIN_BYTES else T.serial
    with IRBuilder() as ib, T.prim_func():
        T.func_name("image_nhwc")
        T.func_attr({"tirx.noalias": True})
        x4 = T.arg("X", T.Buffer((n, c, h, w), dtype))
        y4 = T.arg("Y", T.Buffer((n, hp, wp, c), out_dtype))
        # One root block: Relax's analyses (RewriteDataflowReshape's reshape test) expect one.
        with T.sblock("root"):
            T.reads(x4[0:n, 0:c, 0:h, 0:w])
            T.writes(y4[0:n, 0:hp, 0:wp, 0:c])
            x = T.decl_buffer((n * c * h * w,), dtype, data=x4.data)
            y = T.decl_buffer((n * hp * row,), out_dtype, data=y4.data)
            with rows(0, n * hp) as bi:
                b, i = bi // hp, bi % hp
                out = bi * row
                with T.If(tirx.any(i < top, i >= top + h)):
                    with T.Then(), T.vectorized(0, row) as j:
                        T.buffer_store(y, value, [out + j])
                    with T.Else():
                        with T.serial(0, left * c) as j:
                            T.buffer_store(y, value, [out + j])
                        with T.serial(0, right * c) as j:
                            T.buffer_store(y, value, [out + (left + w) * c + j])
                        plane = (b * c * h + i - top) * w  # pixel (i - top, 0) of channel 0

                        def at(j, px):  # X's pixel px of the row, channel j
                            return plane + j * h * w + px

                        with T.serial(0, w // LANES) as xo:
                            vectors = [
                                convert(
                                    tirx.BufferLoad(x, [tirx.Ramp(at(j, xo * LANES), 1, LANES)])
                                )
                                for j in range(c)
                            ]
                            store = out + (left + xo * LANES) * c
                            pixels = vectors[0] if c == 1 else tirx.Shuffle(vectors, interleave)
                            T.buffer_store(y, pixels, [tirx.Ramp(store, 1, LANES * c)])
                        with T.serial(w - w % LANES, w) as px:
                            for j in range(c):
                                moved = convert(x[at(j, px)])
                                T.buffer_store(y, moved, [out + (left + px) * c + j])
    return (
        ib.get()
        .with_attr("tirx.is_scheduled", True)
        .with_attr("op_pattern", OPAQUE)
        .with_attr(KERNEL_ATTR, "image_nhwc")
        .without_attr("global_symbol")
    )
