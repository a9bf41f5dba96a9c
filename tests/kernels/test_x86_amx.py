"""x86 AMX int8 dense kernel: exact vs numpy, bit-identical epilogues vs the VNNI kernel,
and which kernel each shape gets."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from test_x86_int8 import residual_reference, residual_requantize, with_cores

from tvmq.kernels.x86_amx import (
    AMX_MIN_ROWS,
    amx_tiles,
    balanced_columns,
    balanced_rows,
    int8_dense_amx,
    pack_weight_amx,
    x86_int8_dense,
)
from tvmq.kernels.x86_int8 import Requantize

# An explicit AMX CPU: the host's LLVM name may hide AMX (a VM's CPU model), and these
# kernels must build wherever the suite runs; they run only where the CPU has AMX.
_AMX_TARGET = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sapphirerapids"}


def _compile(func: tvm.tirx.PrimFunc):
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=tvm.target.Target(_AMX_TARGET))


def _run(func, *arrays, out_shape, out_dtype, init=0):
    out = tvm.runtime.tensor(np.full(out_shape, init, out_dtype))
    _compile(func)["main"](*(tvm.runtime.tensor(a) for a in arrays), out)
    return out.numpy()


def _operands(rng, m, k, n):
    t = amx_tiles(m, k, n)
    x = np.zeros((t.m_padded, t.k_padded), np.uint8)
    x[:m, :k] = rng.integers(0, 256, (m, k), dtype=np.uint8)
    x[:, k:] = rng.integers(0, 256, (t.m_padded, t.k_padded - k))  # padding: weight rows are 0
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    return t, x, w


@pytest.mark.amx
@pytest.mark.parametrize("m,k,n", [(16, 64, 16), (45, 100, 40), (200, 576, 96), (70, 300, 520)])
def test_amx_dense_is_exact(m, k, n):
    rng = np.random.default_rng(m * k + n)
    t, x, w = _operands(rng, m, k, n)
    got = _run(
        int8_dense_amx(t.m_padded, t.k_padded, t.n_padded),
        x,
        pack_weight_amx(w),
        out_shape=(t.m_padded, t.n_padded),
        out_dtype="int32",
    )
    want = x[:m, :k].astype(np.int64) @ w.astype(np.int64)
    np.testing.assert_array_equal(got[:m, :n], want)


@pytest.mark.amx
@pytest.mark.parametrize("cores", [1, 2])
@pytest.mark.parametrize("m,k,n", [(197, 192, 64), (33, 64, 48), (197, 768, 32), (49, 960, 160)])
@pytest.mark.parametrize("requantize", [None, Requantize("int8", -2, -128, 100)])
def test_amx_dense_stores_exactly_m_rows(m, k, n, requantize, cores):
    """Any row count from one step's rows up: the last row block overlaps the one before it,
    ``X`` and ``C`` have exactly ``m`` rows (tiles stored straight to ``C`` without an
    epilogue, through the scratch with one). Exact against numpy, with the tasks split for
    one core or balanced for two (:func:`balanced_columns`)."""
    rng = np.random.default_rng(m + k + n)
    t = amx_tiles(m, k, n)
    x = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    want = x.astype(np.int64) @ w.astype(np.int64)
    args, dtype = [], "int32"
    if requantize is not None:
        offset = rng.integers(-5000, 5000, n).astype(np.int32)
        mult = (rng.random(n) * 1e-3).astype(np.float32)
        args, dtype = [offset, mult], requantize.dtype
        f = ((want + offset).astype(np.int32).astype(np.float32) * mult).astype(np.float32)
        want = np.clip(np.round(f) + np.float32(requantize.zero_point), -128, 100).astype(np.int8)
    with with_cores(cores, _AMX_TARGET):
        func = int8_dense_amx(
            m, k, n, with_offset=requantize is not None, requantize=requantize, tiles=t
        )
    got = _run(func, x, pack_weight_amx(w), *args, out_shape=(m, n), out_dtype=dtype)
    np.testing.assert_array_equal(got, want)


def test_balanced_columns_share_the_work_evenly_between_threads():
    """A 7x7 conv's 49 rows (2 blocks of 32, one task) x 160 columns (5 steps of 32) took 4
    + 1 column steps a task, one thread four times the other's work: now 3 + 2. 960 columns
    (30 steps) take 3 a task (15 a thread) rather than 4 (16 + 14). A split that is even
    already, one core, and the rows (7 blocks as 4 + 3: no column chunk evens them) keep
    the widest chunk."""
    assert balanced_columns(2, 5, 2, 4, 1) == 4
    assert balanced_columns(2, 5, 2, 4, 2) == 3
    assert balanced_columns(2, 30, 2, 4, 2) == 3
    assert balanced_columns(8, 8, 4, 4, 2) == 4
    assert balanced_columns(7, 18, 4, 4, 2) == 4


def test_balanced_rows_for_gathered_panels():
    """A conv whose tasks take every column (panel gathered in cache) evens the row blocks
    instead: 28x28's 25 blocks one a task (13 + 12, where 4 a task gave 16 + 9); 56x56's 98
    blocks 2 a task (50 + 48, within 3% of 49 + 49); one core keeps 4."""
    assert balanced_rows(25, 4, 2) == 1
    assert balanced_rows(98, 4, 2) == 2
    assert balanced_rows(25, 4, 1) == 4
    assert balanced_rows(8, 4, 2) == 4


@pytest.mark.amx
@pytest.mark.parametrize(
    "requantize",
    [
        Requantize("uint8", 3, 0, 255, relu=True),
        Requantize("int8", -2, -128, 100),
        Requantize("float32", 0, 0, 0),
    ],
    ids=["uint8-relu", "int8-clip", "dequantize"],
)
def test_amx_epilogue_matches_the_vnni_kernel_bit_for_bit(requantize):
    """The same offset + requantize as the VNNI kernel: the same bits (float32 round-half-even
    included), whichever kernel a layer gets."""
    rng = np.random.default_rng(7)
    m, k, n = 100, 300, 50
    t, x, w = _operands(rng, m, k, n)
    offset = rng.integers(-5000, 5000, t.n_padded).astype(np.int32)
    mult = (rng.random(t.n_padded) * 1e-3).astype(np.float32)
    mult[0] = 0.5  # exact halves: round half to even
    shape = (t.m_padded, t.n_padded)
    got = _run(
        int8_dense_amx(*shape[:1], t.k_padded, shape[1], with_offset=True, requantize=requantize),
        x,
        pack_weight_amx(w),
        offset,
        mult,
        out_shape=shape,
        out_dtype=requantize.dtype,
    )
    vnni = x86_int8_dense(m, k, n, amx=False)
    xv = np.zeros((vnni.m_padded, vnni.k_padded), np.uint8)
    xv[:m, :k] = x[:m, :k]
    want = _run(
        vnni.build(True, requantize),
        xv,
        vnni.pack(w),
        offset[: vnni.n_padded],
        mult[: vnni.n_padded],
        out_shape=(vnni.m_padded, vnni.n_padded),
        out_dtype=requantize.dtype,
    )
    np.testing.assert_array_equal(got[:m, :n], want[:m, :n])


def test_amx_is_chosen_where_it_pays():
    assert x86_int8_dense(AMX_MIN_ROWS - 1, 384, 64, amx=True).amx is None  # under a tile
    assert x86_int8_dense(128, 384, 384, amx=False).amx is None
    assert x86_int8_dense(128, 384, 384, amx=True).amx is not None  # MiniLM
    assert x86_int8_dense(12544, 16, 96, amx=True).amx is None  # K 16: padded 4x
    assert x86_int8_dense(49, 160, 960, amx=True).amx is None  # M 49 -> 64, K 160 -> 192
    choice = x86_int8_dense(12544, 147, 64, amx=True)  # ResNet's first conv
    assert (choice.m_padded, choice.k_padded, choice.n_padded) == (12544, 192, 64)
    assert (choice.amx.mt, choice.amx.nt) == (2, 2)
    assert choice.pack(np.ones((147, 64), np.int8)).shape == (4, 48, 16, 4)
    # a ragged M runs exactly (DeiT's 197 tokens), unless under one step of 2 x 16 rows
    assert x86_int8_dense(197, 192, 192, amx=True).m_padded == 197
    assert x86_int8_dense(24, 192, 192, amx=True).m_padded == 32


def test_amx_kernel_emits_tile_instructions():
    """Builds anywhere (no AMX needed to compile): the asm holds the tile ops and asks the OS
    for the tile state."""
    lib = _compile(int8_dense_amx(64, 128, 64, with_offset=True))
    asm = "".join(m.inspect_source("asm") for m in [lib.mod, *lib.mod.imports] if m.kind == "llvm")
    for op in ("ldtilecfg", "tileloadd", "tdpbusd", "tilestored", "tilerelease", "syscall"):
        assert op in asm, op


def _conv_reference(x_nhwc, w_oihw, pad):
    """int64 NHWC conv, stride 1: ``(N * OH * OW, O)`` rows."""
    top, left, bottom, right = pad
    xp = np.pad(x_nhwc.astype(np.int64), ((0, 0), (top, bottom), (left, right), (0, 0)))
    o, c, kh, kw = w_oihw.shape
    n, hp, wp, _ = xp.shape
    oh, ow = hp - kh + 1, wp - kw + 1
    out = np.zeros((n, oh, ow, o), np.int64)
    for ky in range(kh):
        for kx in range(kw):
            out += xp[:, ky : ky + oh, kx : kx + ow, :] @ w_oihw[:, :, ky, kx].T.astype(np.int64)
    return out.reshape(-1, o), xp.astype(np.uint8)


@pytest.mark.amx
@pytest.mark.parametrize(
    ("x_shape", "o", "kernel", "pad"),
    [
        ((1, 64, 9, 10), 64, (3, 3), (1, 1, 1, 1)),
        ((2, 128, 7, 7), 48, (3, 3), (1, 1, 1, 1)),  # batch 2, 7x7: garbage rows between images
        ((1, 64, 12, 12), 96, (1, 1), (0, 0, 0, 0)),  # 1x1: the input itself
        ((1, 64, 8, 11), 32, (3, 2), (2, 0, 1, 1)),  # uneven kernel and padding
    ],
)
def test_amx_conv_without_im2col_is_exact(x_shape, o, kernel, pad):
    from tvmq.kernels.x86_amx_conv import amx_conv_applies, int8_conv_amx
    from tvmq.kernels.x86_int8_conv import Conv2DGeometry

    geo = Conv2DGeometry(x_shape, kernel, (1, 1), pad, (1, 1))
    assert amx_conv_applies(geo)
    rng = np.random.default_rng(sum(x_shape) + o)
    n, c, h, w = x_shape
    x = rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
    w_oihw = rng.integers(-128, 128, (o, c, *kernel), dtype=np.int8)
    want, x_padded = _conv_reference(x, w_oihw, pad)
    w2 = np.ascontiguousarray(w_oihw.transpose(0, 2, 3, 1).reshape(o, -1).T)
    np_ = -(-o // 16) * 16
    offset = rng.integers(-999, 999, np_).astype(np.int32)
    got = _run(
        int8_conv_amx(geo, np_, with_offset=True),
        x_padded,
        pack_weight_amx(w2),
        offset,
        out_shape=(geo.m, np_),
        out_dtype="int32",
    )
    np.testing.assert_array_equal(got[:, :o], want + offset[:o])


def test_amx_conv_takes_stride_one_convs_over_64_channel_multiples_or_tap_runs():
    from tvmq.kernels.x86_amx_conv import amx_conv_applies
    from tvmq.kernels.x86_int8_conv import Conv2DGeometry

    def geo(c, stride=1, dilation=1, hw=14):
        return Conv2DGeometry((1, c, hw, hw), (3, 3), (stride,) * 2, (1,) * 4, (dilation,) * 2)

    assert amx_conv_applies(geo(128))
    assert amx_conv_applies(geo(96))  # a kernel row's taps as one run: 288 read as 320
    assert amx_conv_applies(geo(32))  # 96 read as 128
    assert not amx_conv_applies(geo(24))  # 72 read as 128 would grow K by 78%
    assert not amx_conv_applies(geo(128, stride=2))
    assert not amx_conv_applies(geo(128, dilation=2))
    assert not amx_conv_applies(geo(128, hw=4))  # fewer rows than two tiles


@pytest.mark.amx
@pytest.mark.parametrize(
    ("c", "hw", "o", "k", "stride", "pad", "dilation"),
    [
        (3, 32, 64, 7, 2, 3, 1),  # a ResNet stem: 147 -> 192 of K
        (64, 14, 128, 3, 2, 1, 1),
        (64, 14, 128, 1, 2, 0, 1),  # a strided 1x1 projection
        (48, 12, 40, 3, 1, 2, 2),  # dilated: one run of C bytes a tap
        (64, 28, 64, 3, 2, 1, 1),  # 196 rows: 7 blocks of 32, balanced over 2 cores
    ],
)
@pytest.mark.parametrize("cores", [1, 2])
def test_amx_conv_gathered_in_cache_is_exact(c, hw, o, k, stride, pad, dilation, cores):
    import torch

    from tvmq.kernels.x86_amx_conv import AmxConv
    from tvmq.kernels.x86_int8_conv import Conv2DGeometry

    geo = Conv2DGeometry((1, c, hw, hw), (k, k), (stride,) * 2, (pad,) * 4, (dilation,) * 2)
    rng = np.random.default_rng(c + hw + o + k)
    x = rng.integers(0, 256, (1, hw, hw, c), dtype=np.uint8)
    w = rng.integers(-128, 128, (o, c, k, k), dtype=np.int8)
    x64, w64 = (torch.from_numpy(a.astype(np.float64)) for a in (x.transpose(0, 3, 1, 2), w))
    want = torch.nn.functional.conv2d(x64, w64, stride=stride, padding=pad, dilation=dilation)
    want = want.numpy().transpose(0, 2, 3, 1).reshape(-1, o)
    kernel = AmxConv(geo, -(-o // 16) * 16, gathered=True)
    w2 = np.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(o, -1).T)
    with with_cores(cores, _AMX_TARGET):
        func = kernel.build(False)
    got = _run(
        func,
        np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))),
        kernel.pack(w2),
        out_shape=(geo.m, kernel.n_padded),
        out_dtype="int32",
    )
    np.testing.assert_array_equal(got[:, :o], want)


@pytest.mark.amx
@pytest.mark.parametrize("gathered", [False, True], ids=["direct", "gathered"])
@pytest.mark.parametrize("border", [(1, 1, 1, 1), (0, 2, 3, 1)])
@pytest.mark.parametrize("cores", [1, 2])
def test_amx_conv_writes_its_result_zero_bordered(gathered, border, cores):
    """With ``out_border`` the conv's rows land inside a zero border (the next conv's padded
    input): every border pixel is written 0 over whatever the buffer held, every other pixel
    is the conv's, for two images (the border between them) and uneven borders."""
    from tvmq.kernels.x86_amx_conv import AmxConv
    from tvmq.kernels.x86_int8_conv import Conv2DGeometry

    geo = Conv2DGeometry((2, 64, 9, 10), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    rng = np.random.default_rng(sum(border) + gathered)
    x = rng.integers(0, 256, (2, 9, 10, 64), dtype=np.uint8)
    w = rng.integers(-128, 128, (48, 64, 3, 3), dtype=np.int8)
    want, x_padded = _conv_reference(x, w, geo.padding)
    kernel = AmxConv(geo, 48, gathered=gathered, out_border=border)
    offset = rng.integers(-999, 999, 48).astype(np.int32)
    with with_cores(cores, _AMX_TARGET):
        func = kernel.build(True)
    w2 = np.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(48, -1).T)
    top, left, bottom, right = border
    got = _run(
        func,
        x_padded,
        kernel.pack(w2),
        offset,
        out_shape=(kernel.output_rows, 48),
        out_dtype="int32",
        init=-7,  # what the buffer held before: every border pixel must be overwritten
    ).reshape(2, top + 9 + bottom, left + 10 + right, 48)
    inside = got[:, top : top + 9, left : left + 10]
    np.testing.assert_array_equal(inside.reshape(-1, 48), want + offset)
    got[:, top : top + 9, left : left + 10] = 0
    assert not got.any()


@pytest.mark.amx
@pytest.mark.parametrize("m", [64, 49])
def test_amx_residual_add_epilogue_is_exact(m):
    """The AMX store joins the residual input like the VNNI kernel (exactly ``m`` rows, the
    last block overlapping): numpy's separate float32 ops, bit for bit."""
    rng = np.random.default_rng(m)
    k, n = 192, 64
    requantize = residual_requantize(rng, "uint8")
    t = amx_tiles(m, k, n)
    x = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    offset = rng.integers(-5000, 5000, n).astype(np.int32)
    mult = (rng.random(n) * 4e-3).astype(np.float32)
    r = rng.integers(0, 256, (m, n)).astype(np.uint8)
    func = int8_dense_amx(m, k, n, with_offset=True, requantize=requantize, tiles=t)
    got = _run(func, x, pack_weight_amx(w), offset, mult, r, out_shape=(m, n), out_dtype="uint8")
    want = residual_reference(x.astype(np.int64) @ w.astype(np.int64), offset, mult, requantize, r)
    np.testing.assert_array_equal(got, want)
