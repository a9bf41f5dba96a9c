"""LowerInt8: QDQ regions -> int8 x int8 -> int32 compute; structure, idempotence, numerics."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from tvmq.core import qmath
from tvmq.passes import FLOAT_OPS_ATTR, LowerInt8
from tvmq.passes.relax_utils import op_name, ordered_bindings
from tvmq.passes.requantize_int import requantize_int_expr

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
class PerChannelActMatmulQDQ:
    """A matmul of two activations, one with per-channel parameters: not lowerable."""

    @R.function
    def main(x: R.Tensor((2, 4), "int8"), w: R.Tensor((4, 3), "int8")):
        with R.dataflow():
            xdq = R.dequantize(x, R.const(0.5, "float32"), R.const(0, "int32"), out_dtype="float32")
            wdq = R.dequantize(
                w, R.const(np.array([0.1, 0.2, 0.3], "float32")), R.const(0, "int32"), axis=1
            )
            y = R.matmul(xdq, wdq, out_dtype="float32")
            R.output(y)
        return y


@pytest.mark.parametrize("mod", [FloatModel, PerChannelActMatmulQDQ])
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
    w2 = np.ones((3, 3), "float32")
    after = LowerInt8()(_bind(Mixed, wq=WQ, s_w=S_W, w2=w2))
    assert list(after["main"].attrs[FLOAT_OPS_ATTR]) == ["matmul:z"]
    # With the weight an input, the float matmul is an activation matmul.
    after = LowerInt8()(_bind(Mixed, wq=WQ, s_w=S_W))
    assert list(after["main"].attrs[FLOAT_OPS_ATTR]) == ["matmul_act:z"]


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


# -- weightless ops: integer add, concat, requantize; relu6 / clip; 3-D matmul ---------------

A_Q, B_Q = (0.05, 3, "int8"), (0.02, 130, "uint8")  # (scale, zero point, dtype) of operands


def _dq(bb, x, s, z):
    return bb.emit(relax.op.dequantize(x, relax.const(np.float32(s)), relax.const(np.int32(z))))


def _q(y, s, z, dtype):
    return relax.op.quantize(
        y, relax.const(np.float32(s)), relax.const(np.int32(z)), out_dtype=dtype
    )


def _add_module(out_q, clip=None, shape=(4, 33)):
    """dequantize(a), dequantize(b) -> add -> [clip] -> quantize."""
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType(shape, A_Q[2]))
    b = relax.Var("b", relax.TensorType(shape, B_Q[2]))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            y = bb.emit(relax.op.add(_dq(bb, a, *A_Q[:2]), _dq(bb, b, *B_Q[:2])))
            if clip is not None:
                y = bb.emit(relax.op.clip(y, *clip))
            q = bb.emit_output(_q(y, *out_q))
        bb.emit_func_output(q)
    return bb.get()


def _add_inputs(shape=(4, 33), seed=7):
    rng = np.random.default_rng(seed)
    return (
        rng.integers(-128, 128, shape).astype("int8"),
        rng.integers(0, 256, shape).astype("uint8"),
    )


def _ops(mod) -> list[str]:
    return [op_name(b.value) for b in ordered_bindings(mod["main"]) if op_name(b.value)]


def _tflite_add(a, b, out_q):
    """TFLite ADD in numpy, from qmath's gemmlowp helpers (int32 intermediates unclamped)."""
    (s_a, z_a, _), (s_b, z_b, _), (s_y, z_y, dtype) = A_Q, B_Q, out_q
    s_a, s_b, s_y = (float(np.float32(s)) for s in (s_a, s_b, s_y))  # as stored in the IR
    twice_max = 2.0 * max(s_a, s_b)
    terms = []
    for x, s, z in ((a, s_a, z_a), (b, s_b, z_b)):
        m, sh = qmath.quantize_multiplier(s / twice_max)
        shifted = (x.astype(np.int64) - z) << 20
        terms.append(qmath.requantize_int(shifted, m, sh, 0, "int32").astype(np.int64))
    m, sh = qmath.quantize_multiplier(twice_max / (2.0**20 * s_y))
    return qmath.requantize_int(terms[0] + terms[1], m, sh, z_y, dtype)


