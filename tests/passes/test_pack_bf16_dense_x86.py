"""PackBf16DenseX86 and ``precision="bf16"``: float32 matmuls on bf16 AMX tiles, checked
against numpy on bf16-rounded operands (exact up to float32 sums) and against float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from tvmq.kernels.x86_amx_bf16 import bf16_bits, bf16_to_float
from tvmq.passes.pack_bf16_dense_x86 import PackBf16DenseX86, target_has_amx_bf16
from tvmq.passes.relax_utils import is_tensor_const

SAPPHIRERAPIDS = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids"})
CASCADELAKE = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"})


def _matmul_module(x_shape, w: np.ndarray) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, relax.const(w, "float32")))
        bb.emit_func_output(out)
    return bb.get()


def _kernel_names(mod) -> list[str]:
    return sorted(
        str(gv.name_hint) for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
    )


def test_bf16_rounding_matches_torch(rng):
    """Round to nearest even, as torch's float32 -> bfloat16 cast; NaN stays NaN."""
    x = rng.standard_normal(10_000).astype(np.float32) * 1e3
    x[:4] = [np.inf, -np.inf, 0.0, np.float32(1.00390625)]  # an exact tie: rounds to even
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bf16_bits(x), want)
    assert np.isnan(bf16_to_float(bf16_bits(np.array([np.nan], np.float32)))).all()


def test_only_amx_bf16_targets_and_large_static_matmuls(rng):
    w = rng.standard_normal((64, 48)).astype(np.float32)
    assert target_has_amx_bf16(SAPPHIRERAPIDS) and not target_has_amx_bf16(CASCADELAKE)
    big = _matmul_module((1, 512, 64), w)  # 1.6M multiply-adds (PackFloatDense: >= 1M)
    assert PackBf16DenseX86(CASCADELAKE)(big).same_as(big)
    small = _matmul_module((8, 64), w)  # under PackFloatDense's 1M multiply-adds
    assert PackBf16DenseX86(SAPPHIRERAPIDS)(small).same_as(small)
    packed = PackBf16DenseX86(SAPPHIRERAPIDS)(big)
    assert any(n.startswith("tvmq_bf16_dense_amx") for n in _kernel_names(packed))
    assert PackBf16DenseX86(SAPPHIRERAPIDS)(packed).same_as(packed)  # idempotent


@pytest.mark.amx
@pytest.mark.parametrize(("x_shape", "n"), [((2, 45, 200), 150), ((128, 384), 384)])
def test_bf16_dense_is_the_product_of_bf16_rounded_operands(rng, x_shape, n):
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = (rng.standard_normal((x_shape[-1], n)) / 10).astype(np.float32)
    mod = PackBf16DenseX86(SAPPHIRERAPIDS)(_matmul_module(x_shape, w))
    assert any(n.startswith("tvmq_bf16_dense_amx") for n in _kernel_names(mod))
    vm = relax.VirtualMachine(tvm.compile(mod, target=SAPPHIRERAPIDS), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    rounded = [bf16_to_float(bf16_bits(a)).astype(np.float64) for a in (x, w)]
    want = rounded[0] @ rounded[1]
    scale = np.abs(want).max()
    assert np.abs(got - want).max() / scale < 1e-5  # float32 sums of exact bf16 products
    assert np.abs(got - x @ w).max() / scale < 2e-2  # bf16's 8-bit significand


@pytest.mark.parametrize(("x_shape", "n"), [((1, 2048), 1000), ((3, 700), 1500)])
def test_a_few_rows_read_the_weight_as_bf16(rng, x_shape, n):
    """Under a tile of rows (a classifier's one row) the weight is stored as bf16 and decoded
    in the float32 kernel, the activations left unrounded: half the weight's bytes, and
    numpy's product with the bf16-rounded weight up to float32 sums. Built for the host (no
    tile instruction: it runs on any AVX-512 or AVX2 CPU)."""
    from tvmq.build import build

    x = rng.standard_normal(x_shape).astype(np.float32)
    w = (rng.standard_normal((x_shape[-1], n)) / 10).astype(np.float32)
    mod = PackBf16DenseX86(SAPPHIRERAPIDS)(_matmul_module(x_shape, w))
    assert any(k.startswith("tvmq_decoded_dense_bf16") for k in _kernel_names(mod))
    consts = []
    relax.analysis.post_order_visit(
        mod["main"],
        lambda e: consts.append(e.value.numpy()) if is_tensor_const(e) else None,
    )
    assert [c.dtype for c in consts] == [np.uint16] and consts[0].nbytes < w.nbytes * 0.6
    vm = relax.VirtualMachine(build(mod, "host", tuning_logs=None), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    want = x.astype(np.float64) @ bf16_to_float(bf16_bits(w)).astype(np.float64)
    scale = np.abs(want).max()
    assert got.shape == want.shape and np.abs(got - want).max() / scale < 1e-5
    assert np.abs(got - x @ w).max() / scale < 2e-2


@pytest.mark.amx
def test_compile_with_precision_bf16_runs_matmuls_on_tiles(rng, tmp_path):
    import tvmq

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(192, 512), torch.nn.GELU(), torch.nn.Linear(512, 128)
    ).eval()
    x = rng.standard_normal((64, 192)).astype(np.float32)
    tvmq.compile(
        model,
        "host",
        example_inputs=(torch.from_numpy(x),),
        precision="bf16",
        output_dir=tmp_path / "out",
        progress=False,
        tuning_logs=None,
    )
    compiled = tvmq.load(tmp_path / "out")
    got = compiled(x)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    cosine = (got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)
    assert cosine > 0.999 and np.abs(got - want).max() / np.abs(want).max() < 3e-2
    kernels = compiled.manifest.notes["kernels"]["prescheduled"]
    assert sum(k.startswith("tvmq_bf16_dense_amx") for k in kernels) == 2
    assert compiled.manifest.compression["precision"]["compute"].startswith("bfloat16")
