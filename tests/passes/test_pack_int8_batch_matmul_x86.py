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


def _zero_point_module(a_shape, a_dtype, b_shape, b_dtype, z_a, z_b) -> tvm.IRModule:
    """LowerInt8's activation matmul: acc - z_b * rowsum(a) - z_a * colsum(b) + K z_a z_b."""
    a = relax.Var("a", relax.TensorType(a_shape, a_dtype))
    b = relax.Var("b", relax.TensorType(b_shape, b_dtype))
    i32 = lambda v: relax.const(v, "int32")  # noqa: E731
    bb = relax.BlockBuilder()
    with bb.function("main", [a, b]):
        with bb.dataflow():
            acc = bb.emit(relax.op.matmul(a, b, out_dtype="int32"))
            for x, axis, z in ((a, len(a_shape) - 1, z_b), (b, len(b_shape) - 2, z_a)):
                if z:
                    total = bb.emit(
                        relax.op.sum(bb.emit(relax.op.astype(x, "int32")), [axis], True)
                    )
                    acc = bb.emit(relax.op.subtract(acc, bb.emit(relax.op.multiply(total, i32(z)))))
            if z_a and z_b:
                acc = bb.emit(relax.op.add(acc, i32(a_shape[-1] * z_a * z_b)))
            out = bb.emit_output(
                relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(0.5))
            )
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.vnni
@pytest.mark.parametrize(
    "a_shape,a_dtype,b_shape,b_dtype,z_a,z_b",
    [
        ((1, 3, 13, 64), "uint8", (1, 3, 64, 13), "uint8", 129, 127),  # DeiT's Q @ K^T, padded
        ((1, 2, 16, 20), "uint8", (1, 2, 20, 32), "uint8", 0, 120),  # P @ V: P's zero point 0
        ((2, 9, 6), "int8", (2, 6, 5), "uint8", -3, 0),
        ((2, 9, 6), "int8", (2, 6, 5), "int8", 5, -7),
    ],
)
def test_lower_int8_zero_point_terms_join_the_kernel(a_shape, a_dtype, b_shape, b_dtype, z_a, z_b):
    """The row / column sums and the subtractions LowerInt8 writes after the matmul are folded
    into the kernel's terms: none is left in the module, and the result is exact (against
    TVM's default lowering of the unrewritten module, on random operands)."""
    mod = _zero_point_module(a_shape, a_dtype, b_shape, b_dtype, z_a, z_b)
    with tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"}):
        packed = PackInt8BatchMatmulX86()(mod)
    ops = []

    def int32_ops(e):
        if isinstance(e, relax.Call) and hasattr(e.op, "name") and str(e.ty.dtype) == "int32":
            ops.append(e.op.name)

    relax.analysis.post_order_visit(packed["main"], int32_ops)
    assert "relax.matmul" not in ops
    assert "relax.subtract" not in ops and "relax.multiply" not in ops, ops
    assert ops.count("relax.sum") <= 2  # at most the kernel's own row and column sums
    rng = np.random.default_rng(sum(a_shape) + z_a)
    a, b = _random(rng, a_shape, a_dtype), _random(rng, b_shape, b_dtype)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"})
    run = lambda m: relax.VirtualMachine(tvm.compile(m, target=target), tvm.cpu())["main"]  # noqa: E731
    args = (tvm.runtime.tensor(a), tvm.runtime.tensor(b))
    np.testing.assert_array_equal(run(packed)(*args).numpy(), run(mod)(*args).numpy())
