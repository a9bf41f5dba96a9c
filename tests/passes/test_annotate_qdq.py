"""AnnotateQDQ: Before/Expected structure, skipping, idempotence, and QDQ numerics."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from tvmq.core import qmath
from tvmq.errors import TvmqError
from tvmq.passes import AnnotateQDQ
from tvmq.passes.sites import module_weight_sites

RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 3)).astype("float32")
W_CONV = RNG.standard_normal((2, 3, 3, 3)).astype("float32")


def _bind(mod: tvm.IRModule, **params) -> tvm.IRModule:
    return relax.transform.BindParams("main", params)(mod)


def _sym_scale(w: np.ndarray, axis: int) -> np.ndarray:
    other = tuple(i for i in range(w.ndim) if i != axis)
    return (np.abs(w).max(axis=other) / 127).astype("float32")


@I.ir_module
class MatmulBefore:
    @R.function
    def main(x: R.Tensor((2, 4), "float32"), w: R.Tensor((4, 3), "float32")) -> R.Tensor(
        (2, 3), "float32"
    ):
        with R.dataflow():
            y = R.matmul(x, w, out_dtype="float32")
            R.output(y)
        return y


@I.ir_module
class MatmulExpected:
    @R.function
    def main(
        x: R.Tensor((2, 4), "float32"),
        w: R.Tensor((4, 3), "float32"),
        s_w: R.Tensor((3,), "float32"),
    ) -> R.Tensor((2, 3), "float32"):
        with R.dataflow():
            xq = R.quantize(
                x, R.const(0.5, "float32"), R.const(3, "int32"), axis=-1, out_dtype="int8"
            )
            xdq = R.dequantize(
                xq, R.const(0.5, "float32"), R.const(3, "int32"), axis=-1, out_dtype="float32"
            )
            wq = R.quantize(w, s_w, R.const(0, "int32"), axis=1, out_dtype="int8")
            wdq = R.dequantize(wq, s_w, R.const(0, "int32"), axis=1, out_dtype="float32")
            y = R.matmul(xdq, wdq, out_dtype="float32")
            R.output(y)
        return y


def test_matmul_before_expected():
    after = AnnotateQDQ({"matmul_0": (0.5, 3)})(_bind(MatmulBefore, w=W))
    expected = _bind(MatmulExpected, w=W, s_w=_sym_scale(W, 1))
    tvm.ir.assert_structural_equal(after, expected)


@I.ir_module
class LinearBefore:
    """What the PyTorch importer writes for nn.Linear: permute_dims of the weight, bias first."""

    @R.function
    def main(
        x: R.Tensor((2, 4), "float32"),
        wt: R.Tensor((3, 4), "float32"),
        b: R.Tensor((3,), "float32"),
    ) -> R.Tensor((2, 3), "float32"):
        with R.dataflow():
            w = R.permute_dims(wt, axes=[1, 0])
            y = R.matmul(x, w, out_dtype="float32")
            z = R.add(b, y)
            R.output(z)
        return z


@I.ir_module
class LinearExpected:
    @R.function
    def main(
        x: R.Tensor((2, 4), "float32"),
        w: R.Tensor((4, 3), "float32"),
        s_w: R.Tensor((3,), "float32"),
        b: R.Tensor((3,), "float32"),
    ) -> R.Tensor((2, 3), "float32"):
        with R.dataflow():
            xq = R.quantize(
                x, R.const(0.25, "float32"), R.const(128, "int32"), axis=-1, out_dtype="uint8"
            )
            xdq = R.dequantize(
                xq, R.const(0.25, "float32"), R.const(128, "int32"), axis=-1, out_dtype="float32"
            )
            wq = R.quantize(w, s_w, R.const(0, "int32"), axis=1, out_dtype="int8")
            wdq = R.dequantize(wq, s_w, R.const(0, "int32"), axis=1, out_dtype="float32")
            y = R.matmul(xdq, wdq, out_dtype="float32")
            z = R.add(b, y)
            R.output(z)
        return z


def test_permuted_weight_is_folded_and_uint8_activations():
    b = RNG.standard_normal(3).astype("float32")
    before = _bind(LinearBefore, wt=W.T.copy(), b=b)
    after = AnnotateQDQ({"matmul_0": (0.25, 128)}, activation_dtype="uint8")(before)
    expected = _bind(LinearExpected, w=W, s_w=_sym_scale(W, 1), b=b)
    tvm.ir.assert_structural_equal(after, expected)


@I.ir_module
class ConvBefore:
    @R.function
    def main(
        x: R.Tensor((1, 3, 5, 5), "float32"), w: R.Tensor((2, 3, 3, 3), "float32")
    ) -> R.Tensor((1, 2, 5, 5), "float32"):
        with R.dataflow():
            y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1], out_dtype="float32")
            R.output(y)
        return y


@I.ir_module
class ConvExpectedPerTensor:
    @R.function
    def main(
        x: R.Tensor((1, 3, 5, 5), "float32"), w: R.Tensor((2, 3, 3, 3), "float32")
    ) -> R.Tensor((1, 2, 5, 5), "float32"):
        with R.dataflow():
            xq = R.quantize(
                x, R.const(0.125, "float32"), R.const(-5, "int32"), axis=-1, out_dtype="int8"
            )
            xdq = R.dequantize(
                xq, R.const(0.125, "float32"), R.const(-5, "int32"), axis=-1, out_dtype="float32"
            )
            wq = R.quantize(
                w,
                R.const(float(np.abs(W_CONV).max() / 127), "float32"),
                R.const(0, "int32"),
                axis=-1,
                out_dtype="int8",
            )
            wdq = R.dequantize(
                wq,
                R.const(float(np.abs(W_CONV).max() / 127), "float32"),
                R.const(0, "int32"),
                axis=-1,
                out_dtype="float32",
            )
            y = R.nn.conv2d(xdq, wdq, padding=[1, 1, 1, 1], out_dtype="float32")
            R.output(y)
        return y


def test_conv2d_per_tensor_weight():
    after = AnnotateQDQ({"conv2d_0": (0.125, -5)}, weight_per_channel=False)(
        _bind(ConvBefore, w=W_CONV)
    )
    tvm.ir.assert_structural_equal(after, _bind(ConvExpectedPerTensor, w=W_CONV))


def test_conv2d_per_channel_axis_is_output_channel():
    after = AnnotateQDQ({"conv2d_0": (0.125, -5)})(_bind(ConvBefore, w=W_CONV))
    weight_q = [
        b.value
        for b in after["main"].body.blocks[0].bindings
        if isinstance(b.value, relax.Call)
        and b.value.op.name == "relax.quantize"
        and b.value.ty.ndim == 4
        and b.value.attrs.axis == 0
    ]
    assert len(weight_q) == 1
    np.testing.assert_allclose(weight_q[0].args[1].value.numpy(), _sym_scale(W_CONV, 0))


@pytest.mark.parametrize(
    "qparams, skip",
    [
        ({}, ()),  # no calibrated site
        ({"matmul_7": (0.5, 0)}, ()),  # names another site
        ({"matmul_0": (0.5, 0)}, ("matmul",)),
        ({"matmul_0": (0.5, 0)}, ("dense",)),
        ({"matmul_0": (0.5, 0)}, ("matmul_*",)),
    ],
)
def test_nothing_to_annotate_leaves_module_unchanged(qparams, skip):
    before = _bind(MatmulBefore, w=W)
    after = AnnotateQDQ(qparams, skip=skip)(before)
    assert after.same_as(before)


def test_non_constant_weight_is_not_a_site():
    assert module_weight_sites(MatmulBefore) == []
    after = AnnotateQDQ({"matmul_0": (0.5, 0)})(MatmulBefore)
    assert after.same_as(MatmulBefore)


def test_idempotent():
    once = AnnotateQDQ({"matmul_0": (0.5, 3)})(_bind(MatmulBefore, w=W))
    twice = AnnotateQDQ({"matmul_0": (0.5, 3)})(once)
    tvm.ir.assert_structural_equal(once, twice)


def test_rejects_bad_qparams():
    with pytest.raises(TvmqError, match="scale"):
        AnnotateQDQ({"matmul_0": (0.0, 0)})
    with pytest.raises(TvmqError, match="pair"):
        AnnotateQDQ({"matmul_0": 0.5})
    with pytest.raises(TvmqError, match="outside the uint8 range"):
        AnnotateQDQ({"matmul_0": (0.5, -3)}, activation_dtype="uint8")(_bind(MatmulBefore, w=W))


def test_qdq_numerics_close_to_float():
    """The annotated (still float) module matches float within int8 noise: SQNR > 30 dB."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 32)).astype("float32")
    x = rng.standard_normal((16, 64)).astype("float32")
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType((16, 64), "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(xv, relax.const(w), out_dtype="float32"))
        bb.emit_func_output(out)
    mod = bb.get()
    scale, zp = qmath.choose_qparams(x.min(), x.max(), "int8")
    annotated = AnnotateQDQ({"matmul_0": (scale, zp)})(mod)
    ex = tvm.compile(annotated, target=tvm.target.Target({"kind": "llvm"}))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert qmath.sqnr(x @ w, got) > 30


def test_site_names_are_stable_when_annotating_in_steps():
    """An annotated op keeps its index, so later passes name the remaining sites the same."""
    rng = np.random.default_rng(2)
    w1 = rng.standard_normal((4, 4)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            h = bb.emit(relax.op.matmul(x, relax.const(w1), out_dtype="float32"))
            y = bb.emit_output(relax.op.matmul(h, relax.const(W), out_dtype="float32"))
        bb.emit_func_output(y)
    mod = bb.get()
    qp = {"matmul_0": (0.5, 0), "matmul_1": (0.25, 1)}
    at_once = AnnotateQDQ(qp)(mod)
    second_first = AnnotateQDQ(qp)(AnnotateQDQ({"matmul_1": qp["matmul_1"]})(mod))
    tvm.ir.assert_structural_equal(second_first, at_once)
    assert [s.name for s in module_weight_sites(AnnotateQDQ({"matmul_0": (0.5, 0)})(mod))] == [
        "matmul_1"
    ]


def test_pruned_channel_gets_unit_scale():
    w = W.copy()
    w[:, 1] = 0.0  # a fully pruned output channel
    after = AnnotateQDQ({"matmul_0": (0.5, 3)})(_bind(MatmulBefore, w=w))
    scale = _sym_scale(w, 1)
    scale[1] = 1.0
    tvm.ir.assert_structural_equal(after, _bind(MatmulExpected, w=w, s_w=scale))


# -- tensor sites: residual add and concat ----------------------------------------------------


@I.ir_module
class AddConcatBefore:
    @R.function
    def main(a: R.Tensor((2, 4), "float32"), b: R.Tensor((2, 4), "float32")):
        with R.dataflow():
            s = R.add(a, b)
            r = R.nn.relu(s)
            c = R.concat((r, a), axis=1)
            d = R.nn.relu(c)  # an integer consumer: a concat feeding only float ops stays float
            R.output(d)
        return d


@I.ir_module
class AddConcatExpected:
    @R.function
    def main(a: R.Tensor((2, 4), "float32"), b: R.Tensor((2, 4), "float32")):
        with R.dataflow():
            aq = R.quantize(
                a, R.const(0.5, "float32"), R.const(1, "int32"), axis=-1, out_dtype="int8"
            )
            adq = R.dequantize(
                aq, R.const(0.5, "float32"), R.const(1, "int32"), axis=-1, out_dtype="float32"
            )
            bq = R.quantize(
                b, R.const(0.25, "float32"), R.const(-2, "int32"), axis=-1, out_dtype="int8"
            )
            bdq = R.dequantize(
                bq, R.const(0.25, "float32"), R.const(-2, "int32"), axis=-1, out_dtype="float32"
            )
            s = R.add(adq, bdq)
            r = R.nn.relu(s)
            rq = R.quantize(
                r, R.const(0.125, "float32"), R.const(-128, "int32"), axis=-1, out_dtype="int8"
            )
            rdq = R.dequantize(
                rq, R.const(0.125, "float32"), R.const(-128, "int32"), axis=-1, out_dtype="float32"
            )
            # The concat's inputs take its output parameters; `a` already has them: reused.
            rq2 = R.quantize(
                rdq, R.const(0.5, "float32"), R.const(1, "int32"), axis=-1, out_dtype="int8"
            )
            rdq2 = R.dequantize(
                rq2, R.const(0.5, "float32"), R.const(1, "int32"), axis=-1, out_dtype="float32"
            )
            c = R.concat((rdq2, adq), axis=1)
            cq = R.quantize(
                c, R.const(0.5, "float32"), R.const(1, "int32"), axis=-1, out_dtype="int8"
            )
            cdq = R.dequantize(
                cq, R.const(0.5, "float32"), R.const(1, "int32"), axis=-1, out_dtype="float32"
            )
            d = R.nn.relu(cdq)
            R.output(d)
        return d


ADD_CONCAT_QP = {
    "add_0:0": (0.5, 1),
    "add_0:1": (0.25, -2),
    "add_0": (0.125, -128),
    "concat_0": (0.5, 1),
}


def test_add_and_concat_before_expected():
    after = AnnotateQDQ(ADD_CONCAT_QP)(AddConcatBefore)
    tvm.ir.assert_structural_equal(after, AddConcatExpected)


def test_tensor_sites_and_what_calibration_observes():
    from tvmq.passes.tensor_sites import list_observed_tensors, list_tensor_sites

    sites = list_tensor_sites(AddConcatBefore["main"])
    assert [(s.name, s.kind) for s in sites] == [("add_0", "add"), ("concat_0", "concat")]
    add = sites[0]
    assert add.output.name == "r"  # the relu after the add is part of it
    observed = list_observed_tensors(AddConcatBefore["main"])
    assert [o.name for o in observed] == ["add_0:0", "add_0:1", "add_0", "concat_0"]
    # Annotated: no site is left, but the indices are kept.
    assert list_tensor_sites(AnnotateQDQ(ADD_CONCAT_QP)(AddConcatBefore)["main"]) == []


def test_tensor_sites_idempotent_skip_and_missing_params():
    once = AnnotateQDQ(ADD_CONCAT_QP)(AddConcatBefore)
    assert AnnotateQDQ(ADD_CONCAT_QP)(once).same_as(once)
    skipped = AnnotateQDQ(ADD_CONCAT_QP, skip=("add", "concat"))(AddConcatBefore)
    assert skipped.same_as(AddConcatBefore)
    partial = {k: v for k, v in ADD_CONCAT_QP.items() if k != "add_0:1"}
    only_concat = AnnotateQDQ(partial)(AddConcatBefore)
    ops = [
        b.value.op.name
        for b in only_concat["main"].body.blocks[0].bindings
        if isinstance(b.value, relax.Call)
    ]
    assert ops.count("relax.quantize") == 3  # the concat's two inputs and its output


@I.ir_module
class BiasAdd:
    """An add with a constant operand is a bias (its matmul's), not a tensor site."""

    @R.function
    def main(a: R.Tensor((2, 4), "float32")):
        with R.dataflow():
            y = R.add(a, R.const(np.ones((2, 4), "float32")))
            z = R.add(a, R.const(np.ones((4,), "float32")))
            R.output(y, z)
        return (y, z)


def test_constant_and_broadcast_adds_are_not_sites():
    from tvmq.passes.tensor_sites import list_tensor_sites

    assert list_tensor_sites(BiasAdd["main"]) == []
    assert AnnotateQDQ({"add_0": (0.5, 0)})(BiasAdd).same_as(BiasAdd)


@I.ir_module
class ClassToken:
    """ViT's embeddings: concat(class token, patches) + position embeddings, a float add
    whose result is the residual stream; and the same concat read by a matmul."""

    @R.function
    def main(cls: R.Tensor((1, 1, 4), "float32"), x: R.Tensor((1, 3, 4), "float32")):
        with R.dataflow():
            c = R.concat((cls, x), axis=1)
            y = R.add(c, R.const(np.ones((1, 4, 4), "float32")))
            c2 = R.concat((cls, x), axis=1)
            z = R.matmul(c2, R.const(np.ones((4, 2), "float32")))
            R.output(y, z)
        return (y, z)


def test_a_concat_read_by_an_add_of_a_constant_is_not_a_site():
    """The add of a constant stays float, so an int8 concat before it would only add error
    (DeiT-tiny's worst cosine to float: 0.967 with it, 0.9993 without)."""
    from tvmq.passes.tensor_sites import list_tensor_sites

    sites = list_tensor_sites(ClassToken["main"])
    assert [(s.name, s.var.name) for s in sites] == [("concat_1", "c2")]


def test_tensor_read_by_conv_and_add_is_quantized_once():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((4, 4)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            h = bb.emit(relax.op.matmul(x, relax.const(w), out_dtype="float32"))
            y = bb.emit_output(relax.op.add(h, x))
        bb.emit_func_output(y)
    qp = {"matmul_0": (0.5, 0), "add_0:0": (0.25, 0), "add_0:1": (0.5, 0), "add_0": (1.0, 0)}
    after = AnnotateQDQ(qp)(bb.get())
    quantized = [
        b.value.args[0]
        for b in after["main"].body.blocks[0].bindings
        if isinstance(b.value, relax.Call) and b.value.op.name == "relax.quantize"
    ]
    assert sum(1 for v in quantized if v.same_as(x)) == 1


def test_add_feeding_a_float_op_stays_float():
    """A residual add read by a float op (softmax here; a LayerNorm in a transformer) or
    returned is no integer site: quantizing it would only add error."""
    from tvmq.passes.tensor_sites import list_tensor_sites

    @I.ir_module
    class Residual:
        @R.function
        def main(a: R.Tensor((2, 4), "float32"), b: R.Tensor((2, 4), "float32")):
            with R.dataflow():
                s = R.add(a, b)
                y = R.nn.softmax(s)
                t = R.add(a, y)
                R.output(t)
            return t

    assert list_tensor_sites(Residual["main"]) == []
    assert AnnotateQDQ({"add_0": (0.1, 0), "add_1": (0.1, 0)})(Residual).same_as(Residual)


# -- activation matmuls (attention) -------------------------------------------------------------


@I.ir_module
class AttentionBefore:
    """``softmax(q @ k^T) @ v`` plus a weight matmul (which keeps its name ``matmul_0``)."""

    @R.function
    def main(
        q: R.Tensor((1, 2, 4, 8), "float32"),
        k: R.Tensor((1, 2, 4, 8), "float32"),
        v: R.Tensor((1, 2, 4, 8), "float32"),
    ):
        with R.dataflow():
            kt = R.permute_dims(k, axes=[0, 1, 3, 2])
            s = R.matmul(q, kt, out_dtype="float32")
            p = R.nn.softmax(s, axis=-1)
            o = R.matmul(p, v, out_dtype="float32")
            y = R.matmul(o, R.const(np.ones((8, 3), "float32")), out_dtype="float32")
            R.output(y)
        return y


ATTENTION_QP = {
    "matmul_act_0:0": (0.05, 3),
    "matmul_act_0:1": (0.04, 7),
    "matmul_act_1:0": (1 / 255, 0),
    "matmul_act_1:1": (0.02, 1),
}


@I.ir_module
class AttentionExpected:
    @R.function
    def main(
        q: R.Tensor((1, 2, 4, 8), "float32"),
        k: R.Tensor((1, 2, 4, 8), "float32"),
        v: R.Tensor((1, 2, 4, 8), "float32"),
    ):
        with R.dataflow():
            kt = R.permute_dims(k, axes=[0, 1, 3, 2])
            qq = R.quantize(q, R.const(0.05, "float32"), R.const(3, "int32"), out_dtype="uint8")
            qdq = R.dequantize(qq, R.const(0.05, "float32"), R.const(3, "int32"))
            kq = R.quantize(kt, R.const(0.04, "float32"), R.const(7, "int32"), out_dtype="uint8")
            kdq = R.dequantize(kq, R.const(0.04, "float32"), R.const(7, "int32"))
            s = R.matmul(qdq, kdq, out_dtype="float32")
            p = R.nn.softmax(s, axis=-1)
            pq = R.quantize(p, R.const(1 / 255, "float32"), R.const(0, "int32"), out_dtype="uint8")
            pdq = R.dequantize(pq, R.const(1 / 255, "float32"), R.const(0, "int32"))
            vq = R.quantize(v, R.const(0.02, "float32"), R.const(1, "int32"), out_dtype="uint8")
            vdq = R.dequantize(vq, R.const(0.02, "float32"), R.const(1, "int32"))
            o = R.matmul(pdq, vdq, out_dtype="float32")
            y = R.matmul(o, R.const(np.ones((8, 3), "float32")), out_dtype="float32")
            R.output(y)
        return y


def test_activation_matmul_sites_and_what_calibration_observes():
    from tvmq.passes.tensor_sites import list_observed_tensors, list_tensor_sites

    func = AttentionBefore["main"]
    sites = list_tensor_sites(func)
    assert [(s.name, s.kind, s.output) for s in sites] == [
        ("matmul_act_0", "matmul_act", None),
        ("matmul_act_1", "matmul_act", None),
    ]
    assert [s.name for s in module_weight_sites(AttentionBefore)] == ["matmul_0"]
    observed = list_observed_tensors(func)
    assert [(o.name, o.activation.name) for o in observed] == [
        ("matmul_act_0:0", "q"),
        ("matmul_act_0:1", "kt"),
        ("matmul_act_1:0", "p"),
        ("matmul_act_1:1", "v"),
    ]


def test_activation_matmul_before_expected():
    after = AnnotateQDQ(ATTENTION_QP, activation_dtype="uint8")(AttentionBefore)
    tvm.ir.assert_structural_equal(after, AttentionExpected)


@pytest.mark.parametrize("skip", [("matmul_act",), ("relax.matmul",), ("matmul_act_*",)])
def test_activation_matmuls_skipped(skip):
    after = AnnotateQDQ(ATTENTION_QP, skip=skip)(AttentionBefore)
    assert after.same_as(AttentionBefore)


def test_activation_matmul_skipped_by_name_and_idempotent():
    one = AnnotateQDQ(ATTENTION_QP, skip=("matmul_act_1",))(AttentionBefore)
    quantized = [
        b.value.args[0].name
        for b in one["main"].body.blocks[0].bindings
        if isinstance(b.value, relax.Call) and b.value.op.name == "relax.quantize"
    ]
    assert quantized == ["q", "kt"]
    once = AnnotateQDQ(ATTENTION_QP)(AttentionBefore)
    assert AnnotateQDQ(ATTENTION_QP)(once).same_as(once)
    # "matmul" selects the weight matmuls only: the attention matmuls are still quantized.
    weights_off = AnnotateQDQ({**ATTENTION_QP, "matmul_0": (0.1, 0)}, skip="matmul")
    tvm.ir.assert_structural_equal(weights_off(AttentionBefore), once)
