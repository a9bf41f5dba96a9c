"""FoldQuantScales: weight quantize folding, batch_norm folding, redundant requantize removal."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from tvmq.core import qmath
from tvmq.passes import FoldQuantScales

RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 3)).astype("float32")
S_W = (np.abs(W).max(axis=0) / 127).astype("float32")
W_CONV = RNG.standard_normal((3, 2, 3, 3)).astype("float32")
S_CONV = (np.abs(W_CONV).max(axis=(1, 2, 3)) / 127).astype("float32")
GAMMA = np.array([1.5, -0.5, 2.0], "float32")  # one negative scale: the sign moves into Wq
BETA = np.array([0.1, -0.2, 0.3], "float32")
MEAN = np.array([0.5, 0.0, -1.0], "float32")
VAR = np.array([1.0, 4.0, 0.25], "float32")
BIAS = np.array([0.2, -0.1, 0.05], "float32")
EPS = 1e-5


def _bind(mod: tvm.IRModule, **params) -> tvm.IRModule:
    return relax.transform.BindParams("main", params)(mod)


def _bn_factor():
    f = GAMMA.astype(np.float64) / np.sqrt(VAR.astype(np.float64) + EPS)
    return f, BETA - MEAN * f


def _run(mod, *args):
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in args])
    return out.numpy()


@I.ir_module
class WeightQDQ:
    @R.function
    def main(
        x: R.Tensor((2, 4), "int8"), w: R.Tensor((4, 3), "float32"), s: R.Tensor((3,), "float32")
    ) -> R.Tensor((2, 3), "float32"):
        with R.dataflow():
            xdq = R.dequantize(x, R.const(0.5, "float32"), R.const(0, "int32"), out_dtype="float32")
            wq = R.quantize(w, s, R.const(0, "int32"), axis=1, out_dtype="int8")
            wdq = R.dequantize(wq, s, R.const(0, "int32"), axis=1, out_dtype="float32")
            y = R.matmul(xdq, wdq, out_dtype="float32")
            R.output(y)
        return y


@I.ir_module
class WeightFolded:
    @R.function
    def main(
        x: R.Tensor((2, 4), "int8"), wq: R.Tensor((4, 3), "int8"), s: R.Tensor((3,), "float32")
    ) -> R.Tensor((2, 3), "float32"):
        with R.dataflow():
            xdq = R.dequantize(x, R.const(0.5, "float32"), R.const(0, "int32"), out_dtype="float32")
            wdq = R.dequantize(wq, s, R.const(0, "int32"), axis=1, out_dtype="float32")
            y = R.matmul(xdq, wdq, out_dtype="float32")
            R.output(y)
        return y


def test_weight_quantize_becomes_int8_constant():
    after = FoldQuantScales()(_bind(WeightQDQ, w=W, s=S_W))
    wq = qmath.quantize(W, S_W, 0, "int8", axis=1)
    assert np.abs(wq).max() == 127  # symmetric, restricted range
    tvm.ir.assert_structural_equal(after, _bind(WeightFolded, wq=wq, s=S_W))


@I.ir_module
class ConvBN:
    @R.function
    def main(
        x: R.Tensor((1, 2, 5, 5), "float32"),
        w: R.Tensor((3, 2, 3, 3), "float32"),
        b: R.Tensor((1, 3, 1, 1), "float32"),
        gamma: R.Tensor((3,), "float32"),
        beta: R.Tensor((3,), "float32"),
        mean: R.Tensor((3,), "float32"),
        var: R.Tensor((3,), "float32"),
    ) -> R.Tensor((1, 3, 5, 5), "float32"):
        with R.dataflow():
            c = R.nn.conv2d(x, w, padding=[1, 1, 1, 1], out_dtype="float32")
            cb = R.add(c, b)
            bn = R.nn.batch_norm(cb, gamma, beta, mean, var, axis=1, epsilon=1e-5, training=False)
            y = bn[0]
            r = R.nn.relu(y)
            R.output(r)
        return r


@I.ir_module
class ConvBNFolded:
    @R.function
    def main(
        x: R.Tensor((1, 2, 5, 5), "float32"),
        w: R.Tensor((3, 2, 3, 3), "float32"),
        b: R.Tensor((1, 3, 1, 1), "float32"),
    ) -> R.Tensor((1, 3, 5, 5), "float32"):
        with R.dataflow():
            c = R.nn.conv2d(x, w, padding=[1, 1, 1, 1], out_dtype="float32")
            y = R.add(c, b)
            r = R.nn.relu(y)
            R.output(r)
        return r


def _conv_bn(**weight):
    params = dict(b=BIAS.reshape(1, 3, 1, 1), gamma=GAMMA, beta=BETA, mean=MEAN, var=VAR)
    return _bind(ConvBN, **weight, **params)


def test_batch_norm_folds_into_float_conv():
    f, t = _bn_factor()
    after = FoldQuantScales()(_conv_bn(w=W_CONV))
    expected = _bind(
        ConvBNFolded,
        w=(W_CONV * f.reshape(3, 1, 1, 1)).astype("float32"),
        b=(BIAS * f + t).astype("float32").reshape(1, 3, 1, 1),
    )
    tvm.ir.assert_structural_equal(after, expected)


@I.ir_module
class QConvBN:
    @R.function
    def main(
        x: R.Tensor((1, 2, 5, 5), "float32"),
        w: R.Tensor((3, 2, 3, 3), "float32"),
        s: R.Tensor((3,), "float32"),
        b: R.Tensor((1, 3, 1, 1), "float32"),
        gamma: R.Tensor((3,), "float32"),
        beta: R.Tensor((3,), "float32"),
        mean: R.Tensor((3,), "float32"),
        var: R.Tensor((3,), "float32"),
    ) -> R.Tensor((1, 3, 5, 5), "float32"):
        with R.dataflow():
            wq = R.quantize(w, s, R.const(0, "int32"), axis=0, out_dtype="int8")
            wdq = R.dequantize(wq, s, R.const(0, "int32"), axis=0, out_dtype="float32")
            c = R.nn.conv2d(x, wdq, padding=[1, 1, 1, 1], out_dtype="float32")
            cb = R.add(b, c)
            bn = R.nn.batch_norm(cb, gamma, beta, mean, var, axis=1, epsilon=1e-5, training=False)
            y = bn[0]
            R.output(y)
        return y


@I.ir_module
class QConvBNFolded:
    @R.function
    def main(
        x: R.Tensor((1, 2, 5, 5), "float32"),
        wq: R.Tensor((3, 2, 3, 3), "int8"),
        s: R.Tensor((3,), "float32"),
        b: R.Tensor((1, 3, 1, 1), "float32"),
    ) -> R.Tensor((1, 3, 5, 5), "float32"):
        with R.dataflow():
            wdq = R.dequantize(wq, s, R.const(0, "int32"), axis=0, out_dtype="float32")
            c = R.nn.conv2d(x, wdq, padding=[1, 1, 1, 1], out_dtype="float32")
            y = R.add(c, b)
            R.output(y)
        return y


def _qconv_bn():
    params = dict(b=BIAS.reshape(1, 3, 1, 1), gamma=GAMMA, beta=BETA, mean=MEAN, var=VAR)
    return _bind(QConvBN, w=W_CONV, s=S_CONV, **params)


def test_batch_norm_folds_into_quantized_conv_scales():
    """BN scale f goes into the weight scale (|f|) and the int8 weight's sign (sign f)."""
    f, t = _bn_factor()
    after = FoldQuantScales()(_qconv_bn())
    wq = qmath.quantize(W_CONV, S_CONV, 0, "int8", axis=0)
    expected = _bind(
        QConvBNFolded,
        wq=(wq * np.sign(f).reshape(3, 1, 1, 1)).astype("int8"),
        s=(S_CONV * np.abs(f)).astype("float32"),
        b=(BIAS * f + t).astype("float32").reshape(1, 3, 1, 1),
    )
    tvm.ir.assert_structural_equal(after, expected)
    # Same as quantizing the BN-folded float weight directly.
    folded_w = W_CONV * f.reshape(3, 1, 1, 1)
    s2 = (np.abs(folded_w).max(axis=(1, 2, 3)) / 127).astype("float32")
    np.testing.assert_allclose(S_CONV * np.abs(f), s2, rtol=1e-6)
    np.testing.assert_array_equal(
        qmath.quantize(folded_w, s2, 0, "int8", axis=0), wq * np.sign(f).reshape(3, 1, 1, 1)
    )


