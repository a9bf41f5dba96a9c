"""CUDA dense kernels on tensor cores (``ldmatrix`` + ``mma.sync``), sm_80 and newer.

Three flavours share one schedule:

- :func:`fp16_dense_mma`: ``fp16 X (M, K) @ fp16 W (K, N) -> fp32 (M, N)``, each 16x16x16 step
  two ``mma.sync.aligned.m16n8k16 .f32.f16.f16.f32``;
- :func:`int8_dense_imma`: ``int8 X (M, K) @ int8 W -> int32 (M, N)`` with the weight packed
  as ``Wt (N, K)`` (:func:`pack_weight_imma`), each 16x16x32 step two
  ``mma.sync.aligned.m16n8k32 .s32.s8.s8.s32`` (IMMA);
- :func:`bf16_dense_mma`, :func:`bf16_batch_matmul_mma`: the fp16 kernels with bf16 operands
  (``.f32.bf16.bf16.f32``), for ``--precision bf16``;
- :func:`fp16_batch_matmul_mma`, :func:`int8_batch_matmul_imma`: the same with a leading batch
  axis on every operand (attention's matmuls of two activations); the batch is fused with the
  block tiles into ``blockIdx.x``, so each thread block computes one tile of one matrix.

The schedule is a tiled GEMM built with TVM's own registered intrinsics
(``tvm.s_tir.tensor_intrin.cuda``):

- operands are staged in shared memory per ``bk``-wide K step (16-byte vector copies by all
  threads, rows padded by 16 bytes so ``ldmatrix`` reads are bank-conflict free);
- each warp loads its fragments from shared memory with ``ldmatrix`` into the "warp" register
  layout (:func:`fragment_lane_register`, :func:`fragment_lane_register_k32`);
- the products accumulate in fp32 / int32 registers (``mma_fill``) and are stored once per
  block tile (``mma_store``).

A thread block has ``warps_m x warps_n`` warps; each warp owns ``tiles_m x tiles_n`` 16x16
output tiles, so a block computes ``bm = 16 * warps_m * tiles_m`` by ``bn = 16 * warps_n * tiles_n``
outputs. The default for large problems is 128 x 128 with 4 warps (2 x 2, 4 x 4 tiles each).

The same loop nest is also built with ``device="cpu"``: no thread bindings, every stage in
``global`` scope and nothing tensorized, but the same tiling, the same cache stages and the
same fragment index maps. That twin runs on an ``llvm`` target, so the tiling, padding and
fragment layouts are checked against numpy where there is no GPU. Shapes must be padded to
whole tiles (:func:`padded_mkn_mma`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import astuple, dataclass, replace
from typing import Literal

import numpy as np
import tvm
from tvm import te
from tvm.s_tir import Schedule

from tvmq.kernels import cuda_im2col as im2col
from tvmq.kernels._tiling import round_up
from tvmq.kernels.x86_int8 import KERNEL_ATTR

TILES_ATTR = "tvmq.mma_tiles"
"""PrimFunc attribute: ``[warps_m, warps_n, tiles_m, tiles_n, bk, stages]`` (:class:`MmaTiles`)."""

ASYNC_COPY = {"tirx.use_async_copy": True}
"""PassContext config under which pipelined kernels (``stages`` > 1) copy with ``cp.async``."""

TENSOR_CORE_ATTR = "tvmq.tensor_core"
"""PrimFunc attribute on kernels that run on tensor cores: the instruction they use."""

MMA = 16
"""Rows and columns of one output tile of a warp's ``mma.sync`` pair."""

_WARP = 32
_VECTOR_BYTES = 16  # one shared-memory copy per thread and round


