"""PackInt8ConvX86: int8 conv2d as im2col + the VNNI dense kernel, bit-exact, no-op elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from tvmq.kernels import KERNEL_ATTR
from tvmq.passes import pack_int8_conv_x86
from tvmq.passes.pack_int8_conv_x86 import PackInt8ConvX86
from tvmq.passes.pack_int8_dense_x86 import target_has_vnni

CASCADELAKE = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"})
SAPPHIRERAPIDS = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids"})
SKYLAKE = tvm.target.Target({"kind": "llvm", "mcpu": "skylake"})
AARCH64 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"})
HOST_HAS_VNNI = target_has_vnni(tvm.target.Target.from_device(tvm.cpu()))


def _conv_module(x_shape, w, x_dtype, *, strides=1, padding=0, dilation=1, groups=1, pad_z=None):
    """``main(x) = conv2d([pad(x, pad_z)], W, out_dtype=int32)``, as LowerInt8 emits it."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, x_dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            data = x
            if pad_z is not None:  # LowerInt8: pad with the zero point, conv without padding
                p = padding
                data = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, p, p, p, p], pad_value=pad_z))
                padding = 0
            y = bb.emit(
                relax.op.nn.conv2d(
                    data,
                    relax.const(w, "int8"),
                    strides=strides,
                    padding=padding,
                    dilation=dilation,
                    groups=groups,
                    out_dtype="int32",
                )
            )
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _reference(x, w, strides, padding, dilation, pad_value=0):
    """Plain int64 numpy NCHW x OIHW convolution (groups 1), then int32."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(
        x.astype(np.int64),
        ((0, 0), (0, 0), (padding, padding), (padding, padding)),
        constant_values=pad_value,
    )
    oh = (h + 2 * padding - dilation * (kh - 1) - 1) // strides + 1
    ow = (wd + 2 * padding - dilation * (kw - 1) - 1) // strides + 1
    out = np.zeros((n, o, oh, ow), dtype=np.int64)
    for ky in range(kh):
        for kx in range(kw):
            y0, x0 = ky * dilation, kx * dilation
            patch = xp[:, :, y0 : y0 + strides * oh : strides, x0 : x0 + strides * ow : strides]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, ky, kx].astype(np.int64))
    return out.astype(np.int32)


def _random(rng, shape, dtype):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, shape, dtype=dtype)


def _run(mod, x, target=CASCADELAKE):
    ex = tvm.compile(mod, target=target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def _kernels(mod):
    return sorted(
        f.attrs[KERNEL_ATTR]
        for _, f in mod.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and KERNEL_ATTR in f.attrs
    )


def _has_conv2d(mod):
    found = []
    relax.analysis.post_order_visit(
        mod["main"],
        lambda e: (
            found.append(e)
            if isinstance(e, relax.Call) and e.op.same_as(tvm.ir.Op.get("relax.nn.conv2d"))
            else None
        ),
    )
    return bool(found)


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="the host CPU has no avx512vnni")
@pytest.mark.parametrize(
    ("x_shape", "o", "k", "strides", "padding", "dilation", "x_dtype"),
    [
        ((1, 1, 28, 28), 16, 3, 1, 1, 1, "uint8"),  # the demo CNN's first conv (K = 9 -> 12)
        ((1, 16, 14, 14), 32, 3, 1, 1, 1, "uint8"),  # its second
        ((2, 5, 9, 11), 7, 3, 2, 1, 1, "int8"),  # batch 2, stride 2, ragged C and O
        ((1, 3, 10, 10), 20, 1, 1, 0, 1, "uint8"),  # 1x1, O padded to 32
        ((2, 6, 8, 7), 13, 1, 2, 0, 1, "int8"),  # 1x1 stride 2
        ((1, 4, 12, 12), 8, 3, 1, 2, 2, "int8"),  # dilation 2
        ((1, 3, 7, 7), 5, 5, 2, 2, 1, "uint8"),  # 5x5, M = 16 rows
        ((1, 2, 5, 5), 3, 3, 1, 0, 1, "uint8"),  # M = 9: padded to 16 rows
        ((1, 12, 40, 40), 8, 3, 1, 1, 2, "int8"),  # cols 169 KiB: im2col rows in parallel
        ((1, 3, 115, 113), 16, 3, 2, 0, 1, "uint8"),  # parallel, read in place (no staging)
    ],
)
def test_bit_exact_on_random_inputs(rng, x_shape, o, k, strides, padding, dilation, x_dtype):
    w = _random(rng, (o, x_shape[1], k, k), np.int8)
    x = _random(rng, x_shape, np.dtype(x_dtype))
    mod = _conv_module(x_shape, w, x_dtype, strides=strides, padding=padding, dilation=dilation)
    packed = PackInt8ConvX86(CASCADELAKE)(mod)
    assert not _has_conv2d(packed)
    assert _kernels(packed) == ["int8_dense_vnni", "int8_im2col"]
    got = _run(packed, x)
    np.testing.assert_array_equal(got, _reference(x, w, strides, padding, dilation))


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="the host CPU has no avx512vnni")
@pytest.mark.parametrize(
    ("x_shape", "o", "k", "strides", "padding", "dilation", "x_dtype"),
    [
        ((1, 16, 112, 112), 32, 3, 1, 1, 1, "uint8"),  # cols 1.7 MiB, 7x2 tiles
        ((2, 32, 115, 111), 48, 3, 2, 1, 1, "int8"),  # batch 2, stride 2, 4x3 tiles
        ((1, 16, 101, 103), 16, 3, 1, 2, 2, "int8"),  # dilation 2, M = 10403 padded
        ((1, 128, 200, 200), 16, 1, 2, 0, 1, "uint8"),  # 1x1 stride 2 (not its own im2col)
    ],
)
def test_im2col_in_the_kernel_bit_exact(rng, x_shape, o, k, strides, padding, dilation, x_dtype):
    """A conv whose im2col matrix has 64 KiB or more has no im2col kernel: the dense kernel copies
    each row tile's rows from the image itself (zeros for the padding, int8 shifted as it
    copies), and no pad kernel runs: the same products as the reference."""
    w = _random(rng, (o, x_shape[1], k, k), np.int8)
    x = _random(rng, x_shape, np.dtype(x_dtype))
    mod = _conv_module(x_shape, w, x_dtype, strides=strides, padding=padding, dilation=dilation)
    packed = PackInt8ConvX86(CASCADELAKE)(mod)
    assert _kernels(packed) == ["int8_dense_vnni"]
    assert any("_im2col" in gv.name_hint for gv in packed.get_global_vars())
    main = packed["main"].script()
    assert "R.nn.pad" not in main and "int16" not in main  # no padded or shifted copy
    got = _run(packed, x)
    np.testing.assert_array_equal(got, _reference(x, w, strides, padding, dilation))


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="the host CPU has no avx512vnni")
@pytest.mark.parametrize(("x_dtype", "z"), [("uint8", 131), ("int8", -7)])
def test_zero_point_pad_from_lower_int8(rng, x_dtype, z):
    """A conv on ``pad(x, value=z)`` (LowerInt8 with a non-zero zero point) stays exact."""
    x_shape = (2, 6, 9, 9)
    w = _random(rng, (10, 6, 3, 3), np.int8)
    x = _random(rng, x_shape, np.dtype(x_dtype))
    mod = _conv_module(x_shape, w, x_dtype, strides=2, padding=1, pad_z=float(z))
    got = _run(PackInt8ConvX86(CASCADELAKE)(mod), x)
    np.testing.assert_array_equal(got, _reference(x, w, 2, 1, 1, pad_value=z))


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="the host CPU has no avx512vnni")
def test_extreme_values_do_not_overflow():
    w = np.full((16, 32, 3, 3), -128, dtype=np.int8)
    w[::2] = 127
    x = np.full((1, 32, 6, 6), -128, dtype=np.int8)
    x[:, ::3] = 127
    got = _run(PackInt8ConvX86(CASCADELAKE)(_conv_module(x.shape, w, "int8", padding=1)), x)
    np.testing.assert_array_equal(got, _reference(x, w, 1, 1, 1))


def test_same_shape_shares_kernels(rng):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 6, 6), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            ys = [
                bb.emit(
                    relax.op.nn.conv2d(
                        x, relax.const(_random(rng, (8, 8, 3, 3), np.int8)), out_dtype="int32"
                    )
                )
                for _ in range(2)
            ]
            out = bb.emit_output(relax.op.add(*ys))
        bb.emit_func_output(out)
    mod = PackInt8ConvX86(CASCADELAKE)(bb.get())
    assert _kernels(mod) == ["int8_dense_vnni", "int8_im2col"]
    funcs = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert all(f.attrs["tirx.is_scheduled"] and int(f.attrs["op_pattern"]) == 8 for f in funcs)
    # Idempotent: nothing left to rewrite.
    tvm.ir.assert_structural_equal(PackInt8ConvX86(CASCADELAKE)(mod), mod)


@pytest.mark.parametrize("target", [SKYLAKE, AARCH64, None], ids=["skylake", "aarch64", "none"])
def test_noop_without_vnni(rng, target):
    mod = _conv_module((1, 4, 6, 6), _random(rng, (8, 4, 3, 3), np.int8), "uint8", padding=1)
    tvm.ir.assert_structural_equal(PackInt8ConvX86(target)(mod), mod)


def _float_conv_module():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 6, 6), "float32"))
    with bb.function("main", [x]):
        w = relax.const(np.ones((8, 4, 3, 3), "float32"))
        bb.emit_func_output(bb.emit(relax.op.nn.conv2d(x, w)))
    return bb.get()


def _grouped_conv_module(rng):
    return _conv_module((1, 4, 6, 6), _random(rng, (8, 2, 3, 3), np.int8), "uint8", groups=2)


def _weight_param_module():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 6, 6), "uint8"))
    w = relax.Var("w", relax.TensorType((8, 4, 3, 3), "int8"))
    with bb.function("main", [x, w]):
        bb.emit_func_output(bb.emit(relax.op.nn.conv2d(x, w, out_dtype="int32")))
    return bb.get()


def _nhwc_module(rng):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 6, 6, 4), "uint8"))
    with bb.function("main", [x]):
        w = relax.const(_random(rng, (8, 4, 3, 3), np.int8))
        y = relax.op.nn.conv2d(x, w, data_layout="NHWC", out_layout="NHWC", out_dtype="int32")
        bb.emit_func_output(bb.emit(y))
    return bb.get()


@pytest.mark.parametrize("case", ["float", "groups", "weight_param", "nhwc"])
def test_leaves_other_convs_alone(rng, case):
    mod = {
        "float": _float_conv_module,
        "groups": lambda: _grouped_conv_module(rng),
        "weight_param": _weight_param_module,
        "nhwc": lambda: _nhwc_module(rng),
    }[case]()
    tvm.ir.assert_structural_equal(PackInt8ConvX86(CASCADELAKE)(mod), mod)


class _SmallCNN(torch.nn.Module):
    """conv 3x3 (C = 3) -> relu -> conv 3x3 stride 2 -> relu -> conv 1x1 -> linear."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.c3 = torch.nn.Conv2d(12, 20, 1)
        self.fc = torch.nn.Linear(20 * 6 * 6, 10)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(torch.flatten(self.c3(x), 1))


