"""ONNX frontend: numbers against onnxruntime, shape folding, and the errors users see."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from tvmq.errors import TvmqError, UnsupportedOperatorError
from tvmq.frontends.model import signature_of
from tvmq.frontends.onnx import fold_static_shapes, from_onnx

ort = pytest.importorskip("onnxruntime")

OPSET = 17


# --- helpers ---------------------------------------------------------------------------------


def _run_tvm(mod: tvm.IRModule, *arrays: np.ndarray) -> list[np.ndarray]:
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in arrays])
    if isinstance(out, tvm.runtime.Tensor):
        return [out.numpy()]
    return [o.numpy() for o in out]


def _run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # hand-built graphs leave output shapes open: not worth a warning
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _assert_matches_ort(model: onnx.ModelProto, input_shapes=None, *, atol=1e-4, seed=0):
    """Import, compile, run on random inputs and compare with onnxruntime; returns the import."""
    imported = from_onnx(model, input_shapes)
    rng = np.random.default_rng(seed)
    feeds = {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in imported.inputs}
    got = _run_tvm(imported.mod, *feeds.values())
    want = _run_ort(model, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        err = float(np.max(np.abs(g - w))) if g.size else 0.0
        print(f"max abs error vs onnxruntime: {err:.3g}")
        assert err < atol
    return imported


def _i64(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=np.int64), name)


def _open_output(name: str, rank: int) -> onnx.ValueInfoProto:
    """A float output of known rank whose dims are left to shape inference."""
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * rank)


def _model(nodes, inputs, outputs, inits=(), *, name="g", opset=OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # what onnxruntime 1.18+ reads for opset 17
    return model


def _dynamic_x() -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])


def _raw_relax_static(model, shape_dict=None) -> bool:
    """Whether Relax's own ONNX frontend imports the model with static shapes."""
    from tvm.relax.frontend.onnx import from_onnx as relax_from_onnx

    try:
        mod = relax_from_onnx(model, shape_dict=shape_dict)
        inputs, outputs = signature_of(mod["main"])
    except Exception:
        return False
    return not any(s.symbols for s in [*inputs, *outputs])


# --- models ----------------------------------------------------------------------------------


class SmallCnn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = y.view(y.size(0), -1)  # traced into Shape -> Gather -> Unsqueeze -> Concat
        return self.fc(y)


@pytest.fixture(scope="module")
def small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return SmallCnn().eval()


def _export(module, x, *, dynamic: bool, dynamo: bool = False) -> onnx.ModelProto:
    buf = io.BytesIO()
    if dynamo:
        kw = {"dynamic_shapes": {"x": {0: torch.export.Dim("batch")}}} if dynamic else {}
    else:
        kw = {"dynamic_axes": {"x": {0: "batch"}, "y": {0: "batch"}}} if dynamic else {}
    torch.onnx.export(module, (x,), buf, input_names=["x"], output_names=["y"], dynamo=dynamo, **kw)
    return onnx.load_from_string(buf.getvalue())


def _flatten_chain_model() -> onnx.ModelProto:
    """x[N,3,4,4] -> Reshape(x, concat(unsqueeze(shape(x)[0]), [-1])) -> MatMul(W)."""
    w = np.random.default_rng(1).standard_normal((48, 5)).astype(np.float32)
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0, name="gather"),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="unsqueeze"),
        helper.make_node("Concat", ["n1", "minus1"], ["new_shape"], axis=0, name="concat"),
        helper.make_node("Reshape", ["x", "new_shape"], ["flat"], name="reshape"),
        helper.make_node("MatMul", ["flat", "w"], ["y"], name="matmul"),
    ]
    inits = [
        numpy_helper.from_array(w, "w"),
        _i64("zero", 0),
        _i64("axes0", [0]),
        _i64("minus1", [-1]),
    ]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])
    return _model(nodes, [_dynamic_x()], [y], inits, name="flatten_chain")


