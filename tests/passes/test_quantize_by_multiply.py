"""QuantizeByMultiply: a quantize by a constant scale as a multiply by its reciprocal."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from tvmq.core import qmath
from tvmq.passes import QuantizeByMultiply
from tvmq.passes.relax_utils import op_name, ordered_bindings


def _quantize(scale, zero=3, dtype="uint8", shape=(64, 96)):
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            q = relax.op.quantize(x, relax.const(scale, "float32"), relax.const(zero, "int32"),
                                  axis=-1, out_dtype=dtype)  # fmt: skip
            q = bb.emit_output(q)
        bb.emit_func_output(q)
    return bb.get()


def _run(mod, x):
    ex = relax.build(mod, target=tvm.target.Target({"kind": "llvm"}))
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def _scales(mod):
    return [
        float(b.value.args[1].value.numpy())
        for b in ordered_bindings(mod["main"])
        if op_name(b.value) == "relax.quantize"
    ]


@pytest.mark.parametrize("scale, zero, dtype", [(0.0371, 3, "uint8"), (0.013, -5, "int8")])
def test_no_divide_and_the_same_integers_but_near_ties(scale, zero, dtype):
    mod = _quantize(scale, zero, dtype)
    out = QuantizeByMultiply()(mod)
    assert _scales(out) == [1.0]
    assert "relax.multiply" in [op_name(b.value) for b in ordered_bindings(out["main"])]
    legalized = relax.transform.LegalizeOps()(out)
    assert not any(
        "/" in f.script()
        for _, f in legalized.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc)
    )
    x = (np.random.default_rng(0).standard_normal((64, 96)) * 2).astype(np.float32)
    x[:8] = ((np.arange(8 * 96).reshape(8, 96) % 200 - 100 + 0.5) * scale).astype(np.float32)
    got = _run(out, x)
    ref = qmath.quantize(x, np.float32(scale), zero, dtype)
    diff = np.abs(got.astype(np.int64) - ref.astype(np.int64))
    assert diff.max() <= 1
    # a step apart only where x / s is within a float32 ulp of a rounding boundary
    t = x.astype(np.float64) / scale
    near = np.abs(np.abs(t - np.floor(t)) - 0.5) < 4 * np.abs(t) * np.finfo(np.float32).eps
    assert np.all(near[diff > 0]) and not np.any(diff[8:])  # random values: the same bytes


@pytest.mark.parametrize("scale", [1.0, np.full(96, 0.02, "float32")])
def test_unit_and_per_channel_scales_are_left_alone(scale):
    if isinstance(scale, float):
        mod = _quantize(scale)
    else:
        x = relax.Var("x", relax.TensorType((64, 96), "float32"))
        bb = relax.BlockBuilder()
        with bb.function("main", [x]):
            with bb.dataflow():
                q = relax.op.quantize(x, relax.const(scale), relax.const(0, "int32"), axis=-1)
                q = bb.emit_output(q)
            bb.emit_func_output(q)
        mod = bb.get()
    assert QuantizeByMultiply()(mod).same_as(mod)
