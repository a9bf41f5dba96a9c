"""bf16 matmuls on AMX tiles for float32 models (``precision="bf16"`` on CPUs with AMX-BF16).

``tdpbf16ps`` multiplies a 16 x 32 tile of bf16 activations by a 32 x 16 tile of bf16
weights and adds the products into a 16 x 16 float32 tile: 8192 multiply-adds an
instruction, against 16 for a 512-bit ``vfmadd231ps``. The price is bf16's 8-bit
significand on the inputs (products and sums stay float32), what PyTorch's
``autocast(dtype=torch.bfloat16)`` and OpenVINO's default on these CPUs also pay.

- :func:`bf16_bits` rounds float32 to bf16 (nearest even, NaN kept a NaN), as numpy;
  :func:`pack_weight_bf16` packs a ``(K, N)`` weight as ``[N/16, K/2, 16, 2]`` bf16 pairs
  (the B-tile layout), K padded to 32 and N to 16;
- :func:`to_bf16_rows` is the kernel that rounds the activations, ``(M, K)`` float32 ->
  ``(Mp, Kp)`` bf16 bits with zero padding;
- :func:`bf16_dense_amx` is the product, :func:`~tvmq.kernels.x86_amx.amx_kernel` with
  :data:`~tvmq.kernels.x86_amx.BF16` operands: ``(Mp, Kp) x packed -> (Mp, Np)`` float32;
- :func:`bf16_batch_matmul_amx` does the same for products of two activations
  (attention's): one packed weight a batch, packed at run time.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from tvmq.kernels._tiling import round_up
from tvmq.kernels.cpu_float_conv import ConvEpilogue, bf16_to_float32, round_to_bf16
from tvmq.kernels.x86_amx import BF16, TILE, AmxRows, amx_kernel, amx_tiles
from tvmq.kernels.x86_amx_conv import (
    Border,
    conv_rows,
    gathered_conv_rows,
    output_rows,
    zero_border,
)
from tvmq.kernels.x86_int8_conv import Conv2DGeometry

K_STEP = BF16.k_step
"""K elements one ``tdpbf16ps`` reduces: the padding unit of K."""

# Fewer values than this are converted on one thread: waking the pool costs more.
_PARALLEL_MIN_VALUES = 1 << 14


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounded to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, (bits >> 16) | np.uint32(0x40), rounded).astype(np.uint16)


def bf16_to_float(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns -> the float32 values they stand for."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def pack_weight_bf16(w: np.ndarray) -> np.ndarray:
    """A float32 ``(K, N)`` weight as bf16 bits ``[N/16, K/2, 16, 2]``, zero-padded to
    ``K % 32 == 0`` and ``N % 16 == 0``: ``packed[j, q, i, r] == bf16(w[2q + r, 16j + i])``."""
    k, n = w.shape
    kp, np_ = round_up(k, K_STEP), round_up(n, TILE)
    padded = np.zeros((kp, np_), np.uint16)
    padded[:k, :n] = bf16_bits(w)
    return np.ascontiguousarray(padded.reshape(kp // 2, 2, np_ // TILE, TILE).transpose(2, 0, 3, 1))


def bf16_padded(m: int, k: int, n: int) -> tuple[int, int, int]:
    """``(Mp, Kp, Np)`` for :func:`bf16_dense_amx`."""
    t = amx_tiles(m, k, n)
    return t.m_padded, round_up(k, K_STEP), t.n_padded


def to_bf16_rows(m: int, k: int, mp: int, kp: int, batch: int | None = None) -> tvm.tirx.PrimFunc:
    """``X (m, k) float32 -> (mp, kp)`` bf16 bits (uint16), rounded like :func:`bf16_bits`,
    zero in the padding; with ``batch``, ``(batch, m, k) -> (batch, mp, kp)``, each matrix
    padded. Elementwise: left to the default schedule."""
    lead = () if batch is None else (batch,)
    x = te.placeholder((*lead, m, k), "float32", name="X")

    def value(*index):  # if_then_else: the padding reads nothing (see to_bf16_padded)
        *b, i, j = index
        bits = round_to_bf16(x[(*b, i, j)])
        return tirx.if_then_else(tirx.all(i < m, j < k), bits, tirx.const(0, "uint16"))

    bits = te.compute((*lead, mp, kp), value, name="bf16")
    # Opaque to FuseOps: FuseTIR fails on a TE function fused after a reshape (TVM 0.27).
    return te.create_prim_func([x, bits]).without_attr("global_symbol").with_attr("op_pattern", 8)


def to_bf16_pairs(rows: int) -> tvm.tirx.PrimFunc:
    """``X (rows, 2, 16) float32 -> (rows, 16, 2)`` bf16 bits, rounded like :func:`bf16_bits`:
    row ``p`` of the result interleaves the two halves of ``X[p]`` (a B-tile row from its
    two K rows). Each pair is built as one 32-bit word, so the loop vectorizes: two
    contiguous loads and one contiguous store of 16 words. Scheduled (``op_pattern`` 8)."""
    with IRBuilder() as ib, T.prim_func():
        T.func_name("to_bf16_pairs")
        T.func_attr({"tirx.noalias": True})
        x = T.arg("X", T.Buffer((rows, 2, TILE), "float32"))
        c = T.arg("C", T.Buffer((rows, TILE, 2), "uint16"))
        # One root block: Relax's op pattern analysis (RewriteDataflowReshape) wants it.
        with T.sblock("root"):
            words = T.decl_buffer((rows * TILE,), "uint32", data=c.data)
            with T.serial(0, rows) as p, T.vectorized(0, TILE) as i:
                lo, hi = (round_to_bf16(x[p, r, i]).astype("uint32") for r in (0, 1))
                T.buffer_store(words, lo | (hi << tirx.const(16, "uint32")), [p * TILE + i])
    func = ib.get().with_attr("tirx.is_scheduled", True).without_attr("global_symbol")
    return func.with_attr("op_pattern", 8)


def from_bf16(shape: tuple[int, ...]) -> tvm.tirx.PrimFunc:
    """``(shape) uint16 bf16 bits -> float32``, exact (a value whose only readers take the
    bits instead is never computed: the kernel is dropped with it)."""
    x = te.placeholder(shape, "uint16", name="X")
    y = te.compute(shape, lambda *i: bf16_to_float32(x[i]))
    return te.create_prim_func([x, y]).without_attr("global_symbol")


def bf16_dense_amx(mp: int, kp: int, np_: int) -> tvm.tirx.PrimFunc:
    """``C (mp, np_) float32 = X (mp, kp) bf16 @ W`` with ``W`` from :func:`pack_weight_bf16`
    (sizes from :func:`bf16_padded`); scheduled, :data:`~tvmq.kernels.x86_int8.KERNEL_ATTR`
    ``"bf16_dense_amx"``."""
    tiles = amx_tiles(mp, kp, np_)
    rows = AmxRows(mp, kp * 2, lambda p: p * kp, lambda p: (p, None))
    return amx_kernel("bf16_dense_amx", (mp, kp), rows, kp, np_, tiles, False, None, ops=BF16)


def bf16_batch_matmul_amx(batch: int, mp: int, kp: int, np_: int) -> tvm.tirx.PrimFunc:
    """``C (batch * mp, np_) float32``: row block ``b`` of ``X (batch * mp, kp)`` bf16 times
    the ``b``-th weight of ``W (batch * np_/16, kp/2, 16, 2)`` (each as
    :func:`pack_weight_bf16`); ``mp`` a multiple of the step's rows (:func:`bf16_padded`).
    :data:`~tvmq.kernels.x86_int8.KERNEL_ATTR` ``"bf16_batch_matmul_amx"``."""
    tiles = amx_tiles(mp, kp, np_)
    count = batch * mp
    rows = AmxRows(count, kp * 2, lambda p: p * kp, lambda p: (p, None), batches=batch)
    name = "bf16_batch_matmul_amx"
    return amx_kernel(name, (count, kp), rows, kp, np_, tiles, False, None, ops=BF16)


def bf16_conv_applies(geo: Conv2DGeometry) -> bool:
    """Whether :func:`bf16_conv_amx` takes this conv: stride 1, no dilation, channels a
    multiple of 32 (each K step one tap's run of 32 channels) and two tiles of rows."""
    c = geo.x_shape[1]
    return (
        geo.strides == (1, 1)
        and geo.dilation == (1, 1)
        and c % K_STEP == 0
        and conv_rows(geo, c, K_STEP, 2).count >= 2 * TILE
    )


def to_bf16_padded(geo: Conv2DGeometry) -> tvm.tirx.PrimFunc:
    """``X (N, H, W, C) float32 -> (N, Hp, Wp, C)`` bf16 bits with the conv's zero padding,
    rounded like :func:`bf16_bits` (one pass: the pad and the rounding). Scheduled: each
    padded row is its left border, one contiguous run of ``W * C`` values (16-lane vectors),
    and its right border (rows in parallel), so no value is read in the border
    and no lane tests one: as an elementwise kernel over (pixel, channel), an RGB image (3
    channels, no vector of them) took 175 us for ResNet-18's 230x230 stem input."""
    n, c, h, w = geo.x_shape
    top, left, bottom, right = geo.padding
    hp, wp = h + top + bottom, w + left + right
    with IRBuilder() as ib, T.prim_func():
        T.func_name("to_bf16_padded")
        T.func_attr({"tirx.noalias": True})
        x = T.arg("X", T.Buffer((n, h, w, c), "float32"))
        y = T.arg("bf16", T.Buffer((n, hp, wp, c), "uint16"))
        # One root block: Relax's op pattern analysis (RewriteDataflowReshape) wants it.
        with T.sblock("root"):
            src = T.decl_buffer((n * h * w * c,), "float32", data=x.data)
            dst = T.decl_buffer((n * hp * wp * c,), "uint16", data=y.data)
            zero = tirx.const(0, "uint16")
            rows = T.parallel if hp * wp * c >= _PARALLEL_MIN_VALUES else T.serial
            with T.serial(0, n) as b, rows(0, hp) as i:
                row = (b * hp + i) * wp * c
                with T.If(tirx.any(i < top, i >= top + h)):
                    with T.Then(), T.serial(0, wp * c) as j:
                        T.buffer_store(dst, zero, [row + j])
                    with T.Else():
                        with T.serial(0, left * c) as j:
                            T.buffer_store(dst, zero, [row + j])
                        start, at = (b * h + i - top) * w * c, row + left * c
                        vectors, tail = divmod(w * c, TILE)
                        with T.serial(0, vectors) as v, T.vectorized(0, TILE) as j:
                            k = v * TILE + j
                            T.buffer_store(dst, round_to_bf16(src[start + k]), [at + k])
                        with T.serial(0, tail) as j:
                            k = vectors * TILE + j
                            T.buffer_store(dst, round_to_bf16(src[start + k]), [at + k])
                        with T.serial(0, right * c) as j:
                            T.buffer_store(dst, zero, [row + (left + w) * c + j])
    func = ib.get().with_attr("tirx.is_scheduled", True).without_attr("global_symbol")
    return func.with_attr("op_pattern", 8)


def bf16_conv_amx(
    geo: Conv2DGeometry,
    n_padded: int,
    bias: ConvEpilogue | None = None,
    bf16_out: Border | None = None,
    residual_bits: bool = False,
):
    """A float32 conv (:func:`bf16_conv_applies`) on bf16 AMX tiles, read straight from its
    padded bf16 input (:func:`to_bf16_padded`, the rows of
    :func:`~tvmq.kernels.x86_amx_conv.conv_rows`): ``W`` the dense weight
    ``W.transpose(0, 2, 3, 1).reshape(O, K).T`` packed by :func:`pack_weight_bf16`, ``C`` the
    ``(N * OH * OW, n_padded)`` float32 rows; with ``bias``, a ``bias (n_padded,)`` argument
    added (and with ``bias.residual`` a ``residual`` of ``C``'s shape) and the result clamped
    to its bounds before the store. With ``bf16_out`` (a border, maybe all 0), ``C`` is the
    next bf16 conv's input instead: the results rounded to bf16 bits, stored inside that zero
    border (:func:`~tvmq.kernels.x86_amx_conv.output_pixel`). ``residual_bits``: the
    residual is bf16 bits (a ResNet block's input that a bf16 conv stored)."""
    if not bf16_conv_applies(geo):
        raise ValueError(f"{geo} is not a conv the bf16 AMX conv kernel takes")
    n, c, h, w = geo.x_shape
    top, left, bottom, right = geo.padding
    rows = conv_rows(geo, c, K_STEP, 2, out_border=bf16_out)
    tiles = amx_tiles(2 * TILE, geo.k, n_padded)
    x_shape = (n, h + top + bottom, w + left + right, c)
    return amx_kernel(
        "bf16_conv_amx", x_shape, rows, geo.k, n_padded, tiles, False, None,
        ops=BF16, bias=bias, **_bf16_output(geo, n_padded, bf16_out, bias, residual_bits),
    )  # fmt: skip


def _bf16_output(
    geo: Conv2DGeometry, n_padded: int, border: Border | None, bias, residual_bits: bool
) -> dict:
    """:func:`~tvmq.kernels.x86_amx.amx_kernel`'s output keywords for a conv's float32
    rows, or with ``border`` its bf16 bits inside that zero border; the residual's dtype."""
    if border is not None and any(border) and bias is not None and bias.residual:
        raise ValueError("a residual is read row for row: its result takes no border")
    residual = {"residual_dtype": "uint16"} if residual_bits else {}
    if border is None:
        return {"out_rows": geo.m, **residual}
    return {
        **residual,
        "out_rows": output_rows(geo, border),
        "fill": zero_border(geo, border, n_padded),
        "out_dtype": "uint16",
        "convert": round_to_bf16,
    }


def bf16_conv_gathered_applies(geo: Conv2DGeometry) -> bool:
    """Whether :func:`bf16_conv_amx_gathered` takes this conv (``groups`` 1): two tiles of
    output pixels; any stride, dilation or channel count."""
    return geo.m >= 2 * TILE


def bf16_conv_amx_gathered(
    geo: Conv2DGeometry,
    n_padded: int,
    bias: ConvEpilogue | None = None,
    bf16_out: Border | None = None,
    residual_bits: bool = False,
):
    """A float32 conv that :func:`bf16_conv_amx` does not take (strided or dilated; channels
    off 32: an RGB stem) on bf16 AMX tiles, each block of output pixels im2col'd from the
    padded bf16 input (:func:`to_bf16_padded`) into a panel in cache right before the tiles
    read it (:func:`~tvmq.kernels.x86_amx_conv.gathered_conv_rows`). ``W`` the dense weight
    ``W.transpose(0, 2, 3, 1).reshape(O, K).T`` packed by :func:`pack_weight_bf16` (K padded
    to 32); arguments and result as :func:`bf16_conv_amx`'s."""
    if not bf16_conv_gathered_applies(geo):
        raise ValueError(f"{geo} has fewer output pixels than two tiles of rows")
    n, c, h, w = geo.x_shape
    top, left, bottom, right = geo.padding
    k = round_up(geo.k, K_STEP)
    tiles = amx_tiles(2 * TILE, k, n_padded)
    x_shape = (n, h + top + bottom, w + left + right, c)
    return amx_kernel(
        "bf16_conv_amx_gathered", x_shape, gathered_conv_rows(geo, bf16_out), k, n_padded,
        tiles, False, None, ops=BF16, bias=bias,
        **_bf16_output(geo, n_padded, bf16_out, bias, residual_bits),
    )  # fmt: skip