@pytest.mark.slow
@pytest.mark.skipif(not HOST_HAS_VNNI, reason="the host CPU has no avx512vnni")
def test_quantized_cnn_for_host_runs_convs_on_vnni(rng, monkeypatch):
    """tvmq.compile(int8) for "host": same outputs with and without the pass, convs on VNNI."""
    import tvmq

    torch.manual_seed(0)
    model = _SmallCNN().eval()
    calib = rng.standard_normal((32, 3, 12, 12)).astype(np.float32)  # zero point != 0
    x = rng.standard_normal((1, 3, 12, 12)).astype(np.float32)

    def compile_and_run():
        art = tvmq.compile(
            model,
            "host",
            example_inputs=(torch.from_numpy(x),),
            quantize="int8",
            calibration_data=calib,
            progress=False,
            tuning_logs=None,
        )
        vm = relax.VirtualMachine(art.executable, tvm.cpu())
        (out,) = vm["main"](tvm.runtime.tensor(x))  # the model's one output, as a tuple
        return out.numpy(), art.manifest.notes["kernels"]["prescheduled"]

    got, kernels = compile_and_run()
    # c3 (1x1, 12 uint8 channels over 36 pixels) reads its NHWC input as is: no im2col
    # each conv on an int8 kernel: im2col + VNNI dense, or AMX tiles on a host that has them
    assert sum(k.startswith(("tvmq_int8_im2col", "tvmq_int8_conv_amx")) for k in kernels) == 2
    # 3 convs + fc, on AMX tiles where this CPU has them (the fc's one row stays on VNNI)
    assert sum(k.startswith(("tvmq_int8_dense_vnni", "tvmq_int8_dense_amx")) for k in kernels) == 4
    # The same build without the conv pass (its rewrite returns the module unchanged).
    monkeypatch.setattr(pack_int8_conv_x86, "rewrite_channels_last", lambda mod, *_args: mod)
    want, kernels = compile_and_run()
    assert not any(k.startswith("tvmq_int8_im2col") for k in kernels)
    np.testing.assert_array_equal(got, want)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, atol=0.1 * np.abs(ref).max())


