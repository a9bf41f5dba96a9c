"""ShareQuantize: a conv result read by several quantizes is quantized once; structure,
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
from tvmq.passes.relax_utils import op_name, ordered_bindings

HOST = tvm.target.Target({"kind": "llvm"})
# The producer: relu(conv2d(dequantize(x_q), dequantize(W_Q))), one input channel and a 1x1
# kernel, so each output is one float32 product and numpy computes it bit for bit.
S_X, Z_X = 0.06, 30  # x in [-1.8, 13.5]
W_Q = np.array([127, -90, 64], "int8").reshape(3, 1, 1, 1)
S_W = np.full(3, 1 / 127, "float32")  # |w| <= 1: relu(x w) in [0, 13.5]
X_SHAPE = (2, 1, 6, 6)


def _run(mod, *args):
    ex = tvm.compile(mod, target=HOST)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in args])
    return [o.numpy() for o in out] if isinstance(out, tvm.ir.Array | list | tuple) else out.numpy()


def _ops(mod) -> list[str]:
    return [op_name(b.value) for b in ordered_bindings(mod["main"]) if op_name(b.value)]


def _bind(mod):
    return relax.transform.BindParams("main", {"w": W_Q, "s_w": S_W})(mod)


@I.ir_module
class Before:
    @R.function
    def main(
        x: R.Tensor((2, 1, 6, 6), "uint8"),
        w: R.Tensor((3, 1, 1, 1), "int8"),
        s_w: R.Tensor((3,), "float32"),
    ):
        with R.dataflow():
            xd = R.dequantize(x, R.const(0.06, "float32"), R.const(30, "int32"))
            wd = R.dequantize(w, s_w, R.const(0, "int32"), axis=0)
            y = R.nn.relu(R.nn.conv2d(xd, wd))
            p = R.nn.max_pool2d(y, pool_size=[2, 2], strides=[2, 2])
            q1 = R.quantize(p, R.const(0.05, "float32"), R.const(0, "int32"), out_dtype="uint8")
            q2 = R.quantize(y, R.const(0.08, "float32"), R.const(100, "int32"), out_dtype="uint8")
            R.output(q1, q2)
        return (q1, q2)


@I.ir_module
class Expected:
    @R.function
    def main(
        x: R.Tensor((2, 1, 6, 6), "uint8"),
        w: R.Tensor((3, 1, 1, 1), "int8"),
        s_w: R.Tensor((3,), "float32"),
    ):
        with R.dataflow():
            xd = R.dequantize(x, R.const(0.06, "float32"), R.const(30, "int32"))
            wd = R.dequantize(w, s_w, R.const(0, "int32"), axis=0)
            y = R.nn.relu(R.nn.conv2d(xd, wd))
            q0 = R.quantize(y, R.const(0.05, "float32"), R.const(0, "int32"), out_dtype="uint8")
            q1 = R.nn.max_pool2d(q0, pool_size=[2, 2], strides=[2, 2])
            d = R.dequantize(q0, R.const(0.05, "float32"), R.const(0, "int32"))
            q2 = R.quantize(d, R.const(0.08, "float32"), R.const(100, "int32"), out_dtype="uint8")
            R.output(q1, q2)
        return (q1, q2)


def test_before_expected_and_idempotent():
    after = ShareQuantize()(_bind(Before))
    tvm.ir.assert_structural_equal(after, _bind(Expected))
    tvm.ir.assert_structural_equal(ShareQuantize()(after), after)


def _q(y, s, z, dtype):
    return relax.op.quantize(
        y, relax.const(np.float32(s)), relax.const(np.int32(z)), out_dtype=dtype
    )


def _producer(bb, x, conv: bool = True):
    """The conv region's float result; with ``conv=False`` a float op, not a region."""
    if not conv:
        return bb.emit(relax.op.nn.relu(relax.op.subtract(x, relax.const(np.float32(0.5)))))
    xdq = bb.emit(relax.op.dequantize(x, relax.const(np.float32(S_X)), relax.const(np.int32(Z_X))))
    w = relax.op.dequantize(relax.const(W_Q), relax.const(S_W), relax.const(np.int32(0)), axis=0)
    return bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(xdq, bb.emit(w))))