def fragment_lane_register(row, col):
    """Where element ``(row, col)`` of a 16x16 fp16 operand tile (or of the 16x16 accumulator)
    lives in a warp's ``mma.m16n8k16`` registers: ``(lane, slot)`` of 32 lanes x 8 slots.

    From the PTX ISA fragment layouts (the tile is two m16n8 halves side by side): lane
    ``4 * (row % 8) + (col % 8) // 2``, slot ``4 * (col // 8) + 2 * (row // 8) + col % 2``.
    Tensorizing checks it against TVM's intrinsic descriptions.
    """
    return 4 * (row % 8) + (col % 8) // 2, 4 * (col // 8) + 2 * (row // 8) + col % 2


def fragment_lane_register_k32(row, col):
    """The same for a 16x32 int8 operand tile of ``mma.m16n8k32`` (32 lanes x 16 bytes):
    lane ``4 * (row % 8) + (col % 16) // 4``, slot ``8 * (col // 16) + 4 * (row // 8) + col % 4``."""
    return 4 * (row % 8) + (col % 16) // 4, 8 * (col // 16) + 4 * (row // 8) + col % 4


@dataclass(frozen=True)
class _Flavor:
    """What differs between the fp16 and the int8 kernel."""

    kernel: str  # value of KERNEL_ATTR
    batch_kernel: str  # value of KERNEL_ATTR for the batched kernel
    operand: str  # dtype of X and W
    acc: str  # accumulator and output dtype
    k_step: int  # K of one mma pair: 16 (fp16) or 32 (int8)
    weight_nk: bool  # weight stored (N, K) (int8: ldmatrix cannot transpose bytes), else (K, N)
    layout_a: Callable  # (row, col) of an operand tile -> (lane, slot)
    intrins: tuple[str, str, str, str, str]  # ldmatrix A, ldmatrix B, mma, fill, store
    instruction: str  # TENSOR_CORE_ATTR

    @property
    def vector(self) -> int:
        return _VECTOR_BYTES // np.dtype(self.operand).itemsize


_FP16 = _Flavor(
    "fp16_dense_mma", "fp16_batch_matmul_mma", "float16", "float32", 16, False, fragment_lane_register,
    ("mma_ldmatrix_f16_a", "mma_ldmatrix_f16_b", "mma_f16f16f32", "mma_fill_16x16_f32",
     "mma_store_16x16_f32_global_"),
    "mma.sync.m16n8k16.f16",
)  # fmt: skip
_BF16 = _Flavor(
    "bf16_dense_mma", "bf16_batch_matmul_mma", "bfloat16", "float32", 16, False, fragment_lane_register,
    ("tvmq_mma_ldmatrix_bf16_a", "tvmq_mma_ldmatrix_bf16_b", "tvmq_mma_bf16bf16f32",
     "mma_fill_16x16_f32", "mma_store_16x16_f32_global_"),
    "mma.sync.m16n8k16.bf16",
)  # fmt: skip
_INT8 = _Flavor(
    "int8_dense_imma", "int8_batch_matmul_imma", "int8", "int32", 32, True, fragment_lane_register_k32,
    ("mma_ldmatrix_i8_a", "mma_ldmatrix_i8_b_trans", "mma_i8i8i32_trans_b",
     "mma_fill_16x16_i32", "mma_store_16x16_i32_global_"),
    "mma.sync.m16n8k32.s8",
)  # fmt: skip
_FLAVORS = {"float16": _FP16, "bfloat16": _BF16, "int8": _INT8}
KERNEL_NAMES = tuple(name for f in _FLAVORS.values() for name in (f.kernel, f.batch_kernel))
"""Values of :data:`~tvmq.kernels.x86_int8.KERNEL_ATTR` on the kernels built here."""


