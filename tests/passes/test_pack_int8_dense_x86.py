"""PackInt8DenseX86: bit-exact VNNI int8 matmuls, vpdpbusd in the assembly, no-op elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from tvmq.kernels import KERNEL_ATTR, choose_tiles, pack_weight_vnni
from tvmq.passes.pack_int8_dense_x86 import PackInt8DenseX86, target_has_vnni

CASCADELAKE = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"})
SKYLAKE = tvm.target.Target({"kind": "llvm", "mcpu": "skylake"})
AARCH64 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"})
CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_80"}, host={"kind": "llvm"})


def _matmul_module(x_shape, w: np.ndarray, x_dtype: str, n_matmuls: int = 1) -> tvm.IRModule:
    """``main(x) = sum of n_matmuls copies of matmul(x, W, out_dtype=int32)``."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, x_dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(w, "int8"), out_dtype="int32"))
            for _ in range(n_matmuls - 1):
                other = bb.emit(relax.op.matmul(x, relax.const(w, "int8"), out_dtype="int32"))
                y = bb.emit(relax.op.add(y, other))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _random(rng, shape, dtype):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, shape, dtype=dtype)


def _run(mod: tvm.IRModule, x: np.ndarray, target=CASCADELAKE):
    ex = tvm.compile(mod, target=target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy(), ex


def _kernel_funcs(mod: tvm.IRModule):
    return [
        f
        for _, f in mod.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and KERNEL_ATTR in f.attrs
    ]


@pytest.mark.vnni
@pytest.mark.parametrize(
    ("x_shape", "n", "x_dtype"),
    [
        ((1, 784), 128, "uint8"),  # the demo's batch-1 first layer
        ((1, 128), 10, "uint8"),  # N padded to 16
        ((1, 784), 128, "int8"),
        ((7, 30), 10, "int8"),  # ragged M, K % 4 != 0, N % 16 != 0
        ((13, 16), 16, "uint8"),  # M with no tile divisor: padded to 16 rows
        ((24, 64), 48, "int8"),  # mr = 8, nr = 3
        ((2, 3, 13), 33, "int8"),  # leading dims flattened
    ],
)
def test_bit_exact_on_random_inputs(rng, x_shape, n, x_dtype):
    w = _random(rng, (x_shape[-1], n), np.int8)
    x = _random(rng, x_shape, np.dtype(x_dtype))
    mod = PackInt8DenseX86(CASCADELAKE)(_matmul_module(x_shape, w, x_dtype))
    assert len(_kernel_funcs(mod)) == 1
    got, _ = _run(mod, x)
    np.testing.assert_array_equal(got, x.astype(np.int32) @ w.astype(np.int32))


def _row_qparams_calls(mod):
    return [
        c
        for c in _ops_named(mod, "relax.call_tir")
        if c.args[0].name_hint.startswith("row_qparams")
    ]


def _shared_input_module(rng, x_shape, widths):
    """Float ``concat([x @ W_i for W_i], -1)``, then QuantizeDynamic: one quantize of ``x``
    read by every layer."""
    from tvmq.passes.quantize_dynamic import QuantizeDynamic

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            ys = [
                bb.emit(
                    relax.op.matmul(x, relax.const(rng.normal(size=(x_shape[-1], n)), "float32"))
                )
                for n in widths
            ]
            out = bb.emit_output(bb.emit(relax.op.concat(ys, axis=-1)))
        bb.emit_func_output(out)
    return QuantizeDynamic()(bb.get())


@pytest.mark.vnni
@pytest.mark.parametrize(
    ("x_shape", "widths", "fused"), [((1, 1024), (16, 1024), 1), ((16, 64), (32, 48), 2)]
)
def test_dynamic_layers_quantize_in_the_kernel_where_it_pays(rng, x_shape, widths, fused):
    """Layers that share one quantized input each quantize it in their kernel, except a
    parallel GEMV (its tasks are column tiles, each would quantize the row again): it keeps
    reading the uint8 row, and row_qparams_u8 and the quantize stay for it alone. Exact."""
    mod = _shared_input_module(rng, x_shape, widths)
    assert len(_row_qparams_calls(mod)) == 1
    packed = PackInt8DenseX86(CASCADELAKE)(mod)
    names = [str(gv.name_hint) for gv in packed.get_global_vars()]
    dense = [name for name in names if name.startswith("tvmq_int8_dense")]
    assert len(dense) == len(widths) and all("_dynamic" in name for name in dense), names
    assert sum("_quantize" in name for name in dense) == fused, names
    assert len(_row_qparams_calls(packed)) == (fused < len(widths))
    x = rng.normal(size=x_shape).astype("float32")
    np.testing.assert_array_equal(_run_main(packed, x), _run_main(mod, x))


SAPPHIRERAPIDS = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids"})


@pytest.mark.amx
@pytest.mark.parametrize(
    ("x_shape", "n", "x_dtype", "kernel"),
    [
        ((2, 32, 300), 40, "int8", "int8_dense_amx"),  # K padded to 320, N to 48
        ((128, 384), 96, "uint8", "int8_dense_amx"),
        ((7, 30), 10, "int8", "int8_dense_vnni"),  # under a tile of rows: VNNI
    ],
)
def test_amx_target_runs_dense_on_tiles_bit_exact(rng, x_shape, n, x_dtype, kernel):
    w = _random(rng, (x_shape[-1], n), np.int8)
    x = _random(rng, x_shape, np.dtype(x_dtype))
    mod = PackInt8DenseX86(SAPPHIRERAPIDS)(_matmul_module(x_shape, w, x_dtype))
    assert [str(f.attrs[KERNEL_ATTR]) for f in _kernel_funcs(mod)] == [kernel]
    got, _ = _run(mod, x, target=SAPPHIRERAPIDS)
    np.testing.assert_array_equal(got, x.astype(np.int32) @ w.astype(np.int32))


@pytest.mark.amx
@pytest.mark.parametrize(("x_shape", "x_dtype"), [((1, 197, 192), "int8"), ((2, 25, 128), "uint8")])
def test_amx_ragged_rows_need_no_pad_or_slice(rng, x_shape, x_dtype):
    """DeiT's 197 tokens (50: one task of row blocks): the AMX kernel reads and stores exactly M
    rows, so no nn.pad of x and no strided_slice of the result is left around it. Exact."""
    n = 48
    w = _random(rng, (x_shape[-1], n), np.int8)
    x = _random(rng, x_shape, np.dtype(x_dtype))
    mod = PackInt8DenseX86(SAPPHIRERAPIDS)(_matmul_module(x_shape, w, x_dtype))
    assert [str(f.attrs[KERNEL_ATTR]) for f in _kernel_funcs(mod)] == ["int8_dense_amx"]
    assert not _ops_named(mod, "relax.nn.pad")
    assert not _ops_named(mod, "relax.strided_slice")
    got, _ = _run(mod, x, target=SAPPHIRERAPIDS)
    np.testing.assert_array_equal(got, x.astype(np.int32) @ w.astype(np.int32))


@pytest.mark.vnni
@pytest.mark.parametrize(
    ("x_shape", "n", "requantized"),
    [((1, 197, 192), 48, False), ((13, 16), 32, False), ((1, 11, 40), 16, True)],
)
def test_vnni_ragged_rows_store_exactly_m_rows(rng, x_shape, n, requantized):
    """M with no tile divisor (DeiT's 197 tokens: 7 x 29 = 203 rows on Zen 4; 13; 11): x is padded
    for the kernel, but the kernel stores only the first M rows, so no strided_slice copies
    the result. Exact against numpy (and the requantized one against TVM's default lowering)."""
    w = _random(rng, (x_shape[-1], n), np.int8)
    x = _random(rng, x_shape, np.uint8)
    if requantized:
        mod = _requantized_dense_module(rng, x_shape, w, "uint8", True, None, "int8", 3)
    else:
        mod = _matmul_module(x_shape, w, "uint8")
    for target in (CASCADELAKE, tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})):
        packed = PackInt8DenseX86(target)(mod)
        assert not _ops_named(packed, "relax.strided_slice")
        names = [str(gv.name_hint) for gv in packed.get_global_vars()]
        assert any(n.startswith("tvmq_int8_dense_vnni_") and "_m" in n for n in names), names
        got = _run_main(packed, x)
        if requantized:
            np.testing.assert_array_equal(got, _run_main(mod, x))
        else:
            np.testing.assert_array_equal(got, x.astype(np.int32) @ w.astype(np.int32))


