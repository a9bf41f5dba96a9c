"""SafeSoftmax: PyTorch SDPA's softmax-with-0-for-masked-rows as one kernel, vs PyTorch."""

from __future__ import annotations

import numpy as np
import torch
import tvm
from tvm import relax

from tvmq.frontends.pytorch import from_pytorch
from tvmq.passes import SafeSoftmax
from tvmq.passes.relax_utils import op_name, ordered_bindings


class _Sdpa(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _ops(mod) -> list[str]:
    return [op_name(b.value) for b in ordered_bindings(mod["main"]) if op_name(b.value)]


def _inputs(keys: int):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
    k, v = torch.randn(1, 2, keys, 8, generator=g), torch.randn(1, 2, keys, 8, generator=g)
    mask = torch.rand(1, 1, 5, keys, generator=g) > 0.3
    mask[..., 2, :] = False  # a fully masked query row
    mask[..., 0, 0] = True
    return q, k, v, mask


def _check(keys: int, one_kernel: bool = True):
    q, k, v, mask = _inputs(keys)
    mod = from_pytorch(_Sdpa(), (q, k, v, mask)).mod
    before = _ops(mod)
    assert "relax.equal" in before
    out = SafeSoftmax(one_kernel)(mod)
    ops = _ops(out)
    assert "relax.equal" not in ops
    if one_kernel:
        assert "relax.nn.softmax" not in ops
        assert ops.count("relax.where") == before.count("relax.where") - 1  # the mask's stays
    else:  # TVM's softmax; the test reads its output (no int8 "any finite" pass)
        assert ops.count("relax.nn.softmax") == 1 and "relax.isnan" in ops
        assert "relax.logical_not" not in ops and "relax.max" not in ops
    ex = relax.build(out, target=tvm.target.Target({"kind": "llvm"}))
    args = [tvm.runtime.tensor(t.numpy()) for t in (q, k, v, mask)]
    y = relax.VirtualMachine(ex, tvm.cpu())["main"](*args)[0].numpy()
    with torch.no_grad():
        ref = torch.export.export(_Sdpa(), (q, k, v, mask)).module()(q, k, v, mask).numpy()
    assert np.all(y[:, :, 2] == 0) and np.all(ref[:, :, 2] == 0)  # the masked row: 0, not NaN
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_masked_rows_give_zero_like_pytorch():
    _check(keys=7)


def test_masked_rows_give_zero_like_pytorch_with_the_test_on_the_softmax():
    """The CUDA form (``one_kernel=False``), built here for llvm: the same values."""
    _check(keys=7, one_kernel=False)


def test_ragged_rows_padded_to_vectors():
    _check(keys=45)  # 45 keys: padded to 48 with -inf inside the kernel


def test_a_plain_softmax_is_left_alone():
    x = relax.Var("x", relax.TensorType((2, 9), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.softmax(x))
        bb.emit_func_output(y)
    mod = bb.get()
    assert SafeSoftmax()(mod).same_as(mod)
