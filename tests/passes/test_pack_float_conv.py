"""PackFloatConv: float conv2d on tvmq's NHWC kernel, vs PyTorch, channels last between convs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from tvmq.build import build
from tvmq.kernels import KERNEL_ATTR
from tvmq.kernels.cpu_float_conv import ConvTiles, choose_conv_tiles, pack_conv_weight
from tvmq.passes import FoldBatchNorm, PackFloatConv
from tvmq.targets import get_target

AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
NEON = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"})
CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split()}


FLAGS = _cpu_flags()
needs_avx2 = pytest.mark.skipif("avx2" not in FLAGS or "fma" not in FLAGS, reason="no AVX2+FMA")
needs_vnni = pytest.mark.vnni  # the x86-avx512-vnni preset's code runs here


def _conv_module(x_shape, w, b=None, *, strides=1, padding=0, dilation=1, groups=1):
    """``main(x) = relu(conv2d(x, W) [+ b])``, float32 NCHW."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(
                relax.op.nn.conv2d(
                    x,
                    relax.const(w, "float32"),
                    strides=strides,
                    padding=padding,
                    dilation=dilation,
                    groups=groups,
                )
            )
            if b is not None:
                y = bb.emit(relax.op.add(y, relax.const(b.reshape(1, -1, 1, 1), "float32")))
            out = bb.emit_output(relax.op.nn.relu(y))
        bb.emit_func_output(out)
    return bb.get()


