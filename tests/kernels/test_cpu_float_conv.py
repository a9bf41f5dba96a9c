"""The float conv kernel's task orders: the same bits either way, and which convs take which."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from test_x86_int8 import tasks_loop, with_cores

from tvmq.kernels.cpu_float_conv import (
    ConvEpilogue,
    ConvShape,
    DepthwiseTiles,
    choose_conv_tiles,
    choose_depthwise_tiles,
    float_conv2d_nhwc,
    float_depthwise_nhwc,
    pack_conv_weight,
    pixel_major_pays,
    short_reduction,
)
from tvmq.kernels.x86_int8 import Requantize
from tvmq.targets import get_target


def run_kernel(func, *arrays, out_shape, fill=0.0, dtype=np.float32):
    """Compile ``func`` for the host and run it on numpy ``arrays`` into a new ``dtype``
    output (``fill`` before the call)."""
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    lib = tvm.compile(mod, target=get_target("host").tvm_target())
    out = tvm.runtime.tensor(np.full(out_shape, fill, dtype))
    lib["main"](*(tvm.runtime.tensor(a) for a in arrays), out)
    return out.numpy()


@pytest.mark.parametrize("k,residual", [(1, True), (3, False)], ids=["1x1-residual", "3x3"])
def test_pixel_major_order_is_bit_identical(k, residual):
    """Tasks pixel tile by pixel tile compute each output's sum in the same order as channel
    tile by channel tile: the same float32 bits, and numpy's numbers."""
    rng = np.random.default_rng(k)
    hw, c, o = 12, 32, 64
    x = rng.standard_normal((1, hw + k - 1, hw + k - 1, c)).astype(np.float32)
    w = rng.standard_normal((o, c, k, k)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    r = rng.standard_normal((1, hw, hw, o)).astype(np.float32)
    shape = ConvShape(1, hw + k - 1, hw + k - 1, c, (k, k), (1, 1), (1, 1), hw)
    tiles = choose_conv_tiles(hw, o, 16, 32, epilogue=True)
    epilogue = ConvEpilogue(lo=0.0, residual=residual)
    args = [x, pack_conv_weight(w, 16, o), b] + ([r] if residual else [])
    out = (1, hw, hw, o)
    got = run_kernel(
        float_conv2d_nhwc(shape, tiles, epilogue, pixel_major=True), *args, out_shape=out
    )
    want = run_kernel(float_conv2d_nhwc(shape, tiles, epilogue), *args, out_shape=out)
    np.testing.assert_array_equal(got, want)
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))
    ref = np.einsum("nyxcij,ocij->nyxo", windows.astype(np.float64), w) + b
    ref = np.maximum(ref + r if residual else ref, 0.0)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("pixel_major", [False, True], ids=["channel-major", "pixel-major"])
def test_bordered_output_is_the_result_zero_padded(pixel_major):
    """``out_pad`` stores the same bits inside a zero border that the kernel writes itself
    (the output starts as NaN), whatever the border's sides and the task order."""
    rng = np.random.default_rng(7)
    h, w, c, o = 6, 16, 24, 32
    x = rng.standard_normal((1, h + 2, w + 2, c)).astype(np.float32)
    wt = pack_conv_weight(rng.standard_normal((o, c, 3, 3)).astype(np.float32), 16, o)
    b = rng.standard_normal(o).astype(np.float32)
    shape = ConvShape(1, h + 2, w + 2, c, (3, 3), (1, 1), (1, 1), h)
    tiles = choose_conv_tiles(w, o, 16, 32, epilogue=True)
    epilogue = ConvEpilogue(lo=0.0)
    plain = run_kernel(float_conv2d_nhwc(shape, tiles, epilogue), x, wt, b, out_shape=(1, h, w, o))
    border = (1, 2, 3, 5)  # top, left, bottom, right
    kernel = float_conv2d_nhwc(shape, tiles, epilogue, pixel_major=pixel_major, out_pad=border)
    out = (1, h + 4, w + 7, o)
    got = run_kernel(kernel, x, wt, b, out_shape=out, fill=np.nan)
    np.testing.assert_array_equal(got, np.pad(plain, ((0, 0), (1, 3), (2, 5), (0, 0))))


