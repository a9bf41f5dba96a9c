"""FastRowQuantize: QuantizeDynamic's per-row quantize as row_quantize_u8, the same bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from tvmq.frontends.pytorch import from_pytorch
from tvmq.passes import FastRowQuantize
from tvmq.passes.quantize_dynamic import QuantizeDynamic
from tvmq.passes.relax_utils import op_name, ordered_bindings

FMA = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})  # x86 with FMA
HOST = tvm.target.Target({"kind": "llvm"})


def _ops(mod) -> list[str]:
    return [op_name(b.value) for b in ordered_bindings(mod["main"])]


def _kernels(mod) -> list[str]:
    return [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]


@pytest.mark.parametrize("shape", [(16, 64), (2, 5, 64)])
def test_same_bytes_without_the_divide(shape):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 8)
    ).eval()
    mod = QuantizeDynamic()(from_pytorch(model, (torch.zeros(*shape),)).mod)
    fast = FastRowQuantize(FMA)(mod)
    assert "relax.divide" in _ops(mod) and "relax.divide" not in _ops(fast)
    assert any(k.startswith("row_quantize_u8") for k in _kernels(fast))
    run = [
        relax.VirtualMachine(tvm.compile(m, target=HOST), tvm.cpu())["main"] for m in (mod, fast)
    ]
    rng = np.random.default_rng(0)
    for scale in (1e-3, 1.0, 1e3):
        x = (rng.standard_normal(shape) * scale).astype("float32")
        a, b = (np.asarray(f(tvm.runtime.tensor(x))[0].numpy()) for f in run)
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "target", [{"kind": "llvm"}, {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}]
)
def test_a_target_without_x86_fma_is_left_alone(target):
    model = torch.nn.Linear(64, 8).eval()
    mod = QuantizeDynamic()(from_pytorch(model, (torch.zeros(4, 64),)).mod)
    assert FastRowQuantize(target)(mod).same_as(mod)
