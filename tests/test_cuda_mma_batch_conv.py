"""Attention matmuls and conv2d on tensor cores (PackMmaBatchMatmulCUDA, PackMmaConvCUDA).

No GPU is needed: the CUDA kernels are compiled to PTX (and by ptxas) here, and their loop
nests before tensorization (the CPU twins: same tiles, stages, fragment layouts, im2col) run on
the host against numpy. Tests that build a CUDA kernel import TVM's CUDA tensor intrinsics once
per process (35 s to minutes on 2 busy cores): they are marked slow.
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

import tvmq.passes  # noqa: F401  (before tvmq.kernels: it breaks an import cycle)
from tvmq.kernels.cuda_im2col import mma_im2col
from tvmq.kernels.cuda_mma import (
    TENSOR_CORE_ATTR,
    MmaTiles,
    choose_mma_tiles,
    fp16_batch_matmul_mma,
    int8_batch_matmul_imma,
    mma_kernels_for_cpu,
    padded_mkn_mma,
)
from tvmq.kernels.x86_int8_conv import Conv2DGeometry
from tvmq.passes import PackMmaBatchMatmulCUDA, PackMmaConvCUDA
from tvmq.targets import get_target

HOST = get_target("host").tvm_target()
SM80 = get_target("cuda-sm80").tvm_target()


def _rand(rng, shape, dtype):
    if dtype == "float16":
        return rng.standard_normal(shape).astype(np.float16)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, shape, dtype=dtype)


def _assert_matches(out, ref, operands, k, out_dtype):
    """Integers: equal. fp16 operands: products exact in fp32, the sum errs by ~K * 2^-24 *
    sum|a||b|, an fp16 result adds one rounding."""
    assert out.dtype == np.dtype(out_dtype)
    if out_dtype == "int32":
        np.testing.assert_array_equal(out, ref)
        return
    tol = k * 2.0**-24 * operands + (2.0**-11 * np.abs(ref) if out_dtype == "float16" else 0)
    assert np.all(np.abs(out.astype(np.float64) - ref) <= tol + 1e-6), np.abs(out - ref).max()


def _run_on_cpu(mod, *arrays):
    ex = relax.build(mma_kernels_for_cpu(mod), target=HOST)
    return relax.VirtualMachine(ex, tvm.cpu())["main"](*map(tvm.runtime.tensor, arrays)).numpy()


def _conv_reference(x, w, strides, padding, dilation):
    top, left, bottom, right = padding
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    out = torch.nn.functional.conv2d(
        torch.from_numpy(x),
        torch.from_numpy(w.astype(np.float64)),
        stride=strides,
        dilation=dilation,
    )
    return out.numpy()


# --------------------------------------------------------------------------------------
# Fast: the CPU twins of the kernels, the passes off sm_80+


@pytest.mark.parametrize("operand", ["float16", "int8"])
def test_cpu_twin_of_batched_kernel_matches_numpy(rng, operand):
    tiles = MmaTiles(
        warps_m=2, warps_n=2, tiles_m=4, tiles_n=2, bk=128 // np.dtype(operand).itemsize
    )
    batch, m, k, n = 3, tiles.bm, 2 * tiles.bk, 2 * tiles.bn
    build = fp16_batch_matmul_mma if operand == "float16" else int8_batch_matmul_imma
    func = build(batch, m, k, n, tiles=tiles, device="cpu")
    assert TENSOR_CORE_ATTR not in func.attrs
    lib = tvm.compile(func.with_attr("global_symbol", "main"), target="llvm")
    x = _rand(rng, (batch, m, k), operand)
    w = _rand(rng, (batch, n, k) if operand == "int8" else (batch, k, n), operand)
    acc = "int32" if operand == "int8" else "float32"
    out = tvm.runtime.tensor(np.zeros((batch, m, n), acc))
    lib(tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    b = w.swapaxes(1, 2) if operand == "int8" else w
    ref = x.astype(np.float64) @ b.astype(np.float64)
    _assert_matches(
        out.numpy(), ref, np.abs(x.astype(np.float64)) @ np.abs(b.astype(np.float64)), k, acc
    )


@pytest.mark.parametrize(
    ("x_dtype", "operand"), [("uint8", "int8"), ("int8", "int8"), ("float16", "float16")]
)
@pytest.mark.parametrize(("channels", "k_pad"), [(3, 7), (16, 32)], ids=["scalar", "vector"])
def test_cpu_twin_of_im2col_matches_numpy(rng, x_dtype, operand, channels, k_pad):
    """Odd sizes, asymmetric padding, stride and dilation; padded rows / columns are 0 and a
    uint8 image is shifted by -128 (its padding too). 16 channels and a padded row of whole
    vectors take the vectorized loop nest (8 fp16 or 4 int8 columns per thread)."""
    geo = Conv2DGeometry((2, channels, 9, 7), (3, 2), (2, 1), (1, 0, 2, 1), (1, 2))
    mp, kp = geo.m + 5, geo.k + k_pad
    lib = tvm.compile(
        mma_im2col(geo, x_dtype, operand, mp, kp, device="cpu").with_attr("global_symbol", "main"),
        target="llvm",
    )
    x = _rand(rng, geo.x_shape, x_dtype)
    out = tvm.runtime.tensor(np.full((mp, kp), 7, operand))
    lib(tvm.runtime.tensor(np.ascontiguousarray(x.transpose(0, 2, 3, 1))), out)
    top, left, bottom, right = geo.padding
    xp = np.pad(x.astype(np.int64 if operand == "int8" else np.float64),
                ((0, 0), (0, 0), (top, bottom), (left, right)))  # fmt: skip
    (oh, ow), (kh, kw) = geo.out_hw, geo.kernel
    ref = np.zeros((mp, kp), np.float64)
    for ky in range(kh):
        for kx in range(kw):
            y0, x0 = ky * geo.dilation[0], kx * geo.dilation[1]
            patch = xp[:, :, y0 : y0 + geo.strides[0] * oh : geo.strides[0],
                       x0 : x0 + geo.strides[1] * ow : geo.strides[1]]  # fmt: skip
            cols = (ky * kw + kx) * geo.x_shape[1]
            ref[: geo.m, cols : cols + geo.x_shape[1]] = patch.transpose(0, 2, 3, 1).reshape(
                geo.m, -1
            )
    if x_dtype == "uint8":
        ref[: geo.m, : geo.k] -= 128
    np.testing.assert_array_equal(out.numpy().astype(np.float64), ref)


def _conv_module(x_shape, w, out_dtype, **attrs):
    x = relax.Var("x", relax.TensorType(x_shape, "float16" if w.dtype == np.float16 else "uint8"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), out_dtype=out_dtype, **attrs))
        bb.emit_func_output(y)
    return bb.get()


def _attention_module(a_shape, b_shape, a_dtype, b_dtype, out_dtype, transpose_b):
    a = relax.Var("a", relax.TensorType(a_shape, a_dtype))
    b = relax.Var("b", relax.TensorType(b_shape, b_dtype))
    bb = relax.BlockBuilder()
    with bb.function("main", [a, b]):
        with bb.dataflow():
            rhs = bb.emit(relax.op.permute_dims(b, [0, 1, 3, 2])) if transpose_b else b
            y = bb.emit_output(bb.emit(relax.op.matmul(a, rhs, out_dtype=out_dtype)))
        bb.emit_func_output(y)
    return bb.get()


def test_passes_are_noops_off_cuda_and_before_sm80(rng):
    sm75 = tvm.target.Target({"kind": "cuda", "arch": "sm_75"})
    att = _attention_module((1, 2, 16, 8), (1, 2, 8, 16), "int8", "int8", "int32", False)
    conv = _conv_module((1, 3, 8, 8), _rand(rng, (4, 3, 3, 3), "float16"), "float32")
    for mod, rewrite in [(att, PackMmaBatchMatmulCUDA), (conv, PackMmaConvCUDA)]:
        assert rewrite(HOST)(mod).same_as(mod) and rewrite(sm75)(mod).same_as(mod)


# --------------------------------------------------------------------------------------
# Slow: the CUDA kernels (imports TVM's CUDA intrinsics), PTX, ptxas, end to end


@pytest.mark.slow
@pytest.mark.parametrize(
    ("a_dtype", "b_dtype", "out_dtype", "transpose_b"),
    [("uint8", "int8", "int32", True), ("int8", "uint8", "int32", False),
     ("uint8", "uint8", "int32", False), ("int8", "int8", "int32", True),
     ("float16", "float16", "float32", True), ("float16", "float16", "float16", False)],
)  # fmt: skip
def test_attention_matmul_rewritten_matches_numpy_on_cpu(
    rng, a_dtype, b_dtype, out_dtype, transpose_b
):
    """Q @ K^T / P @ V of odd sizes on the tensor-core kernels (CPU twin): uint8 operands shifted
    and corrected exactly, ``K^T`` read untransposed by the int8 kernel."""
    batch, heads, m, k, n = 2, 3, 37, 21, 45
    b_shape = (batch, heads, n, k) if transpose_b else (batch, heads, k, n)
    mod = _attention_module((batch, heads, m, k), b_shape, a_dtype, b_dtype, out_dtype, transpose_b)
    lowered = PackMmaBatchMatmulCUDA(SM80)(mod)
    script = lowered["main"].script()
    assert "relax.matmul" not in script
    names = [
        gv.name_hint for gv, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
    ]
    kind = "fp16_batch_matmul_mma" if a_dtype == "float16" else "int8_batch_matmul_imma"
    assert len(names) == 1 and names[0].startswith(f"tvmq_{kind}_6x")
    if transpose_b and a_dtype == b_dtype == "int8":
        assert "permute_dims" not in script  # K as it is: the kernel takes (batch, N, K)
    a, b = _rand(rng, (batch, heads, m, k), a_dtype), _rand(rng, b_shape, b_dtype)
    out = _run_on_cpu(lowered, a, b)
    b = b.swapaxes(-1, -2) if transpose_b else b
    ref = a.astype(np.float64) @ b.astype(np.float64)
    _assert_matches(
        out, ref, np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)), k, out_dtype
    )
    assert PackMmaBatchMatmulCUDA(SM80)(lowered).same_as(lowered)  # nothing left to rewrite


@pytest.mark.slow
@pytest.mark.parametrize(
    ("x_dtype", "out_dtype", "x_shape", "w_shape", "attrs"),
    [("uint8", "int32", (2, 5, 11, 9), (7, 5, 3, 3), dict(padding=(1, 1, 1, 1))),
     ("int8", "int32", (1, 3, 13, 10), (33, 3, 3, 2), dict(strides=(2, 1), padding=(0, 1, 2, 1), dilation=(1, 2))),
     ("float16", "float32", (2, 5, 11, 9), (7, 5, 3, 3), dict(strides=(2, 2), padding=(1, 1, 1, 1))),
     ("float16", "float16", (1, 16, 7, 7), (20, 16, 1, 1), dict())],
)  # fmt: skip
def test_conv_rewritten_matches_numpy_on_cpu(rng, x_dtype, out_dtype, x_shape, w_shape, attrs):
    w = _rand(rng, w_shape, "int8" if x_dtype != "float16" else "float16")
    x = relax.Var("x", relax.TensorType(x_shape, x_dtype))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        bb.emit_func_output(
            bb.emit(relax.op.nn.conv2d(x, relax.const(w), out_dtype=out_dtype, **attrs))
        )
    lowered = PackMmaConvCUDA(SM80)(bb.get())
    assert "conv2d" not in lowered["main"].script()
    tc = [f.attrs[TENSOR_CORE_ATTR] for _, f in lowered.functions_items()
          if isinstance(f, tvm.tirx.PrimFunc) and TENSOR_CORE_ATTR in f.attrs]  # fmt: skip
    assert tc == ["mma.sync.m16n8k32.s8" if x_dtype != "float16" else "mma.sync.m16n8k16.f16"]
    xv = _rand(rng, x_shape, x_dtype)
    out = _run_on_cpu(lowered, xv)
    full = dict(strides=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1)) | attrs
    ref = _conv_reference(xv, w, full["strides"], full["padding"], full["dilation"])
    k = w_shape[1] * w_shape[2] * w_shape[3]
    scale = _conv_reference(np.abs(xv.astype(np.float64)), np.abs(w.astype(np.float64)),
                            full["strides"], full["padding"], full["dilation"])  # fmt: skip
    _assert_matches(out, ref, scale, k, out_dtype)
    assert PackMmaConvCUDA(SM80)(lowered).same_as(lowered)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("x_shape", "w_shape", "attrs"),
    [((2, 5, 11, 9), (7, 5, 3, 3), dict(strides=(2, 2), padding=(1, 1, 1, 1))),
     ((1, 16, 7, 7), (20, 16, 1, 1), dict())],
)  # fmt: skip
def test_float32_conv_on_bf16_tensor_cores_matches_numpy_on_cpu(rng, x_shape, w_shape, attrs):
    """``bf16=True``: a float32 conv2d becomes im2col (rounding to bf16) + the bf16 dense
    kernel; against float64 on the bf16-rounded operands, only the fp32 sum errs."""
    import ml_dtypes

    w = rng.standard_normal(w_shape).astype(np.float32)
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        bb.emit_func_output(bb.emit(relax.op.nn.conv2d(x, relax.const(w), **attrs)))
    mod = bb.get()
    assert PackMmaConvCUDA(SM80)(mod).same_as(mod)  # fp32 builds keep fp32 convs
    lowered = PackMmaConvCUDA(SM80, bf16=True)(mod)
    assert "conv2d" not in lowered["main"].script()
    tc = [f.attrs[TENSOR_CORE_ATTR] for _, f in lowered.functions_items()
          if isinstance(f, tvm.tirx.PrimFunc) and TENSOR_CORE_ATTR in f.attrs]  # fmt: skip
    assert tc == ["mma.sync.m16n8k16.bf16"]
    xv = rng.standard_normal(x_shape).astype(np.float32)
    out = _run_on_cpu(lowered, xv)
    xb, wb = (a.astype(ml_dtypes.bfloat16).astype(np.float64) for a in (xv, w))
    full = dict(strides=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1)) | attrs
    geometry = full["strides"], full["padding"], full["dilation"]
    ref = _conv_reference(xb, wb, *geometry)
    k = w_shape[1] * w_shape[2] * w_shape[3]
    _assert_matches(out, ref, _conv_reference(np.abs(xb), np.abs(wb), *geometry), k, "float32")
    assert np.abs(_conv_reference(xv, w, *geometry) - ref).max() > 1e-3  # bf16 did round
    assert PackMmaConvCUDA(SM80, bf16=True)(lowered).same_as(lowered)


def _ptx_and_ptxas(func: tvm.tirx.PrimFunc, arch: str, tmp_path) -> tuple[str, str]:
    target = tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
    lib = tvm.tirx.build(func.with_attr("global_symbol", "main"), target=target)
    source, ptx = tmp_path / "k.cu", tmp_path / "k.ptx"
    source.write_text(lib.imports[0].inspect_source("cuda"))
    r = subprocess.run(["nvcc", "-ptx", f"-arch={arch}", str(source), "-o", str(ptx)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["ptxas", "-v", f"-arch={arch}", str(ptx), "-o", str(tmp_path / "k.cubin")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return ptx.read_text(), r.stderr


_MMA = {
    "float16": "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
    "int8": "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32",
}


@pytest.mark.nvcc
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("operand", ["float16", "int8"])
def test_minilm_attention_and_resnet_conv_ptx_use_mma_sync_without_spills(tmp_path, arch, operand):
    """MiniLM's Q @ K^T (12 heads x 128 x 64 x 128) and P @ V (128 x 128 x 64), a ResNet-18
    3x3 conv of its second stage (56x56, 64 channels: im2col + the dense kernel)."""
    kernels = []
    build = fp16_batch_matmul_mma if operand == "float16" else int8_batch_matmul_imma
    for m, k, n in [(128, 64, 128), (128, 128, 64)]:
        tiles = choose_mma_tiles(m, k, n, operand)
        kernels.append(build(12, *padded_mkn_mma(m, k, n, tiles), tiles=tiles))
    w = np.ones((64, 64, 3, 3), np.float16 if operand == "float16" else np.int8)
    x = relax.Var(
        "x", relax.TensorType((1, 64, 56, 56), "float16" if operand == "float16" else "uint8")
    )
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        out = "float32" if operand == "float16" else "int32"
        bb.emit_func_output(
            bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=1, out_dtype=out))
        )
    conv = PackMmaConvCUDA(SM80)(bb.get())
    kernels += [f for _, f in conv.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(kernels) == 4
    for func in kernels:
        ptx, ptxas = _ptx_and_ptxas(func, arch, tmp_path)
        assert re.search(rf"\.target {arch}\b", ptx)
        im2col = "im2col" in str(func.attrs["tvmq.kernel"])
        assert im2col != (_MMA[operand] in ptx)
        if im2col:  # 64 channels: one vector per thread, 16 bytes (fp16) or 4 (int8)
            assert ("st.global.v4.u32" if operand == "float16" else "st.global.u32") in ptx
        assert "0 bytes spill stores, 0 bytes spill loads" in ptxas, ptxas
        assert not re.search(r"[1-9]\d* bytes spill", ptxas), ptxas


def _bert():
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import zoo

    cfg = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
        vocab_size=200, initializer_range=0.1, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = zoo._HiddenStates(transformers.BertModel(cfg, add_pooling_layer=False), pool=True)
    ids, mask = zoo.token_inputs(2, 32, 200, seed=100)
    c_ids, c_mask = zoo.token_inputs(2, 32, 200, seed=7)
    return (
        model.eval(),
        (ids, mask),
        [{"input_ids": c_ids.numpy(), "attention_mask": c_mask.numpy()}],
    )


def _cnn():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import zoo

    model, _, _ = zoo.resnet18("small")  # BasicBlocks, width 16, 64x64 images
    return model, (zoo.smooth_images(2, 64, seed=100),), [zoo.smooth_images(2, 64, seed=7).numpy()]


@pytest.mark.nvcc
@pytest.mark.slow
@pytest.mark.parametrize("model", ["bert", "cnn"])
@pytest.mark.parametrize("scheme", ["fp16", "int8"])
def test_compile_for_sm90_puts_attention_and_convs_on_tensor_cores(tmp_path, model, scheme):
    """``tvmq compile -t cuda-sm90`` with ``--precision fp16`` / ``--quantize int8`` of a 1-layer
    BERT and a small ResNet: the manifest lists the batched-matmul (attention) and conv kernels
    as tensor-core kernels, their PTX is in the library, and no matmul / conv kernel is left to
    dlight's rules."""
    import tvmq

    net, inputs, calib = _bert() if model == "bert" else _cnn()
    options = (
        dict(precision="fp16")
        if scheme == "fp16"
        else dict(quantize="int8", calibration_data=calib)
    )
    out = tmp_path / "build"
    tvmq.compile(net, "cuda-sm90", example_inputs=inputs, output_dir=out, progress=False, **options)
    kernels = json.loads((out / "model.json").read_text())["notes"]["kernels"]
    tensor_core = kernels["tensor_core"]
    kind = "fp16" if scheme == "fp16" else "int8"
    wanted = rf"tvmq_{kind}_batch_matmul_" if model == "bert" else rf"tvmq_conv_{kind}_dense_"
    assert any(re.match(wanted, name) for name in tensor_core), tensor_core
    assert not [k for k in kernels["default"] if re.search(r"matmul|conv|dense", k)]
    data = (out / "model.so").read_bytes()
    assert _MMA["float16" if scheme == "fp16" else "int8"].encode() in data
    entries = set(re.findall(rb"\.entry (\w+)_kernel", data))
    assert {k.encode() for k in tensor_core} <= entries