def _build_and_run(mod, preset: str, x):
    vm = relax.VirtualMachine(build(mod, preset), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def _kernel_names(mod) -> list[str]:
    return [
        str(f.attrs[KERNEL_ATTR])
        for _, f in mod.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and KERNEL_ATTR in f.attrs
    ]


def _torch_conv(x, w, b, strides, padding, dilation, groups=1):
    y = torch.nn.functional.conv2d(
        torch.from_numpy(x),
        torch.from_numpy(w),
        None if b is None else torch.from_numpy(b),
        stride=strides,
        padding=padding if isinstance(padding, int) else 0,
        dilation=dilation,
        groups=groups,
    )
    return torch.relu(y).numpy()


# (C, O, H, W, kernel, stride, padding, dilation): ResNet stem and stages, a 1x1 projection,
# odd widths (the output width gets padded to the register tile), channel counts that are
# not a multiple of the SIMD width, one input channel, dilation.
GEOMETRIES = [
    (3, 16, 20, 20, 7, 2, 3, 1),
    (16, 32, 14, 14, 3, 1, 1, 1),
    (16, 24, 13, 13, 3, 2, 1, 1),
    (32, 40, 9, 11, 1, 1, 0, 1),
    (1, 8, 12, 17, 3, 1, 0, 1),
    (8, 16, 12, 12, 3, 1, 2, 2),
]


@needs_vnni
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
def test_matches_torch_avx512(rng, geometry):
    c, o, h, w_, k, s, p, d = geometry
    x = rng.standard_normal((2, c, h, w_)).astype(np.float32)
    w = rng.standard_normal((o, c, k, k)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    mod = _conv_module(x.shape, w, b, strides=s, padding=p, dilation=d)
    with AVX512:
        lowered = PackFloatConv()(mod)
    assert _kernel_names(lowered) == ["float_conv2d_nhwc"]
    got = _build_and_run(mod, "x86-avx512-vnni", x)
    want = _torch_conv(x, w, b, s, p, d)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


# (C, H, W, kernel, stride, padding): MobileNet's depthwise convs, 24 channels (8-lane
# vectors on AVX-512), an odd output width, a 5x5 window.
DEPTHWISE = [
    (32, 16, 16, 3, 1, 1),
    (48, 15, 15, 3, 2, 1),
    (24, 9, 13, 5, 1, 2),
    (32, 9, 9, 3, 1, 0),
]


@needs_vnni
@pytest.mark.parametrize("geometry", DEPTHWISE, ids=lambda g: "x".join(map(str, g)))
def test_depthwise_matches_torch(rng, geometry):
    c, h, w_, k, s, p = geometry
    x = rng.standard_normal((1, c, h, w_)).astype(np.float32)
    w = rng.standard_normal((c, 1, k, k)).astype(np.float32)
    mod = _conv_module(x.shape, w, strides=s, padding=p, groups=c)
    with AVX512:
        assert _kernel_names(PackFloatConv()(mod)) == ["float_depthwise_nhwc"]
    got = _build_and_run(mod, "x86-avx512-vnni", x)
    want = _torch_conv(x, w, None, s, p, 1, groups=c)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_depthwise_pads_inside_the_kernel(rng):
    """The depthwise kernel skips the padding's taps itself: no pad op (a pass over the image
    as long as the conv) is left before it."""
    w = rng.standard_normal((32, 1, 3, 3)).astype(np.float32)
    mod = _conv_module((1, 32, 16, 16), w, strides=1, padding=1, groups=32)
    with AVX512:
        packed = PackFloatConv()(mod)
    ops = [b.value.op.name for b in packed["main"].body.blocks[0].bindings
           if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)]  # fmt: skip
    assert "relax.nn.pad" not in ops, ops


@needs_avx2
def test_matches_torch_avx2(rng):
    """AVX2: 8 lanes and 16 registers give another tile; the numbers stay the same."""
    x = rng.standard_normal((1, 16, 15, 15)).astype(np.float32)
    w = rng.standard_normal((24, 16, 3, 3)).astype(np.float32)
    mod = _conv_module(x.shape, w, strides=1, padding=1)
    got = _build_and_run(mod, "x86-avx2", x)
    want = _torch_conv(x, w, None, 1, 1, 1)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_tiles_fit_the_registers():
    for ow in (1, 3, 7, 13, 14, 28, 56, 112, 150):
        for o, lanes, regs in ((64, 16, 32), (24, 16, 32), (512, 16, 32), (40, 8, 16), (64, 4, 32)):
            t = choose_conv_tiles(ow, o, lanes, regs)
            assert t.mr * t.nr <= regs - 4
            tight = choose_conv_tiles(ow, o, lanes, regs, epilogue=True)
            assert tight.mr * tight.nr + tight.nr + 1 <= regs  # accumulators, weights, broadcast
            assert t.ow_padded % t.mr == 0 and t.ow_padded >= ow
            assert t.o_padded % (t.nr * lanes) == 0 and 0 <= t.o_padded - o < lanes
            assert t.mr >= min(4, ow)  # never a one-pixel tile on a wide output


def test_pack_conv_weight_layout(rng):
    w = rng.standard_normal((20, 3, 2, 5)).astype(np.float32)
    packed = pack_conv_weight(w, 8, 24)
    assert packed.shape == (3, 2, 5, 3, 8)
    j, ky, kx, c, i = 1, 1, 3, 2, 4
    assert packed[j, ky, kx, c, i] == w[j * 8 + i, c, ky, kx]
    assert not packed[2, :, :, :, 4:].any()  # channels 20..23 are padding


def _permutes(func: relax.Function) -> list[relax.Call]:
    found = []
    permute = tvm.ir.Op.get("relax.permute_dims")
    relax.analysis.post_order_visit(
        func,
        lambda e: found.append(e) if isinstance(e, relax.Call) and e.op.same_as(permute) else None,
    )
    return found


def test_channels_last_between_convs():
    """A ResNet basic block transposes only the model's input and output."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(16, 16, 3, padding=1)
            self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1)
            self.pool = torch.nn.MaxPool2d(2)

        def forward(self, x):
            y = self.c2(torch.relu(self.c1(x))) + x
            return self.pool(torch.relu(y)).mean((2, 3), keepdim=True)

    from tvmq.frontends import import_model

    mod = import_model(Block().eval(), example_inputs=(torch.zeros(1, 16, 8, 8),)).mod
    with AVX512:
        lowered = PackFloatConv()(mod)
    permutes = _permutes(lowered["main"])
    assert len(permutes) == 2
    assert _kernel_names(lowered).count("float_conv2d_nhwc") == 1  # one kernel, used twice


def test_concat_of_skip_connections_stays_channels_last(rng):
    """A UNet step (conv, 2x2/2 up-conv, concat with the skip, conv): the concat and the
    up-conv's pixel shuffle run on NHWC twins; only the input and output are transposed."""

    class Up(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.down = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.up = torch.nn.ConvTranspose2d(16, 8, 2, stride=2)
            self.out = torch.nn.Conv2d(16, 8, 3, padding=1)

        def forward(self, x):
            skip = torch.relu(x)
            y = torch.relu(self.up(torch.relu(self.down(skip))))
            return self.out(torch.cat([y, skip], dim=1))

    from tvmq.frontends import import_model
    from tvmq.passes import ConvTransposeAsMatmul

    model = Up().eval()
    x = rng.standard_normal((2, 8, 10, 12)).astype(np.float32)
    mod = ConvTransposeAsMatmul()(import_model(model, example_inputs=(torch.from_numpy(x),)).mod)
    with AVX512:
        lowered = PackFloatConv()(mod)
    to_nchw = [
        p for p in _permutes(lowered["main"]) if [int(a) for a in p.attrs.axes] == [0, 3, 1, 2]
    ]
    assert len(to_nchw) == 1  # the output's
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    vm = relax.VirtualMachine(build(mod, "host"), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))[0].numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_an_upsample_between_convs_stays_channels_last(rng, mode):
    """A detector's FPN step (conv, 2x upsample, concat with the finer map, conv): the
    resize runs on the NHWC twin; only the input and output are transposed."""

    class Fpn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.down = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.out = torch.nn.Conv2d(24, 8, 3, padding=1)

        def forward(self, x):
            fine = torch.relu(x)
            coarse = torch.relu(self.down(fine))
            up = torch.nn.functional.interpolate(coarse, scale_factor=2, mode=mode)
            return self.out(torch.cat([up, fine], dim=1))

    from tvmq.frontends import import_model

    model = Fpn().eval()
    x = rng.standard_normal((1, 8, 10, 12)).astype(np.float32)
    mod = import_model(model, example_inputs=(torch.from_numpy(x),)).mod
    with AVX512:
        lowered = PackFloatConv()(mod)
    axes = [[int(a) for a in p.attrs.axes] for p in _permutes(lowered["main"])]
    assert axes.count([0, 3, 1, 2]) == 1, axes  # the output's
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    vm = relax.VirtualMachine(build(mod, "host"), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))[0].numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_no_op_where_it_does_not_apply(rng):
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    grouped = rng.standard_normal((8, 2, 3, 3)).astype(np.float32)
    odd = rng.standard_normal((3, 1, 3, 3)).astype(np.float32)
    mod = _conv_module((1, 4, 8, 8), w)
    assert PackFloatConv(CUDA)(mod).same_as(mod)
    assert PackFloatConv()(mod).same_as(mod)  # no target at all
    for other in (  # groups 2; a depthwise conv over 3 channels (no 4-lane vector divides 3)
        _conv_module((1, 4, 8, 8), grouped, groups=2),
        _conv_module((1, 3, 8, 8), odd, groups=3),
    ):
        assert PackFloatConv(AVX512)(other).same_as(other)
    once = PackFloatConv(AVX512)(mod)
    assert PackFloatConv(AVX512)(once).same_as(once)  # idempotent


