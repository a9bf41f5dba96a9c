"""x86 int8 dense kernels: ``uint8 (M, K) x packed int8 weight -> int32 (M, N)`` with VNNI.

The weight is packed once at compile time by :func:`pack_weight_vnni` into
``[N/16, K/4, 16, 4]`` so that every ``vpdpbusd`` reads one contiguous 64-byte tile
(the upstream schedules that tensorize against a plain ``[N, K]`` weight give wrong
answers). :func:`int8_dense_vnni` builds the scheduled TIR kernel:

- the reduction is tensorized with :data:`tvmq.kernels.vnni_intrin.VNNI_DOT_16X4`;
- each parallel task owns an ``mr x (nr * 16)`` output tile kept in a small accumulator
  (``mr * nr <= 24`` zmm registers, the rest left for weights and the broadcast) and
  walks the whole K: the weight panel ``(nr * 16) x K`` streams once per task, the
  activation rows are reused from cache across tiles;
- tiles run ``parallel`` over (N tiles, M tiles), N outer, so tasks next to each other
  share activation rows; tiny problems stay serial (thread start-up costs more).

Shapes must already be padded: ``K % 4 == 0``, ``N % 16 == 0`` and ``M % mr == 0``
(:func:`choose_tiles` picks ``mr`` dividing ``M``, or says how far to pad ``M``).

An int8-dynamic layer's kernel (:class:`DynamicDequantize` with a :class:`RowQuantize`) reads
float32 rows instead: each row tile computes its rows' range, scale and zero point and
quantizes them into a scratch block (``mr x K`` bytes) once, then walks its column tiles.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import ScheduleError

from tvmq.kernels._tiling import (
    HALF_WIDTH_ACCUMULATORS,
    half_width_avx512,
    pack_int8_tiles,
    round_up,
    target_cores,
)
from tvmq.kernels.dynamic_quant import quantized_rows
from tvmq.kernels.fast_math import activation_f32
from tvmq.kernels.vnni_intrin import LANES, REDUCE, register_vnni_intrin

KERNEL_ATTR = "tvmq.kernel"
"""PrimFunc attribute naming which tvmq kernel a function is (``"int8_dense_vnni"``)."""

_MAX_ACCUMULATORS = 24
# Below this many multiply-adds a parallel launch costs more than it saves ...
_PARALLEL_MIN_MACS = 1 << 20
# ... unless the weight is this large (bytes): a product of few rows streams its weight from
# memory at a few bytes a cycle (ResNet-18's 1x512x1008 classifier: 19.8 us on one thread).
_PARALLEL_MIN_WEIGHT = 1 << 17


def runs_parallel(m: int, k: int, n: int) -> bool:
    """Whether the kernel of a static ``(m, k) x (k, n)`` product runs its tiles in parallel:
    enough multiply-adds, or a weight large enough that reading it dominates."""
    return m * n * k >= _PARALLEL_MIN_MACS or k * n >= _PARALLEL_MIN_WEIGHT


def padded_kn(k: int, n: int) -> tuple[int, int]:
    """``(K, N)`` rounded up to the packed tile (multiples of 4 and 16)."""
    return round_up(k, REDUCE), round_up(n, LANES)


def pack_weight_vnni(w: np.ndarray, k_padded: int | None = None) -> np.ndarray:
    """Pack an int8 ``(K, N)`` weight as ``[N/16, K/4, 16, 4]``, zero-padding N and K (to a
    multiple of 4, or to ``k_padded`` rows).

    ``packed[j, q, i, r] == w[4 * q + r, 16 * j + i]`` (zero outside ``w``).
    """
    if k_padded is not None and k_padded > w.shape[0]:
        w = np.concatenate([w, np.zeros((k_padded - w.shape[0], w.shape[1]), w.dtype)])
    return pack_int8_tiles(w, LANES, REDUCE)


@dataclass(frozen=True)
class ResidualAdd:
    """A layer's requantized result ``q`` joined to a residual input ``R`` of its shape (a
    ResNet block's skip connection) as ``LowerInt8``'s float integer add computes it::

        out = clamp(round((float32(q) - q_zero) * q_scale + (float32(r) - r_zero) * r_scale)
                    + zero_point, lo, hi)

    each operation rounded to float32 on its own, in that order (a zero ``*_zero`` is not
    subtracted), so the result is bit-identical to the separate ops. ``R`` (``r_dtype``, the
    kernel's output shape) is an extra argument after the multiplier; ``dtype`` the stored one.
    Fusing it saves the add's own pass: reading ``q`` and ``R`` back, writing the sum."""

    r_dtype: str
    q_zero: int
    q_scale: float
    r_zero: int
    r_scale: float
    dtype: str
    zero_point: int
    lo: int
    hi: int

    def value(self, q, r):
        """The stored value from ``q`` (the clamped requantize, float32 or int32) and ``R``'s
        element."""
        f32 = lambda v: tvm.tirx.const(v, "float32")  # noqa: E731
        fence = lambda v: tvm.tirx.call_llvm_pure_intrin(  # noqa: E731
            "float32", "llvm.arithmetic.fence", v
        )  # no FMA: each product is rounded before the sum, as in the separate ops
        if str(q.ty) == "int32":  # integers: the zero point comes off exactly before the cast
            a = (q - tvm.tirx.const(self.q_zero, "int32")) if self.q_zero else q
            a = a.astype("float32")
        else:
            a = q - f32(float(self.q_zero)) if self.q_zero else q
        b = r.astype("float32")
        b = b - f32(float(self.r_zero)) if self.r_zero else b
        total = fence(a * f32(self.q_scale)) + fence(b * f32(self.r_scale))
        if 255 * (abs(self.q_scale) + abs(self.r_scale)) < _INT32_SAFE / 2:
            stored = clamp_rounded(total, self.zero_point, self.lo, self.hi)
            return stored.astype(self.dtype)
        total = te.round(total) + f32(float(self.zero_point))
        return te.max(te.min(total, f32(float(self.hi))), f32(float(self.lo))).astype(self.dtype)


@dataclass(frozen=True)
class Requantize:
    """An int8 / uint8 result computed before the store (a layer's requantize epilogue):
    ``clamp(round(float32(v) * multiplier[j]) + zero_point, lo, hi)``, where ``v`` is the
    accumulator plus the offset, ``max(v, 0)`` with ``relu``. The same float32 operations in
    the same order as Relax's ``astype`` / ``multiply`` / ``quantize(scale=1)`` / ``clip``, so
    the result is bit-identical to running them as separate kernels; the int32 result never
    goes to memory. ``multiplier`` is an extra ``(n,)`` float32 argument. ``dtype`` float32 is
    a dequantize, ``float32(v) * multiplier`` (``zero_point``, ``lo``, ``hi`` unused).

    With an ``activation`` (one of :data:`~tvmq.kernels.fast_math.ACTIVATIONS`: a transformer
    FFN's GELU, EfficientNet's SiLU, MobileNetV3's hardswish), the kernel stores
    ``activation(float32(v) * multiplier)`` for a dequantize, computed as ``UseFastMath``'s
    kernel or the legalized ops compute it: the same bits, one kernel and one float32 pass
    over memory less. For an int8 / uint8 ``dtype`` the activation's result is quantized
    again, ``clamp(round(a * rescale) + zero_point, lo, hi)`` (``QuantizeByMultiply``'s
    multiply, then ``quantize(., 1, zero_point)``; the float kernels of
    :class:`~tvmq.passes.Int8AsFloat` take it, and on AMX targets the conv kernels for a
    hardswish, and a SiLU whose float32 result outgrows L2: on the VNNI kernels of Zen 4 the
    quantize after the activation cost more than the pass it saves, and so did a SiLU's over
    a tensor in cache on an AMX Xeon).

    With ``stored_as`` ``"float32"`` the kernel stores the clamped integer as float32 (its
    readers convert it to float32 anyway: the next conv of :class:`~tvmq.passes.Int8AsFloat`),
    with ``"int16"`` as int16 (the next conv's int16 kernel, on AVX2), so no conversion
    kernel, nor the int8 tensor, goes between the layers.

    With ``int_rounding`` the product is rounded by the float -> int32 conversion itself
    (``llvm.lrint``: ``vcvtps2dq``, round half to even like the float32 round) and offset and
    clamped in int32: two vector ops less an output (AMX int8 kernels are bound by their
    epilogue: ResNet-50 ~3% faster) and the same bits, as long as ``|float32(v) * multiplier|
    < 2**31 - 256``, which the caller proves from the weights (:func:`with_int_rounding`)."""

    dtype: str  # "uint8", "int8" or "float32"
    zero_point: int
    lo: int
    hi: int
    relu: bool = False
    residual: ResidualAdd | None = None  # then the kernel stores residual.dtype
    int_rounding: bool = False
    activation: str = ""  # of the dequantized float32 value (fast_math.activation_f32)
    rescale: float = 1.0  # an activation's result times this is rounded (an int8 dtype)
    stored_as: str = ""  # "float32" / "int16": the clamped integer stored as that dtype

    @property
    def out_dtype(self) -> str:
        """The dtype the kernel stores."""
        if self.stored_as:
            return self.stored_as
        return self.residual.dtype if self.residual is not None else self.dtype

    @property
    def kernel_suffix(self) -> str:
        """What a kernel storing this says in its name."""
        activation = f"_{self.activation}" if self.activation else ""
        if self.dtype == "float32":
            return "_dequantize" + activation
        stored = {"": "", "float32": "_as_float"}.get(self.stored_as, f"_as_{self.stored_as}")
        return activation + "_requantize" + stored


@dataclass(frozen=True)
class RowQuantize:
    """The kernel quantizes its own float32 input ``X (m, k)``, each row with its own range
    (``QuantizeDynamic``'s ``row_qparams_u8`` and quantize, ``eps`` bounding the scales), into
    a scratch row block: see :func:`tvmq.kernels.dynamic_quant.quantized_rows`."""

    k: int  # X's columns (the kernel's K is padded to a multiple of 4)
    eps: float


@dataclass(frozen=True)
class DynamicDequantize:
    """A dynamically quantized layer's float32 result computed before the store
    (``QuantizeDynamic``'s dequantize, then the layer's bias and ReLU):
    ``y = float32(v - int32(params[i, 1]) * colsum[j]) * (params[i, 0] * scale[j])``,
    ``+ bias[j]`` with ``bias``, ``max(y, 0)`` with ``relu`` (or its ``activation``, see
    :class:`Requantize`), where ``params`` holds each row's scale and zero point
    (``row_qparams_u8``). Extra ``(n,)`` arguments ``colsum`` int32,
    ``scale`` float32 [, ``bias`` float32], then ``params (m, 2)`` float32. The same float32
    operations in the same order as the Relax ops: bit-identical.

    With ``quantize`` the kernel takes the float32 rows instead of ``X`` and computes each
    row's params and uint8 bytes itself (no ``params`` argument): one kernel per layer."""

    bias: bool = False
    relu: bool = False
    quantize: RowQuantize | None = None
    activation: str = ""  # of the result, after the bias (fast_math.activation_f32)

    @property
    def dtype(self) -> str:
        return "float32"

    @property
    def kernel_suffix(self) -> str:
        """What a kernel storing this says in its name."""
        return "_dynamic" + (f"_{self.activation}" if self.activation else "")


@dataclass(frozen=True)
class DenseTiles:
    """Register tile of the dense kernel: ``mr`` rows x ``nr`` 16-lane vectors."""

    mr: int
    nr: int
    m_padded: int


SHORT_K = 80
"""Reduction length (padded K) at or below which a product takes the 14-accumulator tile on
any AVX-512 CPU (see :func:`choose_tiles`)."""


def choose_tiles(
    m: int, n_padded: int, half_width: bool | None = None, k: int | None = None
) -> DenseTiles:
    """Pick the register tile for an ``(m, n_padded)`` output.

    ``mr`` is ``m`` itself when ``m <= 8``, else a divisor of ``m`` in 4..8; when there is
    none, ``m`` is padded up to a multiple of 8 (``m_padded``). ``nr`` divides
    ``n_padded / 16`` and keeps ``mr * nr`` within the accumulator budget; of the divisors,
    the one whose tile holds the most accumulators, the largest of those.

    With ``half_width`` (default: whether the current target is a
    :func:`~tvmq.kernels._tiling.half_width_avx512` CPU, AMD Zen 4), ``mr`` is a divisor in
    4..7 (8 only where it is ``m``: a GEMV's one tile) and the tile at most 14
    accumulators: there tiles of 16 or more ran 3-30% slower than 7x2 / 4x3 ones (1 thread,
    warm; ResNet-50's 3136x64x256 291 -> 436 GOP/s at 7x2, MiniLM's 128x768x3072 427 -> 458
    at 4x3). So does a product of ``k <=`` :data:`SHORT_K` on any AVX-512 CPU: with so few
    steps per tile the store (an activation's polynomial in it) weighs more than the loads
    a larger tile saves (EfficientNet-B0 int8 on an Intel Xeon, each layer in the model, 1
    thread: 12544x28x32 + SiLU 200 -> 172 us, 3136x24x144 + SiLU 209 -> 189, 196x80x480 +
    SiLU 63 -> 60).
    """
    if half_width is None:
        half_width = half_width_avx512() or (k is not None and k <= SHORT_K)
    top, budget = (7, HALF_WIDTH_ACCUMULATORS) if half_width else (8, _MAX_ACCUMULATORS)
    divisors = [d for d in range(top, 3, -1) if m % d == 0] or [top]
    rows = [m] if m <= 8 else divisors
    n_tiles = n_padded // LANES

    def columns(mr: int) -> int:
        prefs = (3, 4, 2, 1) if mr >= 6 else (4, 3, 2, 1)
        return next(r for r in prefs if n_tiles % r == 0 and mr * r <= budget)

    # The most accumulators, then the most rows: 4x3 over 7x1 where N / 16 is odd
    # (MobileNetV2's 144 channels; 2 threads 52 -> 39 us on its 3136x24x144 layer).
    mr = max(rows, key=lambda r: (r * columns(r), r))
    return DenseTiles(mr, columns(mr), round_up(m, mr))


def quantize_pays(m: int, k: int, n: int) -> bool:
    """Whether the kernel of a padded ``(m, k) x (k, n)`` product should quantize its own rows
    (:class:`RowQuantize`): such a kernel runs its row tiles in parallel and quantizes each
    once, so it takes serial products (one thread anyway) and those with 8 row tiles or more,
    not a large GEMV, whose parallel tasks are column tiles."""
    return not runs_parallel(m, k, n) or m // choose_tiles(m, n, k=k).mr >= 8


def symbolic_rows_tiles(n_padded: int) -> DenseTiles:
    """The tile for a symbolic row count: 8 rows (M padded at run time to a multiple of 8)."""
    return choose_tiles(8, n_padded, half_width=False)


def int8_dense_vnni_rows(
    k: int,
    n: int,
    *,
    with_offset: bool = False,
    requantize: Requantize | None = None,
    x_dtype: str = "uint8",
) -> tvm.tirx.PrimFunc:
    """:func:`int8_dense_vnni` for any row count: ``M = 8 * mo`` with ``mo`` a run-time scalar.

    The last input (before the output) is the int64 ``mo``, which Relax passes as a
    ``prim_value``; the caller pads its rows to a multiple of 8. Same register tile,
    tensorization and parallel tiles as the static kernel, so a symbolic batch / sequence
    costs only that padding.
    """
    mo = tvm.tirx.Var("mo", "int64")
    tiles = symbolic_rows_tiles(n)
    return int8_dense_vnni(
        mo * 8, k, n, with_offset=with_offset, tiles=tiles, extra=[mo], requantize=requantize,
        x_dtype=x_dtype,
    )  # fmt: skip


def int8_dense_vnni(
    m,
    k: int,
    n: int,
    *,
    with_offset: bool = False,
    tiles: DenseTiles | None = None,
    extra=(),
    requantize: Requantize | DynamicDequantize | None = None,
    x_dtype: str = "uint8",
    n_out: int | None = None,
    m_out: int | None = None,
    im2col=None,
) -> tvm.tirx.PrimFunc:
    """Scheduled kernel ``C[m, n] = sum_k int32(X[m, k]) * int32(W[k, n]) (+ offset[n])``.

    Parameters
    ----------
    m, k, n : int
        Padded sizes: ``k % 4 == 0``, ``n % 16 == 0``, ``m`` a multiple of ``tiles.mr``.
    with_offset : bool
        Add a per-column int32 ``offset`` (an extra ``(n,)`` argument) to the result.
    tiles : DenseTiles, optional
        Defaults to :func:`choose_tiles` ``(m, n)``.
    requantize : Requantize or DynamicDequantize, optional
        Store ``C`` requantized to int8 / uint8 (a ``multiplier (n,) float32`` argument
        follows the offset; with a :class:`ResidualAdd`, ``residual (m, n)`` after it), or
        dynamically dequantized (its arguments follow the offset).
    x_dtype : {"uint8", "int8"}
        ``X``'s dtype. An int8 ``X`` is flipped to uint8 in registers (``x + 128``, see
        :data:`~tvmq.kernels.vnni_intrin.VNNI_DOT_16X4_S8`): the sums are those of ``X + 128``,
        which the caller's ``offset`` (``-128 * colsum(W)``) turns back into ``X @ W``
        (with ``im2col`` the image's bytes are flipped once, as they are copied).
    n_out : int, optional
        Store only the first ``n_out <= n`` columns (``C`` is ``(m, n_out)``): the padded
        columns are computed in registers but not stored, so no slice has to drop them.
    m_out : int, optional
        Store only the first ``m_out <= m`` rows (``C`` is ``(m_out, ...)``): the last row tile
        computes its padded rows in registers and stores only those below ``m_out``, so no
        slice has to drop them.
    im2col : tvmq.kernels.x86_int8_conv.Conv2DGeometry, optional
        ``X`` is a conv's NHWC image ``(N, H, W, C)`` (without its zero padding) instead of
        its im2col rows: each row tile copies its part of the image (its pixels' input
        strips, or its ``mr x k`` rows of the im2col matrix: :func:`_im2col_operand`) into a
        scratch block in cache before its column tiles (the row tiles are the parallel
        loop), zeros for the taps in the padding, so neither the ``m x k`` matrix nor a
        padded image goes through memory. Needs ``C % 16 == 0`` and ``k = KH * KW * C``;
        rows past the conv's ``M`` repeat its last pixel.

    Returns
    -------
    tvm.tirx.PrimFunc
        Arguments ``X (m, k) uint8``, ``W (n/16, k/4, 16, 4) int8`` [, ``offset (n,) int32``]
        [, ``multiplier (n,) float32``], ``C (m_out or m, n_out or n)`` int32 (or the
        requantized dtype).
        Attributes ``tirx.is_scheduled`` (so dlight / MetaSchedule leave it alone) and
        :data:`KERNEL_ATTR`.
    """
    tiles = tiles or choose_tiles(m, n, k=k)
    static_m = isinstance(m, int)
    if k % REDUCE or n % LANES or (static_m and m % tiles.mr) or (n // LANES) % tiles.nr:
        raise ValueError(f"unpadded shape m={m} k={k} n={n} for tiles {tiles}")
    if not static_m:  # every loop int64 like the symbolic rows, or the fused loops mix dtypes
        k, n = (tvm.tirx.IntImm("int64", v) for v in (k, n))
    quantize = getattr(requantize, "quantize", None)
    w = te.placeholder((n // LANES, k // REDUCE, LANES, REDUCE), "int8", name="W")
    stage = None  # how _schedule computes a staged x per row tile
    if quantize is not None:  # X float32: its bytes are a stage of the kernel
        x_arg = te.placeholder((m, quantize.k), "float32", name="X")
        rows, *row_params = quantized_rows(x_arg, k, quantize.eps)
        x = lambda i, r: rows[i, r]  # noqa: E731
        stage = _schedule_quantize
    elif im2col is not None:  # X the image: the (uint8) rows are a stage of the kernel
        x_arg, x = _im2col_operand(im2col, m, k, x_dtype, tiles.mr)
        stage = functools.partial(_schedule_im2col, c=im2col.x_shape[1])
    else:
        x_arg = te.placeholder((m, k), x_dtype, name="X")
        x = lambda i, r: x_arg[i, r]  # noqa: E731
    r = te.reduce_axis((0, k), name="k")
    signed = x_dtype == "int8" and im2col is None

    def operand(i, r):
        return x(i, r).astype("int32") + 128 if signed else x(i, r).astype("int32")

    acc = te.compute(
        (m, n),
        lambda i, j: te.sum(
            operand(i, r) * w[j // LANES, r // REDUCE, j % LANES, r % REDUCE].astype("int32"),
            axis=r,
        ),
        name="acc",
    )
    args = [x_arg, w]
    if with_offset:
        off = te.placeholder((n,), "int32", name="offset")
        args.append(off)

    def value(i, j):
        return acc[i, j] + off[j] if with_offset else acc[i, j]

    shape = (m if m_out is None else m_out, n if n_out is None else n_out)
    if requantize is None:
        out = te.compute(shape, value, name="C")
    elif isinstance(requantize, DynamicDequantize):
        out, more = _dynamic_dequantize(
            shape, value, m, n, requantize, row_params if quantize is not None else None
        )
        args += more
    else:
        mult = te.placeholder((n,), "float32", name="multiplier")
        args.append(mult)
        res = requantize.residual
        if res is not None:
            if shape != (m, n):
                raise ValueError(f"a residual add needs the whole {m}x{n} result, not {shape}")
            res = te.placeholder(shape, res.r_dtype, name="residual")
            args.append(res)
        out = te.compute(
            shape,
            lambda i, j: requantize_value(
                value(i, j), mult[j], requantize, None if res is None else res[i, j]
            ),
            name="C",
        )
    func = te.create_prim_func([*args, *extra, out])
    parallel = not static_m or runs_parallel(m, k, n)
    return _schedule(func, tiles, parallel, signed, stage)


def _dynamic_dequantize(shape, value, m, n, d: DynamicDequantize, row_params=None):
    """The ``C`` stage and extra arguments of a :class:`DynamicDequantize` store (each row's
    scale and zero point from the ``params`` argument, or the kernel's own ``row_params``
    stages)."""
    colsum = te.placeholder((n,), "int32", name="colsum")
    scale = te.placeholder((n,), "float32", name="scale")
    bias = [te.placeholder((n,), "float32", name="bias")] if d.bias else []
    more = [colsum, scale, *bias]
    if row_params is None:
        params = te.placeholder((m, 2), "float32", name="params")
        more.append(params)
        row_scale, row_zero = (lambda i: params[i, 0]), (lambda i: params[i, 1])
    else:
        row_scale, row_zero = (lambda i: row_params[0][i]), (lambda i: row_params[1][i])

    def y(i, j):
        v = value(i, j) - row_zero(i).astype("int32") * colsum[j]
        f = v.astype("float32") * (row_scale(i) * scale[j])
        if d.bias:  # not fused into an FMA (one rounding less than the separate Relax ops)
            f = _fence(f) + bias[0][j]
        if d.activation:  # of the rounded result, as for Requantize
            return activation_f32(d.activation, _fence(f))
        return te.max(f, tvm.tirx.const(0.0, "float32")) if d.relu else f

    return te.compute(shape, y, name="C"), more


def requantize_value(v, multiplier, r: Requantize, residual=None):
    """The float32 requantize of one int32 value, or of a float32 one holding an integer (see
    :class:`Requantize`); with a ``r.residual``, ``residual`` is the element of ``R`` it adds."""
    if r.relu:
        v = te.max(v, tvm.tirx.const(0, str(v.ty)))
    f = v.astype("float32") * multiplier
    if r.activation:  # of the rounded product, as the separate kernel reads it: not
        # contracted into an FMA (nor the activation's result into the rescale)
        f = activation_f32(r.activation, _fence(f))
        if r.dtype == "float32":
            return f
        f = _fence(f) * tvm.tirx.const(r.rescale, "float32")
    elif r.dtype == "float32":  # a dequantize
        return f
    if r.int_rounding:
        q = clamp_rounded(f, r.zero_point, r.lo, r.hi)
        if r.stored_as:
            return q.astype(r.stored_as)
        return q.astype(r.dtype) if r.residual is None else r.residual.value(q, residual)
    f = te.round(f) + tvm.tirx.const(float(r.zero_point), "float32")
    lo, hi = (tvm.tirx.const(float(b), "float32") for b in (r.lo, r.hi))
    f = te.max(te.min(f, hi), lo)
    if r.stored_as:
        return f.astype(r.stored_as)
    return f.astype(r.dtype) if r.residual is None else r.residual.value(f, residual)


def _fence(f):
    """``f`` as a rounded float32 that LLVM may not contract into an FMA with what follows."""
    return tvm.tirx.call_llvm_pure_intrin("float32", "llvm.arithmetic.fence", f)


def clamp_rounded(f, zero_point: int, lo: int, hi: int):
    """``clamp(round(f) + zero_point, lo, hi)`` in int32, ``f`` rounded half to even by its
    conversion (``f`` must be within int32)."""
    i32 = lambda v: tvm.tirx.const(v, "int32")  # noqa: E731
    q = tvm.tirx.call_llvm_pure_intrin("int32", "llvm.lrint", f) + i32(zero_point)
    return te.max(te.min(q, i32(hi)), i32(lo))


_INT32_SAFE = 2**31 - 256  # |float| below which lrint + a zero point stays within int32


def with_int_rounding(
    requantize: Requantize, w: np.ndarray, offset: np.ndarray, multiplier: np.ndarray
) -> Requantize:
    """``requantize`` with :attr:`Requantize.int_rounding` where it gives the same bits: every
    ``|float32(x @ w + offset) * multiplier|`` below ``2**31 - 256`` for uint8 ``x`` (0..255;
    int8 ``x`` is shifted to it) and the int8 ``(K, N)`` weight ``w``."""
    if requantize.dtype == "float32" or requantize.activation:  # (the weights bound no
        return requantize  # activation's result)
    n = w.shape[1]
    acc = 255.0 * np.abs(w.astype(np.float64)).sum(axis=0) + np.abs(offset[:n].astype(np.float64))
    bound = float((acc * np.abs(multiplier[:n].astype(np.float64))).max(initial=0.0))
    if bound * (1 + 2**-20) >= _INT32_SAFE:  # float32 products may round up a little
        return requantize
    return dataclasses.replace(requantize, int_rounding=True)


def im2col_strips_fit(geo, m: int, mr: int) -> bool:
    """Whether :func:`int8_dense_vnni`'s in-kernel im2col of ``geo`` copies strips (see
    :func:`_im2col_operand`): every row tile of ``mr`` output pixels lies in one output row
    (``OW % mr == 0``), no row is padding (``m == geo.m``) and a strip is shorter than the
    tile's taps in a kernel row (not so for a strided 1x1 conv)."""
    return geo.out_hw[1] % mr == 0 and m == geo.m and _strip_span(geo, mr) < mr * geo.kernel[1]


def _strip_span(geo, mr: int) -> int:
    """Input pixels per kernel row that a row tile of ``mr`` output pixels reads."""
    (_, kw), (_, sw), (_, dw) = geo.kernel, geo.strides, geo.dilation
    return (mr - 1) * sw + (kw - 1) * dw + 1


def _im2col_operand(geo, m: int, k: int, x_dtype: str, mr: int):
    """``(X, operand)`` for the ``im2col`` option of :func:`int8_dense_vnni`: the NHWC image
    of ``geo``'s conv (a :class:`~tvmq.kernels.x86_int8_conv.Conv2DGeometry`; not imported
    here, that module imports this one) without the conv's zero padding, and
    ``operand(i, r)``, element ``(pixel i, (ky, kx, c))`` of the uint8 im2col matrix read from
    the stage ``im2col_rows``, which each row tile of ``mr`` pixels computes (an int8 image
    shifted by +128 as it is copied, the padding's zeros too). A tap in the padding is a
    branch per tap and pixel (the condition is the same for its ``c`` bytes), cheaper than a
    padded copy of the image in memory.

    Where :func:`im2col_strips_fit`, the stage holds the tile's input strips, ``(KH, span,
    C)`` with ``span = (mr - 1) * SW + (KW - 1) * DW + 1`` pixels per kernel row: the taps
    of neighbouring pixels overlap, so a 3x3 tile of 7 pixels copies 27 pixels instead of
    63 (UNet's 224x224 32-channel conv 2.40 -> 2.11 ms, 1 thread). Else it holds the tile's
    ``mr x k`` im2col rows, rows past ``geo.m`` repeating the last pixel."""
    n, c, h, w = geo.x_shape
    top, left, _, _ = geo.padding
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel, geo.strides, geo.dilation
    oh, ow = geo.out_hw
    if c % LANES or k != kh * kw * c or m < geo.m:
        raise ValueError(f"no in-kernel im2col for {geo} with m={m} k={k}")
    image = te.placeholder((n, h, w, c), x_dtype, name="X")

    def pixel(i, dy, dx, ch):  # uint8 byte ch of the input pixel (dy, dx) from pixel i's first
        b, y, x = i // (oh * ow), i // ow % oh, i % ow
        yy, xx = y * sh + dy - top, x * sw + dx - left
        v = image[b, yy, xx, ch]
        if any(geo.padding):
            inside = tvm.tirx.all(yy >= 0, yy < h, xx >= 0, xx < w)
            v = tvm.tirx.if_then_else(inside, v, tvm.tirx.const(0, x_dtype))
        return (v.astype("int32") + 128).astype("uint8") if x_dtype == "int8" else v

    if im2col_strips_fit(geo, m, mr):
        strips = te.compute(
            (m // mr, kh, _strip_span(geo, mr), c),
            lambda t, ky, p, ch: pixel(t * mr, ky * dh, p, ch),
            "im2col_rows",
        )

        def operand(i, r):
            tap = r // c
            return strips[i // mr, tap // kw, i % mr * sw + tap % kw * dw, r % c]

        return image, operand

    rows = te.compute(
        (m, k),
        lambda i, r: pixel(te.min(i, geo.m - 1), r // c // kw * dh, r // c % kw * dw, r % c),
        name="im2col_rows",
    )
    return image, lambda i, r: rows[i, r]


def int8_batch_matmul_vnni(
    batch: int,
    m: int,
    k: int,
    n: int,
    *,
    tiles: DenseTiles | None = None,
    row_scale: int = 0,
    col_scale: int = 0,
    constant: int = 0,
) -> tvm.tirx.PrimFunc:
    """:func:`int8_dense_vnni` for ``batch`` independent products with run-time operands.

    ``C[b, m, n] = sum_k int32(X[b, m, k]) * int32(W[b, k, n])``, ``W`` packed per batch
    entry as ``(batch, n/16, k/4, 16, 4)`` int8 (attention's ``Q @ K^T`` and ``P @ V``,
    where both operands are activations and the packing runs at run time). Same padding
    rules and attributes as :func:`int8_dense_vnni`; the batch entries and output tiles
    run in parallel.

    With a nonzero ``row_scale`` the kernel takes ``rows (batch, m) int32`` after ``W``,
    with a nonzero ``col_scale`` ``cols (batch, n) int32`` after that, and stores
    ``C + row_scale * rows[b, i] + col_scale * cols[b, j] + constant``: the corrections of
    operands shifted into vpdpbusd's unsigned x signed bytes, added in registers instead of
    by passes over ``C`` in memory.
    """
    tiles = tiles or choose_tiles(m, n)
    if k % REDUCE or n % LANES or m % tiles.mr or (n // LANES) % tiles.nr:
        raise ValueError(f"unpadded shape m={m} k={k} n={n} for tiles {tiles}")
    x = te.placeholder((batch, m, k), "uint8", name="X")
    w = te.placeholder((batch, n // LANES, k // REDUCE, LANES, REDUCE), "int8", name="W")
    r = te.reduce_axis((0, k), name="k")
    acc = te.compute(
        (batch, m, n),
        lambda b, i, j: te.sum(
            x[b, i, r].astype("int32")
            * w[b, j // LANES, r // REDUCE, j % LANES, r % REDUCE].astype("int32"),
            axis=r,
        ),
        name="acc",
    )
    rows = te.placeholder((batch, m), "int32", name="rows")
    cols = te.placeholder((batch, n), "int32", name="cols")
    extra = [t for t, scale in ((rows, row_scale), (cols, col_scale)) if scale]

    def stored(b, i, j):
        v = acc[b, i, j]
        if row_scale:
            v = v + tvm.tirx.const(row_scale, "int32") * rows[b, i]
        if col_scale:
            v = v + tvm.tirx.const(col_scale, "int32") * cols[b, j]
        return v + tvm.tirx.const(constant, "int32") if constant else v

    out = te.compute((batch, m, n), stored, name="C")
    func = te.create_prim_func([x, w, *extra, out])
    return _schedule(func, tiles, parallel=batch * m * n * k >= _PARALLEL_MIN_MACS)


def _schedule(
    func: tvm.tirx.PrimFunc,
    tiles: DenseTiles,
    parallel: bool,
    signed: bool = False,
    stage=None,
) -> tvm.tirx.PrimFunc:
    """Tile, parallelize and tensorize the ``acc`` / ``C`` pair built by :func:`int8_dense_vnni`
    (or its batched form: the batch loop joins the parallel tile loop). With a ``stage``
    (:func:`_schedule_quantize`, :func:`_schedule_im2col`: ``stage(sch, rows, parallel)``
    for an ``X`` computed in the kernel) the row tiles are the outer (parallel) loop and each
    computes its rows once, before its column tiles."""
    sch = Schedule(func)
    acc, out = sch.get_sblock("acc"), sch.get_sblock("C")
    *batch, oi, oj = sch.get_loops(out)
    mo, mi = sch.split(oi, [None, tiles.mr])
    no, nj = sch.split(oj, [None, tiles.nr * LANES])
    if stage is not None:
        sch.reorder(mo, no, mi, nj)
        sch.compute_at(acc, no)
        stage(sch, mo, parallel)
    elif _rows_first(sch, acc):
        sch.reorder(*batch, mo, no, mi, nj)
        sch.compute_at(acc, no)
    else:
        sch.reorder(*batch, no, mo, mi, nj)
        # The accumulator shrinks to one mr x (nr * 16) tile per task.
        sch.compute_at(acc, mo)
    # compute_at drops unit loops: the row loop is there only when mr > 1.
    *rows, aj, ak = sch.get_loops(acc)[len(batch) + 2 :]
    ni, nv = sch.split(aj, [tiles.nr, LANES])
    ko, kv = sch.split(ak, [None, REDUCE])
    sch.reorder(ko, *rows, ni, nv, kv)
    if parallel and stage is None:
        sch.parallel(sch.fuse(*batch, *sch.get_loops(acc)[len(batch) : len(batch) + 2]))
    init = sch.decompose_reduction(acc, ko)
    sch.tensorize(nv, register_vnni_intrin(signed))
    for loop in (*rows, ni):
        sch.unroll(loop)
    sch.vectorize(sch.get_loops(init)[-1])
    _, vj = sch.split(nj, [None, LANES])
    sch.vectorize(vj)
    return (
        sch.mod["main"]
        .with_attr("tirx.is_scheduled", True)
        .with_attr(KERNEL_ATTR, "int8_dense_vnni")
        .without_attr("global_symbol")
    )


_ROWS_FIRST_MAX_WEIGHT = 256 << 10


def _rows_first(sch: Schedule, acc) -> bool:
    """Whether the tasks take row tiles outermost (each thread writes whole output rows)
    rather than column tiles (each weight panel reused by every row tile): on a target of
    several cores, over a weight of at most 256 KB. Column tiles outermost, MobileNetV2's
    small-K 1x1 convs (3136x24x144, 784x32x192; uint8 results, 48 of a row's 144 bytes a
    tile) ran as long on two threads as on one, and a float32 one was slower on two
    (3136x24x144 with a dequantize: 86.5 us on one thread, 153.9 on two; rows first 83.7
    and 67.6; with a SiLU 191 / 122 -> 189 / 96)."""
    if target_cores() < 2:
        return False
    weight = next((r.source for r in sch.get(acc).reads if r.source.name == "W"), None)
    return weight is not None and math.prod(int(d) for d in weight.shape) <= _ROWS_FIRST_MAX_WEIGHT


def _schedule_im2col(sch: Schedule, rows, parallel: bool, c: int) -> None:
    """Compute the ``im2col_rows`` stage of :func:`_im2col_operand` per row tile (loop
    ``rows``, made ``parallel``): each tap (rows) or pixel (strips) copied as a run of ``c``
    bytes (the image's channels), vectorized."""
    block = sch.get_sblock("im2col_rows")
    sch.compute_at(block, rows)
    if parallel:
        sch.parallel(rows)
    r = sch.get_loops(block)[-1]  # a strip's channels, or a row's (ky, kx, c)
    _, ch = sch.split(r, [None, c])
    width = next(v for v in (64, 32, LANES) if c % v == 0)
    sch.vectorize(sch.split(ch, [None, width])[1])


def _schedule_quantize(sch: Schedule, rows, parallel: bool) -> None:
    """Compute the stages of :func:`~tvmq.kernels.dynamic_quant.quantized_rows` per row tile
    (loop ``rows``, made ``parallel``): the range as 16-lane partial results over the row,
    the bytes 16 (8, 4) at a time into a scratch block of ``mr x K`` bytes."""
    for name in ("row_quantize", "row_zero", "row_scale", "row_min", "row_max"):
        sch.compute_at(sch.get_sblock(name), rows)
    parts = []
    for name in ("row_min_part", "row_max_part"):
        try:
            parts.append(sch.get_sblock(name))
        except ScheduleError:  # short rows have no partial results
            continue
        sch.compute_at(parts[-1], rows)
    if parallel:  # before the reductions are decomposed (parallel wants whole blocks)
        sch.parallel(rows)
    for part in parts:
        *_, lane, ko = sch.get_loops(part)[1:]
        sch.reorder(ko, lane)
        sch.vectorize(lane)
        sch.decompose_reduction(part, ko)
    quantize = sch.get_sblock("row_quantize")
    cols = sch.get_loops(quantize)[-1]
    extent = int(sch.get(cols).extent)
    width = next(v for v in (LANES, 8, REDUCE) if extent % v == 0)
    sch.vectorize(sch.split(cols, [None, width])[1])
