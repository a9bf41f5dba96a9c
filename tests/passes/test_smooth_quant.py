"""SmoothQuant: the float function is unchanged; the weight and activation move as specified."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from tvmq.core.selectors import check_site_selector
from tvmq.errors import TvmqError
from tvmq.frontends.pytorch import from_pytorch
from tvmq.passes import SmoothQuant, prepare_passes
from tvmq.passes.sites import list_weight_sites, select_sites
from tvmq.passes.smooth_quant import ATTR, smoothing_factors

HOST = tvm.target.Target({"kind": "llvm"})


class Block(torch.nn.Module):
    """Linear -> LayerNorm -> Linear -> GELU -> Linear, with an outlier LayerNorm channel."""

    def __init__(self, d=32, h=64):
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
        model.ln.weight[3] = 30.0
    mod = prepare_passes()(from_pytorch(model, (torch.zeros(2, 16, 32),)).mod)
    return model, mod


def _run(mod, x):
    out = relax.VirtualMachine(tvm.compile(mod, target=HOST), tvm.cpu())["main"](
        tvm.runtime.tensor(x)
    )
    return out.numpy() if hasattr(out, "numpy") else out[0].numpy()


def _random_absmax(mod, seed=0):
    rng = np.random.default_rng(seed)
    return {
        s.name: rng.uniform(0.01, 30.0, s.weight.shape[0]).astype("float32")
        for s in list_weight_sites(mod["main"])
    }


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_float_function_unchanged(block, alpha):
    _, mod = block
    smoothed = SmoothQuant(_random_absmax(mod), alpha)(mod)
    assert [str(n) for n in smoothed["main"].attrs[ATTR]] == ["matmul_0", "matmul_1", "matmul_2"]
    x = np.random.default_rng(1).standard_normal((2, 16, 32)).astype("float32")
    ref, got = _run(mod, x), _run(smoothed, x)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_weights_and_names(block):
    _, mod = block
    absmax = _random_absmax(mod)
    smoothed = SmoothQuant(absmax, (("after:layer_norm", 0.5),))(mod)
    before = {s.name: s for s in list_weight_sites(mod["main"])}
    after = {s.name: s for s in list_weight_sites(smoothed["main"])}
    assert list(after) == list(before)  # site names are stable
    assert [str(n) for n in smoothed["main"].attrs[ATTR]] == ["matmul_1"]
    s = smoothing_factors(absmax["matmul_1"], before["matmul_1"].weight, 0.5)
    np.testing.assert_allclose(
        after["matmul_1"].weight, before["matmul_1"].weight * s[:, None], rtol=1e-6
    )
    for name in ("matmul_0", "matmul_2"):
        np.testing.assert_array_equal(after[name].weight, before[name].weight)
    # max|x/s| = max|W s| = sqrt(max|x| max|W|) per channel at alpha 0.5
    wmax = np.abs(before["matmul_1"].weight).max(axis=1)
    np.testing.assert_allclose(absmax["matmul_1"] / s, wmax * s, rtol=1e-5)


def test_no_statistics_no_change(block):
    _, mod = block
    assert SmoothQuant({}, 0.5)(mod).same_as(mod)


def test_selectors(block):
    _, mod = block
    func = mod["main"]
    assert [s.name for s in select_sites(func, ("after:layer_norm",))] == ["matmul_1"]
    assert [s.name for s in select_sites(func, ("after:gelu",))] == ["matmul_2"]
    assert [s.name for s in select_sites(func, ("after:relax.nn.gelu",))] == ["matmul_2"]
    assert [s.name for s in select_sites(func, ("matmul_0", "after:gelu"))] == [
        "matmul_0",
        "matmul_2",
    ]
    assert len(select_sites(func, ("matmul",))) == 3
    for bad in ("before:gelu", "after:gleu", "after:", "", 3):
        with pytest.raises(TvmqError):
            check_site_selector(bad)
    with pytest.raises(TvmqError, match="alpha"):
        SmoothQuant({}, (("after:gelu", 1.5),))
