"""CUDA int8 dense kernels: ``int8 (M, K) x packed int8 weight -> int32 (M, N)`` with ``dp4a``.

``dp4a`` (sm_61 and later) multiplies four signed bytes by four signed bytes and adds the
int32 sum to an accumulator in one instruction. The weight is packed once at compile time
by :func:`pack_weight_dp4a` into ``[K/4, N, 4]``: the four bytes of one output column that
one ``dp4a`` needs are one aligned 32-bit word, and neighbouring columns are neighbouring
words (coalesced global loads, conflict-free shared-memory reads).

:func:`int8_dense_dp4a` builds the scheduled TIR kernel (a classic tiled GEMM):

- each thread block owns a ``bm x bn`` output tile and walks K in ``bk`` steps, staging
  the ``bm x bk`` activation tile and the ``bk/4 x bn x 4`` weight tile in shared memory
  (cooperative 32-bit loads by all threads);
- each thread keeps a contiguous ``tm x tn`` accumulator tile in registers;
- the 4-byte reduction is tensorized with :data:`DP4A_CUDA` (``__dp4a``, PTX ``dp4a.s32.s32``).

The same schedule is also built with ``device="cpu"``: thread bindings dropped, scopes
``global`` and the reduction tensorized with :data:`DP4A_EMULATED` (four scalar
multiply-adds). That program is the same loop nest, with the same index arithmetic, and runs
with an ``llvm`` target, so the tiling, packing and padding can be tested against numpy
where there is no GPU. :func:`int8_dense_reference` is the unscheduled computation.

Shapes must already be padded (:func:`padded_mkn`): ``M % bm == 0``, ``N % bn == 0``,
``K % bk == 0``. Unsigned activations are the caller's to shift to int8 (``x - 128``) and
compensate with ``offset = 128 * colsum(W)``; the kernel adds an optional per-column int32
``offset`` to every row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import tvm
from tvm import te
from tvm.s_tir import Schedule, TensorIntrin
from tvm.script import tirx as T

from tvmq.kernels._tiling import round_up
from tvmq.kernels.x86_int8 import KERNEL_ATTR

QUAD = 4
"""Bytes reduced by one ``dp4a``: the K grouping of the packed weight."""

DP4A_CUDA = "tvmq_dp4a_s8s8s32_cuda"
"""Tensor intrinsic: ``C[0] += dot(A[0:4], B[0:4])`` (int8, shared) -> int32 (local) with ``__dp4a``."""

DP4A_EMULATED = "tvmq_dp4a_s8s8s32_emulated"
"""The same description on ``global`` buffers, implemented with scalar multiply-adds (any target)."""

KERNEL_NAME = "int8_dense_dp4a"
"""Value of :data:`~tvmq.kernels.x86_int8.KERNEL_ATTR` on the kernels built here."""

TILES_ATTR = "tvmq.dp4a_tiles"
"""PrimFunc attribute: the kernel's ``[bm, bn, bk, tm, tn]`` (see :class:`CudaDenseTiles`)."""

_SCOPES = {"cuda": ("shared", "local"), "cpu": ("global", "global")}


def _dp4a_desc(operand_scope: str, acc_scope: str):
    """TVMScript description of one 4-byte signed dot product accumulated in int32."""

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "int8", offset_factor=1, align=4, scope=operand_scope),
        B: T.Buffer((4,), "int8", offset_factor=1, align=4, scope=operand_scope),
        C: T.Buffer((1,), "int32", offset_factor=1, align=4, scope=acc_scope),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            for r in range(4):
                with T.sblock("update"):
                    vr = T.axis.remap("R", [r])
                    C[0] = C[0] + T.Cast("int32", A[vr]) * T.Cast("int32", B[vr])

    return desc


