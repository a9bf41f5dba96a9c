"""PackDecodedDense: w8 / w4 / clustered matmul weights decoded inside the kernel, vs numpy."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from tvmq.build import build
from tvmq.kernels import KERNEL_ATTR
from tvmq.passes import ClusterWeights, PackDecodedDense, QuantizeWeightOnly
from tvmq.passes.cluster_weights import cluster_tensor
from tvmq.passes.quantize_weight_only import DECODER_ATTR, dequantize_weight, quantize_weight
from tvmq.passes.relax_utils import is_tensor_const

AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})


def _linear(x_shape, w):
    """``main(x) = x @ W`` with W stored as torch's Linear does ((N, K), permuted)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            wt = bb.emit(relax.op.permute_dims(relax.const(np.ascontiguousarray(w.T))))
            out = bb.emit_output(relax.op.matmul(x, wt))
        bb.emit_func_output(out)
    return bb.get()


def _functions(mod):
    kernels, decoders = [], []
    for _, f in mod.functions_items():
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and KERNEL_ATTR in f.attrs:
            kernels.append(str(f.attrs[KERNEL_ATTR]))
        if isinstance(f, relax.Function) and f.attrs and DECODER_ATTR in f.attrs:
            decoders.append(f)
    return kernels, decoders


def _run(mod, x):
    vm = relax.VirtualMachine(build(mod, "host", tuning_logs=None), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def _check(mod, x, w_decoded):
    with AVX512:
        packed = PackDecodedDense()(mod)
    kernels, decoders = _functions(packed)
    assert kernels == ["decoded_dense"] and not decoders
    # the rewritten module itself (a build of `mod` decodes clustered weights at load instead)
    got, want = _run(packed, x), x.astype(np.float64) @ w_decoded.astype(np.float64)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()


@pytest.mark.parametrize(
    "bits,group,symmetric,x_shape,n",
    [
        (8, None, True, (2, 50, 96), 200),
        (8, 32, False, (37, 96), 70),
        (4, 32, True, (3, 64), 100),  # one row tile: decoded in registers
        (4, None, False, (40, 33), 17),  # odd K: the last nibble pair is half padding
    ],
    ids=["w8-3d", "w8-asym-grouped", "w4-batch3", "w4-asym-odd-k"],
)
def test_weight_only_matches_numpy(rng, bits, group, symmetric, x_shape, n):
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal((x_shape[-1], n)).astype(np.float32)
    mod = QuantizeWeightOnly(bits, group, symmetric)(_linear(x_shape, w))
    q, scale, zp, _ = quantize_weight(w, "matmul", bits, group, symmetric)
    _check(mod, x, dequantize_weight(q, scale, zp, "matmul"))


@pytest.mark.parametrize("bits,x_shape,n", [(4, (64, 80), 48), (6, (5, 72), 30)])
def test_clustered_matches_numpy(rng, bits, x_shape, n):
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal((x_shape[-1], n)).astype(np.float32)
    mod = ClusterWeights(bits, min_size=1)(_linear(x_shape, w))
    codebook, idx = cluster_tensor(np.ascontiguousarray(w.T), bits, "kmeans++", 0)
    _check(mod, x, codebook[idx].T)


def test_keeps_the_library_small(rng):
    """The kernel reads the codes: no float copy of the weight is stored."""
    w = rng.standard_normal((256, 512)).astype(np.float32)
    mod = QuantizeWeightOnly(4, 32)(_linear((16, 256), w))
    with AVX512:
        packed = PackDecodedDense()(mod)
    consts = []
    relax.analysis.post_order_visit(
        packed["main"], lambda e: consts.append(e) if is_tensor_const(e) else None
    )
    stored = sum(c.value.numpy().nbytes for c in consts)
    assert stored < w.nbytes / 6  # 4-bit codes + one scale per 32 weights


def test_noop_without_cpu_simd(rng):
    mod = QuantizeWeightOnly(8)(_linear((8, 64), rng.standard_normal((64, 32)).astype("float32")))
    assert PackDecodedDense(CUDA)(mod).same_as(mod)
