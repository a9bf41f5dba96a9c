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

from tvmq.kernels._tiling import DEFAULT_SCHEDULE_ROWS, simd_bits, target_cores

__all__ = ["CPUDefaultSchedule"]

# Blocks with fewer iterations than this run on one thread: waking the pool costs more.
_MIN_PARALLEL_WORK = 1 << 14
# Narrowest vector step 4 uses when the full SIMD width does not divide the innermost axis.
_MIN_VECTOR_BITS = 128
# Bytes a side of the tiles of a copy across layouts (_tile_transpose): 8 float32.
_TRANSPOSE_TILE_BYTES = 32
# A plane (the two axes a copy across layouts swaps) of at most this many bytes stays in L1
# untiled: MiniLM's per-head 128 x 32 float32 transposes ran 1.3x slower in tiles.
_TRANSPOSE_IN_CACHE_BYTES = 32 << 10
# SIMD vectors of one output row kept in registers by a one-row reduction (of 32 on AVX-512).
_ROW_VECTORS = 8
# Rows of a reduction's output that step 4 keeps in registers (unrolled) per vector of columns.
_ROWS = DEFAULT_SCHEDULE_ROWS


class CPUDefaultSchedule(dl.ScheduleRule):
    """A cheap parallel + SIMD schedule for every static-shape CPU kernel.

    1. Elementwise chains become one loop nest: injective blocks are inlined into injective
       consumers, or into a lone reduction that reads each of their elements once (the
       cast before a row sum; never into a matmul, which would recompute them per output
       column), and trailing copies (reshape, broadcast) into their producer.
    2. A reduction of a whole tensor to one value (the run-time range of a dynamically
       quantized activation) keeps ``4 x SIMD`` partial results in vector registers
       (``rfactor``) and combines them at the end.
    3. Row-wise kernels — reductions and elementwise blocks sharing leading spatial axes
       (softmax, layer norm), or a lone reduction over the innermost axis (the per-row range
       of a dynamically quantized activation) — run each row to the end before the next: the
       rows in parallel, every block computed at the row, elementwise inner loops
       vectorized, and each reduction over the innermost axis split into SIMD-wide partial
       results.
    4. Anything else, block by block, in loop order ``spatial..., reduction...``: when the
       innermost spatial axis is unit-stride in every buffer it touches (true for NN matmul
       after FoldConstant pre-transposes weights, NCHW conv2d, elementwise ops, NHWC pooling
       and NHWC elementwise epilogues), split it by one or two SIMD vectors (or the widest
       power-of-two vector of at least 128 bits that divides it: 16 channels of uint8), move
       the reduction loops outside it and vectorize it; for reductions, also keep up to four
       rows of the next spatial axis in registers (unrolled). The outer spatial loops are
       fused and run in parallel. A reduction with one output row keeps that row in
       registers (:func:`_schedule_one_row`); over one input's rows (a global pool) on a
       target of several cores, each core takes a contiguous run of the rows
       (:func:`_split_pooling`). A copy across layouts (written along its innermost axis,
       read along another: NHWC -> NCHW) runs in small square tiles of the two axes
       (:func:`_tile_transpose`); plain copies (slices, reshapes) are inlined into it.

    Dynamic shapes, other layouts and anything the schedule primitives reject keep TVM's
    plain loops (a step that fails falls back to the next).
    """

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        vector_bits = simd_bits(target)
        if vector_bits <= 0:
            vector_bits = 128
        lanes = vector_bits // 32
        for whole_kernel in (True, False):
            sch = s_tir.Schedule(func)
            try:
                if not normalize_prim_func(sch):
                    return None
                _inline_elementwise(sch)
                infos = normalize_prim_func(sch)
                if whole_kernel:
                    if (
                        (len(infos) == 1 and _schedule_full_reduction(sch, infos[0], lanes))
                        or _schedule_one_row_reductions(sch, infos, lanes)
                        or _schedule_rowwise(sch, infos, lanes)
                    ):
                        return sch
                    continue
                if _pad_ragged_reductions(sch, infos, vector_bits):
                    infos = normalize_prim_func(sch)
                cores = target_cores(target)
                scheduled = [_schedule_cpu_block(sch, info, vector_bits, cores) for info in infos]
            except ScheduleError:
                continue
            return sch if any(scheduled) else None
        return None