@pytest.mark.parametrize("build", [_conv_bn, _qconv_bn])
def test_batch_norm_fold_numerics(build):
    before = build(w=W_CONV) if build is _conv_bn else build()
    after = FoldQuantScales()(before)
    x = np.random.default_rng(2).standard_normal((1, 2, 5, 5)).astype("float32")
    np.testing.assert_allclose(_run(after, x), _run(before, x), rtol=1e-4, atol=1e-5)


@I.ir_module
class Requant:
    @R.function
    def main(x: R.Tensor((2, 4), "int8")) -> R.Tensor((2, 4), "int8"):
        with R.dataflow():
            d = R.dequantize(x, R.const(0.5, "float32"), R.const(2, "int32"), out_dtype="float32")
            q = R.quantize(d, R.const(0.5, "float32"), R.const(2, "int32"), out_dtype="int8")
            r = R.nn.relu(q)
            R.output(r)
        return r


@I.ir_module
class RequantRemoved:
    @R.function
    def main(x: R.Tensor((2, 4), "int8")) -> R.Tensor((2, 4), "int8"):
        with R.dataflow():
            r = R.nn.relu(x)
            R.output(r)
        return r


def test_redundant_dequantize_quantize_pair_is_removed():
    tvm.ir.assert_structural_equal(FoldQuantScales()(Requant), RequantRemoved)