@dataclass(frozen=True)
class MmaTiles:
    """Tiling of the tensor-core kernels: warps per block, 16x16 tiles per warp, K step."""

    warps_m: int = 2
    warps_n: int = 2
    tiles_m: int = 4
    tiles_n: int = 4
    bk: int = 32
    stages: int = 1
    """Shared-memory stages of the K loop: 1 copies each ``bk`` step and then computes it; 2 or
    more software-pipeline the loop (TVM's ``InjectSoftwarePipeline``): the copies of step
    ``k + stages - 1`` are issued while step ``k`` computes, as ``cp.async`` where the build
    sets ``tirx.use_async_copy`` (:data:`ASYNC_COPY`)."""

    @property
    def bm(self) -> int:
        return MMA * self.warps_m * self.tiles_m

    @property
    def bn(self) -> int:
        return MMA * self.warps_n * self.tiles_n

    @property
    def threads(self) -> int:
        return _WARP * self.warps_m * self.warps_n

    def validate(self, vector: int = 8, k_step: int = 16) -> None:
        """Raise ValueError when the tiles do not nest or the shared-memory copies do not split
        into whole rounds of ``vector`` elements per thread."""
        if (
            min(self.warps_m, self.warps_n, self.tiles_m, self.tiles_n, self.stages) < 1
            or self.bk % k_step
        ):
            raise ValueError(f"bad tensor-core tiles: {self}")
        if not 32 <= self.threads <= 1024:
            raise ValueError(f"{self.threads} threads per block: {self}")
        copy = self.threads * vector
        if (self.bm * self.bk) % copy or (self.bk * self.bn) % copy:
            raise ValueError(f"shared tiles do not split into {copy}-element rounds: {self}")


STATIC_SHARED_LIMIT = 48 * 1024
"""Bytes of static shared memory a thread block may take on every CUDA GPU."""


def choose_mma_tiles(m: int, k: int, n: int, operand: str = "float16") -> MmaTiles:
    """128 x 128 (4 warps) for large problems; fewer rows for a small ``m`` (a batch of a few
    rows pads to 16 or 32, not 128) and fewer columns when ``n`` is small. ``bk`` is the
    smallest multiple of 32 (fp16) or 64 (int8) whose shared tiles split into whole rounds
    (128 for fp16 with 16 or 32 rows: see below). The K loop is software-pipelined two stages
    deep (``cp.async``) where two stages fit in 48 KiB of shared memory and K has two steps: on
    an H200 that took the 4096^3 GEMM from 224 to 292 TFLOP/s (fp16) and 395 to 489 (int8)."""
    flavor = _FLAVORS[operand]
    if m <= 16:
        shape = dict(warps_m=1, warps_n=4, tiles_m=1, tiles_n=2)
    elif m <= 32:
        shape = dict(warps_m=1, warps_n=4, tiles_m=2, tiles_n=2)
    elif n <= 64:
        shape = dict(warps_m=2, warps_n=2, tiles_m=4, tiles_n=2)
    else:
        shape = dict(warps_m=2, warps_n=2, tiles_m=4, tiles_n=4)
    step = 2 * flavor.k_step
    # Small-M fp16 tiles (16 or 32 rows) with a 32- or 64-wide K step spill 4-8 bytes under
    # ptxas for sm_90a (at 48-80 registers); with 128 they do not, on sm_80 or sm_90a.
    bk = 128 if flavor.k_step == 16 and m <= 32 else step
    while True:
        tiles = MmaTiles(**shape, bk=bk)
        try:
            tiles.validate(flavor.vector, flavor.k_step)
            break
        except ValueError:
            bk += step
    pipelined = replace(tiles, stages=2)
    if k >= 2 * tiles.bk and shared_bytes(pipelined, operand) <= STATIC_SHARED_LIMIT:
        return pipelined
    return tiles


def shared_bytes(tiles: MmaTiles, operand: str) -> int:
    """Shared memory of one thread block: ``stages`` copies of the X and W tiles, each row
    padded by one 16-byte vector (bank-conflict-free ``ldmatrix``)."""
    flavor = _FLAVORS[operand]
    v = flavor.vector
    x = tiles.bm * (tiles.bk + v)
    w = tiles.bn * (tiles.bk + v) if flavor.weight_nk else tiles.bk * (tiles.bn + v)
    return tiles.stages * (x + w) * np.dtype(operand).itemsize


