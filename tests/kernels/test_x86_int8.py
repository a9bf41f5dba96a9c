"""x86 VNNI int8 kernels: exact vs numpy on random inputs, and no per-task heap scratch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tvm

from tvmq.kernels._tiling import round_up
from tvmq.kernels.x86_int8 import (
    DynamicDequantize,
    Requantize,
    ResidualAdd,
    RowQuantize,
    choose_tiles,
    int8_batch_matmul_vnni,
    int8_dense_vnni,
    int8_dense_vnni_rows,
    pack_weight_vnni,
    quantize_pays,
    with_int_rounding,
)
from tvmq.targets import get_target


def _compile(func: tvm.tirx.PrimFunc):
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=get_target("host").tvm_target())


def _llvm(lib, fmt: str) -> str:
    return "".join(m.inspect_source(fmt) for m in [lib.mod, *lib.mod.imports] if m.kind == "llvm")


def _workspace_allocs(lib) -> int:
    """Call sites of TVMBackendAllocWorkspace in the kernel (scratch buffers on the heap)."""
    return _llvm(lib, "ll").count("load ptr, ptr @__TVMBackendAllocWorkspace")


@pytest.mark.vnni
@pytest.mark.parametrize("m,k,n", [(8, 64, 48), (128, 384, 384), (24, 32, 128), (384, 64, 96)])
def test_dense_is_exact_with_one_scratch_buffer(m, k, n):
    lib = _compile(int8_dense_vnni(m, k, n))
    rng = np.random.default_rng(m + k + n)
    x = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    out = tvm.runtime.tensor(np.zeros((m, n), np.int32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(pack_weight_vnni(w)), out)
    np.testing.assert_array_equal(out.numpy(), x.astype(np.int64) @ w.astype(np.int64))
    # Only the accumulator tile may come from TVM's workspace pool: the intrinsic's operands
    # were let-bound values stored to two more workspaces per task, which halved the speed.
    assert "vpdpbusd" in _llvm(lib, "asm") and _workspace_allocs(lib) <= 1


@pytest.mark.vnni
@pytest.mark.parametrize(
    "m,k,n,r",
    [
        (56, 64, 32, Requantize("uint8", 0, 0, 255, relu=True)),
        (12, 36, 48, Requantize("int8", -3, -128, 127)),
        (49, 576, 64, Requantize("uint8", 7, 7, 200)),  # a clip narrower than the dtype
    ],
)
@pytest.mark.parametrize("int_rounding", [False, True], ids=["float-round", "int-round"])
def test_dense_requantize_epilogue_matches_numpy_float32(m, k, n, r, int_rounding):
    """The fused requantize is numpy's float32 ``rint(float32(acc + offset) * mult) + zp``,
    clamped, bit for bit (round half to even: ties are made likely by the multipliers),
    rounded in float32 or by the conversion to int32."""
    r = dataclasses.replace(r, int_rounding=int_rounding)
    lib = _compile(int8_dense_vnni(m, k, n, with_offset=True, requantize=r))
    rng = np.random.default_rng(m * n + k)
    x = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    offset = rng.integers(-20000, 20000, n, dtype=np.int32)
    mult = (rng.choice([0.5, 0.25, 2.0**-7], n) * rng.uniform(0.5, 1, n)).astype(np.float32)
    mult[::3] = 2.0**-8  # exact halves: round-half-to-even matters
    out = tvm.runtime.tensor(np.zeros((m, n), r.dtype))
    args = [x, pack_weight_vnni(w), offset, mult]
    lib["main"](*(tvm.runtime.tensor(a) for a in args), out)
    acc = (x.astype(np.int64) @ w.astype(np.int64) + offset).astype(np.int32)
    if r.relu:
        acc = np.maximum(acc, 0)
    q = np.rint(acc.astype(np.float32) * mult) + np.float32(r.zero_point)
    expected = np.clip(q, r.lo, r.hi).astype(r.dtype)
    np.testing.assert_array_equal(out.numpy(), expected)
    assert (expected != r.lo).mean() > 0.3  # not all clamped away


@pytest.mark.vnni
@pytest.mark.parametrize(
    "batch,m,k,n", [(12, 128, 32, 128), (3, 16, 128, 32), (2, 8, 4, 16), (2, 256, 8, 32)]
)
def test_batch_matmul_is_exact(batch, m, k, n):
    lib = _compile(int8_batch_matmul_vnni(batch, m, k, n))
    rng = np.random.default_rng(batch * m + n)
    x = rng.integers(0, 256, (batch, m, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (batch, k, n), dtype=np.int8)
    packed = np.stack([pack_weight_vnni(w[b]) for b in range(batch)])
    out = tvm.runtime.tensor(np.zeros((batch, m, n), np.int32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(packed), out)
    expected = np.einsum("bmk,bkn->bmn", x.astype(np.int64), w.astype(np.int64))
    np.testing.assert_array_equal(out.numpy(), expected)
    assert _workspace_allocs(lib) <= 1


@pytest.mark.vnni
@pytest.mark.parametrize(
    "row_scale,col_scale,constant", [(128, 0, 0), (0, -128, 0), (128, -128, -128 * 128 * 32)]
)
def test_batch_matmul_adds_row_and_column_terms_exactly(row_scale, col_scale, constant):
    """The shifted-operand corrections stored with the product: ``C + row_scale * rows[b, i]
    + col_scale * cols[b, j] + constant``, exact against numpy on random operands."""
    batch, m, k, n = 3, 24, 32, 48
    kernel = int8_batch_matmul_vnni(
        batch, m, k, n, row_scale=row_scale, col_scale=col_scale, constant=constant
    )
    lib = _compile(kernel)
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (batch, m, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (batch, k, n), dtype=np.int8)
    rows = rng.integers(-5000, 5000, (batch, m), dtype=np.int32)
    cols = rng.integers(-5000, 5000, (batch, n), dtype=np.int32)
    packed = np.stack([pack_weight_vnni(w[b]) for b in range(batch)])
    args = [tvm.runtime.tensor(x), tvm.runtime.tensor(packed)]
    args += [tvm.runtime.tensor(rows)] if row_scale else []
    args += [tvm.runtime.tensor(cols)] if col_scale else []
    out = tvm.runtime.tensor(np.zeros((batch, m, n), np.int32))
    lib["main"](*args, out)
    expected = np.einsum("bmk,bkn->bmn", x.astype(np.int64), w.astype(np.int64))
    expected += row_scale * rows[:, :, None].astype(np.int64)
    expected += col_scale * cols[:, None, :].astype(np.int64) + constant
    np.testing.assert_array_equal(out.numpy(), expected)


def test_unpadded_shapes_are_refused():
    with pytest.raises(ValueError, match="unpadded"):
        int8_batch_matmul_vnni(2, 8, 30, 16)


@pytest.mark.vnni
@pytest.mark.parametrize("k,n,with_offset", [(64, 32, False), (32, 64, True), (384, 96, True)])
def test_dense_for_a_run_time_row_count_is_exact(k, n, with_offset):
    """One library, rows = 8 * mo for any mo (a symbolic batch x sequence), still vpdpbusd."""
    lib = _compile(int8_dense_vnni_rows(k, n, with_offset=with_offset))
    assert "vpdpbusd" in _llvm(lib, "asm")
    rng = np.random.default_rng(k + n)
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    offset = rng.integers(-1000, 1000, n, dtype=np.int32)
    for mo in (1, 3, 17):
        x = rng.integers(0, 256, (8 * mo, k), dtype=np.uint8)
        out = tvm.runtime.tensor(np.zeros((8 * mo, n), np.int32))
        extra = [tvm.runtime.tensor(offset)] if with_offset else []
        lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(pack_weight_vnni(w)), *extra, mo, out)
        expected = x.astype(np.int64) @ w.astype(np.int64) + (offset if with_offset else 0)
        np.testing.assert_array_equal(out.numpy(), expected)


def _dynamic_layer_numpy(x, w, s_w, bias, relu, eps):
    """numpy float32, written out: each row's range widened to 0, scale, zero point, uint8
    bytes, exact integer product minus the zero point's term, dequantize, bias, ReLU."""
    lo = np.minimum(x.min(axis=1, keepdims=True), np.float32(0))
    hi = np.maximum(x.max(axis=1, keepdims=True), np.float32(0))
    s = np.maximum((hi - lo) / np.float32(255), np.float32(eps))
    z = np.clip(np.rint(-lo / s), 0, 255)
    q = np.clip(np.rint(x / s) + z, 0, 255).astype(np.uint8)
    acc = q.astype(np.int64) @ w.astype(np.int64) - z.astype(np.int64) * w.sum(0, np.int64)
    y = acc.astype(np.int32).astype(np.float32) * (s * s_w)
    y = y + bias if bias is not None else y
    return np.maximum(y, np.float32(0)) if relu else y


