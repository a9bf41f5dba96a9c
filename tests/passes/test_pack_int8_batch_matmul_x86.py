"""PackInt8BatchMatmulX86: int8 activation matmuls on the batched VNNI kernel, exact vs numpy."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from tvmq.build import build
from tvmq.passes.pack_int8_batch_matmul_x86 import PackInt8BatchMatmulX86


def _module(a_shape, a_dtype, b_shape, b_dtype) -> tvm.IRModule:
    a = relax.Var("a", relax.TensorType(a_shape, a_dtype))
    b = relax.Var("b", relax.TensorType(b_shape, b_dtype))
    bb = relax.BlockBuilder()
    with bb.function("main", [a, b]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(a, b, out_dtype="int32"))
        bb.emit_func_output(out)
    return bb.get()


def _random(rng, shape, dtype):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, shape, dtype=dtype)


CASES = [
    # attention at MiniLM's shapes: Q @ K^T and P @ V, both operands uint8 (static int8)
    ((1, 12, 128, 32), "uint8", (1, 12, 32, 128), "uint8"),
    ((1, 12, 128, 128), "uint8", (1, 12, 128, 32), "uint8"),
    # every sign combination, and sizes that need padding (M, K, N)
    ((2, 3, 10, 7), "int8", (2, 3, 7, 20), "int8"),
    ((4, 9, 6), "uint8", (4, 6, 5), "int8"),
    ((4, 9, 6), "int8", (4, 6, 5), "uint8"),
]


@pytest.mark.vnni
@pytest.mark.parametrize("a_shape,a_dtype,b_shape,b_dtype", CASES)
def test_exact_vs_numpy_on_the_vnni_kernel(a_shape, a_dtype, b_shape, b_dtype):
    mod = _module(a_shape, a_dtype, b_shape, b_dtype)
    with tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"}):
        packed = PackInt8BatchMatmulX86()(mod)
    kernels = [
        gv.name_hint for gv, f in packed.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
    ]
    assert len(kernels) == 1 and kernels[0].startswith("tvmq_int8_batch_matmul_vnni_")

    rng = np.random.default_rng(sum(a_shape))
    a, b = _random(rng, a_shape, a_dtype), _random(rng, b_shape, b_dtype)
    vm = relax.VirtualMachine(build(mod, "host"), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy()
    np.testing.assert_array_equal(got, np.matmul(a.astype(np.int64), b.astype(np.int64)))


def test_left_alone_without_vnni_or_with_a_constant_or_broadcast_operand():
    mod = _module((2, 8, 16), "uint8", (2, 16, 16), "int8")
    for target in (
        {"kind": "llvm", "mcpu": "skylake"},
        {"kind": "llvm", "mtriple": "aarch64-linux-gnu"},
    ):
        with tvm.target.Target(target):
            assert PackInt8BatchMatmulX86()(mod).same_as(mod)
    broadcast = _module((2, 8, 16), "uint8", (1, 16, 16), "int8")
    with tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"}):
        assert PackInt8BatchMatmulX86()(broadcast).same_as(broadcast)