def test_neon_target_lowers():
    """aarch64: 4 lanes; the rewrite happens (built, not run, on this x86 host)."""
    w = np.ones((8, 4, 3, 3), np.float32)
    lowered = PackFloatConv(NEON)(_conv_module((1, 4, 8, 8), w, padding=1))
    packed = [c for c in lowered["main"].body.blocks[0].bindings if "call_tir" in str(c.value)]
    assert packed and _kernel_names(lowered) == ["float_conv2d_nhwc"]


def test_fold_batch_norm_matches_torch(rng):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=True), torch.nn.BatchNorm2d(8))
    bn = model[1]
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    model.eval()
    from tvmq.frontends import import_model

    x = rng.standard_normal((1, 3, 10, 10)).astype(np.float32)
    mod = import_model(model, example_inputs=(torch.from_numpy(x),)).mod
    folded = FoldBatchNorm()(mod)
    assert "batch_norm" not in folded.script() and "batch_norm" in mod.script()
    assert FoldBatchNorm()(folded).same_as(folded)
    vm = relax.VirtualMachine(build(folded, "host"), tvm.cpu())
    (got,) = vm["main"](tvm.runtime.tensor(x))
    want = model(torch.from_numpy(x)).detach().numpy()
    assert np.abs(got.numpy() - want).max() <= 1e-5 * np.abs(want).max()


def _kernel_globals(mod) -> list[str]:
    return sorted(
        gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
    )


@needs_vnni
@pytest.mark.parametrize("depthwise", [False, True], ids=["conv", "depthwise"])
def test_bias_and_relu6_fused_into_the_kernel(rng, depthwise):
    """conv -> + bias -> clip(0, 6) (a MobileNet block after FoldBatchNorm) is one kernel
    that adds the bias and clamps before storing; the numbers are PyTorch's."""
    c, o = (24, 24) if depthwise else (16, 40)
    groups = c if depthwise else 1
    x = rng.standard_normal((1, c, 13, 13)).astype(np.float32) * 3
    w = rng.standard_normal((o, c // groups, 3, 3)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(xv, relax.const(w), padding=1, groups=groups))
            y = bb.emit(relax.op.add(relax.const(b.reshape(1, -1, 1, 1)), y))  # bias first
            out = bb.emit_output(relax.op.clip(y, 0.0, 6.0))
        bb.emit_func_output(out)
    mod = bb.get()
    with AVX512:
        lowered = PackFloatConv()(mod)
    kind = "float_depthwise" if depthwise else "float_conv2d"
    assert _kernel_globals(lowered) == [f"tvmq_{kind}_nhwc_3x3_{c}x{o}_bias_act"]
    ops = {str(e.op.name) for e in _calls(lowered["main"]) if isinstance(e.op, tvm.ir.Op)}
    assert not ops & {"relax.add", "relax.clip"}  # computed in the kernel
    got = _build_and_run(mod, "x86-avx512-vnni", x)
    want = torch.nn.functional.conv2d(
        torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), padding=1, groups=groups
    ).clamp(0, 6)
    assert np.abs(got - want.numpy()).max() <= 1e-5 * np.abs(want.numpy()).max()


def _biased_conv_module(x, w, b, tail, groups=1, padding=1):
    """``main(x) = tail(bb, x, y, z)`` with ``y = conv2d(x, W, padding, groups)`` and
    ``z = y + b`` emitted before it (``tail`` returns the output expression; it may emit
    more)."""
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(xv, relax.const(w), padding=padding, groups=groups))
            z = bb.emit(relax.op.add(y, relax.const(b.reshape(1, -1, 1, 1))))
            out = bb.emit_output(tail(bb, xv, y, z))
        bb.emit_func_output(out)
    return bb.get()


def _silu_tail(swap):
    def silu(bb, xv, y, z):
        sig = bb.emit(relax.op.sigmoid(z))
        return relax.op.multiply(sig, z) if swap else relax.op.multiply(z, sig)

    return silu


