"""LowerInt8: QDQ regions -> int8 x int8 -> int32 compute; structure, idempotence, numerics."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from tvmq.passes import FLOAT_OPS_ATTR, LowerInt8
from tvmq.passes.lower_int8 import requantize_int_expr
from tvmq.quantization import qmath

RNG = np.random.default_rng(0)
WQ = RNG.integers(-127, 128, (4, 3)).astype("int8")
S_W = np.array([0.01, 0.02, 0.005], "float32")
BIAS = np.array([0.3, -0.2, 0.1], "float32")
S_X, Z_X, S_Y, Z_Y = 0.5, 3, 0.25, -128
HOST = tvm.target.Target({"kind": "llvm"})


def _bind(mod: tvm.IRModule, **params) -> tvm.IRModule:
    return relax.transform.BindParams("main", params)(mod)


def _run(mod, *args):
    ex = tvm.compile(mod, target=HOST)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in args])
    return out.numpy()


def _offset(wq, s_w, bias, s_x, z_x, axis):
    """round(bias / (s_x * s_w)) - z_x * sum_k Wq: the region's int32 constant."""
    acc_scale = np.float64(s_x) * s_w.astype(np.float64)
    w_sum = wq.astype(np.int64).sum(axis=axis)
    out = -z_x * w_sum
    if bias is not None:
        out = out + np.rint(bias / acc_scale).astype(np.int64)
    return out.astype("int32")


@I.ir_module
class MatmulQDQ:
    @R.function
    def main(
        x: R.Tensor((2, 4), "int8"),
        wq: R.Tensor((4, 3), "int8"),
        s_w: R.Tensor((3,), "float32"),
        b: R.Tensor((3,), "float32"),
    ) -> R.Tensor((2, 3), "int8"):
        with R.dataflow():
            xdq = R.dequantize(x, R.const(0.5, "float32"), R.const(3, "int32"), out_dtype="float32")
            wdq = R.dequantize(wq, s_w, R.const(0, "int32"), axis=1, out_dtype="float32")
            y = R.matmul(xdq, wdq, out_dtype="float32")
            yb = R.add(b, y)
            r = R.nn.relu(yb)
            q = R.quantize(r, R.const(0.25, "float32"), R.const(-128, "int32"), out_dtype="int8")
            R.output(q)
        return q


@I.ir_module
class MatmulInt:
    @R.function
    def main(
        x: R.Tensor((2, 4), "int8"),
        wq: R.Tensor((4, 3), "int8"),
        offset: R.Tensor((3,), "int32"),
        m: R.Tensor((3,), "float32"),
    ) -> R.Tensor((2, 3), "int8"):
        with R.dataflow():
            acc = R.matmul(x, wq, out_dtype="int32")
            acc1 = R.add(acc, offset)
            acc2 = R.nn.relu(acc1)
            accf = R.astype(acc2, "float32")
            scaled = R.multiply(accf, m)
            q = R.quantize(
                scaled, R.const(1.0, "float32"), R.const(-128, "int32"), axis=-1, out_dtype="int8"
            )
            R.output(q)
        return q


def _matmul_qdq():
    return _bind(MatmulQDQ, wq=WQ, s_w=S_W, b=BIAS)


def test_matmul_bias_relu_quantize_float_requantize():
    after = LowerInt8()(_matmul_qdq())
    expected = _bind(
        MatmulInt,
        wq=WQ,
        offset=_offset(WQ, S_W, BIAS, S_X, Z_X, axis=0),
        m=(np.float64(S_X) * S_W / S_Y).astype("float32"),
    )
    tvm.ir.assert_structural_equal(after, expected)


@I.ir_module
class MatmulFloatOut:
    @R.function
    def main(
        x: R.Tensor((2, 4), "uint8"),
        wq: R.Tensor((4, 3), "int8"),
        s_w: R.Tensor((3,), "float32"),
        b: R.Tensor((3,), "float32"),
    ) -> R.Tensor((2, 3), "float32"):
        with R.dataflow():
            xdq = R.dequantize(
                x, R.const(0.5, "float32"), R.const(131, "int32"), out_dtype="float32"
            )
            wdq = R.dequantize(wq, s_w, R.const(0, "int32"), axis=1, out_dtype="float32")
            y = R.matmul(xdq, wdq, out_dtype="float32")
            yb = R.add(y, b)
            R.output(yb)
        return yb