def _conv_chain_module(rng, x_shape=(1, 3, 12, 12), o1=16, o2=24):
    """conv -> bias, relu, requantize (per-channel) -> max_pool -> conv -> per-channel dequantize,
    the two results returned NCHW: the second conv's directly, the first's through a reshape."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "uint8"))
    w1 = _random(rng, (o1, x_shape[1], 3, 3), np.int8)
    w2 = _random(rng, (o2, o1, 3, 3), np.int8)
    bias = rng.integers(-3000, 3000, (1, o1, 1, 1), dtype=np.int32)
    scale = (rng.random((o1, 1, 1)) * 0.02).astype(np.float32)  # 3-D: broadcast from the right
    with bb.function("main", [x]):
        with bb.dataflow():
            conv = lambda d, w, pad: relax.op.nn.conv2d(  # noqa: E731
                d, relax.const(w), padding=pad, out_dtype="int32"
            )
            y = bb.emit(conv(x, w1, 1))
            y = bb.emit(relax.op.nn.relu(relax.op.add(y, relax.const(bias))))
            y = bb.emit(relax.op.multiply(relax.op.astype(y, "float32"), relax.const(scale)))
            q = relax.const(np.float32(1.0))
            y = bb.emit(relax.op.quantize(y, q, relax.const(0, "int32"), out_dtype="uint8"))
            p = bb.emit(relax.op.nn.max_pool2d(y, 2, 2))
            z = bb.emit(conv(p, w2, 0))
            s2 = relax.const((rng.random(o2) * 0.01).astype(np.float32))
            z = bb.emit(relax.op.dequantize(z, s2, relax.const(np.zeros(o2, np.int32)), axis=1))
            flat = bb.emit(relax.op.reshape(p, (x_shape[0], -1)))
            out = bb.emit_output(relax.Tuple([z, flat]))
        bb.emit_func_output(out)
    return bb.get()


def _ops_named(mod, name):
    found = []
    relax.analysis.post_order_visit(
        mod["main"],
        lambda e: (
            found.append(e)
            if isinstance(e, relax.Call) and e.op.same_as(tvm.ir.Op.get(name))
            else None
        ),
    )
    return found


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="the host CPU has no avx512vnni")
def test_results_stay_nhwc_between_convs(rng):
    """The requantize runs in the first dense kernel, the dequantize in the second; max_pool
    and the next im2col run channels last; NCHW only where read. Bit-exact with the
    unrewritten module (TVM's default lowering) on random inputs."""
    mod = _conv_chain_module(rng)
    packed = PackInt8ConvX86(CASCADELAKE)(mod)
    (pool,) = _ops_named(packed, "relax.nn.max_pool2d")
    assert (pool.attrs.layout, pool.attrs.out_layout) == ("NHWC", "NHWC")
    assert not _ops_named(packed, "relax.quantize")  # stored requantized by the kernel
    dense = [str(gv.name_hint) for gv in packed.get_global_vars() if "dense" in gv.name_hint]
    assert sorted(dense) == ["tvmq_int8_dense_vnni_144x28x16_requantize_offset",
                             "tvmq_int8_dense_vnni_16x144x32_dequantize"]  # fmt: skip
    assert not _ops_named(packed, "relax.dequantize")
    # The input to NHWC once; to NCHW only the second conv's result and the pool output the
    # reshape reads. None before the second conv (its im2col reads the NHWC pool output).
    permutes = _ops_named(packed, "relax.permute_dims")
    axes = sorted(tuple(int(a) for a in p.attrs.axes) for p in permutes)
    assert axes == [(0, 2, 3, 1), (0, 3, 1, 2), (0, 3, 1, 2)]
    for x_shape in [(1, 3, 12, 12), (2, 3, 12, 12)]:
        mod = _conv_chain_module(np.random.default_rng(7), x_shape)
        packed = PackInt8ConvX86(CASCADELAKE)(mod)
        x = _random(rng, x_shape, np.uint8)
        got = relax.VirtualMachine(tvm.compile(packed, target=CASCADELAKE), tvm.cpu())["main"](
            tvm.runtime.tensor(x)
        )
        want = relax.VirtualMachine(tvm.compile(mod, target=CASCADELAKE), tvm.cpu())["main"](
            tvm.runtime.tensor(x)
        )
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g.numpy(), w.numpy())