def _inline_elementwise(sch: s_tir.Schedule) -> None:
    """Step 1 of :class:`CPUDefaultSchedule` (blocks that refuse stay as they are)."""

    def first_inlined(candidates, primitive) -> bool:
        for block in candidates:
            try:
                primitive(block)
            except ScheduleError:
                continue
            return True
        return False

    def injective_producers():
        infos = normalize_prim_func(sch) or []
        injective = {sch.get(i.block_rv).name_hint for i in infos if i.is_injective()}
        for info in infos[:-1]:
            consumers = sch.get_consumers(info.block_rv)
            if not info.is_injective():
                continue
            if len(consumers) == 1 and _is_padding_of_a_window(sch, info.block_rv, consumers[0]):
                yield info.block_rv  # the window's taps are a select each, in any order
                continue
            if not _is_copy(sch.get(info.block_rv)) and any(
                _reads_transposed(sch, c, info.block_rv) for c in consumers
            ):
                continue
            if all(sch.get(c).name_hint in injective for c in consumers) or (
                len(consumers) == 1 and _reads_each_once(sch, consumers[0], info.block_rv)
            ):
                yield info.block_rv

    def trailing_copies():
        for info in (normalize_prim_func(sch) or [])[1:]:
            producers = sch.get_producers(info.block_rv)
            if info.is_injective() and not any(
                _reads_transposed(sch, info.block_rv, p) for p in producers
            ):
                yield info.block_rv

    while first_inlined(injective_producers(), sch.compute_inline):
        pass
    while first_inlined(trailing_copies(), sch.reverse_compute_inline):
        pass


def _reads_transposed(sch: s_tir.Schedule, consumer, producer) -> bool:
    """Whether ``consumer`` reads ``producer``'s result across its layout: its innermost
    iteration variable indexes another dimension of that buffer than the last (an NCHW ->
    NHWC ``permute_dims``). Merged, the two would run in the consumer's order, where the
    producer's arithmetic cannot vectorize (the quantize + pad + transpose of a CNN's input
    image: 15x slower than the quantize alone); apart, the producer vectorizes and the
    transpose only moves bytes."""
    block = sch.get(consumer)
    if not block.iter_vars:
        return False
    inner = block.iter_vars[-1].var
    written = sch.get(producer).writes[0].source
    for read in block.reads:
        if not read.source.same_as(written) or not read.region:
            continue
        uses = [
            any(v.same_as(inner) for v in tvm.tirx.analysis.undefined_vars(dim.min, []))
            for dim in read.region
        ]
        if any(uses[:-1]) and not uses[-1]:
            return True
    return False


def _is_copy(block: s_tir.SBlock) -> bool:
    """Whether ``block`` only copies: each element a load of another buffer, no arithmetic (a
    strided slice, a reshape). Inlined into a consumer that reads it across its layout it costs
    nothing (there is no arithmetic to keep vectorized), and it saves a pass through memory."""
    body = block.body
    return isinstance(body, tirx.BufferStore) and isinstance(body.value, tvm.ir.expr.TensorLoad)


