"""QuantizeDynamic: int8 weights, run-time uint8 activation ranges, int32 matmul; exact vs numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from tvmq.core import qmath
from tvmq.frontends.pytorch import from_pytorch
from tvmq.passes.analysis import FLOAT_OPS_ATTR
from tvmq.passes.quantize_dynamic import (
    ATTR,
    QuantizeDynamic,
    dynamic_matmul_reference,
    weight_qparams_int8,
)

HOST = tvm.target.Target({"kind": "llvm"})
# Measured on the seeded MLP below with random normal inputs: 41.4 dB (per-channel
# weights), 42.0 dB per tensor. 30 dB leaves a margin.
MIN_SQNR_DB = 30.0


def _run(mod, x):
    out = relax.VirtualMachine(tvm.compile(mod, target=HOST), tvm.cpu())["main"](
        tvm.runtime.tensor(x)
    )
    return out[0].numpy() if not hasattr(out, "numpy") else out.numpy()


def _calls(mod, op):
    return [
        b.value
        for block in mod["main"].body.blocks
        for b in block.bindings
        if isinstance(b.value, relax.Call) and getattr(b.value.op, "name", None) == op
    ]


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
    ).eval()
    return model, from_pytorch(model, (torch.zeros(4, 256),))


def _reference(model, x, per_channel=True, per_row=True):
    w1, b1 = model[0].weight.detach().numpy().T, model[0].bias.detach().numpy()
    w2, b2 = model[2].weight.detach().numpy().T, model[2].bias.detach().numpy()
    h = np.maximum(dynamic_matmul_reference(x, w1, per_channel, per_row) + b1, 0)
    return dynamic_matmul_reference(h, w2, per_channel, per_row) + b2


def _qparams_kernels(mod):
    return [
        c for c in _calls(mod, "relax.call_tir") if c.args[0].name_hint.startswith("row_qparams_u8")
    ]


def test_structure(mlp):
    _, imported = mlp
    mod = QuantizeDynamic()(imported.mod)
    matmuls = _calls(mod, "relax.matmul")
    assert len(matmuls) == 2
    for call in matmuls:
        assert str(call.args[0].ty.dtype) == "uint8"
        assert str(call.args[1].ty.dtype) == "int8" and isinstance(call.args[1], tvm.ir.Constant)
        assert str(call.ty.dtype) == "int32"
    # the activation range is computed in the graph, per call and per row, by one kernel
    # per activation: scale and zero point of each row ([M, 2])
    kernels = _qparams_kernels(mod)
    assert len(kernels) == 2
    assert all([int(d) for d in c.ty.shape] == [4, 2] for c in kernels)
    per_tensor = QuantizeDynamic(activation_per_row=False)(imported.mod)
    assert all(c.ty.ndim == 0 for c in _calls(per_tensor, "relax.min"))
    quantizes = _calls(per_tensor, "relax.quantize")
    assert len(quantizes) == 2 and all(isinstance(q.args[1], relax.Var) for q in quantizes)
    assert [str(n) for n in mod["main"].attrs[ATTR]] == ["matmul_0", "matmul_1"]
    assert FLOAT_OPS_ATTR not in mod["main"].attrs
    # LegalizeOps gives an integer kernel: uint8 x int8 in, int32 out
    legal = relax.transform.LegalizeOps()(mod)
    kernels = [
        f
        for gv, f in legal.functions.items()
        if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint.startswith("matmul")
    ]
    assert kernels
    for f in kernels:
        assert [str(p.dtype) for p in f.params] == ["uint8", "int8", "int32"]


@pytest.mark.parametrize("per_row", [True, False], ids=["act-per-row", "act-per-tensor"])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_exact_vs_numpy_and_sqnr(mlp, per_channel, per_row):
    model, imported = mlp
    mod = QuantizeDynamic(weight_per_channel=per_channel, activation_per_row=per_row)(imported.mod)
    rng = np.random.default_rng(0)
    for scale in (1.0, 30.0):  # no calibration: the ranges follow each input
        x = (scale * rng.standard_normal((4, 256))).astype("float32")
        got = _run(mod, x)
        expected = _reference(model, x, per_channel, per_row)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        ref = model(torch.from_numpy(x)).detach().numpy()
        assert qmath.sqnr(ref, got) > MIN_SQNR_DB


def test_three_d_input_and_positive_activations():
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 32, bias=False).eval()
    mod = QuantizeDynamic()(from_pytorch(lin, (torch.zeros(2, 5, 64),)).mod)
    x = np.random.default_rng(1).uniform(0.5, 3.0, (2, 5, 64)).astype("float32")  # min > 0
    w = lin.weight.detach().numpy().T
    got = _run(mod, x)
    np.testing.assert_allclose(got, dynamic_matmul_reference(x, w), rtol=1e-5, atol=1e-5)
    assert qmath.sqnr(x @ w, got) > MIN_SQNR_DB


def test_per_row_ranges_isolate_an_outlier_row():
    torch.manual_seed(2)
    lin = torch.nn.Linear(64, 32, bias=False).eval()
    imported = from_pytorch(lin, (torch.zeros(8, 64),))
    x = np.random.default_rng(2).standard_normal((8, 64)).astype("float32")
    x[3] *= 200.0  # one token with outlying values
    w = lin.weight.detach().numpy().T
    rows = [i for i in range(8) if i != 3]
    sqnr = {}
    for per_row in (True, False):
        mod = QuantizeDynamic(activation_per_row=per_row)(imported.mod)
        sqnr[per_row] = qmath.sqnr((x @ w)[rows], _run(mod, x)[rows])
    assert sqnr[True] > MIN_SQNR_DB and sqnr[True] > sqnr[False] + 20


def test_weight_qparams_are_symmetric_int8():
    w = np.random.default_rng(2).normal(size=(40, 6)).astype("float32")
    w[:, 3] = 0.0  # a pruned column
    w_q, s_w = weight_qparams_int8(w)
    assert w_q.dtype == np.int8 and np.abs(w_q).max() <= 127 and s_w.shape == (6,)
    assert s_w[3] == 1.0 and not w_q[:, 3].any()
    assert qmath.sqnr(w, qmath.dequantize(w_q, s_w, 0, axis=1)) > 40


def test_idempotent_skip_conv_and_nothing_to_match(mlp):
    _, imported = mlp
    once = QuantizeDynamic(skip=("matmul_0",))(imported.mod)
    assert [str(n) for n in once["main"].attrs[ATTR]] == ["matmul_1"]
    assert [str(c.ty.dtype) for c in _calls(once, "relax.matmul")] == ["float32", "int32"]
    assert len(once["main"].attrs[FLOAT_OPS_ATTR]) == 1
    assert QuantizeDynamic(skip=("matmul_0",))(once).same_as(once)
    # the remaining float op keeps its name (matmul_0) although matmul_1 changed
    twice = QuantizeDynamic()(once)
    assert [str(n) for n in twice["main"].attrs[ATTR]] == ["matmul_1", "matmul_0"]
    assert FLOAT_OPS_ATTR not in twice["main"].attrs  # nothing is float any more
    assert QuantizeDynamic()(twice).same_as(twice)

    conv = torch.nn.Conv2d(3, 4, 3).eval()
    cmod = from_pytorch(conv, (torch.zeros(1, 3, 6, 6),)).mod
    assert QuantizeDynamic()(cmod).same_as(cmod)  # conv2d stays float


def test_tvmq_build_runs_it(mlp):
    from tvmq.build import build

    model, imported = mlp
    mod = QuantizeDynamic()(imported.mod)
    x = np.random.default_rng(3).standard_normal((4, 256)).astype("float32")
    out = relax.VirtualMachine(build(mod, "host"), tvm.cpu())["main"](tvm.runtime.tensor(x))
    np.testing.assert_allclose(out[0].numpy(), _reference(model, x), rtol=1e-5, atol=1e-5)


def test_matmuls_of_one_activation_share_its_quantization():
    # Attention's query / key / value projections read the same hidden states.
    class QKV(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (torch.nn.Linear(64, 64) for _ in range(3))

        def forward(self, x):
            return self.q(x) + self.k(x) * self.v(x)

    torch.manual_seed(3)
    model = QKV().eval()
    mod = QuantizeDynamic()(from_pytorch(model, (torch.zeros(2, 8, 64),)).mod)
    assert len(_calls(mod, "relax.matmul")) == 3 and len(_qparams_kernels(mod)) == 1

    x = np.random.default_rng(3).standard_normal((2, 8, 64)).astype("float32")
    w = {n: getattr(model, n).weight.detach().numpy().T for n in "qkv"}
    b = {n: getattr(model, n).bias.detach().numpy() for n in "qkv"}
    y = {n: dynamic_matmul_reference(x, w[n]) + b[n] for n in "qkv"}
    expected = y["q"] + y["k"] * y["v"]
    np.testing.assert_allclose(_run(mod, x), expected, rtol=1e-5, atol=1e-5)
