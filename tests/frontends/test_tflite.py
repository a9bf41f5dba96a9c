""".tflite files (float32, float16, dynamic range, full int8 with int8 / uint8 I/O) vs LiteRT.

The models are made on the fly by ``make_tflite_models.py`` in a subprocess (TensorFlow's
converter; TensorFlow must stay out of this process, see there): a 64-64-10 MLP and a small
CNN (conv, max pool, depthwise conv, flatten, two dense layers), random weights, the int8
files calibrated on random data. ``tvmq.compile`` builds each for the host and the result is
compared with the LiteRT interpreter (``ai-edge-litert``) on random inputs:

* float32 / float16: within 1e-5 of the interpreter, relative to its largest output;
* full int8: the integer outputs within one quantization step on >= 99.9% of elements
  (measured: bit-exact), and every dense and conv layer on an integer kernel (the manifest
  lists them and no float ops);
* dynamic range: the file's int8 layers on tvmq's dynamic int8 matmul (activation range per
  row at run time, as the interpreter's asymmetric per-row input quantization), the others
  float; compared within 1e-4 relative (measured: 2e-7).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tvmq
import tvmq.machine
from tvmq.cli import main

pytest.importorskip("tflite")
litert = pytest.importorskip("ai_edge_litert.interpreter")
# Not imported here (it would import Keras on the TensorFlow backend): the maker uses it.
if importlib.util.find_spec("tensorflow") is None:
    pytest.skip("the TFLite converter (tensorflow) is not installed", allow_module_level=True)

pytestmark = pytest.mark.slow

MAKER = Path(__file__).with_name("make_tflite_models.py")
RUNS = 25  # random inputs per model (MLP: 25 x 8 x 10 = 2,000 output elements)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tflite")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, str(MAKER), str(out)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _interpreter_and_tvmq(path: Path, out_dir: Path, seed: int = 0):
    """(LiteRT outputs, tvmq outputs, manifest) over RUNS random inputs."""
    it = litert.Interpreter(model_path=str(path))
    it.allocate_tensors()
    (inp,), (outp,) = it.get_input_details(), it.get_output_details()
    tvmq.compile(path, "host", output_dir=out_dir, progress=False)
    compiled = tvmq.load(out_dir)
    rng = np.random.default_rng(seed)
    refs, ours = [], []
    for _ in range(RUNS):
        if inp["dtype"] == np.float32:
            x = rng.standard_normal(inp["shape"]).astype(np.float32)
        else:
            info = np.iinfo(inp["dtype"])
            x = rng.integers(info.min, info.max + 1, inp["shape"]).astype(inp["dtype"])
        it.set_tensor(inp["index"], x)
        it.invoke()
        refs.append(it.get_tensor(outp["index"]).copy())
        ours.append(np.asarray(compiled(x)))
    manifest = json.loads((out_dir / "model.json").read_text())
    return np.stack(refs), np.stack(ours), manifest


@pytest.mark.parametrize("mode", ["float", "float16"])
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_float_models_match_the_interpreter(models, tmp_path, net, mode):
    ref, ours, manifest = _interpreter_and_tvmq(models / f"{net}_{mode}.tflite", tmp_path / "b")
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert manifest["source"] == "tflite"
    assert "quantize" not in manifest["compression"]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("io", ["int8", "uint8"])
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_int8_models_run_integer_kernels_within_one_step(models, tmp_path, net, io):
    ref, ours, manifest = _interpreter_and_tvmq(models / f"{net}_{io}.tflite", tmp_path / "b")
    assert ours.dtype == np.dtype(io) and ours.shape == ref.shape
    steps = np.abs(ours.astype(np.int32) - ref.astype(np.int32))
    assert (steps <= 1).mean() >= 0.999, f"max {steps.max()} steps"
    assert manifest["compression"]["quantize"]["scheme"] == "tflite-int8"
    assert manifest["notes"]["float_ops"] == []  # NHWC convs too (QDQConvToNCHW)
    if not tvmq.machine.cpu_flags() & {"avx512_vnni", "amx_int8"}:
        return  # "host" has no tvmq int8 kernel to name (an AVX2-only CPU): TVM's own loops
    kernels = manifest["notes"]["kernels"]["prescheduled"]
    assert sum("int8_dense" in k for k in kernels) >= 2, kernels  # both dense layers
    if net == "cnn":
        assert any("int8_depthwise" in k for k in kernels), kernels
        # the regular conv on int8 kernels: im2col + VNNI, or AMX tiles on an AMX host
        assert any(k.startswith(("tvmq_int8_im2col", "tvmq_int8_conv_amx")) for k in kernels)


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_dynamic_range_models_quantize_the_files_int8_layers(models, tmp_path, net):
    ref, ours, manifest = _interpreter_and_tvmq(models / f"{net}_dynamic.tflite", tmp_path / "b")
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    scheme = manifest["compression"]["quantize"]["scheme"]
    assert scheme["scheme"] == "Int8Dynamic"
    # The converter keeps weights under 1,024 elements float: the last layer (matmul_1) here.
    assert scheme["skip"] == ["matmul_1"]
    layers = {r["name"]: r for r in manifest["compression"]["quantize"]["layers"]}
    assert layers["matmul_0"]["quantized"] and not layers["matmul_1"]["quantized"]


def test_dynamic_range_weights_keep_the_files_integers(models):
    """Re-quantizing the dequantized int8 weight per channel gives the file's integers back."""
    import tflite
    from tflite.TensorType import TensorType

    from tvmq.frontends.tflite import from_tflite
    from tvmq.passes.sites import list_weight_sites

    path = models / "mlp_dynamic.tflite"
    model = tflite.Model.GetRootAsModel(path.read_bytes(), 0)
    sub = model.Subgraphs(0)
    (q_file,) = [  # the one int8 tensor: the first layer's weight, [64 out, 64 in]
        model.Buffers(t.Buffer()).DataAsNumpy().view(np.int8).reshape(64, 64)
        for t in map(sub.Tensors, range(sub.TensorsLength()))
        if t.Type() == TensorType.INT8
    ]
    site = list_weight_sites(from_tflite(path).mod["main"])[0]
    w = np.asarray(site.weight)  # [K, N]: the file's integers times their scales
    scale = np.abs(w).max(axis=0) / 127  # Int8Dynamic's symmetric per-channel scale
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    np.testing.assert_array_equal(q.T, q_file)


def _cli_error(argv, capsys) -> str:
    capsys.readouterr()
    status = main(["-q", *[str(a) for a in argv]])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_unsupported_quantized_op_is_named_in_one_line(models, tmp_path, capsys):
    line = _cli_error(["compile", models / "gelu_int8.tflite", "-o", tmp_path / "o"], capsys)
    assert "GELU" in line and "gelu_int8.tflite" in line
    assert not (tmp_path / "o").exists()


def test_not_a_flatbuffer_is_one_line(tmp_path, capsys):
    bad = tmp_path / "m.tflite"
    bad.write_bytes(b"\x1c\x00\x00\x00NOPE" + bytes(32))
    line = _cli_error(["compile", bad, "-o", tmp_path / "o"], capsys)
    assert "not a TFLite flatbuffer" in line


def test_missing_extra_gives_a_one_line_hint(models, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tflite", None)  # `import tflite` raises ImportError
    line = _cli_error(["compile", models / "mlp_float.tflite", "-o", tmp_path / "o"], capsys)
    assert "pip install 'tvmq[tflite]'" in line