def _shape_arithmetic_model() -> onnx.ModelProto:
    """Flatten size computed as Cast(ReduceProd(Slice(Shape))): Relax rejects it even with shapes."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Slice", ["s", "one", "four"], ["chw"]),
        helper.make_node("ReduceProd", ["chw"], ["prod"], keepdims=1),
        helper.make_node("Cast", ["prod"], ["prod_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["prod_f"], ["prod_i"], to=TensorProto.INT64),
        helper.make_node("Slice", ["s", "zero", "one"], ["n"]),
        helper.make_node("Concat", ["n", "prod_i"], ["new_shape"], axis=0),
        helper.make_node("Reshape", ["x", "new_shape"], ["y"], name="reshape"),
    ]
    inits = [_i64("one", [1]), _i64("four", [4]), _i64("zero", [0])]
    return _model(nodes, [_dynamic_x()], [_open_output("y", 2)], inits, name="shape_arith")


def _constant_of_shape_model() -> onnx.ModelProto:
    """ConstantOfShape(Shape(x)) and Expand(b, [N, 3, 1, 1]) built from run-time shapes."""
    b = np.random.default_rng(2).standard_normal((3, 1, 1)).astype(np.float32)
    half = numpy_helper.from_array(np.array([0.5], np.float32))
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("ConstantOfShape", ["s"], ["halves"], value=half),
        helper.make_node("Add", ["x", "halves"], ["x1"]),
        helper.make_node("Shape", ["x1"], ["s1"]),
        helper.make_node("Gather", ["s1", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"]),
        helper.make_node("Concat", ["n1", "rest"], ["expand_shape"], axis=0),
        helper.make_node("Expand", ["b", "expand_shape"], ["bx"]),
        helper.make_node("Gather", ["s1", "three"], ["w"], axis=0),
        helper.make_node("Range", ["zero", "w", "one"], ["r"]),
        helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x1", "bx"], ["x2"]),
        helper.make_node("Add", ["x2", "rf"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(b, "b"),
        _i64("zero", 0),
        _i64("one", 1),
        _i64("three", 3),
        _i64("axes0", [0]),
        _i64("rest", [3, 1, 1]),
    ]
    return _model(nodes, [_dynamic_x()], [_open_output("y", 4)], inits, name="const_of_shape")


# --- numbers ---------------------------------------------------------------------------------


def test_torch_cnn_static_export_matches_onnxruntime(small_cnn, tmp_path):
    model = _export(small_cnn, torch.randn(2, 3, 8, 8), dynamic=False)
    path = tmp_path / "cnn.onnx"
    onnx.save(model, path)
    imported = _assert_matches_ort(model)
    assert imported.source == "onnx"
    assert [(s.name, s.shape, s.dtype) for s in imported.inputs] == [("x", (2, 3, 8, 8), "float32")]
    assert [(s.name, s.shape) for s in imported.outputs] == [("y", (2, 10))]
    # Weights are bound as constants: the only parameter is the data input.
    assert len(imported.mod["main"].params) == 1
    assert "params" not in (imported.mod["main"].attrs or {})
    # A path works as well as a ModelProto.
    assert from_onnx(path).inputs == imported.inputs


def test_torch_cnn_dynamic_batch_export_matches_onnxruntime(small_cnn):
    model = _export(small_cnn, torch.randn(2, 3, 8, 8), dynamic=True)
    assert any(n.op_type == "Shape" for n in model.graph.node)
    imported = _assert_matches_ort(model, {"x": (5, 3, 8, 8)})
    assert [s.shape for s in imported.outputs] == [(5, 10)]
    assert imported.meta["nodes_after_folding"] < imported.meta["nodes_before_folding"]


@pytest.mark.slow
def test_torch_cnn_dynamo_export_matches_onnxruntime(small_cnn):
    model = _export(small_cnn, torch.randn(2, 3, 8, 8), dynamic=True, dynamo=True)
    imported = _assert_matches_ort(model, {"x": (3, 3, 8, 8)})
    assert [s.shape for s in imported.outputs] == [(3, 10)]


def test_flatten_chain_needs_and_gets_static_shapes():
    model = _flatten_chain_model()
    onnx.checker.check_model(model)
    # Relax alone keeps the batch symbolic.
    assert not _raw_relax_static(model)
    imported = _assert_matches_ort(model, {"x": [3, 3, 4, 4]})
    assert [s.shape for s in imported.outputs] == [(3, 5)]


def test_shape_arithmetic_that_relax_rejects():
    model = _shape_arithmetic_model()
    onnx.checker.check_model(model)
    # Even with the static shape, Relax's Reshape wants a shape, not a computed tensor.
    assert not _raw_relax_static(model, {"x": [2, 3, 4, 4]})
    imported = _assert_matches_ort(model, {"x": [2, 3, 4, 4]})
    assert [s.shape for s in imported.outputs] == [(2, 48)]


def test_constant_of_shape_expand_range():
    model = _constant_of_shape_model()
    onnx.checker.check_model(model)
    assert not _raw_relax_static(model)
    # Range over a run-time dim leaves Relax with an unknown shape even when x is static.
    assert not _raw_relax_static(model, {"x": [2, 3, 4, 4]})
    imported = _assert_matches_ort(model, {"x": [2, 3, 4, 4]})
    assert [s.shape for s in imported.outputs] == [(2, 3, 4, 4)]


# --- folding ---------------------------------------------------------------------------------


def test_fold_static_shapes_removes_shape_computation_and_keeps_numbers():
    model = _constant_of_shape_model()
    folded = fold_static_shapes(model, {"x": [2, 3, 4, 4]})
    assert [n.op_type for n in folded.graph.node] == ["Add", "Mul", "Add"]
    assert [d.dim_value for d in folded.graph.input[0].type.tensor_type.shape.dim] == [2, 3, 4, 4]
    assert model.graph.node[0].op_type == "Shape"  # the input model is untouched
    x = np.random.default_rng(3).standard_normal((2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(_run_ort(folded, {"x": x})[0], _run_ort(model, {"x": x})[0])


def test_fold_does_not_duplicate_weights():
    big = np.random.default_rng(4).standard_normal((400, 300)).astype(np.float32)
    nodes = [
        # Transposing a weight nothing else reads moves it: folded.
        helper.make_node("Transpose", ["w1"], ["w1t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w1t"], ["h"]),
        # A big computed constant is left to run time...
        helper.make_node("Mul", ["w2", "two"], ["w2x2"]),
        # ... and so is a transpose of a weight that is also read elsewhere.
        helper.make_node("Transpose", ["w2"], ["w2t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "w2x2"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2t"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(big.T.copy(), "w1"),
        numpy_helper.from_array(big.T * 0.5, "w2"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 400])
    model = _model(nodes, [x], [_open_output("y", 2)], inits)
    folded = fold_static_shapes(model, {})
    ops = [n.op_type for n in folded.graph.node]
    assert ops == ["MatMul", "Mul", "Transpose", "MatMul", "MatMul"]

    def size(m):
        return sum(numpy_helper.to_array(t).size for t in m.graph.initializer)

    assert size(folded) <= size(model)


def test_initializers_listed_as_inputs_are_weights():
    w = numpy_helper.from_array(np.full((4, 2), 0.5, np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])
    w_in = helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [x, w_in], [y], [w])
    model.ir_version = 3  # the old exporters' layout: every initializer is also an input
    imported = from_onnx(model)
    assert [s.name for s in imported.inputs] == ["x"]
    assert len(imported.mod["main"].params) == 1


def test_multiple_outputs_and_names_kept():
    x = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [2, 5])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 5]) for n in ("a/out", "b")]
    nodes = [
        helper.make_node("Relu", ["input.1"], ["a/out"]),
        helper.make_node("Sigmoid", ["input.1"], ["b"]),
    ]
    imported = _assert_matches_ort(_model(nodes, [x], outs))
    assert [s.name for s in imported.inputs] == ["input.1"]
    assert [s.name for s in imported.outputs] == ["a/out", "b"]


# --- errors ----------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(TvmqError, match=r"nope\.onnx: no such file"):
        from_onnx(tmp_path / "nope.onnx")


@pytest.mark.parametrize("kind", ["text", "truncated"])
def test_corrupt_file(tmp_path, kind):
    path = tmp_path / "model.onnx"
    if kind == "text":
        path.write_bytes(b"this is not an onnx model\n")
    else:
        path.write_bytes(_flatten_chain_model().SerializeToString()[:150])
    with pytest.raises(TvmqError, match=r"model\.onnx: not a valid ONNX file \(.+\)"):
        from_onnx(path)


def test_dynamic_input_without_shapes_stays_symbolic():
    """A dim_param dim is a symbolic dim named after it; the shape chain on it still imports."""
    imported = from_onnx(_flatten_chain_model())
    assert imported.inputs[0].shape == ("N", 3, 4, 4)
    assert imported.outputs[0].shape == ("N", 5)


def test_dynamic_dim_pinned_or_renamed():
    assert from_onnx(_flatten_chain_model(), {"x": [2, 3, 4, 4]}).inputs[0].shape == (2, 3, 4, 4)
    assert from_onnx(_flatten_chain_model(), {"x": ["B", 3, 4, 4]}).inputs[0].shape == (
        "B",
        3,
        4,
        4,
    )


def test_unknown_rank_needs_a_shape():
    model = _flatten_chain_model()
    model.graph.input[0].type.tensor_type.ClearField("shape")
    with pytest.raises(
        TvmqError, match=r"'x' has unknown rank; give its shape, e.g. --input-shape x:"
    ):
        from_onnx(model)


def test_unknown_input_name_lists_real_inputs():
    with pytest.raises(TvmqError, match=r"'image'.*not a model input.*inputs are 'x'"):
        from_onnx(_flatten_chain_model(), {"image": [1, 3, 4, 4]})


def test_input_shape_contradicting_static_dim():
    with pytest.raises(TvmqError, match=r"'x'.*\[N, 3, 4, 4\].*\[1, 3, 5, 5\]"):
        from_onnx(_flatten_chain_model(), {"x": [1, 3, 5, 5]})


def _one_node_model(
    node: onnx.NodeProto, out_rank: int, extra_opsets=(), opset: int = OPSET
) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])
    model = _model([node], [x], [_open_output("y", out_rank)], opset=opset)
    model.opset_import.extend(extra_opsets)
    return model


def test_unsupported_standard_op_names_op_and_node():
    model = _one_node_model(helper.make_node("Det", ["x"], ["y"], name="determinant"), 0)
    with pytest.raises(UnsupportedOperatorError, match=r"'determinant'.*'Det'"):
        from_onnx(model)


def test_custom_domain_op_is_unsupported_even_with_a_standard_name():
    # Relax ignores node.domain and would convert this as the standard Relu.
    node = helper.make_node("Relu", ["x"], ["y"], name="my_relu", domain="com.example")
    model = _one_node_model(node, 2, [helper.make_opsetid("com.example", 1)])
    with pytest.raises(UnsupportedOperatorError, match=r"'my_relu'.*com\.example::Relu"):
        from_onnx(model)


def test_standard_attention_is_not_taken_for_the_contrib_op():
    # Relax's "Attention" converter is ONNX Runtime's com.microsoft Attention, a different op.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 8])
    node = helper.make_node("Attention", ["x", "x", "x"], ["y"], name="sdpa")
    model = _model([node], [x], [_open_output("y", 4)], opset=23)
    with pytest.raises(UnsupportedOperatorError, match=r"'sdpa'.*'Attention'.*com\.microsoft"):
        from_onnx(model)


def test_converter_failure_names_the_node():
    # A Reshape whose target shape is a real input cannot become static.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])
    shape = helper.make_tensor_value_info("shape", TensorProto.INT64, [2])
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], name="runtime_reshape")
    model = _model([node], [x, shape], [_open_output("y", 2)])
    with pytest.raises(UnsupportedOperatorError, match=r"'runtime_reshape'.*'Reshape'"):
        from_onnx(model)


def test_range_over_a_symbolic_dim_is_that_dim():
    """Range(0, shape(x)[0]) imports as arange(N), not a data-dependent length (ResolveShapeVars):
    the output keeps the input's symbol, and one build runs every N."""
    import tvm
    from tvm import relax

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Range", ["zero", "n", "one"], ["r"]),
        helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["x", "rf"], ["y"]),
    ]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])
    imported = from_onnx(_model(nodes, [x], [y], [_i64("zero", 0), _i64("one", 1)]))
    assert imported.outputs[0].shape == ("N",)
    vm = relax.VirtualMachine(tvm.compile(imported.mod, target="llvm"), tvm.cpu())
    for n in (1, 6):
        xv = np.random.default_rng(n).standard_normal(n).astype(np.float32)
        np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(xv)).numpy(), xv + np.arange(n))