class _HardswishCNN(torch.nn.Module):
    """conv -> hardswish -> conv -> ReLU6 -> pool: clips whose bounds are scalars (IntImm /
    FloatImm), which once crashed the NHWC rewrite (MobileNetV3-style blocks)."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = torch.nn.functional.hardswish(self.c1(x))
        x = torch.nn.functional.relu6(self.c2(x))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("target", ["x86-avx512-vnni", "host"])
def test_clip_bounds_after_int8_convs_compile(rng, target):
    """Hardswish / ReLU6 after int8 convs build for a VNNI preset; on a VNNI host they also
    run, close to float (SQNR), with the convs on tvmq's int8 kernels."""
    import tvmq

    if target == "host" and not HOST_HAS_VNNI:
        pytest.skip("the host CPU has no avx512vnni")
    torch.manual_seed(0)
    model = _HardswishCNN().eval()
    calib = rng.standard_normal((32, 3, 12, 12)).astype(np.float32)
    x = rng.standard_normal((1, 3, 12, 12)).astype(np.float32)
    art = tvmq.compile(
        model,
        target,
        example_inputs=(torch.from_numpy(x),),
        quantize="int8",
        calibration_data=calib,
        progress=False,
        tuning_logs=None,
    )
    kernels = art.manifest.notes["kernels"]["prescheduled"]
    # each conv on an int8 kernel: im2col + VNNI dense, or AMX tiles on a host that has them
    assert sum(k.startswith(("tvmq_int8_im2col", "tvmq_int8_conv_amx")) for k in kernels) == 2
    if target != "host":
        return
    (out,) = relax.VirtualMachine(art.executable, tvm.cpu())["main"](tvm.runtime.tensor(x))
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = out.numpy()
    sqnr = 20 * np.log10(np.linalg.norm(ref) / np.linalg.norm(ref - got))
    assert sqnr > 20, sqnr


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="the host CPU has no avx512vnni")
@pytest.mark.parametrize(
    ("x_shape", "k", "strides", "padding", "x_dtype"),
    [
        ((1, 32, 14, 14), 3, 1, 1, "uint8"),  # MobileNet's depthwise conv
        ((2, 24, 9, 13), 3, 2, 1, "int8"),  # 8-lane vectors, stride 2, odd width
        ((1, 16, 10, 10), 5, 1, 2, "uint8"),  # 5x5 (MobileNetV3 / EfficientNet)
    ],
)
def test_depthwise_is_exact_and_channels_last(rng, x_shape, k, strides, padding, x_dtype):
    c = x_shape[1]
    w = _random(rng, (c, 1, k, k), np.int8)
    x = _random(rng, x_shape, np.dtype(x_dtype))
    mod = _conv_module(x_shape, w, x_dtype, strides=strides, padding=padding, groups=c)
    packed = PackInt8ConvX86(CASCADELAKE)(mod)
    assert not _has_conv2d(packed)
    assert _kernels(packed) == ["int8_depthwise_nhwc"]
    got = _run(packed, x)
    want = torch.nn.functional.conv2d(
        torch.from_numpy(x.astype(np.float64)),
        torch.from_numpy(w.astype(np.float64)),
        stride=strides,
        padding=padding,
        groups=c,
    )  # integer sums below 2**53: exact in float64
    np.testing.assert_array_equal(got, want.numpy().astype(np.int32))


def _requantized_conv_module(
    rng, x_shape, w, x_dtype, groups, relu, clip, out_dtype, z, scale=0.02
):
    """conv -> LowerInt8's float requantize: add(offset) [-> relu] -> astype -> multiply(m)
    -> quantize(1.0, z) [-> clip]; for a float32 ``out_dtype``, add [-> relu] -> dequantize
    (``m``: random up to ``scale``, a quarter of the channels 2**-6)."""
    o = w.shape[0]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, x_dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=1, groups=groups,
                                           out_dtype="int32"))  # fmt: skip
            off = rng.integers(-4000, 4000, (1, o, 1, 1), dtype=np.int32)
            y = bb.emit(relax.op.add(y, relax.const(off)))
            if relu:
                y = bb.emit(relax.op.nn.relu(y))
            m = (rng.random((1, o, 1, 1)) * scale).astype(np.float32)
            m[:, ::4] = 2.0**-6  # exact halves: round half to even
            if out_dtype == "float32":  # a float result: dequantize along the channels
                zeros = relax.const(np.zeros(o, np.int32))
                q = relax.op.dequantize(y, relax.const(m.reshape(o)), zeros, axis=1)
            else:
                y = bb.emit(relax.op.astype(y, "float32"))
                y = bb.emit(relax.op.multiply(y, relax.const(m)))
                q = relax.op.quantize(y, relax.const(np.float32(1.0)), relax.const(z, "int32"),
                                      out_dtype=out_dtype)  # fmt: skip
                if clip is not None:
                    q = relax.op.clip(bb.emit(q), *clip)
            out = bb.emit_output(q)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="the host CPU has no avx512vnni")
