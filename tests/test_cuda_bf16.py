"""--precision bf16 on CUDA: the bf16 tensor-core dense kernel (PTX, ptxas, CPU twin) and its pass.

No GPU is needed (as in tests/test_cuda_mma.py): the kernel is compiled to PTX and by ptxas
here, and its loop nest before tensorization (the CPU twin) runs on the host against numpy
computed from the bf16-rounded operands. Building a CUDA kernel imports TVM's CUDA intrinsics
(35 s to 2 min): those tests are marked slow.
"""

from __future__ import annotations

import json
import re
import subprocess

import ml_dtypes
import numpy as np
import pytest
import torch
import tvm
from tvm import relax

import tvmq
import tvmq.passes  # noqa: F401  (before tvmq.kernels: it breaks an import cycle)
from tvmq.errors import TvmqError
from tvmq.kernels.cuda_mma import (
    TENSOR_CORE_ATTR,
    MmaTiles,
    bf16_batch_matmul_mma,
    bf16_dense_mma,
    choose_mma_tiles,
    fp16_batch_matmul_mma,
    fp16_dense_mma,
    mma_kernels_for_cpu,
    padded_mkn_mma,
)
from tvmq.kernels.x86_int8 import KERNEL_ATTR
from tvmq.passes import PackBf16DenseCUDA, PackMmaBatchMatmulCUDA
from tvmq.pipeline import check_precision
from tvmq.targets import get_target

HOST = get_target("host").tvm_target()
SM80 = get_target("cuda-sm80").tvm_target()
BF16 = ml_dtypes.bfloat16
MMA_BF16 = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"


def _assert_close_fp32_acc(out, x, w):
    """Against float64 products of the bf16-rounded operands (exact in fp32: 8-bit
    mantissas): only the fp32 sum errs, by at most ~K * 2^-24 * sum |x||w|."""
    xb, wb = (np.asarray(a, np.float32).astype(BF16).astype(np.float64) for a in (x, w))
    ref = xb @ wb
    tol = x.shape[-1] * 2.0**-24 * (np.abs(xb) @ np.abs(wb)) + 1e-6
    assert out.dtype == np.float32
    err = np.abs(out.astype(np.float64) - ref)
    assert np.all(err <= tol), err.max()
    # and the rounding did happen: float32 operands would give a visibly different result
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    assert np.abs(exact - ref).max() > 10 * tol.max()