@pytest.mark.vnni
def test_extreme_values_do_not_overflow(rng):
    k, n = 784, 20
    w = np.full((k, n), -128, dtype=np.int8)
    w[:, ::2] = 127
    x = np.full((1, k), -128, dtype=np.int8)
    x[0, rng.integers(0, k, 100)] = 127
    got, _ = _run(PackInt8DenseX86(CASCADELAKE)(_matmul_module(x.shape, w, "int8")), x)
    np.testing.assert_array_equal(got, x.astype(np.int32) @ w.astype(np.int32))


def test_assembly_has_vpdpbusd(rng):
    w = _random(rng, (64, 32), np.int8)
    ex = tvm.compile(
        PackInt8DenseX86(CASCADELAKE)(_matmul_module((4, 64), w, "uint8")), CASCADELAKE
    )
    asm = "".join(m.inspect_source("asm") for m in ex.mod.imports if m.kind == "llvm")
    assert "vpdpbusd" in asm


def _is_tensor_const(e) -> bool:
    return isinstance(e, tvm.ir.Constant) and isinstance(e.ty, relax.TensorType)


def test_weight_is_packed_at_compile_time(rng):
    w = _random(rng, (30, 20), np.int8)
    mod = PackInt8DenseX86(CASCADELAKE)(_matmul_module((1, 30), w, "uint8"))
    consts = []
    relax.analysis.post_order_visit(
        mod["main"],
        lambda e: consts.append(e.value.numpy()) if _is_tensor_const(e) else None,
    )
    packed = [c for c in consts if c.ndim == 4]
    assert len(packed) == 1
    np.testing.assert_array_equal(packed[0], pack_weight_vnni(w))
    assert packed[0].shape == (2, 8, 16, 4)
    # packed[j, q, i, r] == w[4q + r, 16j + i], zero outside w
    assert packed[0][1, 7, 3, 1] == w[29, 19] and packed[0][1, 7, 4, 2] == 0