def test_pixel_major_for_1x1_convs_over_weights_in_l2():
    assert pixel_major_pays((1, 1), 64 << 10)  # ResNet-50's 56x56 64 -> 256
    assert pixel_major_pays((1, 1), 256 << 10)  # its 28x28 128 -> 512
    assert not pixel_major_pays((1, 1), 1 << 20)  # its 14x14 256 -> 1024: 2% slower
    assert not pixel_major_pays((3, 3), 147 << 10)  # 3x3 convs gain nothing
    assert not pixel_major_pays((1, 1), 4 << 20)  # 2048 -> 512: panels reused from cache


def test_short_reductions_keep_at_most_14_accumulators():
    """A conv summing few products per output (an image stem, a 1x1 conv over 16 or 32
    channels) takes a tile of at most 14 accumulators on AVX-512 (its stores and spills
    outweigh the loads a larger tile saves); a longer one keeps the larger tile."""
    assert short_reduction(3, 3, 3) and short_reduction(3, 7, 7) and short_reduction(32, 1, 1)
    assert not short_reduction(64, 1, 1) and not short_reduction(16, 3, 3)
    for ow, o in ((112, 16), (112, 32), (112, 96), (56, 80), (28, 192)):
        short = choose_conv_tiles(ow, o, 16, 32, epilogue=True, short=True)
        assert short.mr * short.nr <= 14 and short.ow_padded % short.mr == 0, (ow, o)
        wide = choose_conv_tiles(ow, o, 16, 32, epilogue=True)
        assert wide.mr * wide.nr > 14, (ow, o)
    # AVX2's 8-lane tiles keep their own cap
    assert choose_conv_tiles(112, 32, 8, 16, short=True) == choose_conv_tiles(112, 32, 8, 16)


def test_avx2_tiles_keep_half_the_registers_for_accumulators():
    """16 ymm registers: at most 8 accumulators with or without an epilogue (the 3x4 tile
    that ResNet-18's int8 convs took on AVX2 ran 1.3x slower than 2x4)."""
    for ow in (7, 14, 28, 56, 112, 128, 197):
        for o in (32, 64, 256, 512, 1536):
            for epilogue in (False, True):
                t = choose_conv_tiles(ow, o, 8, 16, epilogue=epilogue)
                assert t.mr * t.nr <= 8 and t.ow_padded % t.mr == 0 and t.ow_padded >= ow
    assert choose_conv_tiles(7, 512, 8, 16) == choose_conv_tiles(7, 512, 8, 16, epilogue=True)
    assert choose_conv_tiles(14, 256, 16, 32).mr * choose_conv_tiles(14, 256, 16, 32).nr > 8


def test_depthwise_tiles_take_no_padded_columns_where_4_accumulators_divide_the_width():
    """Where the widest AVX2 tile (3 x 2) would pad the output width, a 4-accumulator tile
    that divides it comes first (no padded columns to slice off): 2 x 2 for a SiLU / GELU
    store, 4 x 1 for the others; a width that 3 divides, or that none of them divides,
    keeps the widest tile; AVX-512's 7 x 2 tile divides 56 and stays."""
    assert choose_depthwise_tiles(56, 144, 8, 16, "silu") == DepthwiseTiles(2, 2, 8, 56)
    assert choose_depthwise_tiles(56, 144, 8, 16) == DepthwiseTiles(4, 1, 8, 56)
    assert choose_depthwise_tiles(56, 144, 8, 16, "hardswish") == DepthwiseTiles(4, 1, 8, 56)
    assert choose_depthwise_tiles(28, 24, 8, 16, "gelu") == DepthwiseTiles(4, 1, 8, 28)
    assert choose_depthwise_tiles(14, 96, 8, 16) == DepthwiseTiles(2, 2, 8, 14)
    assert choose_depthwise_tiles(12, 144, 8, 16, "silu") == DepthwiseTiles(3, 2, 8, 12)
    assert choose_depthwise_tiles(7, 144, 8, 16, "silu") == DepthwiseTiles(3, 2, 8, 9)
    assert choose_depthwise_tiles(56, 96, 16, 32, "silu") == DepthwiseTiles(7, 2, 16, 56)


