"""Int8AsInt16: int8 matmuls with a constant weight as exact int16 pair products on AVX2."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi
from test_int8_as_float import (
    AARCH64,
    CASCADELAKE,
    CUDA,
    HASWELL,
    _module,
    _products,
    _reference,
    _requantized_module,
    _requantized_reference,
    random_inputs,
)
from tvm import relax

from tvmq.build import build, build_with_info
from tvmq.machine import cpu_flags
from tvmq.passes import Int8AsFloat, Int8AsInt16, PackFloatConv, PackFloatDense
from tvmq.passes.relax_utils import CONV2D, MATMUL, op_name
from tvmq.runtime import decoded_params

SKYLAKE_AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})


@pytest.mark.parametrize(
    "target",
    [CASCADELAKE, SKYLAKE_AVX512, AARCH64, CUDA],
    ids=["cascadelake", "skylake-avx512", "aarch64", "cuda"],
)
def test_targets_other_than_avx2_are_left_alone(target):
    mod = _module()
    assert tvm_ffi.structural_equal(Int8AsInt16(target)(mod), mod)


def test_only_the_constant_weight_matmul_becomes_int16():
    mod = Int8AsInt16(HASWELL)(_module())
    # the convs, the activation matmul and the small one stay int8 products (int32 results)
    assert sorted(_products(mod)) == sorted([(CONV2D, "int32")] * 2 + [(MATMUL, "int32")] * 3)
    operands = []
    relax.analysis.post_order_visit(
        mod["main"],
        lambda e: (
            operands.append(str(e.args[1].ty.dtype))
            if isinstance(e, relax.Call) and str(getattr(e.op, "name", "")) == MATMUL
            else None
        ),
    )
    assert sorted(operands) == ["int16", "int8", "int8"]


def test_an_odd_reduction_stays_for_int8_as_float():
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((64, 127), "uint8"))
    w = np.ones((127, 256), np.int8)
    with bb.function("main", [a]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.matmul(a, relax.const(w), out_dtype="int32")))
        bb.emit_func_output(out)
    mod = bb.get()
    assert tvm_ffi.structural_equal(Int8AsInt16(HASWELL)(mod), mod)


def test_the_int16_dense_kernel_takes_it():
    with HASWELL:
        passes = [Int8AsInt16(HASWELL), Int8AsFloat(HASWELL), PackFloatConv(HASWELL)]
        mod = _module()
        for p in [*passes, PackFloatDense(HASWELL)]:
            mod = p(mod)
    # what is left: the activation matmul on float32 and the small one
    assert sorted(_products(mod)) == [(MATMUL, "float32"), (MATMUL, "int32")]
    kernels = [gv.name_hint for gv in mod.get_global_vars()]
    assert any(name.startswith("tvmq_int16_dense_") for name in kernels)


@pytest.mark.skipif(
    not {"avx2", "fma"} <= cpu_flags(), reason="runs x86-avx2 code: needs AVX2 and FMA"
)
def test_an_avx2_library_gives_the_exact_products_from_8_bit_codes():
    """Built for x86-avx2 as tvmq.compile builds an int8 model: every product is numpy's
    int64 one, and the int16 dense weight is stored as 8-bit codes decoded at load."""
    inputs = random_inputs(3)
    ex, _ = build_with_info(_module(), "x86-avx2", tuning_logs=None, int8_weight_codes=True)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    decoded = decoded_params(vm)
    assert sorted(str(p.dtype) for p in decoded) == ["float32", "int16"]  # conv, dense
    got = vm["main"](*(tvm.runtime.tensor(v) for v in inputs), *decoded)
    for y, ref in zip(got, _reference(*inputs), strict=True):
        assert y.numpy().dtype == np.int32
        np.testing.assert_array_equal(y.numpy(), ref)


def test_requantized_convs_take_the_int16_kernel():
    """Int8AsFloat's requantized convs run on the int16 kernel on AVX2 (the depthwise one
    stays float); a result whose one reader is an int16 conv is stored as int16, one read by
    the float depthwise kernel as float32: no conversion kernel between the layers."""
    with HASWELL:
        mod = PackFloatConv(HASWELL)(Int8AsFloat(HASWELL)(_requantized_module()))
    kernels = sorted(gv.name_hint for gv in mod.get_global_vars() if gv.name_hint != "main")
    assert kernels == [
        "tvmq_float_depthwise_nhwc_3x3_16x16_requantize_as_int16",
        "tvmq_int16_conv2d_nhwc_1x1_16x24_dequantize",
        "tvmq_int16_conv2d_nhwc_3x3_8x16_requantize_as_float",
    ]
    # the input image's conversions (uint8 -> float32 -> int16, one fused kernel) only
    casts = []
    relax.analysis.post_order_visit(
        mod["main"], lambda e: casts.append(e) if op_name(e) == "relax.astype" else None
    )
    assert [str(c.attrs.dtype) for c in casts] == ["float32", "int16"]


@pytest.mark.skipif(
    not {"avx2", "fma"} <= cpu_flags(), reason="runs x86-avx2 code: needs AVX2 and FMA"
)
def test_int16_convs_give_the_integer_reference_bit_for_bit():
    """Random uint8 images through the int16 and float conv kernels of an x86-avx2 build:
    torch's float64 convs of the same integers, requantized in float32 by numpy."""
    rng = np.random.default_rng(21)
    vm = relax.VirtualMachine(build(_requantized_module(), "x86-avx2"), tvm.cpu())
    for _ in range(3):
        x = rng.integers(0, 256, (1, 8, 9, 9)).astype(np.uint8)
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_array_equal(got, _requantized_reference(x))


