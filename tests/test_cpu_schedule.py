"""CPUDefaultSchedule: each step's loop structure, and numbers against numpy on random inputs."""

from __future__ import annotations

import ctypes
import mmap
import re

import numpy as np
import pytest
import tvm
from tvm import relax, tirx
from tvm.s_tir import dlight as dl

from tests.kernels.test_x86_int8 import with_cores
from tvmq.build import build, fuse_to_tir
from tvmq.cpu_schedule import CPUDefaultSchedule
from tvmq.targets import get_target


def _module(shape, body, dtype: str = "float32") -> tvm.IRModule:
    x = relax.Var("x", relax.TensorType(shape, dtype))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(body(x))
        bb.emit_func_output(out)
    return bb.get()


# The loop structures below are those of a 512-bit CPU (16 float32 lanes), whatever the host:
# scheduled for the AVX-512 preset. The numbers are checked on a build for the host.
_SCHEDULED_FOR = "x86-avx512-vnni"


def _scheduled_kernels(
    mod: tvm.IRModule, preset: str = _SCHEDULED_FOR, cores: int | None = None
) -> dict[str, str]:
    """Name -> TVMScript of each TIR kernel after fusion and the default schedule (AVX-512;
    for ``cores`` cores where given)."""
    return {
        gv.name_hint: f.script()
        for gv, f in _scheduled_module(mod, preset, cores).functions_items()
        if isinstance(f, tirx.PrimFunc)
    }


def _scheduled_module(mod: tvm.IRModule, preset: str, cores: int | None = None) -> tvm.IRModule:
    target = get_target(preset).tvm_target()
    if cores is not None:
        target = with_cores(cores, target)
    with target:
        fused = fuse_to_tir(mod, preset)
        return dl.ApplyDefaultSchedule(CPUDefaultSchedule())(fused)


