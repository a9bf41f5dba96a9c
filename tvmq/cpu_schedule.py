"""tvmq's default CPU schedule for kernels without a tuning record or a tvmq kernel.

Used by :func:`tvmq.build.build` as a dlight rule (``dl.ApplyDefaultSchedule``).
"""

from __future__ import annotations

import math

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.schedule import ScheduleError
from tvm.sym import detect_linear_equation
from tvm.target.codegen import llvm_get_vector_width

__all__ = ["CPUDefaultSchedule"]

# Blocks with fewer iterations than this run on one thread: waking the pool costs more.
_MIN_PARALLEL_WORK = 1 << 14


class CPUDefaultSchedule(dl.ScheduleRule):
    """A cheap parallel + SIMD schedule for every static-shape CPU kernel.

    For each block in loop order ``spatial..., reduction...``: when the innermost spatial axis
    is unit-stride in every buffer it touches (true for NN matmul after FoldConstant
    pre-transposes weights, NCHW conv2d, elementwise ops), split it by one or two SIMD
    vectors, move the reduction loops outside it and vectorize it; for reductions, also keep
    up to four rows of the next spatial axis in registers (unrolled). The outer spatial loops
    are fused and run in parallel. Dynamic shapes, other layouts and anything the schedule
    primitives reject keep TVM's plain loops.
    """

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        vector_bits = llvm_get_vector_width(target)
        if vector_bits <= 0:
            vector_bits = 128
        try:
            infos = normalize_prim_func(sch)
            if not infos:
                return None
            scheduled = [_schedule_cpu_block(sch, info, vector_bits) for info in infos]
        except ScheduleError:
            return None
        return sch if any(scheduled) else None


def _schedule_cpu_block(sch: s_tir.Schedule, info, vector_bits: int) -> bool:
    """Apply CPUDefaultSchedule to one block; False if it does not fit."""
    kinds, extents = info.dom_kind(), info.dom()
    n_spatial = len(kinds) - len(kinds.lstrip("S"))
    if "O" in kinds or "S" in kinds[n_spatial:] or n_spatial == 0:
        return False
    if not all(isinstance(extent, int) for extent in extents):
        return False
    block = sch.get(info.block_rv)
    if len(block.writes) != 1:
        return False
    loops = info.get_loops()
    spatial, reduction = list(loops[:n_spatial]), list(loops[n_spatial:])

    lanes = vector_bits // max(block.writes[0].source.dtype.bits, 8)
    inner_extent = extents[n_spatial - 1]
    if reduction and inner_extent % (2 * lanes) == 0:
        lanes *= 2  # two vector accumulators per row hide FMA latency
    vector = None
    inner_var = block.iter_vars[n_spatial - 1].var
    if lanes > 1 and inner_extent % lanes == 0 and _is_unit_stride(block, inner_var):
        spatial[-1], vector = sch.split(spatial[-1], [None, lanes])
    rows = None
    if reduction and vector is not None and n_spatial >= 2:
        factor = next((f for f in (4, 2) if extents[n_spatial - 2] % f == 0), None)
        if factor is not None:
            spatial[-2], rows = sch.split(spatial[-2], [None, factor])

    if reduction:
        sch.reorder(*spatial, *reduction, *(loop for loop in (rows, vector) if loop is not None))
    if vector is not None:
        sch.vectorize(vector)
    if math.prod(extents) >= _MIN_PARALLEL_WORK:
        outer = spatial[:-1][:2] or spatial
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    if reduction:
        if rows is not None:
            sch.unroll(rows)
        # Only after vectorize/parallel: those need the block to still own its init.
        sch.decompose_reduction(info.block_rv, reduction[0])
    return True


def _is_unit_stride(block: s_tir.SBlock, var: tirx.Var) -> bool:
    """Whether ``var`` indexes only the last dimension, with stride 0 or 1, in all accesses."""
    for region in (*block.reads, *block.writes):
        ranges = region.region
        for axis, dim in enumerate(ranges):
            coeffs = detect_linear_equation(dim.min, [var])
            if len(coeffs) != 2 or not isinstance(coeffs[0], tirx.IntImm):
                return False
            stride = int(coeffs[0])
            if stride != 0 and (axis != len(ranges) - 1 or stride != 1):
                return False
    return True