def test_same_shape_shares_one_kernel(rng):
    w = _random(rng, (32, 16), np.int8)
    mod = PackInt8DenseX86(CASCADELAKE)(_matmul_module((2, 32), w, "uint8", n_matmuls=2))
    assert len(_kernel_funcs(mod)) == 1
    assert all(f.attrs["tirx.is_scheduled"] for f in _kernel_funcs(mod))


def test_target_from_context(rng):
    mod = _matmul_module((1, 16), _random(rng, (16, 16), np.int8), "uint8")
    with CASCADELAKE:
        assert len(_kernel_funcs(PackInt8DenseX86()(mod))) == 1
    tvm.ir.assert_structural_equal(PackInt8DenseX86()(mod), mod)  # no target at all


@pytest.mark.parametrize("target", [SKYLAKE, AARCH64, CUDA], ids=["skylake", "aarch64", "cuda"])
def test_noop_without_vnni(rng, target):
    mod = _matmul_module((1, 16), _random(rng, (16, 16), np.int8), "uint8")
    assert not target_has_vnni(target)
    tvm.ir.assert_structural_equal(PackInt8DenseX86(target)(mod), mod)


def _float_module():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16), "float32"))
    with bb.function("main", [x]):
        y = bb.emit(relax.op.matmul(x, relax.const(np.ones((16, 8), "float32"))))
        bb.emit_func_output(y)
    return bb.get()


def _weight_param_module():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16), "uint8"))
    w = relax.Var("w", relax.TensorType((16, 8), "int8"))
    with bb.function("main", [x, w]):
        y = bb.emit(relax.op.matmul(x, w, out_dtype="int32"))
        bb.emit_func_output(y)
    return bb.get()


@pytest.mark.parametrize("make", [_float_module, _weight_param_module], ids=["float", "w_param"])
def test_noop_when_nothing_matches(make):
    mod = make()
    tvm.ir.assert_structural_equal(PackInt8DenseX86(CASCADELAKE)(mod), mod)


