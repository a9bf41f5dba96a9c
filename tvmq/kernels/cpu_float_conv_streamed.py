"""CPU float32 conv2d for layers whose weights stream from memory: K-blocked, prefetching.

:func:`~tvmq.kernels.cpu_float_conv.float_conv2d_nhwc` walks the whole reduction for one
register tile at a time. For a deep layer over a small image (ResNet-50's last stage: 7x7
pixels, 4-9 MB of weights) the first tile of each channel panel pulls that panel from memory
at the pace of its FMAs, faster than one core streams it (~13 GB/s), and the later tiles find
it in cache: the layer runs the memory stream and the compute one after the other. In a model
the weights are not in cache (a 100 MB ResNet-50 cycles through them), so these layers ran
1.5-1.7x slower in situ than alone.

:func:`float_conv2d_nhwc_streamed` computes the same sums, in the same order, with the
reduction split in chunks of ``kc`` channels of one kernel tap (``kc x nr x L`` weights, 16-32
KB): each chunk serves every register tile of the channel panel (``n * oh * ow / mr`` of them)
while it is in L1, the partial sums wait in the output, and each tile prefetches its share of
the next chunk's weights into L2 (``llvm.prefetch``, locality 2), so the memory stream runs
under the FMAs. A last pass per panel adds the bias (and a residual) and clamps. The results
are bit-identical to the unblocked kernel (each output's FMAs in the same order; partial sums
round-trip float32 exactly). Alone, 1 thread, cache flushed between calls (Intel Xeon, AMX
host; ResNet-50's shapes): 3x3 512x512 over 7x7 2.20 -> 1.61 ms, 1x1 512x2048 1.07 -> 0.81,
1x1 2048x512 1.05 -> 0.77, the stride-2 1x1 1024x2048 1.99 -> 1.63; with the weights in cache
it is 0-7% slower (the prefetches), and over 14x14 or larger images it does not pay
(:func:`streamed_chunk` picks the layers: at least 1 MB of weights over at most 128 pixels).

It does not pay on AMD Zen 4 (:func:`streaming_pays`): there a 512-bit FMA runs as two 256-bit
halves, so the FMAs are half as fast and the plain kernel's own memory stream keeps up with
them, while a 32 KB L1 (Intel's: 48 KB) cannot hold the partial sums and a weight chunk
together. ResNet-50 fp32, 1 thread, one process, interleaved: 94.5 ms streamed, 82.9 ms
plain (3x3 512x512 over 7x7 in situ 3.5 -> 2.1 ms); ResNet-18 43.9 -> 34.1 ms. Nor on an
AVX2 CPU (AMD Zen 1: one 256-bit FMA a cycle, 32 KB L1): ResNet-18 fp32, 1 thread, its three
3x3 512x512 convs by kernel 27.9 ms streamed, 22.6 ms plain; the model 105 -> 98 ms.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from tvmq.kernels._tiling import half_width_avx512, simd_bits
from tvmq.kernels.cpu_float_conv import ConvEpilogue, ConvShape, ConvTiles
from tvmq.kernels.x86_int8 import KERNEL_ATTR

_MAX_PIXELS = 128
"""Output pixels (all images) up to which a layer's partial sums (``128 x 64`` float32: 32 KB)
stay in L1 across chunks: ResNet-50's 7x7 stage and the YOLO neck's 10x10 one (3x3 512x512,
cache flushed: 3.73 -> 2.70 ms) qualify; ResNet-50's 14x14 stage (196 pixels) ran 0.9-1.1x and
stays unblocked."""

_MIN_WEIGHT_BYTES = 1 << 20
"""Weights below this stay in cache between calls or stream fast enough unblocked."""

_CHUNKS = (128, 64)  # channels of one chunk: 128 x 4 vectors x 64 B = 32 KB of weights at most
_L2_PREFETCH = 2  # llvm.prefetch locality: prefetcht1 on x86


def streaming_pays(target: tvm.target.Target | None) -> bool:
    """Whether the streamed kernel is worth its partial-sum passes on ``target`` (None: the
    current target): only on x86 CPUs with full-width AVX-512, the one kind it was measured
    to pay on (see the module docstring); not with half-width 512-bit FMAs, not on AVX2, and
    not on targets where it was never measured (aarch64)."""
    if target is None:
        target = tvm.target.Target.current(allow_none=True)
    return simd_bits(target) == 512 and not half_width_avx512(target)


def streamed_chunk(pixels: int, c: int, taps: int, o_padded: int) -> int | None:
    """The chunk ``kc`` (channels) for :func:`float_conv2d_nhwc_streamed` when a conv with
    ``pixels`` output pixels (all images, padded width) over ``c`` channels, ``taps`` kernel
    taps and ``o_padded`` output channels is one whose weights stream from memory (at least
    1 MB of them over at most 128 pixels), else None."""
    if pixels > _MAX_PIXELS or 4 * o_padded * taps * c < _MIN_WEIGHT_BYTES:
        return None
    return next((kc for kc in _CHUNKS if c % kc == 0), None)


def float_conv2d_nhwc_streamed(
    shape: ConvShape, tiles: ConvTiles, kc: int, epilogue: ConvEpilogue | None = None
) -> tvm.tirx.PrimFunc:
    """:func:`~tvmq.kernels.cpu_float_conv.float_conv2d_nhwc` (same arguments, packing and
    results) with the reduction in chunks of ``kc`` channels (a divisor of ``C``) and the next
    chunk's weights prefetched (see the module docstring). Kernel attribute
    ``"float_conv2d_nhwc_streamed"``."""
    n, hp, wp, c, oh = shape.n, shape.hp, shape.wp, shape.c, shape.oh
    (kh, kw), (sh, sw), (dh, dw) = shape.kernel, shape.strides, shape.dilation
    ow, o, lanes, mr, nr = tiles.ow_padded, tiles.o_padded, tiles.lanes, tiles.mr, tiles.nr
    nb = nr * lanes
    if ow % mr or o % nb or c % kc:
        raise ValueError(f"unpadded output {ow}x{o} or chunk {kc} of {c} for tiles {tiles}")
    per_tap = c // kc
    chunks = kh * kw * per_tap
    pixel_tiles = n * oh * (ow // mr)
    share = -(-kc // pixel_tiles)  # weight rows of the next chunk each tile prefetches
    f32 = lambda v: tirx.const(v, "float32")  # noqa: E731
    with IRBuilder() as ib, T.prim_func():
        T.func_name("float_conv2d_nhwc_streamed")
        T.func_attr({"tirx.noalias": True})
        p = T.arg("P", T.Buffer((n, hp, wp, c), "float32"))
        w = T.arg("W", T.Buffer((o // lanes, kh, kw, c, lanes), "float32"))
        bias = T.arg("bias", T.Buffer((o,), "float32")) if epilogue is not None else None
        res = None
        if epilogue is not None and epilogue.residual:
            res = T.arg("residual", T.Buffer((n, oh, ow, o), "float32"))
        y = T.arg("Y", T.Buffer((n, oh, ow, o), "float32"))
        with T.parallel(0, o // nb) as jo:
            with T.serial(0, chunks) as ch:
                ry, rx = ch // per_tap // kw, ch // per_tap % kw
                c0 = ch % per_tap * kc
                nxt = tirx.min(ch + 1, chunks - 1)
                with T.serial(0, n * oh) as row, T.serial(0, ow // mr) as xo:
                    b, yy, x0 = row // oh, row % oh, xo * mr
                    regs = T.alloc_buffer((mr, nb), "float32", scope="local")
                    for xi in range(mr):  # the tile's partial sums (none before chunk 0)
                        with T.vectorized(0, nb) as v:
                            partial = y[b, yy, x0 + xi, jo * nb + v]
                            start = tirx.if_then_else(ch == 0, f32(0.0), partial)
                            T.buffer_store(regs, start, [xi, v])
                    _prefetch_share(w, jo, nr, nxt, per_tap, kw, kc, row * (ow // mr) + xo, share)
                    with T.serial(0, kc) as r:
                        for xi in range(mr):
                            pixel = p[b, yy * sh + ry * dh, (x0 + xi) * sw + rx * dw, c0 + r]
                            for ni in range(nr):
                                with T.vectorized(0, lanes) as v:
                                    acc = regs[xi, ni * lanes + v]
                                    wv = w[jo * nr + ni, ry, rx, c0 + r, v]
                                    T.buffer_store(regs, acc + pixel * wv, [xi, ni * lanes + v])
                    for xi in range(mr):
                        with T.vectorized(0, nb) as v:
                            T.buffer_store(y, regs[xi, v], [b, yy, x0 + xi, jo * nb + v])
            if epilogue is not None:
                _epilogue_pass(y, bias, res, epilogue, jo, nb, n, oh, ow)
    return (
        ib.get()
        .with_attr("tirx.is_scheduled", True)
        .with_attr(KERNEL_ATTR, "float_conv2d_nhwc_streamed")
        .without_attr("global_symbol")
    )


def _prefetch_share(w, jo, nr: int, chunk, per_tap: int, kw: int, kc: int, tile, share: int):
    """Tile ``tile`` prefetches its ``share`` of weight rows (one 64-byte line a channel
    vector) of ``chunk`` into L2."""
    ry, rx, c0 = chunk // per_tap // kw, chunk // per_tap % kw, chunk % per_tap * kc
    for ni in range(nr):
        with T.serial(0, share) as i:
            cc = tirx.min(tile * share + i, kc - 1)
            ptr = tirx.address_of(w[jo * nr + ni, ry, rx, c0 + cc, 0])
            i32 = lambda v: tirx.const(v, "int32")  # noqa: E731
            prefetch = tirx.call_llvm_intrin(
                "void", "llvm.prefetch.p0", ptr, i32(0), i32(_L2_PREFETCH), i32(1)
            )
            T.evaluate(prefetch)


def _epilogue_pass(y, bias, res, epilogue: ConvEpilogue, jo, nb: int, n: int, oh: int, ow: int):
    """``Y = activate(Y + bias [+ R])`` over the panel's columns, in place."""
    with T.serial(0, n * oh * ow) as q, T.vectorized(0, nb) as v:
        b, yy, xx, j = q // (oh * ow), q // ow % oh, q % ow, jo * nb + v
        value = y[b, yy, xx, j] + bias[j]
        if res is not None:
            value = value + res[b, yy, xx, j]
        T.buffer_store(y, epilogue.activate(value), [b, yy, xx, j])