def _near_ties(x, eps, rng) -> None:
    """Move the nonzero entries of ``x`` (but each row's min and max) to ``(j + 1/2) * s``, ``s``
    their row's scale, or to the float next to it: where ``round(x / s)`` tells a division
    from a multiply by ``1 / s`` and round-half-to-even from other roundings."""
    for row in x:
        lo, hi = np.float32(min(row.min(), 0)), np.float32(max(row.max(), 0))
        s = np.maximum((hi - lo) / np.float32(255), np.float32(eps))
        cols = np.flatnonzero(row != 0)
        cols = cols[(cols != row.argmin()) & (cols != row.argmax())]
        if hi == lo or not len(cols):
            continue
        j = rng.integers(int(np.ceil(lo / s)), int(np.floor(hi / s)), len(cols))
        t = ((j + np.float32(0.5)) * s).astype(np.float32)
        near = [np.nextafter(t, np.float32(-np.inf)), t, np.nextafter(t, np.float32(np.inf))]
        row[cols] = np.clip(np.choose(rng.integers(0, 3, len(cols)), near), lo, hi)


@pytest.mark.vnni
@pytest.mark.parametrize(
    "m,k,n,bias,relu,n_out",
    [
        (1, 784, 128, True, True, None),  # the TFLite MLP's first layer
        (1, 128, 10, True, False, 10),  # its second: N padded to 16, 10 columns stored
        (1, 30, 10, False, False, None),  # K % 4 != 0: the kernel pads the bytes itself
        (3, 7, 17, True, True, None),  # shorter rows than one vector, odd everything
        (12, 100, 48, False, True, None),  # mr = 6, K % 16 == 4: a tail after the partials
        (64, 384, 64, True, False, None),  # 8 row tiles in parallel
    ],
)
def test_dense_quantizing_its_rows_matches_numpy(m, k, n, bias, relu, n_out):
    """The one-kernel dynamic layer (row range, scale, zero point, uint8 bytes, VNNI sums,
    dequantize, bias, ReLU) equals numpy's float32 computation bit for bit."""
    eps = 2.0**-23
    kp, np_ = round_up(k, 4), round_up(n, 16)
    layer = DynamicDequantize(bias=bias, relu=relu, quantize=RowQuantize(k, eps))
    lib = _compile(int8_dense_vnni(m, kp, np_, requantize=layer, n_out=n_out))
    rng = np.random.default_rng(m * k + n)
    x = rng.normal(size=(m, k)).astype(np.float32)
    x[:, : k // 3] = 0.0  # zero points other than the row's minimum ...
    x[m // 2] = np.abs(x[m // 2]) * 3  # ... and 0 (a row >= 0) ...
    if m > 2:
        x[-1] = 0.0  # ... and a zero row (scale eps)
    _near_ties(x, eps, rng)
    w = rng.integers(-127, 128, (k, n), dtype=np.int8)
    s_w = rng.uniform(1e-3, 1e-2, n).astype(np.float32)
    b = rng.normal(size=n).astype(np.float32)
    pad = (0, np_ - n)
    colsum = np.pad(w.astype(np.int32).sum(0, dtype=np.int32), pad)
    args = [x, pack_weight_vnni(w, kp), colsum, np.pad(s_w, pad)] + (
        [np.pad(b, pad)] if bias else []
    )
    out = tvm.runtime.tensor(np.zeros((m, n_out or np_), np.float32))
    lib["main"](*(tvm.runtime.tensor(a) for a in args), out)
    want = _dynamic_layer_numpy(x, w, s_w, b if bias else None, relu, eps)
    np.testing.assert_array_equal(out.numpy()[:, :n], want)
    assert (want != 0).mean() > 0.25  # not all ReLU'd away
    assert "vpdpbusd" in _llvm(lib, "asm")
    # A batch-1 row's bytes (< 1 KiB) live on the stack; a parallel kernel takes its row
    # block's bytes and its accumulator tile from TVM's workspace pool, once per task.
    allocs = _workspace_allocs(lib)
    assert allocs == 0 if m == 1 else allocs <= 2


def test_quantizing_its_rows_pays_serial_or_with_row_tiles():
    assert quantize_pays(1, 784, 128)  # serial: below the parallel threshold
    assert quantize_pays(128, 384, 1536)  # 16 row tiles of 8
    assert not quantize_pays(1, 1024, 1024)  # a parallel GEMV: its tasks are column tiles
    assert not quantize_pays(1, 512, 1008)  # parallel for its weight's size (< 2^20 MACs)


@pytest.mark.vnni
def test_a_short_reduction_takes_at_most_14_accumulators():
    """K <= 80 (EfficientNet's and MobileNetV2's 1x1 convs over 16-80 channels): the
    14-accumulator tile on any AVX-512 CPU (20-31% faster there than 8x3 / 8x2 on an Intel
    Xeon), longer ones keep theirs; the row count padded for it (2 x 401 rows: a multiple of
    7 or less, not of 8) suits the kernel, whose result is numpy's."""
    for m, n in ((12544, 96), (3136, 144), (784, 192), (802, 32)):
        short, long = choose_tiles(m, n, k=32), choose_tiles(m, n, k=512)
        assert short.mr * short.nr <= 14 < long.mr * long.nr, (m, n)
        assert short.mr <= 7 and short.m_padded % short.mr == 0
    m, k, n = 802, 24, 32
    tiles = choose_tiles(m, n, k=k)
    func = int8_dense_vnni(tiles.m_padded, k, n)
    rng = np.random.default_rng(11)
    x = rng.integers(0, 256, (tiles.m_padded, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    out = tvm.runtime.tensor(np.zeros((tiles.m_padded, n), np.int32))
    _compile(func)["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(pack_weight_vnni(w)), out)
    np.testing.assert_array_equal(out.numpy(), x.astype(np.int32) @ w.astype(np.int32))


@pytest.mark.vnni
def test_a_product_of_one_row_over_a_large_weight_runs_in_parallel():
    """ResNet-18's classifier, 1 x 512 x 1008 (half a million multiply-adds, below the
    threshold for parallel tiles): reading its 516 KB weight dominates, so its column tiles
    run in parallel; a 1 x 784 x 128 layer (100 KB) stays on one thread. Exact vs numpy."""
    rng = np.random.default_rng(9)
    for (k, n), parallel in (((512, 1008), True), ((784, 128), False)):
        func = int8_dense_vnni(1, k, n)
        assert ("T.parallel" in func.script()) == parallel, (k, n)
        x = rng.integers(0, 256, (1, k), dtype=np.uint8)
        w = rng.integers(-128, 128, (k, n), dtype=np.int8)
        out = tvm.runtime.tensor(np.zeros((1, n), np.int32))
        _compile(func)["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(pack_weight_vnni(w)), out)
        np.testing.assert_array_equal(out.numpy(), x.astype(np.int32) @ w.astype(np.int32))


def residual_reference(acc, offset, mult, requantize: Requantize, r) -> np.ndarray:
    """numpy's float32 ops of a requantize and its ResidualAdd, one rounding each (the
    separate Relax ops the kernel epilogue replaces)."""
    f32 = np.float32
    q = (acc + offset).astype(np.int32).astype(f32) * mult
    q = np.clip(np.round(q) + f32(requantize.zero_point), requantize.lo, requantize.hi)
    res = requantize.residual
    a = (q - f32(res.q_zero)) * f32(res.q_scale)
    b = (r.astype(f32) - f32(res.r_zero)) * f32(res.r_scale)
    out = np.round((a + b).astype(f32)) + f32(res.zero_point)
    return np.clip(out, res.lo, res.hi).astype(res.dtype)


def residual_requantize(rng, r_dtype: str) -> Requantize:
    """A requantize + residual add with random float32 scales (a ResNet block's sum, ReLU'd
    by its uint8 range)."""
    s_q, s_r = (float(np.float32(v)) for v in rng.uniform(0.3, 1.7, 2))
    res = ResidualAdd(r_dtype, 113, s_q, 0 if r_dtype == "int8" else 9, s_r, "uint8", 0, 0, 255)
    return Requantize("uint8", 113, 0, 255, residual=res)


@pytest.mark.vnni
@pytest.mark.parametrize("r_dtype", ["uint8", "int8"])
def test_dense_residual_add_epilogue_is_exact(r_dtype):
    """The requantized result joined to a residual input in the store: the bits numpy's
    separate float32 ops give (round half to even included)."""
    rng = np.random.default_rng(11)
    m, k, n = 56, 128, 64
    requantize = residual_requantize(rng, r_dtype)
    x = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    offset = rng.integers(-5000, 5000, n).astype(np.int32)
    mult = (rng.random(n) * 4e-3).astype(np.float32)
    info = np.iinfo(r_dtype)
    r = rng.integers(info.min, info.max + 1, (m, n)).astype(r_dtype)
    lib = _compile(int8_dense_vnni(m, k, n, with_offset=True, requantize=requantize))
    out = tvm.runtime.tensor(np.zeros((m, n), np.uint8))
    args = [x, pack_weight_vnni(w), offset, mult, r]
    lib["main"](*(tvm.runtime.tensor(a) for a in args), out)
    acc = x.astype(np.int64) @ w.astype(np.int64)
    want = residual_reference(acc, offset, mult, requantize, r)
    np.testing.assert_array_equal(out.numpy(), want)
    assert len(np.unique(want)) > 50  # the sums spread over the range, not clamped flat


def test_int_rounding_only_where_products_stay_within_int32():
    """``with_int_rounding`` bounds ``|(x @ w + offset) * multiplier|`` from the weights: a
    layer's usual multipliers (<< 1) qualify, one that could leave int32 keeps float32."""
    rng = np.random.default_rng(5)
    w = rng.integers(-128, 128, (4608, 64), dtype=np.int8)
    offset = rng.integers(-5000, 5000, 64).astype(np.int32)
    r = Requantize("uint8", 3, 0, 255)
    assert with_int_rounding(r, w, offset, np.full(64, 1e-3, np.float32)).int_rounding
    # 255 * sum|w| ~ 255 * 4608 * 64 ~ 7.5e7: a multiplier of 40 could reach 3e9, past int32
    big = np.full(64, 1e-3, np.float32)
    big[7] = 40.0
    assert not with_int_rounding(r, w, offset, big).int_rounding
    dequantize = Requantize("float32", 0, 0, 0)
    assert with_int_rounding(dequantize, w, offset, big) == dequantize


def _im2col_reference(x, w, geo):
    """``im2col(x) @ w`` in int64 for the NHWC ``x`` (int8 shifted by +128, its padding's
    zeros too)."""
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel, geo.strides, geo.dilation
    top, left, bottom, right = geo.padding
    xp = np.pad(x.astype(np.int64), ((0, 0), (top, bottom), (left, right), (0, 0)))
    xp += 128 if x.dtype == np.int8 else 0
    oh, ow = geo.out_hw
    taps = [
        xp[
            :,
            ky * dh : ky * dh + sh * (oh - 1) + 1 : sh,
            kx * dw : kx * dw + sw * (ow - 1) + 1 : sw,
        ]
        for ky in range(kh)
        for kx in range(kw)
    ]  # each (N, OH, OW, C)
    cols = np.stack(taps, axis=3).reshape(geo.m, geo.k)
    return cols @ w.astype(np.int64)


@pytest.mark.vnni
@pytest.mark.parametrize(
    ("x_shape", "strides", "padding", "dilation", "mr", "x_dtype", "strips"),
    [
        ((1, 16, 28, 28), 1, 1, 1, 7, "uint8", True),  # 3x3 tile of 7 pixels: 3 x 9 pixels
        ((2, 32, 29, 27), 2, 1, 1, 7, "int8", True),  # batch 2, stride 2: OW 14
        ((1, 16, 20, 20), 1, 2, 2, 4, "uint8", True),  # dilation 2
        ((1, 16, 30, 30), 1, 1, 1, 4, "int8", False),  # OW 30: a tile would span two rows
        ((1, 16, 9, 9), 1, 0, 1, 4, "uint8", False),  # M = 49 padded to 52
    ],
)
def test_in_kernel_im2col_is_exact(x_shape, strides, padding, dilation, mr, x_dtype, strips):
    """The dense kernel building its own im2col operand from the NHWC image, as input strips
    shared by a row tile's pixels where the tile lies in one output row, else as rows."""
    from tvmq.kernels.x86_int8 import DenseTiles, im2col_strips_fit
    from tvmq.kernels.x86_int8_conv import Conv2DGeometry

    n, c, h, w_ = x_shape
    geo = Conv2DGeometry(x_shape, (3, 3), (strides,) * 2, (padding,) * 4, (dilation,) * 2)
    m, k, o = round_up(geo.m, mr), geo.k, 32
    assert im2col_strips_fit(geo, m, mr) == strips
    func = int8_dense_vnni(m, k, o, tiles=DenseTiles(mr, 1, m), im2col=geo, x_dtype=x_dtype)
    stage = [line for line in func.script().splitlines() if "im2col_rows = " in line]
    span = (mr - 1) * strides + 2 * dilation + 1
    assert (f"({m // mr}, 3, {span}, {c})" if strips else f"({m}, {k})") in stage[0]
    rng = np.random.default_rng(m + c)
    info = np.iinfo(x_dtype)
    x = rng.integers(info.min, info.max + 1, (n, h, w_, c), dtype=x_dtype)
    w = rng.integers(-128, 128, (k, o), dtype=np.int8)
    out = tvm.runtime.tensor(np.zeros((m, o), np.int32))
    _compile(func)["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(pack_weight_vnni(w)), out)
    want = _im2col_reference(x, w, geo)
    np.testing.assert_array_equal(out.numpy()[: geo.m], want)
    np.testing.assert_array_equal(out.numpy()[geo.m :], np.repeat(want[-1:], m - geo.m, 0))


def with_cores(cores: int, target: tvm.target.Target | dict | None = None) -> tvm.target.Target:
    """``target`` (default: an AVX-512 VNNI CPU) built for ``cores`` threads: the kernels'
    task order follows the target's ``num-cores``."""
    base = target or {"kind": "llvm", "mcpu": "cascadelake"}
    base = dict(base.export()) if isinstance(base, tvm.target.Target) else base
    return tvm.target.Target({**base, "num-cores": cores})


def tasks_loop(func: tvm.tirx.PrimFunc) -> str:
    """The name of a kernel's fused task loop (parallel or not), which spells its loops'
    order."""
    line = next(ln for ln in func.script().splitlines() if "_fused in " in ln)
    return line.split(" in ")[0].split()[-1]


@pytest.mark.vnni
def test_small_weights_on_several_cores_take_row_tiles_first():
    """A kernel over a small weight splits its rows between threads on a several-core
    target (each writes whole output rows: no cache line written by both), its column tiles
    first on one core or over a large weight; the same bits either way, numpy's."""
    m, k, n, r = 3136, 24, 144, Requantize("uint8", 5, 0, 255, int_rounding=True)
    funcs = {}
    for cores in (1, 2):
        with with_cores(cores):
            funcs[cores] = int8_dense_vnni(m, k, n, with_offset=True, requantize=r)
    assert tasks_loop(funcs[1]).startswith("j_0_i_0")
    assert tasks_loop(funcs[2]).startswith("i_0_j_0")
    with with_cores(2):  # a weight over 256 KB keeps its panels shared by the row tiles
        assert tasks_loop(int8_dense_vnni(128, 1024, 384, requantize=r)).startswith("j_0")
        assert tasks_loop(int8_dense_vnni(m, k, n)).startswith("i_0_j_0")  # int32 too
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    offset = rng.integers(-2000, 2000, n, dtype=np.int32)
    mult = rng.uniform(2e-4, 1e-3, n).astype(np.float32)
    acc = (x.astype(np.int64) @ w.astype(np.int64) + offset).astype(np.int32)
    expected = np.clip(np.rint(acc.astype(np.float32) * mult) + 5, 0, 255).astype(np.uint8)
    assert len(np.unique(expected)) > 50
    for func in funcs.values():
        out = tvm.runtime.tensor(np.zeros((m, n), np.uint8))
        args = [x, pack_weight_vnni(w), offset, mult]
        _compile(func)["main"](*(tvm.runtime.tensor(a) for a in args), out)
        np.testing.assert_array_equal(out.numpy(), expected)
