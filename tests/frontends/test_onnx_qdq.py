"""Already-quantized ONNX models: onnxruntime's QDQ output -> tvmq int8 compute, vs onnxruntime.

The MLP (784-128-10) and the small CNN of ``tvmq.demo``, trained for one epoch on the demo's
MNIST digits, exported with ``torch.onnx.export(dynamo=False)`` and quantized by
``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8 weights, uint8 or int8
activations), are imported with ``tvmq.frontends.onnx.from_onnx`` and lowered with
``CanonicalizeQDQ`` + ``prepare_passes`` + ``static_int8_passes()``. onnxruntime runs the same
file with its integer kernels (it fuses the QDQ graph into QGemm / QLinearConv).

What is measured, on the 1,000 test digits and on 1,000 random inputs: the largest
difference of the two float outputs in units of the model's output scale (both outputs are
``dequantize`` of a uint8/int8 tensor, so a difference is a whole number of steps), and how
often both pick the same class. The requantize rounds slightly differently (tvmq: float32
multiply, round half to even; onnxruntime: its own float requantize), so a few values
differ by one step in a hidden layer and at most a step or two at the output.

The reference that holds on every host is onnxruntime running the file node by node, graph
optimizations off: DequantizeLinear, float MatMul / Conv, QuantizeLinear, the QDQ format's
definition. onnxruntime's fused integer kernels are compared too where the host has VNNI
(or is not x86): without it MLAS multiplies uint8 x int8 with ``vpmaddubsw``, which
saturates the sum of two products at int16, and on an AVX2-only EPYC its QGemm output was
14 steps off the float definition where tvmq's was 1 step off.
"""

from __future__ import annotations

import platform

import numpy as np
import pytest
import tvm
from tvm import relax

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
pytest.importorskip("mlxtend")

from onnxruntime.quantization import (  # noqa: E402
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)

from tvmq import demo  # noqa: E402
from tvmq.build import build  # noqa: E402
from tvmq.frontends.onnx import from_onnx  # noqa: E402
from tvmq.machine import cpu_flags  # noqa: E402
from tvmq.passes import prepare_passes, static_int8_passes  # noqa: E402
from tvmq.passes.canonicalize_qdq import CanonicalizeQDQ  # noqa: E402
from tvmq.passes.relax_utils import ordered_bindings  # noqa: E402

pytestmark = pytest.mark.slow

BATCH = 1000
MAX_STEPS = 3  # output quantization steps
MIN_ARGMAX_AGREEMENT = 0.99
_ACTIVATIONS = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
# Where onnxruntime's fused uint8 x int8 kernels compute exactly (see the module docstring).
_ORT_INTEGER_EXACT = platform.machine().lower() not in ("x86_64", "amd64") or bool(
    {"avx512_vnni", "avx_vnni"} & cpu_flags()
)