@I.ir_module
class MatmulFloatOutInt:
    @R.function
    def main(
        x: R.Tensor((2, 4), "uint8"),
        wq: R.Tensor((4, 3), "int8"),
        offset: R.Tensor((3,), "int32"),
        s_acc: R.Tensor((3,), "float32"),
    ) -> R.Tensor((2, 3), "float32"):
        with R.dataflow():
            acc = R.matmul(x, wq, out_dtype="int32")
            acc1 = R.add(acc, offset)
            yb = R.dequantize(acc1, s_acc, R.const(0, "int32"), axis=1, out_dtype="float32")
            R.output(yb)
        return yb


def test_uint8_matmul_with_float_consumer_dequantizes():
    after = LowerInt8()(_bind(MatmulFloatOut, wq=WQ, s_w=S_W, b=BIAS))
    expected = _bind(
        MatmulFloatOutInt,
        wq=WQ,
        offset=_offset(WQ, S_W, BIAS, S_X, 131, axis=0),
        s_acc=(np.float64(S_X) * S_W).astype("float32"),
    )
    tvm.ir.assert_structural_equal(after, expected)


WC = RNG.integers(-127, 128, (2, 3, 3, 3)).astype("int8")
S_WC = np.array([0.02, 0.01], "float32")


@I.ir_module
class ConvQDQ:
    @R.function
    def main(
        x: R.Tensor((1, 3, 4, 4), "int8"),
        wq: R.Tensor((2, 3, 3, 3), "int8"),
        s_w: R.Tensor((2,), "float32"),
    ) -> R.Tensor((1, 2, 2, 2), "int8"):
        with R.dataflow():
            xdq = R.dequantize(
                x, R.const(0.5, "float32"), R.const(-7, "int32"), out_dtype="float32"
            )
            wdq = R.dequantize(wq, s_w, R.const(0, "int32"), axis=0, out_dtype="float32")
            y = R.nn.conv2d(xdq, wdq, padding=[1, 1, 1, 1], out_dtype="float32")
            r = R.nn.relu(y)
            p = R.nn.max_pool2d(r, pool_size=[2, 2], strides=[2, 2])
            q = R.quantize(p, R.const(0.25, "float32"), R.const(-128, "int32"), out_dtype="int8")
            R.output(q)
        return q


@I.ir_module
class ConvInt:
    @R.function
    def main(
        x: R.Tensor((1, 3, 4, 4), "int8"),
        wq: R.Tensor((2, 3, 3, 3), "int8"),
        offset: R.Tensor((1, 2, 1, 1), "int32"),
        m: R.Tensor((1, 2, 1, 1), "float32"),
    ) -> R.Tensor((1, 2, 2, 2), "int8"):
        with R.dataflow():
            xp = R.nn.pad(x, [0, 0, 0, 0, 1, 1, 1, 1], pad_value=-7.0)
            acc = R.nn.conv2d(xp, wq, out_dtype="int32")
            acc1 = R.add(acc, offset)
            acc2 = R.nn.relu(acc1)
            accf = R.astype(acc2, "float32")
            scaled = R.multiply(accf, m)
            y = R.quantize(
                scaled, R.const(1.0, "float32"), R.const(-128, "int32"), axis=-1, out_dtype="int8"
            )
            q = R.nn.max_pool2d(y, pool_size=[2, 2], strides=[2, 2])
            R.output(q)
        return q


def test_conv_pads_with_zero_point_and_moves_max_pool_after_requantize():
    after = LowerInt8()(_bind(ConvQDQ, wq=WC, s_w=S_WC))
    expected = _bind(
        ConvInt,
        wq=WC,
        offset=_offset(WC, S_WC, None, S_X, -7, axis=(1, 2, 3)).reshape(1, 2, 1, 1),
        m=(np.float64(S_X) * S_WC / S_Y).astype("float32").reshape(1, 2, 1, 1),
    )
    tvm.ir.assert_structural_equal(after, expected)


@I.ir_module
class FloatModel:
    @R.function
    def main(x: R.Tensor((2, 4), "float32"), w: R.Tensor((4, 3), "float32")):
        with R.dataflow():
            y = R.matmul(x, w, out_dtype="float32")
            R.output(y)
        return y


@I.ir_module
class DynamicWeightQDQ:
    """A QDQ matmul whose weight is an input: not lowerable (zero-point terms unknown)."""

    @R.function
    def main(x: R.Tensor((2, 4), "int8"), w: R.Tensor((4, 3), "int8")):
        with R.dataflow():
            xdq = R.dequantize(x, R.const(0.5, "float32"), R.const(0, "int32"), out_dtype="float32")
            wdq = R.dequantize(w, R.const(0.1, "float32"), R.const(0, "int32"), out_dtype="float32")
            y = R.matmul(xdq, wdq, out_dtype="float32")
            R.output(y)
        return y