@pytest.mark.parametrize(
    ("x_shape", "o", "groups", "x_dtype", "relu", "clip", "out_dtype", "z"),
    [
        ((1, 16, 9, 11), 24, 1, "int8", False, None, "int8", -5),  # shifted input, signed out
        ((1, 16, 9, 11), 20, 1, "uint8", True, (3, 120), "uint8", 3),  # padded N, ReLU6-like
        ((2, 32, 8, 8), 32, 32, "uint8", True, None, "uint8", 0),  # depthwise
        ((1, 24, 7, 9), 24, 24, "int8", False, (-100, 90), "int8", 2),  # depthwise, clip
        ((1, 16, 9, 11), 20, 1, "uint8", True, None, "float32", 0),  # dequantize (float out)
        ((1, 32, 6, 10), 32, 32, "int8", False, None, "float32", 0),  # depthwise, dequantize
        ((1, 16, 9, 11), 2, 1, "uint8", False, None, "float32", 0),  # a 2-class segmentation head
        ((1, 16, 9, 11), 5, 1, "int8", True, None, "uint8", 4),  # 5 channels, requantized
    ],
)
def test_requantize_runs_in_the_kernel_bit_exact(
    rng, x_shape, o, groups, x_dtype, relu, clip, out_dtype, z
):
    """The requantize after an int8 conv (dense or depthwise) is computed by the conv's kernel:
    no int32 tensor or quantize op is left, and the result equals TVM's default lowering of
    the unrewritten module exactly."""
    w = _random(rng, (o, x_shape[1] // groups, 3, 3), np.int8)
    mod = _requantized_conv_module(rng, x_shape, w, x_dtype, groups, relu, clip, out_dtype, z)
    packed = PackInt8ConvX86(CASCADELAKE)(mod)
    assert not _has_conv2d(packed)
    assert not _ops_named(packed, "relax.quantize") and not _ops_named(packed, "relax.dequantize")
    names = [str(gv.name_hint) for gv in packed.get_global_vars()]
    fused = "_dequantize" if out_dtype == "float32" else "_requantize"
    assert sum(n.startswith("tvmq_") and fused in n for n in names) == 1, names
    assert packed["main"].ret_ty.dtype == out_dtype
    x = _random(rng, x_shape, np.dtype(x_dtype))
    got, want = _run(packed, x), _run(mod, x)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) > 20  # not clamped flat
    if groups == 1 and o < 16:  # fewer channels than a vector: the kernel stores just those
        assert any(n.endswith(f"_n{o}") for n in names), names


def _silu(bb, y):
    return bb.emit(relax.op.multiply(y, bb.emit(relax.op.sigmoid(y))))


def _relu6_of_plus_3(bb, y, split):
    t = bb.emit(relax.op.add(y, relax.const(3.0, "float32")))
    if not split:
        return bb.emit(relax.op.clip(t, 0, 6))
    return bb.emit(relax.op.clip(bb.emit(relax.op.clip(t, 0, float("inf"))), float("-inf"), 6))


def _hardswish(bb, y):  # PyTorch's decomposition: (x * t) / 6, the clip split in two
    t = _relu6_of_plus_3(bb, y, split=True)
    return bb.emit(relax.op.divide(bb.emit(relax.op.multiply(y, t)), relax.const(6.0)))


def _hardswish_onnx(bb, y):  # the ONNX importer's: x * (t / 6)
    t = _relu6_of_plus_3(bb, y, split=False)
    return bb.emit(relax.op.multiply(y, bb.emit(relax.op.divide(t, relax.const(6.0)))))


_ACTIVATIONS = {
    "gelu": lambda bb, y: bb.emit(relax.op.nn.gelu(y)),
    "silu": _silu,
    "hardswish": _hardswish,
    "hardswish_divide_first": _hardswish_onnx,
}
_RELU6 = {"relu6": lambda bb, y: bb.emit(relax.op.clip(y, 0, 6))}  # MobileNetV2's last conv


def _activated(conv: tvm.IRModule, x_shape, activation: str, quantize) -> tvm.IRModule:
    """``main(x) = [quantize](activation(conv's main(x)))``, ``quantize`` (scale, zero, dtype)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "uint8"))
    inner = bb.add_func(conv["main"].without_attr("global_symbol"), "conv")
    with bb.function("main", [x]):
        with bb.dataflow():
            y = (_ACTIVATIONS | _RELU6)[activation](bb, bb.emit(relax.Call(inner, [x])))
            if quantize is not None:
                scale, zero, dtype = quantize
                y = bb.emit(relax.op.quantize(y, relax.const(np.float32(scale)),
                                              relax.const(zero, "int32"), out_dtype=dtype))  # fmt: skip
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return relax.transform.Normalize()(relax.transform.InlinePrivateFunctions()(bb.get()))


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="the host CPU has no avx512vnni")
@pytest.mark.parametrize("activation", sorted(_ACTIVATIONS))
@pytest.mark.parametrize(
    ("x_shape", "o", "groups", "out_dtype"),
    [
        ((1, 16, 9, 11), 24, 1, "float32"),
        ((1, 32, 6, 10), 32, 32, "float32"),  # depthwise
        ((1, 16, 9, 11), 40, 1, "uint8"),  # the quantize after it stays a kernel of its own
    ],
)
def test_activation_after_the_dequantize_runs_in_the_kernel_bit_exact(
    rng, x_shape, o, groups, out_dtype, activation
):
    """An activation after a conv's dequantize (dense or depthwise) is stored by the conv's
    kernel: the same bits as UseFastMath's activation kernel (or the legalized ops) after the
    separate ops. A quantize after it stays a separate kernel (cheaper on Zen 4), and the
    result is still the same bits."""
    from tvmq.passes.quantize_by_multiply import QuantizeByMultiply
    from tvmq.passes.use_fast_math import UseFastMath

    w = _random(rng, (o, x_shape[1] // groups, 3, 3), np.int8)
    conv = _requantized_conv_module(rng, x_shape, w, "uint8", groups, False, None, "float32", 0)
    lower = lambda m: QuantizeByMultiply()(UseFastMath()(m))  # noqa: E731
    x = _random(rng, x_shape, np.uint8)
    mod = _activated(conv, x_shape, activation, None)
    if out_dtype != "float32":  # a scale for ~100 steps over the activation's range
        scale = float(np.abs(_run(lower(mod), x)).max()) / 100
        mod = _activated(conv, x_shape, activation, (scale, -7, out_dtype))
    packed = PackInt8ConvX86(CASCADELAKE)(mod)
    names = [str(gv.name_hint) for gv in packed.get_global_vars()]
    assert sum("_dequantize_" + activation in n for n in names) == 1, names
    assert not _ops_named(packed, "relax.dequantize")
    assert bool(_ops_named(packed, "relax.quantize")) == (out_dtype != "float32")
    got, want = _run(lower(packed), x), _run(lower(mod), x)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) > 20 and (out_dtype != "float32" or (got < -0.01).any())


@pytest.mark.parametrize(
    ("x_shape", "o", "groups", "target"),
    [
        pytest.param((1, 16, 9, 11), 24, 1, CASCADELAKE, marks=pytest.mark.vnni),
        pytest.param((1, 32, 6, 10), 32, 32, CASCADELAKE, marks=pytest.mark.vnni),  # depthwise
        pytest.param((1, 64, 9, 11), 40, 1, SAPPHIRERAPIDS, marks=pytest.mark.amx),
    ],
)
def test_a_relu6_after_the_dequantize_runs_in_the_kernel(rng, x_shape, o, groups, target):
    """``clip(dequantize(.), 0, 6)`` (MobileNetV2's last conv, read by the float average pool)
    is stored by the conv's kernel, no clip kernel after it: the same bits."""
    w = _random(rng, (o, x_shape[1] // groups, 3, 3), np.int8)
    conv = _requantized_conv_module(
        rng, x_shape, w, "uint8", groups, False, None, "float32", 0, scale=1e-4
    )
    mod = _activated(conv, x_shape, "relu6", None)
    packed = PackInt8ConvX86(target)(mod)
    names = [str(gv.name_hint) for gv in packed.get_global_vars()]
    assert sum("_dequantize_relu6" in n for n in names) == 1, names
    assert not _ops_named(packed, "relax.clip")
    x = _random(rng, x_shape, np.uint8)
    got, want = _run(packed, x, target), _run(mod, x, target)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) > 20 and got.min() == 0 and got.max() == 6


@pytest.mark.amx
@pytest.mark.parametrize("large", [False, True])
@pytest.mark.parametrize("activation", sorted(_ACTIVATIONS))
def test_an_amx_conv_quantizes_its_hardswish_itself(rng, monkeypatch, activation, large):
    """On an AMX target a hardswish after the dequantize and the quantize after it are the
    conv kernel's store (one kernel, no float32 tensor), the same bits as the separate ops;
    a SiLU's quantize joins only where its float32 result would outgrow a core's L2 (its exp
    costs the 1x1 convs more than a quantize kernel over a tensor in cache; ``large``: the
    bound set below this conv's 9 x 11 x 40 result)."""
    from tvmq.passes import pack_int8_conv_x86
    from tvmq.passes.quantize_by_multiply import QuantizeByMultiply
    from tvmq.passes.use_fast_math import UseFastMath

    x_shape, o = (1, 64, 9, 11), 40
    if large:
        monkeypatch.setattr(pack_int8_conv_x86, "_SILU_QUANTIZED_BYTES", 4 * 9 * 11 * o - 1)
    w = _random(rng, (o, x_shape[1], 3, 3), np.int8)
    conv = _requantized_conv_module(rng, x_shape, w, "uint8", 1, False, None, "float32", 0)
    lower = lambda m: QuantizeByMultiply()(UseFastMath()(m))  # noqa: E731
    x = _random(rng, x_shape, np.uint8)
    scale = float(np.abs(_run(lower(_activated(conv, x_shape, activation, None)), x)).max()) / 100
    mod = _activated(conv, x_shape, activation, (scale, -7, "uint8"))
    packed = PackInt8ConvX86(SAPPHIRERAPIDS)(mod)
    names = [str(gv.name_hint) for gv in packed.get_global_vars()]
    joined = activation.startswith("hardswish") or (large and activation == "silu")
    assert sum(f"_{activation}_requantize" in n for n in names) == joined, names
    assert bool(_ops_named(packed, "relax.quantize")) != joined
    got = _run(lower(packed), x, SAPPHIRERAPIDS)
    want = _run(lower(mod), x, SAPPHIRERAPIDS)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) > 20


@pytest.mark.amx
@pytest.mark.parametrize(
    ("x_shape", "o", "x_dtype", "out_dtype", "z", "kernel"),
    [
        ((1, 64, 9, 11), 40, "int8", "int8", -5, "int8_conv_amx"),  # shifted, padded N
        ((2, 128, 7, 7), 64, "uint8", "uint8", 3, "int8_conv_amx"),  # batch 2
        ((1, 64, 9, 11), 32, "uint8", "float32", 0, "int8_conv_amx"),  # dequantize
        ((1, 48, 9, 11), 32, "uint8", "uint8", 3, "int8_conv_amx"),  # 48 channels: tap runs
        ((2, 32, 9, 11), 32, "int8", "int8", -3, "int8_conv_amx"),  # 32: runs of 96 read as 128
        ((1, 32, 30, 30), 16, "uint8", "float32", 0, "int8_conv_amx"),  # one row of slack
        (
            (1, 24, 16, 16),
            32,
            "uint8",
            "uint8",
            3,
            "int8_conv_amx_gathered",
        ),  # 24: 72 -> 128 is too much
    ],
)
def test_amx_target_runs_convs_on_tiles_bit_exact(rng, x_shape, o, x_dtype, out_dtype, z, kernel):
    """On an AMX target a stride-1 conv over 64-channel multiples reads its padded input
    straight into the tiles, the others gather one block of rows at a time from it (no im2col
    matrix either way); both with the requantize in the kernel and the same bits as TVM's
    default lowering."""
    w = _random(rng, (o, x_shape[1], 3, 3), np.int8)
    mod = _requantized_conv_module(rng, x_shape, w, x_dtype, 1, True, None, out_dtype, z)
    packed = PackInt8ConvX86(SAPPHIRERAPIDS)(mod)
    kernels = [str(k) for k in _kernels(packed)]
    assert kernel in kernels
    assert "int8_im2col" not in kernels, kernels
    x = _random(rng, x_shape, np.dtype(x_dtype))
    got, want = _run(packed, x, SAPPHIRERAPIDS), _run(mod, x, SAPPHIRERAPIDS)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) > 20  # not clamped flat


def _two_convs_module(rng, x_shape, o1, kernel1, stride1, o2, out_zero, groups1=1, kernel2=3):
    """conv1 (``groups1``) -> ReLU requantize to uint8 (zero point 0) -> conv2 (``kernel2``,
    padding ``kernel2 // 2``) -> requantize to uint8 with ``out_zero``: the intermediate's only
    reader pads it (or, 1x1 over channels no tile row holds, reads a row past it)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "uint8"))

    def requantized(data, o, kernel, stride, zero, scale, groups=1):
        c = int(data.ty.shape[1]) // groups
        w = relax.const(_random(rng, (o, c, kernel, kernel), np.int8))
        y = bb.emit(
            relax.op.nn.conv2d(data, w, stride, kernel // 2, groups=groups, out_dtype="int32")
        )
        y = bb.emit(relax.op.add(y, relax.const(rng.integers(-4000, 4000, (1, o, 1, 1), np.int32))))
        y = bb.emit(relax.op.astype(bb.emit(relax.op.nn.relu(y)), "float32"))
        m = (rng.random((1, o, 1, 1)) * scale).astype(np.float32)
        y = bb.emit(relax.op.multiply(y, relax.const(m)))
        one, z = relax.const(np.float32(1.0)), relax.const(zero, "int32")
        return relax.op.quantize(y, one, z, out_dtype="uint8")

    with bb.function("main", [x]):
        with bb.dataflow():
            scale = 4e-4 / kernel1 * groups1**0.5  # a depthwise conv sums fewer products
            q = bb.emit(requantized(x, o1, kernel1, stride1, 0, scale, groups1))
            out = bb.emit_output(requantized(q, o2, kernel2, 1, out_zero, 2e-3))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.amx
@pytest.mark.parametrize(
    ("x_shape", "o1", "kernel1", "stride1", "producer"),
    [
        ((1, 64, 12, 12), 64, 3, 1, "int8_conv_amx"),  # read straight into the tiles
        ((2, 64, 16, 16), 64, 3, 2, "int8_conv_amx_gathered"),  # strided: gathered blocks
        ((1, 64, 14, 14), 48, 1, 1, "int8_conv_amx"),  # 48 channels: tap runs, slack rows
    ],
)
def test_amx_conv_writes_the_next_convs_padded_input(rng, x_shape, o1, kernel1, stride1, producer):
    """An AMX conv whose uint8 result only a padding AMX conv reads writes it zero-bordered:
    no pad kernel between the two, and the bits of TVM's default lowering."""
    mod = _two_convs_module(rng, x_shape, o1, kernel1, stride1, 64, 5)
    packed = PackInt8ConvX86(SAPPHIRERAPIDS)(mod)
    names = [str(gv.name_hint) for gv in packed.get_global_vars()]
    assert sum(n.endswith("_bordered") for n in names) == 1, names
    assert producer in _kernels(packed)
    assert len(_ops_named(packed, "relax.nn.pad")) == (kernel1 > 1)  # the model input's only
    x = _random(rng, x_shape, np.uint8)
    got, want = _run(packed, x, SAPPHIRERAPIDS), _run(mod, x, SAPPHIRERAPIDS)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) > 20


