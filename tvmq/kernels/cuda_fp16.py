"""CUDA fp16 dense kernel on tensor cores: ``fp16 X (M, K) @ fp16 W (K, N) -> fp32 (M, N)``.

The kernel is a tiled GEMM whose innermost 16x16x16 step runs on tensor cores with TVM's own
registered intrinsics (``tvm.s_tir.tensor_intrin.cuda``):

- operands are staged in shared memory per ``bk``-wide K step (16-byte vector copies by all
  threads, rows padded by 8 halves so ``ldmatrix`` reads are bank-conflict free);
- each warp loads its 16x16 fragments from shared memory with ``ldmatrix`` (``mma_ldmatrix_f16_a``
  / ``mma_ldmatrix_f16_b``) into the "warp" register layout;
- each 16x16x16 product is two ``mma.sync.aligned.m16n8k16`` (``mma_f16f16f32``), accumulated in
  fp32 registers (``mma_fill_16x16_f32``), and stored with ``mma_store_16x16_f32_global_``.

A thread block has ``warps_m x warps_n`` warps; each warp owns ``tiles_m x tiles_n`` 16x16
output tiles, so a block computes ``bm = 16 * warps_m * tiles_m`` by ``bn = 16 * warps_n * tiles_n``
outputs. The default for large problems is 128 x 128 x 32 with 4 warps (2 x 2, 4 x 4 tiles each).

The same loop nest is also built with ``device="cpu"``: no thread bindings, every stage in
``global`` scope and nothing tensorized, but the same tiling, the same cache stages and the same
warp-register index maps. That twin runs on an ``llvm`` target, so the tiling, padding and
fragment layouts are checked against numpy where there is no GPU.

Shapes must be padded to whole tiles (:func:`padded_mkn_fp16`); the weight is passed as is
(``(K, N)`` row-major, zero-padded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import tvm
from tvm import te
from tvm.s_tir import Schedule

from tvmq.kernels._tiling import round_up
from tvmq.kernels.x86_int8 import KERNEL_ATTR

KERNEL_NAME = "fp16_dense_mma"
"""Value of :data:`~tvmq.kernels.x86_int8.KERNEL_ATTR` on the kernels built here."""

TILES_ATTR = "tvmq.mma_tiles"
"""PrimFunc attribute: ``[warps_m, warps_n, tiles_m, tiles_n, bk]`` (see :class:`MmaTiles`)."""

TENSOR_CORE_ATTR = "tvmq.tensor_core"
"""PrimFunc attribute on kernels that run on tensor cores: the instruction (``"mma.sync.f16"``)."""

MMA = 16
"""Edge of one tensor-core tile (m16n8k16 twice: 16 x 16 x 16)."""

_WARP = 32
_VECTOR = 8  # halves per 16-byte shared-memory copy


@dataclass(frozen=True)
class MmaTiles:
    """Tiling of :func:`fp16_dense_mma`: warps per block, 16x16 tiles per warp, K step."""

    warps_m: int = 2
    warps_n: int = 2
    tiles_m: int = 4
    tiles_n: int = 4
    bk: int = 32

    @property
    def bm(self) -> int:
        return MMA * self.warps_m * self.tiles_m

    @property
    def bn(self) -> int:
        return MMA * self.warps_n * self.tiles_n

    @property
    def threads(self) -> int:
        return _WARP * self.warps_m * self.warps_n

    def validate(self) -> None:
        """Raise ValueError when the shared-memory copies do not split into whole rounds."""
        if min(self.warps_m, self.warps_n, self.tiles_m, self.tiles_n) < 1 or self.bk % MMA:
            raise ValueError(f"bad tensor-core tiles: {self}")
        if not 32 <= self.threads <= 1024:
            raise ValueError(f"{self.threads} threads per block: {self}")
        copy = self.threads * _VECTOR
        if (self.bm * self.bk) % copy or (self.bk * self.bn) % copy:
            raise ValueError(f"shared tiles do not split into {copy}-half rounds: {self}")


def choose_mma_tiles(m: int, k: int, n: int) -> MmaTiles:
    """128 x 128 x 32 (4 warps) for large problems; fewer rows for a small ``m`` (a batch of a
    few rows pads to 16 or 32, not 128) and fewer columns when ``n`` is small. ``bk`` is the
    smallest multiple of 32 whose shared tiles split into whole 16-byte rounds."""
    del k
    if m <= 16:
        shape = dict(warps_m=1, warps_n=4, tiles_m=1, tiles_n=2)
    elif m <= 32:
        shape = dict(warps_m=1, warps_n=4, tiles_m=2, tiles_n=2)
    elif n <= 64:
        shape = dict(warps_m=2, warps_n=2, tiles_m=4, tiles_n=2)
    else:
        shape = dict(warps_m=2, warps_n=2, tiles_m=4, tiles_n=4)
    bk = 32
    while True:
        tiles = MmaTiles(**shape, bk=bk)
        try:
            tiles.validate()
            return tiles
        except ValueError:
            bk += 32


def padded_mkn_fp16(m: int, k: int, n: int, tiles: MmaTiles) -> tuple[int, int, int]:
    """``(M, K, N)`` rounded up to whole tiles."""
    return round_up(m, tiles.bm), round_up(k, tiles.bk), round_up(n, tiles.bn)


def fp16_dense_reference(m: int, k: int, n: int) -> tvm.tirx.PrimFunc:
    """The unscheduled computation ``C[i, j] = sum_k f32(X[i, k]) * f32(W[k, j])``."""
    x = te.placeholder((m, k), "float16", name="X")
    w = te.placeholder((k, n), "float16", name="W")
    r = te.reduce_axis((0, k), name="k")
    out = te.compute(
        (m, n),
        lambda i, j: te.sum(x[i, r].astype("float32") * w[r, j].astype("float32"), axis=r),
        name="C",
    )
    return te.create_prim_func([x, w, out])


def fp16_dense_mma(
    m: int,
    k: int,
    n: int,
    *,
    tiles: MmaTiles | None = None,
    device: Literal["cuda", "cpu"] = "cuda",
) -> tvm.tirx.PrimFunc:
    """Scheduled kernel ``C = X @ W`` (fp16 in, fp32 accumulate and out) on padded sizes.

    ``device="cuda"``: thread-bound, shared memory, ``ldmatrix`` + ``mma.sync``.
    ``device="cpu"``: the same loop nest before tensorization, buildable for ``llvm``.
    Attributes: ``tirx.is_scheduled``, :data:`KERNEL_ATTR` = :data:`KERNEL_NAME`,
    :data:`TILES_ATTR`, ``tvmq.device`` and, on CUDA, :data:`TENSOR_CORE_ATTR`.
    """
    tiles = tiles or choose_mma_tiles(m, k, n)
    tiles.validate()
    if m % tiles.bm or k % tiles.bk or n % tiles.bn:
        raise ValueError(f"unpadded shape m={m} k={k} n={n} for tiles {tiles}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    sch = _schedule(fp16_dense_reference(m, k, n), tiles, device == "cuda")
    func = (
        sch.mod["main"]
        .with_attr("tirx.is_scheduled", True)
        .with_attr(KERNEL_ATTR, KERNEL_NAME)
        .with_attr(
            TILES_ATTR, [tiles.warps_m, tiles.warps_n, tiles.tiles_m, tiles.tiles_n, tiles.bk]
        )
        .with_attr("tvmq.device", device)
        .without_attr("global_symbol")
    )
    return func.with_attr(TENSOR_CORE_ATTR, "mma.sync.f16") if device == "cuda" else func


def fragment_lane_register(row, col):
    """Where element ``(row, col)`` of a 16x16 fp16 tile lives in a warp's mma registers.

    PTX ISA, ``mma.m16n8k16`` fragments: lane ``4 * (row % 8) + (col % 8) // 2`` holds it, in
    register slot ``4 * (col // 8) + 2 * (row // 8) + col % 2`` of its 8 halves (the 16x16 tile
    is two m16n8 halves side by side). ``ldmatrix`` writes and ``mma.sync`` reads this layout;
    tensorizing checks it against TVM's intrinsic descriptions.
    """
    return 4 * (row % 8) + (col % 8) // 2, 4 * (col // 8) + 2 * (row // 8) + col % 2


def _fragment_map(i, j):
    """(row, col) of a padded matrix -> (tile row, tile col, lane, register) of the warp layout."""
    lane, reg = fragment_lane_register(i % MMA, j % MMA)
    return (i // MMA, j // MMA, lane, reg)


def _schedule(func: tvm.tirx.PrimFunc, tiles: MmaTiles, on_gpu: bool) -> Schedule:
    shared, warp = ("shared", "warp") if on_gpu else ("global", "global")
    sch = Schedule(func)
    block = sch.get_sblock("C")

    # 16x16x16 tensor-core steps become one block each: the unit the mma intrinsic replaces.
    i, j, r = sch.get_loops(block)
    i, i_tc = sch.split(i, [None, MMA])
    j, j_tc = sch.split(j, [None, MMA])
    r, r_tc = sch.split(r, [None, MMA])
    sch.reorder(i, j, r, i_tc, j_tc, r_tc)
    outer = sch.blockize(i_tc)

    # Block tile -> warps -> tiles per warp; K in bk-wide shared stages of bk/16 steps.
    bi, wi, ti = sch.split(i, [None, tiles.warps_m, tiles.tiles_m])
    bj, wj, tj = sch.split(j, [None, tiles.warps_n, tiles.tiles_n])
    ro, ri = sch.split(r, [None, tiles.bk // MMA])
    sch.reorder(bi, bj, wi, wj, ro, ri, ti, tj)
    block_loop = sch.fuse(bi, bj)
    warp_loop = sch.fuse(wi, wj)
    if on_gpu:
        sch.bind(block_loop, "blockIdx.x")
        sch.bind(warp_loop, "threadIdx.y")

    for operand in (0, 1):  # global -> shared, 16-byte vectors, every thread of the block
        stage = sch.cache_read(outer, operand, shared)
        sch.compute_at(stage, ro)
        fused = sch.fuse(*sch.get_loops(stage)[-2:])
        _, ty, tx, vec = sch.split(fused, [None, tiles.warps_m * tiles.warps_n, _WARP, _VECTOR])
        if on_gpu:
            sch.bind(ty, "threadIdx.y")
            sch.bind(tx, "threadIdx.x")
            sch.storage_align(stage, 0, axis=-2, factor=32, offset=8)
        sch.vectorize(vec)

    frag_a = sch.cache_read(outer, 0, warp)  # shared -> registers (ldmatrix)
    frag_b = sch.cache_read(outer, 1, warp)
    sch.compute_at(frag_a, ri)
    sch.compute_at(frag_b, ri)
    acc = sch.cache_write(outer, 0, warp)  # fp32 accumulators, stored once per warp
    sch.reverse_compute_at(acc, warp_loop)
    si, sj = sch.get_loops(acc)[-2:]
    sio, sii = sch.split(si, [None, MMA])
    sjo, sji = sch.split(sj, [None, MMA])
    sch.reorder(sio, sjo, sii, sji)

    sch.decompose_reduction(outer, ro)
    init = sch.get_sblock("C_init")

    def per_fragment(stage):
        fi, fj = sch.get_loops(stage)[-2:]
        fio, fii = sch.split(fi, [None, MMA])
        fjo, fji = sch.split(fj, [None, MMA])
        sch.reorder(fio, fjo, fii, fji)
        return fii

    load_a, load_b = per_fragment(frag_a), per_fragment(frag_b)
    sch.transform_layout(frag_a, ("write", 0), _fragment_map)
    sch.transform_layout(frag_b, ("write", 0), _fragment_map)
    sch.transform_layout(acc, ("read", 0), _fragment_map)
    if on_gpu:
        # Imported here: registering TVM's CUDA intrinsics takes 35 s to 2 min, and CPU builds
        # (and the CPU twin) never need them.
        from tvm.s_tir.tensor_intrin import cuda as cuda_intrin

        sch.tensorize(load_a, cuda_intrin.LDMATRIX_f16_A_INTRIN)
        sch.tensorize(load_b, cuda_intrin.LDMATRIX_f16_B_INTRIN)
        sch.tensorize(sch.get_loops(block)[-3], cuda_intrin.MMA_f16f16f32_INTRIN)
        sch.tensorize(sch.get_loops(init)[-2], cuda_intrin.MMA_fill_16x16_f32_INTRIN)
        sch.tensorize(sch.get_loops(acc)[-2], cuda_intrin.MMA_store_16x16_f32_global_INTRIN)
    return sch


def fp16_kernels_for_cpu(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every CUDA :func:`fp16_dense_mma` kernel rebuilt with ``device="cpu"``.

    The twin has the same arguments, tiles and loop nest, so a module rewritten by
    :class:`~tvmq.passes.PackFp16DenseCUDA` builds for ``llvm`` and can be checked against
    numpy where there is no GPU (the padding and slicing around the kernel included).
    """
    out = mod
    for gv, func in mod.functions_items():
        attrs = func.attrs if isinstance(func, tvm.tirx.PrimFunc) else None
        if (
            attrs is None
            or attrs.get(KERNEL_ATTR) != KERNEL_NAME
            or attrs.get("tvmq.device") == "cpu"
        ):
            continue
        (m, k), (_, n) = (tuple(int(d) for d in p.ty.shape) for p in func.params[:2])
        tiles = MmaTiles(*(int(t) for t in attrs[TILES_ATTR]))
        twin = fp16_dense_mma(m, k, n, tiles=tiles, device="cpu")
        for key, value in attrs.items():
            if key not in twin.attrs and key != TENSOR_CORE_ATTR:
                twin = twin.with_attr(key, value)
        if out is mod:
            out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        out[gv] = twin
    return out