def _hardswish_tail(bb, xv, y, z):  # as PyTorch decomposes it: (z * relu6(z + 3)) / 6
    t = bb.emit(relax.op.add(z, relax.const(3.0, "float32")))
    t = bb.emit(relax.op.clip(bb.emit(relax.op.clip(t, 0, float("inf"))), float("-inf"), 6))
    return relax.op.divide(bb.emit(relax.op.multiply(z, t)), relax.const(6.0, "float32"))


@needs_vnni
@pytest.mark.parametrize(
    "depthwise,activation,tail",
    [
        (False, "silu", _silu_tail(False)),
        (True, "silu", _silu_tail(True)),
        (False, "hardswish", _hardswish_tail),
        (True, "hardswish", _hardswish_tail),
    ],
    ids=["conv-silu", "depthwise-silu-mul-swapped", "conv-hardswish", "depthwise-hardswish"],
)
def test_bias_and_activation_fused_into_the_kernel(rng, depthwise, activation, tail):
    """conv -> + bias -> SiLU (s = sigmoid, multiply(sum, s), as PyTorch exports it; YOLO's
    and EfficientNet's blocks) or hardswish (MobileNetV3's) is one kernel: no activation op
    left, PyTorch's numbers, inputs large enough that some sums are below -87 (where the
    sigmoid is ~0)."""
    c, o = (24, 24) if depthwise else (16, 40)
    groups = c if depthwise else 1
    x = rng.standard_normal((1, c, 13, 13)).astype(np.float32) * 8
    w = rng.standard_normal((o, c // groups, 3, 3)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    mod = _biased_conv_module(x, w, b, tail, groups=groups)
    with AVX512:
        lowered = PackFloatConv()(mod)
    kind = "float_depthwise" if depthwise else "float_conv2d"
    assert _kernel_globals(lowered) == [f"tvmq_{kind}_nhwc_3x3_{c}x{o}_bias_{activation}"]
    ops = {str(e.op.name) for e in _calls(lowered["main"]) if isinstance(e.op, tvm.ir.Op)}
    assert not ops & {"relax.add", "relax.sigmoid", "relax.multiply", "relax.clip"}
    got = _build_and_run(mod, "x86-avx512-vnni", x)
    conv = torch.nn.functional.conv2d(
        torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), padding=1, groups=groups
    ).double()
    assert (conv < -87).any()
    torch_activation = getattr(torch.nn.functional, activation)
    want = torch_activation(conv).numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@needs_vnni
def test_a_sum_read_besides_its_silu_keeps_the_silu_outside(rng):
    """When the biased sum is also read elsewhere, the kernel stores the sum (bias only) and
    sigmoid / multiply stay ops."""
    x = rng.standard_normal((1, 16, 10, 10)).astype(np.float32)
    w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)

    def tail(bb, xv, y, z):
        silu = bb.emit(relax.op.multiply(z, bb.emit(relax.op.sigmoid(z))))
        return relax.op.add(silu, z)

    mod = _biased_conv_module(x, w, b, tail)
    with AVX512:
        lowered = PackFloatConv()(mod)
    assert _kernel_globals(lowered) == ["tvmq_float_conv2d_nhwc_3x3_16x32_bias"]
    ops = {str(e.op.name) for e in _calls(lowered["main"]) if isinstance(e.op, tvm.ir.Op)}
    assert {"relax.sigmoid", "relax.multiply"} <= ops
    got = _build_and_run(mod, "x86-avx512-vnni", x)
    conv = torch.nn.functional.conv2d(
        torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), padding=1
    )
    want = (torch.nn.functional.silu(conv) + conv).numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@needs_vnni
