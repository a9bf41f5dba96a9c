"""The K-blocked float conv for weights that stream from memory: the unblocked kernel's bits,
PyTorch's numbers, and which layers take it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_cpu_float_conv import run_kernel

from tvmq.kernels.cpu_float_conv import (
    ConvEpilogue,
    ConvShape,
    choose_conv_tiles,
    float_conv2d_nhwc,
    pack_conv_weight,
)
from tvmq.kernels.cpu_float_conv_streamed import float_conv2d_nhwc_streamed, streamed_chunk


@pytest.mark.parametrize(
    "hw,c,o,k,stride,epilogue",
    [
        (5, 128, 64, 3, 1, ConvEpilogue(lo=0.0)),
        (4, 64, 96, 1, 2, None),
        (3, 256, 32, 3, 1, ConvEpilogue(lo=0.0, hi=6.0, residual=True)),
        (5, 128, 48, 3, 1, ConvEpilogue(activation="silu")),
    ],
    ids=["3x3-relu", "1x1-stride2", "3x3-residual-relu6", "3x3-silu"],
)
def test_streamed_conv_is_the_unblocked_kernel_bit_for_bit(hw, c, o, k, stride, epilogue):
    """Chunks of 64 channels, the next one prefetched: every output's FMAs in the unblocked
    kernel's order, so the same float32 bits; and PyTorch's conv within float32 rounding."""
    rng = np.random.default_rng(hw * c + o)
    pad = k // 2
    size = hw * stride
    x = rng.standard_normal((1, c, size, size)).astype(np.float32)
    w = rng.standard_normal((o, c, k, k)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    r = rng.standard_normal((1, hw, hw, o)).astype(np.float32)
    tiles = choose_conv_tiles(hw, o, 16, 32)
    assert (tiles.ow_padded, tiles.o_padded) == (hw, o)
    shape = ConvShape(1, size + 2 * pad, size + 2 * pad, c, (k, k), (stride,) * 2, (1, 1), hw)
    p = np.pad(x.transpose(0, 2, 3, 1), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    args = [p, pack_conv_weight(w, 16, o)]
    if epilogue is not None:
        args.append(b)
    if epilogue is not None and epilogue.residual:
        args.append(r)
    out_shape = (1, hw, hw, o)
    got = run_kernel(
        float_conv2d_nhwc_streamed(shape, tiles, 64, epilogue), *args, out_shape=out_shape
    )
    want = run_kernel(float_conv2d_nhwc(shape, tiles, epilogue), *args, out_shape=out_shape)
    np.testing.assert_array_equal(got, want)
    conv = torch.nn.functional.conv2d(
        torch.from_numpy(x), torch.from_numpy(w), stride=stride, padding=pad
    ).permute(0, 2, 3, 1)
    if epilogue is not None:
        conv = conv + torch.from_numpy(b)
        conv = conv + torch.from_numpy(r) if epilogue.residual else conv
        conv = torch.nn.functional.silu(conv) if epilogue.activation == "silu" else conv
        conv = conv.clamp(epilogue.lo, epilogue.hi)
    ref = conv.numpy()
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_streamed_chunk_takes_deep_layers_over_small_images():
    """ResNet-50's 7x7 stage (megabytes of weights over 49 pixels) and YOLO's 10x10 one
    stream; ResNet-50's 14x14 stage,
    small weights and channel counts no chunk divides do not."""
    assert streamed_chunk(49, 512, 9, 512) == 128  # 3x3 512 -> 512, 9.4 MB
    assert streamed_chunk(49, 2048, 1, 512) == 128  # 1x1 2048 -> 512, 4 MB
    assert streamed_chunk(100, 512, 9, 512) == 128  # the YOLO neck's 10x10 3x3 512 -> 512
    assert streamed_chunk(196, 256, 9, 256) is None  # 14x14: the partial sums outgrow L1
    assert streamed_chunk(49, 64, 1, 256) is None  # 64 KB of weights
    assert streamed_chunk(49, 1000, 9, 512) is None  # no chunk divides 1000 channels
