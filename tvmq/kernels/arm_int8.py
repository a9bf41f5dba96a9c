"""AArch64 int8 dense kernels: ``int8 (M, K) x packed int8 weight -> int32 (M, N)``.

The weight is packed once at compile time by :func:`pack_weight_arm` into
``[N/4, K/4, 4, 4]`` so that each dot-product step reads one contiguous 16-byte tile (one q
register). :func:`int8_dense_arm` builds the scheduled TIR kernel:

- the reduction is tensorized with :data:`tvmq.kernels.arm_dot_intrin.SDOT_4X4` (``sdot``,
  targets with dotprod) or :data:`~tvmq.kernels.arm_dot_intrin.NEON_4X4` (``smull`` /
  ``saddlp`` / ``addp``, any AArch64);
- each parallel task owns an ``mr x (nr * 4)`` output tile kept in registers (AArch64 has
  32 q registers: at most 24 accumulators with ``sdot``, 12 with the longer NEON sequence,
  whose temporaries need registers too) and walks the whole K;
- tiles run ``parallel`` over (N tiles, M tiles), N outer; tiny problems stay serial.

Shapes must already be padded: ``K % 4 == 0``, ``N % 4 == 0`` and ``M % mr == 0``
(:func:`choose_tiles` picks ``mr`` dividing ``M``, or says how far to pad ``M``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import tvm
from tvm import te
from tvm.s_tir import Schedule

from tvmq.kernels._tiling import pack_int8_tiles, round_up
from tvmq.kernels.arm_dot_intrin import LANES, NEON_4X4, REDUCE, SDOT_4X4, register_arm_intrins

KERNEL_ATTR = "tvmq.kernel"
"""PrimFunc attribute naming which tvmq kernel a function is (``"int8_dense_sdot"``...)."""

Instruction = Literal["sdot", "neon"]
_INTRINSICS = {"sdot": SDOT_4X4, "neon": NEON_4X4}
_MAX_ACCUMULATORS = {"sdot": 24, "neon": 12}
# Below this many multiply-adds a parallel launch costs more than it saves.
_PARALLEL_MIN_MACS = 1 << 20


def padded_kn(k: int, n: int) -> tuple[int, int]:
    """``(K, N)`` rounded up to the packed tile (multiples of 4)."""
    return round_up(k, REDUCE), round_up(n, LANES)


def pack_weight_arm(w: np.ndarray) -> np.ndarray:
    """Pack an int8 ``(K, N)`` weight as ``[N/4, K/4, 4, 4]``, zero-padding K and N.

    ``packed[j, q, i, r] == w[4 * q + r, 4 * j + i]`` (zero outside ``w``).
    """
    return pack_int8_tiles(w, LANES, REDUCE)


@dataclass(frozen=True)
class DenseTiles:
    """Register tile of the dense kernel: ``mr`` rows x ``nr`` 4-lane vectors."""

    mr: int
    nr: int
    m_padded: int


def choose_tiles(m: int, n_padded: int, instruction: Instruction = "sdot") -> DenseTiles:
    """Pick the register tile for an ``(m, n_padded)`` output.

    ``mr`` is ``m`` itself when ``m <= 8``, else the largest divisor of ``m`` in 4..8; when
    there is none, ``m`` is padded up to a multiple of 8 (``m_padded``). ``nr`` divides
    ``n_padded / 4`` and keeps ``mr * nr`` within the instruction's accumulator budget.
    """
    if m <= 8:
        mr, m_padded = m, m
    else:
        mr = next((d for d in range(8, 3, -1) if m % d == 0), 8)
        m_padded = round_up(m, mr)
    n_tiles = n_padded // LANES
    budget = _MAX_ACCUMULATORS[instruction]
    nr = next(r for r in (4, 3, 2, 1) if n_tiles % r == 0 and mr * r <= budget)
    return DenseTiles(mr, nr, m_padded)


def int8_dense_arm(
    m: int,
    k: int,
    n: int,
    *,
    instruction: Instruction = "sdot",
    with_offset: bool = False,
    tiles: DenseTiles | None = None,
) -> tvm.tirx.PrimFunc:
    """Scheduled kernel ``C[m, n] = sum_k int32(X[m, k]) * int32(W[k, n]) (+ offset[n])``.

    Parameters
    ----------
    m, k, n : int
        Padded sizes: ``k % 4 == 0``, ``n % 4 == 0``, ``m`` a multiple of ``tiles.mr``.
    instruction : "sdot" or "neon"
        ``"sdot"`` needs a target with dotprod; ``"neon"`` runs on any AArch64 CPU.
    with_offset : bool
        Add a per-column int32 ``offset`` (an extra ``(n,)`` argument) to the result.
    tiles : DenseTiles, optional
        Defaults to :func:`choose_tiles` ``(m, n, instruction)``.

    Returns
    -------
    tvm.tirx.PrimFunc
        Arguments ``X (m, k) int8``, ``W (n/4, k/4, 4, 4) int8`` [, ``offset (n,) int32``],
        ``C (m, n) int32``. Attributes ``tirx.is_scheduled`` (so dlight / MetaSchedule leave
        it alone) and :data:`KERNEL_ATTR` (``"int8_dense_sdot"`` or ``"int8_dense_neon"``).
    """
    if instruction not in _INTRINSICS:
        raise ValueError(f"instruction must be 'sdot' or 'neon', not {instruction!r}")
    tiles = tiles or choose_tiles(m, n, instruction)
    if k % REDUCE or n % LANES or m % tiles.mr or (n // LANES) % tiles.nr:
        raise ValueError(f"unpadded shape m={m} k={k} n={n} for tiles {tiles}")
    x = te.placeholder((m, k), "int8", name="X")
    w = te.placeholder((n // LANES, k // REDUCE, LANES, REDUCE), "int8", name="W")
    r = te.reduce_axis((0, k), name="k")
    acc = te.compute(
        (m, n),
        lambda i, j: te.sum(
            x[i, r].astype("int32")
            * w[j // LANES, r // REDUCE, j % LANES, r % REDUCE].astype("int32"),
            axis=r,
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
    func = te.create_prim_func([*args, out])
    sch = _schedule(func, tiles, _INTRINSICS[instruction], parallel=m * n * k >= _PARALLEL_MIN_MACS)
    return (
        sch.with_attr("tirx.is_scheduled", True)
        .with_attr(KERNEL_ATTR, f"int8_dense_{instruction}")
        .without_attr("global_symbol")
    )


def _schedule(
    func: tvm.tirx.PrimFunc, tiles: DenseTiles, intrinsic: str, parallel: bool
) -> tvm.tirx.PrimFunc:
    """Tile, parallelize and tensorize the ``acc`` / ``C`` pair built by :func:`int8_dense_arm`."""
    sch = Schedule(func)
    acc, out = sch.get_sblock("acc"), sch.get_sblock("C")
    oi, oj = sch.get_loops(out)
    mo, mi = sch.split(oi, [None, tiles.mr])
    no, nj = sch.split(oj, [None, tiles.nr * LANES])
    sch.reorder(no, mo, mi, nj)
    # The accumulator shrinks to one mr x (nr * 4) tile per task.
    sch.compute_at(acc, mo)
    # compute_at drops unit loops: the row loop is there only when mr > 1.
    *rows, aj, ak = sch.get_loops(acc)[2:]
    ni, nv = sch.split(aj, [tiles.nr, LANES])
    ko, kv = sch.split(ak, [None, REDUCE])
    sch.reorder(ko, *rows, ni, nv, kv)
    outer = sch.fuse(no, mo)
    if parallel:
        sch.parallel(outer)
    init = sch.decompose_reduction(acc, ko)
    register_arm_intrins()
    sch.tensorize(nv, intrinsic)
    for loop in (*rows, ni):
        sch.unroll(loop)
    sch.vectorize(sch.get_loops(init)[-1])
    _, vj = sch.split(nj, [None, LANES])
    sch.vectorize(vj)
    return sch.mod["main"]
