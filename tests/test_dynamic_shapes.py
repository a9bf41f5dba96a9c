"""Dynamic shapes end to end: one library for any batch and sequence length.

A 1-layer random-weight BERT (``transformers``, eager attention) is exported to ONNX with
dynamic ``batch`` / ``seq`` axes and compiled once per scheme (float, int8-dynamic, static
int8 calibrated on batches of two other shapes) with both dims symbolic. At several
(batch, seq) pairs its output is checked against ONNX Runtime on the same file (float:
max abs error < 1e-4; int8: SQNR >= 25 dB) and, at one pair, against a static build of the
same scheme pinned to that shape (float: < 1e-5 relative; int8, same calibration: SQNR
>= 40 dB, as float kernels that differ in summation order may move a value across a
rounding step). The manifest records the symbolic dims, ``tvmq.load`` accepts any
size for them and refuses a wrong rank or static dim, and the VNNI int8 dense kernel (where
the CPU has it) is the one for a symbolic row count, not TVM's default matmul.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import zoo  # noqa: E402

import tvmq  # noqa: E402
from tvmq.errors import InputMismatchError, TvmqError  # noqa: E402
from tvmq.frontends.onnx import from_onnx  # noqa: E402

pytestmark = pytest.mark.slow  # six small compiles: about 3 min on 2 cores

NAMES = ["input_ids", "attention_mask"]
PAIRS = [(1, 5), (3, 16), (2, 33)]
STATIC_PAIR = (2, 12)
VOCAB = 200


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory) -> Path:
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=VOCAB, initializer_range=0.1, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = zoo._HiddenStates(transformers.BertModel(cfg, add_pooling_layer=False)).eval()
    example = zoo.token_inputs(1, 8, VOCAB, seed=0)
    path = tmp_path_factory.mktemp("dyn") / "bert.onnx"
    return zoo.export_onnx(model, example, path, names=NAMES, dynamic_axes={0: "batch", 1: "seq"})


def _feed(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    ids, mask = zoo.token_inputs(batch, seq, VOCAB, seed=seed)
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def _sqnr_db(y, ref) -> float:
    return float(20 * np.log10(np.linalg.norm(ref) / np.linalg.norm(y - ref)))


# Batches of other shapes than any checked; the static build (2, 12) takes them too (any rows).
CALIB = [_feed(4, 12, seed=1), _feed(3, 12, seed=2)]
SCHEMES = {
    "float": {},
    "int8-dynamic": {"quantize": "int8-dynamic"},
    "int8": {"quantize": "int8", "calibration_data": CALIB},
}


@pytest.fixture(scope="module")
def builds(onnx_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("dyn-builds")
    cache = {}

    def get(scheme: str, static: bool = False):
        key = (scheme, static)
        if key not in cache:
            out = root / f"{scheme}-{'static' if static else 'dyn'}"
            shapes = {n: list(STATIC_PAIR) for n in NAMES} if static else None
            tvmq.compile(onnx_path, output_dir=out, input_shapes=shapes, progress=False,
                         tuning_logs=None, **SCHEMES[scheme])  # fmt: skip
            cache[key] = out
        return cache[key]

    return get


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_one_library_matches_onnxruntime_and_static_builds(scheme, onnx_path, builds):
    dyn = tvmq.load(builds(scheme))
    assert [s.shape for s in dyn.inputs] == [("batch", "seq")] * 2
    assert dyn.outputs[0].shape == ("batch", "seq", 32)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for b, s in PAIRS:
        f = _feed(b, s, seed=b * 100 + s)
        y, ref = dyn(**f), sess.run(None, f)[0]
        assert y.shape == (b, s, 32)
        if scheme == "float":
            assert np.abs(y - ref).max() < 1e-4, (b, s)
        else:
            assert _sqnr_db(y, ref) >= 25.0, (b, s, _sqnr_db(y, ref))
    static = tvmq.load(builds(scheme, static=True))
    assert [s.shape for s in static.inputs] == [STATIC_PAIR] * 2
    f = _feed(*STATIC_PAIR, seed=5)
    y, ref = dyn(**f), static(**f)
    if scheme == "float":
        assert np.abs(y - ref).max() < 1e-5 * max(1.0, np.abs(ref).max())
    else:  # same integer kernels and ranges; float parts may round a value to the next step
        assert _sqnr_db(y, ref) >= 40.0, _sqnr_db(y, ref)


@pytest.mark.vnni
def test_int8_dense_runs_on_the_vnni_kernel_for_symbolic_rows(builds):
    notes = json.loads((builds("int8") / "model.json").read_text())["notes"]["kernels"]
    assert any(k.startswith("tvmq_int8_dense_vnni_Mx") for k in notes["prescheduled"])
    # what no tvmq kernel took is listed, and no weight matmul is among it
    assert not any("dense" in k for k in notes.get("symbolic_default", []))


def test_inputs_are_checked_against_static_dims_and_symbols(builds):
    m = tvmq.load(builds("float"))
    with pytest.raises(InputMismatchError, match=r"rank 1.*compiled for \(batch, seq\)"):
        m(input_ids=np.zeros(4, np.int64), attention_mask=np.zeros(4, np.int64))
    with pytest.raises(InputMismatchError, match=r"seq=5 at axis 1.*seq=6"):
        m(input_ids=np.zeros((1, 6), np.int64), attention_mask=np.zeros((1, 5), np.int64))


def test_calibration_of_the_wrong_rank_is_one_line(onnx_path, tmp_path):
    bad = [
        {"input_ids": np.ones((2, 3, 4), np.int64), "attention_mask": np.ones((2, 3, 4), np.int64)}
    ]
    with pytest.raises(TvmqError, match=r"calibration data: input 'input_ids'.*rank 3") as err:
        tvmq.compile(onnx_path, output_dir=tmp_path / "x", quantize="int8",
                     calibration_data=bad, progress=False)  # fmt: skip
    assert "\n" not in str(err.value)
    assert not (tmp_path / "x").exists()


def test_pinned_and_named_dims(onnx_path):
    """A dynamic dim pinned to a number is static; names given by the user replace the file's."""
    m = tvmq.import_model(str(onnx_path), input_shapes={n: ["B", 16] for n in NAMES})
    assert [s.shape for s in m.inputs] == [("B", 16)] * 2
    proto = onnx.load(onnx_path)
    proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 16
    with pytest.raises(TvmqError, match=r"input 'input_ids' is declared \[batch, 16\].*static"):
        from_onnx(proto, {"input_ids": [1, "S"]})


def test_cli_inspect_and_run_show_symbolic_dims(onnx_path, builds, tmp_path, capsys):
    from tvmq.cli import main

    assert main(["inspect", str(onnx_path), "--input-shape", "input_ids:Bx16",
                 "--input-shape", "attention_mask:Bx16"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "input  input_ids: [B, 16] int64" in out and "output output: [B, 16, 32]" in out
    np.savez(tmp_path / "in.npz", **_feed(2, 7))
    assert main(["run", str(builds("float")), "-i", str(tmp_path / "in.npz")]) == 0
    out = capsys.readouterr().out
    assert "input_ids: compiled for (batch, seq), ran (2, 7)" in out
    assert "output: shape (2, 7, 32) float32" in out