@pytest.mark.slow
@pytest.mark.parametrize("model", ["bert", "cnn"])
def test_fp16_model_on_cpu_twins_matches_torch_fp32(model):
    """A whole model in fp16 (ToMixedPrecision, then every tensor-core pass: attention / conv /
    dense kernels as their CPU twins) against PyTorch in float32."""
    from tvmq.frontends import import_model
    from tvmq.passes import PackFp16DenseCUDA, half_precision_passes

    net, inputs, _ = _bert() if model == "bert" else _cnn()
    mod = half_precision_passes()(import_model(net, example_inputs=inputs).mod)
    for rewrite in (PackFp16DenseCUDA, PackMmaBatchMatmulCUDA, PackMmaConvCUDA):
        mod = rewrite(SM80)(mod)
    calls = re.findall(r"call_tir\((?:cls\.)?(\w+)", mod["main"].script())
    # Each conv is one im2col (its dense kernel may be shared with a same-shaped dense layer).
    wanted = "tvmq_fp16_batch_matmul_mma_" if model == "bert" else "tvmq_mma_im2col_"
    assert sum(c.startswith(wanted) for c in calls) == (2 if model == "bert" else 12)
    assert "conv2d" not in mod["main"].script() and "R.matmul" not in mod["main"].script()
    ex = relax.build(mma_kernels_for_cpu(mod), target=HOST)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](
        *(tvm.runtime.tensor(a.numpy()) for a in inputs)
    )
    out = (out[0] if not hasattr(out, "numpy") else out).numpy()
    with torch.no_grad():
        ref = net(*inputs)
    ref = (ref[0] if isinstance(ref, tuple | list) else ref).numpy()
    cosine = float((out * ref).sum() / np.linalg.norm(out) / np.linalg.norm(ref))
    assert cosine > 0.9999 and np.abs(out - ref).max() < 0.02 * np.abs(ref).max(), (
        cosine,
        np.abs(out - ref).max(),
    )


