"""`tvmq compile`'s scheme options, the low-SQNR warning, --observer auto, accuracy control,
phase lines, --dump, `tvmq run --profile`, and TVM's repeated warnings collapsed."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tvmq.cli import main

PHASES = [
    "] load TVM",
    "] import",
    "] calibrate",
    "] quantize",
    "] build for host",
    "] link and export",
    "] done",
]


def run_cli(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory):
    """A 16-32-8 MLP (batch 8) whose calibration data has one outlier value: minmax ranges
    stretch to it and the int8 output SQNR drops to ~18 dB; entropy ranges give ~37 dB."""
    d = tmp_path_factory.mktemp("outlier")
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    m = m.eval()
    torch.export.save(torch.export.export(m, (torch.zeros(8, 16),)), d / "m.pt2")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 16)).astype("float32")
    np.savez(d / "good.npz", x=x.copy())
    x[118, 3] = 100.0
    np.savez(d / "outlier.npz", x=x)
    xe = rng.standard_normal((40, 16)).astype("float32")
    with torch.no_grad():
        labels = m(torch.from_numpy(xe)).argmax(1).numpy()
    np.savez(d / "eval.npz", x=xe, labels=labels)
    return m, d


def _quantize_report(out_dir):
    return json.loads((out_dir / "model.json").read_text())["compression"]["quantize"]


def test_scheme_options_reach_the_build_and_phases_are_printed(capsys, tmp_path, outlier_model):
    m, d = outlier_model
    out = tmp_path / "b"
    code, stdout, err = run_cli(
        capsys, "compile", d / "m.pt2", "-o", out, "--quantize", "int8", "--calib",
        d / "good.npz", "--per-tensor", "--requantize", "integer", "--no-smooth",
        "--bias-correction",
    )  # fmt: skip
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("tvmq: [")]
    assert [p for p in PHASES if any(p in line for line in lines)] == PHASES, err
    assert [next(i for i, ln in enumerate(lines) if p in ln) for p in PHASES] == sorted(
        next(i for i, ln in enumerate(lines) if p in ln) for p in PHASES
    )
    assert "warning" not in err
    q = _quantize_report(out)
    scheme = q["scheme"]
    assert scheme["weight_per_channel"] is False and scheme["requantize"] == "integer"
    assert scheme["smooth"] == [] and q["bias_correction"]
    assert min(q["output_sqnr_db"]) > 20
    x = np.load(d / "good.npz")["x"][:8]
    np.savez(tmp_path / "x.npz", x=x)
    code, _, err = run_cli(capsys, "run", out, "-i", tmp_path / "x.npz", "-o", tmp_path / "y.npz")
    assert code == 0, err
    with torch.no_grad():
        ref = m(torch.from_numpy(x)).numpy()
    y = np.load(tmp_path / "y.npz")["output0"]
    assert np.abs(y - ref).max() < 0.1 * np.abs(ref).max()


def test_low_sqnr_warns_once_and_observer_auto_fixes_it(capsys, tmp_path, outlier_model):
    _, d = outlier_model
    common = ["--quantize", "int8", "--calib", d / "outlier.npz"]
    code, _, err = run_cli(capsys, "-q", "compile", d / "m.pt2", "-o", tmp_path / "a", *common)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1, err
    assert "int8 output SQNR" in warnings[0] and "< 20 dB" in warnings[0]
    assert "matmul_0" in warnings[0] and "--skip matmul_" in warnings[0]
    assert "--observer auto" in warnings[0] and "--accuracy-drop" in warnings[0]
    assert min(_quantize_report(tmp_path / "a")["output_sqnr_db"]) < 20

    code, _, err = run_cli(
        capsys, "compile", d / "m.pt2", "-o", tmp_path / "b", *common, "--observer", "auto"
    )
    assert code == 0, err
    assert "warning" not in err
    q = _quantize_report(tmp_path / "b")
    choice = q["observer_choice"]
    assert choice["chosen"] != "minmax" and f"observer auto chose {choice['chosen']}" in err
    assert set(choice["output_sqnr_db"]) == {"minmax", "percentile", "entropy", "mse"}
    best = min(choice["output_sqnr_db"][choice["chosen"]])
    assert best == max(min(v) for v in choice["output_sqnr_db"].values())
    assert min(q["output_sqnr_db"]) >= 20  # measured again, on the build itself


def test_accuracy_control_returns_layers_to_float(capsys, tmp_path, outlier_model):
    _, d = outlier_model
    code, _, err = run_cli(
        capsys, "-q", "compile", d / "m.pt2", "-o", tmp_path / "a", "--quantize", "int8",
        "--calib", d / "outlier.npz", "--accuracy-drop", "0", "--eval", d / "eval.npz",
    )  # fmt: skip
    assert code == 0, err
    control = _quantize_report(tmp_path / "a")["accuracy_control"]
    assert control["float_metric"] == 100.0  # the labels are the float model's predictions
    assert control["met"] == (control["metric"] >= 100.0)
    q = _quantize_report(tmp_path / "a")
    float_layers = [r["name"] for r in q["layers"] if not r["quantized"]]
    assert float_layers == control["float_layers"]


def test_eval_file_must_hold_the_inputs(capsys, tmp_path, outlier_model):
    _, d = outlier_model
    np.savez(tmp_path / "e.npz", a=np.zeros((4, 16), np.float32), b=np.zeros((4, 16), np.float32))
    code, _, err = run_cli(
        capsys, "-q", "compile", d / "m.pt2", "-o", tmp_path / "a", "--quantize", "int8",
        "--calib", d / "good.npz", "--accuracy-drop", "1", "--eval", tmp_path / "e.npz",
    )  # fmt: skip
    assert code == 2 and "no array for input" in err and err.count("\n") == 1
    assert not (tmp_path / "a").exists()


def test_dump_writes_ir_llvm_and_asm_and_never_replaces(capsys, tmp_path, outlier_model):
    _, d = outlier_model
    dump = tmp_path / "dump"
    code, stdout, err = run_cli(
        capsys, "-q", "compile", d / "m.pt2", "-o", tmp_path / "b", "--dump", "ir,ll,asm", dump
    )
    assert code == 0, err
    assert "def main" in (dump / "model.relax.py").read_text()
    assert "define " in (dump / "model.ll").read_text()
    assert ".text" in (dump / "model.s").read_text()
    before = (dump / "model.ll").read_bytes()
    code, _, err = run_cli(
        capsys, "-q", "compile", d / "m.pt2", "-o", tmp_path / "c", "--dump", "ll", dump
    )
    assert code == 2 and "already exist" in err and not (tmp_path / "c").exists()
    assert (dump / "model.ll").read_bytes() == before


def test_run_profile_lists_the_slowest_kernels(capsys, tmp_path, compiled_mlp_dir):
    np.savez(tmp_path / "x.npz", x=np.ones((2, 32), np.float32))
    code, out, err = run_cli(
        capsys, "run", compiled_mlp_dir, "-i", tmp_path / "x.npz", "--profile", "3"
    )
    assert code == 0, err
    table = out[out.index("kernel times") :].splitlines()[1:]
    assert table[0].split() == ["kernel", "calls", "us/run", "share"]
    assert table[-1].startswith("total") and table[-1].endswith("100.0%")
    rows = [line.split() for line in table[1:-1] if not line.startswith("(")]
    assert len(rows) == 2  # the MLP's two fused kernels, named
    assert all("matmul" in r[0] and r[1] == "1" for r in rows)
    ms = [float(r[-2]) for r in rows]
    assert ms == sorted(ms, reverse=True) and ms[-1] > 0
    shares = [float(line.split()[-1].rstrip("%")) for line in table[1:-1]]
    assert abs(sum(shares) - 100) < 0.5  # kernels + VM builtins = the total


def test_repeated_tvm_warnings_collapse_to_one_line(capfd):
    import tvm
    from tvm import relax

    from tvmq.progress import collapsed_native_warnings

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((10, 4), "float32"))
    i = relax.Var("i", relax.TensorType((3,), "int64"))
    with bb.function("main", [x, i]):
        a = bb.emit(relax.op.take(x, i, axis=0))  # mode "fast": TVM warns once per take
        b = bb.emit(relax.op.take(x, i, axis=1))
        bb.emit_func_output(relax.Tuple([a, b]))
    capfd.readouterr()
    with collapsed_native_warnings():
        tvm.compile(bb.get(), target="llvm")
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "Fast mode segfaults" in line]
    assert len(lines) == 1 and lines[0].startswith("tvmq: TVM warning (2 times): "), err


def test_smoothquant_and_calibration_bars_say_what_they_do(capsys):
    """SmoothQuant's channel-range pass and calibration used to show two identical bars."""
    from tvmq.frontends import import_model
    from tvmq.quantization import quantize

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 8)).eval()
    model = import_model(m, example_inputs=(torch.zeros(4, 16),))
    x = np.random.default_rng(0).standard_normal((8, 16)).astype("float32")
    capsys.readouterr()
    q = quantize(model, x, "int8", progress=True, evaluate=False)
    err = capsys.readouterr().err
    assert q.pipeline_params["smooth_absmax"]  # SmoothQuant did run
    labels = {line.split(":")[0].split("\r")[-1] for line in err.split("\r") if "batch" in line}
    assert labels == {"tvmq calibrate (SmoothQuant channel ranges)", "tvmq calibrate"}, err


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed")
def test_precision_bf16_builds_for_cuda_on_tensor_cores(capsys, tmp_path, outlier_model):
    _, d = outlier_model
    out = tmp_path / "bf16"
    code, _, err = run_cli(
        capsys, "-q", "compile", d / "m.pt2", "-o", out, "-t", "cuda-sm80", "--precision", "bf16"
    )
    assert code == 0, err
    manifest = json.loads((out / "model.json").read_text())
    assert manifest["compression"]["precision"]["compute"] == "bfloat16 (tensor-core matmuls)"
    kernels = manifest["notes"]["kernels"]
    # both Linear layers (16 -> 32, 32 -> 8) pad to one 16x128x128 kernel
    assert kernels["tensor_core"] == {"tvmq_bf16_dense_mma_16x128x128": "mma.sync.m16n8k16.bf16"}
    assert not [k for k in kernels["default"] if "matmul" in k or "dense" in k]


def test_precision_bf16_refused_on_a_cpu_without_amx_bf16(capsys, tmp_path, outlier_model):
    _, d = outlier_model
    code, _, err = run_cli(
        capsys, "-q", "compile", d / "m.pt2", "-o", tmp_path / "x", "-t", "x86-avx512-vnni",
        "--precision", "bf16",
    )  # fmt: skip
    assert code != 0 and "bf16 needs AMX-BF16 tiles" in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()
