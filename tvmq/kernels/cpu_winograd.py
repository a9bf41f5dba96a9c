"""CPU float32 3x3 convolution by Winograd's minimal filtering, F(2x2, 3x3).

A stride-1 3x3 conv computes each 2x2 block of outputs from a 4x4 patch of its (padded)
input with 16 multiplies per channel pair instead of 36 (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", 2016)::

    Y_tile = A^T [ sum_c (G g_oc G^T) * (B^T d_c B) ] A      (* elementwise, 4x4)

The work splits into three kernels, all NHWC and vectorized over channels:

- :func:`winograd_input`: ``P (n, hp, wp, c)`` -> ``V (16, n, T, c)``, the 16 transformed
  values ``B^T d B`` of each of the ``T = ceil(oh / 2) * ceil(ow / 2)`` tiles (additions and
  subtractions only);
- 16 independent matmuls ``V[e] (n * T, c) @ U[e] (c, O)``: the batched 1x1 case of
  :func:`~tvmq.kernels.cpu_float_conv.float_conv2d_nhwc` with the weight transformed and
  packed at compile time (:func:`winograd_weight`, ``U = G g G^T``; a library computes it at
  load from the 3x3 weight it stores, :func:`winograd_weight_kernel`);
- :func:`winograd_output`: ``M (16, n, T', O')`` -> ``Y (n, oh, ow, O)``, ``A^T m A`` per tile,
  with the conv's :class:`~tvmq.kernels.cpu_float_conv.ConvEpilogue` (bias, residual,
  activation) or requantize applied before the store.

On a Zen 1 core (AVX2, 1 thread) ResNet-18's 3x3 layers ran 1.4-1.85x faster than on the
direct kernel (56x56x64 1.55x, 28x28x128 1.76x, 14x14x256 1.85x, 7x7x512 1.61x), a
16-channel one 0.93x as fast.

The matmuls do 4/9 of the direct conv's multiply-adds; the transforms add a pass over
``V`` and ``M`` (16/4 = 4 values per input / output pixel). F(2x2, 3x3)'s transforms have
coefficients 0, +-1 and +-1/2 only, so the result is about as accurate as the direct sum
(float32, relative error ~1e-6; larger tiles such as F(4x4, 3x3) lose more).
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import te
from tvm.s_tir import Schedule

from tvmq.kernels.cpu_float_conv import (
    ConvEpilogue,
    ConvTiles,
    _bias,
    _store,
    choose_conv_tiles,
    choose_int16_tiles,
    pack_conv_weight,
    pack_conv_weight_pairs,
    register_tile,
)
from tvmq.kernels.x86_int8 import KERNEL_ATTR, Requantize

B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]])
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]])
TILE = 2
"""Output pixels per tile side (F(2x2, 3x3)); each tile reads a 4x4 input patch."""
G_LEFT_INVERSE = np.array([[1, 0, 0, 0], [0, 1, -1, 0], [0, 0, 0, 1]])
"""``G_LEFT_INVERSE @ G == I``: a 3x3 weight back from its transform, ``L U L^T``."""
PANELS_ATTR = "tvmq.winograd_panels"
"""PrimFunc attribute of the Winograd matmul kernels: their weight argument (index 1) is
:func:`winograd_weight`'s panels (``DecodeAtLoad`` stores the 3x3 weight and transforms it
at load, :func:`winograd_weight_kernel`)."""


def tiles_hw(oh: int, ow: int) -> tuple[int, int]:
    """Tile rows and columns covering an ``oh x ow`` output."""
    return math.ceil(oh / TILE), math.ceil(ow / TILE)


def padded_input_hw(oh: int, ow: int) -> tuple[int, int]:
    """The padded input height and width the input transform reads (whole 4x4 patches:
    one more row / column than the conv's own padding when ``oh`` / ``ow`` is odd)."""
    th, tw = tiles_hw(oh, ow)
    return TILE * th + 2, TILE * tw + 2


def winograd_weight(w: np.ndarray, lanes: int, o_padded: int, int16: bool = False) -> np.ndarray:
    """An OIHW 3x3 weight as the 16 matmuls' packed panels ``(16, O'/L, 1, 1, C, L)``
    (``U = G g G^T``, computed in float64). With ``int16`` (an integer weight of at most
    8 bits, an even ``C``), ``4 U`` (integers of at most 9 * 128 in magnitude) packed in
    channel pairs for the int16 kernel, ``(16, O'/L, 1, 1, C/2, L, 2)``."""
    o, c, kh, kw = w.shape
    if (kh, kw) != (3, 3):
        raise ValueError(f"Winograd F(2x2, 3x3) needs a 3x3 kernel, not {kh}x{kw}")
    u = _transformed(w).reshape(16, o, c, 1, 1)
    if int16:
        u4 = np.rint(4 * u)
        if np.abs(u4 - 4 * u).max() > 0 or np.abs(u4).max() > 2**15 - 1:
            raise ValueError("int16 Winograd panels need a weight of small integers")
        return np.stack([pack_conv_weight_pairs(u4[e], lanes, o_padded) for e in range(16)])
    return np.stack([pack_conv_weight(u[e].astype(np.float32), lanes, o_padded) for e in range(16)])


def _transformed(w: np.ndarray) -> np.ndarray:
    """``U = G g G^T`` of each 3x3 filter of an OIHW weight, float64 ``(4, 4, O, C)``."""
    return np.einsum("ai,ocij,bj->aboc", G, w.astype(np.float64), G)


BYTE_TRANSFORM_MAX = 4 * 255
"""The largest magnitude of an input transform ``B^T d B`` of bytes (uint8 or int8)."""


def int16_sums_fit(w: np.ndarray) -> bool:
    """Whether the int16 route's int32 sums (:func:`winograd_output`'s ``sum_dtype``) cannot
    overflow for this OIHW weight of integers and images of bytes: every transformed product
    ``V * 4U`` of an output channel summed in magnitude stays below ``2**31`` (so do the
    matmul's partial sums and the output transform's)."""
    u4 = np.abs(4 * _transformed(w))
    return BYTE_TRANSFORM_MAX * u4.sum(axis=(0, 1, 3)).max() < 2**31


def weight_from_panels(panels: np.ndarray) -> np.ndarray:
    """The OIHW 3x3 weight (``O'`` channels, padding included) whose :func:`winograd_weight`
    is ``panels``: exact where ``U`` is (integer weights: quarters); else within float32's
    rounding of ``U``. int16 panels (``4 U`` in channel pairs) give their integer weight."""
    if panels.ndim == 7:  # (16, O'/L, 1, 1, C/2, L, 2): 4 U in channel pairs
        e, blocks, _, _, half, lanes, _ = panels.shape
        flat = panels.transpose(0, 1, 2, 3, 4, 6, 5).reshape(e, blocks, 1, 1, 2 * half, lanes)
        panels = flat.astype(np.float64) / 4
    e, blocks, _, _, c, lanes = panels.shape
    u = panels[:, :, 0, 0].transpose(0, 1, 3, 2).reshape(4, 4, blocks * lanes, c)
    g = np.einsum("ia,aboc,jb->ocij", G_LEFT_INVERSE, u.astype(np.float64), G_LEFT_INVERSE)
    return g.astype(np.float32)


def winograd_weight_kernel(
    o_padded: int, c: int, lanes: int, int16: bool = False
) -> tvm.tirx.PrimFunc:
    """``W (o_padded, c, 3, 3) -> U (16, o_padded / L, 1, 1, c, L)``: :func:`winograd_weight`
    as a kernel (float64 sums of the weights' halves and quarters: exact, then rounded to
    float32 as numpy does), which a library runs once at load. With ``int16`` its int16
    panels, ``4 U`` in channel pairs. Unscheduled."""
    w = te.placeholder((o_padded, c, 3, 3), "float32", name="W")
    scale, dtype = (4.0, "int16") if int16 else (1.0, "float32")

    def value(e, jo, y, x, k, ji):
        a, b = e // 4, e % 4
        j = jo * lanes + ji

        def entry(ra, rb):
            terms = [
                scale * G[ra, i] * G[rb, t] * w[j, k, i, t].astype("float64")
                for i in range(3)
                for t in range(3)
                if G[ra, i] * G[rb, t] != 0
            ]
            return sum(terms[1:], terms[0]).astype(dtype)

        rows = [_select(b, [entry(ra, rb) for rb in range(4)]) for ra in range(4)]
        return _select(a, rows)

    if int16:
        shape = (16, o_padded // lanes, 1, 1, c // 2, lanes, 2)
        u = te.compute(
            shape, lambda e, jo, y, x, q, ji, r: value(e, jo, y, x, 2 * q + r, ji), name="U"
        )
    else:
        u = te.compute((16, o_padded // lanes, 1, 1, c, lanes), value, name="U")
    return te.create_prim_func([w, u]).without_attr("global_symbol")


def _combine(coefficients, terms) -> tvm.tirx.PrimExpr:
    """``sum(k * t)`` for the coefficients 0, +-1 (no multiplies: adds and subtractions)."""
    out = None
    for k, t in zip(coefficients, terms, strict=True):
        if k != 0 and out is None:
            out = t if k == 1 else -t
        elif k != 0:
            out = out + t if k == 1 else out - t
    return out


def _select(index: tvm.tirx.PrimExpr, values: list) -> tvm.tirx.PrimExpr:
    """``values[index]`` for a loop variable that unrolling makes a constant."""
    out = values[-1]
    for i in range(len(values) - 2, -1, -1):
        out = tvm.tirx.Select(index == i, values[i], out)
    return out


def _transformed_input(p: te.Tensor, th: int, tw: int, t_padded: int, v_dtype: str) -> te.Tensor:
    """``V (16, n, t_padded, c)``, :func:`winograd_input`'s values of the padded image ``p``."""
    n, _, _, c = p.shape

    def value(e, i, t, k):
        if t_padded > th * tw:
            t = te.min(t, th * tw - 1)
        return _patch_transform(p, e, i, t // tw, t % tw, k).astype(v_dtype)

    return te.compute((16, n, t_padded, c), value, name="V")


def _patch_transform(p: te.Tensor, e, i, ty, tx, k) -> tvm.tirx.PrimExpr:
    """Element ``e`` (``(a, b) = divmod(e, 4)``) of ``B^T d B`` for tile ``(ty, tx)``."""
    a, b = e // 4, e % 4

    def d(u, v):
        return p[i, ty * TILE + u, tx * TILE + v, k]

    rows = [[_combine(B_T[ra], [d(u, v) for u in range(4)]) for v in range(4)] for ra in range(4)]
    return _select(
        a, [_select(b, [_combine(B_T[rb], rows[ra]) for rb in range(4)]) for ra in range(4)]
    )


INT16_VECTOR = 16
"""int16 values in a 256-bit register: the vector of an int16 input transform, whose
``lanes`` count the matmul's int32 sums (8). On a Zen 3 core ResNet's 56x56x64 transform ran
in 81-84 us over int16 (107-111 over float32) against 119-146 in vectors of 8."""


def _transform_vector(v_dtype: str, c: int, lanes: int) -> int:
    """The channels an input transform computes in one vector."""
    return INT16_VECTOR if v_dtype == "int16" and c % INT16_VECTOR == 0 else lanes


def winograd_input(
    n: int,
    hp: int,
    wp: int,
    c: int,
    th: int,
    tw: int,
    t_padded: int,
    lanes: int,
    p_dtype: str = "float32",
    v_dtype: str = "float32",
) -> tvm.tirx.PrimFunc:
    """Scheduled kernel ``P (n, hp, wp, c) -> V (16, n, t_padded, c)``: ``B^T d B`` of the
    4x4 patch at ``(2 * ty, 2 * tx)`` for each of the ``th x tw`` tiles (``V[4 * a + b]`` its
    element ``(a, b)``), vectorized over ``lanes`` channels. Rows ``t >= th * tw`` (padding
    for the matmuls' register tile) repeat the last tile. ``P`` may hold int16 and ``V`` be
    int16 (the int16 kernel's input: bytes' transforms, sums of four, stay within 4 * 255)."""
    if hp < TILE * th + 2 or wp < TILE * tw + 2 or c % lanes or t_padded < th * tw:
        raise ValueError(f"input {hp}x{wp}x{c} too small for {th}x{tw} tiles of {lanes} lanes")
    p = te.placeholder((n, hp, wp, c), p_dtype, name="P")
    v = _transformed_input(p, th, tw, t_padded, v_dtype)
    sch = Schedule(te.create_prim_func([p, v]))
    e, i, t, k = sch.get_loops(sch.get_sblock("V"))
    a, b = sch.split(e, [4, 4])
    ko, ki = sch.split(k, [None, _transform_vector(v_dtype, c, lanes)])
    sch.reorder(i, t, ko, a, b, ki)
    sch.parallel(sch.fuse(i, t))
    sch.unroll(a)
    sch.unroll(b)
    sch.vectorize(ki)
    return _finish(sch, "winograd_input")


def _transformed_output(
    m, n: int, oh: int, ow: int, o: int, epilogue, sum_dtype: str
) -> tuple[list[te.Tensor], te.Tensor]:
    """:func:`winograd_output`'s extra arguments and result ``Y``, with ``m(e, i, y, x, j)``
    element ``e`` of the sums of the tile of pixel ``(y, x)``."""

    def value(i, y, x, j):
        def mm(a, b):
            return m(4 * a + b, i, y, x, j)

        rows = [
            [_combine(A_T[r], [mm(a, b) for a in range(4)]) for b in range(4)] for r in range(2)
        ]
        return _select(
            y % TILE,
            [_select(x % TILE, [_combine(A_T[s], rows[r]) for s in range(2)]) for r in range(2)],
        )

    acc = te.compute((n, oh, ow, o), value, name="acc")
    if sum_dtype == "int32":  # exact multiples of 4: the shift divides
        summed = acc
        two = tvm.tirx.const(2, "int32")
        acc = te.compute(acc.shape, lambda *i: summed[i] >> two, name="rounded")
    elif isinstance(epilogue, Requantize):
        summed = acc
        acc = te.compute(acc.shape, lambda *i: te.round(summed[i]), name="rounded")
    args = _bias(epilogue, o, sum_dtype)
    if isinstance(epilogue, ConvEpilogue) and epilogue.residual:
        args.append(te.placeholder((n, oh, ow, o), "float32", name="residual"))
    return args, _store(acc, args, epilogue)


def _inline_output_sums(sch: Schedule) -> None:
    """Inlines :func:`_transformed_output`'s sums (and their rounding) into its store."""
    for stage in ("acc", "rounded"):
        try:
            block = sch.get_sblock(stage)
        except tvm.s_tir.schedule.ScheduleError:  # no rounding: a float conv
            continue
        sch.compute_inline(block)


def winograd_output(
    n: int,
    th: int,
    tw: int,
    t_padded: int,
    o_padded: int,
    oh: int,
    ow: int,
    o: int,
    lanes: int,
    epilogue: ConvEpilogue | Requantize | None = None,
    sum_dtype: str = "float32",
):
    """Scheduled kernel ``M (16, n, t_padded, o_padded) [, bias (o,) [, R (n, oh, ow, o)]] ->
    Y (n, oh, ow, o)``: ``A^T m A`` of each tile's transformed sums (``M[4 * a + b]`` their
    element ``(a, b)``), then the `epilogue`. With a
    :class:`~tvmq.kernels.x86_int8.Requantize` (no residual), ``offset (o,) float32,
    multiplier (o,) float32`` follow ``M``: each sum, of bytes (:class:`~tvmq.passes.Int8AsFloat`'s
    convs), is rounded to the nearest integer and requantized; ``Y`` is then int8 / uint8
    (float32 for a dequantize). ``U`` holds quarters, so such sums are exact integers while
    the transformed ones stay below ``2**22``; beyond, they round like any float32 sum (a
    relative ~1e-6, which moves an int8 output only where it lies that close to a rounding
    boundary), where the direct kernel stays exact up to ``2**24``.

    With ``sum_dtype`` int32 (the int16 kernel's sums, of ``4 U``: :func:`winograd_weight`'s
    ``int16``) ``M`` is int32 and so is ``offset``: ``A^T m A / 4`` is the conv's exact sum
    (the caller proves that ``A^T m A``, nine sums at most, stays within int32)."""
    if o % lanes:
        raise ValueError(f"{o} output channels are not whole vectors of {lanes}")
    requantize = isinstance(epilogue, Requantize)
    if requantize and epilogue.residual is not None:
        raise ValueError("the Winograd output kernel adds no residual to a requantized sum")
    integer = sum_dtype == "int32"
    if integer and not requantize:
        raise ValueError("an int32 Winograd output is a requantized one")
    m = te.placeholder((16, n, t_padded, o_padded), sum_dtype, name="M")

    def tile_sum(e, i, y, x, j):
        return m[e, i, (y // TILE) * tw + x // TILE, j]

    args, out = _transformed_output(tile_sum, n, oh, ow, o, epilogue, sum_dtype)
    sch = Schedule(te.create_prim_func([m, *args, out]))
    _inline_output_sums(sch)
    i, y, x, j = sch.get_loops(sch.get_sblock("Y"))
    yo, yi = sch.split(y, [None, TILE])
    xo, xi = sch.split(x, [None, TILE])
    jo, ji = sch.split(j, [None, lanes])
    sch.reorder(i, yo, xo, jo, yi, xi, ji)
    sch.parallel(sch.fuse(i, yo))
    sch.unroll(yi)
    sch.unroll(xi)
    sch.vectorize(ji)
    return _finish(sch, "winograd_output")


FUSED_MIN_BYTES = 4 << 20
"""The separate kernels' ``V`` and ``M`` (bytes, whole image) from which the int16 route
may take :func:`winograd_fused` instead (see :func:`fused_tiles`)."""
FUSED_BAND_BYTES = 1 << 20
"""At most this much of ``V`` and ``M`` (bytes) per band."""


def fused_tiles(
    th: int, tw: int, c: int, o: int, lanes: int = 8, registers: int = 16, int16: bool = False
) -> tuple[ConvTiles, int] | None:
    """``(register tile, band)`` of :func:`winograd_fused` for a conv of ``th x tw`` tiles
    over ``c`` -> ``o`` channels (float32 vectors of ``lanes`` in ``registers``, or the
    int16 kernel's), or None where the three kernels do as well. The band is the longest run
    of register tiles along a row of tiles that divides the (padded) row and holds
    :data:`FUSED_BAND_BYTES` of ``V`` and ``M`` (at least 2 tiles); fused where the whole
    image's are at least :data:`FUSED_MIN_BYTES` and a band's at least a quarter of the
    weight panels (read again for each band).

    On an AMD Zen 3 core (1 thread, each conv alone, int16 requantized to int8; ``V + M``
    and a band's share, then the weight, in brackets) the int16 kernel ran UNet's 224x224
    64 -> 32 (77 MB; 458 / 66 KB) 1.6x as fast as the three kernels, 32 -> 32 1.9x, 112x112
    128 -> 64 (51 MB; 458 KB / 262 KB) 1.9x, 64 -> 128 1.35x, 56x56 256 -> 128 (26 MB;
    458 KB / 1 MB) 1.5x, 128 -> 256 (573 KB / 1 MB) 1.15x, ResNet's 56x56 64 -> 64 (4.8 MB;
    172 / 131 KB) 1.2x; not 28x28 128 -> 128 (2.4 MB; 196 / 524 KB: 0.7x), 256 -> 512 (8 MB;
    720 KB / 4 MB: 0.9x), 14x14 256 -> 256 (1.6 MB: 0.95x). Bands of 56 and 112 tiles of
    the 224x224 64 -> 32 conv ran alike; 28 tiles 1.3x slower than 56 on 112x112 128 -> 64,
    4 tiles 1.15x slower than 28 on 56x56 128 -> 256. float32 (bias + ReLU, bands of a row):
    56x56 64 -> 64 1.0-1.25x, 224x224 64 -> 32 1.05-1.35x, 112x112 128 -> 64 1.6-1.8x, 56x56
    256 -> 128 2.0-2.2x; 28x28 128 -> 128 0.93-0.98x."""
    tiles = choose_int16_tiles(tw, o) if int16 else choose_conv_tiles(tw, o, lanes, registers)
    value = 2 if int16 else 4
    per_tile = 16 * (value * c + 4 * tiles.o_padded)
    if th * tw * per_tile < FUSED_MIN_BYTES:
        return None
    groups = tiles.ow_padded // tiles.mr
    most = max(1, FUSED_BAND_BYTES // (per_tile * tiles.mr))
    k = max(d for d in range(1, min(most, groups) + 1) if groups % d == 0)
    band = k * tiles.mr
    if band < 2 or 4 * band * per_tile < 16 * value * c * tiles.o_padded:
        return None
    return tiles, band


def winograd_fused(
    n: int,
    hp: int,
    wp: int,
    c: int,
    oh: int,
    ow: int,
    o: int,
    tiles: ConvTiles,
    band: int,
    epilogue: ConvEpilogue | Requantize | None = None,
    p_dtype: str = "float32",
    int16: bool = False,
) -> tvm.tirx.PrimFunc:
    """The three kernels in one, a `band` of tiles at a time: ``P (n, hp, wp, c), U [, the
    epilogue's arguments] -> Y (n, oh, ow, o)``, with ``U`` :func:`winograd_weight`'s panels
    for ``tiles.o_padded`` channels (``int16``: the int16 kernel's) and the rest as
    :func:`winograd_output`'s.

    Each task (one per band of ``band`` tiles, taken in order along the rows of tiles)
    transforms its tiles' patches, multiplies them by ``U`` (:func:`register_tile`'s
    register tile) and transforms the sums back into ``Y``: its ``V`` and ``M`` (``band *
    16 * (c * 2 + o_padded * 4)`` bytes for int16) stay in the core's cache, where the
    separate kernels write and read both whole images through memory (4x the input, and
    the output in int32, at 16 values a 2x2 tile). ``band`` must be a multiple of
    ``tiles.mr``, of at least 2 tiles (a band of one leaves its tasks no loop along it)."""
    th, tw = tiles_hw(oh, ow)
    if band % tiles.mr or band < 2 or o % tiles.lanes:
        raise ValueError(f"a band of {band} tiles for register tiles {tiles}")
    if hp < TILE * th + 2 or wp < TILE * tw + 2:
        raise ValueError(f"input {hp}x{wp} too small for a {oh}x{ow} Winograd output")
    requantize = isinstance(epilogue, Requantize)
    if requantize and epilogue.residual is not None:
        raise ValueError("the Winograd output kernel adds no residual to a requantized sum")
    lanes, o_padded = tiles.lanes, tiles.o_padded
    tw_padded = -(-tw // band) * band
    pair, v_dtype, sum_dtype = (2, "int16", "int32") if int16 else (1, "float32", "float32")
    p = te.placeholder((n, hp, wp, c), p_dtype, name="P")

    def transformed(e, i, ty, tx, k):  # columns past the last tile repeat it
        tx = te.min(tx, tw - 1) if tw_padded > tw else tx
        return _patch_transform(p, e, i, ty, tx, k).astype(v_dtype)

    v = te.compute((16, n, th, tw_padded, c), transformed, name="V")
    pairs = (pair,) if int16 else ()
    u = te.placeholder((16, o_padded // lanes, 1, 1, c // pair, lanes, *pairs), v_dtype, name="U")
    rc = te.reduce_axis((0, c // pair), name="rc")
    rq = [te.reduce_axis((0, pair), name="rq")] if int16 else []

    def product(e, i, ty, tx, j):
        a = v[e, i, ty, tx, rc * pair + rq[0] if int16 else rc]
        b = u[e, j // lanes, 0, 0, rc, j % lanes, *rq]
        return a.astype(sum_dtype) * b.astype(sum_dtype) if int16 else a * b

    shape = (16, n, th, tw_padded, o_padded)
    acc = te.compute(shape, lambda *i: te.sum(product(*i), axis=[rc, *rq]), name="mm")
    m = te.compute(shape, lambda *i: acc[i], name="M")

    def tile_sum(e, i, y, x, j):
        return m[e, i, y // TILE, x // TILE, j]

    args, out = _transformed_output(tile_sum, n, oh, ow, o, epilogue, sum_dtype)
    sch = Schedule(te.create_prim_func([p, u, *args, out]))
    _inline_output_sums(sch)
    i, y, x, j = sch.get_loops(sch.get_sblock("Y"))
    yo, yi = sch.split(y, [None, TILE])
    xo, xi = sch.split(x, [None, TILE])
    bx, tx = sch.split(xo, [None, band])
    jo, ji = sch.split(j, [None, lanes])
    sch.reorder(i, yo, bx, tx, jo, yi, xi, ji)
    task = sch.fuse(i, yo, bx)
    sch.parallel(task)
    sch.unroll(yi)
    sch.unroll(xi)
    sch.vectorize(ji)
    for block in ("M", "mm", "V"):  # each task computes its tiles' V, sums and M
        sch.compute_at(sch.get_sblock(block), task)
    intrin = None
    if int16:
        from tvmq.kernels.x86_madd_intrin import register_madd_intrin

        intrin = register_madd_intrin()
    mm = sch.get_sblock("mm")
    register_tile(sch, mm, sch.get_sblock("M"), tiles, False, pair_intrin=intrin, fixed=1)
    v_block = sch.get_sblock("V")
    e, t, k = sch.get_loops(v_block)[1:]
    a, b = sch.split(e, [4, 4])
    ko, ki = sch.split(k, [None, _transform_vector(v_dtype, c, lanes)])
    sch.reorder(t, ko, a, b, ki)
    sch.unroll(a)
    sch.unroll(b)
    sch.vectorize(ki)
    return _finish(sch, "winograd_fused")


def _finish(sch: Schedule, name: str) -> tvm.tirx.PrimFunc:
    return (
        sch.mod["main"]
        .with_attr("tirx.is_scheduled", True)
        .with_attr(KERNEL_ATTR, name)
        .without_attr("global_symbol")
    )
