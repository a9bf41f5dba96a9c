"""PackFloatBatchMatmul: float activation x activation matmuls on the packed kernel, vs numpy."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from tvmq.build import build
from tvmq.kernels import KERNEL_ATTR
from tvmq.passes import PackFloatBatchMatmul

AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
ARM = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})


def _module(a_shape, b_shape, *, transposed: bool) -> tvm.IRModule:
    """``main(a, b) = a @ b``; ``transposed``: ``b`` comes as ``(..., N, K)`` and is swapped
    (and flattened to 3-D, as torch's SDPA decomposition does) before the matmul."""
    a = relax.Var("a", relax.TensorType(a_shape, "float32"))
    b = relax.Var("b", relax.TensorType(b_shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [a, b]):
        with bb.dataflow():
            lhs, rhs = a, b
            if transposed:
                *batch, n, k = b_shape
                rhs = bb.emit(
                    relax.op.permute_dims(b, [*range(len(batch)), len(batch) + 1, len(batch)])
                )
                rhs = bb.emit(relax.op.broadcast_to(rhs, (*batch, k, n)))
                rhs = bb.emit(relax.op.reshape(rhs, (-1, k, n)))
                lhs = bb.emit(relax.op.reshape(a, (-1, *a_shape[-2:])))
            out = bb.emit_output(relax.op.matmul(lhs, rhs))
        bb.emit_func_output(out)
    return bb.get()


def _kernels(mod):
    return [
        str(f.attrs[KERNEL_ATTR])
        for _, f in mod.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and KERNEL_ATTR in f.attrs
    ]


CASES = [
    # DeiT-tiny attention (3 heads, 197 tokens, 64 per head): Q @ K^T and P @ V
    ((1, 3, 197, 64), (1, 3, 197, 64), True),
    ((1, 3, 197, 197), (1, 3, 197, 64), False),
    # N and K not multiples of the lanes, rows not of the tile, 3-D
    ((2, 3, 45, 70), (2, 3, 77, 70), True),
    ((4, 61, 83), (4, 83, 70), False),
]


@pytest.mark.parametrize("a_shape,b_shape,transposed", CASES)
def test_matches_numpy(rng, a_shape, b_shape, transposed):
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    mod = _module(a_shape, b_shape, transposed=transposed)
    packed = PackFloatBatchMatmul(AVX512)(mod)
    assert _kernels(packed) == ["float_batch_matmul"]
    assert "relax.matmul" not in packed.script()
    if transposed:  # the panels read b itself: the swap of its last two axes is gone
        assert packed.script().count("R.permute_dims") == 1
    vm = relax.VirtualMachine(build(mod, "host", tuning_logs=None), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy()
    rhs = np.swapaxes(b, -1, -2) if transposed else b
    want = a.astype(np.float64) @ rhs
    if transposed:  # the module flattened the batch dims
        want = want.reshape(-1, *want.shape[-2:])
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_avx2_kernel_matches_numpy(rng):
    """8 lanes, 16 registers: other tiles and padding, the same answers."""
    a = rng.standard_normal((3, 50, 40)).astype(np.float32)
    b = rng.standard_normal((3, 40, 700)).astype(np.float32)
    mod = PackFloatBatchMatmul(AVX2)(_module(a.shape, b.shape, transposed=False))
    assert _kernels(mod) == ["float_batch_matmul"]
    vm = relax.VirtualMachine(tvm.compile(mod, target=AVX2), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy()
    np.testing.assert_allclose(got, a.astype(np.float64) @ b, rtol=1e-5, atol=1e-4)


def test_left_alone(rng):
    small = _module((2, 16, 30), (2, 30, 15), transposed=False)  # 14K multiply-adds
    assert PackFloatBatchMatmul(AVX512)(small).same_as(small)
    # aligned (BERT's 128 tokens): the default schedule's tile, as fast without packing
    aligned = _module((1, 12, 128, 64), (1, 12, 128, 64), transposed=True)
    assert PackFloatBatchMatmul(AVX512)(aligned).same_as(aligned)
    for a_shape, b_shape in (((12, 126, 64), (12, 64, 128)), ((12, 128, 64), (12, 64, 120))):
        ragged = PackFloatBatchMatmul(AVX512)(_module(a_shape, b_shape, transposed=False))
        assert _kernels(ragged) == ["float_batch_matmul"]
    big = _module((1, 3, 197, 64), (1, 3, 197, 64), transposed=True)
    for target in (CUDA, ARM, None):
        assert PackFloatBatchMatmul(target)(big).same_as(big)
    # a broadcast batch (b shared by all heads) and a constant b are not this pass's
    shared = _module((3, 197, 64), (1, 64, 197), transposed=False)
    assert PackFloatBatchMatmul(AVX512)(shared).same_as(shared)
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((3, 197, 64), "float32"))
    with bb.function("main", [a]):
        with bb.dataflow():
            w = relax.const(rng.standard_normal((3, 64, 197)).astype(np.float32))
            out = bb.emit_output(relax.op.matmul(a, w))
        bb.emit_func_output(out)
    const = bb.get()
    assert PackFloatBatchMatmul(AVX512)(const).same_as(const)


def test_idempotent():
    once = PackFloatBatchMatmul(AVX512)(_module((2, 90, 64), (2, 64, 90), transposed=False))
    assert PackFloatBatchMatmul(AVX512)(once).same_as(once)


def test_padded_channel_tiles():
    """``pad_channels``: N padded to whole tiles of vectors, so that a prime N (DeiT's 197
    tokens: 13 vectors of 16) is not held to one vector per tile."""
    from tvmq.kernels.cpu_float_conv import choose_conv_tiles

    assert choose_conv_tiles(197, 197, 16, 32, epilogue=True).nr == 1
    deit = choose_conv_tiles(197, 197, 16, 32, epilogue=True, pad_channels=True)
    assert deit.nr >= 2
    for m in (1, 7, 61, 197):
        for n, lanes, regs in ((197, 16, 32), (64, 16, 32), (700, 8, 16), (5, 4, 32)):
            t = choose_conv_tiles(m, n, lanes, regs, epilogue=True, pad_channels=True)
            assert t.mr * t.nr + t.nr + 1 <= regs
            assert t.o_padded % (t.nr * lanes) == 0 and 0 <= t.o_padded - n < t.nr * lanes
            assert t.ow_padded % t.mr == 0 and t.ow_padded >= m


def test_small_row_tiles_read_a_unpadded():
    """DeiT's P @ V (6-row tiles): no padded copy of P, the kernel clamps its last rows;
    Q @ K^T (14-row tiles) pads Q's rows (numerics of both: test_matches_numpy)."""
    pv = PackFloatBatchMatmul(AVX512)(_module((1, 3, 197, 197), (1, 3, 197, 64), transposed=False))
    assert "R.nn.pad" not in pv.script() and "tvmq_float_batch_matmul_3x197x197x64" in pv.script()
    qk = PackFloatBatchMatmul(AVX512)(_module((1, 3, 197, 64), (1, 3, 197, 64), transposed=True))
    assert "tvmq_float_batch_matmul_3x210x64x224" in qk.script()
