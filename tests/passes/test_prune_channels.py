"""PruneChannels: tensors really shrink, and the result equals the masked model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from tvmq.demo import make_cnn, make_mlp
from tvmq.errors import TvmqError
from tvmq.frontends.pytorch import from_pytorch
from tvmq.passes.analysis import count_macs, count_params
from tvmq.passes.prune_channels import ATTR, PruneChannels


def _run(mod, x):
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))[0].numpy()


def _pruned(mod) -> dict:
    return {k: [int(i) for i in v["kept"]] for k, v in mod["main"].attrs[ATTR]["pruned"].items()}


def _skipped(mod) -> dict:
    return {str(k): str(v) for k, v in mod["main"].attrs[ATTR]["skipped"].items()}


def _mask(n: int, kept, block: int = 1) -> torch.Tensor:
    m = torch.zeros(n)
    m[list(kept)] = 1.0
    return m.repeat_interleave(block)


def test_mlp_shrinks_and_equals_masked_model():
    torch.manual_seed(0)
    model = make_mlp().eval()
    mod = from_pytorch(model, (torch.zeros(3, 784),)).mod
    after = PruneChannels(0.5)(mod)
    kept = _pruned(after)
    assert list(kept) == ["matmul_0"] and len(kept["matmul_0"]) == 64
    assert "result" in _skipped(after)["matmul_1"]
    # the 64 kept neurons are those of largest L1 norm
    norms = model[0].weight.detach().abs().sum(1).numpy()
    assert norms[kept["matmul_0"]].min() >= np.delete(norms, kept["matmul_0"]).max()
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked[2].weight.mul_(_mask(128, kept["matmul_0"])[None, :])
    x = np.random.default_rng(0).random((3, 784), dtype=np.float32)
    with torch.no_grad():
        ref = masked(torch.from_numpy(x)).numpy()
    assert np.abs(_run(after, x) - ref).max() < 1e-5
    assert (
        count_params(after) < count_params(mod)
        and count_params(after) == 784 * 64 + 64 + 64 * 10 + 10
    )
    assert count_macs(after) == count_macs(mod) // 2


def test_cnn_through_bias_batchnorm_pool_and_flatten():
    torch.manual_seed(0)
    model = make_cnn().eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    mod = from_pytorch(model, (torch.zeros(2, 784),)).mod
    after = PruneChannels(0.25, norm="l2")(mod)
    kept = _pruned(after)
    assert {k: len(v) for k, v in kept.items()} == {"conv2d_0": 12, "conv2d_1": 24}
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked[5].weight.mul_(_mask(16, kept["conv2d_0"])[None, :, None, None])
        masked[10].weight.mul_(_mask(32, kept["conv2d_1"], block=49)[None, :])
    x = np.random.default_rng(0).random((2, 784), dtype=np.float32)
    with torch.no_grad():
        ref = masked(torch.from_numpy(x)).numpy()
    assert np.abs(_run(after, x) - ref).max() < 1e-4
    assert count_params(after) < count_params(mod)
    assert count_macs(after) < 0.6 * count_macs(mod)
    assert "1176" in after.script(show_meta=False)  # flatten now 24*7*7 features


class _Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(16, 32)
        self.body = torch.nn.Linear(32, 32)
        self.mid = torch.nn.Linear(32, 24)
        self.out = torch.nn.Linear(24, 4)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = h + self.body(h)  # residual: neither inp nor body can be pruned alone
        return self.out(torch.sigmoid(self.mid(h)))


def test_residual_and_output_layers_are_left_alone():
    torch.manual_seed(0)
    model = _Residual().eval()
    mod = from_pytorch(model, (torch.zeros(2, 16),)).mod
    after = PruneChannels(0.5)(mod)
    assert list(_pruned(after)) == ["matmul_2"]
    skipped = _skipped(after)
    assert set(skipped) == {"matmul_0", "matmul_1", "matmul_3"}
    assert "activation" in skipped["matmul_1"]
    masked = copy.deepcopy(model)
    # sigmoid(0) != 0: masking the consumer's input columns is what removal means
    with torch.no_grad():
        masked.out.weight.mul_(_mask(24, _pruned(after)["matmul_2"])[None, :])
    x = np.random.default_rng(0).normal(size=(2, 16)).astype("float32")
    with torch.no_grad():
        ref = masked(torch.from_numpy(x)).numpy()
    assert np.abs(_run(after, x) - ref).max() < 1e-5


def test_nothing_to_prune_leaves_module_unchanged():
    torch.manual_seed(0)
    single = from_pytorch(torch.nn.Linear(8, 4).eval(), (torch.zeros(1, 8),)).mod
    tvm.ir.assert_structural_equal(PruneChannels(0.5)(single), single)
    mlp = from_pytorch(make_mlp().eval(), (torch.zeros(1, 784),)).mod
    tvm.ir.assert_structural_equal(PruneChannels(0.0)(mlp), mlp)


@pytest.mark.parametrize("kwargs", [{"ratio": 1.0}, {"ratio": -0.5}, {"ratio": 0.5, "norm": "l0"}])
def test_bad_arguments(kwargs):
    with pytest.raises(TvmqError):
        PruneChannels(**kwargs)
