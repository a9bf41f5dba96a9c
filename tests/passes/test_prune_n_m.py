"""PruneNM: N:M along the reduction axis for Linear and conv2d weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from tvmq.errors import TvmqError
from tvmq.frontends.pytorch import from_pytorch
from tvmq.passes.prune_n_m import PruneNM, satisfies_n_m
from tvmq.passes.sites import module_weight_sites


class _Net(torch.nn.Module):
    def __init__(self, c_in: int = 4):
        super().__init__()
        self.conv = torch.nn.Conv2d(c_in, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 6 * 6, 12)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _model(c_in: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return _Net(c_in).eval()


def _import(model, c_in: int = 4) -> tvm.IRModule:
    return from_pytorch(model, (torch.zeros(2, c_in, 6, 6),)).mod


def _run(mod, x):
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))[0].numpy()


def _groups(site, m):
    """Torch-layout weight [out, reduction] split into groups of m along the reduction."""
    w = site.const.value.numpy()  # nn.Linear: [out, in]; conv: OIHW
    return w.reshape(w.shape[0], -1, m)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 6)])
def test_every_group_keeps_the_n_largest(n, m):
    mod = _import(_model())
    orig = {s.name: _groups(s, m) for s in module_weight_sites(mod)}
    after = PruneNM(n, m)(mod)
    assert satisfies_n_m(after, n, m) == {"conv2d_0": True, "matmul_1": True}
    for s in module_weight_sites(after):
        g, o = _groups(s, m), orig[s.name]
        assert np.all((g != 0).sum(-1) == n)  # random weights have no zeros of their own
        kept_min = np.where(g != 0, np.abs(o), np.inf).min(-1)
        pruned_max = np.where(g == 0, np.abs(o), -np.inf).max(-1)
        assert np.all(kept_min >= pruned_max)
        np.testing.assert_array_equal(g[g != 0], o[g != 0])


def test_groups_run_along_linear_inputs_not_outputs():
    w = np.arange(1, 33, dtype="float32").reshape(4, 8)  # [out, in]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            wt = bb.emit(relax.op.permute_dims(relax.const(w), [1, 0]))
            y = bb.emit_output(relax.op.matmul(x, wt))
        bb.emit_func_output(y)
    (site,) = module_weight_sites(PruneNM(2, 4)(bb.get()))
    expected = w * np.tile([0, 0, 1, 1], 8).reshape(4, 8)
    np.testing.assert_array_equal(site.const.value.numpy(), expected)


def test_indivisible_axis_raises_or_is_skipped():
    mod = _import(_model(c_in=1), c_in=1)  # conv reduction 1*3*3 = 9
    with pytest.raises(TvmqError, match="conv2d_0"):
        PruneNM(2, 4)(mod)
    after = PruneNM(2, 4, strict=False)(mod)
    assert satisfies_n_m(after, 2, 4) == {"matmul_1": True}
    conv = module_weight_sites(after)[0]
    assert np.count_nonzero(conv.const.value.numpy() == 0) == 0
    skipped = PruneNM(2, 4, skip=["conv2d_0"])(mod)
    tvm.ir.assert_structural_equal(skipped, after)


def test_idempotent_and_nothing_to_match():
    mod = _import(_model())
    once = PruneNM()(mod)
    tvm.ir.assert_structural_equal(PruneNM()(once), once)
    tvm.ir.assert_structural_equal(PruneNM(4, 4)(mod), mod)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.sigmoid(x))
        bb.emit_func_output(y)
    tvm.ir.assert_structural_equal(PruneNM()(bb.get()), bb.get())


def test_numerics_match_torch_with_same_masks():
    model = _model()
    after = PruneNM()(_import(model))
    masked = _model()
    conv, fc = module_weight_sites(after)
    with torch.no_grad():
        masked.conv.weight.copy_(torch.from_numpy(conv.const.value.numpy()))
        masked.fc.weight.copy_(torch.from_numpy(fc.const.value.numpy()))
    x = np.random.default_rng(1).normal(size=(2, 4, 6, 6)).astype("float32")
    with torch.no_grad():
        ref = masked(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(after, x), ref, atol=1e-5)
    # the masks are the ones N:M asked for, not some other zeros
    w = model.fc.weight.detach().numpy()
    keep = fc.const.value.numpy() != 0
    np.testing.assert_array_equal(fc.const.value.numpy()[keep], w[keep])


@pytest.mark.parametrize(("n", "m"), [(0, 4), (5, 4), (1, 0)])
def test_bad_arguments(n, m):
    with pytest.raises(TvmqError):
        PruneNM(n, m)
