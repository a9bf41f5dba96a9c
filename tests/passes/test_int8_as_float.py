"""Int8AsFloat: int8 matmuls / convs on the float kernels where no int8 kernel runs, exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from tvm import relax

from tvmq.build import build, build_with_info
from tvmq.machine import cpu_flags
from tvmq.passes import Int8AsFloat, PackFloatConv, PackFloatDense
from tvmq.passes.relax_utils import CONV2D, MATMUL, op_name
from tvmq.runtime import decoded_params
from tvmq.targets import get_target

HASWELL = get_target("x86-avx2").tvm_target()
CASCADELAKE = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"})
AARCH64 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"})
CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})

_RNG = np.random.default_rng(0)
W_CONV = _RNG.integers(-128, 128, (16, 8, 3, 3), dtype=np.int8)
W_DW = _RNG.integers(-128, 128, (8, 1, 3, 3), dtype=np.int8)
W_DENSE = _RNG.integers(-128, 128, (128, 128), dtype=np.int8)


SHAPES = {"x": (1, 8, 9, 9), "a": (64, 128), "p": (4, 64, 64), "q": (4, 64, 64), "r": (2, 5, 16)}
DTYPES = {"x": "uint8", "a": "uint8", "p": "int8", "q": "int8", "r": "int8"}


def _module() -> tvm.IRModule:
    """A strided padded conv and a depthwise conv of uint8 ``x``, a matmul of uint8 ``a`` with
    a constant, a matmul of two int8 activations ``p @ q`` and a small one ``r @ r^T`` (below
    ``MIN_MACS``): all ``out_dtype="int32"``, as LowerInt8 emits them."""
    bb = relax.BlockBuilder()
    args = {k: relax.Var(k, relax.TensorType(SHAPES[k], DTYPES[k])) for k in SHAPES}
    x, a, p, q, r = args.values()
    with bb.function("main", list(args.values())):
        with bb.dataflow():
            conv = bb.emit(
                relax.op.nn.conv2d(x, relax.const(W_CONV), strides=2, padding=1, out_dtype="int32")
            )
            dw = bb.emit(
                relax.op.nn.conv2d(x, relax.const(W_DW), padding=1, groups=8, out_dtype="int32")
            )
            dense = bb.emit(relax.op.matmul(a, relax.const(W_DENSE), out_dtype="int32"))
            act = bb.emit(relax.op.matmul(p, q, out_dtype="int32"))
            r_t = bb.emit(relax.op.permute_dims(r, [0, 2, 1]))
            small = bb.emit(relax.op.matmul(r, r_t, out_dtype="int32"))
            out = bb.emit_output(relax.Tuple([conv, dw, dense, act, small]))
        bb.emit_func_output(out)
    return bb.get()


def _products(mod: tvm.IRModule) -> list[tuple[str, str]]:
    """``(op, result dtype)`` of every matmul / conv2d in ``main``."""
    found = []

    def visit(e):
        if op_name(e) in (MATMUL, CONV2D):
            found.append((op_name(e), str(e.ty.dtype)))

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


@pytest.mark.parametrize(
    "target", [CASCADELAKE, AARCH64, CUDA], ids=["cascadelake", "aarch64", "cuda"]
)
def test_targets_with_an_int8_kernel_are_left_alone(target):
    mod = _module()
    assert tvm_ffi.structural_equal(Int8AsFloat(target)(mod), mod)


def test_int8_products_become_float_products_without_vnni():
    products = _products(Int8AsFloat(HASWELL)(_module()))
    floats = [(CONV2D, "float32")] * 2 + [(MATMUL, "float32")] * 2
    assert sorted(products) == sorted(floats + [(MATMUL, "int32")])  # the small one stays


def test_the_float_kernels_take_them():
    with HASWELL:
        mod = PackFloatDense(HASWELL)(PackFloatConv(HASWELL)(Int8AsFloat(HASWELL)(_module())))
    # the conv, the depthwise conv and the constant-weight matmul run on tvmq's float kernels
    assert sorted(_products(mod)) == [(MATMUL, "float32"), (MATMUL, "int32")]


def random_inputs(seed: int) -> list[np.ndarray]:
    """Random bytes for :func:`_module`'s inputs (uint8 or int8, as ``DTYPES`` says)."""
    rng = np.random.default_rng(seed)
    return [
        rng.integers(*((0, 256) if DTYPES[k] == "uint8" else (-128, 128)), SHAPES[k]).astype(
            DTYPES[k]
        )
        for k in SHAPES
    ]


