"""The Winograd F(2x2, 3x3) kernels against a float64 direct convolution in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from tvmq.kernels.cpu_float_conv import (
    ConvEpilogue,
    ConvShape,
    ConvTiles,
    choose_conv_tiles,
    choose_int16_tiles,
    float_conv2d_nhwc,
)
from tvmq.kernels.cpu_winograd import (
    G,
    fused_tiles,
    padded_input_hw,
    tiles_hw,
    winograd_fused,
    winograd_input,
    winograd_output,
    winograd_weight,
)
from tvmq.kernels.x86_int8 import Requantize
from tvmq.targets import get_target


def _direct(x_padded: np.ndarray, w: np.ndarray, oh: int, ow: int) -> np.ndarray:
    windows = np.lib.stride_tricks.sliding_window_view(
        x_padded.astype(np.float64), (3, 3), axis=(1, 2)
    )
    return np.einsum("nyxcij,ocij->nyxo", windows[:, :oh, :ow], w.astype(np.float64))


def _winograd_conv(
    x, w, oh, ow, lanes, epilogue, extra, out_dtype="float32", int16=False
) -> np.ndarray:
    """The three Winograd kernels, compiled for the host, on the padded NHWC image ``x`` and
    the OIHW weight ``w``; ``extra`` the output kernel's epilogue arguments (numpy). Every
    intermediate starts as NaN (or 0 for an integer output), so nothing goes unwritten.
    With ``int16``: int16 transforms of ``x`` (as it comes), the int16 matmuls, int32 sums."""
    n, hp, wp, c = x.shape
    o = w.shape[0]
    th, tw = tiles_hw(oh, ow)
    tiles = choose_int16_tiles(th * tw, o) if int16 else choose_conv_tiles(th * tw, o, lanes, 16)
    t, op = tiles.ow_padded, tiles.o_padded
    gemm = ConvShape(16, n, t, c, (1, 1), (1, 1), (1, 1), n)
    v_dtype, m_dtype = ("int16", "int32") if int16 else ("float32", "float32")
    funcs = {
        "input": winograd_input(n, hp, wp, c, th, tw, t, lanes, str(x.dtype), v_dtype),
        "matmul": float_conv2d_nhwc(gemm, tiles, batched_weight=True, int16=int16),
        "output": winograd_output(n, th, tw, t, op, oh, ow, o, lanes, epilogue, m_dtype),
    }
    mod = tvm.IRModule({k: f.with_attr("global_symbol", k) for k, f in funcs.items()})
    lib = tvm.compile(mod, target=get_target("host").tvm_target())
    arr = tvm.runtime.tensor
    v = arr(np.full((16, n, t, c), -9999 if int16 else np.nan, v_dtype))
    m = arr(np.full((16, n, t, op), -9999 if int16 else np.nan, m_dtype))
    y = arr(np.full((n, oh, ow, o), np.nan if out_dtype == "float32" else 0, out_dtype))
    lib["input"](arr(x), v)
    lib["matmul"](v, arr(winograd_weight(w, lanes, op, int16=int16)), m)
    lib["output"](m, *(arr(a) for a in extra), y)
    return y.numpy()


# (n, c, o, oh, ow, lanes, epilogue): odd and even output sizes (a last row / column of
# half tiles), two images, 16-lane vectors, every epilogue the conv kernels have.
CASES = [
    (2, 16, 24, 7, 9, 8, ConvEpilogue(lo=0.0)),
    (1, 32, 32, 6, 6, 16, ConvEpilogue(lo=0.0, residual=True)),
    (1, 8, 16, 5, 4, 8, None),
    (1, 16, 16, 3, 5, 8, ConvEpilogue(activation="silu")),
]


@pytest.mark.parametrize("case", CASES, ids=["odd-relu", "residual-16lanes", "plain", "silu"])
def test_winograd_conv_matches_a_direct_conv(case):
    """Input transform -> 16 batched matmuls -> output transform (+ the epilogue) is the 3x3
    conv of the padded image: random data, float64 numpy reference, relative error < 1e-5."""
    n, c, o, oh, ow, lanes, epilogue = case
    rng = np.random.default_rng(oh * ow + c)
    hp, wp = padded_input_hw(oh, ow)
    x = np.zeros((n, hp, wp, c), np.float32)
    x[:, : oh + 2, : ow + 2] = rng.standard_normal((n, oh + 2, ow + 2, c))  # the rest: zeros
    w = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    residual = rng.standard_normal((n, oh, ow, o)).astype(np.float32)
    extra = [] if epilogue is None else [bias] + ([residual] if epilogue.residual else [])
    got = _winograd_conv(x, w, oh, ow, lanes, epilogue, extra)
    want = _direct(x, w, oh, ow)
    if epilogue is not None:
        want = want + bias + (residual if epilogue.residual else 0.0)
        if epilogue.activation == "silu":
            want = want / (1.0 + np.exp(-want))
        want = np.maximum(want, epilogue.lo)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_winograd_weight_is_g_w_gt_packed():
    """Panel ``e = 4 * a + b`` of the packed weight holds ``(G w G^T)[a, b]`` of every
    (output, input) channel pair at ``[o // L, 0, 0, c, o % L]``; padded channels are zero."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 5, 3, 3)).astype(np.float32)
    packed = winograd_weight(w, 8, 16)
    assert packed.shape == (16, 2, 1, 1, 5, 8) and packed.dtype == np.float32
    u = np.stack([[G @ w[o, c].astype(np.float64) @ G.T for c in range(5)] for o in range(12)])
    unpacked = packed[:, :, 0, 0].transpose(0, 1, 3, 2).reshape(16, 16, 5)  # (e, O', C)
    np.testing.assert_allclose(unpacked[:, :12], u.reshape(12, 5, 16).transpose(2, 0, 1), rtol=1e-6)
    assert not unpacked[:, 12:].any()


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="too small"):
        winograd_input(1, 9, 10, 16, 4, 4, 16, 8)  # 4 tile rows read 10 rows
    with pytest.raises(ValueError, match="whole vectors"):
        winograd_output(1, 2, 2, 4, 16, 4, 4, 12, 8)
    with pytest.raises(ValueError, match="3x3"):
        winograd_weight(np.zeros((8, 8, 5, 5), np.float32), 8, 8)
    one_tile = ConvTiles(1, 1, 8, 1, 8)  # a 2-pixel-wide image: one tile a row
    with pytest.raises(ValueError, match="a band of 1 tiles"):
        winograd_fused(1, *padded_input_hw(6, 2), 16, 6, 2, 8, one_tile, 1)


