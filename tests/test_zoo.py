"""The model zoo (bench/zoo.py, small sizes) through tvmq: float and int8, PyTorch and ONNX.

- float: tvmq's output vs ONNX Runtime's on the same model (the legacy-exported ONNX file for
  the PyTorch source; the file itself for an ONNX source), relative error
  max|a - b| / max|b| < 1e-4;
- static int8 (calibrated on 8 natural-looking inputs, checked on 2 others): vs PyTorch float,
  SQNR >= 30 dB for CNNs, cosine >= 0.99 for transformers; and, on the same calibration data,
  no worse than ONNX Runtime's static QDQ quantization (per-channel int8 weights, uint8
  activations, min-max) by more than 1 dB SQNR, an independent reference of what int8 PTQ
  reaches on the model;
- int8-dynamic (transformers): cosine >= 0.99 vs PyTorch float.

Every model comes from PyTorch (torch.export) and from one ONNX exporter (legacy or dynamo,
alternating); a subset from the other exporter too. Static int8 runs on every model but
ResNet-50 (ResNet-18's op types; the int8 builds are most of this file's run time) and from
ONNX on GPT-2. It goes through ``quantize(..., evaluate=False)`` + ``compile``, the pipeline
of ``compile(quantize="int8")`` without its extra evaluation build (checked: identical
outputs), except for DistilBERT, which takes ``compile(quantize="int8")`` itself.

Failures are marked ``xfail(strict=True, raises=...)`` with the reason, so the suite stays
green, the failure stays written down, and a fix shows up as an XPASS to be unmarked.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")
pytest.importorskip("onnxscript")  # the dynamo exporter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import zoo  # noqa: E402

import tvmq  # noqa: E402

pytestmark = pytest.mark.slow

MODELS = list(zoo.ZOO)
CNNS = [n for n in MODELS if n in ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small",
                                   "efficientnet_b0", "yolo_neck", "unet")]  # fmt: skip
TRANSFORMERS = [n for n in MODELS if n not in CNNS]
# Each model from one ONNX exporter, alternating; the other exporter on this subset.
ONNX_OF = {n: ("onnx-legacy" if i % 2 == 0 else "onnx-dynamo") for i, n in enumerate(MODELS)}
BOTH_EXPORTERS = ["mobilenet_v3_small", "gpt2"]
# compile(quantize="int8") end to end (the others: quantize(evaluate=False) + compile).
FULL_COMPILE_INT8 = "distilbert"

REL_TOL = 1e-4
CNN_SQNR_DB = 30.0
TRANSFORMER_COSINE = 0.99
ORT_MARGIN_DB = 1.0

# --- known failures (tvmq bugs), with the error they raise --------------------------------
# Not a tvmq bug, but the zoo's threshold not being met: static int8 of these random-weight
# CNNs reaches 12-24 dB with ONNX Runtime's quantize_static too (same data; min-max, entropy
# and percentile calibration all within 1.5 dB): the 30 dB of issue 13 is out of reach of
# per-tensor int8 activations on random-weight networks.
CNN_SQNR = (
    "static int8 SQNR 13-24 dB < 30 dB on this random-weight CNN; ONNX Runtime's static QDQ "
    "int8 is as low (test_int8_static_no_worse_than_onnxruntime passes)"
)


def _xfail(reason: str, raises):
    return pytest.mark.xfail(strict=True, reason=reason, raises=raises)


KNOWN = {
    **{("int8", n, "torch"): (CNN_SQNR, AssertionError) for n in CNNS},
}


def _cases(check: str, pairs):
    return [
        pytest.param(n, s, id=f"{n}-{s}", marks=[_xfail(*KNOWN[check, n, s])])
        if (check, n, s) in KNOWN
        else pytest.param(n, s, id=f"{n}-{s}")
        for n, s in pairs
    ]


FLOAT_CASES = _cases(
    "float",
    [(n, "torch") for n in MODELS]
    + [(n, ONNX_OF[n]) for n in MODELS]
    + [
        (n, "onnx-dynamo" if ONNX_OF[n] == "onnx-legacy" else "onnx-legacy") for n in BOTH_EXPORTERS
    ],
)
# int8 from PyTorch for every model but ResNet-50, from ONNX for GPT-2.
INT8_PAIRS = [(n, "torch") for n in MODELS if n != "resnet50"] + [("gpt2", "onnx-legacy")]
INT8_CASES = _cases("int8", INT8_PAIRS)
INT8_ORT_CASES = _cases("int8-ort", INT8_PAIRS)
DYNAMIC_CASES = _cases("int8-dynamic", [(n, "torch") for n in TRANSFORMERS])


# --- shared work (cached: each model is built, exported and compiled once per run) ----------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zoo")


@functools.cache
def _model(name: str):
    model, example, kind = zoo.build(name, "small")
    calib = zoo.natural_inputs(model, example, 8, seed=1)
    tests = zoo.natural_inputs(model, example, 2, seed=2)
    with torch.no_grad():
        refs = [model(*t).numpy() for t in tests]
    return model, example, kind, zoo.input_names(example, kind), calib, tests, refs


@functools.cache
def _onnx(name: str, exporter: str, workdir: Path) -> Path:
    model, example, kind, names, *_ = _model(name)
    return zoo.export_onnx(model, example, workdir / f"{name}-{exporter}.onnx",
                           exporter=exporter, names=names)  # fmt: skip


def _source(name: str, source: str, workdir: Path):
    """(model argument, keyword arguments) of tvmq.compile for ``source``."""
    model, example, *_ = _model(name)
    if source == "torch":
        return model, {"example_inputs": example}
    return str(_onnx(name, source.removeprefix("onnx-"), workdir)), {}


def _feed(names, inputs) -> dict[str, np.ndarray]:
    return dict(zip(names, zoo.as_numpy(inputs), strict=True))


def _calibration(name: str):
    *_, names, calib, _, _ = _model(name)
    return [_feed(names, c) for c in calib]


@functools.cache
def _tvmq_outputs(name: str, source: str, quantize: str | None, workdir: Path):
    """tvmq's outputs on the model's test inputs, built from ``source`` with ``quantize``."""
    *_, names, _, tests, _ = _model(name)
    model, kwargs = _source(name, source, workdir)
    out = workdir / f"{name}-{source}-{quantize}"
    if quantize == "int8":
        kwargs["calibration_data"] = _calibration(name)
        if name != FULL_COMPILE_INT8:
            from tvmq.compiler import scheme_for_target
            from tvmq.quantization import quantize as run_quantize
            from tvmq.targets import get_target

            imported = tvmq.import_model(model, example_inputs=kwargs.get("example_inputs"))
            scheme = scheme_for_target("int8", get_target("host"))
            model = run_quantize(imported, kwargs["calibration_data"], scheme, progress=False,
                                 evaluate=False).model  # fmt: skip
            kwargs, quantize = {}, None
    tvmq.compile(model, "host", output_dir=out, quantize=quantize, progress=False,
                 tuning_logs=None, **kwargs)  # fmt: skip
    compiled = tvmq.load(out)
    return [np.asarray(compiled(**_feed(names, t))) for t in tests]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _sqnr_db(y: np.ndarray, ref: np.ndarray) -> float:
    return float(20 * np.log10(np.linalg.norm(ref) / np.linalg.norm(y - ref)))


def _cosine(y: np.ndarray, ref: np.ndarray) -> float:
    y, ref = y.ravel().astype(np.float64), ref.ravel().astype(np.float64)
    return float(y @ ref / (np.linalg.norm(y) * np.linalg.norm(ref)))


def _session(path: Path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


# --- the checks ------------------------------------------------------------------------


def test_zoo_builds_every_architecture_in_both_sizes():
    """Every builder's contract: eval mode, seeded (same weights twice), kind, finite output."""
    for name in MODELS:
        model, example, kind = zoo.build(name, "small")
        again, _, _ = zoo.build(name, "small")
        assert not model.training and kind in ("cnn", "transformer"), name
        assert (kind == "cnn") == (name in CNNS), name
        with torch.no_grad():
            y, y2 = model(*example), again(*example)
        assert torch.isfinite(y).all() and y.abs().max() > 0, name
        torch.testing.assert_close(y, y2, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="size"):
        zoo.build("resnet18", "medium")