@pytest.mark.parametrize("out_q", [(0.06, -5, "int8"), (0.04, 100, "uint8")])
def test_integer_add_within_one_lsb_of_float_reference(out_q):
    a, b = _add_inputs()
    mod = _add_module(out_q)
    s_y, z_y, dtype = out_q
    real = np.float32(A_Q[0]) * (a.astype(np.float64) - A_Q[1]) + np.float32(B_Q[0]) * (
        b.astype(np.float64) - B_Q[1]
    )
    ref = qmath.quantize(real, np.float32(s_y), z_y, dtype).astype(np.int64)
    for mode in ("float", "integer"):
        lowered = LowerInt8(requantize=mode)(mod)
        ops = _ops(lowered)
        assert "relax.dequantize" not in ops and "relax.add" in ops
        got = _run(lowered, a, b)
        assert got.dtype == dtype
        diff = np.abs(got.astype(np.int64) - ref)
        # Within 1 LSB; off-by-one only near ties (these round scales make many exact ties).
        assert diff.max() <= 1 and (diff == 0).mean() > 0.9, (mode, diff.max())
        if mode == "integer":
            assert not any(str(b.value.ty.dtype).startswith("float") for b in _bindings(lowered))
            np.testing.assert_array_equal(got, _tflite_add(a, b, out_q))


def _bindings(mod):
    return [b for block in mod["main"].body.blocks for b in block.bindings]


@pytest.mark.parametrize("mode", ["float", "integer"])
@pytest.mark.parametrize("clip", [(0, 6), (-1, 2)], ids=["relu6", "clip"])
def test_add_clip_is_an_exact_integer_clamp(mode, clip):
    """clip(y, lo, hi) then quantize == clamp of the quantized y to z + round([lo, hi] / s)."""
    out_q = (0.03, -10, "int8")
    a, b = _add_inputs()
    plain = _run(LowerInt8(requantize=mode)(_add_module(out_q)), a, b)
    lowered = LowerInt8(requantize=mode)(_add_module(out_q, clip))
    assert "relax.dequantize" not in _ops(lowered)
    lo, hi = (out_q[1] + round(v / out_q[0]) for v in clip)
    np.testing.assert_array_equal(_run(lowered, a, b), np.clip(plain, max(lo, -128), hi))


def _matmul_clip_module(clip, x_shape=(8, 32), w_q=None, relu=False):
    rng = np.random.default_rng(11)
    k = x_shape[-1]
    w_q = rng.integers(-127, 128, (k, 6)).astype("int8") if w_q is None else w_q
    s_w = (rng.uniform(0.5, 2, 6) * 0.01).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            wdq = bb.emit(
                relax.op.dequantize(
                    relax.const(w_q), relax.const(s_w), relax.const(np.int32(0)), axis=1
                )
            )
            y = bb.emit(relax.op.matmul(_dq(bb, x, 0.1, 2), wdq, out_dtype="float32"))
            if relu:
                y = bb.emit(relax.op.nn.relu(y))
            if clip is not None:
                y = bb.emit(relax.op.clip(y, *clip))
            q = bb.emit_output(_q(y, 0.03, -100, "int8"))
        bb.emit_func_output(q)
    return bb.get()


@pytest.mark.parametrize("mode", ["float", "integer"])
def test_matmul_relu6_clamps_requantized_integers(mode):
    x = np.random.default_rng(12).integers(-128, 128, (8, 32)).astype("int8")
    plain = _run(LowerInt8(requantize=mode)(_matmul_clip_module(None)), x)
    lowered = LowerInt8(requantize=mode)(_matmul_clip_module((0, 6)))
    ops = _ops(lowered)
    assert "relax.dequantize" not in ops and ops.count("relax.matmul") == 1
    hi = -100 + round(6 / 0.03)
    expected = np.clip(plain, -100, hi)
    assert (expected == hi).any() and (expected == -100).any()  # both bounds bite
    np.testing.assert_array_equal(_run(lowered, x), expected)
    # Same numbers as the float QDQ module, up to the float accumulation's rounding.
    qdq = _run(_matmul_clip_module((0, 6)), x).astype(np.int64)
    assert np.abs(qdq - _run(lowered, x)).max() <= 1


