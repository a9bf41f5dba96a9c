"""ClusterWeights: at most 2**bits values, exact decoding, smaller constants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from tvmq.errors import TvmqError
from tvmq.frontends.pytorch import from_pytorch
from tvmq.passes.analysis import constant_bytes
from tvmq.passes.cluster_weights import (
    ATTR,
    ClusterWeights,
    cluster_tensor,
    pack_indices,
    unpack_indices,
)
from tvmq.passes.prune_magnitude import PruneMagnitude
from tvmq.passes.sites import module_weight_sites


def _run(mod, x):
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))[0].numpy()


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(48, 33), torch.nn.ReLU(), torch.nn.Linear(33, 10)
    ).eval()


@pytest.mark.parametrize("init", ["kmeans++", "linear", "density"])
@pytest.mark.parametrize("bits", [2, 4, 5])
def test_cluster_tensor_uses_at_most_2_pow_bits_values(init, bits):
    w = np.random.default_rng(0).normal(size=(33, 48)).astype("float32")
    codebook, idx = cluster_tensor(w, bits, init)
    assert codebook.shape == (2**bits,) and codebook.dtype == np.float32
    assert idx.dtype == np.uint8 and idx.shape == w.shape and idx.max() < 2**bits
    clustered = codebook[idx]
    assert np.unique(clustered).size <= 2**bits
    # every weight went to its nearest centroid
    nearest = np.abs(w[..., None] - codebook).min(-1)
    np.testing.assert_allclose(np.abs(w - clustered), nearest, atol=1e-6)


def test_zeros_stay_exact_zeros():
    w = np.random.default_rng(0).normal(size=(16, 32)).astype("float32")
    w[np.abs(w) < 0.8] = 0.0
    codebook, idx = cluster_tensor(w, 3)
    np.testing.assert_array_equal(codebook[idx] == 0, w == 0)


@pytest.mark.parametrize(("bits", "size"), [(4, 7), (4, 8), (2, 1), (6, 9)])
def test_pack_roundtrip(bits, size):
    idx = np.random.default_rng(0).integers(0, 2**bits, size=size).astype(np.uint8)
    packed = pack_indices(idx, bits)
    assert packed.size == (size + 1) // 2 if bits <= 4 else size
    np.testing.assert_array_equal(unpack_indices(packed, bits, size), idx)


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_decoded_weights_equal_clustered_weights_exactly(bits):
    # x = identity: matmul(I, W^T) is W^T bit for bit, so the output is the decoded weight
    w = np.random.default_rng(1).normal(size=(7, 45)).astype("float32")  # odd size: 315
    model = torch.nn.Linear(45, 7, bias=False).eval()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(w))
    mod = from_pytorch(model, (torch.zeros(45, 45),)).mod
    after = ClusterWeights(bits=bits, min_size=0)(mod)
    codebook, idx = cluster_tensor(w, bits)
    decoded = _run(after, np.eye(45, dtype="float32")).T
    np.testing.assert_array_equal(decoded, codebook[idx])
    assert np.unique(decoded).size <= 2**bits


def test_compiled_model_equals_torch_with_clustered_weights_and_shrinks():
    model = _mlp()
    mod = from_pytorch(model, (torch.zeros(4, 48),)).mod
    after = ClusterWeights(bits=4, init="linear", min_size=0)(mod)
    ref = _mlp()
    with torch.no_grad():
        for layer in (ref[0], ref[2]):
            codebook, idx = cluster_tensor(layer.weight.numpy(), 4, "linear")
            layer.weight.copy_(torch.from_numpy(codebook[idx]))
    x = np.random.default_rng(2).normal(size=(4, 48)).astype("float32")
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(after, x), expected, atol=1e-5)
    assert module_weight_sites(after) == []  # weights are decoded, no longer constants
    weights = (48 * 33 + 33 * 10) * 4
    saved = weights - (2 * 16 * 4 + (48 * 33 + 1) // 2 + (33 * 10) // 2)
    assert constant_bytes(mod) - constant_bytes(after) >= saved - 8  # + two 1-byte shift consts
    record = after["main"].attrs[ATTR]
    assert int(record["matmul_0"]["distinct"]) <= 16


def test_pruned_zeros_survive_and_second_run_is_a_no_op():
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 33, bias=False).eval()
    pruned = PruneMagnitude(0.5, min_size=0)(from_pytorch(lin, (torch.zeros(48, 48),)).mod)
    once = ClusterWeights(bits=4, min_size=0)(pruned)
    tvm.ir.assert_structural_equal(ClusterWeights(bits=4, min_size=0)(once), once)
    w = module_weight_sites(pruned)[0].const.value.numpy()  # [out, in]
    decoded = _run(once, np.eye(48, dtype="float32")).T
    np.testing.assert_array_equal(decoded == 0, w == 0)
    assert np.unique(decoded).size <= 16


def test_nothing_to_match_and_bad_arguments():
    mod = from_pytorch(_mlp(), (torch.zeros(4, 48),)).mod
    tvm.ir.assert_structural_equal(ClusterWeights(min_size=10**6)(mod), mod)
    with pytest.raises(TvmqError):
        ClusterWeights(bits=0)
    with pytest.raises(TvmqError):
        ClusterWeights(bits=9)
    with pytest.raises(TvmqError):
        ClusterWeights(init="random")