def padded_mkn_mma(m: int, k: int, n: int, tiles: MmaTiles) -> tuple[int, int, int]:
    """``(M, K, N)`` rounded up to whole tiles."""
    return round_up(m, tiles.bm), round_up(k, tiles.bk), round_up(n, tiles.bn)


def pack_weight_imma(w: np.ndarray, k_padded: int, n_padded: int) -> np.ndarray:
    """An int8 ``(K, N)`` weight as ``(N, K)`` (``packed[j, k] == w[k, j]``), zero-padded."""
    if w.ndim != 2 or w.dtype != np.int8:
        raise ValueError(f"expected an int8 (K, N) weight, got {w.dtype} {w.shape}")
    k, n = w.shape
    if k_padded < k or n_padded < n:
        raise ValueError(f"cannot pad a {w.shape} weight to ({k_padded}, {n_padded})")
    packed = np.zeros((n_padded, k_padded), dtype=np.int8)
    packed[:n, :k] = w.T
    return packed


def mma_dense_reference(
    m: int, k: int, n: int, operand: str = "float16", batch: int | None = None
) -> tvm.tirx.PrimFunc:
    """The unscheduled computation: ``C[i, j] = sum_k acc(X[i, k]) * acc(W[k, j])`` for fp16
    (``W (K, N)``, fp32 ``C``), ``sum_k i32(X[i, k]) * i32(Wt[j, k])`` for int8 (``Wt (N, K)``).
    With ``batch``, every operand has a leading batch axis: ``C[b] = X[b] @ W[b]``."""
    flavor = _FLAVORS[operand]
    lead = () if batch is None else (batch,)
    x = te.placeholder((*lead, m, k), operand, name="X")
    w = te.placeholder((*lead, *((n, k) if flavor.weight_nk else (k, n))), operand, name="W")
    r = te.reduce_axis((0, k), name="k")

    def product(*idx):
        *b, i, j = idx
        wv = w[(*b, j, r)] if flavor.weight_nk else w[(*b, r, j)]
        return te.sum(x[(*b, i, r)].astype(flavor.acc) * wv.astype(flavor.acc), axis=r)

    out = te.compute((*lead, m, n), product, name="C")
    return te.create_prim_func([x, w, out])


def fp16_dense_mma(m, k, n, *, tiles: MmaTiles | None = None, device="cuda") -> tvm.tirx.PrimFunc:
    """Scheduled ``C = X @ W``: fp16 ``X (m, k)``, fp16 ``W (k, n)``, fp32 ``C`` (see module)."""
    return _build(_FP16, m, k, n, tiles, device)


def bf16_dense_mma(m, k, n, *, tiles: MmaTiles | None = None, device="cuda") -> tvm.tirx.PrimFunc:
    """Scheduled ``C = X @ W``: bf16 ``X (m, k)``, bf16 ``W (k, n)``, fp32 ``C``: the fp16
    kernel with ``mma.sync .m16n8k16 .f32.bf16.bf16.f32`` (see :func:`register_bf16_intrinsics`)."""
    return _build(_BF16, m, k, n, tiles, device)


def int8_dense_imma(m, k, n, *, tiles: MmaTiles | None = None, device="cuda") -> tvm.tirx.PrimFunc:
    """Scheduled ``C = X @ Wt.T``: int8 ``X (m, k)``, int8 ``Wt (n, k)`` (:func:`pack_weight_imma`),
    int32 ``C``."""
    return _build(_INT8, m, k, n, tiles, device)


def fp16_batch_matmul_mma(
    batch, m, k, n, *, tiles: MmaTiles | None = None, device="cuda"
) -> tvm.tirx.PrimFunc:
    """Scheduled ``C[b] = X[b] @ W[b]``: fp16 ``X (batch, m, k)`` and ``W (batch, k, n)``, fp32
    ``C``; the batch is one more axis of the grid of thread blocks."""
    return _build(_FP16, m, k, n, tiles, device, batch)