@pytest.mark.parametrize(("activation", "tile"), [("silu", (2, 2)), ("", (4, 1))])
def test_depthwise_kernel_on_the_unpadded_tiles_matches_numpy(activation, tile):
    """The depthwise kernel on the tiles that spare a padded output (16 wide: 3 x 2 would
    pad it to 18), 2 x 2 with a bias + SiLU store, 4 x 1 with a bias, stride 2 as
    EfficientNet's down-sampling blocks, against float64 numpy."""
    rng = np.random.default_rng(5)
    ow, c, k, s = 16, 32, 3, 2
    tiles = choose_depthwise_tiles(ow, c, 8, 16, activation)
    assert (tiles.mr, tiles.nr, tiles.ow_padded) == (*tile, ow)
    hp = wp = (ow - 1) * s + k
    x = (rng.standard_normal((1, hp, wp, c)) * 4).astype(np.float32)
    w = rng.standard_normal((k, k, c)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    shape = ConvShape(1, hp, (tiles.ow_padded - 1) * s + k, c, (k, k), (s, s), (1, 1), ow)
    xp = np.pad(x, ((0, 0), (0, 0), (0, shape.wp - wp), (0, 0)))
    func = float_depthwise_nhwc(shape, tiles, "float32", ConvEpilogue(activation=activation))
    got = run_kernel(func, xp, w, b, out_shape=(1, ow, tiles.ow_padded, c))[:, :, :ow]
    x64 = x.astype(np.float64)
    acc = sum(
        x64[:, i : i + s * ow : s, j : j + s * ow : s] * w[i, j] for i in range(k) for j in range(k)
    )
    want = acc + b
    assert (want < -20).any()  # sums in the SiLU's clamped tail too
    if activation:
        want = want / (1 + np.exp(-want))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())


REQUANTIZED = [  # (kernel, sums, output dtype, relu, int_rounding)
    ("conv1x1", "float32", "uint8", True, True),
    ("conv3x3", "float32", "int8", False, False),
    ("depthwise", "float32", "int8", True, False),
    ("depthwise", "int32", "uint8", False, True),
]


@pytest.mark.parametrize("cores", [1, 2])
@pytest.mark.parametrize(("kernel", "sums", "dtype", "relu", "int_rounding"), REQUANTIZED)
def test_requantize_epilogue_gives_the_exact_integer_result(
    kernel, sums, dtype, relu, int_rounding, cores
):
    """A requantizing kernel over bytes (uint8 image, int8 weights) stores exactly
    ``clamp(round(float32(sum + offset) * multiplier) + zero_point)`` of the integer conv:
    float32 sums (Int8AsFloat's convs: bytes as floats, a float32 offset) and int32 ones
    (int8 weights, an int32 offset) alike; the offsets reach +-2**20. A depthwise kernel
    takes pixel tiles outermost (threads split rows, no output cache line written by two of
    them) when its sums are float32, or for a target of several cores; built for one core
    an int8 one keeps channel tiles outermost (faster on one thread)."""
    rng = np.random.default_rng(11)
    k = 1 if kernel == "conv1x1" else 3
    hw, c, o, lanes = 9, 16, 24, 8
    depthwise = kernel == "depthwise"
    o = c if depthwise else o
    if depthwise:
        tiles = choose_depthwise_tiles(hw, c, lanes, 16)
    else:
        tiles = choose_conv_tiles(hw, o, lanes, 16, epilogue=True)
    wp = tiles.ow_padded + k - 1  # the columns a padded output width reads
    x = rng.integers(0, 256, (1, hw + k - 1, wp, c))
    w = rng.integers(-128, 128, (o, 1 if depthwise else c, k, k))
    offset = rng.integers(-(2**20), 2**20, o)
    multiplier = rng.uniform(2e-5, 2e-4, o).astype(np.float32)
    zero_point, lo, hi = (0, 0, 255) if dtype == "uint8" else (-3, -128, 127)
    requantize = Requantize(dtype, zero_point, lo, hi, relu=relu, int_rounding=int_rounding)
    shape = ConvShape(1, hw + k - 1, wp, c, (k, k), (1, 1), (1, 1), hw)
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))[:, :, :hw]
    if depthwise:
        x_dtype = "uint8" if sums == "int32" else "float32"
        with with_cores(cores, get_target("host").tvm_target()):
            func = float_depthwise_nhwc(shape, tiles, x_dtype, requantize)
        pixel_major = x_dtype == "float32" or cores > 1
        assert tasks_loop(func).startswith("i0_i1" if pixel_major else "i3_0_i0"), func.script()
        w_kernel = np.ascontiguousarray(w[:, 0].transpose(1, 2, 0))
        exact = np.einsum("nyxcij,cij->nyxc", windows, w[:, 0])
    else:
        func = float_conv2d_nhwc(shape, tiles, requantize)
        w_kernel = pack_conv_weight(w.astype(np.float32), lanes, tiles.o_padded)
        exact = np.einsum("nyxcij,ocij->nyxo", windows, w)
    x_kernel = x.astype(np.uint8 if sums == "int32" else np.float32)
    w_kernel = w_kernel.astype(np.int8 if sums == "int32" else np.float32)
    got = run_kernel(
        func,
        x_kernel,
        w_kernel,
        offset.astype(sums),
        multiplier,
        out_shape=(1, hw, tiles.ow_padded, o),
        dtype=np.dtype(dtype),
    )[:, :, :hw]
    v = exact + offset
    v = np.maximum(v, 0) if relu else v
    want = np.clip(np.rint(v.astype(np.float32) * multiplier) + zero_point, lo, hi)
    np.testing.assert_array_equal(got, want.astype(dtype))
    assert len(np.unique(got)) > 20  # the outputs spread over the range, not clamped