@pytest.mark.parametrize("c", [32, 24], ids=["fused", "padded-channels"])
def test_residual_add_and_relu_fused_into_the_kernel(rng, c):
    """conv -> + bias -> + x -> relu (a ResNet block's end) is one kernel that adds the skip
    tensor in its store, PyTorch's numbers; where the output needs padding to the register
    tile (24 channels stored as 32), the add and the relu stay ops."""
    x = rng.standard_normal((1, c, 14, 14)).astype(np.float32)
    w = rng.standard_normal((c, c, 3, 3)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    # the skip first: either order
    skip = lambda bb, xv, y, z: relax.op.nn.relu(bb.emit(relax.op.add(xv, z)))  # noqa: E731
    mod = _biased_conv_module(x, w, b, skip)
    with AVX512:
        lowered = PackFloatConv(winograd=False)(mod)  # the direct kernel's store
    fused = c == 32
    suffix = "_bias_residual_act" if fused else "_bias"
    assert _kernel_globals(lowered) == [f"tvmq_float_conv2d_nhwc_3x3_{c}x{c}{suffix}"]
    ops = {str(e.op.name) for e in _calls(lowered["main"]) if isinstance(e.op, tvm.ir.Op)}
    assert bool(ops & {"relax.add", "relax.nn.relu"}) != fused
    got = _build_and_run(mod, "x86-avx512-vnni", x)
    conv = torch.nn.functional.conv2d(
        torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), padding=1
    )
    want = torch.relu(conv + torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def _kernel_input_shapes(mod) -> list[tuple[int, ...]]:
    """The shapes of the first argument of each ``call_tir`` in ``main``."""
    calls = [c for c in _calls(mod["main"]) if getattr(c.op, "name", "") == "relax.call_tir"]
    return [tuple(int(d) for d in c.args[1].fields[0].ty.shape) for c in calls]


def test_a_1x1_convs_pixels_take_one_row_where_that_tiles_better(rng):
    """A ResNet bottleneck's last 1x1 conv (bias, skip, ReLU) over 8 rows of 7 pixels: on
    AVX2 its 56 pixels are one row (2x4 tiles, none over 8 of each 7-pixel row), the skip
    reshaped alike, still added in the kernel; PyTorch's numbers on AVX2 hosts."""
    x = rng.standard_normal((1, 32, 8, 7)).astype(np.float32)
    w = rng.standard_normal((32, 32, 1, 1)).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    skip = lambda bb, xv, y, z: relax.op.nn.relu(bb.emit(relax.op.add(z, xv)))  # noqa: E731
    mod = _biased_conv_module(x, w, b, skip, padding=0)
    with AVX2:
        lowered = PackFloatConv()(mod)
    assert _kernel_globals(lowered) == ["tvmq_float_conv2d_nhwc_1x1_32x32_bias_residual_act"]
    assert _kernel_input_shapes(lowered) == [(1, 1, 56, 32)]
    with AVX512:  # 7x4 tiles fit a 7-pixel row there: the image as it is
        assert _kernel_input_shapes(PackFloatConv()(mod)) == [(1, 8, 7, 32)]
    if "avx2" not in FLAGS or "fma" not in FLAGS:
        return
    got = _build_and_run(mod, "x86-avx2", x)
    conv = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b))
    want = torch.relu(conv + torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@needs_vnni
def test_conv_read_twice_keeps_its_bias_add_outside(rng):
    """A conv result that something else reads too (here: the residual) is stored before
    the bias: the kernel has no epilogue, the add stays an op, the numbers are unchanged."""
    x = rng.standard_normal((1, 8, 9, 9)).astype(np.float32)
    w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    mod = _biased_conv_module(x, w, b, lambda bb, xv, y, z: relax.op.multiply(z, y))
    with AVX512:
        assert _kernel_globals(PackFloatConv()(mod)) == ["tvmq_float_conv2d_nhwc_3x3_8x8"]
    got = _build_and_run(mod, "x86-avx512-vnni", x)
    conv = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1)
    want = ((conv + torch.from_numpy(b).reshape(1, -1, 1, 1)) * conv).numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def _two_convs_module(x, w1, b1, w2, tail=None):
    """``main(x) = conv2d(relu(conv2d(x, W1, padding=1) + b1), W2, padding=1)`` (a UNet
    double conv); ``tail(bb, r, out)`` may add another reader of the relu ``r``."""

    def second(bb, xv, y, z):
        r = bb.emit(relax.op.nn.relu(z))
        out = relax.op.nn.conv2d(r, relax.const(w2), padding=1)
        return out if tail is None else tail(bb, r, bb.emit(out))

    return _biased_conv_module(x, w1, b1, second)


@needs_vnni
@pytest.mark.parametrize("width,padded", [(16, 18), (29, 58)], ids=["16-wide", "29-wide"])
def test_conv_writes_the_next_convs_padded_input(rng, width, padded):
    """conv -> bias -> relu -> 3x3 conv: the first kernel stores its result inside the
    zeros the second reads (``_bordered``), so only the model input is padded; PyTorch's
    numbers. 29 wide, the second conv's register tile (28 pixels) computes 56 columns and
    reads 58: the border holds the 27 extra ones on the right too."""
    x = rng.standard_normal((1, 16, 9, width)).astype(np.float32)
    w1 = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    b1 = rng.standard_normal(16).astype(np.float32)
    w2 = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    mod = _two_convs_module(x, w1, b1, w2)
    with AVX512:
        lowered = PackFloatConv()(mod)
    calls = _calls(lowered["main"])
    bordered = [
        c for c in calls if isinstance(c.op, tvm.ir.Op) and str(c.op.name) == "relax.call_tir"
        and c.args[0].name_hint == "tvmq_float_conv2d_nhwc_3x3_16x16_bias_act_bordered"
    ]  # fmt: skip
    assert [tuple(int(d) for d in c.ty.shape) for c in bordered] == [(1, 11, padded, 16)]
    ops = [str(e.op.name) for e in calls if isinstance(e.op, tvm.ir.Op)]
    assert ops.count("relax.nn.pad") == 1  # the model input's only
    got = _build_and_run(mod, "x86-avx512-vnni", x)
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    r = torch.relu(torch.nn.functional.conv2d(t(x), t(w1), t(b1), padding=1))
    want = torch.nn.functional.conv2d(r, t(w2), padding=1).numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_a_conv_output_read_twice_is_not_bordered(rng):
    """A result that something else reads too (a UNet skip connection) keeps its plain
    layout, and its reader conv pads it."""
    x = rng.standard_normal((1, 16, 8, 8)).astype(np.float32)
    w1 = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    mod = _two_convs_module(
        x, w1, rng.standard_normal(16).astype(np.float32), w1,
        tail=lambda bb, r, out: bb.emit(relax.op.add(out, r)),
    )  # fmt: skip
    with AVX512:
        lowered = PackFloatConv()(mod)
    assert not any(n.endswith("_bordered") for n in _kernel_globals(lowered))
    ops = [str(e.op.name) for e in _calls(lowered["main"]) if isinstance(e.op, tvm.ir.Op)]
    assert ops.count("relax.nn.pad") == 2