# (out dtype, weights' lower bound, multipliers, exact fraction): a dequantize of sums up to
# ~1.7e6 (exact), a requantize of sums up to ~1.1e7 (beyond 2**22 the transformed sums round)
BYTE_SUMS = [("float32", -127, (5e-5, 2e-4), 1.0), ("int8", -60, (5e-6, 1.2e-5), 0.99)]


@pytest.mark.parametrize("case", BYTE_SUMS, ids=["dequantize-exact", "requantize-large-sums"])
def test_requantized_sums_of_bytes(case):
    """Int8AsFloat's convs (uint8 image, int8 weights, both as float32) with the requantize
    epilogue. ``U = G g G^T`` holds quarters, so the transformed products and their sums are
    exact while below 2**22, and the outputs are the exact integer conv's; larger sums round
    like any float32 sum (a relative ~1e-6: a few units of 1e7), which moves an int8 output by
    one step only where it lies that close to a rounding boundary."""
    dtype, w_lo, (m_lo, m_hi), fraction = case
    rng = np.random.default_rng(3)
    n, c, o, oh, ow, lanes = 1, 256, 32, 10, 10, 8
    hp, wp = padded_input_hw(oh, ow)
    x = np.zeros((n, hp, wp, c), np.float32)
    x[:, 1 : oh + 1, 1 : ow + 1] = rng.integers(0, 256, (n, oh, ow, c))
    w = rng.integers(w_lo, 128, (o, c, 3, 3)).astype(np.float32)
    offset = rng.integers(-20000, 20000, o).astype(np.int32)
    multiplier = rng.uniform(m_lo, m_hi, o).astype(np.float32)
    requantize = Requantize(dtype, zero_point=3, lo=-128, hi=127)
    kernel_offset = offset.astype(np.float32)  # a float32 sum takes a float32 offset
    got = _winograd_conv(x, w, oh, ow, lanes, requantize, [kernel_offset, multiplier], dtype)
    windows = np.lib.stride_tricks.sliding_window_view(x.astype(np.int64), (3, 3), axis=(1, 2))
    exact = np.einsum("nyxcij,ocij->nyxo", windows[:, :oh, :ow], w.astype(np.int64)) + offset
    want = exact.astype(np.float32) * multiplier
    if dtype == "int8":
        want = np.clip(np.rint(want) + 3, -128, 127)
    steps = np.abs(got.astype(np.float64) - want) / (multiplier if dtype == "float32" else 1)
    assert (steps == 0).mean() >= fraction and steps.max() <= 1.001, (steps == 0).mean()