def _reference(x, a, p, q, r):
    xi = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (1, 1), (1, 1)))

    def conv(w, stride, groups):
        o, cg, kh, kw = w.shape
        oh = (xi.shape[2] - kh) // stride + 1
        y = np.zeros((1, o, oh, oh), np.int64)
        for oc in range(o):
            c0 = oc // (o // groups) * cg
            for i in range(oh):
                for j in range(oh):
                    win = xi[
                        0, c0 : c0 + cg, i * stride : i * stride + kh, j * stride : j * stride + kw
                    ]
                    y[0, oc, i, j] = (win * w[oc]).sum()
        return y

    return [
        conv(W_CONV.astype(np.int64), 2, 1),
        conv(W_DW.astype(np.int64), 1, 8),
        a.astype(np.int64) @ W_DENSE.astype(np.int64),
        p.astype(np.int64) @ q.astype(np.int64),
        r.astype(np.int64) @ r.astype(np.int64).transpose(0, 2, 1),
    ]


@pytest.mark.skipif(
    not {"avx2", "fma"} <= cpu_flags(), reason="runs x86-avx2 code: needs AVX2 and FMA"
)
def test_results_are_the_exact_integer_products():
    inputs = random_inputs(1)
    # as a library of tvmq.compile stores them: the weights of the rewritten products
    # (float32; int16 where Int8AsInt16 took them) as 8-bit codes, decoded once at load
    ex, _ = build_with_info(_module(), "x86-avx2", tuning_logs=None, int8_weight_codes=True)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    decoded = decoded_params(vm)
    assert len(decoded) == 2  # the conv's and the dense layer's; the depthwise one is small
    got = vm["main"](*(tvm.runtime.tensor(v) for v in inputs), *decoded)
    plain = relax.VirtualMachine(build(_module(), "x86-avx2"), tvm.cpu())  # weights as float32
    assert decoded_params(plain) == []
    for y, z in zip(got, plain["main"](*(tvm.runtime.tensor(v) for v in inputs)), strict=True):
        np.testing.assert_array_equal(y.numpy(), z.numpy())
    for y, ref in zip(got, _reference(*inputs), strict=True):
        assert y.numpy().dtype == np.int32
        np.testing.assert_array_equal(y.numpy(), ref)


@pytest.mark.skipif(
    not {"avx2", "fma"} <= cpu_flags(), reason="runs x86-avx2 code: needs AVX2 and FMA"
)
def test_an_avx2_int8_library_keeps_int8_weights_and_the_hosts_results(tmp_path):
    """tvmq.compile for x86-avx2 stores the convs' weights as 8-bit codes (not 4x their size
    in float32) and computes what the host's int8 library computes (VNNI kernels on a VNNI
    host, these same float kernels elsewhere), bit for bit."""
    import torch

    import tvmq

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(8, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 16, 3)
    ).eval()
    rng = np.random.default_rng(2)
    calib = [{"input": rng.standard_normal((1, 8, 12, 12)).astype(np.float32)} for _ in range(4)]
    x = rng.standard_normal((1, 8, 12, 12)).astype(np.float32)
    outputs, weights = {}, {}
    for target in ("x86-avx2", "host"):
        out = tmp_path / target
        tvmq.compile(
            model, target, example_inputs=(torch.from_numpy(x),), output_dir=out,
            quantize="int8", calibration_data=calib, progress=False, tuning_logs=None,
        )  # fmt: skip
        lib = tvmq.load(out)
        outputs[target] = lib(x)
        weights[target] = lib.manifest.notes["weights"]
    np.testing.assert_array_equal(outputs["x86-avx2"], outputs["host"])
    conv_weights = 32 * 8 * 9 + 16 * 32 * 9
    assert weights["x86-avx2"]["uint8"] >= conv_weights  # the codes, one byte a weight
    assert weights["x86-avx2"].get("float32", 0) < 4 * conv_weights / 2  # not the weights