def test_idempotent(rng):
    mod = _matmul_module((7, 30), _random(rng, (30, 10), np.int8), "int8")
    once = PackInt8DenseX86(CASCADELAKE)(mod)
    tvm.ir.assert_structural_equal(PackInt8DenseX86(CASCADELAKE)(once), once)


@pytest.mark.parametrize(("m", "n"), [(1, 16), (7, 32), (12, 48), (13, 64), (128, 3072)])
def test_tiles_fit_registers_and_divide(m, n):
    t = choose_tiles(m, n)
    assert t.m_padded % t.mr == 0 and t.m_padded >= m and (n // 16) % t.nr == 0
    assert t.mr * t.nr <= 24


@pytest.mark.vnni
@pytest.mark.parametrize("x_dtype", ["uint8", "int8"])
def test_symbolic_batch_and_sequence_use_the_vnni_kernel(rng, x_dtype):
    """x: (batch, seq, K) with both symbolic: one kernel for every size, bit-exact."""
    b, s = tvm.tirx.Var("batch", "int64"), tvm.tirx.Var("seq", "int64")
    w = _random(rng, (40, 24), np.int8)  # K, N not multiples of 4, 16: padded
    mod = PackInt8DenseX86(CASCADELAKE)(_matmul_module((b, s, 40), w, x_dtype))
    assert "relax.matmul" not in mod.script() and len(_kernel_funcs(mod)) == 1
    ex = tvm.compile(mod, target=CASCADELAKE)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    for shape in [(1, 1), (2, 5), (3, 8), (1, 17)]:
        x = _random(rng, (*shape, 40), np.dtype(x_dtype))
        y = vm["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_array_equal(y, x.astype(np.int32) @ w.astype(np.int32))


def _requantized_dense_module(rng, x_shape, w, x_dtype, relu, clip, out_dtype, z):
    """What LowerInt8 emits for a dense layer: [reshape x to 2-D] -> matmul -> [reshape back]
    -> add(offset) [-> relu] -> astype -> multiply(m) -> quantize(1.0, z) [-> clip]; for a
    float32 ``out_dtype``, add [-> relu] -> dequantize along the last axis."""
    k, n = w.shape
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, x_dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            flat = bb.emit(relax.op.reshape(x, (-1, k))) if len(x_shape) > 2 else x
            y = bb.emit(relax.op.matmul(flat, relax.const(w), out_dtype="int32"))
            if len(x_shape) > 2:
                y = bb.emit(relax.op.reshape(y, (*x_shape[:-1], n)))
            y = bb.emit(relax.op.add(y, relax.const(rng.integers(-4000, 4000, n, np.int32))))
            if relu:
                y = bb.emit(relax.op.nn.relu(y))
            # sums of K random int8 products spread ~ 74**2 * sqrt(K): results in range
            m = (rng.random(n) * 0.02 / np.sqrt(k)).astype(np.float32)
            m[::4] = 2.0 ** -round(np.log2(100 * np.sqrt(k)))  # exact halves: half to even
            if out_dtype == "float32":
                zeros = relax.const(np.zeros(n, np.int32))
                q = relax.op.dequantize(y, relax.const(m), zeros, axis=len(x_shape) - 1)
            else:
                y = bb.emit(relax.op.astype(y, "float32"))
                y = bb.emit(relax.op.multiply(y, relax.const(m)))
                q = relax.op.quantize(y, relax.const(np.float32(1.0)), relax.const(z, "int32"),
                                      axis=-1, out_dtype=out_dtype)  # fmt: skip
                if clip is not None:
                    q = relax.op.clip(bb.emit(q), *clip)
            out = bb.emit_output(q)
        bb.emit_func_output(out)
    return bb.get()


def _ops_named(mod, name):
    found = []
    op = tvm.ir.Op.get(name)
    relax.analysis.post_order_visit(
        mod["main"],
        lambda e: found.append(e) if isinstance(e, relax.Call) and e.op.same_as(op) else None,
    )
    return found


def _casts_to_float(mod):
    return [c for c in _ops_named(mod, "relax.astype") if str(c.attrs.dtype) == "float32"]


def _fused_kernel_names(mod, out_dtype):
    fused = "_dequantize" if out_dtype == "float32" else "_requantize"
    return [str(gv.name_hint) for gv in mod.get_global_vars() if fused in str(gv.name_hint)]


def _run_main(mod, x):
    return _run(mod, x)[0]


@pytest.mark.vnni
@pytest.mark.parametrize(
    ("x_shape", "n", "x_dtype", "relu", "clip", "out_dtype", "z"),
    [
        ((1, 784), 128, "int8", True, None, "int8", -128),  # a TFLite int8 MLP's first layer
        ((7, 30), 10, "uint8", True, (3, 120), "uint8", 3),  # M, K, N all padded
        ((2, 5, 40), 24, "int8", False, (-100, 90), "int8", 2),  # 3-D: LowerInt8's reshapes
        ((13, 16), 20, "uint8", True, None, "float32", 0),  # dequantize (float out)
        ((2, 3, 13), 33, "int8", False, None, "float32", 0),  # 3-D dequantize
    ],
)
def test_requantize_runs_in_the_kernel_bit_exact(
    rng, x_shape, n, x_dtype, relu, clip, out_dtype, z
):
    """The requantize after an int8 dense layer is computed by its VNNI kernel: no int32
    tensor or quantize op is left, and the result equals TVM's default lowering of the
    unrewritten module exactly."""
    w = _random(rng, (x_shape[-1], n), np.int8)
    mod = _requantized_dense_module(rng, x_shape, w, x_dtype, relu, clip, out_dtype, z)
    packed = PackInt8DenseX86(CASCADELAKE)(mod)
    assert not _ops_named(packed, "relax.matmul")
    assert not _ops_named(packed, "relax.quantize") and not _ops_named(packed, "relax.dequantize")
    assert not _casts_to_float(packed)  # no int32 -> float32 pass left
    assert len(_fused_kernel_names(packed, out_dtype)) == 1
    assert packed["main"].ret_ty.dtype == out_dtype
    assert tuple(packed["main"].ret_ty.shape) == (*x_shape[:-1], n)
    x = _random(rng, x_shape, np.dtype(x_dtype))
    got, want = _run_main(packed, x), _run_main(mod, x)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) > min(20, got.size // 5)  # not clamped flat


@pytest.mark.vnni
def test_symbolic_rows_requantize_in_the_kernel_bit_exact(rng):
    """(batch, seq, K) with both symbolic: the rows kernel stores the requantized result."""
    b, s = tvm.tirx.Var("batch", "int64"), tvm.tirx.Var("seq", "int64")
    w = _random(rng, (40, 24), np.int8)
    mod = _requantized_dense_module(rng, (b, s, 40), w, "int8", True, None, "uint8", 7)
    packed = PackInt8DenseX86(CASCADELAKE)(mod)
    assert not _ops_named(packed, "relax.quantize") and not _casts_to_float(packed)
    assert _fused_kernel_names(packed, "uint8") == [
        "tvmq_int8_dense_vnni_Mx40x32_requantize_offset"
    ]
    run_packed = relax.VirtualMachine(tvm.compile(packed, target=CASCADELAKE), tvm.cpu())["main"]
    run_plain = relax.VirtualMachine(tvm.compile(mod, target=CASCADELAKE), tvm.cpu())["main"]
    for shape in [(1, 1), (2, 5), (1, 17)]:
        x = tvm.runtime.tensor(_random(rng, (*shape, 40), np.int8))
        np.testing.assert_array_equal(run_packed(x).numpy(), run_plain(x).numpy())


def _two_readers_module(rng):
    """matmul -> requantize, but the int32 result is also an output: nothing to fuse."""
    w = _random(rng, (32, 16), np.int8)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 32), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(w), out_dtype="int32"))
            f = bb.emit(relax.op.astype(y, "float32"))
            f = bb.emit(relax.op.multiply(f, relax.const(np.full(16, 0.01, np.float32))))
            q = bb.emit(relax.op.quantize(f, relax.const(np.float32(1.0)),
                                          relax.const(0, "int32"), out_dtype="uint8"))  # fmt: skip
            out = bb.emit_output(relax.Tuple([q, y]))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.vnni