@pytest.mark.amx
@pytest.mark.parametrize(
    ("x_shape", "stride", "kernel2", "border"),
    [
        ((1, 96, 14, 14), 1, 1, True),  # 96 channels a tile row reads as 128: one slack row
        ((1, 144, 16, 16), 2, 1, True),  # 144 read as 192, after a strided depthwise conv
        ((1, 64, 16, 16), 1, 3, True),  # the next conv's padding all around
        ((1, 128, 14, 14), 1, 1, False),  # a 1x1 over 128 channels reads no row past them
    ],
)
def test_a_depthwise_conv_writes_the_next_amx_convs_padded_input(
    rng, x_shape, stride, kernel2, border
):
    """A depthwise conv whose uint8 result only a padding AMX conv reads writes it with that
    conv's border: MobileNetV2's projections over 96 or 144 channels read one row past the
    image (a pad kernel copied the whole tensor for it). The bits of TVM's lowering."""
    c = x_shape[1]
    mod = _two_convs_module(rng, x_shape, c, 3, stride, 64, 5, groups1=c, kernel2=kernel2)
    packed = PackInt8ConvX86(SAPPHIRERAPIDS)(mod)
    names = [str(gv.name_hint) for gv in packed.get_global_vars()]
    assert sum("int8_depthwise" in n and n.endswith("_bordered") for n in names) == border, names
    assert "int8_conv_amx" in _kernels(packed)
    assert not _ops_named(packed, "relax.nn.pad")
    x = _random(rng, x_shape, np.uint8)
    got, want = _run(packed, x, SAPPHIRERAPIDS), _run(mod, x, SAPPHIRERAPIDS)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) > 20


