"""PruneConfig / ClusterConfig validation and apply_compression end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from tvmq.compression import ClusterConfig, PruneConfig, apply_compression, compression_pipeline
from tvmq.demo import make_mlp
from tvmq.errors import TvmqError
from tvmq.frontends.pytorch import from_pytorch
from tvmq.passes.cluster_weights import cluster_tensor


def _run(mod, x):
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))[0].numpy()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "random"},
        {"sparsity": 1.0},
        {"scope": "tensor"},
        {"method": "n:m", "n": 3, "m": 2},
        {"method": "channels", "ratio": 1.5},
        {"norm": "linf"},
        {"min_size": -1},
    ],
)
def test_prune_config_validates(kwargs):
    with pytest.raises(TvmqError):
        PruneConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{"bits": 0}, {"bits": 9}, {"init": "uniform"}])
def test_cluster_config_validates(kwargs):
    with pytest.raises(TvmqError):
        ClusterConfig(**kwargs)


def test_configs_are_frozen_and_describe_themselves():
    cfg = PruneConfig("n:m", skip=["conv2d_0"])
    with pytest.raises(AttributeError):
        cfg.n = 1
    assert cfg.describe() == {"method": "n:m", "n": 2, "m": 4, "strict": True, "skip": ["conv2d_0"]}
    assert ClusterConfig(bits=3).describe()["bits"] == 3
    with pytest.raises(TvmqError):
        compression_pipeline("magnitude")


def test_channels_then_magnitude_then_cluster_matches_torch_reference():
    torch.manual_seed(0)
    model = make_mlp().eval()
    mod = from_pytorch(model, (torch.zeros(2, 784),)).mod
    out, report = apply_compression(
        mod,
        prune=[PruneConfig("magnitude", sparsity=0.5), PruneConfig("channels", ratio=0.5)],
        cluster=ClusterConfig(bits=4, init="linear"),
    )
    kept = [int(i) for i in report["channels"]["pruned"]["matmul_0"]["kept"]]
    assert report["sparsity"]["sites"]["matmul_0"]["shape"] == [784, 64]
    assert report["sparsity"]["sites"]["matmul_0"]["zeros"] == 784 * 64 // 2
    assert report["after"]["constant_bytes"] < report["before"]["constant_bytes"] / 10
    assert report["after"]["macs"] == report["before"]["macs"] // 2
    assert set(report["clustered"]) == {"matmul_0", "matmul_1"}
    # reference: the same steps done by hand in torch
    ref = torch.nn.Sequential(
        torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    ).eval()
    with torch.no_grad():
        w1 = model[0].weight[kept].clone()
        k = w1.numel() // 2
        order = torch.sort(w1.abs().flatten(), stable=True).indices
        w1.view(-1)[order[:k]] = 0.0
        w2 = model[2].weight[:, kept].clone()
        order = torch.sort(w2.abs().flatten(), stable=True).indices
        w2.view(-1)[order[: w2.numel() // 2]] = 0.0
        for layer, w, b in ((ref[0], w1, model[0].bias[kept]), (ref[2], w2, model[2].bias)):
            codebook, idx = cluster_tensor(w.numpy(), 4, "linear")
            layer.weight.copy_(torch.from_numpy(codebook[idx]))
            layer.bias.copy_(b)
    x = np.random.default_rng(0).random((2, 784), dtype=np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(out, x), expected, atol=1e-5)


def test_no_config_is_identity_and_n_m_errors_surface_as_tvmq_error():
    torch.manual_seed(0)
    mod = from_pytorch(make_mlp().eval(), (torch.zeros(1, 784),)).mod
    same, report = apply_compression(mod)
    tvm.ir.assert_structural_equal(same, mod)
    assert report["before"] == report["after"] and report["sparsity"] is None
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten()).eval()
    cmod = from_pytorch(conv, (torch.zeros(1, 1, 5, 5),)).mod
    with pytest.raises(TvmqError, match="not a multiple"):
        apply_compression(cmod, prune=PruneConfig("n:m", min_size=0))
    json.dumps(report)  # plain Python, no TVM objects