def test_requantize_left_alone_when_the_sums_have_other_readers(rng):
    mod = _two_readers_module(rng)
    packed = PackInt8DenseX86(CASCADELAKE)(mod)
    assert not _fused_kernel_names(packed, "uint8") and _ops_named(packed, "relax.quantize")
    x = tvm.runtime.tensor(_random(rng, (4, 32), np.uint8))
    got, want = (relax.VirtualMachine(tvm.compile(m, CASCADELAKE), tvm.cpu())["main"](x)
                 for m in (packed, mod))  # fmt: skip
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.numpy(), w.numpy())


def test_other_targets_keep_the_requantize_ops(rng):
    """Only the x86 kernel stores the requantize: the AArch64 pass leaves the ops in place."""
    from tvmq.passes.pack_int8_dense_arm import PackInt8DenseARM

    w = _random(rng, (64, 32), np.int8)
    mod = _requantized_dense_module(rng, (4, 64), w, "int8", True, None, "int8", 0)
    packed = PackInt8DenseARM(AARCH64)(mod)
    assert not _ops_named(packed, "relax.matmul") and _ops_named(packed, "relax.quantize")
    assert not _fused_kernel_names(packed, "int8")


@pytest.mark.vnni
@pytest.mark.parametrize(("m", "gemv"), [(1, True), (8, True), (9, False), (24, False)])
def test_gemv_takes_int8_rows_and_stores_exact_columns(rng, m, gemv):
    """Up to 8 rows an int8 x goes to the kernel as is (no shift op: the kernel flips the
    bytes in registers) and the kernel stores exactly N = 40 columns (no slice); more rows
    keep the shift op and the slice. Exact either way."""
    w = _random(rng, (100, 40), np.int8)
    mod = PackInt8DenseX86(CASCADELAKE)(_matmul_module((m, 100), w, "int8"))
    shifts = [c for c in _ops_named(mod, "relax.astype") if str(c.attrs.dtype) == "int16"]
    assert bool(shifts) != gemv
    assert bool(_ops_named(mod, "relax.strided_slice")) != gemv
    names = [str(gv.name_hint) for gv in mod.get_global_vars()]
    gemv_kernels = [n for n in names if n.startswith("tvmq_int8") and n.endswith("_int8_n40")]
    assert len(gemv_kernels) == gemv
    x = _random(rng, (m, 100), np.int8)
    got, _ = _run(mod, x)
    np.testing.assert_array_equal(got, x.astype(np.int32) @ w.astype(np.int32))