def _residual_block_module(rng, x_shape=(1, 16, 10, 10), downsample=False):
    """A ResNet block as LowerInt8 emits it: conv -> requantize (uint8, zero point 113) joined
    by its float32 integer add to the block's input ``x`` (or, ``downsample``, to a 1x1
    conv's requantized result): ``quantize(add(multiply(subtract(astype(q), 113), s_q),
    multiply([subtract](astype(r), z_r), s_r)), 1, 0)``."""
    bb = relax.BlockBuilder()
    c = x_shape[1]
    x = relax.Var("x", relax.TensorType(x_shape, "uint8"))
    f32 = lambda v: relax.const(np.float32(v))  # noqa: E731

    def conv_requantized(data, kernel, pad, zero):
        w = _random(rng, (c, c, kernel, kernel), np.int8)
        y = bb.emit(relax.op.nn.conv2d(data, relax.const(w), padding=pad, out_dtype="int32"))
        bias = rng.integers(-3000, 3000, (1, c, 1, 1), dtype=np.int32)
        y = bb.emit(relax.op.add(y, relax.const(bias)))
        scale = (rng.random((1, c, 1, 1)) * 0.004).astype(np.float32)
        y = bb.emit(relax.op.multiply(bb.emit(relax.op.astype(y, "float32")), relax.const(scale)))
        zp = relax.const(np.int32(zero))
        return bb.emit(relax.op.quantize(y, f32(1.0), zp, axis=-1, out_dtype="uint8"))

    def term(q, zero, scale):
        t = bb.emit(relax.op.astype(q, "float32"))
        if zero:
            t = bb.emit(relax.op.subtract(t, f32(zero)))
        return bb.emit(relax.op.multiply(t, f32(scale)))

    with bb.function("main", [x]):
        with bb.dataflow():
            q = conv_requantized(x, 3, 1, 113)
            r, r_zero = (conv_requantized(x, 1, 0, 97), 97) if downsample else (x, 0)
            total = bb.emit(relax.op.add(term(q, 113, 1.3417910), term(r, r_zero, 0.8185334)))
            zp = relax.const(np.int32(0))
            out = bb.emit_output(relax.op.quantize(total, f32(1.0), zp, axis=-1, out_dtype="uint8"))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="the host CPU has no avx512vnni")
@pytest.mark.parametrize("downsample", [False, True], ids=["identity", "downsample"])
def test_residual_add_joins_the_conv_kernel(rng, downsample):
    """The block's add and its quantize run in the conv kernel's store (the later conv's, when
    both operands are convs): no float add is left, and the output is the unrewritten
    module's (TVM's default lowering) bit for bit on random inputs."""
    mod = _residual_block_module(np.random.default_rng(3), downsample=downsample)
    packed = PackInt8ConvX86(CASCADELAKE)(mod)
    names = [str(gv.name_hint) for gv in packed.get_global_vars()]
    assert sum(n.endswith("_residual_offset") for n in names) == 1
    assert not _ops_named(packed, "relax.add") and not _ops_named(packed, "relax.quantize")
    for seed in range(3):
        x = _random(np.random.default_rng(seed), (1, 16, 10, 10), np.uint8)
        got, want = _run(packed, x), _run(mod, x)
        np.testing.assert_array_equal(got, want)
        assert len(np.unique(want)) > 40  # sums spread over the range, not clamped flat