def _dense_module(m_shape, k, n, rng):
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = relax.Var("x", relax.TensorType((*m_shape, k), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        bb.emit_func_output(bb.emit(relax.op.matmul(x, relax.const(w))))
    return bb.get(), w


# --------------------------------------------------------------------------------------
# Fast: the CPU twin, precision checks, the pass off sm_80+


@pytest.mark.parametrize(
    "shape",
    [dict(), dict(warps_m=1, warps_n=4, tiles_m=1, tiles_n=2)],
    ids=["128x128", "16x128"],
)
def test_cpu_twin_of_bf16_kernel_matches_numpy(rng, shape):
    tiles = MmaTiles(**shape, bk=64)
    m, k, n = 2 * tiles.bm, 3 * tiles.bk, 2 * tiles.bn
    func = bf16_dense_mma(m, k, n, tiles=tiles, device="cpu")
    assert func.attrs[KERNEL_ATTR] == "bf16_dense_mma" and TENSOR_CORE_ATTR not in func.attrs
    lib = tvm.compile(func.with_attr("global_symbol", "main"), target="llvm")
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    lib(tvm.runtime.tensor(x.astype(BF16)), tvm.runtime.tensor(w.astype(BF16)), out)
    _assert_close_fp32_acc(out.numpy(), x, w)


def test_bf16_tiles_are_the_fp16_tiles():
    for m, k, n in [(4, 784, 128), (20, 768, 3072), (256, 256, 256), (300, 20, 10)]:
        assert choose_mma_tiles(m, k, n, "bfloat16") == choose_mma_tiles(m, k, n, "float16")


def test_check_precision_bf16_on_cuda_and_cpus():
    for name in ("cuda-sm80", "cuda-sm90"):
        assert check_precision("bf16", get_target(name)) == "bf16"
    for precision, preset, quantize, says in [
        ("bf16", "x86-avx512-vnni", None, "bf16 needs AMX-BF16 tiles"),
        ("bf16", "arm-a76", None, "bf16 needs AMX-BF16 tiles"),
        ("bf16", "cuda-sm90", "int8", "cannot be combined yet"),
        ("bf16", "cuda-sm80", "w8", "cannot be combined yet"),
    ]:
        with pytest.raises(TvmqError, match=says) as err:
            check_precision(precision, get_target(preset), quantize)
        assert "\n" not in str(err.value)


def test_pass_is_noop_off_cuda_and_before_sm80(rng):
    mod, _ = _dense_module((4,), 32, 16, rng)
    assert PackBf16DenseCUDA(HOST)(mod).same_as(mod)
    sm75 = tvm.target.Target({"kind": "cuda", "arch": "sm_75"})
    assert PackBf16DenseCUDA(sm75)(mod).same_as(mod)


def test_compile_refuses_bf16_with_quantize_before_importing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TvmqError, match="cannot be combined yet"):
        tvmq.compile(
            tmp_path / "never-read.onnx", "cuda-sm90", precision="bf16", quantize="w8",
            output_dir=out,
        )  # fmt: skip
    assert not out.exists()


# --------------------------------------------------------------------------------------
# Slow: the CUDA kernel (imports TVM's CUDA intrinsics), PTX, ptxas, end to end


@pytest.mark.slow
@pytest.mark.parametrize(("m_shape", "k", "n"), [((3, 5), 70, 33), ((37,), 130, 200), ((1,), 8, 3)])
def test_rewritten_module_matches_numpy_on_cpu(rng, m_shape, k, n):
    mod, w = _dense_module(m_shape, k, n, rng)
    lowered = PackBf16DenseCUDA(SM80)(mod)
    kernels = [
        f
        for _, f in lowered.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs.get(KERNEL_ATTR) == "bf16_dense_mma"
    ]
    assert len(kernels) == 1 and kernels[0].attrs[TENSOR_CORE_ATTR] == "mma.sync.m16n8k16.bf16"
    assert "relax.matmul" not in lowered["main"].script()
    x = rng.standard_normal((*m_shape, k)).astype(np.float32)
    ex = relax.build(mma_kernels_for_cpu(lowered), target=HOST)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert out.shape == (*m_shape, n)
    _assert_close_fp32_acc(out, x, w)
    assert PackBf16DenseCUDA(SM80)(lowered).same_as(lowered)  # nothing left to rewrite


@pytest.mark.slow
@pytest.mark.parametrize(("batch", "m", "k", "n"), [((2, 3), 37, 20, 45), ((1,), 5, 70, 3)])
def test_attention_matmul_rewritten_for_bf16_matches_numpy_on_cpu(rng, batch, m, k, n):
    """Float32 matmuls of two activations go to the bf16 batched kernel only with bf16=True."""
    a = relax.Var("a", relax.TensorType((*batch, m, k), "float32"))
    b = relax.Var("b", relax.TensorType((*batch, k, n), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [a, b]):
        bb.emit_func_output(bb.emit(relax.op.matmul(a, b)))
    mod = bb.get()
    assert PackMmaBatchMatmulCUDA(SM80)(mod).same_as(mod)  # fp32 builds keep fp32
    lowered = PackMmaBatchMatmulCUDA(SM80, bf16=True)(mod)
    kinds = [
        (str(f.attrs[KERNEL_ATTR]), str(f.attrs[TENSOR_CORE_ATTR]))
        for _, f in lowered.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and KERNEL_ATTR in f.attrs
    ]
    assert kinds == [("bf16_batch_matmul_mma", "mma.sync.m16n8k16.bf16")]
    x = rng.standard_normal((*batch, m, k)).astype(np.float32)
    w = rng.standard_normal((*batch, k, n)).astype(np.float32)
    ex = relax.build(mma_kernels_for_cpu(lowered), target=HOST)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](
        tvm.runtime.tensor(x), tvm.runtime.tensor(w)
    ).numpy()
    assert out.shape == (*batch, m, n)
    _assert_close_fp32_acc(out, x, w)


def _cuda_source(func: tvm.tirx.PrimFunc, arch: str) -> str:
    target = tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
    lib = tvm.tirx.build(func.with_attr("global_symbol", "main"), target=target)
    return lib.imports[0].inspect_source("cuda")


def _kernel_body(source: str) -> str:
    return source[source.index('extern "C" __global__') :]


def _check_ptx(bf16_func, fp16_func, arch: str, tmp_path) -> None:
    """The bf16 kernel's CUDA code is the fp16 kernel's with the operand type renamed (the same
    ldmatrix loads, no scalar fallback, the same mma pairs); its PTX has bf16 ``mma.sync`` and
    ``ldmatrix``; ptxas reports no spills and no stack frame."""
    source = _cuda_source(bf16_func, arch)
    fp16 = _kernel_body(_cuda_source(fp16_func, arch))
    expected = fp16.replace("half", "nv_bfloat16").replace(".f16.f16.", ".bf16.bf16.")
    assert _kernel_body(source) == expected
    (tmp_path / "k.cu").write_text(source)
    r = subprocess.run(
        ["nvcc", "-ptx", f"-arch={arch}", str(tmp_path / "k.cu"), "-o", str(tmp_path / "k.ptx")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    ptx = (tmp_path / "k.ptx").read_text()
    assert re.search(rf"\.target {arch}\b", ptx)
    assert ptx.count(MMA_BF16) >= 2 and ".f16.f16." not in ptx
    assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in ptx
    assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in ptx
    r = subprocess.run(
        ["ptxas", "-v", f"-arch={arch}", str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.cubin")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in r.stderr, r.stderr
    assert not re.search(r"[1-9]\d* bytes (spill|stack)", r.stderr), r.stderr


@pytest.mark.nvcc
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize(("m", "k", "n"), [(4, 784, 128), (20, 768, 3072), (256, 256, 256)])
def test_ptx_uses_bf16_mma_sync_and_ldmatrix_without_spills(tmp_path, arch, m, k, n):
    tiles = choose_mma_tiles(m, k, n, "bfloat16")
    shape = padded_mkn_mma(m, k, n, tiles)
    bf16, fp16 = (f(*shape, tiles=tiles) for f in (bf16_dense_mma, fp16_dense_mma))
    _check_ptx(bf16, fp16, arch, tmp_path)


@pytest.mark.nvcc
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize(("m", "k", "n"), [(128, 32, 128), (128, 128, 32)])  # MiniLM QK^T, PV
def test_batched_bf16_ptx_without_spills(tmp_path, arch, m, k, n):
    tiles = choose_mma_tiles(m, k, n, "bfloat16")
    shape = padded_mkn_mma(m, k, n, tiles)
    bf16, fp16 = (
        f(12, *shape, tiles=tiles) for f in (bf16_batch_matmul_mma, fp16_batch_matmul_mma)
    )
    _check_ptx(bf16, fp16, arch, tmp_path)


@pytest.mark.nvcc
@pytest.mark.slow
def test_compile_mlp_for_sm90_in_bf16_lists_tensor_core_kernels(tmp_path):
    from tvmq.demo import make_mlp

    torch.manual_seed(0)
    out = tmp_path / "mlp"
    art = tvmq.compile(
        make_mlp().eval(), "cuda-sm90", example_inputs=(torch.zeros(4, 784),),
        precision="bf16", output_dir=out, progress=False,
    )  # fmt: skip
    manifest = json.loads((out / "model.json").read_text())
    assert manifest["compression"]["precision"] == {
        "compute": "bfloat16 (tensor-core matmuls)",
        "accumulate": "float32",
    }
    tensor_core = manifest["notes"]["kernels"]["tensor_core"]
    assert len(tensor_core) == 2 and set(tensor_core.values()) == {"mma.sync.m16n8k16.bf16"}
    assert art.manifest.inputs[0].dtype == "float32"
    assert "bfloat16" in manifest["notes"]["weights"]
    data = (out / "model.so").read_bytes()
    assert re.findall(rb"\.target (sm_\w+)", data) == [b"sm_90a"]
    assert MMA_BF16.encode() in data and b"ldmatrix" in data and b".f16.f16." not in data
