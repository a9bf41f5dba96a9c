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