@pytest.mark.slow
@pytest.mark.parametrize("model", ["bert", "cnn"])
def test_bf16_model_on_cpu_twins_matches_torch_fp32(model):
    """``--precision bf16`` on CUDA: the float32 model with its dense, attention and conv
    layers on the bf16 tensor-core kernels (as CPU twins) against PyTorch in float32."""
    from tvmq.frontends import import_model
    from tvmq.passes import bf16_tensor_core_passes

    net, inputs, _ = _bert() if model == "bert" else _cnn()
    mod = bf16_tensor_core_passes(SM80)(import_model(net, example_inputs=inputs).mod)
    calls = re.findall(r"call_tir\((?:cls\.)?(\w+)", mod["main"].script())
    if model == "bert":
        assert sum(c.startswith("tvmq_bf16_batch_matmul_mma_") for c in calls) == 2
        assert sum(c.startswith("tvmq_bf16_dense_mma_") for c in calls) == 6  # q, k, v, out, FFN
    else:
        assert sum(c.startswith("tvmq_mma_im2col_") for c in calls) == 12
    assert "R.matmul" not in mod["main"].script() and "conv2d" not in mod["main"].script()
    ex = relax.build(mma_kernels_for_cpu(mod), target=HOST)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](
        *(tvm.runtime.tensor(a.numpy()) for a in inputs)
    )
    out = (out[0] if not hasattr(out, "numpy") else out).numpy()
    with torch.no_grad():
        ref = net(*inputs)
    ref = (ref[0] if isinstance(ref, tuple | list) else ref).numpy()
    cosine = float((out * ref).sum() / np.linalg.norm(out) / np.linalg.norm(ref))
    err = np.abs(out - ref).max() / np.abs(ref).max()
    # here: BERT 0.9999987, 0.0019; ResNet 0.99997, 0.0093 (bf16 keeps 8 mantissa bits)
    assert cosine > 0.9999 and err < (0.01 if model == "bert" else 0.03), (cosine, err)


