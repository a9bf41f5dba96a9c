"""CPU dense layers whose weight is stored compressed and decoded inside the kernel.

``Y[m, n] = sum_k X[m, k] * W[k, n]`` where ``W`` is never stored as float32. The weight
is packed at compile time by :func:`pack_decoded_weight` into ``[N/L, K', L]`` codes
(``L`` float lanes; ``K' = K`` for 8-bit codes, ``ceil(K / 2)`` for 4-bit codes, two a
byte: ``k = 2t`` in the low nibble, ``k = 2t + 1`` in the high one) and decoded as

- ``affine``: ``W[k, n] = (float(code) - Z[k // G, n] - offset) * S[k // G, n]`` (weight-only
  int8 / int4, per channel ``G = K`` or per group of ``G`` reduction elements); ``Z`` is
  absent for symmetric weights, ``offset`` 8 for signed 4-bit codes stored as ``q + 8``;
- ``table``: ``W[k, n] = T[code]`` (weight sharing: a codebook of at most 256 floats);
- ``bf16``: ``W[k, n]`` is the float32 whose upper half is the 16-bit code (``precision="bf16"``
  matmuls of a few rows, which AMX tiles do not pay for: a classifier streams half the bytes).

Both give exactly the float weight the graph decoders of ``QuantizeWeightOnly`` and
``ClusterWeights`` compute.

The schedule is :func:`tvmq.kernels.cpu_float_conv.float_conv2d_nhwc`'s (an ``mr x nr * L``
register tile over the whole reduction, tasks parallel over column panels) with one step
added: each task first decodes its ``K x nr * L`` weight panel into a buffer that stays in
cache, and all of its ``M / mr`` row tiles read that panel, so the decode is paid once per
weight element and call, not once per row tile. With a single row tile (``M <= mr``) the
decode is instead inlined into the multiply-add loop (nothing to share).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te
from tvm.s_tir import Schedule

from tvmq.kernels.cpu_float_conv import ConvTiles, bf16_to_float32
from tvmq.kernels.x86_int8 import KERNEL_ATTR

_PARALLEL_MIN_MACS = 1 << 20
# Tables up to this size are read with a tree of selects on the code's bits (vector blends
# over entries held in registers) rather than a gather, which TVM's codegen scalarizes.
_SELECT_TABLE = 16
FORMATS = ("affine", "table", "bf16")


@dataclass(frozen=True)
class DecodedWeight:
    """How a packed weight is decoded: ``fmt`` (``affine`` / ``table`` / ``bf16``), ``bits``
    (4 / 8; 16 for bf16) of each code, ``code_dtype`` (``int8`` for signed 8-bit affine codes,
    ``uint16`` for bf16, else ``uint8``),
    ``groups`` (rows of ``S`` / ``Z``), ``zero_point`` (whether ``Z`` is passed), ``offset``
    (a constant subtracted from every code) and ``table_size`` (entries of ``T``)."""

    fmt: str
    bits: int
    code_dtype: str = "uint8"
    groups: int = 1
    zero_point: bool = False
    offset: int = 0
    table_size: int = 0


def pack_codes(codes: np.ndarray, lanes: int, n_padded: int, bits: int) -> np.ndarray:
    """``[K, N]`` integer codes as ``[N'/L, K', L]`` (``K'`` halved for 4-bit codes).

    ``packed[j, k, i]`` holds the code of ``W[k, j * L + i]`` (8 or 16-bit), or those of rows
    ``2k`` (low nibble) and ``2k + 1`` (high nibble); padded columns and rows hold code 0.
    """
    k, n = codes.shape
    if n_padded % lanes or n_padded < n:
        raise ValueError(f"cannot pack {n} columns into {n_padded}")
    k_even = k + (k % 2) if bits == 4 else k
    full = np.zeros((k_even, n_padded), dtype=codes.dtype)
    full[:k, :n] = codes
    if bits == 4:
        u = full.astype(np.uint8) & 15
        full = (u[0::2] | (u[1::2] << 4)).astype(np.uint8)
    packed = full.reshape(full.shape[0], n_padded // lanes, lanes).transpose(1, 0, 2)
    return np.ascontiguousarray(packed)


def decoded_dense(m: int, k: int, tiles: ConvTiles, weight: DecodedWeight) -> tvm.tirx.PrimFunc:
    """Scheduled kernel ``(X (m, k), codes, [S, Z] | [T]) -> Y (m, N')``.

    ``m`` must be a multiple of ``tiles.mr`` and ``N' = tiles.o_padded`` of ``tiles.nr * L``.
    Arguments after the codes: ``S`` (and ``Z`` when ``weight.zero_point``), float32
    ``(groups, N')``, for ``affine``; ``T`` float32 ``(table_size,)`` for ``table``; none for
    ``bf16``.
    """
    n, lanes = tiles.o_padded, tiles.lanes
    if m % tiles.mr or n % (tiles.nr * lanes):
        raise ValueError(f"unpadded output {m}x{n} for tiles {tiles}")
    if weight.fmt not in FORMATS or weight.bits not in ((16,) if weight.fmt == "bf16" else (4, 8)):
        raise ValueError(f"unknown weight format {weight}")
    if weight.fmt == "affine" and k % weight.groups:
        raise ValueError(f"{weight.groups} groups do not divide K = {k}")
    kq = (k + 1) // 2 if weight.bits == 4 else k
    x = te.placeholder((m, k), "float32", name="X")
    q = te.placeholder((n // lanes, kq, lanes), weight.code_dtype, name="Q")
    extra = []
    if weight.fmt == "affine":
        s = te.placeholder((weight.groups, n), "float32", name="S")
        extra.append(s)
        if weight.zero_point:
            extra.append(te.placeholder((weight.groups, n), "float32", name="Z"))
    elif weight.fmt == "table":
        extra.append(te.placeholder((weight.table_size,), "float32", name="T"))
    group = k // weight.groups if weight.fmt == "affine" else k

    def code(jb, r, i):
        if weight.bits != 4:
            return q[jb, r, i]
        byte = q[jb, r // 2, i]
        shift = (r % 2 * 4).astype(weight.code_dtype)
        return (byte >> shift) & tvm.tirx.const(15, weight.code_dtype)

    def decode(jb, r, i):
        c = code(jb, r, i)
        if weight.fmt == "bf16":
            return bf16_to_float32(c)
        if weight.fmt == "table":
            if weight.table_size <= _SELECT_TABLE:
                return _select_tree(extra[0], c, weight.table_size)
            return extra[0][c.astype("int32")]
        col = jb * lanes + i
        value = c.astype("float32")
        if weight.zero_point:
            value = value - extra[1][r // group, col]
        if weight.offset:
            value = value - tvm.tirx.const(float(weight.offset), "float32")
        return value * extra[0][r // group, col]

    wdec = te.compute((n // lanes, k, lanes), decode, name="wdec")
    rk = te.reduce_axis((0, k), name="rk")
    acc = te.compute(
        (m, n),
        lambda i, j: te.sum(x[i, rk] * wdec[j // lanes, rk, j % lanes], axis=rk),
        name="acc",
    )
    out = te.compute((m, n), lambda i, j: acc[i, j], name="Y")
    func = te.create_prim_func([x, q, *extra, out])
    return _schedule(func, tiles, parallel=m * n * k >= _PARALLEL_MIN_MACS)


def _select_tree(table: te.Tensor, code, size: int):
    """``table[code]`` as selects on the bits of ``code`` (``size`` a power of two)."""
    bits = max(1, (size - 1).bit_length())
    dtype = str(code.ty)
    one = tvm.tirx.const(1, dtype)

    def pick(lo: int, bit: int):
        if bit < 0:
            return table[lo]
        half = 1 << bit
        if lo + half >= size:
            return pick(lo, bit - 1)
        is_set = ((code >> tvm.tirx.const(bit, dtype)) & one) == one
        return tvm.tirx.Select(is_set, pick(lo + half, bit - 1), pick(lo, bit - 1))

    return pick(0, bits - 1)


def _schedule(func: tvm.tirx.PrimFunc, tiles: ConvTiles, parallel: bool) -> tvm.tirx.PrimFunc:
    sch = Schedule(func)
    wdec, acc, out = sch.get_sblock("wdec"), sch.get_sblock("acc"), sch.get_sblock("Y")
    i, j = sch.get_loops(out)
    jo, ji = sch.split(j, [None, tiles.nr * tiles.lanes])
    io, ii = sch.split(i, [None, tiles.mr])
    sch.reorder(jo, io, ii, ji)
    if parallel:
        sch.parallel(jo)
    sch.compute_at(acc, io)
    loops = sch.get_loops(acc)[2:]
    rows = loops[:1] if tiles.mr > 1 else []
    channels, reduction = loops[len(rows)], loops[len(rows) + 1]
    ni, nv = sch.split(channels, [tiles.nr, tiles.lanes])
    sch.reorder(reduction, *rows, ni, nv)
    sch.vectorize(nv)
    init = sch.decompose_reduction(acc, reduction)
    for loop in (*rows, ni):
        sch.unroll(loop)
    sch.vectorize(sch.get_loops(init)[-1])
    _, vj = sch.split(ji, [None, tiles.lanes])
    sch.vectorize(vj)
    if sch.get(io).extent.value == 1:
        sch.compute_inline(wdec)  # one row tile: decode in registers, as the panel is read
    else:
        # The task's K x (nr * L) panel, decoded once before its row tiles.
        sch.compute_at(wdec, jo)
        sch.vectorize(sch.get_loops(wdec)[-1])
    return (
        sch.mod["main"]
        .with_attr("tirx.is_scheduled", True)
        .with_attr(KERNEL_ATTR, "decoded_dense")
        .without_attr("global_symbol")
    )