def _is_padding_of_a_window(sch: s_tir.Schedule, producer, consumer) -> bool:
    """Whether ``producer`` only pads (each element a load of another buffer or a constant:
    ``if_then_else(inside, x[...], c)``) the one buffer a window reduction reads (a pooling:
    ``consumer`` reads nothing else). Inlined, each window tap is a select on its indices
    instead of a padded copy of the image going through memory first: ResNet's 3x3 / 2
    max-pool over 112x112x64 float32 wrote and re-read 3.3 MB (0.9 ms in situ)."""
    written = sch.get(producer).writes[0].source
    block = sch.get(consumer)
    if any(
        not r.source.same_as(written)
        for r in block.reads
        if not r.source.same_as(block.writes[0].source)
    ):
        return False
    body = sch.get(producer).body
    if not isinstance(body, tirx.BufferStore):
        return False
    value = body.value
    op = getattr(value, "op", None)
    if isinstance(op, tvm.ir.Op) and op.name.endswith(".if_then_else"):
        branches = value.args[1:]
    elif isinstance(value, tirx.Select):
        branches = (value.true_value, value.false_value)
    else:
        return False
    return all(isinstance(b, tvm.ir.expr.TensorLoad | tvm.ir.expr.Constant) for b in branches)


def _reads_each_once(sch: s_tir.Schedule, consumer, producer) -> bool:
    """Whether ``consumer`` reads each element ``producer`` writes once: every index of the
    read uses a different one of its iteration variables, and all of them are used (a row
    sum of a cast, not a matmul, which reads each input element once per output column)."""
    block = sch.get(consumer)
    written = sch.get(producer).writes[0].source
    reads = [r for r in block.reads if r.source.same_as(written)]
    if len(reads) != 1:
        return False
    used = []
    for dim in reads[0].region:
        if not isinstance(dim.extent, tirx.IntImm) or int(dim.extent) != 1:
            return False
        if isinstance(dim.min, tirx.IntImm):  # a unit axis
            continue
        hits = [v.var for v in block.iter_vars if v.var.same_as(dim.min)]
        if len(hits) != 1:
            return False
        used.append(hits[0])
    distinct = all(not a.same_as(b) for i, a in enumerate(used) for b in used[i + 1 :])
    return distinct and len(used) == len(block.iter_vars)


def _leading_spatial(kinds: str) -> int:
    return len(kinds) - len(kinds.lstrip("S"))


def _schedule_full_reduction(sch: s_tir.Schedule, info, lanes: int) -> bool:
    """Step 2 of :class:`CPUDefaultSchedule`; False (untouched) if ``info`` is not one."""
    kinds, extents = info.dom_kind(), info.dom()
    if "R" not in kinds or "O" in kinds or not all(isinstance(e, int) for e in extents):
        return False
    if any(kind == "S" and extent != 1 for kind, extent in zip(kinds, extents, strict=True)):
        return False
    loops = [loop for loop, kind in zip(info.get_loops(), kinds, strict=True) if kind == "R"]
    # four vector accumulators hide the min / max / add latency; fewer where they do not divide
    reduced = math.prod(e for k, e in zip(kinds, extents, strict=True) if k == "R")
    width = next((w * lanes for w in (4, 2, 1) if reduced % (w * lanes) == 0), None)
    if width is None:
        return False
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    _, partial = sch.split(fused, [None, width])
    rf = sch.rfactor(partial, factor_axis=0)
    rf_loops = sch.get_loops(rf)
    sch.vectorize(rf_loops[-1])
    sch.decompose_reduction(rf, rf_loops[-2])
    return True


def _schedule_one_row_reductions(sch: s_tir.Schedule, infos, lanes: int) -> bool:
    """Step 2 for a kernel of several reductions of one row each, then elementwise blocks on
    their results (the range of a batch-1 activation, ``row_qparams_u8``: min, max, then
    scale and zero point): each reduction with SIMD partial results, the rest as they are.
    Step 3 does not take it: the unit row loop is gone, so the blocks' rows differ."""
    reductions = [i for i in infos if not i.is_injective()]
    if len(reductions) < 2 or not all(i.is_injective() for i in infos[len(reductions) :]):
        return False
    for info in reductions:
        kinds, extents = info.dom_kind(), info.dom()
        if (
            not all(isinstance(e, int) for e in extents)
            or math.prod(e for k, e in zip(kinds, extents, strict=True) if k == "S") != 1
        ):
            return False
        if not _is_row_reduction(sch.get(info.block_rv), kinds):
            return False
    return all(_schedule_full_reduction(sch, info, lanes) for info in reductions)


