"""ConvTransposeAsMatmul: a transposed conv with kernel = stride becomes a matmul + pixel shuffle."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

import tvmq
from tvmq.frontends.pytorch import from_pytorch
from tvmq.passes import ConvTransposeAsMatmul, prepare_passes
from tvmq.passes.sites import list_weight_sites
from tvmq.runtime import decoded_params


def _module(x_shape, w_shape, **attrs):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(w_shape).astype(np.float32)
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.conv2d_transpose(x, relax.const(w), **attrs))
        bb.emit_func_output(y)
    return bb.get(), w


def _run(mod, x):
    ex = relax.build(mod, target=tvm.target.Target({"kind": "llvm"}))
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def _torch_conv_transpose(x, w, stride, padding=0):
    return torch.nn.functional.conv_transpose2d(
        torch.from_numpy(x), torch.from_numpy(w), stride=stride, padding=padding
    ).numpy()


@pytest.mark.parametrize("kernel", [(2, 2), (3, 3), (2, 3)])
def test_kernel_equal_to_stride_becomes_a_matmul(kernel):
    mod, w = _module((2, 6, 5, 7), (6, 4, *kernel), strides=kernel)
    out = ConvTransposeAsMatmul()(mod)
    text = out["main"].script()
    assert "conv2d_transpose" not in text and text.count("R.matmul(") == 1
    x = np.random.default_rng(1).standard_normal((2, 6, 5, 7)).astype(np.float32)
    np.testing.assert_allclose(
        _run(out, x), _torch_conv_transpose(x, w, kernel), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "attrs",
    [
        {"strides": 2, "padding": 1},  # 4x4/2 with padding: overlapping windows
        {"strides": 1},  # stride 1: overlapping windows
    ],
)
def test_other_transposed_convs_stay(attrs):
    mod, _ = _module((1, 3, 5, 5), (3, 2, 4, 4), **attrs)
    assert ConvTransposeAsMatmul()(mod).same_as(mod)


class _UpNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.up = torch.nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.head = torch.nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.up(torch.relu(self.conv(x)))))


def _upnet():
    torch.manual_seed(0)
    return _UpNet().eval(), torch.randn(2, 3, 9, 11)


def test_the_layer_keeps_its_name_as_a_matmul_site():
    model, x = _upnet()
    prepared = prepare_passes()(from_pytorch(model, (x,)).mod)
    sites = list_weight_sites(prepared["main"])
    up = [s for s in sites if "up" in s.layer_names]
    assert len(up) == 1 and up[0].kind == "matmul"


def test_float_and_int8_builds_match_pytorch(tmp_path):
    model, x = _upnet()
    with torch.no_grad():
        ref = model(x).numpy()
    tvmq.compile(model, "host", example_inputs=(x,), output_dir=tmp_path / "f", progress=False)
    y = tvmq.load(tmp_path / "f")(x.numpy())
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    rng = np.random.default_rng(2)
    calib = [rng.standard_normal((2, 3, 9, 11)).astype(np.float32) for _ in range(8)]
    tvmq.compile(
        model, "host", example_inputs=(x,), output_dir=tmp_path / "q", progress=False,
        quantize="int8", calibration_data=calib,
    )  # fmt: skip
    notes = json.loads((tmp_path / "q" / "model.json").read_text())["notes"]
    assert notes["float_ops"] == [] or "conv2d_transpose" not in str(notes["float_ops"])
    yq = tvmq.load(tmp_path / "q")(x.numpy())
    sqnr = 10 * np.log10((ref**2).sum() / ((yq - ref) ** 2).sum())
    assert sqnr > 30, sqnr


def _biased_module(x_shape, w_shape, bias_shape, reuse=False):
    """conv2d_transpose (kernel = stride) + add(bias); ``reuse``: the conv's result is also
    returned, so the bias cannot move into its matmul."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(bias_shape).astype(np.float32)
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d_transpose(x, relax.const(w), strides=w_shape[2:]))
            out = bb.emit_output(relax.op.add(y, relax.const(b)))
            if reuse:
                out = bb.emit_output(relax.Tuple([out, y]))
        bb.emit_func_output(out)
    return bb.get(), w, b