@pytest.mark.parametrize("int_rounding", [False, True])
def test_requantize_stored_as_float_with_a_zero_point_border(int_rounding):
    """A requantizing kernel whose readers convert its int8 result to float32 and pad it with
    the zero point (Int8AsFloat's next conv) stores the exact integers as float32, inside a
    border that holds the zero point (not 0)."""
    rng = np.random.default_rng(12)
    hw, c, o, lanes, k = 12, 16, 24, 8, 3
    tiles = choose_conv_tiles(hw, o, lanes, 16, epilogue=True)
    assert tiles.ow_padded == hw  # a bordered output takes no padded columns
    x = rng.integers(0, 256, (1, hw + 2, hw + 2, c))
    w = rng.integers(-128, 128, (o, c, k, k))
    offset = rng.integers(-(2**16), 2**16, o)
    multiplier = rng.uniform(2e-5, 2e-4, o).astype(np.float32)
    zero_point, lo, hi = -7, -128, 127
    requantize = Requantize(
        "int8", zero_point, lo, hi, int_rounding=int_rounding, stored_as="float32"
    )
    shape = ConvShape(1, hw + 2, hw + 2, c, (k, k), (1, 1), (1, 1), hw)
    border = (1, 2, 3, 1)  # top, left, bottom, right
    func = float_conv2d_nhwc(shape, tiles, requantize, out_pad=border)
    got = run_kernel(
        func,
        x.astype(np.float32),
        pack_conv_weight(w.astype(np.float32), lanes, tiles.o_padded),
        offset.astype(np.float32),
        multiplier,
        out_shape=(1, hw + 4, hw + 3, o),
        dtype=np.dtype(np.float32),
    )
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))
    v = np.einsum("nyxcij,ocij->nyxo", windows, w) + offset
    want = np.clip(np.rint(v.astype(np.float32) * multiplier) + zero_point, lo, hi)
    want = np.pad(want, ((0, 0), (1, 3), (2, 1), (0, 0)), constant_values=zero_point)
    np.testing.assert_array_equal(got, want.astype(np.float32))
    assert len(np.unique(got)) > 20


def _avx2_kernel(func):
    """``func`` compiled for the x86-avx2 preset: (the runnable module, its assembly)."""
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    lib = tvm.compile(mod, target=get_target("x86-avx2").tvm_target())
    return lib, lib.mod.inspect_source("asm")