def _schedule_rowwise(sch: s_tir.Schedule, infos, lanes: int) -> bool:
    """Step 3 of :class:`CPUDefaultSchedule`; False (untouched) if the kernel is not one."""
    if all(i.is_injective() for i in infos):
        return False
    # Several blocks end in an elementwise one (softmax, layer norm); or one row reduction
    # (the per-row range of a dynamically quantized activation).
    if not infos[-1].is_injective() and (
        len(infos) > 1 or not _is_row_reduction(sch.get(infos[0].block_rv), infos[0].dom_kind())
    ):
        return False
    if any("O" in i.dom_kind() or not all(isinstance(e, int) for e in i.dom()) for i in infos):
        return False
    n_rows = min(_leading_spatial(i.dom_kind()) for i in infos)
    rows = infos[-1].dom()[:n_rows]
    # Every block walks the same rows, and the last one has an axis inside them to vectorize.
    if n_rows == 0 or n_rows == len(infos[-1].dom()):
        return False
    if any(i.dom()[:n_rows] != rows for i in infos):
        return False
    # Reductions over the innermost axis: SIMD-wide partial results, contiguous per row.
    partials = []
    for info in infos:
        kinds, extents = info.dom_kind(), info.dom()
        if info.is_injective() or kinds.count("R") != 1 or not kinds.endswith("R"):
            continue
        if extents[-1] % lanes or extents[-1] < 2 * lanes:
            continue
        _, lane = sch.split(sch.get_loops(info.block_rv)[-1], [None, lanes])
        out_ndim = len(sch.get(info.block_rv).writes[0].region)
        partials.append(sch.rfactor(lane, factor_axis=out_ndim))
    last = infos[-1].block_rv
    row_loops = sch.get_loops(last)[:n_rows]
    row = sch.fuse(*row_loops) if n_rows > 1 else row_loops[0]
    if max(math.prod(i.dom()) for i in infos) >= _MIN_PARALLEL_WORK:
        sch.parallel(row)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    for block in reversed(blocks[:-1]):
        sch.compute_at(block, row, preserve_unit_loops=True)
    partial_names = {sch.get(b).name_hint for b in partials}
    injective_names = {sch.get(i.block_rv).name_hint for i in infos if i.is_injective()}
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        name, loops = sch.get(block).name_hint, sch.get_loops(block)
        if name in partial_names:  # loops: row, lane, unit..., steps
            sch.reorder(loops[-1], loops[1])
            loops = sch.get_loops(block)
            sch.vectorize(loops[-1])
            sch.decompose_reduction(block, loops[1])
        elif name in injective_names and len(loops) > 1:
            extent = sch.get(loops[-1]).extent
            if isinstance(extent, tirx.IntImm) and int(extent) % lanes == 0:
                _, vector = sch.split(loops[-1], [None, lanes])
                sch.vectorize(vector)
    return True


def _is_row_reduction(block: s_tir.SBlock, kinds: str) -> bool:
    """One read, reduced over one axis that is its innermost, unit-stride one.

    Not a matmul (two reads), nor a pooling window (several reduction axes, or one walking
    the rows of an NHWC image): those go to step 4, which vectorizes their spatial axis.
    """
    if len(block.reads) != 1 or kinds.count("R") != 1 or not kinds.endswith("R"):
        return False
    reduced = block.iter_vars[len(kinds) - 1].var
    ranges = block.reads[0].region
    coeffs = detect_linear_equation(ranges[-1].min, [reduced])
    return len(coeffs) == 2 and isinstance(coeffs[0], tirx.IntImm) and int(coeffs[0]) == 1