W_1X1 = _RNG.integers(-128, 128, (24, 16, 1, 1), dtype=np.int8)
OFFSET = _RNG.integers(-3000, 3000, (1, 16, 1, 1)).astype(np.int32)
MULT = (_RNG.random((1, 16, 1, 1)) * 1e-3 + 1e-4).astype(np.float32)


def _requantized_module() -> tvm.IRModule:
    """A padded conv and a depthwise conv of uint8 ``x``, each followed by LowerInt8's float
    requantize (offset, ReLU, astype, per-channel multiply, quantize to int8 with zero point
    -128), then a 1x1 conv whose sum is dequantized (a float32 result)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 9, 9), "uint8"))

    def requantize(acc, relu):
        v = bb.emit(relax.op.add(acc, relax.const(OFFSET)))
        v = bb.emit(relax.op.nn.relu(v)) if relu else v
        v = bb.emit(relax.op.multiply(relax.op.astype(v, "float32"), relax.const(MULT)))
        one, zp = relax.const(1.0, "float32"), relax.const(-128, "int32")
        return bb.emit(relax.op.quantize(v, one, zp, axis=1, out_dtype="int8"))

    with bb.function("main", [x]):
        with bb.dataflow():
            conv = bb.emit(relax.op.nn.conv2d(x, relax.const(W_CONV), padding=1, out_dtype="int32"))
            q = requantize(conv, relu=True)
            dw = bb.emit(
                relax.op.nn.conv2d(q, relax.const(W_DW.repeat(2, 0)), groups=16, out_dtype="int32")
            )
            q = requantize(dw, relu=False)
            last = bb.emit(relax.op.nn.conv2d(q, relax.const(W_1X1), out_dtype="int32"))
            scale = relax.const(np.full(24, 1e-2, np.float32))
            zero = relax.const(np.zeros(24, np.int32))
            y = bb.emit(relax.op.dequantize(last, scale, zero, axis=1, out_dtype="float32"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _requantized_reference(x: np.ndarray) -> np.ndarray:
    def conv(v, w, groups=1, pad=0):
        t = torch.nn.functional.conv2d(
            torch.from_numpy(v.astype(np.float64)), torch.from_numpy(w.astype(np.float64)),
            padding=pad, groups=groups,
        )  # fmt: skip
        return np.rint(t.numpy()).astype(np.int64)  # exact: small integer sums

    def requantize(acc, relu):
        v = (acc + OFFSET).astype(np.int32)
        v = np.maximum(v, 0) if relu else v
        f = v.astype(np.float32) * MULT  # float32, as the kernels compute it
        return np.clip(np.rint(f) - 128, -128, 127).astype(np.int8)

    q = requantize(conv(x, W_CONV, pad=1), relu=True)
    q = requantize(conv(q, W_DW.repeat(2, 0), groups=16), relu=False)
    return conv(q, W_1X1).astype(np.int32).astype(np.float32) * np.float32(1e-2)


def test_a_requantize_after_a_float_product_is_its_kernels_epilogue():
    """The float conv kernels convert their exact sums to int32 and requantize (or dequantize)
    them before the store: the requantize ops are gone from the graph."""
    with HASWELL:
        mod = PackFloatConv(HASWELL, int16=False)(Int8AsFloat(HASWELL)(_requantized_module()))
    kernels = sorted(gv.name_hint for gv, f in mod.functions.items() if gv.name_hint != "main")
    # the two int8 results are read by the next conv only, converted to float32: they are
    # stored as float32 (no conversion kernel between the layers)
    assert kernels == [
        "tvmq_float_conv2d_nhwc_1x1_16x24_dequantize",
        "tvmq_float_conv2d_nhwc_3x3_8x16_requantize_as_float",
        "tvmq_float_depthwise_nhwc_3x3_16x16_requantize_as_float",
    ]
    # the weights bound the sums: rounded by the float -> int32 conversion (llvm.lrint)
    rounding = {gv.name_hint: "lrint" in str(f) for gv, f in mod.functions.items()}
    assert [k for k in kernels if rounding[k]] == kernels[1:]
    ops = []
    relax.analysis.post_order_visit(mod["main"], lambda e: ops.append(op_name(e)))
    assert not set(ops) & {"relax.quantize", "relax.dequantize", "relax.multiply", "relax.nn.relu"}
    assert ops.count("relax.astype") == 1  # the input's; none between the layers


@pytest.mark.skipif(
    not {"avx2", "fma"} <= cpu_flags(), reason="runs x86-avx2 code: needs AVX2 and FMA"
)
def test_requantizing_float_kernels_match_the_integer_reference():
    """Random uint8 images through the requantizing kernels: torch's float64 convs of the same
    integers, requantized in float32 by numpy, bit for bit."""
    x = np.random.default_rng(4).integers(0, 256, (1, 8, 9, 9)).astype(np.uint8)
    vm = relax.VirtualMachine(build(_requantized_module(), "x86-avx2"), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(got, _requantized_reference(x))


def _residual_module() -> tvm.IRModule:
    """A ResNet block's end as LowerInt8 writes it: a 1x1 conv of uint8 ``x`` requantized to
    int8 (zero point -14), dequantized (``astype``, subtract the zero point, scale), added to
    the dequantized int8 skip ``s`` and quantized again."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 9, 9), "uint8"))
    s = relax.Var("s", relax.TensorType((1, 24, 9, 9), "int8"))
    f32 = lambda v: relax.const(v, "float32")  # noqa: E731
    with bb.function("main", [x, s]):
        with bb.dataflow():
            acc = bb.emit(relax.op.nn.conv2d(x, relax.const(W_1X1), out_dtype="int32"))
            v = bb.emit(relax.op.add(acc, relax.const(OFFSET[:, :8].repeat(3, 1))))
            v = bb.emit(
                relax.op.multiply(
                    relax.op.astype(v, "float32"), relax.const(MULT[:, :8].repeat(3, 1))
                )
            )
            q = bb.emit(
                relax.op.quantize(v, f32(1.0), relax.const(-14, "int32"), axis=1, out_dtype="int8")
            )
            a = bb.emit(
                relax.op.multiply(
                    relax.op.subtract(relax.op.astype(q, "float32"), f32(-14.0)), f32(0.0625)
                )
            )
            b = bb.emit(
                relax.op.multiply(
                    relax.op.subtract(relax.op.astype(s, "float32"), f32(3.0)), f32(0.03125)
                )
            )
            y = bb.emit(relax.op.add(a, b))
            out = bb.emit_output(
                relax.op.quantize(
                    y, f32(0.125), relax.const(-128, "int32"), axis=1, out_dtype="int8"
                )
            )
        bb.emit_func_output(out)
    return bb.get()