def _calls(func) -> list[relax.Call]:
    found = []
    relax.analysis.post_order_visit(
        func, lambda e: found.append(e) if isinstance(e, relax.Call) else None
    )
    return found


def test_channels_last_through_a_max_pool_between_convs():
    """torch.export's max_pool2d returns (values, indices); the target kernel passes see
    through the unused indices tuple, so the pool runs on the NHWC twin: only the model's
    input and output are transposed."""
    from tvmq.frontends import import_model
    from tvmq.lowering import target_kernel_passes

    class Down(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(8, 16, 3, padding=1)
            self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x):
            return self.c2(torch.nn.functional.max_pool2d(torch.relu(self.c1(x)), 2))

    model = Down().eval()
    x = np.random.default_rng(3).standard_normal((1, 8, 12, 10)).astype(np.float32)
    mod = import_model(model, example_inputs=(torch.from_numpy(x),)).mod
    assert "zeros_like" in mod["main"].script()  # the indices' stand-in, as exported
    with AVX512:
        lowered = tvm.transform.Sequential(target_kernel_passes(AVX512))(mod)
    assert len(_permutes(lowered["main"])) == 2
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    vm = relax.VirtualMachine(build(mod, "host"), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))[0].numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@needs_vnni
def test_an_onnx_conv_bias_reshaped_at_run_time_joins_the_kernel(rng):
    """The ONNX importer adds a conv's bias as ``add(conv, reshape(b, (1, O, 1, 1)))``: the
    target kernel passes fold the reshape of the constant, so the bias and the hardswish after
    it (ONNX's ``x * (clip(x + 3, 0, 6) / 6)``) are the conv's kernel; PyTorch's numbers."""
    from tvmq.lowering import target_kernel_passes

    x = rng.standard_normal((1, 16, 12, 10)).astype(np.float32) * 3
    w = rng.standard_normal((24, 16, 3, 3)).astype(np.float32) * 0.3
    b = rng.standard_normal(24).astype(np.float32)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(xv, relax.const(w), padding=1))
            y = bb.emit(relax.op.add(y, bb.emit(relax.op.reshape(relax.const(b), (1, 24, 1, 1)))))
            t = bb.emit(relax.op.clip(bb.emit(relax.op.add(y, relax.const(3.0))), 0, 6))
            y = bb.emit(relax.op.multiply(y, bb.emit(relax.op.divide(t, relax.const(6.0)))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = bb.get()
    with AVX512:
        lowered = tvm.transform.Sequential(target_kernel_passes(AVX512))(mod)
    names = _kernel_globals(lowered)
    assert "tvmq_float_conv2d_nhwc_3x3_16x24_bias_hardswish_divide_first" in names, names
    got = _build_and_run(mod, "x86-avx512-vnni", x)
    conv = torch.nn.functional.conv2d(
        torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), padding=1
    )
    want = torch.nn.functional.hardswish(conv).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@needs_vnni
def test_few_output_channels_take_a_narrow_vector(rng):
    """A 1x1 conv to 2 channels (a segmentation head) is computed 4 lanes wide, not padded
    to 16: the kernel's output has 4 channels; PyTorch's numbers."""
    x = rng.standard_normal((1, 32, 10, 10)).astype(np.float32)
    w = rng.standard_normal((2, 32, 1, 1)).astype(np.float32)
    mod = _conv_module(x.shape, w)
    with AVX512:
        lowered = PackFloatConv()(mod)
    (call,) = [e for e in _calls(lowered["main"]) if e.op.same_as(tvm.ir.Op.get("relax.call_tir"))]
    assert [int(d) for d in call.ty.shape][-1] == 4
    got = _build_and_run(mod, "x86-avx512-vnni", x)
    want = torch.relu(torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w)))
    assert np.abs(got - want.numpy()).max() <= 1e-5 * np.abs(want.numpy()).max()


def test_streamed_kernel_only_where_streaming_pays(rng):
    """A deep layer over a small image (4.7 MB of weights over 7x7) takes the streamed kernel
    on an Intel AVX-512 target, the register-blocked one on AMD Zen 4 (half-width FMAs), on
    AVX2 CPUs and on aarch64."""
    w = rng.standard_normal((512, 256, 3, 3)).astype(np.float32)
    mod = _conv_module((1, 256, 7, 7), w, padding=1)
    direct = {"winograd": False}  # (3x3 stride-1 convs take the Winograd kernels by default)
    assert _kernel_names(PackFloatConv(AVX512, **direct)(mod)) == ["float_conv2d_nhwc_streamed"]
    for name in ("znver4", "znver1", "haswell"):
        cpu = tvm.target.Target({"kind": "llvm", "mcpu": name})
        assert _kernel_names(PackFloatConv(cpu, **direct)(mod)) == ["float_conv2d_nhwc"], name
    arm = get_target("rasp4b").tvm_target()
    assert _kernel_names(PackFloatConv(arm, **direct)(mod)) == ["float_conv2d_nhwc"]