def _schedule_cpu_block(sch: s_tir.Schedule, info, vector_bits: int, cores: int = 1) -> bool:
    """Apply CPUDefaultSchedule to one block (for a target of ``cores`` cores); False if it
    does not fit."""
    kinds, extents = info.dom_kind(), info.dom()
    n_spatial = _leading_spatial(kinds)
    if "O" in kinds or "S" in kinds[n_spatial:] or n_spatial == 0:
        return False
    if not all(isinstance(extent, int) for extent in extents):
        return False
    block = sch.get(info.block_rv)
    if len(block.writes) != 1:
        return False
    loops = info.get_loops()
    spatial, reduction = list(loops[:n_spatial]), list(loops[n_spatial:])
    bits = max(block.writes[0].source.dtype.bits, 8)
    if not reduction and _tile_transpose(sch, info, spatial, extents, bits):
        return True

    inner_var = block.iter_vars[n_spatial - 1].var
    if (
        reduction
        and math.prod(extents[: n_spatial - 1]) == 1
        and vector_bits // bits > 1
        and _is_unit_stride(block, inner_var)
    ):
        if not _split_pooling(sch, info, reduction, vector_bits // bits, cores):
            extent = extents[n_spatial - 1]
            parallel = math.prod(extents) >= _MIN_PARALLEL_WORK
            _schedule_one_row(
                sch, info.block_rv, spatial[-1], reduction, vector_bits // bits, extent, parallel
            )
        return True
    lanes = vector_bits // bits
    inner_extent = extents[n_spatial - 1]
    if reduction and inner_extent % (2 * lanes) == 0:
        lanes *= 2  # two vector accumulators per row hide FMA latency
    while lanes > 1 and inner_extent % lanes:
        lanes //= 2  # a narrower vector (e.g. 16 or 32 channels of uint8 in NHWC)
    if lanes * bits < _MIN_VECTOR_BITS:
        lanes = 1
    vector = None
    if lanes > 1 and inner_extent % lanes == 0 and _is_unit_stride(block, inner_var):
        spatial[-1], vector = sch.split(spatial[-1], [None, lanes])
    rows = None
    if reduction and vector is not None and n_spatial >= 2:
        factor = next((f for f in (_ROWS, 2) if extents[n_spatial - 2] % f == 0), None)
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


def _tile_transpose(sch: s_tir.Schedule, info, spatial: list, extents: list, bits: int) -> bool:
    """Tile a copy across layouts: a block that writes along its innermost axis but reads
    across it (an NHWC -> NCHW ``permute_dims``; a detection head's flatten + concat of
    channels-last maps) runs in ``t x t`` tiles of that axis and of the last one every read
    walks with unit stride (``t`` elements of :data:`_TRANSPOSE_TILE_BYTES`). Each tile then
    reads ``t`` runs of ``t`` contiguous elements and writes ``t`` such runs, all in cache;
    in plain loop order every element read was on another cache line (the YOLO-style neck's
    head concat, 255 x 2100 float32: 1.0 ms -> 0.25 ms with its slices inlined, 1 thread,
    AMD Zen 3). A plane that fits in L1 (:data:`_TRANSPOSE_IN_CACHE_BYTES`) stays untiled.
    ``bits``: the width of an element written (at least 8). False (nothing changed) for any
    other block."""
    block = sch.get(info.block_rv)
    if len(spatial) < 2:
        return False
    inner = block.iter_vars[len(spatial) - 1].var
    if _is_unit_stride(block, inner) or not _is_unit_stride(block, inner, block.writes):
        return False
    t = max(4, _TRANSPOSE_TILE_BYTES * 8 // bits)
    across = next(
        (
            i
            for i in reversed(range(len(spatial) - 1))
            if extents[i] >= t and _is_unit_stride(block, block.iter_vars[i].var, block.reads)
        ),
        None,
    )
    if across is None or extents[len(spatial) - 1] < t:
        return False
    if extents[across] * extents[len(spatial) - 1] * bits // 8 <= _TRANSPOSE_IN_CACHE_BYTES:
        return False  # the plane fits in L1: untiled, every line read stays there
    rows, row = sch.split(spatial[across], [None, t])
    columns, column = sch.split(spatial[-1], [None, t])
    others = [loop for i, loop in enumerate(spatial[:-1]) if i != across]
    sch.reorder(*others, rows, columns, row, column)
    if math.prod(extents) >= _MIN_PARALLEL_WORK:
        sch.parallel(sch.fuse(*others, rows) if others else rows)
    return True


def _pad_ragged_reductions(sch: s_tir.Schedule, infos, vector_bits: int) -> bool:
    """Pad the innermost spatial axis of each reduction that step 4 would leave scalar (an
    extent no vector of at least 128 bits divides, e.g. attention scores over 197 keys) up
    to a multiple of the SIMD width, and an odd row axis (197 queries) to a multiple of
    :data:`_ROWS`, so that step 4 keeps several rows of accumulators in registers
    (``pad_einsum``: zero-padded copies of the operands those axes index, the result written
    back without the padding). ViT-tiny's Q @ K^T (3 x 197 x 197 x 64, 1 thread): 3.6 ms
    scalar, 0.25 ms with its columns padded, 0.13 ms with its rows padded too. Whether any
    block was padded."""
    padded = False
    for info in infos:
        kinds, extents = info.dom_kind(), info.dom()
        n_spatial = _leading_spatial(kinds)
        if n_spatial < 2 or "R" not in kinds[n_spatial:] or "O" in kinds:
            continue
        if not all(isinstance(e, int) for e in extents) or math.prod(extents[: n_spatial - 1]) == 1:
            continue  # a one-row reduction has its own tail handling (_schedule_one_row)
        block = sch.get(info.block_rv)
        if len(block.writes) != 1:
            continue
        bits = max(block.writes[0].source.dtype.bits, 8)
        lanes, inner = vector_bits // bits, extents[n_spatial - 1]
        widths = [
            lanes >> i for i in range(lanes.bit_length()) if (lanes >> i) * bits >= _MIN_VECTOR_BITS
        ]
        if not _is_unit_stride(block, block.iter_vars[n_spatial - 1].var):
            continue
        padding = [1] * len(extents)
        ragged = inner >= 2 * lanes and not any(inner % w == 0 for w in widths)
        if ragged:
            padding[n_spatial - 1] = lanes
        vectorized = ragged or any(inner % w == 0 for w in widths)
        rows = extents[n_spatial - 2]
        if vectorized and rows >= 8 and rows % 2:
            padding[n_spatial - 2] = _ROWS  # step 4 keeps _ROWS rows in registers
        if padding == [1] * len(extents):
            continue  # step 4 vectorizes it as it is
        try:
            sch.pad_einsum(info.block_rv, padding)
        except ScheduleError:
            continue
        padded = True
    return padded


def _split_pooling(sch: s_tir.Schedule, info, reduction: list, lanes: int, cores: int) -> bool:
    """A one-row reduction of one input over its rows (a global average pool, the squeeze of
    a squeeze-excite block: ``(1, H, W, C) -> (1, 1, 1, C)``) on a target of several cores:
    each core reduces one contiguous run of the rows (``rfactor``, its channels in registers
    as in :func:`_schedule_one_row`), then one loop adds the ``cores`` partial results.

    Split by channels instead, every core would read part of every row, half of them from the
    other core's cache, where the kernel before (pixel-major, :mod:`tvmq.kernels.cpu_float_conv`)
    left them: EfficientNet-B0's 14x14x672 squeeze (int8 model, in sequence) took 6.2 us on one
    thread and 22.3 on two; 112x112x32, one channel tile, did not run in parallel at all
    (23.7 us on one thread, 53.4 on two). False (untouched) where this does not apply: one
    core, a second input (a vector-matrix product, whose weight no kernel wrote), too little
    work, or rows the cores do not divide. The sums' order differs from one thread's (float
    rounding)."""
    block = sch.get(info.block_rv)
    written = block.writes[0].source
    inputs = [r for r in block.reads if not r.source.same_as(written)]
    kinds, extents = info.dom_kind(), info.dom()
    rows = math.prod(e for k, e in zip(kinds, extents, strict=True) if k == "R")
    if cores < 2 or len(inputs) != 1 or rows % cores or math.prod(extents) < _MIN_PARALLEL_WORK:
        return False
    n_reduced = len(reduction)
    extent = extents[len(kinds) - n_reduced - 1]  # the row's (channels)
    if extents[len(kinds) - n_reduced] % cores:  # split the rows, not the first axis (H)
        reduction, n_reduced = [sch.fuse(*reduction)], 1
    chunk, _ = sch.split(reduction[0], [cores, None])
    partial = sch.rfactor(chunk, factor_axis=0)
    loops = sch.get_loops(partial)  # spatial..., chunk, rows...
    n_spatial = len(loops) - n_reduced - 1
    sch.reorder(loops[n_spatial], *loops[:n_spatial])
    loops = sch.get_loops(partial)  # chunk, spatial..., rows...
    sch.parallel(loops[0])
    rows_loops = loops[n_spatial + 1 :]
    _schedule_one_row(sch, partial, loops[n_spatial], rows_loops, lanes, extent, parallel=False)
    # the sum of the partial results: channels vectorized, the chunks outside them
    loops = sch.get_loops(info.block_rv)  # spatial..., chunk
    sch.reorder(loops[-1], loops[-2])
    if extent % lanes == 0:
        _, vector = sch.split(sch.get_loops(info.block_rv)[-1], [None, lanes])
        sch.vectorize(vector)
    sch.decompose_reduction(info.block_rv, sch.get_loops(info.block_rv)[n_spatial - 1])
    return True


def _schedule_one_row(
    sch: s_tir.Schedule,
    block,
    inner,
    reduction: list,
    lanes: int,
    extent: int,
    parallel: bool = True,
) -> None:
    """A reduction with one output row (a batch-1 matmul, a vector-matrix product): up to
    :data:`_ROW_VECTORS` SIMD vectors of the row stay in registers (a local accumulator)
    over the whole reduction, each step loading one contiguous slice of the weight row.

    The reduction order of each output is unchanged (bit-identical results); the step 4
    tile instead kept two vectors per pass, in memory, and read the input again per pass.
    """
    count = min(_ROW_VECTORS, -(-extent // lanes))
    outer, unrolled, vector = sch.split(inner, [None, count, lanes])
    accumulator = sch.cache_write(block, 0, "local")
    sch.reorder(outer, *reduction, unrolled, vector)
    sch.reverse_compute_at(accumulator, outer)
    sch.vectorize(vector)
    sch.unroll(unrolled)
    store = sch.get_loops(accumulator)[-1]
    if sch.get(store).extent.value % lanes == 0:
        _, store_vector = sch.split(store, [None, lanes])
        sch.vectorize(store_vector)
    if parallel and -(-extent // (count * lanes)) > 1:
        sch.parallel(outer)
    sch.decompose_reduction(block, reduction[0])


def _is_unit_stride(block: s_tir.SBlock, var: tirx.Var, regions=None) -> bool:
    """Whether ``var`` moves every access of ``block`` (or only its ``regions``) by 0 or 1
    element of its buffer's flat layout: it indexes the last dimension with stride 1, or a
    dimension that only unit dimensions follow (a squeeze-excite gate ``(1, C, 1, 1)`` read by
    an NHWC multiply)."""
    for region in (*block.reads, *block.writes) if regions is None else regions:
        shape = region.source.shape
        flat = 0
        for axis, dim in enumerate(region.region):
            coeffs = detect_linear_equation(dim.min, [var])
            if len(coeffs) != 2 or not isinstance(coeffs[0], tirx.IntImm):
                return False
            stride = int(coeffs[0])
            if stride == 0:
                continue  # any dimension sizes: a symbolic one is not read past
            inner = shape[axis + 1 :]
            if not all(isinstance(d, tirx.IntImm) for d in inner):
                return False
            flat += stride * math.prod(int(d) for d in inner)
        if flat not in (0, 1):
            return False
    return True