def test_a_requantized_conv_read_by_a_residual_add_stores_its_int8_bytes():
    """The conv's int8 result, dequantized for a residual add, is stored as int8 (not as the
    float32 a next conv would read: four times the bytes written and read); the add's kernel
    converts it. On AVX2 hosts, numpy's result of the integer sums, bit for bit (the scales
    are powers of two: nothing rounds in the add)."""
    with HASWELL:
        mod = PackFloatConv(HASWELL, int16=False)(Int8AsFloat(HASWELL)(_residual_module()))
    kernels = [gv.name_hint for gv in mod.functions if gv.name_hint.startswith("tvmq_")]
    assert kernels == ["tvmq_float_conv2d_nhwc_1x1_16x24_requantize"], kernels
    if not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("runs x86-avx2 code: needs AVX2 and FMA")
    rng = np.random.default_rng(6)
    x = rng.integers(0, 256, (1, 16, 9, 9)).astype(np.uint8)
    skip = rng.integers(-128, 128, (1, 24, 9, 9)).astype(np.int8)
    vm = relax.VirtualMachine(build(_residual_module(), "x86-avx2"), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(skip)).numpy()
    acc = np.einsum("nchw,oc->nohw", x.astype(np.int64), W_1X1[:, :, 0, 0].astype(np.int64))
    v = (acc + OFFSET[:, :8].repeat(3, 1)).astype(np.float32) * MULT[:, :8].repeat(3, 1)
    q = np.clip(np.rint(v) - 14, -128, 127).astype(np.float32)
    y = (q + 14) / 16 + (skip.astype(np.float32) - 3) / 32  # power-of-two scales: exact
    want = np.clip(np.rint(y * 8) - 128, -128, 127).astype(np.int8)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) > 50