def _module(readers, conv: bool = True):
    """The producer read by each of `readers`: ``(moves, (scale, zp, dtype))`` -> moves then a
    quantize, or ``"exp"`` -> a float op."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(X_SHAPE, "uint8" if conv else "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = _producer(bb, x, conv)
            outs = []
            for reader in readers:
                if reader == "exp":
                    outs.append(bb.emit_output(relax.op.exp(y)))
                    continue
                moves, (s, z, dtype) = reader
                p = y
                for m in moves:
                    if m == "pool":
                        p = bb.emit(relax.op.nn.max_pool2d(p, [3, 3], [2, 2], [1, 1, 1, 1]))
                    elif m == "upsample":
                        p = bb.emit(relax.op.image.resize2d(p, (6, 6), method="nearest_neighbor"))
                    else:
                        p = bb.emit(relax.op.reshape(p, (2, -1)))
                outs.append(bb.emit_output(_q(p, s, z, dtype)))
        bb.emit_func_output(relax.Tuple(outs))
    return bb.get()


def _y(xq):
    """numpy: the producer's float32 result, bit for bit."""
    xdq = qmath.dequantize(xq, S_X, Z_X)
    wdq = qmath.dequantize(W_Q, S_W, 0, axis=0)
    return np.maximum(xdq * wdq.reshape(1, 3, 1, 1), np.float32(0))


def _max_pool(q):
    """3x3 / stride 2 / pad 1 max pool of an NCHW array (padding never wins)."""
    lo = np.iinfo(q.dtype).min
    padded = np.pad(q, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=lo)
    h, w = (q.shape[2] + 2 - 3) // 2 + 1, (q.shape[3] + 2 - 3) // 2 + 1
    windows = [
        padded[:, :, i : i + 2 * h : 2, j : j + 2 * w : 2] for i in range(3) for j in range(3)
    ]
    return np.max(windows, axis=0)


def _xq(seed):
    return np.random.default_rng(seed).integers(0, 256, X_SHAPE).astype("uint8")


# (scale, zero point, dtype) of the pool reader and the direct reader; both ranges hold
# the producer's [0, 13.5], as calibration on a tensor holding it gives.
POOL_FINER = ((0.055, 0, "uint8"), (0.08, -100, "int8"))
DIRECT_FINER = ((0.06, 3, "uint8"), (0.055, -128, "int8"))


@pytest.mark.parametrize("params", [POOL_FINER, DIRECT_FINER], ids=["pool-finer", "direct-finer"])
def test_shared_qdq_matches_numpy_exactly(params):
    (s1, z1, t1), (s2, z2, t2) = params
    mod = _module([(("pool",), params[0]), ((), params[1])])
    shared = ShareQuantize()(mod)
    assert _ops(shared).count("relax.quantize") == 2  # the primary + one requantize
    xq = _xq(0)
    (q1, q2), (old1, old2) = _run(shared, xq), _run(mod, xq)
    # The finer parameters quantize y once; the pool on the integers is exact and the
    # other reader is requantized from the primary integers (rounded twice).
    pool_finer = params is POOL_FINER
    s0, z0, t0 = params[0] if pool_finer else params[1]
    q0 = qmath.quantize(_y(xq), s0, z0, t0)
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


@pytest.mark.parametrize(
    "moves, ops",
    [
        (("pool", "reshape"), ["relax.nn.max_pool2d", "relax.reshape"]),
        (("pool", "upsample"), ["relax.nn.max_pool2d", "relax.image.resize2d"]),
    ],
)
def test_moves_through_a_chain_of_passthrough_ops(moves, ops):
    p = (0.055, 0, "uint8")
    mod = _module([(moves, p), ((), p)])
    shared = ShareQuantize()(mod)
    # Equal parameters: one quantize, the moves on the integers, no requantize.
    assert _ops(shared)[-len(ops) - 1 :] == ["relax.quantize", *ops]
    assert _ops(shared).count("relax.quantize") == 1
    xq = _xq(1)
    for got, ref in zip(_run(shared, xq), _run(mod, xq), strict=True):
        np.testing.assert_array_equal(got, ref)


