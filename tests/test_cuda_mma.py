"""--precision fp16 and the tensor-core dense kernel: PTX for sm_80 / sm_90a, the math on the CPU twin.

No GPU is needed: the CUDA kernel is compiled to PTX (and by ptxas) here, and its loop nest
before tensorization (the CPU twin: same tiles, same cache stages, same fragment layouts) runs
on the host against numpy. Building a CUDA kernel imports TVM's CUDA tensor intrinsics once per
process (35 s to 2 min on 2 busy cores): those tests are marked slow.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

import tvmq
import tvmq.passes  # noqa: F401  (before tvmq.kernels: it breaks an import cycle)
from tvmq.errors import TvmqError
from tvmq.kernels.cuda_mma import (
    ASYNC_COPY,
    MMA,
    STATIC_SHARED_LIMIT,
    TENSOR_CORE_ATTR,
    MmaTiles,
    choose_mma_tiles,
    fp16_dense_mma,
    fragment_lane_register,
    fragment_lane_register_k32,
    int8_dense_imma,
    mma_kernels_for_cpu,
    pack_weight_imma,
    padded_mkn_mma,
    shared_bytes,
)
from tvmq.kernels.x86_int8 import KERNEL_ATTR
from tvmq.passes import PackFp16DenseCUDA, half_precision_passes
from tvmq.passes.pack_fp16_dense_cuda import target_has_fp16_mma
from tvmq.targets import get_target

HOST = get_target("host").tvm_target()
SM80 = get_target("cuda-sm80").tvm_target()
FP16, INT8 = "fp16_dense_mma", "int8_dense_imma"


def _reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ w.astype(np.float64)


def _assert_close_fp32_acc(out, x, w, out_dtype="float32"):
    """fp16 products are exact in fp32; the fp32 sum errs by ~K * 2^-24 * sum|x||w|, an fp16
    output adds one rounding (2^-11 relative)."""
    ref = _reference(x, w)
    scale = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64))
    k = x.shape[-1]
    tol = k * 2.0**-24 * scale + (2.0**-11 * np.abs(ref) if out_dtype == "float16" else 0)
    assert out.dtype == np.dtype(out_dtype)
    assert np.all(np.abs(out.astype(np.float64) - ref) <= tol + 1e-6), np.abs(out - ref).max()


def _dense_module(m_shape, k, n, out_dtype, rng):
    w = rng.standard_normal((k, n)).astype(np.float16)
    x = relax.Var("x", relax.TensorType((*m_shape, k), "float16"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        bb.emit_func_output(bb.emit(relax.op.matmul(x, relax.const(w), out_dtype=out_dtype)))
    return bb.get(), w


# --------------------------------------------------------------------------------------
# Fast: layout, tiles, the CPU twin of the kernel, the pass off sm_80+


@pytest.mark.parametrize(
    ("layout", "cols", "slots"),
    [(fragment_lane_register, 16, 8), (fragment_lane_register_k32, 32, 16)],
    ids=["fp16-16x16", "int8-16x32"],
)
def test_fragment_layout_is_one_to_one(layout, cols, slots):
    """Each element of a 16 x cols tile has its own (lane, slot) of the 32-lane fragment."""
    found = {layout(r, c) for r in range(MMA) for c in range(cols)}
    assert found == {(lane, slot) for lane in range(32) for slot in range(slots)}


@pytest.mark.parametrize("operand", ["float16", "int8"])
@pytest.mark.parametrize(("m", "k", "n"), [(4, 784, 128), (128, 768, 3072), (300, 20, 10)])
def test_choose_mma_tiles_fit(m, k, n, operand):
    tiles = choose_mma_tiles(m, k, n, operand)
    size = np.dtype(operand).itemsize
    tiles.validate(16 // size, 32 // size)
    mp, kp, np_ = padded_mkn_mma(m, k, n, tiles)
    assert mp % tiles.bm == kp % tiles.bk == np_ % tiles.bn == 0 and mp - m < tiles.bm
    assert tiles.threads == 128  # 4 warps
    assert shared_bytes(tiles, operand) <= STATIC_SHARED_LIMIT
    if m >= 128 and n >= 128:
        assert (tiles.bm, tiles.bn, tiles.bk * size) == (128, 128, 64)
    # two-stage cp.async pipeline where K has two steps and two stages fit 48 KiB
    assert tiles.stages == (2 if k >= 2 * tiles.bk else 1) or (m <= 32 and size == 2)


@pytest.mark.parametrize(
    ("tiles", "operand", "ptxas"),
    [
        (MmaTiles(bk=32), "float16", 18944),
        (MmaTiles(bk=32, stages=2), "float16", 37888),
        (MmaTiles(bk=64, stages=2), "float16", 71680),
        (MmaTiles(bk=64), "int8", 20480),
        (MmaTiles(bk=64, stages=2), "int8", 40960),
        (MmaTiles(warps_n=4, bk=64, stages=2), "int8", 61440),
    ],
)
def test_shared_bytes_is_what_ptxas_reports(tiles, operand, ptxas):
    """The "bytes smem" of ``ptxas -v`` for these kernels (4096^3, sm_90a, CUDA 13.0)."""
    assert shared_bytes(tiles, operand) == ptxas


@pytest.mark.parametrize("operand", ["float16", "int8"])
@pytest.mark.parametrize(
    "shape",
    [dict(), dict(warps_m=1, warps_n=4, tiles_m=1, tiles_n=2)],
    ids=["128x128", "16x128"],
)  # K step: 128 bytes
def test_cpu_twin_of_scheduled_kernel_matches_numpy(rng, shape, operand):
    tiles = MmaTiles(**shape, bk=128 // np.dtype(operand).itemsize)
    m, k, n = 2 * tiles.bm, 3 * tiles.bk, 2 * tiles.bn
    build = fp16_dense_mma if operand == "float16" else int8_dense_imma
    func = build(m, k, n, tiles=tiles, device="cpu")
    assert func.attrs[KERNEL_ATTR] == (FP16 if operand == "float16" else INT8)
    assert TENSOR_CORE_ATTR not in func.attrs
    lib = tvm.compile(func.with_attr("global_symbol", "main"), target="llvm")
    if operand == "int8":
        x = rng.integers(-128, 128, (m, k), dtype=np.int8)
        w = rng.integers(-128, 128, (k, n), dtype=np.int8)
        out = tvm.runtime.tensor(np.zeros((m, n), np.int32))
        lib(tvm.runtime.tensor(x), tvm.runtime.tensor(pack_weight_imma(w, k, n)), out)
        np.testing.assert_array_equal(out.numpy(), x.astype(np.int32) @ w.astype(np.int32))
        return
    x = rng.standard_normal((m, k)).astype(np.float16)
    w = rng.standard_normal((k, n)).astype(np.float16)
    out = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    lib(tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    _assert_close_fp32_acc(out.numpy(), x, w)


def test_pack_weight_imma_layout(rng):
    w = rng.integers(-128, 128, (10, 5), dtype=np.int8)
    packed = pack_weight_imma(w, 64, 16)
    assert packed.shape == (16, 64)
    np.testing.assert_array_equal(packed[:5, :10], w.T)
    assert not packed[5:].any() and not packed[:, 10:].any()


def test_unpadded_shapes_are_refused():
    with pytest.raises(ValueError, match="unpadded"):
        fp16_dense_mma(100, 32, 128, tiles=MmaTiles(), device="cpu")
    with pytest.raises(ValueError, match="do not split"):
        MmaTiles(warps_m=1, warps_n=4, tiles_m=1, tiles_n=2, bk=32).validate()


def test_pass_is_noop_off_cuda_and_before_sm80(rng):
    mod, _ = _dense_module((4,), 32, 16, "float32", rng)
    assert PackFp16DenseCUDA(HOST)(mod).same_as(mod)
    sm75 = tvm.target.Target({"kind": "cuda", "arch": "sm_75"})
    assert PackFp16DenseCUDA(sm75)(mod).same_as(mod)
    assert not target_has_fp16_mma(sm75) and target_has_fp16_mma(SM80)
    assert target_has_fp16_mma(get_target("cuda-sm90").tvm_target())


def test_precision_refused_in_one_line_for_bad_combinations():
    from tvmq.pipeline import check_precision

    cuda, host = get_target("cuda-sm90"), get_target("host")
    assert check_precision("fp16", cuda) == "fp16" and check_precision("fp32", host) is None
    for precision, preset, quantize, says in [
        ("fp16", host, None, "is for CUDA targets"),
        ("bf16", get_target("x86-avx512-vnni"), None, "bf16 needs AMX-BF16 tiles"),
        ("bf16", get_target("x86-amx"), "int8", "cannot be combined yet"),
        ("fp8", cuda, None, "precision must be one of"),
        ("fp16", cuda, "int8", "cannot be combined yet"),
    ]:
        with pytest.raises(TvmqError, match=says) as err:
            check_precision(precision, preset, quantize)
        assert "\n" not in str(err.value)


def test_compile_refuses_fp16_on_a_cpu_before_importing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TvmqError, match="is for CUDA targets"):
        tvmq.compile(tmp_path / "never-read.onnx", "host", precision="fp16", output_dir=out)
    assert not out.exists()


# --------------------------------------------------------------------------------------
# Slow: the CUDA kernel (imports TVM's CUDA intrinsics), PTX, ptxas, end to end


@pytest.mark.slow
def test_fragment_layout_is_tvms_ldmatrix_layout():
    from tvm.s_tir.tensor_intrin import cuda as cuda_intrin

    for r in range(MMA):
        for c in range(MMA):
            theirs = cuda_intrin.shared_16x16_to_ldmatrix_32x8_layout(r, c)
            assert fragment_lane_register(r, c) == tuple(int(v) for v in theirs)
        for c in range(2 * MMA):
            theirs = cuda_intrin.shared_16x32_to_ldmatrix_32x16_layout(r, c)
            assert fragment_lane_register_k32(r, c) == tuple(int(v) for v in theirs)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("m_shape", "k", "n", "out_dtype"),
    [((3, 5), 70, 33, "float32"), ((37,), 130, 200, "float16"), ((1,), 8, 3, "float32")],
)
def test_rewritten_module_matches_numpy_on_cpu(rng, m_shape, k, n, out_dtype):
    mod, w = _dense_module(m_shape, k, n, out_dtype, rng)
    lowered = PackFp16DenseCUDA(SM80)(mod)
    kernels = [
        f
        for _, f in lowered.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs.get(KERNEL_ATTR) == FP16
    ]
    assert len(kernels) == 1 and kernels[0].attrs[TENSOR_CORE_ATTR] == "mma.sync.m16n8k16.f16"
    assert "relax.matmul" not in lowered["main"].script()
    assert "ptx_legacy.mma" in kernels[0].script() or "mma" in kernels[0].script()
    x = rng.standard_normal((*m_shape, k)).astype(np.float16)
    ex = relax.build(mma_kernels_for_cpu(lowered), target=HOST)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert out.shape == (*m_shape, n)
    _assert_close_fp32_acc(out, x, w, out_dtype)
    assert PackFp16DenseCUDA(SM80)(lowered).same_as(lowered)  # nothing left to rewrite


@pytest.mark.slow
@pytest.mark.parametrize(
    ("m_shape", "k", "n", "x_dtype", "kernel"),
    [((3, 5), 70, 33, "int8", "imma"), ((37,), 130, 200, "int8", "imma"),
     ((4,), 64, 16, "uint8", "dp4a")],
)  # fmt: skip
def test_int8_dense_on_sm80_is_imma_and_matches_numpy_on_cpu(rng, m_shape, k, n, x_dtype, kernel):
    """int8 activations take the IMMA kernel on sm_80+, uint8 ones stay on dp4a."""
    from tvmq.kernels.cuda_int8 import kernels_for_cpu
    from tvmq.passes import PackInt8DenseCUDA

    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    xv = relax.Var("x", relax.TensorType((*m_shape, k), x_dtype))
    bb = relax.BlockBuilder()
    with bb.function("main", [xv]):
        bb.emit_func_output(bb.emit(relax.op.matmul(xv, relax.const(w), out_dtype="int32")))
    lowered = PackInt8DenseCUDA(SM80)(bb.get())
    names = [
        gv.name_hint for gv, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
    ]
    assert [n_.split("_")[3] for n_ in names if n_.startswith("tvmq_int8_dense")] == [kernel]
    assert "relax.matmul" not in lowered["main"].script()
    info = np.iinfo(x_dtype)
    x = rng.integers(info.min, info.max + 1, (*m_shape, k), dtype=x_dtype)
    ex = relax.build(kernels_for_cpu(mma_kernels_for_cpu(lowered)), target=HOST)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(out, x.astype(np.int32) @ w.astype(np.int32))


def _ptx(func: tvm.tirx.PrimFunc, arch: str, tmp_path) -> str:
    """The kernel's CUDA source (TVM's codegen, with ``cp.async`` as tvmq's CUDA builds have
    it) compiled to PTX by nvcc for ``arch``."""
    target = tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
    with tvm.transform.PassContext(opt_level=3, config=ASYNC_COPY):
        lib = tvm.tirx.build(func.with_attr("global_symbol", "main"), target=target)
    source = tmp_path / "k.cu"
    source.write_text(lib.imports[0].inspect_source("cuda"))
    ptx = tmp_path / "k.ptx"
    r = subprocess.run(
        ["nvcc", "-ptx", f"-arch={arch}", str(source), "-o", str(ptx)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    return ptx.read_text()


@pytest.mark.nvcc
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize(("m", "k", "n"), [(4, 784, 128), (20, 768, 3072), (256, 256, 256)])
@pytest.mark.parametrize(
    ("operand", "mma"),
    [
        ("float16", "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"),
        ("int8", "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32"),
    ],
    ids=["fp16", "int8"],
)
def test_ptx_uses_mma_sync_and_ldmatrix_without_spills(tmp_path, arch, m, k, n, operand, mma):
    tiles = choose_mma_tiles(m, k, n, operand)
    build = fp16_dense_mma if operand == "float16" else int8_dense_imma
    func = build(*padded_mkn_mma(m, k, n, tiles), tiles=tiles)
    ptx = _ptx(func, arch, tmp_path)
    assert re.search(rf"\.target {arch}\b", ptx)
    assert mma in ptx
    assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in ptx
    if tiles.stages > 1:  # the copies of the next K step are in flight while this one computes
        assert "cp.async.cg.shared.global" in ptx and "cp.async.wait_group 1" in ptx
    else:
        assert "cp.async" not in ptx
    path = tmp_path / "k.ptx"
    r = subprocess.run(
        ["ptxas", "-v", f"-arch={arch}", str(path), "-o", str(tmp_path / "k.cubin")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "0 bytes spill stores, 0 bytes spill loads" in r.stderr, r.stderr
    assert "spill stores" in r.stderr and not re.search(r"[1-9]\d* bytes spill", r.stderr)


def _bert():
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import zoo

    cfg = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
        vocab_size=200, initializer_range=0.1, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = zoo._HiddenStates(transformers.BertModel(cfg, add_pooling_layer=False)).eval()
    return model, zoo.token_inputs(2, 16, 200, seed=0)


@pytest.mark.slow
def test_fp16_bert_layer_on_cpu_twin_matches_torch_fp32():
    """The whole fp16 model (ToMixedPrecision + the tensor-core dense layers as their CPU twin)
    against PyTorch in float32."""
    from tvmq.frontends import import_model

    model, inputs = _bert()
    imported = import_model(model, example_inputs=inputs)
    lowered = PackFp16DenseCUDA(SM80)(half_precision_passes()(imported.mod))
    calls = re.findall(r"call_tir\((?:cls\.)?(\w+)", lowered["main"].script())
    assert sum(c.startswith("tvmq_fp16_dense_mma_") for c in calls) == 6  # q, k, v, out, FFN
    ex = relax.build(mma_kernels_for_cpu(lowered), target=HOST)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](
        *(tvm.runtime.tensor(a.numpy()) for a in inputs)
    )
    out = (out[0] if not hasattr(out, "numpy") else out).numpy()
    with torch.no_grad():
        ref = model(*inputs)
    ref = (ref[0] if isinstance(ref, tuple | list) else ref).numpy()
    cosine = float((out * ref).sum() / np.linalg.norm(out) / np.linalg.norm(ref))
    assert cosine > 0.9999 and np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


@pytest.mark.nvcc
@pytest.mark.slow
def test_compile_mlp_for_sm90_in_fp16_lists_tensor_core_kernels(tmp_path):
    from tvmq.demo import make_mlp

    torch.manual_seed(0)
    out = tmp_path / "mlp"
    art = tvmq.compile(
        make_mlp().eval(), "cuda-sm90", example_inputs=(torch.zeros(4, 784),),
        precision="fp16", output_dir=out, progress=False,
    )  # fmt: skip
    manifest = json.loads((out / "model.json").read_text())
    assert manifest["compression"]["precision"] == {"compute": "float16", "accumulate": "float32"}
    tensor_core = manifest["notes"]["kernels"]["tensor_core"]
    assert len(tensor_core) == 2 and set(tensor_core.values()) == {"mma.sync.m16n8k16.f16"}
    assert set(tensor_core) <= set(manifest["notes"]["kernels"]["prescheduled"])
    assert art.manifest.inputs[0].dtype == "float32"  # inputs stay float32
    data = (out / "model.so").read_bytes()
    assert re.findall(rb"\.target (sm_\w+)", data) == [b"sm_90a"]
    assert b"mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in data and b"ldmatrix" in data
