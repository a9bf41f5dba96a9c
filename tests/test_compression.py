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


def test_cluster_config_of_takes_a_number_of_values():
    assert ClusterConfig.of(16) == ClusterConfig(bits=4)
    assert ClusterConfig.of(256) == ClusterConfig(bits=8)
    cfg = ClusterConfig(bits=2, init="linear")
    assert ClusterConfig.of(cfg) is cfg and ClusterConfig.of(None) is None
    for bad in (12, 1, 512, True, 16.0, "16"):
        with pytest.raises(TvmqError, match="cluster"):
            ClusterConfig.of(bad)


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


def _sqnr(ref, out):
    return 20 * np.log10(np.linalg.norm(ref) / np.linalg.norm(ref - out))


def _mlp_file(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    m = m.eval()
    torch.export.save(torch.export.export(m, (torch.zeros(4, 256),)), tmp_path / "m.pt2")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((128, 256)).astype("float32"))
    return m


def _forward(m, x, weights):
    h = np.maximum(x @ weights[0].T + m[0].bias.detach().numpy(), 0)
    return h @ weights[1].T + m[2].bias.detach().numpy()


def test_clustered_library_is_small_and_decodes_at_load(tmp_path):
    import tvmq

    m = _mlp_file(tmp_path)
    tvmq.compile(
        tmp_path / "m.pt2", "host", output_dir=tmp_path / "c", cluster=16,
        progress=False, tuning_logs=None,
    )  # fmt: skip
    tvmq.compile(tmp_path / "m.pt2", "host", output_dir=tmp_path / "f", progress=False)
    model = tvmq.load(tmp_path / "c")
    assert len(model._params) == 2  # both weights decoded once, at load
    x = np.random.default_rng(3).standard_normal((4, 256)).astype("float32")
    shared = []
    for layer in (m[0], m[2]):
        codebook, idx = cluster_tensor(layer.weight.detach().numpy(), 4)
        shared.append(codebook[idx])
    np.testing.assert_allclose(model(x), _forward(m, x, shared), rtol=1e-5, atol=1e-5)
    size = (tmp_path / "c" / "model.so").stat().st_size
    assert size < (tmp_path / "f" / "model.so").stat().st_size - 3 * (256 * 128 + 128 * 10)


def test_cli_cluster_with_int8_uses_an_int8_codebook(tmp_path, capsys):
    from tvmq.cli import main
    from tvmq.passes.cluster_int8_weights import cluster_int8_tensor

    m = _mlp_file(tmp_path)
    common = [
        "compile",
        tmp_path / "m.pt2",
        "--quantize",
        "int8",
        "--calib",
        tmp_path / "calib.npz",
    ]
    assert main([str(a) for a in [*common, "-o", tmp_path / "q"]]) == 0
    assert main([str(a) for a in [*common, "--cluster", "16", "-o", tmp_path / "qc"]]) == 0
    manifest = json.loads((tmp_path / "qc" / "model.json").read_text())
    assert manifest["compression"]["cluster"]["codebook"] == "int8"
    assert set(manifest["notes"]["compression"]["clustered"]) == {"matmul_0", "matmul_1"}
    int8_size = (tmp_path / "q" / "model.so").stat().st_size
    # 4-bit codes instead of int8: about half the weight bytes go
    assert (tmp_path / "qc" / "model.so").stat().st_size < int8_size - 256 * 128 // 3
    # reference: per-channel int8 weights (scale max|w| / 127), clustered into 16 int8 levels
    shared, plain = [], []
    for layer in (m[0], m[2]):
        w = layer.weight.detach().numpy().astype(np.float64)
        scale = np.abs(w).max(axis=1, keepdims=True) / 127
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        # clustered in the layout the matmul reads ([in, out]): k-means++ seeds by position
        table, idx = cluster_int8_tensor(np.ascontiguousarray(q.T), 4)
        shared.append((table[idx].T * scale).astype(np.float32))
        plain.append(w.astype(np.float32))
    x = np.random.default_rng(3).standard_normal((4, 256)).astype("float32")
    np.savez(tmp_path / "x.npz", x=x)
    run = ["run", tmp_path / "qc", "-i", tmp_path / "x.npz", "-o", tmp_path / "y.npz"]
    assert main([str(a) for a in run]) == 0
    y = np.load(tmp_path / "y.npz")
    got = y[y.files[0]]
    ref, float_ref = _forward(m, x, shared), _forward(m, x, plain)
    # the activations' int8 rounding stays; the weights are the clustered int8 ones
    assert _sqnr(ref, got) > 30
    assert _sqnr(ref, got) > _sqnr(float_ref, got) + 3