def _bytes_image_and_weight(rng, n, c, o, oh, ow, x_dtype, w_lo):
    """The int16 route's operands (skipped where the host lacks AVX2): a padded NHWC image
    of random bytes (zeros around) for an ``oh x ow`` output and an OIHW 3x3 weight of
    integers in ``[w_lo, 128)``."""
    from tvmq.machine import cpu_flags

    if not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("runs AVX2 code (vpmaddwd)")
    hp, wp = padded_input_hw(oh, ow)
    x = np.zeros((n, hp, wp, c), x_dtype)
    x[:, 1 : oh + 1, 1 : ow + 1] = rng.integers(0, 256, (n, oh, ow, c))
    return x, rng.integers(w_lo, 128, (o, c, 3, 3)).astype(np.float32)


@pytest.mark.parametrize("x_dtype", ["int16", "float32"])
def test_int16_winograd_gives_the_exact_integer_conv(x_dtype):
    """The int16 route (AVX2): bytes transformed to int16 (from an int16 or float32 image),
    ``4 U`` in int16 panels, int32 sums through the output transform: exactly the integer
    conv's requantize, also for sums far beyond the float route's 2**22 (up to ~2e7 here)."""
    from tvmq.kernels.cpu_winograd import weight_from_panels

    rng = np.random.default_rng(4)
    n, c, o, oh, ow, lanes = 1, 256, 32, 9, 10, 8
    x, w = _bytes_image_and_weight(rng, n, c, o, oh, ow, x_dtype, w_lo=-60)
    offset = rng.integers(-20000, 20000, o).astype(np.int32)
    multiplier = rng.uniform(5e-6, 1.2e-5, o).astype(np.float32)
    requantize = Requantize("int8", zero_point=3, lo=-128, hi=127, int_rounding=True)
    got = _winograd_conv(x, w, oh, ow, lanes, requantize, [offset, multiplier], "int8", int16=True)
    windows = np.lib.stride_tricks.sliding_window_view(x.astype(np.int64), (3, 3), axis=(1, 2))
    exact = np.einsum("nyxcij,ocij->nyxo", windows[:, :oh, :ow], w.astype(np.int64)) + offset
    assert np.abs(exact).max() > 2**22
    want = np.clip(np.rint(exact.astype(np.float32) * multiplier) + 3, -128, 127)
    np.testing.assert_array_equal(got, want.astype(np.int8))
    assert len(np.unique(got)) > 20
    panels = winograd_weight(w, lanes, 32, int16=True)
    assert panels.dtype == np.int16 and panels.shape == (16, 4, 1, 1, 128, 8, 2)
    np.testing.assert_array_equal(weight_from_panels(panels), w)  # what a library stores


def _fused_conv(x, w, oh, ow, tiles, band, epilogue, extra, out_dtype, int16) -> np.ndarray:
    """:func:`winograd_fused` compiled for the host on the padded NHWC image ``x``."""
    n, hp, wp, c = x.shape
    o = w.shape[0]
    f = winograd_fused(n, hp, wp, c, oh, ow, o, tiles, band, epilogue, str(x.dtype), int16)
    lib = tvm.compile(
        tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
        target=get_target("host").tvm_target(),
    )
    arr = tvm.runtime.tensor
    u = winograd_weight(w, tiles.lanes, tiles.o_padded, int16=int16)
    y = arr(np.full((n, oh, ow, o), np.nan if out_dtype == "float32" else 0, out_dtype))
    lib["main"](arr(x), arr(u), *(arr(a) for a in extra), y)
    return y.numpy()


