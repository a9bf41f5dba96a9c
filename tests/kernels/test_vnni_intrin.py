"""The tvmq VNNI tensor intrinsic: registration, and one tensorized kernel on random data."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import te
from tvm.s_tir import Schedule, TensorIntrin

from tvmq.kernels import vnni_intrin

CASCADELAKE = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"})


def test_registered_once_under_tvmq_name():
    assert vnni_intrin.VNNI_DOT_16X4 == "tvmq_dot_16x4_vnni"
    assert vnni_intrin.register_vnni_intrin() == vnni_intrin.VNNI_DOT_16X4
    first = TensorIntrin.get(vnni_intrin.VNNI_DOT_16X4)
    assert vnni_intrin.register_vnni_intrin() == vnni_intrin.VNNI_DOT_16X4
    assert TensorIntrin.get(vnni_intrin.VNNI_DOT_16X4).same_as(first)


def _tensorized_gemv(k: int) -> tvm.IRModule:
    """``C[16] = sum_k A[k] * W[k, 16]`` with W packed [1, k/4, 16, 4], tensorized, no tiling."""
    a = te.placeholder((k,), "uint8", name="A")
    w = te.placeholder((1, k // 4, 16, 4), "int8", name="W")
    r = te.reduce_axis((0, k), name="r")
    c = te.compute(
        (16,),
        lambda i: te.sum(a[r].astype("int32") * w[0, r // 4, i, r % 4].astype("int32"), axis=r),
        name="C",
    )
    sch = Schedule(te.create_prim_func([a, w, c]))
    block = sch.get_sblock("C")
    i, kk = sch.get_loops(block)
    ko, ki = sch.split(kk, [None, 4])
    sch.reorder(ko, i, ki)
    sch.decompose_reduction(block, ko)
    sch.tensorize(i, vnni_intrin.register_vnni_intrin())
    return sch.mod


@pytest.mark.vnni
def test_tensorized_gemv_is_exact_and_uses_vpdpbusd():
    k = 64
    lib = tvm.compile(_tensorized_gemv(k), target=CASCADELAKE)
    assert "vpdpbusd" in lib.mod.inspect_source("asm")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, k, dtype=np.uint8)
    w = rng.integers(-128, 128, (k, 16), dtype=np.int8)
    packed = np.ascontiguousarray(w.reshape(1, k // 4, 4, 16).transpose(0, 1, 3, 2))
    c = tvm.runtime.tensor(np.zeros(16, "int32"))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(packed), c)
    np.testing.assert_array_equal(c.numpy(), a.astype(np.int32) @ w.astype(np.int32))
