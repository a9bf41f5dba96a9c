"""PackInt8DenseCUDA + the dp4a kernel: PTX for sm_75..sm_90, and the math checked on the CPU twin."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

import tvmq.passes  # noqa: F401  (before tvmq.kernels: it breaks an import cycle)
from tvmq.build import build, build_with_info, export_library
from tvmq.kernels.cuda_int8 import (
    KERNEL_NAME,
    CudaDenseTiles,
    choose_cuda_tiles,
    int8_dense_dp4a,
    int8_dense_reference,
    kernels_for_cpu,
    pack_weight_dp4a,
    padded_mkn,
)
from tvmq.kernels.x86_int8 import KERNEL_ATTR
from tvmq.passes.pack_int8_dense_cuda import PackInt8DenseCUDA, target_has_dp4a
from tvmq.passes.quantize_dynamic import QuantizeDynamic, dynamic_matmul_reference
from tvmq.targets import get_target

has_gpu = pytest.mark.skipif(
    not tvm.runtime.enabled("cuda") or not tvm.cuda(0).exist, reason="no CUDA GPU"
)

# (preset or tag, arch in the PTX)
CUDA_TARGETS = [
    ("nvidia/nvidia-t4", "sm_75"),
    ("cuda-sm80", "sm_80"),
    ("nvidia/geforce-rtx-3080", "sm_86"),
    ("cuda-sm90", "sm_90a"),
]


def _preset(name: str):
    if "/" in name:  # a TVM tag on the sm80 preset's host
        return dataclasses.replace(get_target("cuda-sm80"), name=name, target={"tag": name})
    return get_target(name)


def _dense_module(m_shape, k, n, x_dtype, rng):
    """``main(x) = matmul(x, W_const, out_dtype=int32)`` and its int8 weight."""
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    x = relax.Var("x", relax.TensorType((*m_shape, k), x_dtype))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        y = bb.emit(relax.op.matmul(x, relax.const(w, "int8"), out_dtype="int32"))
        bb.emit_func_output(y)
    return bb.get(), w


def _run_on_cpu(mod, *inputs):
    ex = relax.build(kernels_for_cpu(mod), target=get_target("host").tvm_target())
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*(tvm.runtime.tensor(a) for a in inputs))
    return (out if hasattr(out, "numpy") else out[0]).numpy()


def _ptx_of(ex, preset, path):
    """The ``.so`` a build exports, as bytes (its PTX is embedded as text)."""
    export_library(ex, path, preset)
    return path.read_bytes()


SM75 = tvm.target.Target({"tag": "nvidia/nvidia-t4"})  # dp4a (no int8 mma.sync before sm_80)


@pytest.fixture(scope="module")
def quantized_mlp():
    from tvmq.demo import make_mlp
    from tvmq.frontends import import_model
    from tvmq.quantization import quantize

    torch.manual_seed(0)
    model = make_mlp().eval()
    imported = import_model(model, example_inputs=(torch.zeros(4, 784),))
    calib = np.random.default_rng(0).random((32, 784), dtype=np.float32)
    return quantize(imported, calib, "int8", progress=False, evaluate=False).mod


@pytest.fixture(scope="module")
def dynamic_mlp():
    """(torch MLP, its int8-dynamic module): uint8 activations with run-time row ranges."""
    from tvmq.frontends.pytorch import from_pytorch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
    ).eval()
    return model, QuantizeDynamic()(from_pytorch(model, (torch.zeros(4, 256),)).mod)


# --------------------------------------------------------------------------------------
# Kernel math on the CPU twin


def test_pack_weight_dp4a_layout(rng):
    w = rng.integers(-128, 128, (10, 5), dtype=np.int8)
    packed = pack_weight_dp4a(w, 12, 8)
    assert packed.shape == (3, 8, 4)
    for q, j, r in np.ndindex(*packed.shape):
        k = 4 * q + r
        assert packed[q, j, r] == (w[k, j] if k < 10 and j < 5 else 0)


@pytest.mark.parametrize("with_offset", [False, True])
@pytest.mark.parametrize(
    "tiles",
    [CudaDenseTiles(64, 64, 32, 4, 4), CudaDenseTiles(16, 32, 64, 1, 2)],
    ids=["64x64", "16x32"],
)
def test_cpu_twin_of_scheduled_kernel_matches_numpy(rng, tiles, with_offset):
    m, k, n = 2 * tiles.bm, 3 * tiles.bk, 2 * tiles.bn
    func = int8_dense_dp4a(m, k, n, with_offset=with_offset, tiles=tiles, device="cpu")
    lib = tvm.compile(func.with_attr("global_symbol", "main"), target="llvm")
    x = rng.integers(-128, 128, (m, k), dtype=np.int8)
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    off = rng.integers(-(1 << 20), 1 << 20, n, dtype=np.int32)
    args = [tvm.runtime.tensor(x), tvm.runtime.tensor(pack_weight_dp4a(w, k, n))]
    if with_offset:
        args.append(tvm.runtime.tensor(off))
    out = tvm.runtime.tensor(np.zeros((m, n), np.int32))
    lib(*args, out)
    expected = x.astype(np.int32) @ w.astype(np.int32) + (off if with_offset else 0)
    np.testing.assert_array_equal(out.numpy(), expected)


def test_cuda_kernel_is_tensorized_with_dp4a():
    func = int8_dense_dp4a(64, 64, 64, tiles=CudaDenseTiles(64, 64, 32, 4, 4))
    text = func.script()
    assert '"__dp4a"' in text and 'thread="threadIdx.x"' in text and 'scope="shared"' in text
    assert func.attrs["tirx.is_scheduled"] and func.attrs[KERNEL_ATTR] == KERNEL_NAME
    # Same computation as the unscheduled reference, only the loop nest differs.
    assert len(func.params) == len(int8_dense_reference(64, 64, 64).params)


@pytest.mark.parametrize(("m", "k", "n"), [(4, 784, 128), (128, 768, 3072), (300, 20, 10)])
def test_choose_cuda_tiles_fit(m, k, n):
    tiles = choose_cuda_tiles(m, k, n)
    tiles.validate()
    mp, kp, np_ = padded_mkn(m, k, n, tiles)
    assert mp % tiles.bm == kp % tiles.bk == np_ % tiles.bn == 0
    assert mp - m < tiles.bm and tiles.shared_bytes <= 48 * 1024


# --------------------------------------------------------------------------------------
# The pass: rewrite, then the rewritten module's math on the CPU twin


def test_pass_is_noop_off_cuda(rng):
    mod, _ = _dense_module((4,), 32, 16, "int8", rng)
    assert PackInt8DenseCUDA(get_target("host").tvm_target())(mod).same_as(mod)
    assert not target_has_dp4a(tvm.target.Target({"kind": "cuda", "arch": "sm_52"}))
    assert target_has_dp4a(_preset("cuda-sm80").tvm_target())


@pytest.mark.parametrize(
    ("m_shape", "k", "n", "x_dtype"),
    [((4,), 784, 128, "int8"), ((3, 5), 70, 33, "uint8"), ((37,), 130, 200, "int8")],
)
def test_rewritten_module_matches_numpy_on_cpu(rng, m_shape, k, n, x_dtype):
    mod, w = _dense_module(m_shape, k, n, x_dtype, rng)
    lowered = PackInt8DenseCUDA(SM75)(mod)  # sm_80+ takes int8 to IMMA (test_cuda_mma.py)
    kernels = [
        f
        for _, f in lowered.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs.get(KERNEL_ATTR) == KERNEL_NAME
    ]
    assert len(kernels) == 1 and (len(kernels[0].params) == 4) == (x_dtype == "uint8")
    assert "relax.matmul" not in lowered["main"].script()
    info = np.iinfo(x_dtype)
    x = rng.integers(info.min, info.max + 1, (*m_shape, k), dtype=x_dtype)
    expected = x.astype(np.int32) @ w.astype(np.int32)
    np.testing.assert_array_equal(_run_on_cpu(lowered, x), expected)
    # A second run finds nothing left to rewrite.
    assert PackInt8DenseCUDA(SM75)(lowered).same_as(lowered)


def test_quantized_mlp_rewritten_matches_unrewritten_on_cpu(quantized_mlp, rng):
    lowered = PackInt8DenseCUDA(SM75)(quantized_mlp)
    assert "relax.matmul" not in lowered["main"].script()
    x = rng.random((4, 784), dtype=np.float32)
    ex = relax.build(quantized_mlp, target=get_target("host").tvm_target())
    ref = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))[0].numpy()
    ex = relax.build(kernels_for_cpu(lowered), target=get_target("host").tvm_target())
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))[0].numpy()
    np.testing.assert_array_equal(out, ref)  # integer math: bit-exact


def test_dynamic_mlp_rewritten_matches_numpy_on_cpu(dynamic_mlp, rng):
    """int8-dynamic on CUDA: the run-time row ranges (row_qparams_u8) feed dp4a kernels with
    the uint8 offset; the rewritten module equals numpy's dynamic int8 on random inputs."""
    model, mod = dynamic_mlp
    lowered = PackInt8DenseCUDA(_preset("cuda-sm90").tvm_target())(mod)
    kernels = [
        f
        for _, f in lowered.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs.get(KERNEL_ATTR) == KERNEL_NAME
    ]
    assert len(kernels) == 2 and all(len(f.params) == 4 for f in kernels)  # with offset
    assert "relax.matmul" not in lowered["main"].script()
    (w1, b1), (w2, b2) = (
        (lin.weight.detach().numpy().T, lin.bias.detach().numpy()) for lin in (model[0], model[2])
    )
    for scale in (1.0, 30.0):
        x = (scale * rng.standard_normal((4, 256))).astype(np.float32)
        h = np.maximum(dynamic_matmul_reference(x, w1) + b1, 0)
        expected = dynamic_matmul_reference(h, w2) + b2
        np.testing.assert_allclose(_run_on_cpu(lowered, x), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# PTX for every CUDA arch


@pytest.mark.nvcc
def test_dynamic_mlp_builds_for_sm90_with_dp4a(dynamic_mlp, tmp_path):
    """The run-time range kernel builds for CUDA: its output's pair axis was int32 beside
    int64 rows, and TVM's UnifyThreadBinding then mixed int64 and int32 ("mismatched types")."""
    preset = _preset("cuda-sm90")
    lowered = PackInt8DenseCUDA(preset.tvm_target())(dynamic_mlp[1])
    ex, info = build_with_info(lowered, preset, tuning_logs=None)
    assert sum(k.startswith("tvmq_int8_dense_dp4a") for k in info.prescheduled) == 2
    assert any(k.startswith("row_qparams_u8") for k in info.default)
    data = _ptx_of(ex, preset, tmp_path / "mlp.so")
    assert re.findall(rb"\.target (sm_\w+)", data) == [b"sm_90a"]
    assert b"dp4a.s32.s32" in data and b"row_qparams_u8" in data


@pytest.mark.nvcc
@pytest.mark.slow
@pytest.mark.parametrize(("name", "arch"), CUDA_TARGETS, ids=[a for _, a in CUDA_TARGETS])
def test_quantized_mlp_ptx_uses_dp4a_or_imma(quantized_mlp, tmp_path, name, arch):
    """dp4a before sm_80; int8 tensor cores (mma.sync m16n8k32 s8, test_cuda_mma.py) from sm_80."""
    preset = _preset(name)
    lowered = PackInt8DenseCUDA(preset.tvm_target())(quantized_mlp)
    ex, info = build_with_info(lowered, preset, tuning_logs=None)
    kernel = "dp4a" if arch == "sm_75" else "imma"
    int8_kernels = [k for k in info.prescheduled if k.startswith(f"tvmq_int8_dense_{kernel}")]
    assert len(int8_kernels) == 2  # both layers, kept off dlight's Fallback rule
    assert not any("matmul" in k for k in info.default)
    assert (kernel == "imma") == (set(dict(info.tensor_core)) == set(int8_kernels))
    path = tmp_path / "mlp.so"
    export_library(ex, path, preset)
    data = path.read_bytes()
    assert re.findall(rb"\.target (sm_\w+)", data) == [arch.encode()]
    if kernel == "dp4a":
        assert b"dp4a.s32.s32" in data
    else:
        assert b"mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in data and b"ldmatrix" in data


# --------------------------------------------------------------------------------------
# On a real GPU


def _time(fn, repeat: int = 50) -> float:
    fn()
    tvm.cuda(0).sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    tvm.cuda(0).sync()
    return (time.perf_counter() - start) / repeat


@has_gpu
@pytest.mark.gpu
def test_gpu_mlp_and_gemm_match_numpy(quantized_mlp, rng):
    preset = get_target("cuda-sm80")
    arch = tvm.target.Target.from_device(tvm.cuda(0)).attrs["arch"]
    preset = dataclasses.replace(preset, target={**dict(preset.target), "arch": str(arch)})
    dev = tvm.cuda(0)

    # The demo MLP: the GPU build equals the CPU build of the same quantized model.
    x = rng.random((4, 784), dtype=np.float32)
    ex = relax.build(quantized_mlp, target=get_target("host").tvm_target())
    ref = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))[0].numpy()
    vm = relax.VirtualMachine(
        build(PackInt8DenseCUDA(preset.tvm_target())(quantized_mlp), preset), dev
    )
    out = vm["main"](tvm.runtime.tensor(x, dev))[0].numpy()
    np.testing.assert_array_equal(out, ref)

    # The GEMM 128x768x3072, int8 vs fp32.
    m, k, n = 128, 768, 3072
    mod, w = _dense_module((m,), k, n, "int8", rng)
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    vm8 = relax.VirtualMachine(build(PackInt8DenseCUDA(preset.tvm_target())(mod), preset), dev)
    a_dev = tvm.runtime.tensor(a, dev)
    np.testing.assert_array_equal(
        vm8["main"](a_dev).numpy(), a.astype(np.int32) @ w.astype(np.int32)
    )
    xf = relax.Var("x", relax.TensorType((m, k), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [xf]):
        bb.emit_func_output(bb.emit(relax.op.matmul(xf, relax.const(w.astype(np.float32)))))
    vm32 = relax.VirtualMachine(build(bb.get(), preset), dev)
    af_dev = tvm.runtime.tensor(a.astype(np.float32), dev)
    t8 = _time(lambda: vm8["main"](a_dev))
    t32 = _time(lambda: vm32["main"](af_dev))
    print(f"GEMM {m}x{k}x{n}: int8 dp4a {t8 * 1e3:.3f} ms, fp32 {t32 * 1e3:.3f} ms")


@pytest.mark.nvcc
@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic"])
def test_bert_layer_int8_builds_for_sm90_with_dp4a(tmp_path, scheme):
    """A random 1-layer BERT in static and dynamic int8 for cuda-sm90 (MiniLM's layers, small):
    every dense layer is an integer kernel in the PTX: IMMA tensor cores for int8
    activations, dp4a for uint8 ones (after GELU / ReLU, and all of int8-dynamic's). Both
    failed with "mismatched types"."""
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import zoo

    import tvmq

    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=200, initializer_range=0.1, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    bert = transformers.BertModel(cfg, add_pooling_layer=False)
    model = zoo._HiddenStates(bert, pool=True).eval()
    ids, mask = zoo.token_inputs(2, 16, 200, seed=100)
    c_ids, c_mask = zoo.token_inputs(2, 16, 200, seed=7)
    calib = [{"input_ids": c_ids.numpy(), "attention_mask": c_mask.numpy()}]
    tvmq.compile(
        model,
        "cuda-sm90",
        example_inputs=(ids, mask),
        quantize=scheme,
        calibration_data=calib if scheme == "int8" else None,
        output_dir=tmp_path / "build",
        progress=False,
    )
    kernels = json.loads((tmp_path / "build" / "model.json").read_text())["notes"]["kernels"]
    dense = [k for k in kernels["prescheduled"] if re.match(r"tvmq_int8_dense_(dp4a|imma)_", k)]
    # The FFN out (64x32) reads GELU's uint8 output: dp4a. q / k / v / attention output (32x32)
    # and FFN in (32x64) read int8 in static int8 (IMMA, K and N padded to its tiles), uint8
    # in int8-dynamic (dp4a, N padded to 32)
    dp4a = {tuple(re.findall(r"_(\d+)x(\d+)x(\d+)", k)[0][1:]) for k in dense if "dp4a" in k}
    imma = [k for k in dense if "imma" in k]
    if scheme == "int8":
        assert dp4a == {("64", "32")} and imma
    else:
        assert dp4a == {("32", "32"), ("32", "64"), ("64", "32")} and not imma
    data = (tmp_path / "build" / "model.so").read_bytes()
    assert re.findall(rb"\.target (sm_\w+)", data) == [b"sm_90a"]
    entries = set(re.findall(rb"\.entry (\w+)_kernel", data))
    assert {k.encode() for k in dense} <= entries and b"dp4a.s32.s32" in data
    if any("imma" in k for k in dense):
        assert b"mma.sync.aligned.m16n8k32" in data
