"""x86 AMX int8 dense kernel: ``uint8 (M, K) x packed int8 weight -> int32 (M, N)`` on tiles.

AMX (Intel Sapphire Rapids and newer Xeons) multiplies a 16 x 64 byte tile of activations
by a 16 x 64 byte tile of weights into a 16 x 16 int32 tile in one ``tdpbusd``: 16384
multiply-adds, against 64 for a 512-bit ``vpdpbusd``. The B tile wants the weight in the
VNNI layout, 16 output columns of 4 bytes per row, which is exactly a 16-row slice of
:func:`~tvmq.kernels.x86_int8.pack_weight_vnni`'s ``[N/16, K/4, 16, 4]`` packing: the
weight is packed the same way, only K is padded to a multiple of 64.

:func:`int8_dense_amx` takes the arguments of :func:`~tvmq.kernels.x86_int8.int8_dense_vnni`
(``X``, the packed ``W``, an optional per-column ``offset``, an optional ``multiplier`` for
a :class:`~tvmq.kernels.x86_int8.Requantize` epilogue, ``C``), so the passes swap one for
the other. Each parallel task owns ``mt x nt`` 16 x 16 accumulator tiles (at most 2 x 2:
eight tile registers hold four accumulators, two A and two B tiles) and walks the whole K;
the accumulators go to a small scratch buffer and the epilogue (offset, requantize or
dequantize) is computed from there before the store, as the VNNI kernel does it, so the
results are bit-identical. Without an epilogue the tiles are stored to ``C`` directly.

The instructions are emitted with ``call_llvm_intrin`` (``llvm.x86.ldtilecfg``,
``tileloadd64``, ``tdpbusd``, ``tilestored64``): TVM 0.27 ships no AMX tensor intrinsic.
The target needs ``amx-tile`` / ``amx-int8`` (``mcpu=sapphirerapids`` or ``mattr``). Linux
hands a process the AMX tile state only after ``arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)``: each call of the kernel makes that request (idempotent, well under a
microsecond), so the library also runs under the bare TVM runtime. Where the CPU lacks AMX or
the OS refuses it, a tile instruction faults (SIGILL): :func:`tvmq.load` refuses such a
library first, in one line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from tvmq.kernels._tiling import round_up
from tvmq.kernels.x86_int8 import (
    KERNEL_ATTR,
    Requantize,
    choose_tiles,
    int8_dense_vnni,
    pack_weight_vnni,
    padded_kn,
    requantize_value,
)
from tvmq.kernels.x86_int8_conv import Conv2DGeometry

TILE = 16
"""Rows (and int32 columns) of an AMX accumulator tile."""

TILE_K = 64
"""Bytes of K one ``tdpbusd`` reduces: the padding unit of K."""

AMX_MIN_ROWS = 16
"""Fewer rows than one tile stay on the VNNI kernel (a GEMV wastes most of a tile)."""

_AMX_MIN_K = 128  # shorter products are epilogue-bound: VNNI is as fast and pads less

_SYS_ARCH_PRCTL = 158  # x86_64 syscall number
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18
# Below this many multiply-adds a parallel launch costs more than it saves.
_PARALLEL_MIN_MACS = 1 << 21
# 16-column tiles one task walks: its tile configuration and scratch are set up once.
_COLUMN_CHUNK = 8
_ROW_BLOCKS = 4  # row blocks (of 16 or 32 rows) one task walks, at most


@dataclass(frozen=True)
class AmxTiles:
    """``mt x nt`` accumulator tiles per step (``mt, nt`` in 1..2) and the padded sizes."""

    mt: int
    nt: int
    m_padded: int
    k_padded: int
    n_padded: int


def amx_tiles(m: int, k: int, n: int) -> AmxTiles:
    """The tiling for an ``(m, k) x (k, n)`` product: K padded to 64, N to 16 (two tile
    columns where that makes a multiple of 32), M to 32 (two tile rows) unless it fits one."""
    kp, np_ = round_up(k, TILE_K), round_up(n, TILE)
    mp = round_up(m, TILE if m <= TILE else 2 * TILE)
    mt = 2 if mp % (2 * TILE) == 0 else 1
    nt = 2 if np_ % (2 * TILE) == 0 else 1
    return AmxTiles(mt, nt, mp, kp, np_)


def pack_weight_amx(w: np.ndarray) -> np.ndarray:
    """An int8 ``(K, N)`` weight as ``[N/16, K/4, 16, 4]`` with K zero-padded to 64."""
    return pack_weight_vnni(w, round_up(w.shape[0], TILE_K))


@dataclass(frozen=True)
class X86Int8Dense:
    """The int8 dense kernel of one ``(m, k) x (k, n)`` product on an x86 target: AMX tiles
    (``amx``) or the VNNI kernel (``amx`` None), with the padded sizes it wants. Both take
    the same arguments and the same ``[N/16, K/4, 16, 4]`` weight packing."""

    m_padded: int
    k_padded: int
    n_padded: int
    amx: AmxTiles | None

    @property
    def name(self) -> str:
        return "vnni" if self.amx is None else "amx"

    @property
    def label(self) -> str:
        return f"dense_{self.name}"

    def pack(self, w: np.ndarray) -> np.ndarray:
        return pack_weight_vnni(w, self.k_padded)

    def build(self, with_offset: bool, requantize: Requantize | None = None) -> tirx.PrimFunc:
        sizes = (self.m_padded, self.k_padded, self.n_padded)
        if self.amx is None:
            return int8_dense_vnni(*sizes, with_offset=with_offset, requantize=requantize)
        return int8_dense_amx(
            *sizes, with_offset=with_offset, requantize=requantize, tiles=self.amx
        )


@dataclass(frozen=True)
class AmxConv:
    """A conv on :func:`int8_conv_amx` (its input padded, not im2col'd), with the interface
    of :class:`X86Int8Dense` (``m_padded`` is the output pixels: no rows are padded)."""

    geo: Conv2DGeometry
    n_padded: int
    label = "conv_amx"

    @property
    def m_padded(self) -> int:
        return self.geo.m

    @property
    def k_padded(self) -> int:
        return self.geo.k

    def pack(self, w: np.ndarray) -> np.ndarray:
        return pack_weight_amx(w)

    def build(self, with_offset: bool, requantize: Requantize | None = None) -> tirx.PrimFunc:
        return int8_conv_amx(
            self.geo, self.n_padded, with_offset=with_offset, requantize=requantize
        )


def x86_int8_conv(geo: Conv2DGeometry, o: int, amx: bool) -> AmxConv | X86Int8Dense:
    """The kernel for an int8 conv with ``o`` output channels: :func:`int8_conv_amx` where the
    target has AMX, it applies and pays (:func:`_amx_pays`), else the dense kernel over its
    im2col rows."""
    conv = AmxConv(geo, round_up(o, TILE))
    vnni = x86_int8_dense(geo.m, geo.k, o, False)
    if amx and amx_conv_applies(geo) and _amx_pays(conv, vnni, geo.k):
        return conv
    return x86_int8_dense(geo.m, geo.k, o, amx)


def x86_int8_dense(m: int, k: int, n: int, amx: bool) -> X86Int8Dense:
    """The kernel for an ``(m, k) x (k, n)`` int8 product: AMX when the target has it
    (``amx``), there are :data:`AMX_MIN_ROWS` rows or more and it pays, else VNNI."""
    kp, np_ = padded_kn(k, n)
    vnni = X86Int8Dense(choose_tiles(m, np_).m_padded, kp, np_, None)
    if amx and m >= AMX_MIN_ROWS:
        t = amx_tiles(m, k, n)
        tiles = X86Int8Dense(t.m_padded, t.k_padded, t.n_padded, t)
        if _amx_pays(tiles, vnni, k):
            return tiles
    return vnni


def _amx_pays(amx, vnni: X86Int8Dense, k: int) -> bool:
    """Whether AMX beats VNNI on a product (measured on MobileNetV2, ResNet-18 and MiniLM's
    layers on a Sapphire Rapids core): with a short K both kernels are bound by their
    requantize epilogue and memory, and AMX only adds padding (K to 64, M and N to 32), so it
    takes products with ``K >= 128`` that its padding grows by at most 35%."""
    padded = amx.m_padded * amx.k_padded * amx.n_padded
    return k >= _AMX_MIN_K and padded <= 1.35 * vnni.m_padded * vnni.k_padded * vnni.n_padded


def _intrin(name: str, *args) -> None:
    T.evaluate(tirx.call_llvm_intrin("void", f"llvm.x86.{name}", *args))


def _tile(i: int) -> tirx.PrimExpr:
    return tirx.const(i, "int8")


def _configure_tiles(cfg) -> None:
    """Palette 1, every tile 16 rows of 64 bytes (A: 16 x 64 u8; B: 16 rows of K/4 x 16
    columns x 4 bytes; C: 16 x 16 int32)."""
    with T.serial(0, 64) as i:
        T.buffer_store(cfg, tirx.const(0, "uint8"), [i])
    T.buffer_store(cfg, tirx.const(1, "uint8"), [0])
    for t in range(8):
        T.buffer_store(cfg, tirx.const(TILE_K, "uint8"), [16 + 2 * t])  # colsb, little end
        T.buffer_store(cfg, tirx.const(TILE, "uint8"), [48 + t])  # rows
    _intrin("ldtilecfg", tirx.address_of(cfg[0]))


@dataclass(frozen=True)
class AmxRows:
    """How the kernel's ``count`` rows map to memory. Row ``p`` of the product reads
    ``X_flat[base(p) + ko * 64 ...]`` for K step ``ko`` (consecutive rows ``stride`` bytes
    apart) and, when ``store(p)`` gives an index (``valid`` may be None), lands in that row
    of ``C``. Rows past a multiple of the tile are not padded: the last block of rows
    starts ``count - rows`` instead, and computes a few rows twice, identically."""

    count: int
    stride: int
    base: Callable[[tirx.PrimExpr], tirx.PrimExpr]
    store: Callable[[tirx.PrimExpr], tuple[tirx.PrimExpr, tirx.PrimExpr | None]]
    # Where K step ``ko`` starts from a row's base (default ``64 * ko``: a plain matrix).
    k_offset: Callable[[tirx.PrimExpr], tirx.PrimExpr] | None = None


def int8_dense_amx(
    m: int,
    k: int,
    n: int,
    *,
    with_offset: bool = False,
    requantize: Requantize | None = None,
    tiles: AmxTiles | None = None,
) -> tvm.tirx.PrimFunc:
    """Scheduled AMX kernel ``C[m, n] = sum_k int32(X[m, k]) * int32(W[k, n]) (+ offset[n])``.

    ``m``, ``k``, ``n`` are the padded sizes (``m, n`` multiples of 16, ``k`` of 64:
    :func:`amx_tiles`); the arguments and attributes are those of
    :func:`~tvmq.kernels.x86_int8.int8_dense_vnni` (``W`` from :func:`pack_weight_amx`), with
    :data:`KERNEL_ATTR` ``"int8_dense_amx"``.
    """
    tiles = tiles or amx_tiles(m, k, n)
    if m % (TILE * tiles.mt):
        raise ValueError(f"unpadded shape m={m} k={k} n={n} for AMX tiles {tiles}")
    rows = AmxRows(m, k, lambda p: p * k, lambda p: (p, None))
    return amx_kernel("int8_dense_amx", (m, k), rows, k, n, tiles, with_offset, requantize)


def amx_conv_applies(geo: Conv2DGeometry) -> bool:
    """Whether :func:`int8_conv_amx` takes this conv: stride 1, no dilation, channels a
    multiple of 64 (each 64-byte K step one tap's run of channels) and a tile of rows."""
    c = geo.x_shape[1]
    return (
        geo.strides == (1, 1)
        and geo.dilation == (1, 1)
        and c % TILE_K == 0
        and _conv_rows(geo, 0).count >= 2 * TILE
    )


def _conv_rows(geo: Conv2DGeometry, c: int) -> AmxRows:
    """The rows of a stride-1 conv read straight from its zero-padded NHWC input (``Hp x Wp``
    pixels an image): output pixel ``(b, y, x)`` is row ``p = (b * Hp + y) * Wp + x``, and tap
    ``(ky, kx)`` of it reads pixel ``p + ky * Wp + kx``, so consecutive rows are ``C`` bytes
    apart for every tap. Rows with ``x >= OW`` or ``y >= OH`` (the padding's) are computed and
    not stored; the last row needed is the last output pixel."""
    n, _, h, w = geo.x_shape
    top, left, bottom, right = geo.padding
    hp, wp = h + top + bottom, w + left + right
    oh, ow = geo.out_hw
    kw = geo.kernel[1]
    per_tap = max(1, c // TILE_K)

    def k_offset(ko):
        tap = ko // per_tap
        return ((tap // kw) * wp + tap % kw) * c + (ko % per_tap) * TILE_K

    def store(p):
        r = p % (hp * wp)
        y, x = r // wp, r % wp
        return ((p // (hp * wp)) * oh + y) * ow + x, tirx.all(y < oh, x < ow)

    count = ((n - 1) * hp + oh - 1) * wp + ow
    return AmxRows(count, c, lambda p: p * c, store, k_offset)


def int8_conv_amx(
    geo: Conv2DGeometry,
    n_padded: int,
    *,
    with_offset: bool = False,
    requantize: Requantize | None = None,
) -> tvm.tirx.PrimFunc:
    """An int8 conv (:func:`amx_conv_applies`) on AMX tiles without im2col: ``X`` is the
    conv's input, NHWC uint8 with the conv's padding done (``(N, Hp, Wp, C)``), ``W`` the
    dense weight ``W.transpose(0, 2, 3, 1).reshape(O, K).T`` packed by
    :func:`pack_weight_amx`, ``C`` the ``(N * OH * OW, n_padded)`` rows of
    :func:`int8_dense_amx` (same offset / requantize arguments)."""
    if not amx_conv_applies(geo):
        raise ValueError(f"{geo} is not a conv the AMX conv kernel takes")
    n, c, h, w = geo.x_shape
    top, left, bottom, right = geo.padding
    rows = _conv_rows(geo, c)
    tiles = amx_tiles(2 * TILE, geo.k, n_padded)
    x_shape = (n, h + top + bottom, w + left + right, c)
    name = "int8_conv_amx"
    return amx_kernel(
        name, x_shape, rows, geo.k, n_padded, tiles, with_offset, requantize, out_rows=geo.m
    )


def amx_kernel(
    name: str,
    x_shape: tuple[int, ...],
    rows: AmxRows,
    k: int,
    n: int,
    tiles: AmxTiles,
    with_offset: bool,
    requantize: Requantize | None,
    out_rows: int | None = None,
) -> tvm.tirx.PrimFunc:
    """The AMX product of ``rows`` (``X`` of ``x_shape`` uint8) and a packed ``(k, n)``
    weight into ``C (out_rows, n)`` (default: ``rows.count``), ``name`` its
    :data:`KERNEL_ATTR`. Arguments as :func:`int8_dense_amx`'s."""
    if n % (TILE * tiles.nt) or k % TILE_K or rows.count < TILE * tiles.mt:
        raise ValueError(f"shape rows={rows.count} k={k} n={n} does not suit AMX tiles {tiles}")
    mb, nb = TILE * tiles.mt, TILE * tiles.nt  # rows / columns of one step
    chunk = max(1, _COLUMN_CHUNK // tiles.nt) * nb  # columns of one task
    n_chunks = -(-n // chunk)
    blocks = -(-rows.count // mb)
    # Row blocks of one task: up to _ROW_BLOCKS steps share each weight panel it loads (a
    # small M, one task: a weight of megabytes then streams from memory once).
    per_task = min(_ROW_BLOCKS, blocks)
    m_chunks = -(-blocks // per_task)
    direct = not with_offset and requantize is None and out_rows is None
    direct = direct and rows.count % mb == 0  # tiles go straight to C, no scratch
    out_dtype = requantize.dtype if requantize is not None else "int32"
    granted = tirx.call_extern(
        "int64",
        "syscall",
        *(
            tirx.const(v, "int64")
            for v in (_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)
        ),
    )
    macs = rows.count * n * k
    loop = T.parallel if macs >= _PARALLEL_MIN_MACS else T.serial
    with IRBuilder() as ib, T.prim_func():
        T.func_name(name)
        T.func_attr({"tirx.noalias": True})
        x = T.arg("X", T.Buffer(x_shape, "uint8"))
        w = T.arg("W", T.Buffer((n // TILE, k // 4, TILE, 4), "int8"))
        off = T.arg("offset", T.Buffer((n,), "int32")) if with_offset else None
        mult = T.arg("multiplier", T.Buffer((n,), "float32")) if requantize else None
        c = T.arg("C", T.Buffer((out_rows or rows.count, n), out_dtype))
        x_flat = T.decl_buffer((math.prod(x_shape),), "uint8", data=x.data)
        # Not an assert: tvmq builds drop asserts (tirx.disable_assert), and with them their
        # conditions. Where the request is refused the first tile instruction faults: tvmq.load
        # checks the CPU's features first (tvmq.machine.missing_cpu_features).
        T.evaluate(granted)
        with loop(0, m_chunks * n_chunks) as task:
            cfg = T.alloc_buffer((64,), "uint8", scope="local")
            _configure_tiles(cfg)
            scratch = None if direct else T.alloc_buffer((mb, nb), "int32", scope="local")
            block0 = (task // n_chunks) * per_task
            col0 = (task % n_chunks) * chunk
            # Row blocks inner: one weight panel (nb columns x K) serves them all.
            with (
                T.serial(0, tirx.min(chunk, n - col0) // nb) as step,
                T.serial(0, tirx.min(per_task, blocks - block0)) as r,
            ):
                row = tirx.min((block0 + r) * mb, rows.count - mb)
                col = col0 + step * nb
                _step(x_flat, w, c, scratch, rows, row, col, k, n, tiles)
                if not direct:
                    _store(c, scratch, off, mult, requantize, rows, row, col, mb, nb)
            _intrin("tilerelease")
    return (
        ib.get()
        .with_attr("tirx.is_scheduled", True)
        .with_attr(KERNEL_ATTR, name)
        .without_attr("global_symbol")
    )


def _step(x, w, c, scratch, rows: AmxRows, row, col, k, n, tiles: AmxTiles) -> None:
    """``mt x nt`` accumulator tiles at (row, col) over the whole K, stored to ``scratch``
    (or straight to ``c`` without one). Tiles: 0-3 accumulators, 4-5 A, 6-7 B."""
    mt, nt = tiles.mt, tiles.nt
    for a in range(mt):
        for b in range(nt):
            _intrin("tilezero", _tile(2 * a + b))
    with T.serial(0, k // TILE_K) as ko:
        for a in range(mt):
            k_at = rows.k_offset(ko) if rows.k_offset else ko * TILE_K
            ptr = tirx.address_of(x[rows.base(row + TILE * a) + k_at])
            _intrin("tileloadd64", _tile(4 + a), ptr, tirx.const(rows.stride, "int64"))
        for b in range(nt):
            ptr = tirx.address_of(w[col // TILE + b, ko * (TILE_K // 4), 0, 0])
            _intrin("tileloadd64", _tile(6 + b), ptr, tirx.const(TILE_K, "int64"))
        for a in range(mt):
            for b in range(nt):
                _intrin("tdpbusd", _tile(2 * a + b), _tile(4 + a), _tile(6 + b))
    for a in range(mt):
        for b in range(nt):
            if scratch is not None:
                ptr, stride = tirx.address_of(scratch[TILE * a, TILE * b]), nt * TILE * 4
            else:
                ptr, stride = tirx.address_of(c[row + TILE * a, col + TILE * b]), n * 4
            _intrin("tilestored64", _tile(2 * a + b), ptr, tirx.const(stride, "int64"))


def _store(c, scratch, off, mult, requantize, rows: AmxRows, row, col, mb: int, nb: int) -> None:
    """The rows of ``c`` that ``rows.store`` maps the step's rows to, from the int32 sums in
    ``scratch``: offset, then requantize."""
    with T.serial(0, mb) as i:
        index, valid = rows.store(row + i)

        def body():
            with T.vectorized(0, nb) as j:
                v = scratch[i, j] if off is None else scratch[i, j] + off[col + j]
                if requantize is not None:
                    v = requantize_value(v, mult[col + j], requantize)
                T.buffer_store(c, v, [index, col + j])

        if valid is None:
            body()
        else:
            with T.If(valid), T.Then():
                body()