def _requantized_3x3(c: int, seed: int) -> tuple[tvm.IRModule, tuple]:
    """A padded 3x3 conv of a uint8 image with ``c`` channels, requantized to int8."""
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (c, c, 3, 3)).astype(np.int8)
    offset = rng.integers(-5000, 5000, (1, c, 1, 1)).astype(np.int32)
    mult = (rng.random((1, c, 1, 1)) * 1e-4 + 1e-5).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, c, 10, 10), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            acc = bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=1, out_dtype="int32"))
            v = bb.emit(relax.op.add(acc, relax.const(offset)))
            v = bb.emit(relax.op.multiply(relax.op.astype(v, "float32"), relax.const(mult)))
            one, zp = relax.const(1.0, "float32"), relax.const(3, "int32")
            out = bb.emit_output(relax.op.quantize(v, one, zp, axis=1, out_dtype="int8"))
        bb.emit_func_output(out)
    return bb.get(), (w, offset, mult)


def test_a_requantized_3x3_conv_of_32_channels_takes_winograd():
    """A 3x3 conv of 32 channels requantizes in the Winograd output transform (the direct
    kernel for 8 channels, above); its sums of bytes, below 2**22 here, are exact: on AVX2
    hosts, the integer reference's int8 outputs bit for bit."""
    mod, (w, offset, mult) = _requantized_3x3(32, seed=5)
    with HASWELL:
        lowered = PackFloatConv(HASWELL, int16=False)(Int8AsFloat(HASWELL)(mod))
    names = sorted(gv.name_hint for gv, f in lowered.functions.items() if gv.name_hint != "main")
    assert "tvmq_winograd_output_3x3_32x32_requantize" in names, names
    assert not any(n.startswith("tvmq_float_conv2d") for n in names)
    if not {"avx2", "fma"} <= cpu_flags():
        return  # (x86-avx2 code runs only where the CPU has AVX2 and FMA)
    x = np.random.default_rng(6).integers(0, 256, (1, 32, 10, 10)).astype(np.uint8)
    vm = relax.VirtualMachine(build(mod, "x86-avx2"), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    acc = torch.nn.functional.conv2d(
        torch.from_numpy(x.astype(np.float64)), torch.from_numpy(w.astype(np.float64)), padding=1
    )
    v = (np.rint(acc.numpy()).astype(np.int64) + offset).astype(np.float32) * mult
    np.testing.assert_array_equal(got, np.clip(np.rint(v) + 3, -128, 127).astype(np.int8))


def _silu_block(c: int, hw: int, *, silu_read_twice: bool = False) -> tvm.IRModule:
    """An EfficientNet block as LowerInt8 emits it: a 1x1 conv of a uint8 image, dequantized,
    SiLU (``x * sigmoid(x)``), quantized to int8 and padded with its zero point, a 3x3
    depthwise conv, dequantized. ``silu_read_twice``: the SiLU is a second output too."""
    rng = np.random.default_rng(7)
    w1 = rng.integers(-127, 128, (c, 8, 1, 1)).astype(np.int8)
    w2 = rng.integers(-127, 128, (c, 1, 3, 3)).astype(np.int8)
    s1 = (rng.random(c) * 2e-4 + 1e-4).astype(np.float32)
    s2 = (rng.random(c) * 1e-3 + 1e-3).astype(np.float32)
    zero = relax.const(np.zeros(c, np.int32))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, hw, hw), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            acc = bb.emit(relax.op.nn.conv2d(x, relax.const(w1), out_dtype="int32"))
            offset = rng.integers(-20000, 0, (1, c, 1, 1)).astype(np.int32)
            acc = bb.emit(relax.op.add(acc, relax.const(offset)))
            f = bb.emit(relax.op.dequantize(acc, relax.const(s1), zero, axis=1))
            silu = bb.emit(relax.op.multiply(f, bb.emit(relax.op.sigmoid(f))))
            scale, zp = relax.const(0.0217, "float32"), relax.const(-100, "int32")
            q = bb.emit(relax.op.quantize(silu, scale, zp, axis=1, out_dtype="int8"))
            q = bb.emit(relax.op.nn.pad(q, [0, 0, 0, 0, 1, 1, 1, 1], pad_value=-100.0))
            dw = relax.op.nn.conv2d(q, relax.const(w2), groups=c, out_dtype="int32")
            dw = bb.emit(relax.op.add(bb.emit(dw), relax.const(np.full((1, c, 1, 1), 12700))))
            y = bb.emit(relax.op.dequantize(dw, relax.const(s2), zero, axis=1))
            out = bb.emit_output(relax.Tuple([y, silu]) if silu_read_twice else y)
        bb.emit_func_output(out)
    return bb.get(), (w1, w2, s1, s2, offset)


