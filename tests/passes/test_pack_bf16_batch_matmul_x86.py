"""PackBf16BatchMatmulX86: float32 matmuls of two activations (attention's) on bf16 AMX
tiles, checked against numpy on bf16-rounded operands and against float32."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from tvmq.kernels.x86_amx_bf16 import bf16_bits, bf16_to_float
from tvmq.passes import PackBf16BatchMatmulX86

SAPPHIRERAPIDS = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids"})
CASCADELAKE = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"})


def _module(a_shape, b_shape, transposed: bool) -> tvm.IRModule:
    """``matmul(a, b)``; ``transposed``: ``b`` is given as ``(..., N, K)`` and swapped."""
    bb = relax.BlockBuilder()
    if transposed:
        b_shape = (*b_shape[:-2], b_shape[-1], b_shape[-2])
    a = relax.Var("a", relax.TensorType(a_shape, "float32"))
    b = relax.Var("b", relax.TensorType(b_shape, "float32"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            rank = len(b_shape)
            if transposed:
                axes = [*range(rank - 2), rank - 1, rank - 2]
                b_in = bb.emit(relax.op.permute_dims(b, axes))
            else:
                b_in = b
            out = bb.emit_output(relax.op.matmul(a, b_in))
        bb.emit_func_output(out)
    return bb.get()


def _kernel_names(mod) -> list[str]:
    return sorted(
        str(gv.name_hint) for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
    )


def _rounded(x: np.ndarray) -> np.ndarray:
    return bf16_to_float(bf16_bits(x)).astype(np.float64)


def test_only_amx_bf16_targets_and_large_static_matmuls():
    big = _module((2, 3, 100, 64), (2, 3, 64, 90), transposed=True)
    assert PackBf16BatchMatmulX86(CASCADELAKE)(big).same_as(big)
    small = _module((1, 8, 64), (1, 64, 2048), transposed=False)  # under a tile of rows
    assert PackBf16BatchMatmulX86(SAPPHIRERAPIDS)(small).same_as(small)
    packed = PackBf16BatchMatmulX86(SAPPHIRERAPIDS)(big)
    names = _kernel_names(packed)
    assert any(n.startswith("tvmq_bf16_batch_matmul_amx_6x") for n in names)
    # K^T is read as K: the packing's permute_dims is the only one left
    assert str(packed["main"]).count("R.permute_dims") == 1
    assert PackBf16BatchMatmulX86(SAPPHIRERAPIDS)(packed).same_as(packed)  # idempotent


@pytest.mark.amx
@pytest.mark.parametrize(
    ("batch", "m", "k", "n", "transposed"),
    [
        ((1,), 197, 64, 197, True),  # DeiT-tiny's Q @ K^T, one batch
        ((2, 3), 197, 197, 64, False),  # its P @ V (ragged K), six batches
        ((3,), 45, 100, 150, True),
        ((4,), 33, 150, 60, False),
    ],
)
def test_is_the_product_of_bf16_rounded_operands(rng, batch, m, k, n, transposed):
    a = rng.standard_normal((*batch, m, k)).astype(np.float32)
    b = rng.standard_normal((*batch, k, n)).astype(np.float32)
    mod = PackBf16BatchMatmulX86(SAPPHIRERAPIDS)(_module(a.shape, b.shape, transposed=transposed))
    assert any(name.startswith("tvmq_bf16_batch_matmul_amx") for name in _kernel_names(mod))
    vm = relax.VirtualMachine(tvm.compile(mod, target=SAPPHIRERAPIDS), tvm.cpu())
    b_arg = np.ascontiguousarray(np.swapaxes(b, -1, -2)) if transposed else b
    got = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b_arg)).numpy()
    want = _rounded(a) @ _rounded(b)
    scale = np.abs(want).max()
    assert got.shape == want.shape
    assert np.abs(got - want).max() / scale < 1e-6  # float32 sums of exact bf16 products
    assert np.abs(got - a @ b).max() / scale < 1e-2  # bf16's 8-bit significand


def test_to_bf16_pairs_interleaves_two_rows_rounded(rng):
    """The B-tile rows of the run-time packing: ``C[p, i, r] == bf16(X[p, r, i])``, rounded
    like numpy's :func:`bf16_bits` (ties to even, NaN kept, infinities)."""
    from tvmq.kernels.x86_amx_bf16 import to_bf16_pairs

    x = (rng.standard_normal((37, 2, 16)) * 1e3).astype(np.float32)
    x[0, 0, :4] = [np.inf, -np.inf, np.nan, np.float32(1.00390625)]  # 1.0039...: a tie
    lib = tvm.compile(
        tvm.IRModule({"main": to_bf16_pairs(37).with_attr("global_symbol", "main")}), target="llvm"
    )
    out = tvm.runtime.tensor(np.zeros((37, 16, 2), np.uint16))
    lib["main"](tvm.runtime.tensor(x), out)
    np.testing.assert_array_equal(out.numpy(), bf16_bits(x.transpose(0, 2, 1)))


@pytest.mark.amx
def test_compile_with_precision_bf16_runs_sdpa_matmuls_on_tiles(rng, tmp_path):
    """Through ``tvmq.compile``: PyTorch's SDPA over 3 heads of 150 x 64 (its q / k scales
    folded into the projections, K^T read as K) runs Q @ K^T and P @ V on the batched AMX
    kernel, not on the float kernels the later passes would give them."""
    import torch

    import tvmq

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.out = torch.nn.Linear(192, 576), torch.nn.Linear(192, 192)

        def forward(self, x):
            q, k, v = self.qkv(x).reshape(1, 150, 3, 3, 64).permute(2, 0, 3, 1, 4)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return self.out(y.transpose(1, 2).reshape(1, 150, 192))

    torch.manual_seed(0)
    model = Attention().eval()
    x = rng.standard_normal((1, 150, 192)).astype(np.float32)
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
    assert sum(k.startswith("tvmq_bf16_batch_matmul_amx") for k in kernels) == 2
    assert not any("float_batch_matmul" in k for k in kernels)
