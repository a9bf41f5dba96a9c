"""ShareQuantize: a float tensor read by several quantizes is quantized once; structure,
exact numerics against numpy, and what LowerInt8 makes of it."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from tvmq.core import qmath
from tvmq.passes import LowerInt8, ShareQuantize

HOST = tvm.target.Target({"kind": "llvm"})
S_POOL, S_CAT, Z_CAT = 0.05, 0.08, 100  # the pool reader has the finer scale


def _run(mod, *args):
    ex = tvm.compile(mod, target=HOST)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in args])
    return [o.numpy() for o in out] if isinstance(out, tvm.ir.Array | list | tuple) else out.numpy()


def _ops(mod) -> list[str]:
    return [
        b.value.op.name
        for block in mod["main"].body.blocks
        for b in block.bindings
        if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)
    ]


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((1, 4, 8, 8), "float32")):
        with R.dataflow():
            y = R.nn.relu(x)
            p = R.nn.max_pool2d(y, pool_size=[2, 2], strides=[2, 2])
            q1 = R.quantize(p, R.const(0.05, "float32"), R.const(0, "int32"), out_dtype="uint8")
            q2 = R.quantize(y, R.const(0.08, "float32"), R.const(100, "int32"), out_dtype="uint8")
            R.output(q1, q2)
        return (q1, q2)


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((1, 4, 8, 8), "float32")):
        with R.dataflow():
            y = R.nn.relu(x)
            q0 = R.quantize(y, R.const(0.05, "float32"), R.const(0, "int32"), out_dtype="uint8")
            q1 = R.nn.max_pool2d(q0, pool_size=[2, 2], strides=[2, 2])
            d = R.dequantize(q0, R.const(0.05, "float32"), R.const(0, "int32"), out_dtype="float32")
            q2 = R.quantize(d, R.const(0.08, "float32"), R.const(100, "int32"), out_dtype="uint8")
            R.output(q1, q2)
        return (q1, q2)


def test_before_expected_and_idempotent():
    after = ShareQuantize()(Before)
    tvm.ir.assert_structural_equal(after, Expected)
    tvm.ir.assert_structural_equal(ShareQuantize()(after), after)


def _two_reader_module(s1, z1, t1, s2, z2, t2, moves=("pool",)):
    """relu(x - 0.5) read by [moves ->] quantize(s1, z1, t1) and by quantize(s2, z2, t2)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 3, 6, 6), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.subtract(x, relax.const(np.float32(0.5)))))
            p = y
            for m in moves:
                if m == "pool":
                    p = bb.emit(relax.op.nn.max_pool2d(p, [3, 3], [2, 2], [1, 1, 1, 1]))
                else:
                    p = bb.emit(relax.op.reshape(p, (2, -1)))
            q1 = bb.emit_output(_q(p, s1, z1, t1))
            q2 = bb.emit_output(_q(y, s2, z2, t2))
        bb.emit_func_output(relax.Tuple([q1, q2]))
    return bb.get()


def _q(y, s, z, dtype):
    return relax.op.quantize(
        y, relax.const(np.float32(s)), relax.const(np.int32(z)), out_dtype=dtype
    )


def _max_pool(q):
    """3x3 / stride 2 / pad 1 max pool of an NCHW array (padding never wins)."""
    lo = np.iinfo(q.dtype).min
    padded = np.pad(q, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=lo)
    h, w = (q.shape[2] + 2 - 3) // 2 + 1, (q.shape[3] + 2 - 3) // 2 + 1
    windows = [
        padded[:, :, i : i + 2 * h : 2, j : j + 2 * w : 2] for i in range(3) for j in range(3)
    ]
    return np.max(windows, axis=0)


# (scale, zero point, dtype) of the pool reader and the direct reader; both ranges hold
# relu(x - 0.5) in [0, 13.5], as calibration on a tensor holding it gives.
POOL_FINER = ((0.055, 0, "uint8"), (0.08, -100, "int8"))
DIRECT_FINER = ((0.06, 3, "uint8"), (0.055, -128, "int8"))


@pytest.mark.parametrize("params", [POOL_FINER, DIRECT_FINER], ids=["pool-finer", "direct-finer"])
def test_shared_qdq_matches_numpy_exactly(params):
    (s1, z1, t1), (s2, z2, t2) = params
    mod = _two_reader_module(s1, z1, t1, s2, z2, t2)
    shared = ShareQuantize()(mod)
    assert _ops(shared).count("relax.quantize") == 2  # the primary + one requantize
    x = np.random.default_rng(0).uniform(-4, 14, (2, 3, 6, 6)).astype("float32")
    y = np.maximum(x - np.float32(0.5), 0)
    (q1, q2), (old1, old2) = _run(shared, x), _run(mod, x)
    # The finer parameters quantize y once; the pool on the integers is exact and the
    # other reader is requantized from the primary integers (rounded twice).
    pool_finer = params is POOL_FINER
    s0, z0, t0 = params[0] if pool_finer else params[1]
    q0 = qmath.quantize(y, s0, z0, t0)
    if pool_finer:
        ref1 = _max_pool(q0)
        ref2 = qmath.quantize(qmath.dequantize(q0, s0, z0), s2, z2, t2)
    else:
        ref1 = qmath.quantize(qmath.dequantize(_max_pool(q0), s0, z0), s1, z1, t1)
        ref2 = q0
    np.testing.assert_array_equal(q1, ref1)
    np.testing.assert_array_equal(q2, ref2)
    exact, rounded_twice = ((q1, old1), (q2, old2)) if pool_finer else ((q2, old2), (q1, old1))
    np.testing.assert_array_equal(*exact)
    assert np.abs(rounded_twice[0].astype(int) - rounded_twice[1]).max() <= 1