@pytest.mark.parametrize("mod", [FloatModel, DynamicWeightQDQ])
def test_nothing_to_lower_leaves_module_unchanged(mod):
    assert LowerInt8()(mod).same_as(mod)


@pytest.mark.parametrize("requantize", ["float", "integer"])
def test_idempotent(requantize):
    once = LowerInt8(requantize=requantize)(_matmul_qdq())
    assert LowerInt8(requantize=requantize)(once).same_as(once)


@I.ir_module
class Mixed:
    @R.function
    def main(
        x: R.Tensor((2, 4), "int8"),
        w2: R.Tensor((3, 3), "float32"),
        wq: R.Tensor((4, 3), "int8"),
        s_w: R.Tensor((3,), "float32"),
    ):
        with R.dataflow():
            xdq = R.dequantize(x, R.const(0.5, "float32"), R.const(0, "int32"), out_dtype="float32")
            wdq = R.dequantize(wq, s_w, R.const(0, "int32"), axis=1, out_dtype="float32")
            y = R.matmul(xdq, wdq, out_dtype="float32")
            z = R.matmul(y, w2, out_dtype="float32")
            R.output(z)
        return z


def test_records_float_ops():
    after = LowerInt8()(_bind(Mixed, wq=WQ, s_w=S_W))
    assert list(after["main"].attrs[FLOAT_OPS_ATTR]) == ["matmul:z"]


# -- numerics ---------------------------------------------------------------------------------


def _qdq_matmul_module(act_dtype, z_x, s_y, z_y, w_q, s_w, bias, relu=True, n=8):
    """dequantize -> matmul -> add bias -> relu -> quantize, built with the BlockBuilder."""
    k, c = w_q.shape
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, k), act_dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            xdq = bb.emit(
                relax.op.dequantize(x, relax.const(np.float32(S_X)), relax.const(np.int32(z_x)))
            )
            wdq = bb.emit(
                relax.op.dequantize(
                    relax.const(w_q, "int8"), relax.const(s_w), relax.const(np.int32(0)), axis=1
                )
            )
            y = bb.emit(relax.op.matmul(xdq, wdq, out_dtype="float32"))
            y = bb.emit(relax.op.add(y, relax.const(bias)))
            if relu:
                y = bb.emit(relax.op.nn.relu(y))
            q = bb.emit_output(
                relax.op.quantize(
                    y, relax.const(np.float32(s_y)), relax.const(np.int32(z_y)), out_dtype=act_dtype
                )
            )
        bb.emit_func_output(q)
    return bb.get()


def _accumulators(xq, z_x, w_q, s_w, bias, relu=True):
    acc = (xq.astype(np.int64) - z_x) @ w_q.astype(np.int64)
    acc = acc + np.rint(bias / (np.float64(S_X) * s_w)).astype(np.int64)
    return np.maximum(acc, 0) if relu else acc


@pytest.mark.parametrize("act_dtype, z_x, z_y", [("int8", 5, -20), ("uint8", 130, 7)])
def test_integer_requantize_is_bit_exact_with_qmath(act_dtype, z_x, z_y):
    rng = np.random.default_rng(3)
    k, c = 64, 16
    w_q = rng.integers(-127, 128, (k, c)).astype("int8")
    # Multipliers s_x * s_w / s_y from 2^-14 to 4 (positive shifts, exercising the saturating
    # left shift) and exact powers of two (ties in both rounding steps).
    s_w = (2.0 ** rng.uniform(-13, 3, c)).astype("float32")
    s_w[:4] = [2.0**-6, 2.0**-9, 2.0**-3, 1.0]
    s_y = 0.5
    bias = rng.standard_normal(c).astype("float32") * 50
    lo, hi = qmath.qrange(act_dtype)
    xq = rng.integers(lo, hi + 1, (8, k)).astype(act_dtype)
    for relu in (True, False):
        mod = _qdq_matmul_module(act_dtype, z_x, s_y, z_y, w_q, s_w, bias, relu=relu)
        got = _run(LowerInt8(requantize="integer")(mod), xq)
        acc = _accumulators(xq, z_x, w_q, s_w, bias, relu=relu)
        m, shift = qmath.quantize_multiplier(np.float64(S_X) * s_w.astype(np.float64) / s_y)
        ref = qmath.requantize_int(acc, m, shift, z_y, act_dtype, axis=1)
        assert got.dtype == ref.dtype
        np.testing.assert_array_equal(got, ref)