def bf16_batch_matmul_mma(
    batch, m, k, n, *, tiles: MmaTiles | None = None, device="cuda"
) -> tvm.tirx.PrimFunc:
    """:func:`fp16_batch_matmul_mma` with bf16 ``X`` and ``W`` (``mma.sync .bf16``)."""
    return _build(_BF16, m, k, n, tiles, device, batch)


def int8_batch_matmul_imma(
    batch, m, k, n, *, tiles: MmaTiles | None = None, device="cuda"
) -> tvm.tirx.PrimFunc:
    """Scheduled ``C[b] = X[b] @ Wt[b].T``: int8 ``X (batch, m, k)``, int8 ``Wt (batch, n, k)``
    (the second operand transposed: attention's ``K`` as it is), int32 ``C``."""
    return _build(_INT8, m, k, n, tiles, device, batch)


def _build(
    flavor: _Flavor,
    m: int,
    k: int,
    n: int,
    tiles: MmaTiles | None,
    device: Literal["cuda", "cpu"],
    batch: int | None = None,
) -> tvm.tirx.PrimFunc:
    """The kernel for padded sizes. ``device="cuda"``: thread-bound, shared memory, ``ldmatrix``
    + ``mma.sync``; ``"cpu"``: the same loop nest before tensorization, buildable for ``llvm``.
    Attributes: ``tirx.is_scheduled``, ``KERNEL_ATTR``, :data:`TILES_ATTR`, ``tvmq.device`` and,
    on CUDA, :data:`TENSOR_CORE_ATTR`."""
    tiles = tiles or choose_mma_tiles(m, k, n, flavor.operand)
    tiles.validate(flavor.vector, flavor.k_step)
    if m % tiles.bm or k % tiles.bk or n % tiles.bn:
        raise ValueError(f"unpadded shape m={m} k={k} n={n} for tiles {tiles}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    reference = mma_dense_reference(m, k, n, flavor.operand, batch)
    func = (
        _schedule(reference, tiles, flavor, device == "cuda")
        .mod["main"]
        .with_attr("tirx.is_scheduled", True)
        .with_attr(KERNEL_ATTR, flavor.kernel if batch is None else flavor.batch_kernel)
        .with_attr(TILES_ATTR, list(astuple(tiles)))
        .with_attr("tvmq.device", device)
        .without_attr("global_symbol")
    )
    return func.with_attr(TENSOR_CORE_ATTR, flavor.instruction) if device == "cuda" else func


def _tile_map(rows: int, cols: int, layout: Callable, batched: bool):
    """(row, col) of a padded matrix -> (tile row, tile col, lane, slot) of ``rows x cols``
    tiles; a leading batch index is kept."""

    def index_map(i, j):
        lane, slot = layout(i % rows, j % cols)
        return (i // rows, j // cols, lane, slot)

    def batched_map(b, i, j):
        return (b, *index_map(i, j))

    return batched_map if batched else index_map


def _schedule(func: tvm.tirx.PrimFunc, tiles: MmaTiles, flavor: _Flavor, on_gpu: bool) -> Schedule:
    shared, warp = ("shared", "warp") if on_gpu else ("global", "global")
    ks = flavor.k_step
    sch = Schedule(func)
    block = sch.get_sblock("C")

    # 16 x 16 x k_step steps become one block each: the unit the mma intrinsic replaces.
    *batch, i, j, r = sch.get_loops(block)
    i, i_tc = sch.split(i, [None, MMA])
    j, j_tc = sch.split(j, [None, MMA])
    r, r_tc = sch.split(r, [None, ks])
    sch.reorder(i, j, r, i_tc, j_tc, r_tc)
    outer = sch.blockize(i_tc)

    # Block tile -> warps -> tiles per warp; K in bk-wide shared stages of bk / k_step steps.
    bi, wi, ti = sch.split(i, [None, tiles.warps_m, tiles.tiles_m])
    bj, wj, tj = sch.split(j, [None, tiles.warps_n, tiles.tiles_n])
    ro, ri = sch.split(r, [None, tiles.bk // ks])
    sch.reorder(bi, bj, wi, wj, ro, ri, ti, tj)
    block_loop = sch.fuse(*batch, bi, bj)  # the batch: more thread blocks
    warp_loop = sch.fuse(wi, wj)
    if on_gpu:
        sch.bind(block_loop, "blockIdx.x")
        sch.bind(warp_loop, "threadIdx.y")

    for operand in (0, 1):  # global -> shared, 16-byte vectors, every thread of the block
        stage = sch.cache_read(outer, operand, shared)
        sch.compute_at(stage, ro)
        fused = sch.fuse(*sch.get_loops(stage)[-2:])
        warps = tiles.warps_m * tiles.warps_n
        _, ty, tx, vec = sch.split(fused, [None, warps, _WARP, flavor.vector])
        if on_gpu:
            sch.bind(ty, "threadIdx.y")
            sch.bind(tx, "threadIdx.x")
            sch.storage_align(stage, 0, axis=-2, factor=32, offset=flavor.vector)
        sch.vectorize(vec)

    if on_gpu and tiles.stages > 1:  # [copy A, copy B, compute]: the copies run ahead
        sch.annotate(ro, "software_pipeline_stage", [0, 0, tiles.stages - 1])
        sch.annotate(ro, "software_pipeline_order", [0, 1, 2])
        sch.annotate(ro, "software_pipeline_async_stages", [0])

    frag_a = sch.cache_read(outer, 0, warp)  # shared -> registers (ldmatrix)
    frag_b = sch.cache_read(outer, 1, warp)
    sch.compute_at(frag_a, ri)
    sch.compute_at(frag_b, ri)
    acc = sch.cache_write(outer, 0, warp)  # accumulators, stored once per block tile
    sch.reverse_compute_at(acc, warp_loop)
    sch.decompose_reduction(outer, ro)
    init = sch.get_sblock("C_init")

    def per_fragment(stage, rows, cols):
        fi, fj = sch.get_loops(stage)[-2:]
        fio, fii = sch.split(fi, [None, rows])
        fjo, fji = sch.split(fj, [None, cols])
        sch.reorder(fio, fjo, fii, fji)
        return fii

    b_tile = (MMA, ks) if flavor.weight_nk else (ks, MMA)
    load_a = per_fragment(frag_a, MMA, ks)
    load_b = per_fragment(frag_b, *b_tile)
    store = per_fragment(acc, MMA, MMA)
    batched = bool(batch)
    sch.transform_layout(frag_a, ("write", 0), _tile_map(MMA, ks, flavor.layout_a, batched))
    sch.transform_layout(frag_b, ("write", 0), _tile_map(*b_tile, flavor.layout_a, batched))
    sch.transform_layout(acc, ("read", 0), _tile_map(MMA, MMA, fragment_lane_register, batched))
    if on_gpu:
        # Imported here: registering TVM's CUDA intrinsics takes 35 s to 2 min, and CPU builds
        # (and the CPU twin) never need them.
        from tvm.s_tir.tensor_intrin import cuda as _registers_intrinsics  # noqa: F401

        if flavor is _BF16:
            register_bf16_intrinsics()
        name_a, name_b, name_mma, name_fill, name_store = flavor.intrins
        sch.tensorize(load_a, name_a)
        sch.tensorize(load_b, name_b)
        sch.tensorize(sch.get_loops(block)[-3], name_mma)
        sch.tensorize(sch.get_loops(init)[-2], name_fill)
        sch.tensorize(store, name_store)
    return sch


def register_bf16_intrinsics() -> None:
    """Register the bf16 ``ldmatrix`` (A, B) and ``mma.sync`` intrinsics of :data:`_BF16`.

    TVM 0.27 registers these for fp16 only. ``ldmatrix`` moves 16-bit words and
    ``mma.m16n8k16`` takes ``.bf16`` operands in the same fragment layout as ``.f16``, so each
    bf16 intrinsic is TVM's fp16 one with the operand dtype (``float16`` -> ``bfloat16``) and
    the mma type (``fp16`` -> ``bf16``) renamed in its printed TVMScript, parsed back. Idempotent.
    """
    from tvm.s_tir import TensorIntrin
    from tvm.s_tir.tensor_intrin import cuda as intrin

    name_a, name_b, name_mma = _BF16.intrins[:3]
    if TensorIntrin.get(name_mma, allow_missing=True) is not None:
        return
    fp16 = {
        name_a: intrin.get_ldmatrix_intrin(MMA, "float16", "A", False),
        name_b: intrin.get_ldmatrix_intrin(MMA, "float16", "B", False),
        name_mma: intrin.get_mma_intrin(MMA, "float16", "float16", "float32", False, False),
    }
    for name, funcs in fp16.items():
        TensorIntrin.register(name, *(_as_bf16(f) for f in funcs))


def _as_bf16(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    text = func.script().replace('"float16"', '"bfloat16"').replace('"fp16"', '"bf16"')
    # The printed ldmatrix call omits its element dtype, which the parser then takes as int8
    # (and the CUDA codegen turns a "transposing int8" ldmatrix into a scalar loop): restore it.
    text = "\n".join(
        line[:-1] + ', dtype="bfloat16")' if "T.ptx_legacy.ldmatrix(" in line else line
        for line in text.splitlines()
    )
    if '"float16"' in text or "fp16" in text or "bfloat16" not in text:
        raise AssertionError(f"unexpected fp16 intrinsic script:\n{func.script()}")
    return tvm.script.from_source(text)


def mma_kernels_for_cpu(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every CUDA tensor-core kernel of this module rebuilt with ``device="cpu"``.

    The twin has the same arguments, tiles and loop nest, so a module rewritten by
    :class:`~tvmq.passes.PackFp16DenseCUDA`, the IMMA path of
    :class:`~tvmq.passes.PackInt8DenseCUDA`, :class:`~tvmq.passes.PackMmaBatchMatmulCUDA` or
    :class:`~tvmq.passes.PackMmaConvCUDA` (whose im2col kernels get their twins too) builds for
    ``llvm`` and can be checked against numpy where there is no GPU (the padding and slicing
    around the kernels included).
    """
    flavors = {f.kernel: f for f in _FLAVORS.values()}
    flavors.update({f.batch_kernel: f for f in _FLAVORS.values()})
    out = mod
    for gv, func in mod.functions_items():
        attrs = func.attrs if isinstance(func, tvm.tirx.PrimFunc) else None
        if attrs is None or attrs.get("tvmq.device") == "cpu":
            continue
        if attrs.get(KERNEL_ATTR) == im2col.KERNEL:
            twin = im2col.im2col_for_cpu(func)
        elif attrs.get(KERNEL_ATTR) in flavors:
            twin = _twin(func, flavors[str(attrs[KERNEL_ATTR])])
        else:
            continue
        if out is mod:
            out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        out[gv] = twin
    return out


def _twin(func: tvm.tirx.PrimFunc, flavor: _Flavor) -> tvm.tirx.PrimFunc:
    """The ``device="cpu"`` build of a CUDA tensor-core kernel, with its other attributes."""
    attrs = func.attrs
    x_shape, c_shape = (tuple(int(d) for d in func.params[i].ty.shape) for i in (0, 2))
    batch = x_shape[0] if str(attrs[KERNEL_ATTR]) == flavor.batch_kernel else None
    (m, k), n = x_shape[-2:], c_shape[-1]
    tiles = MmaTiles(*(int(t) for t in attrs[TILES_ATTR]))
    twin = _build(flavor, m, k, n, tiles, "cpu", batch)
    for key, value in attrs.items():
        if key not in twin.attrs and key != TENSOR_CORE_ATTR:
            twin = twin.with_attr(key, value)
    return twin
