"""x86 VNNI int8 kernels: exact vs numpy on random inputs, and no per-task heap scratch."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from tvmq.kernels.x86_int8 import (
    Requantize,
    int8_batch_matmul_vnni,
    int8_dense_vnni,
    int8_dense_vnni_rows,
    pack_weight_vnni,
)
from tvmq.targets import get_target


def _compile(func: tvm.tirx.PrimFunc):
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=get_target("host").tvm_target())


def _llvm(lib, fmt: str) -> str:
    return "".join(m.inspect_source(fmt) for m in [lib.mod, *lib.mod.imports] if m.kind == "llvm")


def _workspace_allocs(lib) -> int:
    """Call sites of TVMBackendAllocWorkspace in the kernel (scratch buffers on the heap)."""
    return _llvm(lib, "ll").count("load ptr, ptr @__TVMBackendAllocWorkspace")


@pytest.mark.vnni
@pytest.mark.parametrize("m,k,n", [(8, 64, 48), (128, 384, 384), (24, 32, 128), (384, 64, 96)])
def test_dense_is_exact_with_one_scratch_buffer(m, k, n):
    lib = _compile(int8_dense_vnni(m, k, n))
    rng = np.random.default_rng(m + k + n)
    x = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    out = tvm.runtime.tensor(np.zeros((m, n), np.int32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(pack_weight_vnni(w)), out)
    np.testing.assert_array_equal(out.numpy(), x.astype(np.int64) @ w.astype(np.int64))
    # Only the accumulator tile may come from TVM's workspace pool: the intrinsic's operands
    # were let-bound values stored to two more workspaces per task, which halved the speed.
    assert "vpdpbusd" in _llvm(lib, "asm") and _workspace_allocs(lib) <= 1


@pytest.mark.vnni
@pytest.mark.parametrize(
    "m,k,n,r",
    [
        (56, 64, 32, Requantize("uint8", 0, 0, 255, relu=True)),
        (12, 36, 48, Requantize("int8", -3, -128, 127)),
        (49, 576, 64, Requantize("uint8", 7, 7, 200)),  # a clip narrower than the dtype
    ],
)
def test_dense_requantize_epilogue_matches_numpy_float32(m, k, n, r):
    """The fused requantize is numpy's float32 ``rint(float32(acc + offset) * mult) + zp``,
    clamped, bit for bit (round half to even: ties are made likely by the multipliers)."""
    lib = _compile(int8_dense_vnni(m, k, n, with_offset=True, requantize=r))
    rng = np.random.default_rng(m * n + k)
    x = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    offset = rng.integers(-20000, 20000, n, dtype=np.int32)
    mult = (rng.choice([0.5, 0.25, 2.0**-7], n) * rng.uniform(0.5, 1, n)).astype(np.float32)
    mult[::3] = 2.0**-8  # exact halves: round-half-to-even matters
    out = tvm.runtime.tensor(np.zeros((m, n), r.dtype))
    args = [x, pack_weight_vnni(w), offset, mult]
    lib["main"](*(tvm.runtime.tensor(a) for a in args), out)
    acc = (x.astype(np.int64) @ w.astype(np.int64) + offset).astype(np.int32)
    if r.relu:
        acc = np.maximum(acc, 0)
    q = np.rint(acc.astype(np.float32) * mult) + np.float32(r.zero_point)
    expected = np.clip(q, r.lo, r.hi).astype(r.dtype)
    np.testing.assert_array_equal(out.numpy(), expected)
    assert (expected != r.lo).mean() > 0.3  # not all clamped away


@pytest.mark.vnni
@pytest.mark.parametrize(
    "batch,m,k,n", [(12, 128, 32, 128), (3, 16, 128, 32), (2, 8, 4, 16), (2, 256, 8, 32)]
)
def test_batch_matmul_is_exact(batch, m, k, n):
    lib = _compile(int8_batch_matmul_vnni(batch, m, k, n))
    rng = np.random.default_rng(batch * m + n)
    x = rng.integers(0, 256, (batch, m, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (batch, k, n), dtype=np.int8)
    packed = np.stack([pack_weight_vnni(w[b]) for b in range(batch)])
    out = tvm.runtime.tensor(np.zeros((batch, m, n), np.int32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(packed), out)
    expected = np.einsum("bmk,bkn->bmn", x.astype(np.int64), w.astype(np.int64))
    np.testing.assert_array_equal(out.numpy(), expected)
    assert _workspace_allocs(lib) <= 1


def test_unpadded_shapes_are_refused():
    with pytest.raises(ValueError, match="unpadded"):
        int8_batch_matmul_vnni(2, 8, 30, 16)


@pytest.mark.vnni
@pytest.mark.parametrize("k,n,with_offset", [(64, 32, False), (32, 64, True), (384, 96, True)])
def test_dense_for_a_run_time_row_count_is_exact(k, n, with_offset):
    """One library, rows = 8 * mo for any mo (a symbolic batch x sequence), still vpdpbusd."""
    lib = _compile(int8_dense_vnni_rows(k, n, with_offset=with_offset))
    assert "vpdpbusd" in _llvm(lib, "asm")
    rng = np.random.default_rng(k + n)
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    offset = rng.integers(-1000, 1000, n, dtype=np.int32)
    for mo in (1, 3, 17):
        x = rng.integers(0, 256, (8 * mo, k), dtype=np.uint8)
        out = tvm.runtime.tensor(np.zeros((8 * mo, n), np.int32))
        extra = [tvm.runtime.tensor(offset)] if with_offset else []
        lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(pack_weight_vnni(w)), *extra, mo, out)
        expected = x.astype(np.int64) @ w.astype(np.int64) + (offset if with_offset else 0)
        np.testing.assert_array_equal(out.numpy(), expected)