@pytest.mark.parametrize("x_dtype", ["int16", "float32"])
@pytest.mark.parametrize("whole_rows", [True, False])
def test_the_fused_kernel_is_the_three_kernels(x_dtype, whole_rows):
    """The int16 route in one kernel, a band of tiles at a time (a whole row of tiles, or
    runs of one register tile, several to a row): two images of odd height and width
    (half tiles at the bottom and right), the same int8 results as the three kernels,
    which are the exact integer conv's requantize."""
    rng = np.random.default_rng(11)
    n, c, o, oh, ow, lanes = 2, 48, 24, 13, 11, 8
    x, w = _bytes_image_and_weight(rng, n, c, o, oh, ow, x_dtype, w_lo=-128)
    offset = rng.integers(-20000, 20000, o).astype(np.int32)
    multiplier = rng.uniform(1e-4, 2e-4, o).astype(np.float32)
    requantize = Requantize("int8", zero_point=-5, lo=-128, hi=127)
    extra = [offset, multiplier]
    tiles = choose_int16_tiles(tiles_hw(oh, ow)[1], o)
    band = tiles.ow_padded if whole_rows else tiles.mr
    assert whole_rows or tiles.ow_padded // band > 1
    got = _fused_conv(x, w, oh, ow, tiles, band, requantize, extra, "int8", int16=True)
    want = _winograd_conv(x, w, oh, ow, lanes, requantize, extra, "int8", int16=True)
    np.testing.assert_array_equal(got, want)
    windows = np.lib.stride_tricks.sliding_window_view(x.astype(np.int64), (3, 3), axis=(1, 2))
    exact = np.einsum("nyxcij,ocij->nyxo", windows[:, :oh, :ow], w.astype(np.int64)) + offset
    reference = np.clip(np.rint(exact.astype(np.float32) * multiplier) - 5, -128, 127)
    np.testing.assert_array_equal(got, reference.astype(np.int8))
    assert len(np.unique(got)) > 50


def test_the_fused_kernel_in_float32():
    """The float32 route in one kernel (two bands a row, bias + ReLU): the direct conv of
    random data, relative error < 1e-5."""
    rng = np.random.default_rng(12)
    n, c, o, oh, ow, lanes = 1, 16, 16, 9, 14, 8
    hp, wp = padded_input_hw(oh, ow)
    x = rng.standard_normal((n, hp, wp, c)).astype(np.float32)
    w = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    tiles = choose_conv_tiles(tiles_hw(oh, ow)[1], o, lanes, 16)
    assert tiles.ow_padded == 2 * tiles.mr, tiles
    got = _fused_conv(x, w, oh, ow, tiles, tiles.mr, ConvEpilogue(lo=0.0), [bias], "float32", False)
    want = np.maximum(_direct(x, w, oh, ow) + bias, 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_fused_tiles_take_large_images_only():
    """Fused where the three kernels' transformed image and sums are large and a band's
    share outweighs the weight read again for it (UNet's 224x224 32 -> 32, ResNet's 56x56
    64 -> 64); not ResNet's 28x28 128 -> 128 nor 14x14 256 -> 256. float32 alike, its
    values twice the bytes, AVX-512's 16 lanes too."""
    tiles, band = fused_tiles(112, 112, 32, 32, int16=True)
    assert band % tiles.mr == 0 and tiles.ow_padded % band == 0 and band >= 56
    assert fused_tiles(28, 28, 64, 64, int16=True) is not None
    assert fused_tiles(14, 14, 128, 128, int16=True) is None
    assert fused_tiles(7, 7, 256, 256, int16=True) is None
    for lanes, registers in ((8, 16), (16, 32)):
        tiles, band = fused_tiles(28, 28, 64, 64, lanes, registers)
        assert tiles.lanes == lanes and tiles.ow_padded % band == 0
        assert fused_tiles(14, 14, 128, 128, lanes, registers) is None