def test_moves_through_a_chain_of_passthrough_ops():
    mod = _two_reader_module(S_POOL, 0, "uint8", S_POOL, 0, "uint8", moves=("pool", "reshape"))
    shared = ShareQuantize()(mod)
    # Equal parameters: one quantize, the pool and reshape on the integers, no requantize.
    assert _ops(shared) == [
        "relax.subtract", "relax.nn.relu", "relax.quantize", "relax.nn.max_pool2d", "relax.reshape"
    ]  # fmt: skip
    x = np.random.default_rng(1).uniform(-4, 14, (2, 3, 6, 6)).astype("float32")
    for got, ref in zip(_run(shared, x), _run(mod, x), strict=True):
        np.testing.assert_array_equal(got, ref)


W_Q = np.random.default_rng(2).integers(-127, 128, (4, 3, 1, 1)).astype("int8")
S_W = np.array([0.01, 0.02, 0.005, 0.015], "float32")
BIAS = np.array([0.3, -0.2, 0.1, 0.0], "float32")
S_X, Z_X = 0.05, 120


def _conv_module():
    """dequantize(x_q) -> 1x1 conv + bias -> relu, read by pool -> quantize and by quantize."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 6, 6), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            xdq = bb.emit(
                relax.op.dequantize(x, relax.const(np.float32(S_X)), relax.const(np.int32(Z_X)))
            )
            wdq = bb.emit(
                relax.op.dequantize(
                    relax.const(W_Q), relax.const(S_W), relax.const(np.int32(0)), axis=0
                )
            )
            y = bb.emit(relax.op.nn.conv2d(xdq, wdq, out_dtype="float32"))
            y = bb.emit(relax.op.add(y, relax.const(BIAS.reshape(1, 4, 1, 1))))
            y = bb.emit(relax.op.nn.relu(y))
            p = bb.emit(relax.op.nn.max_pool2d(y, [3, 3], [2, 2], [1, 1, 1, 1]))
            q1 = bb.emit_output(_q(p, S_POOL, 0, "uint8"))
            q2 = bb.emit_output(_q(y, S_CAT, Z_CAT, "uint8"))
        bb.emit_func_output(relax.Tuple([q1, q2]))
    return bb.get()


def test_conv_region_requantizes_once_and_pools_integers():
    mod = _conv_module()
    before = LowerInt8(requantize="integer")(mod)
    assert "relax.dequantize" in _ops(before)  # the conv stores float: two readers
    lowered = LowerInt8(requantize="integer")(ShareQuantize()(mod))
    ops = _ops(lowered)
    assert "relax.dequantize" not in ops and "relax.quantize" not in ops
    pool = next(
        b.value for b in lowered["main"].body.blocks[0].bindings
        if isinstance(b.value, relax.Call) and b.value.op.name == "relax.nn.max_pool2d"
    )  # fmt: skip
    assert str(pool.args[0].ty.dtype) == "uint8"
    xq = np.random.default_rng(3).integers(0, 256, (1, 3, 6, 6)).astype("uint8")
    q1, q2 = _run(lowered, xq)
    # numpy: the int32 accumulator, requantized (fixed point) to the pool reader's
    # parameters, pooled; the concat reader requantized from those.
    acc = np.einsum("oc,nchw->nohw", W_Q[:, :, 0, 0].astype(np.int64), xq.astype(np.int64) - Z_X)
    acc_scale = np.float64(S_X) * S_W.astype(np.float64)
    acc = np.maximum(acc + np.rint(BIAS / acc_scale).astype(np.int64).reshape(1, 4, 1, 1), 0)
    m, sh = qmath.quantize_multiplier(acc_scale / S_POOL)
    q0 = qmath.requantize_int(acc, m, sh, 0, "uint8", axis=1)
    np.testing.assert_array_equal(q1, _max_pool(q0))
    m, sh = qmath.quantize_multiplier(np.float64(S_POOL) / S_CAT)
    np.testing.assert_array_equal(
        q2, qmath.requantize_int(q0.astype(np.int64), m, sh, Z_CAT, "uint8")
    )


@I.ir_module
class FloatReader:
    @R.function
    def main(x: R.Tensor((4, 8), "float32")):
        with R.dataflow():
            y = R.nn.relu(x)
            q1 = R.quantize(y, R.const(0.05, "float32"), R.const(0, "int32"), out_dtype="uint8")
            z = R.exp(y)
            R.output(q1, z)
        return (q1, z)


@I.ir_module
class OneReader:
    @R.function
    def main(x: R.Tensor((1, 2, 4, 4), "float32")):
        with R.dataflow():
            y = R.nn.relu(x)
            p = R.nn.max_pool2d(y, pool_size=[2, 2], strides=[2, 2])
            q1 = R.quantize(p, R.const(0.05, "float32"), R.const(0, "int32"), out_dtype="uint8")
            R.output(q1)
        return q1


@I.ir_module
class PerChannelReader:
    @R.function
    def main(x: R.Tensor((4, 2), "float32")):
        with R.dataflow():
            y = R.nn.relu(x)
            q1 = R.quantize(y, R.const(0.05, "float32"), R.const(0, "int32"), out_dtype="uint8")
            q2 = R.quantize(
                y, R.const([0.1, 0.2], "float32"), R.const(0, "int32"), axis=1, out_dtype="int8"
            )
            R.output(q1, q2)
        return (q1, q2)


@pytest.mark.parametrize("mod", [FloatReader, OneReader, PerChannelReader])
def test_nothing_to_share_leaves_module_unchanged(mod):
    assert ShareQuantize()(mod).same_as(mod)