@needs_vnni
def test_zen4_tiles_keep_at_most_14_accumulators(rng):
    """On AMD Zen 4 (half-width 512-bit FMAs) tiles of 16+ accumulators ran slower: the
    target's tiles stay within 14, and the lowered conv still matches PyTorch."""
    zen4 = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
    with zen4:
        for ow in (7, 10, 14, 28, 56, 112, 224):
            for o in (32, 64, 256, 2048):
                t = choose_conv_tiles(ow, o, 16, 32, epilogue=True)
                assert t.mr * t.nr <= 14 and t.ow_padded % t.mr == 0
        assert choose_conv_tiles(14, 256, 16, 32) == ConvTiles(7, 2, 16, 14, 256)
    elsewhere = choose_conv_tiles(14, 256, 16, 32)
    assert elsewhere.mr * elsewhere.nr == 28  # elsewhere: the 28-accumulator tile
    x = rng.standard_normal((2, 32, 14, 14)).astype(np.float32)
    w = rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    mod = _conv_module(x.shape, w, b, padding=1)
    lowered = PackFloatConv(zen4, winograd=False)(mod)
    assert _kernel_names(lowered) == ["float_conv2d_nhwc"]
    got = _build_and_run(lowered, "x86-avx512-vnni", x)  # built for the preset this host runs
    want = _torch_conv(x, w, b, 1, 1, 1)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def _basic_block_module(x_shape, w1, b1, w2, b2):
    """``relu(conv(relu(conv(x, W1) + b1), W2) + b2 + x)``: a ResNet basic block, batch
    norms folded."""
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = xv
            for w, b in ((w1, b1), (w2, b2)):
                y = bb.emit(relax.op.nn.conv2d(y, relax.const(w), padding=1))
                y = bb.emit(relax.op.add(y, relax.const(b.reshape(1, -1, 1, 1))))
                if w is w2:
                    y = bb.emit(relax.op.add(y, xv))
                y = bb.emit(relax.op.nn.relu(y))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("winograd", [True, False], ids=["winograd", "direct"])
def test_3x3_convs_take_the_winograd_kernels(rng, winograd):
    """A basic block of 32 channels over an odd 9x11 image, two images: each 3x3 conv becomes
    the Winograd input transform, 16 batched matmuls and an output transform that adds the
    bias (and the skip) and applies the relu, whatever the output's width; with
    ``winograd=False``, the direct kernel. PyTorch's numbers either way, channels last
    between the convs."""
    x, mod, reference = _random_basic_block(rng, (2, 32, 9, 11), 0.2)
    target = get_target("host").tvm_target()
    lowered = PackFloatConv(target, winograd=winograd)(mod)
    names = _kernel_globals(lowered)
    if winograd:
        assert names == [
            "tvmq_winograd_input_32",
            "tvmq_winograd_matmul_3x3_32x32",
            "tvmq_winograd_output_3x3_32x32_bias_act",
            "tvmq_winograd_output_3x3_32x32_bias_residual_act",
        ]
    else:
        assert names and not any("winograd" in n for n in names)
    ops = {str(e.op.name) for e in _calls(lowered["main"]) if isinstance(e.op, tvm.ir.Op)}
    # (the direct kernel's output is 12 columns wide: the skip add stays an op there)
    fused = {"relax.add", "relax.nn.relu"} if winograd else set()
    assert not ops & {"relax.nn.conv2d", *fused}
    assert len(_permutes(lowered["main"])) == 2  # the input's and the output's
    vm = relax.VirtualMachine(tvm.compile(lowered, target=target), tvm.cpu())
    got, want = vm["main"](tvm.runtime.tensor(x)).numpy(), reference()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def _random_basic_block(rng, shape, scale: float):
    """``(x, module, reference)``: :func:`_basic_block_module` of random weights (times
    `scale`) and biases for a random NCHW ``x`` of `shape`; ``reference()`` PyTorch's."""
    c = shape[1]
    x = rng.standard_normal(shape).astype(np.float32)
    w1, w2 = (rng.standard_normal((c, c, 3, 3)).astype(np.float32) * scale for _ in range(2))
    b1, b2 = (rng.standard_normal(c).astype(np.float32) for _ in range(2))

    def reference() -> np.ndarray:
        conv, t = torch.nn.functional.conv2d, torch.from_numpy
        h = torch.relu(conv(t(x), t(w1), t(b1), padding=1))
        return torch.relu(conv(h, t(w2), t(b2), padding=1) + t(x)).numpy()

    return x, _basic_block_module(x.shape, w1, b1, w2, b2), reference


