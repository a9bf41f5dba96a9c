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

from tvmq.kernels._tiling import round_up, target_cores
from tvmq.kernels.cpu_float_conv import ConvEpilogue, bf16_to_float32
from tvmq.kernels.x86_int8 import (
    KERNEL_ATTR,
    Requantize,
    choose_tiles,
    int8_dense_vnni,
    pack_weight_vnni,
    padded_kn,
    requantize_value,
)

TILE = 16
"""Rows (and int32 columns) of an AMX accumulator tile."""

TILE_K = 64
"""Bytes of K one ``tdpbusd`` reduces: the padding unit of K."""

AMX_MIN_ROWS = 16
"""Fewer rows than one tile stay on the VNNI kernel (a GEMV wastes most of a tile)."""

# Shorter products pad K to a whole tile row (64 bytes) for nothing. K = 64 fills one: UNet's
# 12544x64x128 up-convolution ran 0.70 -> 0.35 ms in situ, and whole-model A/B (1 thread,
# both orders) gave UNet 0.96-0.97x, MobileNetV2 0.97-0.98x, ResNet-18 0.95-0.97x with
# 64 instead of 128 (an Intel Xeon with AMX, CPUID model 167; 128 had been chosen on a
# Sapphire Rapids core).
_AMX_MIN_K = 64

_SYS_ARCH_PRCTL = 158  # x86_64 syscall number
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18
# Below this many multiply-adds a parallel launch costs more than it saves.
_PARALLEL_MIN_MACS = 1 << 21
# 16-column tiles one task walks: its tile configuration and scratch are set up once.
_COLUMN_CHUNK = 8
_ROW_BLOCKS = 4  # row blocks (of 16 or 32 rows) one task walks, at most
_SHARE_SLACK = 1.03  # a largest share this close to the smallest counts as even (balanced_*)


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

    def build(
        self, with_offset: bool, requantize: Requantize | None = None, **vnni
    ) -> tirx.PrimFunc:
        """The kernel; ``vnni``: keywords only the VNNI kernel takes (``x_dtype``, ``n_out``
        of a GEMV; ``m_out``; a ``DynamicDequantize`` ``requantize``)."""
        sizes = (self.m_padded, self.k_padded, self.n_padded)
        if self.amx is None:
            return int8_dense_vnni(*sizes, with_offset=with_offset, requantize=requantize, **vnni)
        if vnni or not isinstance(requantize, Requantize | None):
            raise ValueError(f"the AMX kernel takes no {sorted(vnni) or type(requantize).__name__}")
        return int8_dense_amx(
            *sizes, with_offset=with_offset, requantize=requantize, tiles=self.amx
        )


def x86_int8_dense(m: int, k: int, n: int, amx: bool) -> X86Int8Dense:
    """The kernel for an ``(m, k) x (k, n)`` int8 product: AMX when the target has it
    (``amx``), there are :data:`AMX_MIN_ROWS` rows or more and it pays, else VNNI."""
    kp, np_ = padded_kn(k, n)
    vnni = X86Int8Dense(choose_tiles(m, np_, k=kp).m_padded, kp, np_, None)
    if amx and m >= AMX_MIN_ROWS:
        t = amx_tiles(m, k, n)
        if amx_pays(X86Int8Dense(t.m_padded, t.k_padded, t.n_padded, t), vnni, k):
            # Exactly m rows where there are a whole step's: the last row block overlaps the
            # one before it (int8_dense_amx), so no padded copy of x goes in and no slice of
            # the result comes out. DeiT-tiny's 197 tokens (224 padded): their slices and pads
            # cost ~0.5 ms a run of ~9.
            rows = m if m >= TILE * t.mt else t.m_padded
            return X86Int8Dense(rows, t.k_padded, t.n_padded, t)
    return vnni