def test_cnn_batchnorm_statistics_are_not_the_identity():
    """Random BN statistics: running mean/var differ from 0/1 and between channels."""
    model, *_ = zoo.build("resnet18", "small")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert bn.running_var.std() > 1e-3 and (bn.running_var - 1).abs().max() > 0.05
        assert bn.running_mean.abs().max() > 1e-3
        assert bn.weight.std() > 0.05


@pytest.mark.parametrize("name,source", FLOAT_CASES)
def test_float_matches_onnxruntime(name, source, workdir):
    *_, names, _, tests, _ = _model(name)
    onnx_file = _onnx(
        name, "legacy" if source == "torch" else source.removeprefix("onnx-"), workdir
    )
    sess = _session(onnx_file)
    ys = _tvmq_outputs(name, source, None, workdir)
    for y, t in zip(ys, tests, strict=True):
        ref = sess.run(None, _feed(names, t))[0]
        assert y.shape == ref.shape
        assert _rel(y, ref) < REL_TOL, (name, source, _rel(y, ref))


@pytest.mark.parametrize("name,source", INT8_CASES)
def test_int8_static_accuracy(name, source, workdir):
    model, example, kind, *_, refs = _model(name)
    ys = _tvmq_outputs(name, source, "int8", workdir)
    if kind == "cnn":
        worst = min(_sqnr_db(y, r) for y, r in zip(ys, refs, strict=True))
        assert worst >= CNN_SQNR_DB, f"{name} int8 SQNR {worst:.1f} dB"
    else:
        worst = min(_cosine(y, r) for y, r in zip(ys, refs, strict=True))
        assert worst >= TRANSFORMER_COSINE, f"{name} int8 cosine {worst:.4f}"