BIAS = np.array([0.3, -0.2, 0.1], "float32")
S_POOL, S_CAT, Z_CAT = 0.05, 0.08, 100


def _conv_bias_module():
    """dequantize(x_q) -> 1x1 conv + bias -> relu, read by pool -> quantize and by quantize."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(X_SHAPE, "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            xdq = bb.emit(
                relax.op.dequantize(x, relax.const(np.float32(S_X)), relax.const(np.int32(Z_X)))
            )
            w = relax.op.dequantize(
                relax.const(W_Q), relax.const(S_W), relax.const(np.int32(0)), axis=0
            )
            y = bb.emit(relax.op.nn.conv2d(xdq, bb.emit(w), out_dtype="float32"))
            y = bb.emit(relax.op.add(y, relax.const(BIAS.reshape(1, 3, 1, 1))))
            y = bb.emit(relax.op.nn.relu(y))
            p = bb.emit(relax.op.nn.max_pool2d(y, [3, 3], [2, 2], [1, 1, 1, 1]))
            q1 = bb.emit_output(_q(p, S_POOL, 0, "uint8"))
            q2 = bb.emit_output(_q(y, S_CAT, Z_CAT, "uint8"))
        bb.emit_func_output(relax.Tuple([q1, q2]))
    return bb.get()


def test_conv_region_requantizes_once_and_pools_integers():
    mod = _conv_bias_module()
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
    xq = _xq(3)
    q1, q2 = _run(lowered, xq)
    # numpy: the int32 accumulator, requantized (fixed point) to the pool reader's
    # parameters, pooled; the concat reader requantized from those.
    acc = W_Q.reshape(1, 3, 1, 1).astype(np.int64) * (xq.astype(np.int64) - Z_X)
    acc_scale = np.float64(S_X) * S_W.astype(np.float64)
    acc = np.maximum(acc + np.rint(BIAS / acc_scale).astype(np.int64).reshape(1, 3, 1, 1), 0)
    m, sh = qmath.quantize_multiplier(acc_scale / S_POOL)
    q0 = qmath.requantize_int(acc, m, sh, 0, "uint8", axis=1)
    np.testing.assert_array_equal(q1, _max_pool(q0))
    m, sh = qmath.quantize_multiplier(np.float64(S_POOL) / S_CAT)
    ref2 = qmath.requantize_int(q0.astype(np.int64), m, sh, Z_CAT, "uint8")
    np.testing.assert_array_equal(q2, ref2)


@pytest.mark.parametrize(
    "readers, conv",
    [
        ([((), POOL_FINER[0]), "exp"], True),  # a float reader
        ([(("pool",), POOL_FINER[0])], True),  # one reader: LowerInt8 handles it
        ([(("pool",), POOL_FINER[0]), ((), POOL_FINER[1])], False),  # not a region's result
    ],
    ids=["float-reader", "one-reader", "float-producer"],
)
def test_nothing_to_share_leaves_module_unchanged(readers, conv):
    mod = _module(readers, conv)
    assert ShareQuantize()(mod).same_as(mod)


def test_per_channel_reader_is_not_shared():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(X_SHAPE, "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = _producer(bb, x)
            q1 = bb.emit_output(_q(y, 0.05, 0, "uint8"))
            s = relax.const(np.array([0.1, 0.2, 0.3], "float32"))
            q2 = relax.op.quantize(y, s, relax.const(np.int32(0)), axis=1, out_dtype="int8")
            q2 = bb.emit_output(q2)
        bb.emit_func_output(relax.Tuple([q1, q2]))
    mod = bb.get()
    assert ShareQuantize()(mod).same_as(mod)