def _two_3x3_convs(c: int, seed: int, hw: int = 10):
    """Two 3x3 convs of ``c`` channels over a uint8 ``hw x hw`` image as LowerInt8 emits them: the first
    requantized to int8 (zero point 3), padded with its zero point, the second's sum
    requantized too."""
    rng = np.random.default_rng(seed)
    ws = [rng.integers(-127, 128, (c, c, 3, 3)).astype(np.int8) for _ in range(2)]
    offsets = [rng.integers(-5000, 5000, (1, c, 1, 1)).astype(np.int32) for _ in range(2)]
    mults = [(rng.random((1, c, 1, 1)) * k + k / 10).astype(np.float32) for k in (1e-4, 2e-3)]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, c, hw, hw), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            v = x
            for i in range(2):
                if i:
                    v = bb.emit(relax.op.nn.pad(v, [0, 0, 0, 0, 1, 1, 1, 1], pad_value=3.0))
                acc = bb.emit(
                    relax.op.nn.conv2d(v, relax.const(ws[i]), padding=1 - i, out_dtype="int32")
                )
                s = bb.emit(relax.op.add(acc, relax.const(offsets[i])))
                s = bb.emit(relax.op.multiply(relax.op.astype(s, "float32"), relax.const(mults[i])))
                one, zp = relax.const(1.0, "float32"), relax.const(3, "int32")
                v = bb.emit(relax.op.quantize(s, one, zp, axis=1, out_dtype="int8"))
            out = bb.emit_output(v)
        bb.emit_func_output(out)
    return bb.get(), ws, offsets, mults


def test_winograd_convs_take_the_int16_matmuls_fed_int16():
    """Requantized 3x3 convs of 32 channels keep Winograd, on the int16 kernel: int16
    transforms, ``4 U`` panels, int32 sums; the first stores its int8 result as int16 inside
    the zero-point border the second reads. On AVX2 hosts: the integer reference, bit for
    bit."""
    mod, ws, offsets, mults = _two_3x3_convs(32, seed=8)
    with HASWELL:
        lowered = PackFloatConv(HASWELL)(Int8AsFloat(HASWELL)(mod))
    names = sorted(gv.name_hint for gv in lowered.get_global_vars() if gv.name_hint != "main")
    assert "tvmq_winograd_matmul_3x3_int16_32x32" in names, names
    assert "tvmq_winograd_output_3x3_int16_32x32_requantize_as_int16" in names, names
    assert "tvmq_winograd_output_3x3_int16_32x32_requantize" in names, names
    # both transforms read int16: the second its producer's store, the first the image's
    # pad and cast, which write int16 for it (no float32 image in memory)
    reads = []
    relax.analysis.post_order_visit(
        lowered["main"],
        lambda e: (
            reads.append(str(e.args[1].fields[0].ty.dtype))
            if op_name(e) == "relax.call_tir" and "winograd_input" in e.args[0].name_hint
            else None
        ),
    )
    assert reads == ["int16", "int16"], reads
    _check_two_3x3_convs(mod, ws, offsets, mults, seed=9)


def _check_two_3x3_convs(mod, ws, offsets, mults, seed: int) -> None:
    """On AVX2 hosts, :func:`_two_3x3_convs`'s x86-avx2 library, which stores the 3x3
    weights and computes the int16 Winograd panels from them at load, on a random image:
    the integer reference, bit for bit."""
    if not {"avx2", "fma"} <= cpu_flags():
        return  # (x86-avx2 code runs only where the CPU has AVX2 and FMA)
    shape = tuple(int(d) for d in mod["main"].params[0].ty.shape)
    x = np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)
    ex, _ = build_with_info(mod, "x86-avx2", tuning_logs=None, int8_weight_codes=True)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    decoded = decoded_params(vm)
    assert [str(p.dtype) for p in decoded] == ["int16", "int16"]  # from the stored weights
    got = vm["main"](tvm.runtime.tensor(x), *decoded).numpy()
    np.testing.assert_array_equal(got, _two_3x3_convs_reference(x, ws, offsets, mults))
    assert len(np.unique(got)) > 20


