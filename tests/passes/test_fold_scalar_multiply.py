"""FoldScalarMultiply: a scalar multiply after a matmul layer's heads split goes into W and b."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from tvmq.frontends.pytorch import from_pytorch
from tvmq.passes import FoldScalarMultiply, prepare_passes
from tvmq.passes.relax_utils import op_name, ordered_bindings


def _ops(func) -> list[str]:
    return [op_name(b.value) for b in ordered_bindings(func) if op_name(b.value)]


def _run(mod, *args):
    ex = relax.build(mod, target=tvm.target.Target({"kind": "llvm"}))
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in args])
    return [o.numpy() for o in out] if isinstance(out, tvm.ir.Array) else out.numpy()


class _Attention(torch.nn.Module):
    """SDPA self-attention: the frontend scales q and k^T by d ** -0.25 after the split."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.heads = heads

    def forward(self, x):
        b, s, d = x.shape

        def split(t):
            return t.reshape(b, s, self.heads, d // self.heads).transpose(1, 2)

        y = torch.nn.functional.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x))
        )
        return y.transpose(1, 2).reshape(b, s, d)


def test_sdpa_scales_go_into_the_q_and_k_projections():
    torch.manual_seed(0)
    model, x = _Attention().eval(), torch.randn(1, 7, 32)
    mod = from_pytorch(model, (x,)).mod
    before = _ops(mod["main"]).count("relax.multiply")
    out = FoldScalarMultiply()(mod)
    assert before >= 2 and _ops(out["main"]).count("relax.multiply") == before - 2
    # prepare_passes (the quantizer's form) folds them too
    assert _ops(prepare_passes()(mod)["main"]).count("relax.multiply") == before - 2
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(_run(out, x.numpy())[0], ref, rtol=1e-5, atol=1e-5)


def _module(shared_weight=False, second_reader=False, scalar=0.5):
    """y = (x @ W + b) reshaped, permuted, times `scalar`."""
    rng = np.random.default_rng(0)
    w = relax.const(rng.standard_normal((8, 6)).astype(np.float32))
    b = relax.const(rng.standard_normal(6).astype(np.float32))
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.add(relax.op.matmul(x, w), b))
            t = bb.emit(relax.op.permute_dims(bb.emit(relax.op.reshape(y, (4, 2, 3))), [1, 0, 2]))
            z = bb.emit(relax.op.multiply(t, relax.const(np.float32(scalar))))
            outs = [z]
            if shared_weight:
                outs.append(bb.emit(relax.op.matmul(x, w)))
            if second_reader:
                outs.append(t)
            out = bb.emit_output(relax.Tuple(outs) if len(outs) > 1 else z)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("scalar", [0.5, -3.0])
def test_matmul_bias_layout_chain_folds(scalar):
    mod = _module(scalar=scalar)
    out = FoldScalarMultiply()(mod)
    assert "relax.multiply" not in _ops(out["main"])
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), _run(mod, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["shared_weight", "second_reader"])
def test_a_value_or_weight_with_other_readers_keeps_its_multiply(case):
    mod = _module(**{case: True})
    out = FoldScalarMultiply()(mod)
    assert "relax.multiply" in _ops(out["main"])
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    for a, b in zip(_run(out, x), _run(mod, x), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
