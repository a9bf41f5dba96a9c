"""The float conv kernel's task orders: the same bits either way, and which convs take which."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from tvmq.kernels.cpu_float_conv import (
    ConvEpilogue,
    ConvShape,
    choose_conv_tiles,
    choose_depthwise_tiles,
    float_conv2d_nhwc,
    float_depthwise_nhwc,
    pack_conv_weight,
    pixel_major_pays,
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


REQUANTIZED = [  # (kernel, sums, output dtype, relu, int_rounding)
    ("conv1x1", "float32", "uint8", True, True),
    ("conv3x3", "float32", "int8", False, False),
    ("depthwise", "float32", "int8", True, False),
    ("depthwise", "int32", "uint8", False, True),
]


@pytest.mark.parametrize(("kernel", "sums", "dtype", "relu", "int_rounding"), REQUANTIZED)
def test_requantize_epilogue_gives_the_exact_integer_result(
    kernel, sums, dtype, relu, int_rounding
):
    """A requantizing kernel over bytes (uint8 image, int8 weights) stores exactly
    ``clamp(round(float32(sum + offset) * multiplier) + zero_point)`` of the integer conv:
    float32 sums (Int8AsFloat's convs: bytes as floats, a float32 offset) and int32 ones
    (int8 weights, an int32 offset) alike; the offsets reach +-2**20."""
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
        func = float_depthwise_nhwc(shape, tiles, x_dtype, requantize)
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