@pytest.mark.parametrize(
    "m,c,o,k,stride,clamp",
    [(13, 38, 40, 1, 1, True), (30, 64, 96, 1, 1, False), (7, 6, 24, 3, 2, False)],
    ids=["1x1-odd-rows-clamped", "1x1", "3x3-stride2"],
)
def test_int16_kernel_gives_the_exact_integer_sums(m, c, o, k, stride, clamp):
    """The int16 mode multiplies channel pairs with ``vpmaddwd``: bytes (uint8 inputs, int8
    weights, widened) give numpy's int64 sums exactly, odd pixel and channel counts padded."""
    from tvmq.kernels.cpu_float_conv import pack_conv_weight_pairs
    from tvmq.machine import cpu_flags

    rng = np.random.default_rng(m)
    tiles = choose_conv_tiles(m, o, 8, 16)
    ow = tiles.ow_padded
    wp = m if clamp else (ow - 1) * stride + k
    hp = (2 - 1) * stride + k  # two output rows
    x = rng.integers(0, 256, (1, hp, wp, c)).astype(np.int16)
    w = rng.integers(-128, 128, (o, c, k, k)).astype(np.int16)
    shape = ConvShape(1, hp, wp, c, (k, k), (stride, stride), (1, 1), 2)
    lib, asm = _avx2_kernel(float_conv2d_nhwc(shape, tiles, int16=True, clamp_columns=clamp))
    assert "vpmaddwd" in asm and "vfmadd" not in asm
    if not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("runs x86-avx2 code: needs AVX2 and FMA")
    out = tvm.runtime.tensor(np.full((1, 2, ow, tiles.o_padded), -1, np.int32))
    lib["main"](
        tvm.runtime.tensor(x), tvm.runtime.tensor(pack_conv_weight_pairs(w, 8, tiles.o_padded)), out
    )
    cols = np.minimum(np.arange(ow)[:, None] * stride + np.arange(k), wp - 1)  # clamped reads
    patches = x.astype(np.int64)[0][
        (np.arange(2)[:, None] * stride + np.arange(k))[:, None, :, None], cols[None, :, None, :]
    ]  # (2, ow, k, k, c)
    ref = np.einsum("yxijc,ocij->yxo", patches, w.astype(np.int64))
    np.testing.assert_array_equal(out.numpy()[0, :, :m, :o], ref[:, :m])
    assert not out.numpy()[0, :, :, o:].any()  # padded channels: zero weights


def test_int16_weight_packing_puts_channel_pairs_inside_the_lanes():
    from tvmq.kernels.cpu_float_conv import pack_conv_weight_pairs

    w = np.arange(10 * 4 * 3 * 3).reshape(10, 4, 3, 3)
    packed = pack_conv_weight_pairs(w, 8, 16)
    assert packed.shape == (2, 3, 3, 2, 8, 2) and packed.dtype == np.int16
    j, ky, kx, q, i, r = 1, 2, 0, 1, 1, 1
    assert packed[j, ky, kx, q, i, r] == w[j * 8 + i, 2 * q + r, ky, kx]
    assert not packed[1, :, :, :, 2:].any()  # channels 10..15 padded with zeros
    with pytest.raises(ValueError, match="pairs"):
        pack_conv_weight_pairs(np.zeros((8, 3, 1, 1)), 8, 8)