def test_clip_without_quantize_stays_float():
    """No quantize after the clip: the region ends at the accumulator, the clip stays float."""
    mod = _matmul_clip_module((0, 6))
    func = mod["main"]
    body = func.body
    # Return the clip's float result instead of its quantize.
    clip_var = body.blocks[0].bindings[-2].var
    blocks = [relax.DataflowBlock(list(body.blocks[0].bindings[:-1]))]
    out = relax.Var("out", clip_var.ty)
    blocks[0] = relax.DataflowBlock([*blocks[0].bindings, relax.VarBinding(out, clip_var)])
    mod = tvm.IRModule(
        {"main": relax.Function(func.params, relax.SeqExpr(blocks, out), clip_var.ty)}
    )
    lowered = LowerInt8()(mod)
    ops = _ops(lowered)
    assert ops.count("relax.clip") == 1 and "relax.dequantize" in ops
    clip = [b.value for b in _bindings(lowered) if _ops_of(b) == "relax.clip"][0]
    assert str(clip.ty.dtype) == "float32"


@pytest.mark.parametrize("mode", ["float", "integer"])
def test_3d_activation_matmul_runs_as_2d_int8_matmul(mode):
    mod = _matmul_clip_module(None, x_shape=(2, 5, 32))
    lowered = LowerInt8(requantize=mode)(mod)
    matmuls = [b.value for b in _bindings(lowered) if _ops_of(b) == "relax.matmul"]
    assert len(matmuls) == 1
    mm = matmuls[0]
    assert [int(d) for d in mm.args[0].ty.shape] == [10, 32]
    assert (str(mm.args[0].ty.dtype), str(mm.args[1].ty.dtype), str(mm.ty.dtype)) == (
        "int8",
        "int8",
        "int32",
    )
    x = np.random.default_rng(13).integers(-128, 128, (2, 5, 32)).astype("int8")
    got = _run(lowered, x)
    assert got.shape == (2, 5, 6)
    assert np.abs(got.astype(np.int64) - _run(mod, x)).max() <= 1


def _ops_of(binding):
    v = binding.value
    return v.op.name if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) else None


def _concat_module(params, out_q):
    bb = relax.BlockBuilder()
    xs = [relax.Var(f"x{i}", relax.TensorType((2, 3, 4), p[2])) for i, p in enumerate(params)]
    with bb.function("main", xs):
        with bb.dataflow():
            dqs = [_dq(bb, x, s, z) for x, (s, z, _) in zip(xs, params, strict=True)]
            y = bb.emit(relax.op.concat(dqs, axis=1))
            q = bb.emit_output(_q(y, *out_q))
        bb.emit_func_output(q)
    return bb.get()


def _concat_inputs(params, seed=14):
    rng = np.random.default_rng(seed)
    return [
        rng.integers(*qmath.qrange(d), size=(2, 3, 4), endpoint=True).astype(d)
        for _, _, d in params
    ]


def test_concat_with_shared_params_is_an_exact_integer_concat():
    p = (0.1, -3, "int8")
    mod = _concat_module([p, p], p)
    lowered = LowerInt8()(mod)
    assert _ops(lowered) == ["relax.concat"]
    xs = _concat_inputs([p, p])
    np.testing.assert_array_equal(_run(lowered, *xs), np.concatenate(xs, axis=1))


@pytest.mark.parametrize("mode", ["float", "integer"])
def test_concat_requantizes_inputs_with_other_params(mode):
    params = [(0.08, 0, "int8"), (0.05, 120, "uint8")]
    out_q = (0.08, 0, "int8")
    mod = _concat_module(params, out_q)
    lowered = LowerInt8(requantize=mode)(mod)
    ops = _ops(lowered)
    assert "relax.dequantize" not in ops and ops[-1] == "relax.concat"
    xs = _concat_inputs(params)
    got = _run(lowered, *xs)
    np.testing.assert_array_equal(got[:, :3], xs[0])  # same scale, zero point and dtype
    assert np.abs(got.astype(np.int64) - _run(mod, *xs)).max() <= 1