@functools.cache
def _ort_static_sqnr(name: str, workdir: Path) -> float:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    logging.getLogger().setLevel(logging.ERROR)
    *_, names, _, tests, refs = _model(name)
    src = _onnx(name, "legacy", workdir)
    pre, dst = workdir / f"{name}-pre.onnx", workdir / f"{name}-ort-int8.onnx"
    quant_pre_process(str(src), str(pre))
    batches = iter(_calibration(name))

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)  # fmt: skip
    sess = _session(dst)
    return min(
        _sqnr_db(sess.run(None, _feed(names, t))[0], r) for t, r in zip(tests, refs, strict=True)
    )


@pytest.mark.parametrize("name,source", INT8_ORT_CASES)
def test_int8_static_no_worse_than_onnxruntime(name, source, workdir):
    *_, refs = _model(name)
    ys = _tvmq_outputs(name, source, "int8", workdir)
    ours = min(_sqnr_db(y, r) for y, r in zip(ys, refs, strict=True))
    theirs = _ort_static_sqnr(name, workdir)
    assert ours >= theirs - ORT_MARGIN_DB, f"{name}: tvmq {ours:.1f} dB, ORT {theirs:.1f} dB"


@pytest.mark.parametrize("name,source", DYNAMIC_CASES)
def test_int8_dynamic_accuracy(name, source, workdir):
    *_, refs = _model(name)
    ys = _tvmq_outputs(name, source, "int8-dynamic", workdir)
    worst = min(_cosine(y, r) for y, r in zip(ys, refs, strict=True))
    assert worst >= TRANSFORMER_COSINE, f"{name} int8-dynamic cosine {worst:.4f}"