@pytest.mark.parametrize(
    ("dtype", "relu", "int_rounding", "stored", "k"),
    [
        ("uint8", True, False, "", 1),
        ("int8", False, True, "", 3),
        ("int8", False, True, "int16", 3),
        ("uint8", True, False, "float32", 1),
    ],
)
def test_int16_kernel_requantizes_like_the_int32_conv(dtype, relu, int_rounding, stored, k):
    """The int16 kernel's requantize epilogue (int32 offsets up to +-2**20) stores numpy's
    ``clamp(round(float32(sum + offset) * multiplier) + zero_point)`` of the integer conv, as
    int8 / uint8, or as int16 / float32 (for the next conv) inside a zero-point border."""
    from tvmq.kernels.cpu_float_conv import choose_int16_tiles, pack_conv_weight_pairs
    from tvmq.machine import cpu_flags

    if not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("runs AVX2 code (vpmaddwd)")
    rng = np.random.default_rng(13)
    hw, c, o = 12, 22, 24
    tiles = choose_int16_tiles(hw, o)
    assert tiles.ow_padded == hw
    x = rng.integers(0, 256, (1, hw + k - 1, hw + k - 1, c))
    w = rng.integers(-128, 128, (o, c, k, k))
    offset = rng.integers(-(2**20), 2**20, o)
    multiplier = rng.uniform(2e-5, 2e-4, o).astype(np.float32)
    zero_point, lo, hi = (0, 0, 255) if dtype == "uint8" else (-7, -128, 127)
    requantize = Requantize(
        dtype, zero_point, lo, hi, relu=relu, int_rounding=int_rounding, stored_as=stored
    )
    shape = ConvShape(1, hw + k - 1, hw + k - 1, c, (k, k), (1, 1), (1, 1), hw)
    border = (1, 2, 3, 1) if stored else None
    func = float_conv2d_nhwc(shape, tiles, requantize, int16=True, out_pad=border)
    out = (1, hw + 4, hw + 3, o) if stored else (1, hw, hw, o)
    got = run_kernel(
        func,
        x.astype(np.int16),
        pack_conv_weight_pairs(w, 8, tiles.o_padded),
        offset.astype(np.int32),
        multiplier,
        out_shape=out,
        dtype=np.dtype(stored or dtype),
    )
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))
    v = np.einsum("nyxcij,ocij->nyxo", windows, w) + offset
    v = np.maximum(v, 0) if relu else v
    want = np.clip(np.rint(v.astype(np.float32) * multiplier) + zero_point, lo, hi)
    if stored:
        want = np.pad(want, ((0, 0), (1, 3), (2, 1), (0, 0)), constant_values=zero_point)
    np.testing.assert_array_equal(got, want.astype(stored or dtype))
    assert len(np.unique(got)) > 20


@pytest.mark.parametrize(
    ("ow", "o", "tile"),
    [(14, 256, (5, 2, 15)), (49, 512, (5, 2, 50)), (7, 512, (7, 1, 7)), (128, 768, (4, 3, 128))],
)
def test_int16_tiles_pad_a_row_least(ow, o, tile):
    """Where the float tiles' choice pads a row by more than 5% (ResNet-50's 14-pixel rows:
    6 x 2 over 18), the int16 tile takes the pixel count of 4 or more that pads it least;
    tiles that pad nothing stay."""
    from tvmq.kernels.cpu_float_conv import choose_int16_tiles

    tiles = choose_int16_tiles(ow, o)
    assert (tiles.mr, tiles.nr, tiles.ow_padded) == tile


def test_int16_kernel_sums_a_strided_conv_over_a_padded_row():
    """A 3x3 stride-2 conv with 14-pixel output rows on the int16 kernel's padded 5-pixel tiles
    (15 a row, the last a copy the caller slices off) sums numpy's products exactly."""
    from tvmq.kernels.cpu_float_conv import choose_int16_tiles, pack_conv_weight_pairs
    from tvmq.machine import cpu_flags

    if not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("runs AVX2 code (vpmaddwd)")
    rng = np.random.default_rng(5)
    oh, c, o = 14, 18, 32
    tiles = choose_int16_tiles(oh, o)
    assert tiles.ow_padded == 15
    hp, wp = 2 * oh + 1, 2 * tiles.ow_padded + 1
    x = rng.integers(-128, 128, (1, hp, wp, c))
    w = rng.integers(-128, 128, (o, c, 3, 3))
    func = float_conv2d_nhwc(ConvShape(1, hp, wp, c, (3, 3), (2, 2), (1, 1), oh), tiles, int16=True)
    got = run_kernel(
        func,
        x.astype(np.int16),
        pack_conv_weight_pairs(w, 8, tiles.o_padded),
        out_shape=(1, oh, tiles.ow_padded, tiles.o_padded),
        dtype=np.dtype("int32"),
    )
    windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))[:, ::2, ::2]
    want = np.einsum("nyxcij,ocij->nyxo", windows[:, :oh, :oh], w)
    np.testing.assert_array_equal(got[:, :, :oh, :o], want)