@pytest.mark.nvcc
@pytest.mark.slow
@pytest.mark.parametrize("model", ["bert", "cnn"])
def test_compile_for_sm90_in_bf16_puts_matmuls_and_convs_on_tensor_cores(tmp_path, model):
    """``tvmq compile -t cuda-sm90 --precision bf16`` of a 1-layer BERT and a small ResNet:
    dense, attention and conv kernels listed as bf16 tensor-core kernels, their PTX in the
    library, no matmul / conv left to dlight's rules, the weights stored bf16."""
    import tvmq

    net, inputs, _ = _bert() if model == "bert" else _cnn()
    out = tmp_path / "build"
    tvmq.compile(net, "cuda-sm90", example_inputs=inputs, output_dir=out, progress=False,
                 precision="bf16")  # fmt: skip
    notes = json.loads((out / "model.json").read_text())["notes"]
    tensor_core = notes["kernels"]["tensor_core"]
    assert set(tensor_core.values()) == {"mma.sync.m16n8k16.bf16"}, tensor_core
    kinds = ("bf16_dense_mma", "bf16_batch_matmul_mma") if model == "bert" else ("conv_bf16",)
    for kind in kinds:
        assert any(name.startswith(f"tvmq_{kind}_") for name in tensor_core), tensor_core
    assert not [k for k in notes["kernels"]["default"] if re.search(r"matmul|dense|conv", k)]
    assert "bfloat16" in notes["weights"]
    data = (out / "model.so").read_bytes()
    assert b"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in data
    assert b".f16.f16." not in data
    entries = set(re.findall(rb"\.entry (\w+)_kernel", data))
    assert {k.encode() for k in tensor_core} <= entries