class _Batches(CalibrationDataReader):
    def __init__(self, x: np.ndarray):
        self._it = iter([{"x": x[i : i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self._it, None)


@pytest.fixture(scope="module")
def mnist():
    return demo.load_mnist()


@pytest.fixture(scope="module")
def float_onnx(mnist, tmp_path_factory):
    """model name -> path of the float ONNX export of the briefly trained model."""
    out = {}
    folder = tmp_path_factory.mktemp("onnx_qdq")
    for name, make in (("mlp", demo.make_mlp), ("cnn", demo.make_cnn)):
        model = demo.train(make(), mnist, epochs=1).eval()  # eval: BN folds into the conv
        path = folder / f"{name}.onnx"
        torch.onnx.export(
            model,
            (torch.zeros(1, 784),),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
            dynamo=False,
        )
        out[name] = path
    return out


def _quantize_onnx(src, dst, calibration: np.ndarray, activation: str) -> None:
    quantize_static(
        str(src),
        str(dst),
        _Batches(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=_ACTIVATIONS[activation],
        weight_type=QuantType.QInt8,
    )


def _output_scale(path) -> float:
    """Scale of the DequantizeLinear that produces the graph output."""
    model = onnx.load(str(path))
    out = model.graph.output[0].name
    node = next(n for n in model.graph.node if out in n.output)
    assert node.op_type == "DequantizeLinear"
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return float(inits[node.input[1]])


def _sessions(path) -> dict[str, ort.InferenceSession]:
    """The references to compare with: "QDQ in float" (every host) and "integer" (onnxruntime's
    fused kernels, where they are exact)."""

    def session(fused: bool) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        if not fused:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    out = {"QDQ in float": session(fused=False)}
    if _ORT_INTEGER_EXACT:
        out["integer"] = session(fused=True)
    return out


def _integer_compute(mod: tvm.IRModule) -> list[str]:
    """Every matmul / conv2d, as "op in-dtypes -> out-dtype"."""
    ops = []
    for b in ordered_bindings(mod["main"]):
        value = b.value
        if isinstance(value, relax.Call) and getattr(value.op, "name", "") in (
            "relax.matmul",
            "relax.nn.conv2d",
        ):
            dtypes = ",".join(str(a.ty.dtype) for a in value.args)
            ops.append(f"{value.op.name} {dtypes} -> {value.ty.dtype}")
    return ops


@pytest.mark.parametrize("activation", ["uint8", "int8"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_onnxruntime_qdq_model_runs_int8_and_agrees(
    model_name, activation, mnist, float_onnx, tmp_path
):
    path = tmp_path / f"{model_name}_{activation}.onnx"
    _quantize_onnx(float_onnx[model_name], path, mnist.x_train[:100], activation)

    imported = from_onnx(path, {"x": (BATCH, 784)})
    mod = static_int8_passes()(prepare_passes()(CanonicalizeQDQ()(imported.mod)))
    compute = _integer_compute(mod)
    n_layers = {"mlp": 2, "cnn": 3}[model_name]
    assert len(compute) == n_layers, compute
    for op in compute:
        operands, result = op.split(" ", 1)[1].split(" -> ")
        act, weight = operands.split(",")
        assert (act, weight, result) == (activation, "int8", "int32"), op

    vm = relax.VirtualMachine(build(mod, "host"), tvm.cpu())
    sessions = _sessions(path)
    s_y = _output_scale(path)
    rng = np.random.default_rng(0)
    inputs = {
        "digits": mnist.x_test[:BATCH],
        "random": rng.uniform(0, 1, (BATCH, 784)).astype("float32"),
    }
    for kind, x in inputs.items():
        ours = vm["main"](tvm.runtime.tensor(x)).numpy()
        for reference, session in sessions.items():
            ref = session.run(None, {"x": x})[0]
            steps = np.abs(ours - ref).max() / s_y
            agree = float(np.mean(ours.argmax(1) == ref.argmax(1)))
            print(f"{model_name} {activation} {kind} vs {reference}: max |diff| {steps:.2f} "
                  f"steps, argmax {agree:.3f}")  # fmt: skip
            assert steps <= MAX_STEPS + 1e-3, (kind, reference, steps)
            if kind == "digits":
                assert agree >= MIN_ARGMAX_AGREEMENT, (reference, agree)


@pytest.mark.slow
def test_compile_lowers_prequantized_onnx(float_onnx, mnist, tmp_path):
    """tvmq.compile of an onnxruntime QDQ file needs no calibration and matches onnxruntime."""
    import tvmq

    path = tmp_path / "mlp_qdq.onnx"
    _quantize_onnx(float_onnx["mlp"], path, mnist.x_train[:64], "uint8")
    art = tvmq.compile(path, "host", input_shapes={"x": (1, 784)}, output_dir=tmp_path / "b")
    assert art.manifest.compression == {"quantize": {"scheme": "onnx-qdq", "float_ops": []}}
    x = mnist.x_test[:1]
    for session in _sessions(path).values():
        ref = session.run(None, {"x": x})[0]
        np.testing.assert_allclose(
            tvmq.load(tmp_path / "b")(x), ref, atol=_output_scale(path) * 1.01
        )
    with pytest.raises(tvmq.TvmqError, match="already quantized"):
        tvmq.compile(
            path, "host", input_shapes={"x": (1, 784)}, quantize="int8", calibration_data=x
        )