@I.ir_module
class RealRequant:
    @R.function
    def main(x: R.Tensor((2, 4), "int8")) -> R.Tensor((2, 4), "int8"):
        with R.dataflow():
            d = R.dequantize(x, R.const(0.5, "float32"), R.const(2, "int32"), out_dtype="float32")
            q = R.quantize(d, R.const(0.25, "float32"), R.const(2, "int32"), out_dtype="int8")
            R.output(q)
        return q


def test_requantize_with_other_params_is_kept():
    assert FoldQuantScales()(RealRequant).same_as(RealRequant)


@I.ir_module
class Plain:
    @R.function
    def main(x: R.Tensor((2, 4), "float32"), w: R.Tensor((4, 3), "float32")):
        with R.dataflow():
            y = R.matmul(x, w, out_dtype="float32")
            R.output(y)
        return y


def test_nothing_to_fold_leaves_module_unchanged():
    assert FoldQuantScales()(Plain).same_as(Plain)


def test_batch_norm_with_zero_scale_stays_for_quantized_conv():
    before = relax.transform.BindParams(
        "main",
        dict(
            w=W_CONV,
            s=S_CONV,
            b=BIAS.reshape(1, 3, 1, 1),
            gamma=np.array([1.0, 0.0, 1.0], "float32"),
            beta=BETA,
            mean=MEAN,
            var=VAR,
        ),
    )(QConvBN)
    after = FoldQuantScales()(before)
    ops = [b.value.op.name for b in after["main"].body.blocks[0].bindings if hasattr(b.value, "op")]
    assert "relax.nn.batch_norm" in ops and "relax.quantize" not in ops


@pytest.mark.parametrize(
    "build",
    [lambda: _bind(WeightQDQ, w=W, s=S_W), _qconv_bn, lambda: _conv_bn(w=W_CONV), lambda: Requant],
)
def test_idempotent(build):
    once = FoldQuantScales()(build())
    twice = FoldQuantScales()(once)
    assert twice.same_as(once)


def test_training_mode_batch_norm_is_not_folded():
    source = ConvBN.script().replace("training=False", "training=True")
    training = tvm.script.from_source(source)
    params = dict(b=BIAS.reshape(1, 3, 1, 1), gamma=GAMMA, beta=BETA, mean=MEAN, var=VAR)
    before = _bind(training, w=W_CONV, **params)
    assert FoldQuantScales()(before).same_as(before)
