"""CorrectBias: the output of each corrected layer moves by exactly its correction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from tvmq.errors import TvmqError
from tvmq.frontends.pytorch import from_pytorch
from tvmq.passes import CorrectBias, prepare_passes
from tvmq.passes.relax_utils import op_name, ordered_bindings
from tvmq.passes.sites import list_weight_sites

HOST = tvm.target.Target({"kind": "llvm"})


class Net(torch.nn.Module):
    """conv (bias) -> conv (no bias) -> linear (bias) -> linear (no bias)."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = torch.nn.Conv2d(4, 5, 1, bias=False)
        self.fc1 = torch.nn.Linear(5 * 6 * 6, 7)
        self.fc2 = torch.nn.Linear(7, 3, bias=False)

    def forward(self, x):
        y = self.c2(self.c1(x))
        return self.fc2(self.fc1(y.flatten(1)))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return prepare_passes()(from_pytorch(Net().eval(), (torch.zeros(2, 3, 6, 6),)).mod)


def _run(mod, x):
    ex = tvm.compile(mod, target=HOST)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))
    return out.numpy() if hasattr(out, "numpy") else out[0].numpy()


def _ops(mod):
    return [op_name(b.value) for b in ordered_bindings(mod["main"])]


def test_last_layer_correction_shifts_the_output_exactly(net):
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype("float32")
    c = np.random.default_rng(1).standard_normal(3).astype("float32")
    out = CorrectBias({"matmul_3": c})(net)
    np.testing.assert_allclose(_run(out, x), _run(net, x) + c, rtol=1e-5, atol=1e-5)
    assert _ops(out).count("relax.add") == _ops(net).count("relax.add") + 1  # fc2 had no bias


def test_existing_bias_constants_are_updated_in_place(net):
    sites = {s.name: s for s in list_weight_sites(net["main"])}
    rng = np.random.default_rng(2)
    corrections = {
        "conv2d_0": rng.standard_normal(4).astype("float32"),
        "matmul_2": rng.standard_normal(7).astype("float32"),
    }
    out = CorrectBias(corrections)(net)
    assert _ops(out) == _ops(net)  # both layers had a bias: no op added
    x = rng.standard_normal((2, 3, 6, 6)).astype("float32")
    diff = _run(out, x) - _run(net, x)
    # numpy reference: conv2d_0 s correction propagates linearly through conv2d_1, matmul_2 and matmul_3
    w2 = sites["conv2d_1"].weight[:, :, 0, 0]  # [5, 4]
    wfc1 = sites["matmul_2"].weight  # [180, 7]
    wfc2 = sites["matmul_3"].weight  # [7, 3]
    shift = (w2 @ corrections["conv2d_0"])[:, None, None] * np.ones((5, 6, 6))
    expect = (shift.reshape(-1) @ wfc1 + corrections["matmul_2"]) @ wfc2
    np.testing.assert_allclose(diff, np.broadcast_to(expect, diff.shape), rtol=1e-4, atol=1e-4)


def test_unknown_site_and_wrong_length_are_refused(net):
    with pytest.raises(TvmqError, match="no matmul / conv2d layer named matmul_9"):
        CorrectBias({"matmul_9": np.zeros(3)})(net)
    with pytest.raises(TvmqError, match="matmul_3 has 3 output channels, its correction 4"):
        CorrectBias({"matmul_3": np.zeros(4)})(net)


def test_no_corrections_is_the_identity(net):
    assert CorrectBias({})(net).same_as(net)