@pytest.mark.parametrize("hw", [12, 10])
def test_a_silu_quantized_for_a_depthwise_conv_is_the_first_kernels_store(hw):
    """The SiLU, its quantize and the zero-point padding before a depthwise conv are the 1x1
    conv's store: the quantized integers as float32, bordered with the zero point (where the
    register tile divides the width, 12; else padded after the kernel, 10): no int8 tensor
    and no conversion between the two convs. On AVX2 hosts: the same bits as the separate
    kernels (the SiLU read by a second output keeps them separate), and within half an
    output step of a float64 reference (the kernels' SiLU is a polynomial one)."""
    mod, (w1, w2, s1, s2, offset) = _silu_block(16, hw)
    with HASWELL:
        lowered = PackFloatConv(HASWELL, int16=False)(Int8AsFloat(HASWELL)(mod))
    names = sorted(gv.name_hint for gv in lowered.functions if gv.name_hint != "main")
    bordered = "_bordered" if hw == 12 else ""
    assert names == [
        f"tvmq_float_conv2d_nhwc_1x1_8x16_silu_requantize_as_float{bordered}",
        "tvmq_float_depthwise_nhwc_3x3_16x16_dequantize",
    ]
    ops = []
    relax.analysis.post_order_visit(lowered["main"], lambda e: ops.append(op_name(e)))
    assert not set(ops) & {"relax.quantize", "relax.sigmoid", "relax.multiply"}
    pads = []
    relax.analysis.post_order_visit(
        lowered["main"], lambda e: pads.append(e) if op_name(e) == "relax.nn.pad" else None
    )
    zero_point_pads = [p for p in pads if float(p.attrs.pad_value) == -100.0]
    assert len(zero_point_pads) == (0 if bordered else 1)
    assert all(str(p.args[0].ty.dtype) == "float32" for p in pads)
    assert ops.count("relax.astype") == 1  # the input's
    if not {"avx2", "fma"} <= cpu_flags():
        return  # (x86-avx2 code runs only where the CPU has AVX2 and FMA)
    x = np.random.default_rng(8).integers(0, 256, (1, 8, hw, hw)).astype(np.uint8)
    fused = relax.VirtualMachine(build(mod, "x86-avx2"), tvm.cpu())["main"]
    apart = relax.VirtualMachine(
        build(_silu_block(16, hw, silu_read_twice=True)[0], "x86-avx2"), tvm.cpu()
    )
    got = fused(tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(got, apart["main"](tvm.runtime.tensor(x))[0].numpy())
    # float64 reference: SiLU, quantize (x / s), depthwise over the codes, dequantize
    acc = np.einsum("ncyx,oc->noyx", x.astype(np.float64), w1[:, :, 0, 0].astype(np.float64))
    f = (acc + offset) * s1.reshape(1, -1, 1, 1)
    codes = np.clip(np.rint(f / (1 + np.exp(-f)) / np.float32(0.0217)) - 100, -128, 127)
    codes = np.pad(codes, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-100)
    win = np.lib.stride_tricks.sliding_window_view(codes, (3, 3), axis=(2, 3))
    want = (np.einsum("ncyxij,cij->ncyx", win, w2[:, 0]) + 12700) * s2.reshape(1, -1, 1, 1)
    step = np.abs(w2).max() * s2.max()  # one code of one tap moves an output this much
    assert np.abs(got - want).max() <= 0.5 * step
    assert len(np.unique(codes)) > 50  # the codes spread over the range


def _relu6_block(relu6_read_twice: bool) -> tvm.IRModule:
    """A 1x1 conv of a uint8 image, dequantized, ReLU6 (``clip(., 0, 6)``), quantized to int8
    (``relu6_read_twice``: the ReLU6 is a second output too, which keeps the ops apart)."""
    rng = np.random.default_rng(7)
    c = 16
    w = rng.integers(-127, 128, (c, 8, 1, 1)).astype(np.int8)
    s = (rng.random(c) * 2e-4 + 1e-4).astype(np.float32)
    offset = rng.integers(-20000, 0, (1, c, 1, 1)).astype(np.int32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 12, 12), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            acc = bb.emit(relax.op.nn.conv2d(x, relax.const(w), out_dtype="int32"))
            acc = bb.emit(relax.op.add(acc, relax.const(offset)))
            zero = relax.const(np.zeros(c, np.int32))
            f = bb.emit(relax.op.dequantize(acc, relax.const(s), zero, axis=1))
            r = bb.emit(relax.op.clip(f, 0, 6))  # 6 / 0.03 - 100: 100, inside int8
            scale, zp = relax.const(0.03, "float32"), relax.const(-100, "int32")
            q = bb.emit(relax.op.quantize(r, scale, zp, axis=1, out_dtype="int8"))
            out = bb.emit_output(relax.Tuple([q, r]) if relu6_read_twice else q)
        bb.emit_func_output(out)
    return bb.get()


def test_a_relu6_quantized_after_a_float_product_is_its_kernels_store():
    """``quantize(clip(dequantize(conv), 0, 6))`` is the float conv's store (a ``relu6``
    requantize, no clip or quantize op left); on AVX2 hosts, the same bits as the ops apart."""
    with HASWELL:
        lowered = PackFloatConv(HASWELL, int16=False)(Int8AsFloat(HASWELL)(_relu6_block(False)))
    names = [gv.name_hint for gv in lowered.functions if gv.name_hint != "main"]
    assert names == ["tvmq_float_conv2d_nhwc_1x1_8x16_relu6_requantize"], names
    ops = []
    relax.analysis.post_order_visit(lowered["main"], lambda e: ops.append(op_name(e)))
    assert not set(ops) & {"relax.quantize", "relax.clip"}
    if not {"avx2", "fma"} <= cpu_flags():
        return  # (x86-avx2 code runs only where the CPU has AVX2 and FMA)
    x = tvm.runtime.tensor(np.random.default_rng(8).integers(0, 256, (1, 8, 12, 12), np.uint8))
    fused = relax.VirtualMachine(build(_relu6_block(False), "x86-avx2"), tvm.cpu())["main"]
    apart = relax.VirtualMachine(build(_relu6_block(True), "x86-avx2"), tvm.cpu())["main"]
    got = fused(x).numpy()
    np.testing.assert_array_equal(got, apart(x)[0].numpy())
    assert len(np.unique(got)) > 100 and got.min() == -100 and got.max() == 100