@pytest.mark.slow
@pytest.mark.parametrize("model", ["bert", "cnn"])
def test_int8_model_on_cpu_twins_equals_default_lowering(model):
    """A whole static-int8 model with every CUDA int8 pass (IMMA attention, convs, dense; dp4a
    for uint8 dense inputs), run as CPU twins, against TVM's default lowering of the same
    quantized module: integer math, so the outputs are equal."""
    from tvmq.frontends import import_model
    from tvmq.kernels.cuda_int8 import kernels_for_cpu
    from tvmq.passes import PackInt8DenseCUDA
    from tvmq.quantization import quantize

    net, inputs, calib = _bert() if model == "bert" else _cnn()
    imported = import_model(net, example_inputs=inputs)
    quantized = quantize(imported, calib, "int8", progress=False, evaluate=False).mod
    lowered = quantized
    for rewrite in (PackInt8DenseCUDA, PackMmaBatchMatmulCUDA, PackMmaConvCUDA):
        lowered = rewrite(SM80)(lowered)
    script = lowered["main"].script()
    assert "conv2d" not in script and "R.matmul" not in script
    calls = re.findall(r"call_tir\((?:cls\.)?(\w+)", script)
    wanted = "tvmq_int8_batch_matmul_imma_" if model == "bert" else "tvmq_mma_im2col_"
    assert sum(c.startswith(wanted) for c in calls) == (2 if model == "bert" else 12)

    def run(mod):
        ex = relax.build(mod, target=HOST)
        out = relax.VirtualMachine(ex, tvm.cpu())["main"](
            *(tvm.runtime.tensor(a.numpy()) for a in inputs)
        )
        return (out[0] if not hasattr(out, "numpy") else out).numpy()

    np.testing.assert_array_equal(
        run(kernels_for_cpu(mma_kernels_for_cpu(lowered))), run(quantized)
    )