def _zero_point_padded_depthwise(
    rng, x_shape, x_dtype, zero, pads, kernel, stride, quantized_here=False
):
    """``pad(x, zero)`` then a depthwise int8 conv of no padding, requantized to uint8: the
    form LowerInt8 gives a conv whose input zero point is not 0. ``quantized_here``: ``x``
    is float32 and quantized first (the pad then fuses into that elementwise kernel)."""
    c = x_shape[1]
    w = _random(rng, (c, 1, kernel, kernel), np.int8)
    top, left, bottom, right = pads
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32" if quantized_here else x_dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            v = x
            if quantized_here:
                v = bb.emit(relax.op.quantize(x, relax.const(np.float32(0.05)),
                                              relax.const(zero, "int32"), out_dtype=x_dtype))  # fmt: skip
            p = bb.emit(relax.op.nn.pad(v, [0, 0, 0, 0, top, bottom, left, right], "constant",
                                        float(zero)))  # fmt: skip
            y = bb.emit(relax.op.nn.conv2d(p, relax.const(w), strides=stride, groups=c,
                                           out_dtype="int32"))  # fmt: skip
            y = bb.emit(relax.op.astype(y, "float32"))
            m = (rng.random((1, c, 1, 1)) * 0.01).astype(np.float32)
            y = bb.emit(relax.op.multiply(y, relax.const(m)))
            q = relax.op.quantize(y, relax.const(np.float32(1.0)), relax.const(100, "int32"),
                                  out_dtype="uint8")  # fmt: skip
            out = bb.emit_output(q)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="the host CPU has no avx512vnni")
@pytest.mark.parametrize(
    ("x_shape", "x_dtype", "zero", "pads", "kernel", "stride"),
    [
        ((1, 16, 12, 13), "uint8", 11, (1, 1, 1, 1), 3, 1),  # MobileNetV3's first block
        ((1, 32, 14, 14), "uint8", 200, (0, 0, 1, 1), 3, 2),  # TF-style, strided
        ((1, 48, 9, 10), "int8", -3, (2, 2, 2, 2), 5, 1),  # 5x5, a signed image
    ],
)
def test_a_depthwise_conv_reads_its_zero_point_padding_itself(
    rng, x_shape, x_dtype, zero, pads, kernel, stride
):
    """The pad with the zero point before a depthwise conv becomes the kernel's own padding:
    its taps there read the zero point. No pad kernel, the same bits."""
    mod = _zero_point_padded_depthwise(rng, x_shape, x_dtype, zero, pads, kernel, stride)
    packed = PackInt8ConvX86(CASCADELAKE)(mod)
    assert not _ops_named(packed, "relax.nn.pad")
    names = [str(gv.name_hint) for gv in packed.get_global_vars()]
    assert any("depthwise_zp" in n for n in names), names
    x = _random(rng, x_shape, np.dtype(x_dtype).type)
    got, want = _run(packed, x), _run(mod, x)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) > 20


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="the host CPU has no avx512vnni")
def test_a_zero_point_pad_after_an_elementwise_op_stays_in_its_kernel(rng):
    """A pad after an elementwise op (EfficientNet's SiLU + quantize) fuses into that op's
    kernel: the depthwise kernel keeps reading a padded image (its border taps cost more)."""
    shape = (1, 16, 12, 13)
    mod = _zero_point_padded_depthwise(rng, shape, "uint8", 11, (1, 1, 1, 1), 3, 1, True)
    packed = PackInt8ConvX86(CASCADELAKE)(mod)
    assert _ops_named(packed, "relax.nn.pad")
    assert not any("depthwise_zp" in str(gv.name_hint) for gv in packed.get_global_vars())
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(_run(packed, x), _run(mod, x))


def _expand_depthwise_module(rng, x_shape, o, stride):
    """1x1 conv -> ReLU requantize to uint8 (zero point 0) -> depthwise 3x3 (padding 1,
    ``stride``) -> requantize to uint8 (zero point 5): a MobileNet block's first two layers."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "uint8"))

    def requantized(y, zero, scale):
        o = int(y.ty.shape[1])
        y = bb.emit(relax.op.add(y, relax.const(rng.integers(-4000, 4000, (1, o, 1, 1), np.int32))))
        y = bb.emit(relax.op.astype(bb.emit(relax.op.nn.relu(y)), "float32"))
        y = bb.emit(
            relax.op.multiply(y, relax.const((rng.random((1, o, 1, 1)) * scale).astype(np.float32)))
        )
        one, z = relax.const(np.float32(1.0)), relax.const(zero, "int32")
        return relax.op.quantize(y, one, z, out_dtype="uint8")

    w1 = relax.const(_random(rng, (o, x_shape[1], 1, 1), np.int8))
    w2 = relax.const(_random(rng, (o, 1, 3, 3), np.int8))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w1, out_dtype="int32"))
            q = bb.emit(requantized(y, 0, 1e-3))
            y = bb.emit(relax.op.nn.conv2d(q, w2, stride, 1, groups=o, out_dtype="int32"))
            out = bb.emit_output(requantized(y, 5, 8e-3))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="the host CPU has no avx512vnni")
@pytest.mark.parametrize(
    ("o", "stride", "depthwise"),
    [(72, 1, "3x3_80x72"), (88, 2, "3x3_96x88"), (64, 1, "3x3_64x64")],
)
def test_a_depthwise_conv_reads_its_producers_padded_channels(rng, o, stride, depthwise):
    """A 1x1 int8 conv whose kernel stores whole vectors of channels (72 -> 80) feeds an int8
    depthwise conv: that kernel reads the padded result (each channel only its own) on
    16-lane vectors, no copy without the padding in between; the bits of TVM's default
    lowering (MobileNetV3-small int8 0.941 -> 0.913 ms on one thread, the same bits)."""
    x_shape = (1, 16, 10, 12)
    mod = _expand_depthwise_module(rng, x_shape, o, stride)
    packed = PackInt8ConvX86(CASCADELAKE)(mod)
    names = [str(gv.name_hint) for gv in packed.get_global_vars()]
    assert any(f"int8_depthwise_nhwc_{depthwise}_" in n for n in names), names
    assert len(_ops_named(packed, "relax.strided_slice")) == (o % 16 != 0)  # after the depthwise
    x = _random(rng, x_shape, np.uint8)
    got, want = _run(packed, x), _run(mod, x)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) > 20
