"""CanonicalizeQDQ: ONNX-style QDQ graphs -> the canonical form LowerInt8 lowers."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from tvmq.core import qmath
from tvmq.passes import LowerInt8, prepare_passes, static_int8_passes
from tvmq.passes.analysis import float_compute_ops
from tvmq.passes.canonicalize_qdq import CanonicalizeQDQ, has_qdq

RNG = np.random.default_rng(0)
HOST = tvm.target.Target({"kind": "llvm"})

# A Gemm (transB=1) as ONNX Runtime writes it: W is [N, K] = [3, 4].
W_NK = RNG.integers(-127, 128, (3, 4)).astype("int8")
S_W = np.array([0.01, 0.02, 0.005], "float32")
ZP_W = np.zeros(3, "int8")
S_X = np.float32(0.05)
B_Q = np.array([120, -37, 4001], "int32")
S_B = (S_X * S_W).astype("float32")


def _bind(mod: tvm.IRModule, **params) -> tvm.IRModule:
    return relax.transform.BindParams("main", params)(mod)


def _run(mod: tvm.IRModule, *args) -> np.ndarray:
    ex = tvm.compile(mod, target=HOST)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in args])
    return out.numpy()


@I.ir_module
class GemmOnnx:
    @R.function
    def main(
        x: R.Tensor((2, 4), "float32"),
        w: R.Tensor((3, 4), "int8"),
        s_w: R.Tensor((3,), "float32"),
        zp_w: R.Tensor((3,), "int8"),
        b: R.Tensor((3,), "int32"),
        s_b: R.Tensor((3,), "float32"),
        zp_b: R.Tensor((3,), "int32"),
    ) -> R.Tensor((2, 3), "float32"):
        with R.dataflow():
            xq = R.quantize(
                x, R.const(0.05, "float32"), R.const(0, "uint8"), axis=1, out_dtype="uint8"
            )
            xdq = R.dequantize(
                xq, R.const(0.05, "float32"), R.const(0, "uint8"), axis=1, out_dtype="float32"
            )
            wdq = R.dequantize(w, s_w, zp_w, axis=0, out_dtype="float32")
            wt = R.permute_dims(wdq, axes=[1, 0])
            y = R.matmul(xdq, wt, out_dtype="float32")
            bdq = R.dequantize(b, s_b, zp_b, axis=0, out_dtype="float32")
            yb = R.add(y, bdq)
            yq = R.quantize(
                yb, R.const(0.1, "float32"), R.const(7, "uint8"), axis=1, out_dtype="uint8"
            )
            out = R.dequantize(
                yq, R.const(0.1, "float32"), R.const(7, "uint8"), axis=1, out_dtype="float32"
            )
            R.output(out)
        return out


@I.ir_module
class GemmCanonical:
    @R.function
    def main(
        x: R.Tensor((2, 4), "float32"),
        w_kn: R.Tensor((4, 3), "int8"),
        s_w: R.Tensor((3,), "float32"),
        bias: R.Tensor((3,), "float32"),
    ) -> R.Tensor((2, 3), "float32"):
        with R.dataflow():
            xq = R.quantize(
                x, R.const(0.05, "float32"), R.const(0, "int32"), axis=-1, out_dtype="uint8"
            )
            xdq = R.dequantize(
                xq, R.const(0.05, "float32"), R.const(0, "int32"), axis=-1, out_dtype="float32"
            )
            wt = R.dequantize(w_kn, s_w, R.const(0, "int32"), axis=1, out_dtype="float32")
            y = R.matmul(xdq, wt, out_dtype="float32")
            yb = R.add(y, bias)
            yq = R.quantize(
                yb, R.const(0.1, "float32"), R.const(7, "int32"), axis=-1, out_dtype="uint8"
            )
            out = R.dequantize(
                yq, R.const(0.1, "float32"), R.const(7, "int32"), axis=-1, out_dtype="float32"
            )
            R.output(out)
        return out


def _gemm_onnx() -> tvm.IRModule:
    return _bind(GemmOnnx, w=W_NK, s_w=S_W, zp_w=ZP_W, b=B_Q, s_b=S_B, zp_b=np.zeros(3, "int32"))


def test_gemm_transposed_weight_bias_and_zero_points():
    after = CanonicalizeQDQ()(_gemm_onnx())
    expected = _bind(
        GemmCanonical,
        w_kn=np.ascontiguousarray(W_NK.T),
        s_w=S_W,
        bias=qmath.dequantize(B_Q, S_B, 0, axis=0),
    )
    tvm.ir.assert_structural_equal(after, expected)


def test_gemm_is_lowered_after_canonicalization_and_computes_the_same():
    before = _gemm_onnx()
    assert float_compute_ops(static_int8_passes()(before)["main"]) == ["matmul:y"]
    after = CanonicalizeQDQ()(before)
    lowered = static_int8_passes()(after)
    assert float_compute_ops(lowered["main"]) == []
    x = RNG.uniform(-1, 8, (2, 4)).astype("float32")
    # Canonicalization keeps every value; lowering only re-rounds the requantize.
    np.testing.assert_array_equal(_run(after, x), _run(before, x))
    np.testing.assert_allclose(_run(lowered, x), _run(before, x), atol=0.1 + 1e-6)


def test_idempotent_and_nothing_to_match_is_unchanged():
    once = CanonicalizeQDQ()(_gemm_onnx())
    assert CanonicalizeQDQ()(once).same_as(once)
    lowered = LowerInt8()(prepare_passes()(once))
    assert CanonicalizeQDQ()(lowered).same_as(lowered)  # AnnotateQDQ/LowerInt8 form

    @I.ir_module
    class Float:
        @R.function
        def main(x: R.Tensor((2, 4), "float32")) -> R.Tensor((4, 2), "float32"):
            with R.dataflow():
                y = R.permute_dims(R.nn.relu(x), axes=[1, 0])
                R.output(y)
            return y

    assert CanonicalizeQDQ()(Float).same_as(Float)
    assert not has_qdq(Float) and has_qdq(once) and has_qdq(lowered)


# A Conv as ONNX Runtime writes it: bias reshaped to (1, C, 1, 1); MaxPool and Flatten in
# their own QDQ pairs.
W_C = RNG.integers(-127, 128, (2, 3, 3, 3)).astype("int8")
S_WC = np.array([0.02, 0.01], "float32")
B_C = np.array([-300, 77], "int32")
S_BC = (np.float32(0.5) * S_WC).astype("float32")


@I.ir_module
class ConvOnnx:
    @R.function
    def main(
        x: R.Tensor((1, 3, 4, 4), "float32"),
        w: R.Tensor((2, 3, 3, 3), "int8"),
        s_w: R.Tensor((2,), "float32"),
        zp_w: R.Tensor((2,), "int8"),
        b: R.Tensor((2,), "int32"),
        s_b: R.Tensor((2,), "float32"),
    ) -> R.Tensor((1, 8), "float32"):
        with R.dataflow():
            xq = R.quantize(
                x, R.const(0.5, "float32"), R.const(-7, "int8"), axis=1, out_dtype="int8"
            )
            xdq = R.dequantize(
                xq, R.const(0.5, "float32"), R.const(-7, "int8"), axis=1, out_dtype="float32"
            )
            wdq = R.dequantize(w, s_w, zp_w, axis=0, out_dtype="float32")
            y = R.nn.conv2d(xdq, wdq, padding=[1, 1, 1, 1], out_dtype="float32")
            bdq = R.dequantize(b, s_b, R.const(0, "int32"), axis=0, out_dtype="float32")
            b4 = R.reshape(bdq, R.shape([1, 2, 1, 1]))
            yb = R.add(y, b4)
            yq = R.quantize(
                yb, R.const(0.25, "float32"), R.const(-128, "int8"), axis=1, out_dtype="int8"
            )
            ydq = R.dequantize(
                yq, R.const(0.25, "float32"), R.const(-128, "int8"), axis=1, out_dtype="float32"
            )
            p = R.nn.max_pool2d(ydq, pool_size=[2, 2], strides=[2, 2])
            pq = R.quantize(
                p, R.const(0.25, "float32"), R.const(-128, "int8"), axis=1, out_dtype="int8"
            )
            pdq = R.dequantize(
                pq, R.const(0.25, "float32"), R.const(-128, "int8"), axis=1, out_dtype="float32"
            )
            f = R.reshape(pdq, R.shape([1, 8]))
            fq = R.quantize(
                f, R.const(0.25, "float32"), R.const(-128, "int8"), axis=1, out_dtype="int8"
            )
            out = R.dequantize(
                fq, R.const(0.25, "float32"), R.const(-128, "int8"), axis=1, out_dtype="float32"
            )
            R.output(out)
        return out


@I.ir_module
class ConvCanonical:
    @R.function
    def main(
        x: R.Tensor((1, 3, 4, 4), "float32"),
        w: R.Tensor((2, 3, 3, 3), "int8"),
        s_w: R.Tensor((2,), "float32"),
        bias: R.Tensor((2,), "float32"),
    ) -> R.Tensor((1, 8), "float32"):
        with R.dataflow():
            xq = R.quantize(
                x, R.const(0.5, "float32"), R.const(-7, "int32"), axis=-1, out_dtype="int8"
            )
            xdq = R.dequantize(
                xq, R.const(0.5, "float32"), R.const(-7, "int32"), axis=-1, out_dtype="float32"
            )
            wdq = R.dequantize(w, s_w, R.const(0, "int32"), axis=0, out_dtype="float32")
            y = R.nn.conv2d(xdq, wdq, padding=[1, 1, 1, 1], out_dtype="float32")
            b4 = R.reshape(bias, R.shape([1, 2, 1, 1]))
            yb = R.add(y, b4)
            yq = R.quantize(
                yb, R.const(0.25, "float32"), R.const(-128, "int32"), axis=-1, out_dtype="int8"
            )
            pq = R.nn.max_pool2d(yq, pool_size=[2, 2], strides=[2, 2])
            fq = R.reshape(pq, R.shape([1, 8]))
            out = R.dequantize(
                fq, R.const(0.25, "float32"), R.const(-128, "int32"), axis=-1, out_dtype="float32"
            )
            R.output(out)
        return out


def _conv_onnx() -> tvm.IRModule:
    return _bind(ConvOnnx, w=W_C, s_w=S_WC, zp_w=np.zeros(2, "int8"), b=B_C, s_b=S_BC)


def test_conv_bias_and_move_ops_on_integers():
    after = CanonicalizeQDQ()(_conv_onnx())
    expected = _bind(ConvCanonical, w=W_C, s_w=S_WC, bias=qmath.dequantize(B_C, S_BC, 0, axis=0))
    tvm.ir.assert_structural_equal(after, expected)


def test_conv_is_lowered_and_canonicalization_is_exact():
    before = _conv_onnx()
    after = CanonicalizeQDQ()(before)
    lowered = static_int8_passes()(after)
    assert float_compute_ops(lowered["main"]) == []
    x = RNG.uniform(-4, 4, (1, 3, 4, 4)).astype("float32")
    np.testing.assert_array_equal(_run(after, x), _run(before, x))
    np.testing.assert_allclose(_run(lowered, x), _run(before, x), atol=0.25 + 1e-6)


@I.ir_module
class PermutedConvWeight:
    @R.function
    def main(
        x: R.Tensor((1, 3, 4, 4), "float32"),
        w: R.Tensor((3, 2, 3, 3), "int8"),
        s_w: R.Tensor((2,), "float32"),
    ) -> R.Tensor((1, 2, 2, 2), "float32"):
        with R.dataflow():
            wdq = R.dequantize(w, s_w, R.const(0, "int8"), axis=-3, out_dtype="float32")
            wt = R.permute_dims(wdq, axes=[1, 0, 2, 3])
            y = R.nn.conv2d(x, wt, out_dtype="float32")
            R.output(y)
        return y


@I.ir_module
class PermutedConvWeightCanonical:
    @R.function
    def main(
        x: R.Tensor((1, 3, 4, 4), "float32"),
        w: R.Tensor((2, 3, 3, 3), "int8"),
        s_w: R.Tensor((2,), "float32"),
    ) -> R.Tensor((1, 2, 2, 2), "float32"):
        with R.dataflow():
            wt = R.dequantize(w, s_w, R.const(0, "int32"), axis=0, out_dtype="float32")
            y = R.nn.conv2d(x, wt, out_dtype="float32")
            R.output(y)
        return y


def test_permute_follows_the_channel_axis():
    w = RNG.integers(-127, 128, (3, 2, 3, 3)).astype("int8")
    after = CanonicalizeQDQ()(_bind(PermutedConvWeight, w=w, s_w=S_WC))
    expected = _bind(
        PermutedConvWeightCanonical,
        w=np.ascontiguousarray(w.transpose(1, 0, 2, 3)),
        s_w=S_WC,
    )
    tvm.ir.assert_structural_equal(after, expected)


@I.ir_module
class LeftAlone:
    @R.function
    def main(
        x: R.Tensor((1, 2, 4, 4), "int8"),
        w: R.Tensor((3, 4), "int8"),
        s_w: R.Tensor((3,), "float32"),
        zp_w: R.Tensor((3,), "int32"),
    ) -> R.Tuple(
        R.Tensor((4, 3), "float32"),
        R.Tensor((3, 4), "float32"),
        R.Tensor((1, 2, 2, 2), "int8"),
        R.Tensor((1, 2, 2, 2), "int8"),
    ):
        with R.dataflow():
            # Asymmetric per-channel weight, and its dequantize has a second reader.
            wdq = R.dequantize(w, s_w, zp_w, axis=0, out_dtype="float32")
            wt = R.permute_dims(wdq, axes=[1, 0])
            xdq = R.dequantize(x, R.const(0.5, "float32"), R.const(0, "int32"), out_dtype="float32")
            # Different output parameters: the max_pool2d is not a plain move.
            p = R.nn.max_pool2d(xdq, pool_size=[2, 2], strides=[2, 2])
            pq = R.quantize(p, R.const(0.25, "float32"), R.const(0, "int32"), out_dtype="int8")
            # avg_pool2d rounds: not a move.
            a = R.nn.avg_pool2d(xdq, pool_size=[2, 2], strides=[2, 2])
            aq = R.quantize(a, R.const(0.5, "float32"), R.const(0, "int32"), out_dtype="int8")
            R.output(wt, wdq, pq, aq)
        return (wt, wdq, pq, aq)


def test_leaves_alone_what_it_cannot_prove_safe():
    zp = np.array([0, 1, 0], "int32")
    mod = _bind(LeftAlone, w=W_NK, s_w=S_W, zp_w=zp)
    assert CanonicalizeQDQ()(mod).same_as(mod)


@I.ir_module
class ReluQDQ:
    @R.function
    def main(x: R.Tensor((2, 5), "int8")) -> R.Tensor((2, 5), "int8"):
        with R.dataflow():
            xdq = R.dequantize(
                x, R.const(0.5, "float32"), R.const(-7, "int8"), axis=1, out_dtype="float32"
            )
            r = R.nn.relu(xdq)
            q = R.quantize(
                r, R.const(0.5, "float32"), R.const(-7, "int8"), axis=1, out_dtype="int8"
            )
            R.output(q)
        return q


@I.ir_module
class ReluInt:
    @R.function
    def main(x: R.Tensor((2, 5), "int8")) -> R.Tensor((2, 5), "int8"):
        with R.dataflow():
            q = R.maximum(x, R.const(-7, "int8"))
            R.output(q)
        return q


def test_relu_between_equal_qdq_becomes_integer_maximum():
    after = CanonicalizeQDQ()(ReluQDQ)
    tvm.ir.assert_structural_equal(after, ReluInt)
    x = RNG.integers(-128, 128, (2, 5)).astype("int8")
    np.testing.assert_array_equal(_run(after, x), _run(ReluQDQ, x))


@I.ir_module
class NegativeScaleMaxPool:
    @R.function
    def main(x: R.Tensor((1, 1, 4, 4), "int8")) -> R.Tensor((1, 1, 2, 2), "int8"):
        with R.dataflow():
            xdq = R.dequantize(x, R.const(-0.5, "float32"), R.const(0, "int32"))
            p = R.nn.max_pool2d(xdq, pool_size=[2, 2], strides=[2, 2])
            q = R.quantize(p, R.const(-0.5, "float32"), R.const(0, "int32"), out_dtype="int8")
            R.output(q)
        return q


def test_max_pool_needs_a_positive_scale():
    assert CanonicalizeQDQ()(NegativeScaleMaxPool).same_as(NegativeScaleMaxPool)