def _two_3x3_convs_reference(x, ws, offsets, mults) -> np.ndarray:
    """:func:`_two_3x3_convs`'s result: torch's float64 convs of the integers, requantized
    in float32 by numpy."""
    import torch

    v = x.astype(np.float64)
    for i in range(2):
        if i:
            v = np.pad(v, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=3.0)
        acc = torch.nn.functional.conv2d(
            torch.from_numpy(v.astype(np.float64)),
            torch.from_numpy(ws[i].astype(np.float64)),
            padding=1 - i,
        )
        s = (np.rint(acc.numpy()).astype(np.int64) + offsets[i]).astype(np.float32) * mults[i]
        v = np.clip(np.rint(s) + 3, -128, 127)
    return v.astype(np.int8)


def test_large_winograd_convs_take_the_fused_kernel():
    """Two 56x56 convs of 64 channels (their transformed images and sums 4.8 MB each) take
    the int16 Winograd route as one kernel each, a band of tiles at a time; a library that
    stores the 3x3 weights and transforms them at load gives the integer reference, bit
    for bit (on AVX2 hosts)."""
    mod, ws, offsets, mults = _two_3x3_convs(64, seed=10, hw=56)
    with HASWELL:
        lowered = PackFloatConv(HASWELL)(Int8AsFloat(HASWELL)(mod))
    names = sorted(gv.name_hint for gv in lowered.get_global_vars() if gv.name_hint != "main")
    assert names == [
        "tvmq_winograd_fused_3x3_int16_64x64_requantize",
        "tvmq_winograd_fused_3x3_int16_64x64_requantize_as_int16",
    ], names
    _check_two_3x3_convs(mod, ws, offsets, mults, seed=11)


def _stem(c: int, k: int, stride: int, hw: int, seed: int):
    """A ``k x k`` / ``stride`` conv of 16 filters over a ``c``-channel uint8 image as
    LowerInt8 emits it (padded with the zero point 5 first), requantized to int8."""
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (16, c, k, k)).astype(np.int8)
    offset = rng.integers(-5000, 5000, (1, 16, 1, 1)).astype(np.int32)
    mult = (rng.random((1, 16, 1, 1)) * 2e-4 + 2e-5).astype(np.float32)
    pad = k // 2
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, c, hw, hw), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            v = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, pad, pad, pad, pad], pad_value=5.0))
            acc = bb.emit(relax.op.nn.conv2d(v, relax.const(w), strides=stride, out_dtype="int32"))
            s = bb.emit(relax.op.add(acc, relax.const(offset)))
            s = bb.emit(relax.op.multiply(relax.op.astype(s, "float32"), relax.const(mult)))
            one, zp = relax.const(1.0, "float32"), relax.const(3, "int32")
            out = bb.emit_output(bb.emit(relax.op.quantize(s, one, zp, axis=1, out_dtype="int8")))
        bb.emit_func_output(out)

    def reference(image: np.ndarray) -> np.ndarray:
        import torch

        v = np.pad(
            image.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=5
        )
        acc = torch.nn.functional.conv2d(
            torch.from_numpy(v), torch.from_numpy(w.astype(np.float64)), stride=stride
        ).numpy()
        s = (np.rint(acc).astype(np.int64) + offset).astype(np.float32) * mult
        return np.clip(np.rint(s) + 3, -128, 127).astype(np.int8)

    return bb.get(), reference


@pytest.mark.parametrize(
    ("c", "k", "hw", "kernel"),
    [(3, 7, 30, "7x11_2x16"), (3, 3, 22, "3x5_2x16"), (1, 3, 17, None)],
    ids=["resnet-7x7-rgb", "mobilenet-3x3-rgb", "odd-width-gray"],
)
def test_an_image_conv_pairs_its_channels_along_the_width(c, k, hw, kernel):
    """A stride-2 conv over an RGB image (ResNet's, MobileNet's stem) reads its 3 channels as
    pairs along the width, on the int16 kernel (a grayscale image of odd width cannot pair
    up and stays float). On AVX2 hosts: torch's conv of the same integers, bit for bit."""
    mod, reference = _stem(c, k, 2, hw, seed=k)
    with HASWELL:
        lowered = PackFloatConv(HASWELL)(Int8AsFloat(HASWELL)(mod))
    names = [gv.name_hint for gv in lowered.get_global_vars() if gv.name_hint != "main"]
    if kernel is None:
        assert [n for n in names if "conv2d" in n] == [
            f"tvmq_float_conv2d_nhwc_{k}x{k}_{c}x16_requantize"
        ]
    else:
        assert f"tvmq_int16_conv2d_nhwc_{kernel}_requantize" in names, names
    if not {"avx2", "fma"} <= cpu_flags():
        return  # (x86-avx2 code runs only where the CPU has AVX2 and FMA)
    vm = relax.VirtualMachine(build(mod, "x86-avx2"), tvm.cpu())
    rng = np.random.default_rng(k)
    for _ in range(2):
        x = rng.integers(0, 256, (1, c, hw, hw)).astype(np.uint8)
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        ref = reference(x)
        np.testing.assert_array_equal(got, ref)
    assert len(np.unique(got)) > 20