def test_large_3x3_convs_take_the_fused_winograd_kernel(rng):
    """A basic block of 64 channels over 56x56 (ResNet's first stage: the three kernels'
    transformed image and sums 6.4 MB a conv): each 3x3 conv is one kernel that transforms,
    multiplies and transforms back a band of tiles at a time, bias, skip and relu in its
    store. PyTorch's numbers."""
    x, mod, reference = _random_basic_block(rng, (1, 64, 56, 56), 0.1)
    target = get_target("host").tvm_target()
    lowered = PackFloatConv(target)(mod)
    assert _kernel_globals(lowered) == [
        "tvmq_winograd_fused_3x3_64x64_bias_act",
        "tvmq_winograd_fused_3x3_64x64_bias_residual_act",
    ]
    vm = relax.VirtualMachine(tvm.compile(lowered, target=target), tvm.cpu())
    got, want = vm["main"](tvm.runtime.tensor(x)).numpy(), reference()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_integer_sums_stay_on_the_direct_kernel(rng):
    """A conv whose float32 sum is converted to int32 (Int8AsFloat's: sums of bytes, exact
    in float32) never takes the Winograd kernels, whose transformed sums are not exact."""
    from tvmq.passes.pack_float_conv import find_integer_sums

    w = rng.integers(-127, 128, (32, 32, 3, 3)).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 32, 8, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=1))
            out = bb.emit_output(relax.op.astype(y, "int32"))
        bb.emit_func_output(out)
    mod = bb.get()
    assert [v.same_as(y) for v in find_integer_sums(mod)] == [True]
    assert _kernel_names(PackFloatConv(AVX2)(mod)) == ["float_conv2d_nhwc"]


def _expand_depthwise_module(x, w1, b1, lo, w2, b2, stride):
    """``main(x) = relu6(depthwise3x3(clip(conv1x1(x, W1) + b1, lo, 6), W2, stride) + b2)``
    (a MobileNet block's expand and depthwise convs)."""
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(xv, relax.const(w1)))
            y = bb.emit(relax.op.add(y, relax.const(b1.reshape(1, -1, 1, 1))))
            y = bb.emit(relax.op.clip(y, lo, 6.0))
            z = bb.emit(
                relax.op.nn.conv2d(
                    y, relax.const(w2), strides=stride, padding=1, groups=w2.shape[0]
                )
            )
            z = bb.emit(relax.op.add(z, relax.const(b2.reshape(1, -1, 1, 1))))
            out = bb.emit_output(relax.op.clip(z, 0.0, 6.0))
        bb.emit_func_output(out)
    return bb.get()


@needs_vnni
@pytest.mark.parametrize(
    ("channels", "stride", "lo", "depthwise"),
    [
        (72, 1, 0.0, "3x3_80x72"),  # 16-lane vectors over the expand conv's 80 channels
        (72, 2, 0.0, "3x3_80x72"),
        (88, 2, -1.0, "3x3_96x88"),
        (72, 1, 0.5, "3x3_72x72"),  # the padded channels hold 0.5: 8-lane vectors over 72
        (64, 1, 0.0, "3x3_64x64"),  # no padding
    ],
)
def test_a_depthwise_conv_reads_its_producers_padded_channels(rng, channels, stride, lo, depthwise):
    """A 1x1 conv whose channels its kernel pads to whole vectors (72 -> 80 on AVX-512)
    feeds a depthwise conv: that kernel reads the padded result, zeros included, and
    computes them along on 16-lane vectors, with no copy of the result without its
    padding in between (MobileNetV3-small fp32 1.801 -> 1.761 ms, the same bits) -- where
    the padded channels are zeros (bounds around 0). PyTorch's numbers either way."""
    x = rng.standard_normal((1, 16, 10, 12)).astype(np.float32)
    w1 = rng.standard_normal((channels, 16, 1, 1)).astype(np.float32) / 4
    b1 = rng.standard_normal(channels).astype(np.float32)
    w2 = rng.standard_normal((channels, 1, 3, 3)).astype(np.float32)
    b2 = rng.standard_normal(channels).astype(np.float32)
    mod = _expand_depthwise_module(x, w1, b1, lo, w2, b2, stride)
    with AVX512:
        lowered = PackFloatConv()(mod)
    names = _kernel_globals(lowered)
    assert any(f"float_depthwise_nhwc_{depthwise}_" in n for n in names), names
    slices = [
        c for c in _calls(lowered["main"])
        if isinstance(c.op, tvm.ir.Op) and str(c.op.name) == "relax.strided_slice"
    ]  # fmt: skip
    assert len(slices) == (channels % 16 != 0)  # one, after the depthwise conv, or none
    got = _build_and_run(mod, "x86-avx512-vnni", x)
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    y = torch.clamp(torch.nn.functional.conv2d(t(x), t(w1), t(b1)), lo, 6.0)
    z = torch.nn.functional.conv2d(y, t(w2), t(b2), stride=stride, padding=1, groups=channels)
    want = torch.clamp(z, 0.0, 6.0).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert len(np.unique(got)) > 100  # not clamped flat
