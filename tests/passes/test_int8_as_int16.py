"""Int8AsInt16: int8 matmuls with a constant weight as exact int16 pair products on AVX2."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi
from test_int8_as_float import (
    AARCH64,
    CASCADELAKE,
    CUDA,
    DTYPES,
    HASWELL,
    SHAPES,
    _module,
    _products,
    _reference,
)
from tvm import relax

from tvmq.build import build_with_info
from tvmq.machine import cpu_flags
from tvmq.passes import Int8AsFloat, Int8AsInt16, PackFloatConv, PackFloatDense
from tvmq.passes.relax_utils import CONV2D, MATMUL
from tvmq.runtime import decoded_params

SKYLAKE_AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})


@pytest.mark.parametrize(
    "target",
    [CASCADELAKE, SKYLAKE_AVX512, AARCH64, CUDA],
    ids=["cascadelake", "skylake-avx512", "aarch64", "cuda"],
)
def test_targets_other_than_avx2_are_left_alone(target):
    mod = _module()
    assert tvm_ffi.structural_equal(Int8AsInt16(target)(mod), mod)


def test_only_the_constant_weight_matmul_becomes_int16():
    mod = Int8AsInt16(HASWELL)(_module())
    # the convs, the activation matmul and the small one stay int8 products (int32 results)
    assert sorted(_products(mod)) == sorted([(CONV2D, "int32")] * 2 + [(MATMUL, "int32")] * 3)
    operands = []
    relax.analysis.post_order_visit(
        mod["main"],
        lambda e: (
            operands.append(str(e.args[1].ty.dtype))
            if isinstance(e, relax.Call) and str(getattr(e.op, "name", "")) == MATMUL
            else None
        ),
    )
    assert sorted(operands) == ["int16", "int8", "int8"]


def test_an_odd_reduction_stays_for_int8_as_float():
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((64, 127), "uint8"))
    w = np.ones((127, 256), np.int8)
    with bb.function("main", [a]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.matmul(a, relax.const(w), out_dtype="int32")))
        bb.emit_func_output(out)
    mod = bb.get()
    assert tvm_ffi.structural_equal(Int8AsInt16(HASWELL)(mod), mod)


def test_the_int16_dense_kernel_takes_it():
    with HASWELL:
        passes = [Int8AsInt16(HASWELL), Int8AsFloat(HASWELL), PackFloatConv(HASWELL)]
        mod = _module()
        for p in [*passes, PackFloatDense(HASWELL)]:
            mod = p(mod)
    # what is left: the activation matmul on float32 and the small one
    assert sorted(_products(mod)) == [(MATMUL, "float32"), (MATMUL, "int32")]
    kernels = [gv.name_hint for gv in mod.get_global_vars()]
    assert any(name.startswith("tvmq_int16_dense_") for name in kernels)


@pytest.mark.skipif(
    not {"avx2", "fma"} <= cpu_flags(), reason="runs x86-avx2 code: needs AVX2 and FMA"
)
def test_an_avx2_library_gives_the_exact_products_from_8_bit_codes():
    """Built for x86-avx2 as tvmq.compile builds an int8 model: every product is numpy's
    int64 one, and the int16 dense weight is stored as 8-bit codes decoded at load."""
    rng = np.random.default_rng(3)
    inputs = [
        rng.integers(*((0, 256) if DTYPES[k] == "uint8" else (-128, 128)), SHAPES[k]).astype(
            DTYPES[k]
        )
        for k in SHAPES
    ]
    ex, _ = build_with_info(_module(), "x86-avx2", tuning_logs=None, int8_weight_codes=True)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    decoded = decoded_params(vm)
    assert sorted(str(p.dtype) for p in decoded) == ["float32", "int16"]  # conv, dense
    got = vm["main"](*(tvm.runtime.tensor(v) for v in inputs), *decoded)
    for y, ref in zip(got, _reference(*inputs), strict=True):
        assert y.numpy().dtype == np.int32
        np.testing.assert_array_equal(y.numpy(), ref)