@pytest.mark.parametrize("stride", [1, 2], ids=["bottleneck", "downsample"])
def test_a_1x1_conv_over_one_row_pads_its_result_for_the_next_conv(stride):
    """A bottleneck's 1x1 conv over 14x14 (6x2 int16 tiles would pad each row to 18) runs
    over one row of 196 pixels; so does a downsample's stride-2 1x1 conv from 28x28, over
    its strided pixels sliced out (not a padded copy of its input). The zero-point border
    that the next 3x3 conv reads is padded after it. On AVX2 hosts: the integer reference,
    bit for bit."""
    import torch

    rng = np.random.default_rng(5)
    hw = 14 * stride
    w1 = rng.integers(-127, 128, (32, 16, 1, 1)).astype(np.int8)
    w2 = rng.integers(-127, 128, (16, 32, 3, 3)).astype(np.int8)
    mult1, mult2 = np.float32(3e-3), np.float32(4e-4)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, hw, hw), "uint8"))
    one = relax.const(1.0, "float32")
    with bb.function("main", [x]):
        with bb.dataflow():
            acc = bb.emit(relax.op.nn.conv2d(x, relax.const(w1), strides=stride, out_dtype="int32"))
            s = bb.emit(relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(mult1)))
            zp = relax.const(3, "int32")
            v = bb.emit(relax.op.quantize(s, one, zp, axis=1, out_dtype="int8"))
            v = bb.emit(relax.op.nn.pad(v, [0, 0, 0, 0, 1, 1, 1, 1], pad_value=3.0))
            acc = bb.emit(relax.op.nn.conv2d(v, relax.const(w2), out_dtype="int32"))
            s = bb.emit(relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(mult2)))
            out = bb.emit_output(bb.emit(relax.op.quantize(s, one, zp, axis=1, out_dtype="int8")))
        bb.emit_func_output(out)
    mod = bb.get()
    with HASWELL:
        lowered = PackFloatConv(HASWELL, winograd=False)(Int8AsFloat(HASWELL)(mod))
    shapes = {}
    relax.analysis.post_order_visit(
        lowered["main"],
        lambda e: (
            shapes.setdefault(e.args[0].name_hint, tuple(e.args[1].fields[0].ty.shape))
            if op_name(e) == "relax.call_tir"
            else None
        ),
    )
    one_row = [k for k, v in shapes.items() if "1x1" in k and tuple(map(int, v)) == (1, 1, 196, 16)]
    assert one_row, shapes
    sliced = []  # the images whose pixels a strided_slice takes (NHWC)
    relax.analysis.post_order_visit(
        lowered["main"],
        lambda e: (
            sliced.append(tuple(map(int, e.args[0].ty.shape)))
            if op_name(e) == "relax.strided_slice"
            else None
        ),
    )
    assert ((1, 28, 28, 16) in sliced) == (stride == 2), sliced
    if not {"avx2", "fma"} <= cpu_flags():
        return  # (x86-avx2 code runs only where the CPU has AVX2 and FMA)
    vm = relax.VirtualMachine(build(mod, "x86-avx2"), tvm.cpu())
    image = rng.integers(0, 256, (1, 16, hw, hw)).astype(np.uint8)
    got = vm["main"](tvm.runtime.tensor(image)).numpy()

    def conv(v, w, stride=1):
        acc = torch.nn.functional.conv2d(
            torch.from_numpy(v), torch.from_numpy(w.astype(np.float64)), stride=stride
        )
        return np.rint(acc.numpy()).astype(np.float32)

    v = np.clip(np.rint(conv(image.astype(np.float64), w1, stride) * mult1) + 3, -128, 127)
    v = np.pad(v.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=3.0)
    want = np.clip(np.rint(conv(v, w2) * mult2) + 3, -128, 127).astype(np.int8)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) > 20