@pytest.mark.parametrize("mode", ["float", "integer"])
def test_standalone_requantize_is_integer(mode):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((64,), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            q = bb.emit_output(_q(_dq(bb, x, 0.1, 5), 0.07, -2, "uint8"))
        bb.emit_func_output(q)
    mod = bb.get()
    lowered = LowerInt8(requantize=mode)(mod)
    assert "relax.dequantize" not in _ops(lowered)
    xs = np.arange(-128, 128, 4).astype("int8")
    assert np.abs(_run(lowered, xs).astype(np.int64) - _run(mod, xs)).max() <= 1


@I.ir_module
class FloatAddConcat:
    @R.function
    def main(a: R.Tensor((2, 4), "float32"), b: R.Tensor((2, 4), "float32")):
        with R.dataflow():
            y = R.add(a, b)
            c = R.concat((y, a), axis=1)
            R.output(c)
        return c


@I.ir_module
class AddWithoutQuantize:
    """Dequantized operands but a float consumer: nothing to gain, left alone."""

    @R.function
    def main(a: R.Tensor((2, 4), "int8"), b: R.Tensor((2, 4), "int8")):
        with R.dataflow():
            da = R.dequantize(a, R.const(0.5, "float32"), R.const(0, "int32"), out_dtype="float32")
            db = R.dequantize(b, R.const(0.5, "float32"), R.const(0, "int32"), out_dtype="float32")
            y = R.add(da, db)
            R.output(y)
        return y


@pytest.mark.parametrize("mod", [FloatAddConcat, AddWithoutQuantize])
def test_weightless_ops_with_nothing_to_lower_are_unchanged(mod):
    assert LowerInt8()(mod).same_as(mod)


@pytest.mark.parametrize("mode", ["float", "integer"])
@pytest.mark.parametrize(
    "build",
    [
        lambda: _add_module((0.06, -5, "int8"), clip=(0, 6)),
        lambda: _concat_module([(0.1, -3, "int8"), (0.05, 120, "uint8")], (0.08, 0, "int8")),
        lambda: _matmul_clip_module((0, 6), x_shape=(2, 5, 32)),
    ],
    ids=["add", "concat", "matmul3d"],
)
def test_weightless_lowering_is_idempotent(mode, build):
    once = LowerInt8(requantize=mode)(build())
    assert LowerInt8(requantize=mode)(once).same_as(once)


# -- activation x activation matmuls (attention) -------------------------------------------------


@I.ir_module
class ActMatmulQDQ:
    """``P @ V`` style: uint8 x int8 with nonzero zero points, heads merged, then quantized."""

    @R.function
    def main(a: R.Tensor((1, 2, 3, 4), "uint8"), b: R.Tensor((1, 2, 4, 5), "int8")) -> R.Tensor(
        (1, 3, 10), "int8"
    ):
        with R.dataflow():
            adq = R.dequantize(a, R.const(0.5, "float32"), R.const(3, "int32"))
            bdq = R.dequantize(b, R.const(0.25, "float32"), R.const(-5, "int32"))
            y = R.matmul(adq, bdq, out_dtype="float32")
            t = R.permute_dims(y, axes=[0, 2, 1, 3])
            r = R.reshape(t, R.shape([1, 3, 10]))
            q = R.quantize(r, R.const(0.125, "float32"), R.const(1, "int32"), out_dtype="int8")
            R.output(q)
        return q


@I.ir_module
class ActMatmulInt:
    @R.function
    def main(a: R.Tensor((1, 2, 3, 4), "uint8"), b: R.Tensor((1, 2, 4, 5), "int8")) -> R.Tensor(
        (1, 3, 10), "int8"
    ):
        with R.dataflow():
            acc = R.matmul(a, b, out_dtype="int32")
            a32 = R.astype(a, "int32")
            rowsum = R.sum(a32, axis=[3], keepdims=True)
            term_b = R.multiply(rowsum, R.const(-5, "int32"))
            acc1 = R.subtract(acc, term_b)
            b32 = R.astype(b, "int32")
            colsum = R.sum(b32, axis=[2], keepdims=True)
            term_a = R.multiply(colsum, R.const(3, "int32"))
            acc2 = R.subtract(acc1, term_a)
            acc3 = R.add(acc2, R.const(4 * 3 * -5, "int32"))
            accf = R.astype(acc3, "float32")
            scaled = R.multiply(accf, R.const(0.5 * 0.25 / 0.125, "float32"))
            yq = R.quantize(scaled, R.const(1.0, "float32"), R.const(1, "int32"), out_dtype="int8")
            t = R.permute_dims(yq, axes=[0, 2, 1, 3])
            q = R.reshape(t, R.shape([1, 3, 10]))
            R.output(q)
        return q


def test_activation_matmul_before_expected():
    after = LowerInt8()(ActMatmulQDQ)
    tvm.ir.assert_structural_equal(after, ActMatmulInt)
    assert FLOAT_OPS_ATTR not in (after["main"].attrs or {})


@I.ir_module
class ActMatmulZeroZpQDQ:
    """Symmetric operands (zero points 0): no correction terms; float consumer: dequantize."""

    @R.function
    def main(x: R.Tensor((2, 4), "int8"), w: R.Tensor((4, 3), "int8")):
        with R.dataflow():
            xdq = R.dequantize(x, R.const(0.5, "float32"), R.const(0, "int32"), out_dtype="float32")
            wdq = R.dequantize(w, R.const(0.1, "float32"), R.const(0, "int32"), out_dtype="float32")
            y = R.matmul(xdq, wdq, out_dtype="float32")
            R.output(y)
        return y


@I.ir_module
class ActMatmulZeroZpInt:
    @R.function
    def main(x: R.Tensor((2, 4), "int8"), w: R.Tensor((4, 3), "int8")):
        with R.dataflow():
            acc = R.matmul(x, w, out_dtype="int32")
            y = R.dequantize(acc, R.const(0.5 * 0.1, "float32"), R.const(0, "int32"))
            R.output(y)
        return y


def test_activation_matmul_with_zero_zero_points_and_float_output():
    tvm.ir.assert_structural_equal(LowerInt8()(ActMatmulZeroZpQDQ), ActMatmulZeroZpInt)


@pytest.mark.parametrize("requantize", ["float", "integer"])
def test_activation_matmul_lowering_is_idempotent(requantize):
    once = LowerInt8(requantize=requantize)(ActMatmulQDQ)
    assert LowerInt8(requantize=requantize)(once).same_as(once)


def test_float_activation_matmul_is_reported_as_matmul_act():
    from tvmq.passes.analysis import float_compute_ops

    @I.ir_module
    class Attention:
        @R.function
        def main(q: R.Tensor((2, 3, 4), "float32"), k: R.Tensor((2, 4, 3), "float32")):
            with R.dataflow():
                s = R.matmul(q, k, out_dtype="float32")
                y = R.matmul(s, R.const(np.ones((3, 2), "float32")), out_dtype="float32")
                R.output(y)
            return y

    assert float_compute_ops(Attention["main"]) == ["matmul_act:s", "matmul:y"]


def _attention_module(heads=2, seq=8, d=16):
    """``softmax(q @ permute_dims(k) / sqrt(d)) @ v``, heads merged: (1, seq, heads * d)."""
    bb = relax.BlockBuilder()
    ty = relax.TensorType((1, heads, seq, d), "float32")
    q, k, v = (relax.Var(n, ty) for n in "qkv")
    with bb.function("main", [q, k, v]):
        with bb.dataflow():
            kt = bb.emit(relax.op.permute_dims(k, [0, 1, 3, 2]))
            s = bb.emit(relax.op.matmul(q, kt, out_dtype="float32"))
            s = bb.emit(relax.op.multiply(s, relax.const(np.float32(d**-0.5))))
            p = bb.emit(relax.op.nn.softmax(s, axis=-1))
            o = bb.emit(relax.op.matmul(p, v, out_dtype="float32"))
            o = bb.emit(relax.op.permute_dims(o, [0, 2, 1, 3]))
            o = bb.emit_output(relax.op.reshape(o, (1, seq, heads * d)))
        bb.emit_func_output(o)
    return bb.get()


def _attention_reference(q, k, v):
    s = q.astype(np.float64) @ k.astype(np.float64).transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = p @ v
    return o, p


@pytest.mark.parametrize(
    "act_dtype, symmetric, requantize",
    [("int8", False, "float"), ("uint8", False, "integer"), ("int8", True, "float")],
)
def test_attention_matmuls_match_float_reference(act_dtype, symmetric, requantize):
    """Random (non-constant) 4-D q, k, v with offsets, so both operands of both matmuls
    have nonzero zero points (asymmetric); the integer result equals the QDQ model's."""
    from tvmq.passes import AnnotateQDQ, FoldQuantScales
    from tvmq.passes.analysis import float_compute_ops

    rng = np.random.default_rng(21)
    shape = (1, 2, 8, 16)
    q, k, v = ((rng.standard_normal(shape) + off).astype("float32") for off in (0.7, -0.4, 0.3))
    o_ref, p = _attention_reference(q, k, v)
    observed = {
        "matmul_act_0:0": q,
        "matmul_act_0:1": k.transpose(0, 1, 3, 2),
        "matmul_act_1:0": p,
        "matmul_act_1:1": v,
    }
    qparams = {}
    for name, x in observed.items():
        scale, zp = qmath.choose_qparams(x.min(), x.max(), act_dtype, symmetric)
        qparams[name] = (float(scale), int(zp))
    if not symmetric:
        assert all(zp != 0 for name, (_, zp) in qparams.items() if name != "matmul_act_1:0")
    qdq = AnnotateQDQ(qparams, activation_dtype=act_dtype)(_attention_module())
    lowered = LowerInt8(requantize=requantize)(FoldQuantScales()(qdq))
    assert float_compute_ops(lowered["main"]) == []
    got = _run(lowered, q, k, v)
    ref = o_ref.transpose(0, 2, 1, 3).reshape(1, 8, 32)
    # P in [0, 1]: asymmetric keeps all 8 bits (scale 1/255); symmetric int8 loses one.
    assert qmath.sqnr(ref, got) > (30.0 if symmetric else 35.0)
    np.testing.assert_allclose(got, _run(qdq, q, k, v), atol=1e-5)


def test_mixed_sign_activation_matmul_builds_and_is_exact():
    """uint8 x int8 and int8 x uint8 batched matmuls (broadcast batch) build for the host."""
    rng = np.random.default_rng(22)
    for a_dtype, b_dtype in (("uint8", "int8"), ("int8", "uint8")):
        bb = relax.BlockBuilder()
        a = relax.Var("a", relax.TensorType((2, 3, 5, 7), a_dtype))
        b = relax.Var("b", relax.TensorType((3, 7, 4), b_dtype))
        with bb.function("main", [a, b]):
            with bb.dataflow():
                z_a, z_b = (9 if a_dtype == "uint8" else -4), (130 if b_dtype == "uint8" else 6)
                adq = bb.emit(
                    relax.op.dequantize(a, relax.const(np.float32(0.5)), relax.const(np.int32(z_a)))
                )
                bdq = bb.emit(
                    relax.op.dequantize(
                        b, relax.const(np.float32(0.25)), relax.const(np.int32(z_b))
                    )
                )
                y = bb.emit_output(relax.op.matmul(adq, bdq, out_dtype="float32"))
            bb.emit_func_output(y)
        lowered = LowerInt8()(bb.get())
        xa = rng.integers(*qmath.qrange(a_dtype), (2, 3, 5, 7), endpoint=True).astype(a_dtype)
        xb = rng.integers(*qmath.qrange(b_dtype), (3, 7, 4), endpoint=True).astype(b_dtype)
        ref = (xa.astype(np.int64) - z_a) @ (xb.astype(np.int64) - z_b) * 0.125
        np.testing.assert_array_equal(_run(lowered, xa, xb), ref.astype("float32"))


@pytest.mark.parametrize("method", ["nearest_neighbor", "linear"])
def test_nearest_resize_moves_after_requantize(method):
    """A nearest upsample is a gather, so it runs on the requantized integers; a linear
    one interpolates and stays float."""
    rng = np.random.default_rng(9)
    w_q = rng.integers(-127, 128, (4, 3, 1, 1)).astype("int8")
    s_w = (rng.uniform(0.5, 2, 4) * 0.01).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 5, 5), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            xdq = _dq(bb, x, 0.05, 120)
            wdq = bb.emit(
                relax.op.dequantize(
                    relax.const(w_q), relax.const(s_w), relax.const(np.int32(0)), axis=0
                )
            )
            y = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(xdq, wdq, out_dtype="float32")))
            up = bb.emit(relax.op.image.resize2d(y, (10, 10), method=method))
            q = bb.emit_output(_q(up, 0.02, 0, "uint8"))
        bb.emit_func_output(q)
    mod = bb.get()
    lowered = LowerInt8()(mod)
    ops = _ops(lowered)
    if method == "linear":
        assert "relax.dequantize" in ops
        return
    assert ops[-2:] == ["relax.quantize", "relax.image.resize2d"]
    assert "relax.dequantize" not in ops
    xq = rng.integers(0, 256, (1, 3, 5, 5)).astype("uint8")
    got, ref = _run(lowered, xq), _run(mod, xq)
    assert np.abs(got.astype(int) - ref).max() <= 1
