"""image_nhwc: an NCHW image of a few channels moved to padded NHWC, vs numpy."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from tvmq.kernels.cpu_image import ImageQuantize, image_nhwc

_TARGET = {"kind": "llvm", "num-cores": 2}


def _run(func, x: np.ndarray, out_shape, out_dtype) -> np.ndarray:
    lib = tvm.compile(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}), target=_TARGET)
    y = tvm.runtime.tensor(np.full(out_shape, 99).astype(out_dtype))  # every value written
    lib["k"](tvm.runtime.tensor(x), y)
    return y.numpy()


def _reference(x, padding, fill):
    top, left, bottom, right = padding
    nhwc = x.transpose(0, 2, 3, 1)
    width = ((0, 0), (top, bottom), (left, right), (0, 0))
    return np.pad(nhwc, width, constant_values=np.array(fill).astype(x.dtype))


@pytest.mark.parametrize(
    "shape, dtype, padding, fill",
    [
        ((1, 3, 40, 48), "float32", (1, 1, 1, 1), 0.0),  # whole 16-pixel steps
        ((2, 3, 19, 37), "float32", (3, 2, 1, 0), -1.5),  # a 5-pixel tail, batch 2
        ((1, 3, 33, 40), "uint8", (1, 1, 0, 0), 134),  # an int8 model's padded input
        ((1, 1, 5, 20), "uint8", (0, 0, 0, 0), 0),  # one channel, no border
        ((1, 4, 17, 33), "int8", (2, 3, 3, 2), -7),
        ((1, 2, 16, 8), "uint16", (0, 1, 0, 1), 0),  # bf16 bits; narrower than a step
    ],
)
def test_the_image_channels_last_with_its_border(shape, dtype, padding, fill):
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 60).astype(dtype)
    ref = _reference(x, padding, fill)
    got = _run(image_nhwc(shape, dtype, padding, fill), x, ref.shape, dtype)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("dtype, zero", [("uint8", 131), ("int8", -4)])
def test_a_float_image_quantized_as_it_moves(dtype, zero):
    """The bytes of ``clip(round(x * m) + zero)`` (numpy's rint: half to even, as the
    float -> int conversion), the border the zero point, saturating at both ends."""
    shape, padding, m = (1, 3, 21, 50), (1, 2, 1, 2), 31.7
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    x[0, 0, 0, :4] = [100.0, -100.0, 0.0, 1e-3]  # saturate high, low; the zero point
    q = ImageQuantize(m, zero, dtype)
    info = np.iinfo(dtype)
    quantized = np.clip(np.rint(x * np.float32(m)) + zero, info.min, info.max).astype(dtype)
    ref = _reference(quantized, padding, zero)
    got = _run(image_nhwc(shape, "float32", padding, zero, q), x, ref.shape, dtype)
    np.testing.assert_array_equal(got, ref)
    assert got[0, 1, 2, 0] == info.max and got[0, 1, 3, 0] == info.min


def test_refuses_images_of_many_channels_and_integer_sources_to_quantize():
    with pytest.raises(ValueError, match="1..4 channels"):
        image_nhwc((1, 8, 4, 4), "float32")
    with pytest.raises(ValueError, match="read as float32"):
        image_nhwc((1, 3, 4, 4), "uint8", quantize=ImageQuantize(1.0, 0, "uint8"))
