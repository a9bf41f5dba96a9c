"""Static int8's ``smooth`` (SmoothQuant) and ``dynamic`` (run-time per-row ranges) options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from tvm import relax

from tvmq.core import qmath
from tvmq.core.schemes import Int8Static
from tvmq.errors import TvmqError
from tvmq.frontends.pytorch import from_pytorch
from tvmq.passes.relax_utils import op_name
from tvmq.quantization.quantize import quantize

HOST = tvm.target.Target({"kind": "llvm"})
PLAIN = Int8Static(smooth=(), dynamic=())


class Block(torch.nn.Module):
    """A transformer's FFN shape: Linear -> LayerNorm -> Linear -> GELU -> Linear."""

    def __init__(self, d=64, h=256):
        super().__init__()
        self.inp = torch.nn.Linear(d, d)
        self.ln = torch.nn.LayerNorm(d)
        self.fc1 = torch.nn.Linear(d, h)
        self.fc2 = torch.nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(self.inp(x)))))


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    model = Block().eval()
    with torch.no_grad():
        model.ln.weight[3] = 30.0  # one outlier channel in the LayerNorm output
        model.ln.bias[3] = 5.0
        model.fc1.weight[:5] *= 8.0  # a few large GELU outputs
    rng = np.random.default_rng(1)
    calib = [rng.standard_normal((1, 32, 64)).astype("float32") for _ in range(16)]
    test = [rng.standard_normal((1, 32, 64)).astype("float32") for _ in range(6)]
    return model, from_pytorch(model, (torch.zeros(1, 32, 64),)), calib, test


def _median_sqnr(model, mod, inputs) -> float:
    vm = relax.VirtualMachine(tvm.compile(mod, target=HOST), tvm.cpu())
    out = []
    for x in inputs:
        y = vm["main"](tvm.runtime.tensor(x))
        y = y.numpy() if hasattr(y, "numpy") else y[0].numpy()
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        out.append(qmath.sqnr(ref, y))
    return float(np.median(out))


@pytest.fixture(scope="module")
def results(block):
    _, imported, calib, _ = block
    return {
        "plain": quantize(imported, calib, PLAIN, progress=False),
        "default": quantize(imported, calib, "int8", progress=False),
    }


def test_defaults():
    s = Int8Static()
    assert s.smooth == (("after:layer_norm", 0.5),)
    assert s.dynamic == ("after:gelu",)
    assert s.to_dict()["smooth"] == [["after:layer_norm", 0.5]]
    assert Int8Static(dynamic="after:gelu").dynamic == ("after:gelu",)
    assert Int8Static(smooth={"matmul_*": 1}).smooth == (("matmul_*", 1.0),)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"dynamic": ("before:gelu",)}, "unknown form"),
        ({"dynamic": ("after:gleu",)}, "not a Relax op"),
        ({"smooth": (("aftr:layer_norm", 0.5),)}, "unknown form"),
        ({"smooth": (("after:layer_norm", 1.5),)}, "alpha"),
        ({"smooth": ("after:layer_norm",)}, "pairs"),
        ({"dynamic": 3}, "site selectors"),
    ],
)
def test_selector_validation(kw, match):
    with pytest.raises(TvmqError, match=match):
        Int8Static(**kw)


def test_smooth_and_dynamic_raise_sqnr(block, results):
    """Measured: plain static ~25 dB, smoothing + dynamic FFN-out ~34 dB (median of 6)."""
    model, _, _, test = block
    plain = _median_sqnr(model, results["plain"].mod, test)
    smooth = _median_sqnr(
        model, quantize(block[1], block[2], Int8Static(dynamic=()), progress=False).mod, test
    )
    both = _median_sqnr(model, results["default"].mod, test)
    assert smooth > plain + 1.5
    assert both > plain + 6.0, (plain, smooth, both)
    assert not results["default"].report.float_ops


def test_dynamic_sites_are_dynamic(results):
    q = results["default"]
    layers = {r.name: r for r in q.report.layers}
    assert all(r.quantized for r in layers.values())
    # FFN-out (matmul_2 reads the GELU output): run-time ranges, no calibrated scale.
    assert layers["matmul_2"].activation_scale is None
    assert layers["matmul_2"].activation_dtype == "uint8"
    assert layers["matmul_1"].activation_scale is not None
    main = q.mod["main"]
    bindings = {b.var: b.value for blk in main.body.blocks for b in blk.bindings}

    def producer(expr):
        while isinstance(expr, relax.Var) and expr in bindings:
            expr = bindings[expr]
            if op_name(expr) == "relax.reshape":
                expr = expr.args[0]
                continue
            break
        return expr

    kernels = [
        v for v in bindings.values()
        if op_name(v) == "relax.call_tir" and v.args[0].name_hint.startswith("row_qparams_u8")
    ]  # fmt: skip
    assert len(kernels) == 1
    assert op_name(producer(kernels[0].args[1][0])) == "relax.nn.gelu"
    # No calibrated quantize of the GELU output anywhere.
    for v in bindings.values():
        if op_name(v) == "relax.quantize":
            assert op_name(producer(v.args[0])) != "relax.nn.gelu"
    assert "tvmq.float_ops" not in (main.attrs or {})


def test_no_layer_norm_no_change():
    """The defaults do nothing on a model without LayerNorm / GELU (bit-identical)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
    ).eval()
    imported = from_pytorch(model, (torch.zeros(4, 32),))
    calib = np.random.default_rng(0).standard_normal((16, 32)).astype("float32")
    a = quantize(imported, calib, "int8", progress=False, evaluate=False)
    b = quantize(imported, calib, PLAIN, progress=False, evaluate=False)
    assert tvm_ffi.structural_equal(a.mod, b.mod)