def amx_pays(amx, vnni: X86Int8Dense, k: int) -> bool:
    """Whether AMX beats VNNI on a product (measured on MobileNetV2, ResNet-18 and MiniLM's
    layers on a Sapphire Rapids core): with a short K both kernels are bound by their
    requantize epilogue and memory, and AMX only adds padding (K to 64, M and N to 32), so it
    takes products with ``K >= 64`` (one whole tile row) that its padding grows by at most
    35%."""
    padded = amx.m_padded * amx.k_padded * amx.n_padded
    return k >= _AMX_MIN_K and padded <= 1.35 * vnni.m_padded * vnni.k_padded * vnni.n_padded


@dataclass(frozen=True)
class AmxOps:
    """The operands of one kind of AMX product: ``X`` of ``x_dtype`` (bf16 travels as its
    uint16 bits) times a weight packed ``[N/16, K/pair, 16, pair]`` into ``acc_dtype``."""

    x_dtype: str
    w_dtype: str
    acc_dtype: str
    pair: int  # K elements in one 4-byte group of a B tile row
    instruction: str

    @property
    def k_step(self) -> int:
        """K elements one instruction reduces (64 bytes of a row)."""
        return TILE_K * self.pair // 4


INT8 = AmxOps("uint8", "int8", "int32", 4, "tdpbusd")
BF16 = AmxOps("uint16", "uint16", "float32", 2, "tdpbf16ps")


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
    # ``gather(panel, x_flat, row, rows, K)``: writes the block of rows from ``row`` as a dense
    # ``(rows, K)`` panel (an im2col of that block only, in L1 / L2) that the tiles then
    # read; ``base`` and ``stride`` are unused. Each task then takes every column.
    gather: Callable | None = None
    # ``batches`` equal groups of rows (each a whole number of steps' rows), group ``g``
    # multiplied by the ``g``-th of the ``batches`` weights ``W`` holds one after another.
    batches: int = 1


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

    ``k``, ``n`` are the padded sizes (``n`` a multiple of 16, ``k`` of 64: :func:`amx_tiles`);
    ``m`` any row count of at least one step's rows (``16 * tiles.mt``): the last row block
    then starts at ``m - 16 * tiles.mt``, recomputing a few rows (the same values) instead of
    reading padded ones. The arguments and attributes are those of
    :func:`~tvmq.kernels.x86_int8.int8_dense_vnni` (``W`` from :func:`pack_weight_amx`), with
    :data:`KERNEL_ATTR` ``"int8_dense_amx"``.
    """
    tiles = tiles or amx_tiles(m, k, n)
    if m < TILE * tiles.mt:
        raise ValueError(f"fewer rows m={m} than one step of AMX tiles {tiles}")
    rows = AmxRows(m, k, lambda p: p * k, lambda p: (p, None))  # a byte a K element
    return amx_kernel("int8_dense_amx", (m, k), rows, k, n, tiles, with_offset, requantize)


def _largest_share(blocks: int, steps: int, p: int, s: int, threads: int) -> int:
    """The most block-steps of a ``blocks x steps`` product that one of ``threads`` gets
    with tasks of ``p`` row blocks x ``s`` column steps, row chunk major: TVM hands each
    thread a contiguous run of ``ceil(tasks / threads)`` tasks."""
    n_chunks = -(-steps // s)
    tasks = -(-blocks // p) * n_chunks
    run = -(-tasks // threads)
    work = [
        min(p, blocks - (t // n_chunks) * p) * min(s, steps - (t % n_chunks) * s)
        for t in range(tasks)
    ]
    return max(sum(work[i : i + run]) for i in range(0, tasks, run))


def _largest_within_slack(shares: dict[int, int]) -> int:
    """Of the task sizes whose largest share is within 3% of the smallest, the largest."""
    even = min(shares.values()) * _SHARE_SLACK
    return max(size for size, share in shares.items() if share <= even)


def balanced_columns(blocks: int, steps: int, per_task: int, chunk_steps: int, threads: int) -> int:
    """The column steps of one task, at most ``chunk_steps``, that spread a ``blocks x steps``
    product (``per_task`` row blocks a task) most evenly over ``threads``. MobileNetV2's 7x7
    960 -> 160 conv took its 160 columns as 128 + 32, one thread four times the other's
    work, and ran slower on two threads than on one; as 96 + 64 it ran 16.9-18.9 -> 15.6-16.6
    us in the model on two threads, its 960 -> 320 23.1-25.8 -> 19.3-20.8. The row blocks
    stay: one a task (even for 14x14's 7 blocks, where 4 + 3 is not) lost the weight panels'
    reuse (196x128x576 64.4 -> 67.6 us)."""
    if threads < 2:
        return chunk_steps
    shares = {
        s: _largest_share(blocks, steps, per_task, s, threads) for s in range(1, chunk_steps + 1)
    }
    return _largest_within_slack(shares)


def balanced_rows(blocks: int, per_task: int, threads: int) -> int:
    """The row blocks of one task, at most ``per_task``, for a kernel whose tasks take every
    column (a panel gathered in cache): the most even split over ``threads``. ResNet-18's
    28x28 convs (25 blocks) ran 4 a task, 16 + 9 blocks a thread; now 13 + 12 (the model's
    int8 on two threads 0.94-0.96x, one-process A/B)."""
    if threads < 2:
        return per_task
    return _largest_within_slack(
        {p: _largest_share(blocks, 1, p, 1, threads) for p in range(1, per_task + 1)}
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
    ops: AmxOps = INT8,
    bias: ConvEpilogue | None = None,
    fill: Callable | None = None,
    out_dtype: str | None = None,
    convert: Callable | None = None,
    residual_dtype: str = "float32",
) -> tvm.tirx.PrimFunc:
    """The AMX product of ``rows`` (``X`` of ``x_shape``) and a packed ``(k, n)`` weight
    (one per group of rows: ``rows.batches``) into ``C (out_rows, n)`` (default:
    ``rows.count``), ``name`` its :data:`KERNEL_ATTR`.
    Arguments as :func:`int8_dense_amx`'s; ``ops`` the operand types (``rows.base`` and
    ``k_offset`` count elements, ``rows.stride`` bytes). ``bias``: a float32 result gets
    ``bias.activate(acc + bias[j] [+ residual])`` (a ``bias (n,)`` float32 argument after
    ``W``, then with ``bias.residual`` a ``residual`` of ``C``'s shape: float32, or with
    ``residual_dtype`` "uint16" bf16 bits, widened as they are read); a requantize
    with a residual add reads ``residual`` (``C``'s shape) after the multiplier.
    ``fill(C)``, before the product, writes the rows of ``C`` no row of the product is stored
    in (a conv result's zero border); ``convert(v)`` turns each result into ``out_dtype``
    before the store (a float32 one into bf16 bits for the next bf16 conv)."""
    if n % (TILE * tiles.nt) or k % ops.k_step or rows.count < TILE * tiles.mt:
        raise ValueError(f"shape rows={rows.count} k={k} n={n} does not suit AMX tiles {tiles}")
    mb, nb = TILE * tiles.mt, TILE * tiles.nt  # rows / columns of one step
    if rows.batches > 1 and (rows.count % rows.batches or rows.count // rows.batches % mb):
        raise ValueError(f"{rows.batches} batches of {rows.count} rows split AMX steps {tiles}")
    blocks, steps = -(-rows.count // mb), n // nb
    # Row blocks of one task: up to _ROW_BLOCKS steps share each weight panel it loads (a
    # small M, one task: a weight of megabytes then streams from memory once).
    per_task = min(_ROW_BLOCKS, blocks)
    chunk_steps = min(max(1, _COLUMN_CHUNK // tiles.nt), steps)  # column steps of one task
    macs = rows.count * n * k
    parallel = macs >= _PARALLEL_MIN_MACS
    if rows.gather is not None:  # a gathered panel serves every column
        chunk_steps = steps
        if parallel:
            per_task = balanced_rows(blocks, per_task, target_cores())
    elif parallel:
        chunk_steps = balanced_columns(blocks, steps, per_task, chunk_steps, target_cores())
    chunk = chunk_steps * nb  # columns of one task
    n_chunks = -(-n // chunk)
    m_chunks = -(-blocks // per_task)
    # Tiles go straight to C, no scratch (a last row block overlapping the one before it
    # stores the same values twice).
    direct = not with_offset and all(v is None for v in (requantize, bias, out_rows, convert))
    if out_dtype is None:
        out_dtype = requantize.out_dtype if requantize is not None else ops.acc_dtype
    granted = tirx.call_extern(
        "int64",
        "syscall",
        *(
            tirx.const(v, "int64")
            for v in (_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)
        ),
    )
    loop = T.parallel if parallel else T.serial
    with IRBuilder() as ib, T.prim_func():
        T.func_name(name)
        T.func_attr({"tirx.noalias": True})
        x = T.arg("X", T.Buffer(x_shape, ops.x_dtype))
        w_shape = (rows.batches * n // TILE, k // ops.pair, TILE, ops.pair)
        w = T.arg("W", T.Buffer(w_shape, ops.w_dtype))
        off = T.arg("offset", T.Buffer((n,), "int32")) if with_offset else None
        mult = T.arg("multiplier", T.Buffer((n,), "float32")) if requantize else None
        add = T.arg("bias", T.Buffer((n,), "float32")) if bias is not None else None
        res, r_dtype = None, None
        if requantize is not None and requantize.residual is not None:
            r_dtype = requantize.residual.r_dtype
        if bias is not None and bias.residual:
            r_dtype = residual_dtype
        if r_dtype is not None:
            res = T.arg("residual", T.Buffer((out_rows or rows.count, n), r_dtype))
        c = T.arg("C", T.Buffer((out_rows or rows.count, n), out_dtype))
        x_flat = T.decl_buffer((math.prod(x_shape),), ops.x_dtype, data=x.data)
        # Not an assert: tvmq builds drop asserts (tirx.disable_assert), and with them their
        # conditions. Where the request is refused the first tile instruction faults: tvmq.load
        # checks the CPU's features first (tvmq.machine.missing_cpu_features).
        T.evaluate(granted)
        if fill is not None:
            fill(c)
        with loop(0, m_chunks * n_chunks) as task:
            cfg = T.alloc_buffer((64,), "uint8", scope="local")
            _configure_tiles(cfg)
            scratch = None
            if not direct:
                scratch = T.alloc_buffer((mb, nb), ops.acc_dtype, scope="local")
            block0 = (task // n_chunks) * per_task
            col0 = (task % n_chunks) * chunk
            epilogue = (off, mult, requantize, res, add, bias, convert)

            def block(r, step, a_rows, a_buf):
                row = tirx.min((block0 + r) * mb, rows.count - mb)
                col = col0 + step * nb
                _step(a_buf, w, c, scratch, a_rows(row), row, col, k, n, tiles, ops)
                if not direct:
                    _store(c, scratch, epilogue, rows, row, col, mb, nb)

            row_blocks = tirx.min(per_task, blocks - block0)
            if rows.gather is None:
                # Row blocks inner: one weight panel (nb columns x K) serves them all.
                with (
                    T.serial(0, tirx.min(chunk, n - col0) // nb) as step,
                    T.serial(0, row_blocks) as r,
                ):
                    block(r, step, lambda _row: rows, x_flat)
            else:
                panel = T.alloc_buffer((mb * k,), ops.x_dtype, scope="local")
                with T.serial(0, mb * k) as i:
                    T.buffer_store(panel, tirx.const(0, ops.x_dtype), [i])  # K's padding
                with T.serial(0, row_blocks) as r:
                    start = tirx.min((block0 + r) * mb, rows.count - mb)
                    rows.gather(panel, x_flat, start, mb, k)
                    with T.serial(0, n // nb) as step:
                        block(r, step, lambda row: _panel_rows(rows, row, k, ops), panel)
            _intrin("tilerelease")
    return (
        ib.get()
        .with_attr("tirx.is_scheduled", True)
        .with_attr(KERNEL_ATTR, name)
        .without_attr("global_symbol")
    )


def _panel_rows(rows: AmxRows, row, k: int, ops: AmxOps) -> AmxRows:
    """The rows of a gathered panel that starts at ``row``: ``k`` elements a row."""
    itemsize = 1 if ops.x_dtype == "uint8" else 2
    return AmxRows(
        rows.count, k * itemsize, lambda p: (p - row) * k, rows.store, batches=rows.batches
    )


def _step(x, w, c, scratch, rows: AmxRows, row, col, k, n, tiles: AmxTiles, ops: AmxOps) -> None:
    """``mt x nt`` accumulator tiles at (row, col) over the whole K, stored to ``scratch``
    (or straight to ``c`` without one). Tiles: 0-3 accumulators, 4-5 A, 6-7 B."""
    mt, nt = tiles.mt, tiles.nt
    panel = col // TILE  # the first B tile column: in the row's batch's weight
    if rows.batches > 1:
        panel += row // (rows.count // rows.batches) * (n // TILE)
    for a in range(mt):
        for b in range(nt):
            _intrin("tilezero", _tile(2 * a + b))
    with T.serial(0, k // ops.k_step) as ko:
        for a in range(mt):
            k_at = rows.k_offset(ko) if rows.k_offset else ko * ops.k_step
            ptr = tirx.address_of(x[rows.base(row + TILE * a) + k_at])
            _intrin("tileloadd64", _tile(4 + a), ptr, tirx.const(rows.stride, "int64"))
        for b in range(nt):
            ptr = tirx.address_of(w[panel + b, ko * (ops.k_step // ops.pair), 0, 0])
            _intrin("tileloadd64", _tile(6 + b), ptr, tirx.const(TILE_K, "int64"))
        for a in range(mt):
            for b in range(nt):
                _intrin(ops.instruction, _tile(2 * a + b), _tile(4 + a), _tile(6 + b))
    for a in range(mt):
        for b in range(nt):
            if scratch is not None:
                ptr, stride = tirx.address_of(scratch[TILE * a, TILE * b]), nt * TILE * 4
            else:
                ptr, stride = tirx.address_of(c[row + TILE * a, col + TILE * b]), n * 4
            _intrin("tilestored64", _tile(2 * a + b), ptr, tirx.const(stride, "int64"))


def _store(c, scratch, epilogue, rows: AmxRows, row, col, mb: int, nb: int) -> None:
    """The rows of ``c`` that ``rows.store`` maps the step's rows to, from the sums in
    ``scratch``: int32 ones offset, then requantized; float32 ones biased and clamped."""
    off, mult, requantize, res, add, bias, convert = epilogue
    with T.serial(0, mb) as i:
        index, valid = rows.store(row + i)

        def body():
            with T.vectorized(0, nb) as j:
                v = scratch[i, j] if off is None else scratch[i, j] + off[col + j]
                if requantize is not None:
                    r = None if res is None else res[index, col + j]
                    v = requantize_value(v, mult[col + j], requantize, r)
                if bias is not None:
                    v = v + add[col + j]
                    if res is not None:
                        r = res[index, col + j]
                        v = v + (bf16_to_float32(r) if res.dtype == "uint16" else r)
                    v = bias.activate(v)
                T.buffer_store(c, v if convert is None else convert(v), [index, col + j])

        if valid is None:
            body()
        else:
            with T.If(valid), T.Then():
                body()