def _dp4a_impls():
    """The ``__dp4a`` and scalar implementations (TVMScript, parsed on first use)."""

    @T.prim_func(s_tir=True)
    def _dp4a_cuda_impl(
        A: T.Buffer((4,), "int8", offset_factor=1, align=4, scope="shared"),
        B: T.Buffer((4,), "int8", offset_factor=1, align=4, scope="shared"),
        C: T.Buffer((1,), "int32", offset_factor=1, align=4, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            # The accumulator goes into dp4a itself (upstream's adds it after a dp4a with 0).
            C[0] = T.call_pure_extern(
                "int32", "__dp4a", A.vload([0], "int8x4"), B.vload([0], "int8x4"), C[0]
            )

    @T.prim_func(s_tir=True)
    def _dp4a_emulated_impl(
        A: T.Buffer((4,), "int8", offset_factor=1, align=4, scope="global"),
        B: T.Buffer((4,), "int8", offset_factor=1, align=4, scope="global"),
        C: T.Buffer((1,), "int32", offset_factor=1, align=4, scope="global"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            C[0] = (
                C[0]
                + T.Cast("int32", A[0]) * T.Cast("int32", B[0])
                + T.Cast("int32", A[1]) * T.Cast("int32", B[1])
                + T.Cast("int32", A[2]) * T.Cast("int32", B[2])
                + T.Cast("int32", A[3]) * T.Cast("int32", B[3])
            )

    return _dp4a_cuda_impl, _dp4a_emulated_impl


def register_dp4a_intrins() -> tuple[str, str]:
    """Register :data:`DP4A_CUDA` and :data:`DP4A_EMULATED` once; return their names."""
    missing = [
        n for n in (DP4A_CUDA, DP4A_EMULATED) if TensorIntrin.get(n, allow_missing=True) is None
    ]
    if missing:
        impls = dict(zip((DP4A_CUDA, DP4A_EMULATED), _dp4a_impls(), strict=True))
        scopes = {DP4A_CUDA: ("shared", "local"), DP4A_EMULATED: ("global", "global")}
        for name in missing:
            TensorIntrin.register(name, _dp4a_desc(*scopes[name]), impls[name])
    return DP4A_CUDA, DP4A_EMULATED


@dataclass(frozen=True)
class CudaDenseTiles:
    """Tiling of the dp4a dense kernel.

    ``bm x bn`` outputs per thread block, ``bk`` bytes of K per shared-memory stage,
    ``tm x tn`` outputs per thread; ``(bm/tm) * (bn/tn)`` threads per block.
    """

    bm: int
    bn: int
    bk: int
    tm: int
    tn: int

    @property
    def threads(self) -> int:
        """Threads per block."""
        return (self.bm // self.tm) * (self.bn // self.tn)

    @property
    def shared_bytes(self) -> int:
        """Shared memory per block (activation tile + weight tile)."""
        return (self.bm + self.bn) * self.bk

    def validate(self) -> None:
        """Raise ValueError when the tiles do not nest (see the class docstring)."""
        if self.bm % self.tm or self.bn % self.tn or self.bk % QUAD:
            raise ValueError(f"tiles do not nest: {self}")
        if not 32 <= self.threads <= 1024:
            raise ValueError(f"{self.threads} threads per block: {self}")
        # Every cooperative copy must split evenly into one 32-bit word per thread.
        words = self.threads * QUAD
        if (self.bm * self.bk) % words or (self.bn * self.bk) % words:
            raise ValueError(f"shared tiles do not split into {words}-byte rounds: {self}")


def choose_cuda_tiles(m: int, k: int, n: int) -> CudaDenseTiles:
    """Pick tiles for an ``(m, k) x (k, n)`` problem (16 x 16 threads, 4 x 4 per thread).

    Small ``m`` (a batch of a few rows) gets a short block (``bm`` 16 or 32, fewer rows per
    thread) so padding ``m`` costs little; ``bn`` drops to 32 when 64 would leave fewer than
    32 blocks. ``bk`` is the smallest multiple of 32 that splits the shared tiles evenly.
    """
    del k  # the K tile depends only on the block shape
    bm = 64 if m > 32 else 32 if m > 16 else 16
    tm = bm // 16
    bn = 64 if -(-n // 64) * -(-m // bm) >= 32 or n > 512 else 32
    tn = bn // 16
    threads = (bm // tm) * (bn // tn)
    bk = 32
    while (bm * bk) % (threads * QUAD) or (bn * bk) % (threads * QUAD):
        bk += 32
    tiles = CudaDenseTiles(bm, bn, bk, tm, tn)
    tiles.validate()
    return tiles


def padded_mkn(m: int, k: int, n: int, tiles: CudaDenseTiles) -> tuple[int, int, int]:
    """``(M, K, N)`` rounded up to whole tiles."""
    return round_up(m, tiles.bm), round_up(k, tiles.bk), round_up(n, tiles.bn)


def pack_weight_dp4a(w: np.ndarray, k_padded: int, n_padded: int) -> np.ndarray:
    """Pack an int8 ``(K, N)`` weight as ``[K/4, N, 4]``, zero-padded to the given sizes.

    ``packed[q, j, r] == w[4 * q + r, j]`` (zero outside ``w``).
    """
    if w.ndim != 2 or w.dtype != np.int8:
        raise ValueError(f"expected an int8 (K, N) weight, got {w.dtype} {w.shape}")
    k, n = w.shape
    if k_padded < k or n_padded < n or k_padded % QUAD:
        raise ValueError(f"cannot pad a {w.shape} weight to ({k_padded}, {n_padded})")
    padded = np.zeros((k_padded, n_padded), dtype=np.int8)
    padded[:k, :n] = w
    return np.ascontiguousarray(padded.reshape(k_padded // QUAD, QUAD, n_padded).transpose(0, 2, 1))


def int8_dense_reference(m: int, k: int, n: int, *, with_offset: bool = False) -> tvm.tirx.PrimFunc:
    """The unscheduled computation: ``C[i, j] = sum_k X[i, k] * Wp[k/4, j, k%4] (+ offset[j])``.

    Arguments ``X (m, k) int8``, ``Wp (k/4, n, 4) int8`` [, ``offset (n,) int32``],
    ``C (m, n) int32``; ``k % 4 == 0``.
    """
    if k % QUAD:
        raise ValueError(f"k={k} is not a multiple of {QUAD}")
    x = te.placeholder((m, k), "int8", name="X")
    w = te.placeholder((k // QUAD, n, QUAD), "int8", name="W")
    kq = te.reduce_axis((0, k // QUAD), name="kq")
    kr = te.reduce_axis((0, QUAD), name="kr")
    acc = te.compute(
        (m, n),
        lambda i, j: te.sum(
            x[i, kq * QUAD + kr].astype("int32") * w[kq, j, kr].astype("int32"), axis=[kq, kr]
        ),
        name="acc",
    )
    args = [x, w]
    if with_offset:
        off = te.placeholder((n,), "int32", name="offset")
        out = te.compute((m, n), lambda i, j: acc[i, j] + off[j], name="C")
        args.append(off)
    else:
        out = te.compute((m, n), lambda i, j: acc[i, j], name="C")
    return te.create_prim_func([*args, out])


def int8_dense_dp4a(
    m: int,
    k: int,
    n: int,
    *,
    with_offset: bool = False,
    tiles: CudaDenseTiles | None = None,
    device: Literal["cuda", "cpu"] = "cuda",
) -> tvm.tirx.PrimFunc:
    """Scheduled kernel ``C[m, n] = X[m, k] @ W[k, n] (+ offset[n])``, int8 in, int32 out.

    Parameters
    ----------
    m, k, n : int
        Padded sizes: multiples of ``tiles.bm``, ``tiles.bk`` and ``tiles.bn``.
    with_offset : bool
        Add a per-column int32 ``offset`` (an extra ``(n,)`` argument) to the result.
    tiles : CudaDenseTiles, optional
        Defaults to :func:`choose_cuda_tiles` ``(m, k, n)``.
    device : {"cuda", "cpu"}
        ``"cuda"``: thread-bound, shared memory, ``__dp4a``. ``"cpu"``: the same loop nest
        without thread bindings and with scalar dp4a, buildable for ``llvm`` (for tests).

    Returns
    -------
    tvm.tirx.PrimFunc
        Arguments as :func:`int8_dense_reference`, with the weight packed by
        :func:`pack_weight_dp4a`. Attributes ``tirx.is_scheduled`` (dlight / MetaSchedule
        leave it alone), :data:`~tvmq.kernels.x86_int8.KERNEL_ATTR` = :data:`KERNEL_NAME`,
        :data:`TILES_ATTR` and ``tvmq.device``.
    """
    tiles = tiles or choose_cuda_tiles(m, k, n)
    tiles.validate()
    if m % tiles.bm or k % tiles.bk or n % tiles.bn:
        raise ValueError(f"unpadded shape m={m} k={k} n={n} for tiles {tiles}")
    if device not in _SCOPES:
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    func = int8_dense_reference(m, k, n, with_offset=with_offset)
    sch = _schedule(func, tiles, device)
    return (
        sch.mod["main"]
        .with_attr("tirx.is_scheduled", True)
        .with_attr(KERNEL_ATTR, KERNEL_NAME)
        .with_attr(TILES_ATTR, [tiles.bm, tiles.bn, tiles.bk, tiles.tm, tiles.tn])
        .with_attr("tvmq.device", device)
        .without_attr("global_symbol")
    )


def _schedule(func: tvm.tirx.PrimFunc, tiles: CudaDenseTiles, device: str) -> Schedule:
    """Tile the ``acc`` / ``C`` pair of :func:`int8_dense_reference` (see the module docstring)."""
    on_gpu = device == "cuda"
    operand_scope, acc_scope = _SCOPES[device]
    sch = Schedule(func)
    acc, out = sch.get_sblock("acc"), sch.get_sblock("C")
    threads_m, threads_n = tiles.bm // tiles.tm, tiles.bn // tiles.tn

    # Output tile: each thread owns a contiguous tm x tn block of it (compute_at needs a
    # rectangular region per thread; strided ownership would not be one).
    i, j = sch.get_loops(out)
    bi, ti, ii = sch.split(i, [None, threads_m, tiles.tm])
    bj, tj, jj = sch.split(j, [None, threads_n, tiles.tn])
    sch.reorder(bi, bj, ti, tj, ii, jj)
    block = sch.fuse(bi, bj)
    thread = sch.fuse(ti, tj)
    if on_gpu:
        sch.bind(block, "blockIdx.x")
        sch.bind(thread, "threadIdx.x")

    # The accumulator: tm x tn registers per thread.
    sch.compute_at(acc, thread, preserve_unit_loops=True)
    sch.set_scope(acc, 0, acc_scope)
    ai, aj, kq, kr = sch.get_loops(acc)[2:]
    ko, ki = sch.split(kq, [None, tiles.bk // QUAD])
    sch.reorder(ko, ki, ai, aj, kr)

    # Shared-memory stages of both operands, loaded one 32-bit word per thread per round.
    for operand in (0, 1):
        stage = sch.cache_read(acc, operand, operand_scope)
        sch.compute_at(stage, ko, preserve_unit_loops=True)
        fused = sch.fuse(*sch.get_loops(stage)[3:])
        _, t, v = sch.split(fused, [None, tiles.threads, QUAD])
        if on_gpu:
            sch.bind(t, "threadIdx.x")
        sch.vectorize(v)

    sch.decompose_reduction(acc, ko)
    sch.tensorize(kr, register_dp4a_intrins()[0 if on_gpu else 1])
    sch.unroll(ai)
    sch.unroll(aj)
    sch.unroll(ki)
    return sch


def kernels_for_cpu(mod: tvm.IRModule) -> tvm.IRModule:
    """Return ``mod`` with every CUDA :func:`int8_dense_dp4a` kernel rebuilt with ``device="cpu"``.

    The CPU twin has the same arguments, tiles and loop nest, so a module rewritten by
    :class:`~tvmq.passes.PackInt8DenseCUDA` can be built for ``llvm`` and checked against numpy
    where there is no GPU (the packing, padding and compensation around the kernel included).
    """
    out = mod
    for gv, func in mod.functions_items():
        attrs = func.attrs if isinstance(func, tvm.tirx.PrimFunc) else None
        if attrs is None or attrs.get(KERNEL_ATTR) != KERNEL_NAME:
            continue
        if attrs.get("tvmq.device") == "cpu":
            continue
        shapes = [tuple(int(d) for d in p.ty.shape) for p in func.params]
        (m, k), (n,) = shapes[0], shapes[-1][1:]
        twin = int8_dense_dp4a(
            m,
            k,
            n,
            with_offset=len(func.params) == 4,
            tiles=CudaDenseTiles(*(int(t) for t in attrs[TILES_ATTR])),
            device="cpu",
        )
        for key, value in attrs.items():
            if key not in twin.attrs:
                twin = twin.with_attr(key, value)
        if out is mod:
            out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        out[gv] = twin
    return out