def _float_mlp_module(rng, x_shape, k, hidden, n, relu):
    """Float ``[relu](x @ W1 + b1) @ W2 + b2`` (x of any rank), then QuantizeDynamic's IR."""
    from tvmq.passes.quantize_dynamic import QuantizeDynamic

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            h = bb.emit(
                relax.op.matmul(x, relax.const(rng.normal(size=(k, hidden)).astype("float32")))
            )
            h = bb.emit(relax.op.add(h, relax.const(rng.normal(size=hidden).astype("float32"))))
            if relu:
                h = bb.emit(relax.op.nn.relu(h))
            y = bb.emit(
                relax.op.matmul(h, relax.const(rng.normal(size=(hidden, n)).astype("float32")))
            )
            y = bb.emit(relax.op.add(y, relax.const(rng.normal(size=n).astype("float32"))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return QuantizeDynamic()(bb.get())


@pytest.mark.vnni
@pytest.mark.parametrize(
    ("x_shape", "k", "hidden", "n", "relu"),
    [
        ((1, 784), 784, 128, 10, True),  # the TFLite dynamic-range MLP: bias + ReLU, N padded
        ((2, 5, 40), 40, 64, 24, False),  # 3-D: 10 rows, read as (10, 40)
        ((12, 30), 30, 20, 17, True),  # odd K (padded in the kernel), N, hidden
        ((64, 96), 96, 48, 32, False),  # 8 row tiles of 8, in parallel
    ],
)
def test_dynamic_layer_is_one_kernel_bit_exact(rng, x_shape, k, hidden, n, relu):
    """Each dynamically quantized dense layer is one VNNI kernel: it reads the float32 rows,
    computes their range, scale, zero point and bytes, the sums, QuantizeDynamic's
    zero-point compensation and scale, the bias and ReLU: no row_qparams_u8, quantize or
    int32 tensor left, and the result equals TVM's default lowering of the unrewritten module
    exactly."""
    mod = _float_mlp_module(rng, x_shape, k, hidden, n, relu)
    packed = PackInt8DenseX86(CASCADELAKE)(mod)
    assert not _ops_named(packed, "relax.matmul") and not _casts_to_float(packed)
    assert not _ops_named(packed, "relax.subtract") and not _ops_named(packed, "relax.nn.relu")
    assert not _ops_named(packed, "relax.round") and not _row_qparams_calls(packed)
    names = [str(gv.name_hint) for gv in packed.get_global_vars()]
    assert sum("_dynamic_quantize" in name for name in names) == 2, names
    assert sum(name.startswith("tvmq_int8_dense") for name in names) == 2, names
    x = rng.normal(size=x_shape).astype("float32")
    x[..., :3] = 0.0  # a zero point other than the row's minimum
    got, want = _run_main(packed, x), _run_main(mod, x)
    assert got.shape == (*x_shape[:-1], n)
    np.testing.assert_array_equal(got, want)


SAPPHIRERAPIDS = tvm.target.Target(
    {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sapphirerapids"}
)


@pytest.mark.amx
def test_amx_dense_stores_the_requantize_and_leaves_dynamic_ops(rng):
    """A layer on AMX tiles (M >= 16, K >= 128) stores LowerInt8's requantize too (bit-exact
    with the unrewritten module); QuantizeDynamic's dequantize, which only the VNNI kernel
    stores, stays as Relax ops after an AMX layer."""
    w = _random(rng, (256, 64), np.int8)
    mod = _requantized_dense_module(rng, (2, 32, 256), w, "uint8", True, None, "uint8", 5)
    packed = PackInt8DenseX86(SAPPHIRERAPIDS)(mod)
    assert _fused_kernel_names(packed, "uint8") == [
        "tvmq_int8_dense_amx_64x256x64_requantize_offset"
    ]
    x = _random(rng, (2, 32, 256), np.uint8)
    got, want = _run(packed, x, SAPPHIRERAPIDS)[0], _run(mod, x, SAPPHIRERAPIDS)[0]
    np.testing.assert_array_equal(got, want)

    dynamic = _float_mlp_module(rng, (64, 256), 256, 128, 64, True)
    packed = PackInt8DenseX86(SAPPHIRERAPIDS)(dynamic)
    assert not any("_dynamic" in str(gv.name_hint) for gv in packed.get_global_vars())
    assert _ops_named(packed, "relax.subtract")  # the zero-point compensation stayed
    x = rng.normal(size=(64, 256)).astype("float32")
    got, want = _run(packed, x, SAPPHIRERAPIDS)[0], _run(dynamic, x, SAPPHIRERAPIDS)[0]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("m", "n"), [(8, 64), (128, 3072), (197, 192), (3136, 256), (50176, 48)])
def test_half_width_cpus_take_at_most_14_accumulators(m, n):
    """AMD Zen 4 (half-width 512-bit units): tiles of 16+ accumulators ran 3-30% slower."""
    t = choose_tiles(m, n, half_width=True)
    assert t.m_padded % t.mr == 0 and t.m_padded >= m and (n // 16) % t.nr == 0
    assert t.mr * t.nr <= 14 and choose_tiles(t.m_padded, n, half_width=True) == t
    zen4 = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
    with zen4:
        assert choose_tiles(m, n) == t


@pytest.mark.vnni
@pytest.mark.parametrize(("x_shape", "n"), [((24, 64), 48), ((197, 40), 64), ((128, 32), 96)])
def test_half_width_tiles_bit_exact(rng, x_shape, n):
    """The Zen 4 tiles (6x1, 7x2 over 203 padded rows, 4x3 here) give the exact products
    (built for Cascade Lake, which this host runs)."""
    zen4 = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
    w = _random(rng, (x_shape[-1], n), np.int8)
    x = _random(rng, x_shape, np.dtype("int8"))
    mod = PackInt8DenseX86(zen4)(_matmul_module(x_shape, w, "int8"))
    assert len(_kernel_funcs(mod)) == 1
    got, _ = _run(mod, x)
    np.testing.assert_array_equal(got, x.astype(np.int32) @ w.astype(np.int32))


def _gelu_module(rng, m, k, n, dynamic, bias_first=False):
    """A transformer FFN's first layer and its GELU, between reshapes to ``(1, m, n)`` and
    back: LowerInt8's dequantize (static: returned with its int8 weight, offset and scale) or
    QuantizeDynamic's (``dynamic``; its bias added as ``add(bias, y)`` with ``bias_first``,
    as ``torch.export`` writes it), then a second dynamically quantized layer reading the
    GELU (as BERT's FFN2). ``main`` returns the GELU and the second layer."""
    from tvmq.passes.quantize_dynamic import QuantizeDynamic

    w2 = rng.normal(size=(n, 8)).astype("float32")
    w = _random(rng, (k, n), np.int8)
    offset = rng.integers(-4000, 4000, n).astype(np.int32)
    scale = (rng.random(n) * 0.1 / np.sqrt(k) / 74 + 1e-4).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, k), "float32" if dynamic else "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            if dynamic:
                h = bb.emit(relax.op.matmul(x, relax.const(rng.normal(size=(k, n)), "float32")))
                bias = relax.const(rng.normal(size=n).astype("float32"))
                h = bb.emit(relax.op.add(bias, h) if bias_first else relax.op.add(h, bias))
            else:
                h = bb.emit(relax.op.matmul(x, relax.const(w), out_dtype="int32"))
                h = bb.emit(relax.op.add(h, relax.const(offset)))
                zeros = relax.const(np.zeros(n, np.int32))
                h = bb.emit(relax.op.dequantize(h, relax.const(scale), zeros, axis=1))
            h = bb.emit(relax.op.reshape(h, (1, m, n)))
            h = bb.emit(relax.op.nn.gelu(h))
            h = bb.emit(relax.op.reshape(h, (m, n)))
            y = bb.emit(relax.op.matmul(h, relax.const(w2)))
            out = bb.emit_output(relax.Tuple([h, y]))
        bb.emit_func_output(out)
    return QuantizeDynamic()(bb.get()), (w, offset, scale)


@pytest.mark.vnni
@pytest.mark.parametrize(
    ("m", "k", "n", "dynamic", "bias_first"),
    [(24, 48, 64, False, False), (14, 40, 48, True, False), (14, 40, 48, True, True)],
)
def test_gelu_after_the_dequantize_runs_in_the_kernel_bit_exact(rng, m, k, n, dynamic, bias_first):
    """A GELU after the layer's dequantize (and its bias, and the reshapes around it) is
    stored by the dense kernel: no GELU kernel left, the same bits as UseFastMath's GELU
    kernel, and the next layer still quantizes the GELU's rows itself."""
    import torch

    from tvmq.passes.use_fast_math import UseFastMath

    mod, (w, offset, scale) = _gelu_module(rng, m, k, n, dynamic, bias_first)
    packed = PackInt8DenseX86(CASCADELAKE)(mod)
    assert not _ops_named(packed, "relax.nn.gelu") and not _row_qparams_calls(packed)
    assert not _ops_named(packed, "relax.add")  # the bias too
    names = [str(gv.name_hint) for gv in packed.get_global_vars()]
    assert sum("_gelu" in name for name in names) == 1, names
    assert sum(name.endswith("_quantize") for name in names) == 1 + dynamic, names
    x = rng.normal(size=(m, k)).astype("float32") if dynamic else _random(rng, (m, k), np.uint8)
    ex = tvm.compile(packed, target=CASCADELAKE)
    got = [t.numpy() for t in relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))]
    ex = tvm.compile(UseFastMath()(mod), target=CASCADELAKE)
    want = [t.numpy() for t in relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))]
    for g, v in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, v)
    if not dynamic:  # vs torch's exact (erf) GELU of the dequantized sums
        pre = (x.astype(np.int64) @ w.astype(np.int64) + offset).astype(np.float32) * scale
        assert (pre < -1).any() and (pre > 1).any()  # both sides of the GELU's bend
        exact = torch.nn.functional.gelu(torch.from_numpy(pre)).numpy()
        # the rational's error is ~2e-7 |x| in the far negative tail (GELU -> -0 there)
        np.testing.assert_allclose(got[0], exact, atol=2e-7 * np.abs(pre).max(), rtol=1e-5)
