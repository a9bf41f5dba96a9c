"""CPU float32 conv2d: NHWC activations x packed weights, a register-blocked direct convolution.

A conv2d (``groups`` 1) over a zero-padded NHWC image ``P`` and an OIHW weight ``W``::

    Y[b, y, x, o] = sum_{ky, kx, c} P[b, y * sh + ky * dh, x * sw + kx * dw, c] * W[o, c, ky, kx]

The weight is packed once at compile time by :func:`pack_conv_weight` into
``[O/L, KH, KW, C, L]`` (``L`` float lanes of the target's SIMD registers: 16 with AVX-512,
8 with AVX2, 4 with NEON), so the ``L`` output channels one vector register holds are
contiguous for every ``(ky, kx, c)``. :func:`float_conv2d_nhwc` builds the scheduled TIR:

- each task owns an ``mr x (nr * L)`` output tile: ``mr`` neighbouring pixels of one output
  row times ``nr`` channel vectors, ``mr * nr`` accumulators kept in registers (at most 28
  of AVX-512's 32 zmm registers, 12 of AVX2's 16 ymm); it walks the whole ``(ky, kx, c)``
  reduction, each step one broadcast input value per pixel and ``nr`` weight vectors feeding
  ``mr * nr`` fused multiply-adds;
- tasks run ``parallel`` over (channel tiles, images, rows, pixel tiles), channel tiles
  outermost so that neighbouring tasks share the weight panel in cache;
- no im2col: the patch is read in place from ``P`` (the caller pads the image first,
  including the extra columns a padded output width reads).

A dense layer is the 1x1 case (``P`` of shape ``(1, 1, M, K)``). Shapes must be padded:
``O % (nr * L) == 0`` and ``OW % mr == 0`` (:func:`choose_conv_tiles` says how far).
The kernel is marked ``tirx.is_scheduled`` and :data:`KERNEL_ATTR` ``"float_conv2d_nhwc"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import LoopRV, SBlockRV

from tvmq.kernels._tiling import (
    HALF_WIDTH_ACCUMULATORS,
    half_width_avx512,
    round_up,
    simd_bits,
    target_cores,
)
from tvmq.kernels.fast_math import activation_f32
from tvmq.kernels.x86_int8 import KERNEL_ATTR, Requantize, requantize_value

# Below this many multiply-adds (~4 us of one core's FMAs) a parallel launch (~2 us to fork
# and join a 2-thread pool) costs more than it saves.
_PARALLEL_MIN_MACS = 1 << 18
# A depthwise conv loads its input for every tap: about half the multiply-adds per cycle.
_DEPTHWISE_PARALLEL_MIN_MACS = 1 << 17

CLAMP_MAX_ROWS = 9
"""1x1 callers whose register tile has at most this many rows read their input unpadded
(``clamp_columns``): each clamped row costs the reduction loop a pointer register. On one
core, DeiT's shapes: 6-9 rows ran as fast clamped as on a padded copy (192- and 768-deep,
192 columns; 768 columns ~2% slower, about the pad it saves); the 14-row tile of Q @ K^T
4-10% slower."""
_MAX_CHANNEL_VECTORS = 4


@dataclass(frozen=True)
class ConvTiles:
    """Register tile: ``mr`` output pixels x ``nr`` vectors of ``lanes`` output channels."""

    mr: int
    nr: int
    lanes: int
    ow_padded: int
    o_padded: int


def simd_lanes_and_registers(target: tvm.target.Target | None) -> tuple[int, int] | None:
    """``(float32 lanes, vector registers)`` of an LLVM CPU target (None: the current
    target); None when it has no SIMD unit worth a kernel (or is not an LLVM target)."""
    if target is None:
        target = tvm.target.Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return None
    from tvm.target.codegen import target_has_features

    bits = simd_bits(target)
    if bits < 128:
        return None
    try:
        is_x86 = bool(target_has_features("sse2", target))
    except (RuntimeError, ValueError):  # TVM's errors (tvm.error has no TVMError in 0.27)
        is_x86 = False
    lanes = bits // 32
    # x86: 32 zmm with AVX-512, 16 xmm/ymm before it; aarch64 NEON / SVE: 32.
    registers = 32 if (not is_x86 or bits >= 512) else 16
    return lanes, registers


_FEW_REGISTERS = 16
"""Vector registers (AVX2's 16 ymm) at or below which a tile keeps half of them for
accumulators (see :func:`choose_conv_tiles`)."""


def choose_conv_tiles(
    ow: int,
    o: int,
    lanes: int,
    registers: int,
    *,
    epilogue: bool = False,
    pad_channels: bool = False,
    short: bool = False,
    few_register_cap: int | None = None,
    max_channel_vectors: int = _MAX_CHANNEL_VECTORS,
) -> ConvTiles:
    """The register tile for an output ``ow`` pixels wide with ``o`` channels.

    For each ``nr`` (channel vectors, 4..1, dividing the padded channel count) the pixel
    count ``mr`` is the largest divisor of ``ow`` within the accumulator budget
    (``registers - 4``; with an `epilogue` ``registers - nr - 1``), or, when that divisor is small (below 4 while ``ow`` is not), the
    largest ``mr`` that fits with ``ow`` padded up to a multiple of it. Each reduction step
    issues ``mr * nr`` multiply-adds (two a cycle) and ``mr + nr`` loads (about 1.5 a
    cycle with broadcasts); the tile whose multiply-adds are least held up by its loads and
    least wasted on padded pixels wins, then the one with more accumulators, then more
    channel vectors (fewer broadcasts). With ``pad_channels`` the channels are padded to a
    multiple of ``nr`` vectors (not only of one), the padded channels counted as waste too:
    for a prime ``o`` such as DeiT's 197 tokens ``nr`` could otherwise only be 1.

    On a :func:`~tvmq.kernels._tiling.half_width_avx512` CPU (the current target; AMD Zen 4)
    the tile keeps at most ``HALF_WIDTH_ACCUMULATORS`` (14) accumulators: 7x2 ran at
    108-115 GFLOP/s on ResNet's and UNet's convs there (95% of the core's peak), the
    28-accumulator 14x2 at 76-113. With 16 vector registers (AVX2) it keeps at most 8: on an
    AMD Zen 1 core (one 256-bit FMA a cycle), 3x3 convs without an epilogue over ResNet-18's
    four stages ran at 35-39 GFLOP/s with 2x4 or 4x2 tiles, at 25-32 with the 12-accumulator
    3x4 and 21-35 with 6x2 (1 thread, each conv alone); ``few_register_cap`` sets another
    limit and ``max_channel_vectors`` caps ``nr`` (:func:`choose_int16_tiles`). A ``short`` reduction
    (:func:`short_reduction`) keeps at most 14 on any AVX-512 CPU too.
    """
    budget = registers - 4
    half_width = lanes == 16 and (short or half_width_avx512())
    best = None
    for nr in range(min(max_channel_vectors, budget), 0, -1):
        o_padded = round_up(o, nr * lanes if pad_channels else lanes)
        if o_padded // lanes % nr:
            continue
        # With an epilogue every register counts (mr * nr accumulators, nr weight vectors,
        # one broadcast): the 28-accumulator AVX-512 tile then spilled in the reduction loop
        # (1.2-1.3x slower). Without one, that tile (one spill) measured as fast or faster.
        cap = max(1, (registers - nr - 1 if epilogue else budget) // nr)
        if half_width:
            cap = max(1, min(cap, HALF_WIDTH_ACCUMULATORS // nr))
        if registers <= _FEW_REGISTERS:
            cap = max(1, min(cap, (few_register_cap or registers // 2) // nr))
        mr = next(d for d in range(min(cap, ow), 0, -1) if ow % d == 0)
        ow_padded = ow
        if mr < min(4, ow):
            mr = min(cap, ow)
            ow_padded = round_up(ow, mr)
        fma_cycles = mr * nr / 2
        busy = fma_cycles / max(fma_cycles, (mr + nr) / 1.5) * ow / ow_padded
        if pad_channels:
            busy *= o / o_padded
        score = (round(busy, 3), mr * nr, nr)
        if best is None or score > best[0]:
            best = (score, ConvTiles(mr, nr, lanes, ow_padded, o_padded))
    return best[1]


_INT16_ACCUMULATORS = 12
"""Accumulator registers of the int16 kernel's tile (:func:`choose_int16_tiles`)."""


def choose_int16_tiles(ow: int, o: int) -> ConvTiles:
    """The register tile of the int16 (``vpmaddwd``, AVX2) kernel: up to 12 accumulators of at
    most 3 channel vectors. On an AMD Zen 3 core (1 thread) MiniLM's dense shapes ran at
    143-153 GOP/s with 4x3, 6x2 or 5x2 tiles, 126-145 with the float tiles' 2x4 / 4x2 and
    124-128 with 3x4.

    Where that tile pads ``ow`` by more than 5%, the pixel count is the one of 4 or more that
    pads it least: there the int16 tiles ran at about the same rate whatever their loads
    (``7x1`` as fast as ``5x2``), so padded pixels are the waste that counts. ResNet-50's
    14x14 stride-2 3x3 256 -> 256, ``6x2`` over 18 pixels a row -> ``5x2`` over 15: 2082 ->
    1734 us; its Winograd matmuls over 49 tiles, ``6x2`` over 54 -> ``5x2`` over 50: 59 -> 54
    us (256 channels) and 243 -> 235 (512; best of 9 / 5 interleaved runs alone)."""
    tiles = choose_conv_tiles(
        ow, o, 8, 16, few_register_cap=_INT16_ACCUMULATORS, max_channel_vectors=3
    )
    if tiles.ow_padded * 20 <= ow * 21:
        return tiles
    cap = _INT16_ACCUMULATORS // tiles.nr
    mr = min(range(min(4, cap, ow), min(cap, ow) + 1), key=lambda m: (round_up(ow, m), -m))
    return ConvTiles(mr, tiles.nr, tiles.lanes, round_up(ow, mr), tiles.o_padded)


SHORT_REDUCTION = 32
"""Multiply-adds per output at or below which a conv's reduction is short (see below)."""


def short_reduction(c: int, kh: int, kw: int) -> bool:
    """Whether a conv over ``c`` input channels with a ``kh x kw`` window sums so few products
    per output (:data:`SHORT_REDUCTION`, or an image of at most 4 channels) that a register
    tile of more than 14 accumulators loses more to its stores and spills than it saves in
    loads: on an Intel Xeon (Emerald Rapids, 1 thread, each conv alone, bias + ReLU) 14x2 /
    28x1 -> 7x2 / 14x1 took MobileNetV2's 3x3 stride-2 3 -> 32 stem 196.5 -> 172.1 us, its
    112x112 1x1 16 -> 96 425.9 -> 329.2 and 32 -> 16 184.0 -> 165.5, MobileNetV3's 3 -> 16
    stem 103.4 -> 96.1, ResNet-18's 7x7 3 -> 64 stem 1554 -> 1477; at 144-576 products
    (ResNet-18's 3x3 64 -> 64: 1479 -> 1540) the larger tile is as fast or faster."""
    return c * kh * kw <= SHORT_REDUCTION or c <= 4


def pack_conv_weight(w: np.ndarray, lanes: int, o_padded: int) -> np.ndarray:
    """An OIHW float32 weight as ``[O/L, KH, KW, C, L]``, zero-padded to ``o_padded``.

    ``packed[j, ky, kx, c, i] == w[j * L + i, c, ky, kx]`` (zero for padded channels).
    """
    if w.ndim != 4 or o_padded % lanes or o_padded < w.shape[0]:
        raise ValueError(f"cannot pack an OIHW weight {w.shape} into {o_padded} channels")
    o, c, kh, kw = w.shape
    padded = np.zeros((o_padded, c, kh, kw), dtype=np.float32)
    padded[:o] = w
    packed = padded.reshape(o_padded // lanes, lanes, c, kh, kw).transpose(0, 3, 4, 2, 1)
    return np.ascontiguousarray(packed)


@dataclass(frozen=True)
class ConvShape:
    """The shapes of :func:`float_conv2d_nhwc`: padded image, kernel window and output."""

    n: int
    hp: int  # padded image height and width
    wp: int
    c: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilation: tuple[int, int]
    oh: int


@dataclass(frozen=True)
class ConvEpilogue:
    """What a float conv kernel applies to each output before storing it:
    ``min(max(acc + bias[o], lo), hi)`` (``bias`` an extra ``(O,)`` argument; ReLU is
    ``lo=0``, ReLU6 ``lo=0, hi=6``). Fusing it saves a pass over the output in memory. With
    ``residual``, ``min(max((acc + bias[o]) + R[...], lo), hi)``: ``R`` (the output's shape)
    an extra argument after the bias, a ResNet block's skip connection added in the store.
    With an ``activation`` (:data:`~tvmq.kernels.fast_math.ACTIVATIONS`: SiLU, YOLO's and
    EfficientNet's; hardswish, MobileNetV3's), the sum ``v`` becomes ``activation(v)``
    before the bounds."""

    lo: float = float("-inf")
    hi: float = float("inf")
    residual: bool = False
    activation: str = ""

    def activate(self, v: tvm.tirx.PrimExpr) -> tvm.tirx.PrimExpr:
        """The activation and bounds applied to the biased (and residual) sum ``v``."""
        if self.activation:
            v = activation_f32(self.activation, v)
        if self.lo != float("-inf"):
            v = tvm.tirx.max(v, tvm.tirx.const(self.lo, "float32"))
        if self.hi != float("inf"):
            v = tvm.tirx.min(v, tvm.tirx.const(self.hi, "float32"))
        return v


def _bias(
    epilogue: ConvEpilogue | Requantize | None, channels: int, sum_dtype: str = "float32"
) -> list[te.Tensor]:
    """The per-channel arguments of a kernel's epilogue: ``bias (channels,)`` float32, or
    ``offset`` and ``multiplier`` float32 for a requantize, the offset of the kernel's
    ``sum_dtype`` (see :func:`_store`); none without."""
    if epilogue is None:
        return []
    if isinstance(epilogue, Requantize):
        return [
            te.placeholder((channels,), sum_dtype, name="offset"),
            te.placeholder((channels,), "float32", name="multiplier"),
        ]
    return [te.placeholder((channels,), "float32", name="bias")]


def round_to_bf16(v: tvm.tirx.PrimExpr) -> tvm.tirx.PrimExpr:
    """float32 -> bf16 bits (uint16), rounded to nearest even; NaN stays NaN (as
    :func:`~tvmq.kernels.x86_amx_bf16.bf16_bits` does in numpy)."""
    u32 = lambda c: tvm.tirx.const(c, "uint32")  # noqa: E731
    bits = tvm.tirx.reinterpret("uint32", v)
    rounded = (bits + u32(0x7FFF) + ((bits >> u32(16)) & u32(1))) >> u32(16)
    nan = (bits & u32(0x7FFFFFFF)) > u32(0x7F800000)
    return tvm.tirx.Select(nan, (bits >> u32(16)) | u32(0x40), rounded).astype("uint16")


def bf16_to_float32(bits: tvm.tirx.PrimExpr) -> tvm.tirx.PrimExpr:
    """bf16 bits (uint16) -> the float32 whose upper half they are (exact)."""
    shifted = bits.astype("uint32") << tvm.tirx.const(16, "uint32")
    return tvm.tirx.reinterpret("float32", shifted)


def _as_bf16(value):
    return lambda *i: round_to_bf16(value(*i))


def _store(
    acc: te.Tensor, args: list[te.Tensor], epilogue, out_pad=None, bf16_out: bool = False
) -> te.Tensor:
    """The stored output ``Y``: the accumulator plus the bias, clamped to the bounds; or
    requantized (:class:`~tvmq.kernels.x86_int8.Requantize`). With ``out_pad`` (top, left,
    bottom, right), ``Y`` is that much larger and :func:`border_value` around the result;
    with ``bf16_out`` each value is stored as bf16 bits (:func:`round_to_bf16`)."""
    value = _stored_value(acc, args, epilogue)
    if bf16_out:
        value = _as_bf16(value)
    if out_pad is None:
        return te.compute(acc.shape, value, name="Y")
    top, left, bottom, right = out_pad
    n, oh, ow, o = acc.shape

    def padded(b, y, x, j):
        inside = tvm.tirx.all(y >= top, y < top + oh, x >= left, x < left + ow)
        stored = value(b, y - top, x - left, j)
        fill = tvm.tirx.const(border_value(epilogue), str(stored.ty))
        return tvm.tirx.if_then_else(inside, stored, fill)

    shape = (n, top + oh + bottom, left + ow + right, o)
    return te.compute(shape, padded, name="Y")


def border_value(epilogue) -> float:
    """What a bordered output holds around the result: 0, the padding of a float conv; a
    requantize's zero point (stored as float32), the padding of an int8 one."""
    return float(epilogue.zero_point) if isinstance(epilogue, Requantize) else 0.0


def _stored_value(acc: te.Tensor, args: list[te.Tensor], epilogue):
    """``value(*i)``: the element of ``Y`` at ``i`` (see :func:`_store`)."""
    if isinstance(epilogue, Requantize):
        # An int32 sum takes an int32 offset. A float32 sum of bytes (Int8AsFloat's convs) is
        # an integer (exact below 2**24) and takes a float32 offset: their float32 add rounds
        # the exact sum once, as float32(int32(sum) + offset) did, with two conversions less
        # per vector (MobileNetV2's 1x1 requantizing kernels 4-10% faster on a Zen 1 core).
        # The same bits while the offset is a float32 integer (|offset| <= 2**24; beyond,
        # off by one unit of a sum whose multiplier is then below 2**-17 of an output step).
        off, mult = args
        if off.dtype == "int32" and acc.dtype == "float32":  # exact integers: int32 again
            return lambda *i: requantize_value(
                acc[i].astype("int32") + off[i[-1]], mult[i[-1]], epilogue
            )
        if off.dtype != acc.dtype:
            raise ValueError(f"a {acc.dtype} sum takes a {acc.dtype} offset, not {off.dtype}")
        return lambda *i: requantize_value(acc[i] + off[i[-1]], mult[i[-1]], epilogue)

    def value(*i):
        v = acc[i] if not args else acc[i] + args[0][i[-1]]
        if epilogue is not None and epilogue.residual:
            v = v + args[1][i]
        return v if epilogue is None else epilogue.activate(v)

    return value


def float_conv2d_nhwc(
    shape: ConvShape,
    tiles: ConvTiles,
    epilogue: ConvEpilogue | Requantize | None = None,
    *,
    batched_weight: bool = False,
    clamp_columns: bool = False,
    pixel_major: bool = False,
    out_pad: tuple[int, int, int, int] | None = None,
    int16: bool = False,
) -> tvm.tirx.PrimFunc:
    """Scheduled kernel ``(P (n, hp, wp, c), W (O/L, KH, KW, c, L)) -> Y (n, oh, OW, O)``.

    ``OW`` and ``O`` are ``tiles.ow_padded`` / ``tiles.o_padded``; ``P`` must be wide
    enough for the padded output width (``(OW - 1) * sw + (KW - 1) * dw + 1`` columns).
    With an `epilogue`, a ``bias (O,)`` argument follows ``W`` (and a ``residual``, ``Y``'s
    shape, the bias); with a :class:`~tvmq.kernels.x86_int8.Requantize` (no residual, no
    ``out_pad``), ``offset (O,) float32, multiplier (O,) float32``: the float32 sum, an exact
    integer when ``P`` and ``W`` hold bytes (:class:`~tvmq.passes.Int8AsFloat`), plus the
    offset is requantized before the store (``Y`` int8 / uint8, or float32 for a
    dequantize). With ``batched_weight``,
    ``W`` has one panel set per image, ``(n, O/L, KH, KW, c, L)``: the 1x1 case is then a
    batch matmul of two activations (kernel attribute ``"float_batch_matmul"``). With
    ``clamp_columns``, ``P`` may be narrower than the padded output reads: those reads take
    its last column instead (the output columns past the unpadded width are then copies,
    which the caller slices off), so a 1x1 caller needs no padded copy of ``P``. With
    ``pixel_major``, neighbouring tasks take the channel tiles of one pixel tile instead of the
    pixel tiles of one channel tile (see :func:`pixel_major_pays`). With ``out_pad`` (top,
    left, bottom, right), ``Y`` is ``(n, top + oh + bottom, left + OW + right, O)``, the
    result zero-bordered: the padded input of a next conv, which then needs no pad of its own
    (the caller sees that ``OW`` and ``O`` are the unpadded sizes, or the tile's padding would
    land in the border).

    With ``int16`` (AVX2: 8 int32 lanes), ``P`` is int16, ``c`` even, ``W`` int16
    ``(O/L, KH, KW, c/2, L, 2)`` (:func:`pack_conv_weight_pairs`) and the sums exact int32:
    each reduction step multiplies a pair of channels by one ``vpmaddwd``
    (:mod:`~tvmq.kernels.x86_madd_intrin`). ``Y`` holds them, or their requantize (an int32
    ``offset``); no other epilogue. A batched ``W`` is ``(n, O/L, KH, KW, c/2, L, 2)``.
    """
    n, hp, wp, c, oh = shape.n, shape.hp, shape.wp, shape.c, shape.oh
    (kh, kw), (sh, sw), (dh, dw) = shape.kernel, shape.strides, shape.dilation
    ow, o, lanes = tiles.ow_padded, tiles.o_padded, tiles.lanes
    pair, dtype, sum_dtype = (1, "float32", "float32")
    if int16:
        from tvmq.kernels.x86_madd_intrin import LANES, PAIR, register_madd_intrin

        pair, dtype, sum_dtype = PAIR, "int16", "int32"
        if c % PAIR or not isinstance(epilogue, (Requantize, type(None))):
            raise ValueError("an int16 conv kernel takes an even channel count, no extras")
        if lanes != LANES:
            raise ValueError(f"an int16 conv kernel has {LANES} int32 lanes, not {lanes}")
    if ow % tiles.mr or o % (tiles.nr * lanes):
        raise ValueError(f"unpadded output {ow}x{o} for tiles {tiles}")
    too_narrow = (ow - 1) * sw + (kw - 1) * dw + 1 > wp and not clamp_columns
    if too_narrow or (oh - 1) * sh + (kh - 1) * dh + 1 > hp:
        raise ValueError(f"image {hp}x{wp} too small for output {oh}x{ow} of {shape}")
    if kh * kw * (c // pair) < 2:
        raise ValueError("a reduction of one element (pair) is a scale, not a convolution")
    p = te.placeholder((n, hp, wp, c), dtype, name="P")

    def column(x):
        return te.min(x, wp - 1) if clamp_columns else x

    pairs = (pair,) if int16 else ()  # int16: channel pairs innermost in the panels
    w_shape = (o // lanes, kh, kw, c // pair, lanes, *pairs)
    w = te.placeholder((n, *w_shape) if batched_weight else w_shape, dtype, name="W")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    rc = te.reduce_axis((0, c // pair), name="rc")
    rq = [te.reduce_axis((0, pair), name="rq")] if int16 else []
    if isinstance(epilogue, Requantize) and epilogue.residual:
        raise ValueError("a requantizing float conv kernel adds no residual")
    if isinstance(epilogue, Requantize) and out_pad is not None and not epilogue.stored_as:
        raise ValueError("a requantizing conv kernel borders only a float32 / int16 result")
    bias = _bias(epilogue, o, sum_dtype)
    if epilogue is not None and epilogue.residual:
        bias.append(te.placeholder((n, oh, ow, o), "float32", name="residual"))

    def product(b, y, x, j):
        channel = rc * pair + rq[0] if int16 else rc
        panel = (j // lanes, ry, rx, rc, j % lanes, *rq)
        a = p[b, y * sh + ry * dh, column(x * sw + rx * dw), channel]
        v = w[(b, *panel)] if batched_weight else w[panel]
        return a.astype(sum_dtype) * v.astype(sum_dtype) if int16 else a * v

    acc = te.compute(
        (n, oh, ow, o),
        lambda b, y, x, j: te.sum(product(b, y, x, j), axis=[ry, rx, rc, *rq]),
        name="acc",
    )
    func = te.create_prim_func([p, w, *bias, _store(acc, bias, epilogue, out_pad)])
    macs = n * oh * ow * o * kh * kw * c
    kind = "int16" if int16 else "float"
    name = f"{kind}_batch_matmul" if batched_weight else f"{kind}_conv2d_nhwc"
    parallel = macs >= _PARALLEL_MIN_MACS
    fill = border_value(epilogue)
    intrin = register_madd_intrin() if int16 else None
    return _schedule(func, tiles, parallel, name, pixel_major, out_pad, fill, pair_intrin=intrin)


def pack_conv_weight_pairs(w: np.ndarray, lanes: int, o_padded: int) -> np.ndarray:
    """An OIHW weight of integers (``C`` even) as int16 ``[O/L, KH, KW, C/2, L, 2]``, zero-padded
    to ``o_padded``: ``packed[j, ky, kx, q, i, r] == w[j * L + i, 2 * q + r, ky, kx]``."""
    if w.ndim != 4 or w.shape[1] % 2:
        raise ValueError(f"cannot pack an OIHW weight {w.shape} in channel pairs")
    packed = pack_conv_weight(w.astype(np.float32), lanes, o_padded)  # [O/L, KH, KW, C, L]
    j, kh, kw, c, lanes = packed.shape
    pairs = packed.reshape(j, kh, kw, c // 2, 2, lanes).transpose(0, 1, 2, 3, 5, 4)
    return np.ascontiguousarray(pairs).astype(np.int16)


def pixel_major_pays(kernel: tuple[int, int], weight_bytes: int) -> bool:
    """Whether a conv runs its tasks pixel tile by pixel tile (each reads its input pixels
    once, from L1, for every channel tile, and writes whole output rows) rather than channel
    tile by channel tile (each channel panel reused from cache by every pixel tile): 1x1
    convs over at most 512 KB of weights. In ResNet-50 (1 thread, in situ): 56x56 64->256 with
    a residual 1.06 -> 0.80 ms, 56x56 256->128 1.45 -> 1.26, 64->256 0.73 -> 0.65, 28x28
    128->512 and 256->64 3-4% faster; 14x14 256->1024 (1 MB) 2% slower; 3x3 convs gain
    nothing alone and over megabytes of weights lose 1.5x."""
    return kernel == (1, 1) and weight_bytes <= 512 << 10


def rows_tiles(n: int, lanes: int, registers: int) -> ConvTiles:
    """The register tile of :func:`float_dense_rows`: the best for a large row count."""
    return choose_conv_tiles(720, n, lanes, registers)  # 720: divisible by 1..6, 8, 9, 10


def float_dense_rows(k: int, tiles: ConvTiles) -> tvm.tirx.PrimFunc:
    """The 1x1 :func:`float_conv2d_nhwc` as a dense for a run-time row count.

    ``(X (1, 1, M, k), W (O/L, 1, 1, k, L), mo) -> Y (1, 1, M, O)`` with ``M = tiles.mr * mo``
    and ``mo`` an int64 scalar (the caller pads its rows to a multiple of ``tiles.mr``); the
    same register tile and schedule as the static kernel, every loop int64.
    """
    mo = tvm.tirx.Var("mo", "int64")
    i64 = lambda v: tvm.tirx.IntImm("int64", v)  # noqa: E731
    one, m, kk, o, lanes = i64(1), mo * tiles.mr, i64(k), i64(tiles.o_padded), tiles.lanes
    p = te.placeholder((one, one, m, kk), "float32", name="P")
    w = te.placeholder((o // lanes, one, one, kk, i64(lanes)), "float32", name="W")
    ry, rx = te.reduce_axis((0, one), name="ry"), te.reduce_axis((0, one), name="rx")
    rc = te.reduce_axis((0, kk), name="rc")
    acc = te.compute(
        (one, one, m, o),
        lambda b, y, x, j: te.sum(
            p[b, y + ry, x + rx, rc] * w[j // lanes, ry, rx, rc, j % lanes], axis=[ry, rx, rc]
        ),
        name="acc",
    )
    out = te.compute((one, one, m, o), lambda b, y, x, j: acc[b, y, x, j], name="Y")
    func = te.create_prim_func([p, w, mo, out])
    return _schedule(func, tiles, parallel=True, name="float_dense_rows")


def _schedule(
    func: tvm.tirx.PrimFunc,
    tiles: ConvTiles,
    parallel: bool,
    name: str,
    pixel_major: bool = False,
    out_pad: tuple[int, int, int, int] | None = None,
    fill: float = 0.0,
    unroll_taps: bool = False,
    pair_intrin: str | None = None,
) -> tvm.tirx.PrimFunc:
    sch = Schedule(func)
    acc, out = sch.get_sblock("acc"), sch.get_sblock("Y")
    if out_pad is not None:
        # "Y" then writes the result into the border's inside; "Y_pad_const" fills all of
        # Y first, which _fill_only_the_border narrows to the border.
        sch.decompose_padding(out, sch.get_loops(out)[0])
        out = sch.get_sblock("Y")
    register_tile(sch, acc, out, tiles, parallel, pixel_major, pair_intrin, unroll_taps)
    func = sch.mod["main"]
    if out_pad is not None:
        func = _fill_only_the_border(func, out_pad, fill, tiles.lanes)
    return (
        func.with_attr("tirx.is_scheduled", True)
        .with_attr(KERNEL_ATTR, name)
        .without_attr("global_symbol")
    )


def register_tile(
    sch: Schedule,
    acc: SBlockRV,
    out: SBlockRV,
    tiles: ConvTiles,
    parallel: bool,
    pixel_major: bool = False,
    pair_intrin: str | None = None,
    unroll_taps: bool = False,
    fixed: int = 0,
) -> LoopRV:
    """The register-tiled reduction of the conv kernels: ``out``'s loops (after its first
    ``fixed``, which stay outermost) are ``(..., x, j)``; ``x`` splits into ``mr`` pixels and
    ``j`` into ``nr`` vectors of ``lanes`` channels, and the accumulator ``acc`` (its
    reduction loops innermost: taps, channels, [the int16 pair]) is computed one tile at a
    time in registers. Returns the task loops fused into one (``parallel``: across the
    threads)."""
    loops = sch.get_loops(out)
    *outer, x, j = loops[fixed:]
    xo, xi = sch.split(x, [None, tiles.mr])
    jo, ji = sch.split(j, [None, tiles.nr * tiles.lanes])
    tasks = [*outer, xo, jo] if pixel_major else [jo, *outer, xo]
    sch.reorder(*tasks, xi, ji)
    # The accumulator shrinks to one mr x (nr * L) tile per task.
    sch.compute_at(acc, tasks[-1])
    # compute_at drops unit loops: the pixel loop is there only when mr > 1, and a 1x1
    # kernel has no ky / kx loops.
    loops = sch.get_loops(acc)[fixed + len(tasks) :]
    rows = loops[:1] if tiles.mr > 1 else []
    channels, reduction = loops[len(rows)], loops[len(rows) + 1 :]
    ni, nv = sch.split(channels, [tiles.nr, tiles.lanes])
    # A pair intrinsic (int16) reduces the last reduction loop, the pair, inside the lanes.
    pairs = reduction[-1:] if pair_intrin else []
    sch.reorder(*reduction[: len(reduction) - len(pairs)], *rows, ni, nv, *pairs)
    fused = sch.fuse(*tasks)
    if parallel:
        sch.parallel(fused)
    if not pair_intrin:
        sch.vectorize(nv)
    init = sch.decompose_reduction(acc, reduction[0])
    if pair_intrin:
        sch.tensorize(nv, pair_intrin)
    for loop in (*rows, ni):
        sch.unroll(loop)
    if unroll_taps:  # pixel x's tap kx + 1 is pixel x + 1's tap kx: LLVM reads it once
        sch.unroll(reduction[-1])
    sch.vectorize(sch.get_loops(init)[-1])
    vo, vj = sch.split(ji, [None, tiles.lanes])
    sch.vectorize(vj)
    # The store loops unrolled too, so that LLVM keeps the accumulator tile in registers
    # (with a bias add in them it kept the tile on the stack: 1.5x slower).
    for loop in (*([xi] if tiles.mr > 1 else []), vo):
        sch.unroll(loop)
    return fused


def _fill_only_the_border(
    func: tvm.tirx.PrimFunc, out_pad: tuple[int, int, int, int], fill: float, lanes: int
) -> tvm.tirx.PrimFunc:
    """``func`` with its first statement, the filling of all of its output ``Y`` (n, H, W,
    C) with ``fill`` before the result is written inside, replaced by loops that fill only
    the ``out_pad`` border (top and bottom rows, then the left and right columns between
    them): per border row one loop over its contiguous values, in SIMD vectors of up to
    ``lanes``. (Nested pixel x channel loops with a non-zero ``fill``, which LLVM cannot
    make a memset, took it 20-26 s to compile for 18 x 18 x 672; one loop a row, 0.13 s.)"""
    from tvm import tirx
    from tvm.s_tir import SBlock, SBlockRealize

    y = func.params[-1]  # a buffer var
    n, h, w, c = (int(d) for d in y.shape)
    top, left, bottom, right = out_pad
    regions = [  # (row start, rows, column start, columns)
        (0, top, 0, w),
        (h - bottom, bottom, 0, w),
        (top, h - top - bottom, 0, left),
        (top, h - top - bottom, w - right, right),
    ]
    vector = math.gcd(c, lanes)
    filling = []
    for y0, rows, x0, cols in regions:
        if rows * cols == 0:
            continue
        # each row's cols x C values are contiguous: one loop over them
        b, i, e, v = (tirx.Var(name, "int32") for name in "biev")
        per_pixel = c // vector
        where = [b, i + y0, x0 + e // per_pixel, e % per_pixel * vector + v]
        stmt = tirx.BufferStore(y, tirx.const(fill, y.dtype), where)
        stmt = tirx.For(v, 0, vector, tirx.ForKind.VECTORIZED, stmt)
        for var, extent in ((e, cols * per_pixel), (i, rows), (b, n)):
            stmt = tirx.For(var, 0, extent, tirx.ForKind.SERIAL, stmt)
        filling.append(stmt)
    root = func.body.block
    fill, *rest = root.body.seq
    while isinstance(fill, tirx.For):  # decompose_padding puts the fill first
        fill = fill.body
    if getattr(getattr(fill, "block", None), "name_hint", None) != "Y_pad_const":
        raise RuntimeError("the bordered conv kernel lost its border fill")
    body = tirx.SeqStmt([*filling, *rest])
    block = SBlock(
        root.iter_vars, root.reads, root.writes, root.name_hint, body, root.init,
        root.alloc_buffers, root.match_buffers, root.annotations,
    )  # fmt: skip
    return func.with_body(SBlockRealize(func.body.iter_values, func.body.predicate, block))


COSTLY_ACTIVATIONS = ("silu", "gelu")
"""The activations (:data:`~tvmq.kernels.fast_math.ACTIVATIONS`) whose store costs more than
the conv's loads in a depthwise kernel (an exponential or a rational and a divide per
element): :func:`choose_depthwise_tiles` gives them a smaller tile."""


@dataclass(frozen=True)
class DepthwiseTiles:
    """Register tile of the depthwise kernel: ``mr`` pixels x ``nr`` vectors of ``lanes``."""

    mr: int
    nr: int
    lanes: int
    ow_padded: int


def choose_depthwise_tiles(
    ow: int, c: int, lanes: int, registers: int, activation: str = ""
) -> DepthwiseTiles | None:
    """The tile for a depthwise conv ``ow`` pixels wide over ``c`` channels, or None when no
    vector of at least 4 lanes divides ``c``. Each pixel of the tile needs one input vector
    per channel vector besides its accumulator, so the budget is half that of a conv.

    The widest tile (6 accumulators on AVX2) pads the output width when no divisor of it
    fits; a tile of 4 accumulators that divides ``ow`` then comes first: its output needs
    no padded columns, so no copy slices them off after the kernel (a pass over the output:
    0.06-0.09 ms beside kernels of 0.37-1.3 ms below, warm in cache; more in a model).
    With a ReLU6 store 4 pixels x 1 vector is the faster of those two, with an
    ``activation`` of :data:`COSTLY_ACTIVATIONS` 2 x 2. On a Zen 1 core (AVX2),
    EfficientNet-B0's 112x112x96 stride-2 SiLU kernel took 0.74-0.82 ms on 2 x 2, 0.93-1.15
    on 4 x 1, 0.93-1.30 on 3 x 2 (padded to 57 columns) + 0.06 for the slice;
    MobileNetV2's ReLU6 one 0.53-0.70 on 3 x 2 + 0.06, 0.68-0.74 on 4 x 1, 0.77-1.15 on
    2 x 2; 56x56x144 ReLU6 0.41 on 4 x 1 vs 0.37 + 0.08 padded."""
    while lanes >= 4 and c % lanes:
        lanes //= 2
    if lanes < 4:
        return None
    vectors = c // lanes
    budget = (registers - 4) // 2
    nr = next(r for r in (2, 1) if vectors % r == 0)
    cap = max(1, budget // nr)
    mr = next(d for d in range(min(cap, ow), 0, -1) if ow % d == 0)
    if mr >= min(4, ow):
        return DepthwiseTiles(mr, nr, lanes, ow)
    widest = DepthwiseTiles(min(cap, ow), nr, lanes, round_up(ow, min(cap, ow)))
    if widest.ow_padded != ow:
        costly = activation in COSTLY_ACTIVATIONS
        for t_mr, t_nr in ((2, 2), (4, 1)) if costly else ((4, 1), (2, 2)):
            if vectors % t_nr == 0 and ow % t_mr == 0 and t_mr * t_nr <= budget:
                return DepthwiseTiles(t_mr, t_nr, lanes, ow)
    return widest


def float_depthwise_nhwc(
    shape: ConvShape,
    tiles: DepthwiseTiles,
    x_dtype: str = "float32",
    epilogue: ConvEpilogue | Requantize | None = None,
    pad: tuple[int, int, int, int] | None = None,
    bf16_out: bool = False,
    pad_value: float = 0.0,
    out_pad: tuple[int, int, int, int] | None = None,
) -> tvm.tirx.PrimFunc:
    """Scheduled kernel ``(P (n, hp, wp, c), W (KH, KW, c)) -> Y (n, oh, OW, c)``: a
    depthwise conv (one filter per channel) over a padded NHWC image (float32, or bf16 bits
    as ``uint16``; or uint8 / int8 data with int8 weights and an exact int32 result, summed in
    float32 where that is exact), ``OW`` =
    ``tiles.ow_padded``; vectorized over channels, ``mr`` pixels x ``nr`` channel vectors
    of accumulators per task. With an `epilogue`, its arguments follow ``W``: ``bias (c,)``
    for a float32 :class:`ConvEpilogue`; ``offset (c,)`` (int32 for int8 weights, float32
    for float32 ones), ``multiplier (c,) float32`` for an int8
    :class:`~tvmq.kernels.x86_int8.Requantize` (the result is then int8 / uint8).
    With ``pad`` (top, left, bottom, right), ``P`` is the image without its zero padding
    (``hp - top - bottom`` x ``wp - left - right``): the kernel skips the taps that fall in
    it (a branch per tap and pixel, on scalars) instead of reading a padded copy, which
    costs a pass over the image in memory as long as the conv itself; a tap there reads
    ``pad_value`` (an int8 model's zero point). ``bf16_out``: a float32
    result is stored as bf16 bits (the input of a bf16 AMX conv, ``precision="bf16"``).
    ``out_pad``: ``Y`` with a border around the result, as :func:`float_conv2d_nhwc`'s (the
    padded input of an int8 AMX conv: MobileNetV2's projections read one row past the image;
    the caller sees that ``OW`` is the unpadded width)."""
    n, hp, wp, c, oh = shape.n, shape.hp, shape.wp, shape.c, shape.oh
    (kh, kw), (sh, sw), (dh, dw) = shape.kernel, shape.strides, shape.dilation
    ow, lanes = tiles.ow_padded, tiles.lanes
    if ow % tiles.mr or c % (tiles.nr * lanes):
        raise ValueError(f"unpadded output {ow}x{c} for tiles {tiles}")
    if (ow - 1) * sw + (kw - 1) * dw + 1 > wp or (oh - 1) * sh + (kh - 1) * dh + 1 > hp:
        raise ValueError(f"image {hp}x{wp} too small for output {oh}x{ow} of {shape}")
    if kh * kw < 2:
        raise ValueError("a 1x1 depthwise conv is a per-channel scale, not a convolution")
    # Bytes times int8 weights sum in float32 where every sum is an exact integer (under
    # 2**24): a float multiply-add a tap instead of an int32 multiply (two uops on one port)
    # and add; the result is the same int32. MobileNetV2 int8's depthwise convs (one thread,
    # an Intel Xeon with AVX-512) 1060 -> 966 us, 763 with the taps unrolled (_schedule).
    exact = kh * kw * 255 * 128 < 2**24
    if x_dtype in ("float32", "uint16"):  # uint16: bf16 bits, widened as they are read
        w_dtype, acc_dtype, name = "float32", "float32", "float_depthwise_nhwc"
    elif x_dtype in ("uint8", "int8"):
        w_dtype, acc_dtype, name = "int8", "float32" if exact else "int32", "int8_depthwise_nhwc"
    else:
        raise ValueError(f"depthwise kernel for float32, uint8 or int8 data, not {x_dtype}")
    top, left, bottom, right = pad or (0, 0, 0, 0)
    h, wd = hp - top - bottom, wp - left - right
    p = te.placeholder((n, h, wd, c), x_dtype, name="P")
    w = te.placeholder((kh, kw, c), w_dtype, name="W")

    def read(value):
        return bf16_to_float32(value) if x_dtype == "uint16" else value.astype(acc_dtype)

    def tap(b, yy, xx, j):  # image pixel (yy, xx) of the padded frame, 0 in the padding
        if pad is None:
            return read(p[b, yy, xx, j])
        inside = tvm.tirx.all(yy >= top, yy < top + h, xx >= left, xx < left + wd)
        value = read(p[b, yy - top, xx - left, j])
        return tvm.tirx.if_then_else(inside, value, tvm.tirx.const(pad_value, acc_dtype))

    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    if epilogue is not None and w_dtype == "int8" and not isinstance(epilogue, Requantize):
        raise ValueError("an int8 depthwise kernel takes a requantize, not a ConvEpilogue")
    bias = _bias(epilogue, c, "int32" if w_dtype == "int8" else "float32")
    acc = te.compute(
        (n, oh, ow, c),
        lambda b, y, x, j: te.sum(
            tap(b, y * sh + ry * dh, x * sw + rx * dw, j) * w[ry, rx, j].astype(acc_dtype),
            axis=[ry, rx],
        ),
        name="acc",
    )
    if epilogue is None and x_dtype in ("uint8", "int8"):  # the int32 sums themselves
        if out_pad is not None:
            raise ValueError("an int8 depthwise kernel borders only a requantized result")
        out = te.compute(acc.shape, lambda *i: acc[i].astype("int32"), name="Y")
    else:
        out = _store(acc, bias, epilogue, out_pad, bf16_out=bf16_out)
    func = te.create_prim_func([p, w, *bias, out])
    macs = n * oh * ow * c * kh * kw
    sch_tiles = ConvTiles(tiles.mr, tiles.nr, lanes, ow, c)
    # Float depthwise tasks run pixel tile by pixel tile, as the 1x1 convs around them
    # (pixel_major_pays): two threads then split a layer's rows the same way, so each reads
    # the rows its own core wrote, where channel tiles outermost read half of them from the
    # other core's cache. MobileNetV2 fp32 (Emerald Rapids, AVX-512) 2 threads 4.12 -> 3.40
    # ms, 1 thread 7.02 -> 6.93. An int8 kernel does too where the target has several
    # cores: channel tiles outermost, two threads write 16-byte pieces of the same cache
    # lines (each pixel's uint8 channels), and the 56x56x144 requantizing kernel ran 143 us
    # on one thread, 140 on two; pixel tiles outermost 167 and 87 (so one core keeps them).
    parallel = macs >= _DEPTHWISE_PARALLEL_MIN_MACS
    pixel_major = w_dtype == "float32" or target_cores() > 1
    return _schedule(
        func, sch_tiles, parallel, name, pixel_major, out_pad, border_value(epilogue), True
    )
