"""PruneMagnitude: exact sparsity, deterministic ties, idempotence, numerics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from tvmq.errors import TvmqError
from tvmq.frontends.pytorch import from_pytorch
from tvmq.passes.analysis import sparsity_report
from tvmq.passes.prune_magnitude import PruneMagnitude, count_to_prune
from tvmq.passes.sites import module_weight_sites


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)
    ).eval()


def _import(model, shape=(4, 64)) -> tvm.IRModule:
    return from_pytorch(model, (torch.zeros(*shape),)).mod


def _run(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    return (out[0] if isinstance(out, tvm.ir.Array | tuple | list) else out).numpy()


def _linear_module(w: np.ndarray) -> tvm.IRModule:
    """main(x) = matmul(x, permute_dims(W)) for a constant W [out, in]."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, w.shape[1]), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            wt = bb.emit(relax.op.permute_dims(relax.const(w, "float32"), [1, 0]))
            y = bb.emit_output(relax.op.matmul(x, wt))
        bb.emit_func_output(y)
    return bb.get()


def test_before_expected():
    w = np.array([[0.5, -0.1, 0.3, -0.7], [0.2, 0.05, -0.9, 0.4]], dtype="float32")
    expected_w = np.array([[0.5, 0.0, 0.3, -0.7], [0.0, 0.0, -0.9, 0.4]], dtype="float32")
    after = PruneMagnitude(0.375, min_size=0)(_linear_module(w))
    tvm.ir.assert_structural_equal(after, _linear_module(expected_w))


def test_layer_sparsity_is_exact_and_keeps_the_largest():
    mod = _import(_mlp())
    before = {s.name: s.op_weight for s in module_weight_sites(mod)}
    after = PruneMagnitude(0.3, min_size=0)(mod)
    for s in module_weight_sites(after):
        w, orig = s.op_weight, before[s.name]
        zeros = w == 0
        assert zeros.sum() == count_to_prune(0.3, w.size)
        np.testing.assert_array_equal(w[~zeros], orig[~zeros])
        assert np.abs(orig[zeros]).max() <= np.abs(orig[~zeros]).min()
    rep = sparsity_report(after)
    assert rep["sites"]["matmul_0"]["zeros"] == count_to_prune(0.3, 64 * 32)


def test_global_scope_reaches_total_sparsity_with_one_threshold():
    mod = _import(_mlp())
    after = PruneMagnitude(0.6, scope="global", min_size=0)(mod)
    rep = sparsity_report(after)
    assert rep["zeros"] == count_to_prune(0.6, 64 * 32 + 32 * 16)
    orig = np.concatenate([s.op_weight.ravel() for s in module_weight_sites(mod)])
    new = np.concatenate([s.op_weight.ravel() for s in module_weight_sites(after)])
    assert np.abs(orig[new == 0]).max() <= np.abs(orig[new != 0]).min()


def test_ties_are_broken_deterministically():
    w = np.round(np.random.default_rng(0).normal(size=(16, 32)) * 2) / 2  # many equal |w|
    w = w.astype("float32")
    a = PruneMagnitude(0.5, min_size=0)(_linear_module(w))
    b = PruneMagnitude(0.5, min_size=0)(_linear_module(w))
    tvm.ir.assert_structural_equal(a, b)
    (site,) = module_weight_sites(a)
    assert (site.op_weight == 0).sum() == 256


def test_idempotent():
    mod = _import(_mlp())
    once = PruneMagnitude(0.5, min_size=0)(mod)
    twice = PruneMagnitude(0.5, min_size=0)(once)
    tvm.ir.assert_structural_equal(once, twice)


def test_nothing_to_match_leaves_module_unchanged():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.relu(x))
        bb.emit_func_output(y)
    mod = bb.get()
    tvm.ir.assert_structural_equal(PruneMagnitude(0.5)(mod), mod)
    big = _import(_mlp())
    tvm.ir.assert_structural_equal(PruneMagnitude(0.5, min_size=10**6)(big), big)
    tvm.ir.assert_structural_equal(
        PruneMagnitude(0.5, min_size=0, skip=["matmul_0", "matmul_1"])(big), big
    )


def test_biases_and_small_weights_are_left_alone():
    mod = _import(_mlp())
    after = PruneMagnitude(0.5, min_size=600)(mod)  # matmul_1 has 512 elements
    sites = sparsity_report(after)["sites"]
    assert sites["matmul_0"]["zeros"] == 1024 and sites["matmul_1"]["zeros"] == 0


def test_numerics_match_torch_with_same_masks():
    model = _mlp()
    mod = _import(model)
    after = PruneMagnitude(0.7, min_size=0)(mod)
    masked = _mlp()
    sites = module_weight_sites(after)
    with torch.no_grad():
        for layer, s in zip((masked[0], masked[2]), sites, strict=True):
            layer.weight.mul_(torch.from_numpy((s.op_weight.T != 0).astype("float32")))
    x = np.random.default_rng(0).normal(size=(4, 64)).astype("float32")
    with torch.no_grad():
        ref = masked(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(after, x), ref, atol=1e-5)
    assert np.abs(_run(after, x) - _run(mod, x)).max() > 1e-3


@pytest.mark.parametrize(
    "kwargs", [{"sparsity": 1.0}, {"sparsity": -0.1}, {"sparsity": 0.5, "scope": "row"}]
)
def test_bad_arguments(kwargs):
    with pytest.raises(TvmqError):
        PruneMagnitude(**kwargs)