def _run(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(build(mod, "host"), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _layer_norm(x, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + eps)


ROWWISE = {
    "softmax": (lambda x: relax.op.nn.softmax(x, axis=-1), _softmax),
    "layer_norm": (
        lambda x: relax.op.nn.layer_norm(
            x,
            relax.const(np.ones(256, np.float32)),
            relax.const(np.zeros(256, np.float32)),
            axes=[-1],
        ),
        _layer_norm,
    ),
}


@pytest.mark.parametrize("name", sorted(ROWWISE))
def test_rowwise_kernels_keep_simd_partials_per_row(name):
    op, reference = ROWWISE[name]
    mod = _module((2, 48, 256), op)
    (script,) = _scheduled_kernels(mod).values()
    # Every block sits under one parallel row loop; reductions are split into 16-lane
    # partial results ("_rf" buffers) with a vectorized inner loop.
    assert len(re.findall(r"T\.parallel", script)) == 1
    assert "_rf = T.sblock_alloc_buffer" in script and "T.vectorized" in script

    x = np.random.default_rng(0).standard_normal((2, 48, 256), dtype=np.float32) * 4
    np.testing.assert_allclose(_run(mod, x), reference(x), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("preset,partials", [("x86-avx512-vnni", 64), ("x86-avx2", 32)])
def test_reduction_partials_follow_the_targets_simd_width(preset, partials):
    # 4 vectors of float32 lanes: 16 lanes on AVX-512, 8 on AVX2 (TVM 0.27's own width query
    # says 512 for every x86 CPU).
    (script,) = _scheduled_kernels(_module((96, 384), relax.op.max), preset).values()
    assert f"_rf = T.sblock_alloc_buffer((T.int64({partials}),))" in script


@pytest.mark.parametrize("reduce", ["min", "max", "sum"])
def test_whole_tensor_reduction_is_vectorized(reduce):
    mod = _module((96, 384), getattr(relax.op, reduce))
    (script,) = _scheduled_kernels(mod).values()
    assert "_rf = T.sblock_alloc_buffer((T.int64(64),))" in script
    assert "T.vectorized" in script

    x = np.random.default_rng(1).standard_normal((96, 384), dtype=np.float32)
    out = _run(mod, x)
    expected = getattr(np, reduce)(x.astype(np.float64))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-3)


def test_elementwise_chain_becomes_one_vectorized_loop_nest():
    def chain(x):
        y = relax.op.multiply(x, relax.const(np.float32(0.5)))
        y = relax.op.add(y, relax.const(np.float32(1.0)))
        y = relax.op.nn.gelu(y)
        return relax.op.reshape(y, (64, 96))

    mod = _module((2, 32, 96), chain)
    (script,) = _scheduled_kernels(mod).values()
    assert len(re.findall(r"^\s+with T\.sblock\(", script, re.M)) == 1, script
    assert "T.vectorized" in script

    x = np.random.default_rng(2).standard_normal((2, 32, 96), dtype=np.float32) * 3
    y = x * 0.5 + 1.0
    erf = np.vectorize(__import__("math").erf)
    expected = (0.5 * y * (1 + erf(y / np.sqrt(2.0)))).reshape(64, 96)
    np.testing.assert_allclose(_run(mod, x), expected, rtol=1e-5, atol=2e-6)


def test_producer_read_by_a_reduction_is_not_inlined():
    # exp feeds both the sum and the normalization of a softmax: inlining would recompute it.
    mod = _module((8, 128), lambda x: relax.op.nn.softmax(x, axis=-1))
    (script,) = _scheduled_kernels(mod).values()
    assert re.search(r"^\s+exp = T\.sblock_alloc_buffer", script, re.M), script


def test_blocks_over_different_rows_are_not_scheduled_row_wise():
    # pad (14x14) -> conv2d (12x12) -> relu: leading spatial axes differ between blocks.
    w = np.random.default_rng(3).standard_normal((8, 3, 3, 3)).astype(np.float32)

    def conv(x):
        return relax.op.nn.relu(relax.op.nn.conv2d(x, relax.const(w), padding=1))

    mod = _module((2, 3, 12, 12), conv)
    x = np.random.default_rng(4).standard_normal((2, 3, 12, 12)).astype(np.float32)
    pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(pad, (3, 3), axis=(2, 3))
    expected = np.maximum(np.einsum("ncyxij,fcij->nfyx", windows, w), 0)
    np.testing.assert_allclose(_run(mod, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduce", ["min", "max"])
@pytest.mark.parametrize("keepdims", [True, False])
def test_row_reduction_keeps_simd_partials_per_row(reduce, keepdims):
    # The per-row range of a dynamically quantized activation: one reduction block alone.
    mod = _module((128, 384), lambda x: getattr(relax.op, reduce)(x, axis=-1, keepdims=keepdims))
    (script,) = _scheduled_kernels(mod).values()
    assert "_rf = T.sblock_alloc_buffer" in script and "T.vectorized" in script
    assert len(re.findall(r"T\.parallel", script)) == 1

    x = np.random.default_rng(5).standard_normal((128, 384), dtype=np.float32)
    expected = getattr(np, reduce)(x, axis=-1, keepdims=keepdims)
    np.testing.assert_array_equal(_run(mod, x), expected)


def test_batch_matmul_is_not_a_row_reduction():
    # One reduction block over the innermost axis, but reading two tensors: step 4 applies.
    w = np.random.default_rng(6).standard_normal((4, 32, 64)).astype(np.float32)
    mod = _module((4, 64, 32), lambda x: relax.op.matmul(x, relax.const(w)))
    (script,) = _scheduled_kernels(mod).values()
    assert "_rf" not in script and "T.vectorized" in script

    x = np.random.default_rng(7).standard_normal((4, 64, 32), dtype=np.float32)
    np.testing.assert_allclose(_run(mod, x), x @ w, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n", [197, 50])
def test_ragged_matmul_columns_are_padded_to_whole_vectors(n):
    # Attention scores over 197 keys (ViT): no vector of 128+ bits divides 197, so the
    # columns are padded to a multiple of 16 (zero-padded operand, result copied back)
    # instead of running scalar. 50 columns: 2 lanes only, padded too.
    w = np.random.default_rng(8).standard_normal((3, 64, n)).astype(np.float32)
    mod = _module((3, 33, 64), lambda x: relax.op.matmul(x, relax.const(w)))
    (script,) = _scheduled_kernels(mod).values()
    padded = -(-n // 16) * 16
    assert f"T.int64({padded})" in script and "T.vectorized" in script
    assert "T.int64(36)" in script  # 33 rows padded to 4-row register blocks

    x = np.random.default_rng(9).standard_normal((3, 33, 64), dtype=np.float32)
    np.testing.assert_allclose(_run(mod, x), x @ w, rtol=1e-5, atol=1e-4)


def test_matmul_columns_a_narrower_vector_divides_are_not_padded():
    w = np.random.default_rng(10).standard_normal((2, 16, 40)).astype(np.float32)
    mod = _module((2, 8, 16), lambda x: relax.op.matmul(x, relax.const(w)))
    (script,) = _scheduled_kernels(mod).values()
    assert "T.int64(48)" not in script and "T.vectorized" in script  # 8 lanes divide 40


@pytest.mark.parametrize("channels", [16, 32])
def test_nhwc_max_pool_vectorizes_channels_with_window_loops_outside(channels):
    # uint8, channels last (what PackInt8ConvX86 leaves between convs): 16 or 32 channels are
    # narrower than one 64-byte vector, so step 4 takes the widest vector that divides them.
    shape = (1, 14, 14, channels)
    mod = _module(
        shape, lambda x: relax.op.nn.max_pool2d(x, 2, 2, layout="NHWC", out_layout="NHWC"), "uint8"
    )
    (script,) = _scheduled_kernels(mod).values()
    assert f"T.vectorized(T.int64({channels}))" in script, script
    # The 2x2 window loops sit outside the vectorized channel loop.
    window = script.index("T.grid(T.int64(2), T.int64(2))")
    assert window < script.rindex("T.vectorized")
    assert "T.parallel" not in script  # 6272 outputs: one thread

    x = np.random.default_rng(6).integers(0, 256, shape, dtype=np.uint8)
    expected = x.reshape(1, 7, 2, 7, 2, channels).max(axis=(2, 4))
    np.testing.assert_array_equal(_run(mod, x), expected)


def _pool_reference(x, kind: str, k: int, stride: int, pad: int, include_pad: bool):
    """numpy NHWC pooling with a zero / -inf border."""
    n, h, w, c = x.shape
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=fill)
    inside = np.pad(np.ones((h, w)), pad)
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    out = np.empty((n, oh, ow, c), np.float32)
    for i in range(oh):
        for j in range(ow):
            win = xp[:, i * stride : i * stride + k, j * stride : j * stride + k]
            if kind == "max":
                out[:, i, j] = win.max(axis=(1, 2))
            else:
                count = (
                    k * k
                    if include_pad
                    else inside[i * stride : i * stride + k, j * stride : j * stride + k].sum()
                )
                out[:, i, j] = win.sum(axis=(1, 2)) / count
    return out


@pytest.mark.parametrize(
    "kind,k,stride,pad,include_pad",
    [("max", 3, 2, 1, False), ("max", 5, 1, 2, False), ("avg", 3, 2, 1, False),
     ("avg", 3, 1, 1, True)],
)  # fmt: skip
def test_padded_pool_reads_its_input_in_place(kind, k, stride, pad, include_pad):
    """A pooling's padding is a select per window tap, not a padded copy of the image
    (ResNet's 3x3 / 2 max-pool, YOLO's 5x5 / 1 SPPF pools): no pad buffer, the channels
    vectorized, exact against numpy at the borders."""
    shape = (1, 15, 14, 32)
    pool = relax.op.nn.max_pool2d if kind == "max" else relax.op.nn.avg_pool2d
    kw = {} if kind == "max" else {"count_include_pad": include_pad}
    mod = _module(
        shape,
        lambda x: pool(x, k, stride, pad, layout="NHWC", out_layout="NHWC", **kw),
    )
    scripts = "".join(_scheduled_kernels(mod).values())
    assert "pad_temp" not in scripts and "T.vectorized" in scripts, scripts
    # The border taps read nothing (if_then_else, which evaluates one side only): the input
    # sits right after an unreadable page, so a read of row -1 would fault.
    x = _after_guard_page(np.random.default_rng(k).standard_normal(shape).astype(np.float32))
    want = _pool_reference(x, kind, k, stride, pad, include_pad)
    vm = relax.VirtualMachine(build(mod, "host"), tvm.cpu())
    got = vm["main"](tvm.runtime.from_dlpack(x)).numpy()  # zero-copy: the guarded buffer
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _after_guard_page(values: np.ndarray) -> np.ndarray:
    """A copy of ``values`` at the start of a page whose preceding page is PROT_NONE."""
    page = mmap.PAGESIZE
    buf = mmap.mmap(-1, 2 * page + values.nbytes)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    if ctypes.CDLL(None).mprotect(ctypes.c_void_p(base), page, 0) != 0:
        pytest.skip("mprotect refused a guard page")
    out = np.frombuffer(buf, values.dtype, values.size, offset=page).reshape(values.shape)
    out[...] = values
    return out


def test_nhwc_requantize_epilogue_vectorizes_16_channels():
    # bias + relu + per-channel scale + round to uint8, channels last (16 of them).
    rng = np.random.default_rng(7)
    bias = rng.integers(-500, 500, (1, 1, 1, 16), dtype=np.int32)
    scale = (rng.random((1, 1, 1, 16)) * 0.05).astype(np.float32)

    def epilogue(x):
        y = relax.op.nn.relu(relax.op.add(x, relax.const(bias)))
        y = relax.op.multiply(relax.op.astype(y, "float32"), relax.const(scale))
        zero = relax.const(0, "int32")
        return relax.op.quantize(y, relax.const(np.float32(1.0)), zero, out_dtype="uint8")

    mod = _module((1, 28, 28, 16), epilogue, "int32")
    (script,) = _scheduled_kernels(mod).values()
    assert "T.vectorized(T.int64(16))" in script, script

    x = rng.integers(-3000, 6000, (1, 28, 28, 16), dtype=np.int32)
    y = np.maximum(x + bias, 0).astype(np.float32) * scale
    expected = np.clip(np.round(y), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(_run(mod, x), expected)


def test_narrow_vectors_stop_at_128_bits():
    # 8 float32 = 256 bits: vectorized; 8 uint8 = 64 bits: left to LLVM.
    for dtype, vectorized in [("float32", True), ("uint8", False)]:
        mod = _module((64, 8), lambda x: relax.op.maximum(x, x), dtype)
        (script,) = _scheduled_kernels(mod).values()
        assert ("T.vectorized" in script) == vectorized, (dtype, script)


def test_cast_is_inlined_into_the_row_sum_that_reads_it_once():
    def row_sum(x):
        return relax.op.sum(relax.op.astype(x, "int32"), axis=[-1], keepdims=True)

    mod = _module((1, 12, 64, 128), row_sum, "uint8")
    (script,) = _scheduled_kernels(mod).values()
    assert "compute_intermediate" not in script  # no int32 copy of the input
    assert "_rf = T.sblock_alloc_buffer" in script and "T.vectorized" in script

    data = np.random.default_rng(8).integers(0, 256, (1, 12, 64, 128), dtype=np.uint8)
    vm = relax.VirtualMachine(build(mod, "host"), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(data)).numpy()
    np.testing.assert_array_equal(got, data.astype(np.int64).sum(-1, keepdims=True))


def test_producer_of_a_matmul_operand_is_not_inlined():
    # Inlining the cast into the matmul would recompute it once per output column.
    from tvm import te

    a = te.placeholder((32, 64), "uint8", name="A")
    w = te.placeholder((64, 48), "int32", name="W")
    cast = te.compute((32, 64), lambda i, k: a[i, k].astype("int32"), name="cast")
    r = te.reduce_axis((0, 64), name="r")
    c = te.compute((32, 48), lambda i, j: te.sum(cast[i, r] * w[r, j], axis=r), name="C")
    func = te.create_prim_func([a, w, c])
    with get_target("host").tvm_target() as target:
        sch = CPUDefaultSchedule().apply(func, target, False)
    assert "cast = T.sblock_alloc_buffer" in sch.mod["main"].script()


def test_quantize_before_a_transpose_stays_a_vectorized_loop():
    """quantize -> pad -> NCHW to NHWC of a tensor of more than 4 channels (an image's
    is PackImageNHWC's single kernel). The quantize (with the pad) runs vectorized in its own
    layout, apart from the transpose, which only moves the bytes (merged, the division ran
    once per byte in the transpose's order: 15x slower)."""
    scale, zero = np.float32(0.0349), 128

    def body(x):
        bb = relax.BlockBuilder.current()
        q = bb.emit(relax.op.quantize(x, relax.const(scale), relax.const(zero, "int32"),
                                      axis=-1, out_dtype="uint8"))  # fmt: skip
        p = bb.emit(relax.op.nn.pad(q, [0, 0, 0, 0, 3, 3, 3, 3], pad_value=float(zero)))
        return relax.op.permute_dims(p, [0, 2, 3, 1])

    mod = _module((1, 8, 24, 26), body)  # padded rows of 32 bytes
    (script,) = _scheduled_kernels(mod).values()
    quantize, transpose = script.split('T.sblock("T_transpose")')
    assert "T.round" in quantize and "T.vectorized" in quantize
    assert "T.round" not in transpose
    x = np.random.default_rng(0).standard_normal((1, 8, 24, 26)).astype(np.float32) * 3
    q = np.clip(np.rint(x / scale) + zero, 0, 255).astype(np.uint8)
    want = np.pad(q, [(0, 0), (0, 0), (3, 3), (3, 3)], constant_values=zero).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(_run(mod, x), want)


@pytest.mark.parametrize("n", [10, 128, 300])
def test_one_row_matmul_keeps_its_output_row_in_registers(n):
    # batch 1: the row's accumulators live in a local buffer across the whole reduction
    # (up to 8 SIMD vectors; 300 columns take several passes, 10 a masked vector)
    rng = np.random.default_rng(8)
    w = rng.standard_normal((96, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    body = lambda x: relax.op.nn.relu(relax.op.matmul(x, relax.const(w)) + relax.const(b))  # noqa: E731
    (script,) = _scheduled_kernels(_module((1, 96), body)).values()
    assert 'scope="local"' in script and "T.vectorized" in script and "T.unroll" in script

    x = rng.standard_normal((1, 96), dtype=np.float32)
    np.testing.assert_allclose(
        _run(_module((1, 96), body), x), np.maximum(x @ w + b, 0), rtol=1e-5, atol=1e-4
    )
    # several rows keep step 4's tile
    (script,) = _scheduled_kernels(_module((4, 96), body)).values()
    assert 'scope="local"' not in script


def test_batch_one_row_range_keeps_simd_partials():
    """The range of a batch-1 activation (row_qparams_u8: min, max, then scale and zero
    point over a (1, 784) row) gets SIMD partial results for both reductions, where the
    row-wise step, which lost the unit row loop, would give a serial min / max chain."""
    from tvmq.kernels.dynamic_quant import row_qparams_u8

    func = row_qparams_u8([1, 784], 1e-7)
    target = get_target("host").tvm_target()
    with target:
        mod = dl.ApplyDefaultSchedule(CPUDefaultSchedule())(tvm.IRModule({"main": func}))
    script = mod["main"].script()
    assert script.count("_rf = T.sblock_alloc_buffer") == 2 and "T.vectorized" in script
    lib = tvm.tirx.build(
        tvm.IRModule({"main": mod["main"].with_attr("global_symbol", "main")}), target=target
    )
    x = np.random.default_rng(2).standard_normal((1, 784), dtype=np.float32)
    out = tvm.runtime.tensor(np.zeros((1, 2), np.float32))
    lib(tvm.runtime.tensor(x), out)
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    scale = np.float32(max((np.float32(hi) - np.float32(lo)) / np.float32(255), np.float32(1e-7)))
    np.testing.assert_array_equal(out.numpy(), [[scale, np.clip(np.rint(-lo / scale), 0, 255)]])


def test_squeeze_excite_gate_read_across_its_layout_is_vectorized():
    """An NHWC activation times a (1, C, 1, 1) gate (the excite of a squeeze-excite block:
    the sigmoid of the squeeze, reshaped for the NCHW model, then transposed): the gate's
    channel axis is followed by unit axes only, so one step of the channel loop moves one
    element of every buffer, and the multiply vectorizes. It ran as a scalar loop
    (EfficientNet-B0's 112x112x32 gate: ~97 us of one thread's 5.6 ms)."""
    x = relax.Var("x", relax.TensorType((1, 28, 28, 32), "float32"))
    squeeze = relax.Var("s", relax.TensorType((1, 32), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, squeeze]):
        with bb.dataflow():
            gate = relax.op.reshape(relax.op.sigmoid(squeeze), (1, 32, 1, 1))
            gate = relax.op.permute_dims(gate, [0, 2, 3, 1])
            out = bb.emit_output(relax.op.multiply(x, gate))
        bb.emit_func_output(out)
    mod = bb.get()
    (script,) = _scheduled_kernels(mod).values()
    assert re.search(r"T\.vectorized\(T\.int64\(16\)\):\s+with T\.sblock\(\"T_multiply", script), (
        script
    )
    rng = np.random.default_rng(11)
    data = rng.standard_normal((1, 28, 28, 32), dtype=np.float32)
    s = rng.standard_normal((1, 32), dtype=np.float32)
    vm = relax.VirtualMachine(build(mod, "host"), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(data), tvm.runtime.tensor(s)).numpy()
    gate = 1 / (1 + np.exp(-s.astype(np.float64)))
    np.testing.assert_allclose(got, data * gate.reshape(1, 1, 1, 32), rtol=2e-6, atol=1e-7)


def test_unit_stride_ignores_the_sizes_of_axes_a_loop_does_not_move():
    """A read the inner loop does not move (``b[i, 0]``) may sit in a buffer of symbolic
    size: unit stride, no error (the flat-layout check had raised a TypeError there); a read
    it moves across a symbolic axis (``b[j, 0]`` of a ``(64, n)`` buffer) is not."""
    from tvm import s_tir, te

    from tvmq.cpu_schedule import _is_unit_stride

    def unit(b_shape, read) -> bool:
        a = te.placeholder((4, 64), "float32", name="a")
        b = te.placeholder(b_shape, "float32", name="b")
        c = te.compute((4, 64), lambda i, j: a[i, j] + read(b, i, j), name="c")
        sch = s_tir.Schedule(te.create_prim_func([a, b, c]))
        block = sch.get(sch.get_sblock("c"))
        return _is_unit_stride(block, block.iter_vars[1].var)

    n = tirx.Var("n", "int64")
    assert unit((4, n), lambda b, i, j: b[i, 0])
    assert not unit((64, n), lambda b, i, j: b[j, 0])


@pytest.mark.parametrize(
    ("shape", "split"),
    [
        ((1, 112, 112, 32), True),  # one channel tile: one thread before
        ((1, 14, 14, 672), True),  # H split between the cores
        ((1, 7, 7, 96), False),  # 4.7 K values: one thread
        ((1, 7, 7, 1280), False),  # 49 rows two cores do not divide
    ],
)
def test_global_pool_splits_its_rows_between_cores(shape, split):
    """A global average pool on a two-core target: each core sums one contiguous half of the
    rows (the half the kernel before it wrote), then the two partial sums are added; on one
    core the same kernel has no partial sums. Checked against numpy on random inputs."""
    mod = _module(shape, lambda x: relax.op.mean(x, axis=[1, 2], keepdims=True))
    for cores in (1, 2):
        (script,) = _scheduled_kernels(mod, cores=cores).values()
        assert ("_rf = T.sblock_alloc_buffer((T.int64(2)," in script) == (split and cores == 2)
    scheduled = _scheduled_module(mod, "host", cores=2)
    target = with_cores(2, get_target("host").tvm_target())
    (name,) = [
        gv.name_hint for gv, f in scheduled.functions_items() if isinstance(f, tirx.PrimFunc)
    ]
    kernel = scheduled[name].with_attr("global_symbol", "main")
    lib = tvm.tirx.build(tvm.IRModule({"main": kernel}), target=target)
    x = np.random.default_rng(12).standard_normal(shape, dtype=np.float32)
    out = tvm.runtime.tensor(np.zeros((1, 1, 1, shape[-1]), np.float32))
    lib(tvm.runtime.tensor(x), out)
    want = x.astype(np.float64).mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-6)


def test_detection_head_concat_across_layouts_runs_in_tiles_from_its_inputs():
    """A YOLO-style head: channels-last maps (the conv kernels' channels padded to 32), sliced
    to 255 channels, made channel-major, flattened and concatenated. The slices (plain copies)
    are read in place and the one copy across layouts runs in 8 x 8 tiles (rows and columns
    of the output), outermost rows in parallel; the result is numpy's on random values."""
    sizes = (12, 6, 3)

    def body(x):
        bb = relax.BlockBuilder.current()
        flat, start = [], 0
        for s in sizes:
            m = bb.emit(relax.op.strided_slice(x, [0, 1, 2], [0, start, 0], [1, start + s, s]))
            m = bb.emit(relax.op.strided_slice(m, [3], [0], [255]))
            m = bb.emit(relax.op.permute_dims(m, [0, 3, 1, 2]))
            flat.append(bb.emit(relax.op.reshape(m, (1, 255, s * s))))
            start += s
        return relax.op.concat(flat, axis=2)

    mod = _module((1, 21, 12, 256), body)
    (script,) = _scheduled_kernels(mod, cores=2).values()
    blocks = re.findall(r'T\.sblock\("(\w+)"\)', script)
    assert blocks == ["root", "T_concat"], script  # the slices inlined
    loops = re.findall(r"for (\w+) in T\.(parallel|grid)\(([^)]*)\)", script)
    assert loops[0][1] == "parallel", script
    assert re.search(r"T\.grid\(T\.int64\(\d+\), T\.int64\(8\), T\.int64\(8\)\)", script), script
    x = np.random.default_rng(0).standard_normal((1, 21, 12, 256)).astype(np.float32)
    parts, start = [], 0
    for s in sizes:
        m = x[:, start : start + s, :s, :255].transpose(0, 3, 1, 2).reshape(1, 255, s * s)
        parts.append(m)
        start += s
    np.testing.assert_array_equal(_run(mod, x), np.concatenate(parts, axis=2))


def test_copy_across_layouts_smaller_than_a_tile_keeps_plain_loops():
    """NHWC -> NCHW of 3 channels: fewer than a tile's 8 rows, so no tiles (a tile would be
    mostly padding); the values are still numpy's."""
    mod = _module((1, 16, 16, 3), lambda x: relax.op.permute_dims(x, [0, 3, 1, 2]))
    (script,) = _scheduled_kernels(mod).values()
    assert "T.where" not in script and "T.int64(8)" not in script, script
    x = np.random.default_rng(1).standard_normal((1, 16, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(_run(mod, x), x.transpose(0, 3, 1, 2))