@pytest.mark.parametrize("bias_shape", [(1, 4, 1, 1), (4, 1, 1)])
def test_a_channel_bias_is_added_to_the_matmul_columns(bias_shape):
    mod, w, b = _biased_module((2, 6, 5, 7), (6, 4, 2, 3), bias_shape)
    out = ConvTransposeAsMatmul()(mod)
    bindings = [bd.value for bd in out["main"].body.blocks[0].bindings]
    ops = [v.op.name for v in bindings if isinstance(v, relax.Call)]
    # the add reads the matmul (before the shuffle), its bias tiled over the 2x3 taps
    add = ops.index("relax.add")
    assert ops[add - 1] == "relax.matmul" and ops.count("relax.add") == 1
    assert [int(d) for d in bindings[add].args[1].ty.shape] == [2 * 3 * 4]
    x = np.random.default_rng(1).standard_normal((2, 6, 5, 7)).astype(np.float32)
    ref = _torch_conv_transpose(x, w, (2, 3)) + b.reshape(1, 4, 1, 1)
    np.testing.assert_allclose(_run(out, x), ref, rtol=1e-5, atol=1e-5)


def test_a_bias_stays_after_the_shuffle_when_the_conv_result_has_other_readers():
    mod, w, b = _biased_module((1, 6, 5, 7), (6, 4, 2, 2), (1, 4, 1, 1), reuse=True)
    out = ConvTransposeAsMatmul()(mod)
    ops = [bd.value.op.name for bd in out["main"].body.blocks[0].bindings
           if isinstance(bd.value, relax.Call)]  # fmt: skip
    assert ops.index("relax.add") > ops.index("relax.matmul") + 1
    x = np.random.default_rng(1).standard_normal((1, 6, 5, 7)).astype(np.float32)
    ex = relax.build(out, target=tvm.target.Target({"kind": "llvm"}))
    y, conv = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))
    ref = _torch_conv_transpose(x, w, (2, 2))
    np.testing.assert_allclose(conv.numpy(), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y.numpy(), ref + b, rtol=1e-5, atol=1e-5)


class _UpCat(torch.nn.Module):
    """UNet's decoder step: up-convolution (with bias), concat with the skip, conv."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.up = torch.nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.skip = torch.nn.Conv2d(3, 8, 3, stride=1, padding=1)
        self.head = torch.nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        low = torch.relu(self.conv(torch.nn.functional.max_pool2d(x, 2)))
        return self.head(torch.cat([torch.relu(self.skip(x)), self.up(low)], 1))


def test_int8_up_convolution_requantizes_before_its_shuffle():
    torch.manual_seed(0)
    model, x = _UpCat().eval(), torch.randn(1, 3, 12, 10)
    with torch.no_grad():
        ref = model(x).numpy()
    rng = np.random.default_rng(2)
    calib = [rng.standard_normal((1, 3, 12, 10)).astype(np.float32) for _ in range(8)]
    with torch.no_grad():
        art = tvmq.compile(
            model, "host", example_inputs=(x,), progress=False, quantize="int8",
            calibration_data=calib,
        )  # fmt: skip
    # the pixel shuffle (the 6-D reshape) moves the matmul's integers, not float32
    tiles = [bd.value for bd in art.mod["main"].body.blocks[0].bindings
             if isinstance(bd.value, relax.Call) and bd.value.op.name == "relax.reshape"
             and bd.value.ty.ndim == 6]  # fmt: skip
    assert len(tiles) == 1 and str(tiles[0].ty.dtype) in ("int8", "uint8")
    vm = relax.VirtualMachine(art.executable, tvm.cpu())
    # weights stored as codes (int8 convs on x86 without VNNI) are decoded first
    yq = vm["main"](tvm.runtime.tensor(x.numpy()), *decoded_params(vm))[0].numpy()
    sqnr = 10 * np.log10((ref**2).sum() / ((yq - ref) ** 2).sum())
    assert sqnr > 30, sqnr