def test_float_requantize_matches_qmath_within_one_step():
    rng = np.random.default_rng(4)
    w_q = rng.integers(-127, 128, (32, 8)).astype("int8")
    s_w = (rng.uniform(0.5, 2, 8) * 0.01).astype("float32")
    bias = rng.standard_normal(8).astype("float32")
    xq = rng.integers(-128, 128, (8, 32)).astype("int8")
    mod = _qdq_matmul_module("int8", 2, 0.3, -10, w_q, s_w, bias)
    got = _run(LowerInt8()(mod), xq).astype(np.int64)
    acc = _accumulators(xq, 2, w_q, s_w, bias)
    ref = qmath.requantize_float(acc, np.float64(S_X) * s_w / 0.3, -10, "int8", axis=1)
    diff = np.abs(got - ref.astype(np.int64))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    # And the same numbers as the QDQ (float) module, up to bias rounding.
    qdq = _run(mod, xq).astype(np.int64)
    assert np.abs(qdq - got).max() <= 1


def test_requantize_int_expr_edge_values():
    """Accumulator extremes, zero, and exact ties, against the gemmlowp reference."""
    acc = np.array(
        [
            -(2**31),
            2**31 - 1,
            0,
            1,
            -1,
            2,
            -2,
            3,
            -3,
            5,
            -5,
            6,
            -6,
            7,
            -7,
            2**20 + 2**19,
            -(2**20) - 2**19,
        ],
        dtype="int32",
    ).reshape(-1, 1)
    acc = np.repeat(acc, 6, axis=1)
    real = np.array([0.5, 0.25, 2.0**-20, 0.7, 1.0, 3.0])
    m, shift = qmath.quantize_multiplier(real)
    bb = relax.BlockBuilder()
    a = relax.Var("acc", relax.TensorType(acc.shape, "int32"))
    with bb.function("main", [a]):
        with bb.dataflow():
            out = requantize_int_expr(bb, a, m, shift, 3, "int8", (6,))
            out = bb.emit_output(out)
        bb.emit_func_output(out)
    got = _run(bb.get(), acc)
    np.testing.assert_array_equal(got, qmath.requantize_int(acc, m, shift, 3, "int8", axis=1))


@pytest.mark.parametrize("cin, groups", [(3, 1), (4, 4)], ids=["dense", "depthwise"])
def test_conv_integer_compute_matches_qdq(cin, groups):
    rng = np.random.default_rng(5)
    w_q = rng.integers(-127, 128, (4, cin // groups, 3, 3)).astype("int8")
    s_w = (rng.uniform(0.5, 2, 4) * 0.01).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, cin, 6, 6), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            xdq = bb.emit(
                relax.op.dequantize(x, relax.const(np.float32(0.05)), relax.const(np.int32(120)))
            )
            wdq = bb.emit(
                relax.op.dequantize(
                    relax.const(w_q), relax.const(s_w), relax.const(np.int32(0)), axis=0
                )
            )
            y = bb.emit(
                relax.op.nn.conv2d(
                    xdq,
                    wdq,
                    strides=[2, 2],
                    padding=[1, 2, 0, 1],
                    groups=groups,
                    out_dtype="float32",
                )
            )
            b = relax.const(rng.standard_normal((1, 4, 1, 1)).astype("float32"))
            y = bb.emit_output(relax.op.add(b, y))
        bb.emit_func_output(y)
    mod = bb.get()
    lowered = LowerInt8()(mod)
    ops = {
        b.value.op.name for b in lowered["main"].body.blocks[0].bindings if hasattr(b.value, "op")
    }
    assert "relax.nn.pad" in ops and "relax.dequantize" in ops
    xq = rng.integers(0, 256, (2, cin, 6, 6)).astype("uint8")
    ref, got = _run(mod, xq), _run(lowered, xq)
    # Equal up to the bias rounded to the accumulator grid (half a step of s_x * s_w).
    np.testing.assert_allclose(got, ref, atol=0.05 * s_w.max() * 0.51 + 1e-5, rtol=1e-5)


def test_accumulator_overflow_stays_float():
    """A bias far off the accumulator grid would overflow int32: the region is left alone."""
    before = _bind(MatmulFloatOut, wq=WQ, s_w=S_W, b=np.array([0.0, 1e8, 0.0], "float32"))
    assert LowerInt8()(before).same_as(before)
