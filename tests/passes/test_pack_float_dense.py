"""PackFloatDense: float matmuls with a constant weight on the packed kernel, vs numpy."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from tvmq.build import build
from tvmq.kernels import KERNEL_ATTR
from tvmq.passes import PackFloatDense

AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})


def _linear(x_shape, w, *, transposed=True):
    """``main(x) = x @ W`` with W stored as torch's Linear does ((N, K), permuted)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            if transposed:
                wt = bb.emit(relax.op.permute_dims(relax.const(np.ascontiguousarray(w.T))))
            else:
                wt = relax.const(w)
            out = bb.emit_output(relax.op.matmul(x, wt))
        bb.emit_func_output(out)
    return bb.get()


def _kernels(mod):
    return [
        str(f.attrs[KERNEL_ATTR])
        for _, f in mod.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and KERNEL_ATTR in f.attrs
    ]


@pytest.mark.parametrize(
    "x_shape,n",
    [((2, 50, 96), 200), ((97, 130), 100), ((1, 197, 192), 192), ((19, 1024), 192)],
    ids=["3d", "odd-rows-and-columns", "deit-tokens", "19-rows"],
)
def test_matches_numpy(rng, x_shape, n):
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal((x_shape[-1], n)).astype(np.float32)
    mod = _linear(x_shape, w)
    with AVX512:
        assert _kernels(PackFloatDense()(mod)) == ["float_conv2d_nhwc"]
    vm = relax.VirtualMachine(build(mod, "host", tuning_logs=None), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    want = x @ w
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize(("m", "padded"), [(197, False), (19, False), (97, True)])
def test_small_row_tiles_read_x_unpadded(rng, m, padded):
    """DeiT's 197 tokens (9-row tiles) and 19 rows (7-row tiles): no padded copy of x, the
    kernel clamps its last rows; 97 rows of 100 columns (a 28-row tile) keep the pad
    (numerics of the clamped ones: test_matches_numpy)."""
    from tvmq.kernels.cpu_float_conv import CLAMP_MAX_ROWS, choose_conv_tiles

    k, n = 1024, 192 if m != 97 else 100
    tiles = choose_conv_tiles(m, n, 16, 32)
    assert tiles.ow_padded != m and (tiles.mr > CLAMP_MAX_ROWS) == padded
    w = rng.standard_normal((k, n)).astype(np.float32)
    script = PackFloatDense(AVX512)(_linear((m, k), w)).script()
    assert ("R.nn.pad" in script) == padded
    assert f"tvmq_float_dense_{m if not padded else tiles.ow_padded}x{k}x" in script


def test_small_matmuls_stay_tunable(rng):
    """Below 2**20 multiply-adds the default schedule (and MetaSchedule) keep the matmul."""
    mod = _linear((8, 64), rng.standard_normal((64, 32)).astype(np.float32))
    assert PackFloatDense(AVX512)(mod).same_as(mod)


def test_no_op_where_it_does_not_apply(rng):
    w = rng.standard_normal((256, 256)).astype(np.float32)
    mod = _linear((64, 256), w, transposed=False)
    assert PackFloatDense(CUDA)(mod).same_as(mod)
    assert PackFloatDense()(mod).same_as(mod)  # no target
    once = PackFloatDense(AVX512)(mod)
    assert not once.same_as(mod)
    assert PackFloatDense(AVX512)(once).same_as(once)


def test_symbolic_rows_use_the_packed_kernel():
    """x: (batch, seq, K) with both symbolic: one kernel for every size, close to numpy."""
    from tvmq.kernels.cpu_float_conv import simd_lanes_and_registers
    from tvmq.targets import get_target

    rng = np.random.default_rng(3)
    w = rng.standard_normal((96, 40)).astype(np.float32)
    b, s = tvm.tirx.Var("batch", "int64"), tvm.tirx.Var("seq", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((b, s, 96), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.matmul(x, relax.const(w)))
        bb.emit_func_output(y)
    target = get_target("host").tvm_target()
    mod = PackFloatDense(target)(bb.get())
    # 40 columns padded to whole vectors: 48 with AVX-512's 16 lanes, 40 with AVX2's 8.
    lanes = simd_lanes_and_registers(target)[0]
    name = f"tvmq_float_dense_Mx96x{-(-40 // lanes) * lanes}"
    assert "relax.matmul" not in mod.script() and name in mod.script()
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    for shape in [(1, 1), (2, 5), (3, 16)]:
        xv = rng.standard_normal((*shape, 96)).astype(np.float32)
        got = vm["main"](tvm.runtime.tensor(xv)).numpy()
        np.testing.assert_allclose(got, xv.astype(np.float64) @ w, rtol=1e-4, atol=1e-4)
