"""AMX int8 conv2d without im2col: stride-1 convs read their padded NHWC input into the tiles.

Output pixel ``(b, y, x)`` of a stride-1 conv is row ``p = (b * Hp + y) * Wp + x`` of its
zero-padded input (``Hp x Wp`` pixels an image), and tap ``(ky, kx)`` of that row reads
pixel ``p + ky * Wp + kx``: consecutive rows are ``C`` bytes apart for every tap, so one
tile load with stride ``C`` takes 16 rows of a tap's 64 channels, and the ``KH * KW`` times
larger im2col matrix is never written. The rows of the padding columns are computed and
not stored. :func:`int8_conv_amx` is :func:`~tvmq.kernels.x86_amx.amx_kernel` with these
rows; :func:`x86_int8_conv` picks it, or the dense kernel over im2col rows, for a conv.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import tirx
from tvm.script.ir_builder import tirx as T

from tvmq.kernels._tiling import round_up
from tvmq.kernels.x86_amx import (
    TILE,
    TILE_K,
    AmxRows,
    X86Int8Dense,
    amx_kernel,
    amx_pays,
    amx_tiles,
    pack_weight_amx,
    x86_int8_dense,
)
from tvmq.kernels.x86_int8 import Requantize
from tvmq.kernels.x86_int8_conv import Conv2DGeometry

Border = tuple[int, int, int, int]
"""Zero pixels (top, left, bottom, right) around an NHWC image."""


def amx_conv_applies(geo: Conv2DGeometry) -> bool:
    """Whether :func:`int8_conv_amx` takes this conv: stride 1, no dilation, a tile of rows,
    and channels a multiple of 64 (each 64-byte K step one tap's run of channels) or read as
    tap runs (:func:`tap_run`)."""
    c = geo.x_shape[1]
    return (
        geo.strides == (1, 1)
        and geo.dilation == (1, 1)
        and (c % TILE_K == 0 or tap_run(geo) is not None)
        and conv_rows(geo, c, run=tap_run(geo)).count >= 2 * TILE
    )


def tap_run(geo: Conv2DGeometry, k_step: int = TILE_K) -> int | None:
    """K elements a kernel row takes when its taps are read as one run: the ``KW`` taps of a
    kernel row are ``KW`` neighbouring pixels, ``KW * C`` contiguous channels of the padded
    NHWC input, read in ``k_step`` steps (the last step's excess meets zero weight rows). For
    channels not a multiple of ``k_step`` (UNet's first 32-channel convs: 96 channels a row
    read as 128, where im2col'd blocks cost a copy of every row), when the runs grow K by at
    most a third; else None."""
    c, kw = geo.x_shape[1], geo.kernel[1]
    run = round_up(kw * c, k_step)
    if c % k_step == 0 or 3 * run > 4 * kw * c:
        return None
    return run


def _slack_rows(geo: Conv2DGeometry, c: int, run: int | None) -> int:
    """Zero rows below each padded image that the last step of the last row's runs may read."""
    if run is None:
        return 0
    _, _, _, w = geo.x_shape
    _, left, _, right = geo.padding
    return -(-(run - geo.kernel[1] * c) // ((w + left + right) * c))


def conv_rows(
    geo: Conv2DGeometry,
    c: int,
    k_step: int = TILE_K,
    elem_bytes: int = 1,
    run: int | None = None,
    out_border: Border | None = None,
) -> AmxRows:
    """The rows of a stride-1 conv read straight from its zero-padded NHWC input (``Hp x Wp``
    pixels an image): output pixel ``(b, y, x)`` is row ``p = (b * Hp + y) * Wp + x``, and tap
    ``(ky, kx)`` of it reads pixel ``p + ky * Wp + kx``, so consecutive rows are ``C`` bytes
    apart for every tap (``elem_bytes`` each). Rows with ``x >= OW`` or ``y >= OH`` (the
    padding's) are computed and not stored; the last row needed is the last output pixel.
    ``k_step``: the channels one instruction reduces (a divisor of ``C``); ``run``: read each
    kernel row's taps as one run of ``run`` elements (:func:`tap_run`), the padded input then
    having :func:`input_padding`'s extra zero rows; ``out_border``: see :func:`output_pixel`."""
    n, _, h, w = geo.x_shape
    top, left, bottom, right = geo.padding
    hp, wp = h + top + bottom + _slack_rows(geo, c, run), w + left + right
    oh, ow = geo.out_hw
    kw = geo.kernel[1]
    per_tap = max(1, c // k_step)

    def k_offset(ko):
        if run is not None:  # step ko % steps of kernel row ko // steps
            steps = run // k_step
            return (ko // steps) * wp * c + (ko % steps) * k_step
        tap = ko // per_tap
        return ((tap // kw) * wp + tap % kw) * c + (ko % per_tap) * k_step

    pixel = output_pixel(geo, out_border)

    def store(p):
        r = p % (hp * wp)
        y, x = r // wp, r % wp
        return pixel(p // (hp * wp), y, x), tirx.all(y < oh, x < ow)

    count = ((n - 1) * hp + oh - 1) * wp + ow
    return AmxRows(count, c * elem_bytes, lambda p: p * c, store, k_offset)


def int8_conv_amx(
    geo: Conv2DGeometry,
    n_padded: int,
    *,
    with_offset: bool = False,
    requantize: Requantize | None = None,
    out_border: Border | None = None,
) -> tvm.tirx.PrimFunc:
    """An int8 conv (:func:`amx_conv_applies`) on AMX tiles without im2col: ``X`` is the
    conv's input, NHWC uint8 with the conv's padding done (``(N, Hp, Wp, C)``), ``W`` the
    dense weight ``W.transpose(0, 2, 3, 1).reshape(O, K).T`` packed by
    :func:`pack_weight_amx`, ``C`` the ``(N * OH * OW, n_padded)`` rows of
    :func:`int8_dense_amx` (same offset / requantize arguments); with ``out_border`` the
    rows of the NHWC result with that zero border around it (:func:`output_pixel`)."""
    if not amx_conv_applies(geo):
        raise ValueError(f"{geo} is not a conv the AMX conv kernel takes")
    n, c, h, w = geo.x_shape
    top, left, bottom, right = input_padding(geo)
    run = tap_run(geo)
    rows = conv_rows(geo, c, run=run, out_border=out_border)
    k = geo.k if run is None else geo.kernel[0] * run
    tiles = amx_tiles(2 * TILE, k, n_padded)
    x_shape = (n, h + top + bottom, w + left + right, c)
    return amx_kernel(
        "int8_conv_amx", x_shape, rows, k, n_padded, tiles, with_offset, requantize,
        out_rows=output_rows(geo, out_border), fill=zero_border(geo, out_border, n_padded),
    )  # fmt: skip


def output_pixel(geo: Conv2DGeometry, border: Border | None):
    """``pixel(image, y, x)``: the row of a conv's NHWC result that output pixel ``(y, x)`` of
    ``image`` is stored in, with ``border`` zero pixels around each image (the next conv's
    padded input, written by the kernel: no pad between them) or none."""
    oh, ow = geo.out_hw
    top, left, bottom, right = border or (0, 0, 0, 0)

    def pixel(image, y, x):
        return (image * (top + oh + bottom) + top + y) * (left + ow + right) + left + x

    return pixel


def output_rows(geo: Conv2DGeometry, border: Border | None) -> int:
    """Rows of a conv's NHWC result with ``border`` around each image (:func:`output_pixel`)."""
    (oh, ow), (top, left, bottom, right) = geo.out_hw, border or (0, 0, 0, 0)
    return geo.x_shape[0] * (top + oh + bottom) * (left + ow + right)


def zero_border(geo: Conv2DGeometry, border: Border | None, channels: int) -> Callable | None:
    """The ``fill`` of :func:`~tvmq.kernels.x86_amx.amx_kernel` that zeroes ``border`` (the
    rows no output pixel is stored in), or None without one: whole rows above and below each
    image, ``left`` and ``right`` pixels beside each of its rows."""
    if border is None or not any(border):
        return None
    n, (oh, ow) = geo.x_shape[0], geo.out_hw
    top, left, bottom, right = border
    hp, wp = top + oh + bottom, left + ow + right

    def zero(c, first, count) -> None:
        with T.serial(0, count) as p, T.vectorized(0, channels) as j:
            T.buffer_store(c, tirx.const(0, c.dtype), [first + p, j])

    def fill(c) -> None:
        with T.serial(0, n) as image, T.serial(0, hp) as y:
            row = (image * hp + y) * wp
            with T.If(tirx.any(y < top, y >= top + oh)):
                with T.Then():
                    zero(c, row, wp)
                with T.Else():
                    if left:
                        zero(c, row, left)
                    if right:
                        zero(c, row + left + ow, right)

    return fill


def input_padding(geo: Conv2DGeometry) -> tuple[int, int, int, int]:
    """The padding :func:`int8_conv_amx` wants on its NHWC input: the conv's, plus the zero
    rows below each image that tap runs read past the last tap."""
    top, left, bottom, right = geo.padding
    return top, left, bottom + _slack_rows(geo, geo.x_shape[1], tap_run(geo)), right


def pack_tap_runs(w: np.ndarray, geo: Conv2DGeometry) -> np.ndarray:
    """The dense ``(KH * KW * C, O)`` weight with each kernel row's ``KW * C`` rows followed
    by zero rows up to :func:`tap_run` (the channels its last step reads past the row)."""
    kh, run = geo.kernel[0], tap_run(geo)
    row = w.shape[0] // kh
    out = np.zeros((kh, run, w.shape[1]), w.dtype)
    out[:, :row] = w.reshape(kh, row, w.shape[1])
    return out.reshape(kh * run, w.shape[1])


@dataclass(frozen=True)
class AmxConv:
    """A conv on AMX tiles reading its padded input (no im2col matrix): straight into the
    tiles (:func:`int8_conv_amx`), or ``gathered`` a block at a time
    (:func:`int8_conv_amx_gathered`); the interface of :class:`X86Int8Dense` (``m_padded``
    is the output pixels: no rows are padded)."""

    geo: Conv2DGeometry
    n_padded: int
    gathered: bool = False
    # Zero pixels the kernel writes around its NHWC result (the next conv's padding): then
    # its ``(output_rows, n_padded)`` result is that conv's padded input (no pad kernel).
    out_border: Border | None = None

    @property
    def label(self) -> str:
        return "conv_amx_gathered" if self.gathered else "conv_amx"

    @property
    def m_padded(self) -> int:
        return self.geo.m

    @property
    def k_padded(self) -> int:
        if self.gathered:
            return round_up(self.geo.k, TILE_K)
        run = tap_run(self.geo)
        return self.geo.k if run is None else self.geo.kernel[0] * run

    @property
    def input_padding(self) -> tuple[int, int, int, int]:
        """The zero padding the kernel wants on its NHWC input."""
        return self.geo.padding if self.gathered else input_padding(self.geo)

    def pack(self, w: np.ndarray) -> np.ndarray:
        if not self.gathered and tap_run(self.geo) is not None:
            w = pack_tap_runs(w, self.geo)
        return pack_weight_amx(w)

    def build(self, with_offset: bool, requantize: Requantize | None = None) -> tirx.PrimFunc:
        kernel = int8_conv_amx_gathered if self.gathered else int8_conv_amx
        return kernel(
            self.geo, self.n_padded, with_offset=with_offset, requantize=requantize,
            out_border=self.out_border,
        )  # fmt: skip

    @property
    def output_rows(self) -> int:
        """Rows of the kernel's result: the output pixels, with :attr:`out_border`'s."""
        return output_rows(self.geo, self.out_border)


def x86_int8_conv(geo: Conv2DGeometry, o: int, amx: bool) -> AmxConv | X86Int8Dense:
    """The kernel for an int8 conv with ``o`` output channels where the target has AMX and it
    pays (:func:`~tvmq.kernels.x86_amx.amx_pays`): :func:`int8_conv_amx` where it applies, else
    :func:`int8_conv_amx_gathered`; without AMX, the dense kernel over im2col rows."""
    conv = AmxConv(geo, round_up(o, TILE))
    vnni = x86_int8_dense(geo.m, geo.k, o, False)
    if amx and amx_conv_applies(geo) and amx_pays(conv, vnni, geo.k):
        return conv
    dense = x86_int8_dense(geo.m, geo.k, o, amx)
    if dense.amx is not None and geo.m >= 2 * TILE:
        return AmxConv(geo, dense.n_padded, gathered=True)
    return dense


def gathered_conv_rows(geo: Conv2DGeometry, out_border: Border | None = None) -> AmxRows:
    """The rows of any conv (strided, dilated, any channel count) as blocks gathered from its
    zero-padded NHWC uint8 input: each block of output pixels is im2col'd into a small panel
    (``rows x K``, in cache) right before the tiles read it, instead of the whole im2col
    matrix going through memory first. Row ``p`` is output pixel ``p`` (``N * OH * OW``),
    stored in row ``p`` of the result, or with ``out_border`` in :func:`output_pixel`'s."""
    n, c, h, w = geo.x_shape
    top, left, bottom, right = geo.padding
    hp, wp = h + top + bottom, w + left + right
    oh, ow = geo.out_hw
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel, geo.strides, geo.dilation

    def gather(panel, x, row, count: int, k: int) -> None:
        with T.serial(0, count) as i, T.serial(0, kh) as ky:
            p = row + i
            r = p % (oh * ow)
            origin = ((p // (oh * ow) * hp + r // ow * sh + ky * dh) * wp + r % ow * sw) * c
            if dw == 1:  # the taps of a kernel row are one run of KW * C bytes
                with T.serial(0, kw * c) as t:
                    T.buffer_store(panel, x[origin + t], [i * k + ky * kw * c + t])
            else:
                with T.serial(0, kw) as kx, T.serial(0, c) as t:
                    value = x[origin + kx * dw * c + t]
                    T.buffer_store(panel, value, [i * k + (ky * kw + kx) * c + t])

    def store(p):
        if out_border is None:
            return p, None
        r = p % (oh * ow)
        return pixel(p // (oh * ow), r // ow, r % ow), None

    pixel = output_pixel(geo, out_border)
    return AmxRows(geo.m, 0, lambda p: p, store, gather=gather)


def int8_conv_amx_gathered(
    geo: Conv2DGeometry,
    n_padded: int,
    *,
    with_offset: bool = False,
    requantize: Requantize | None = None,
    out_border: Border | None = None,
) -> tvm.tirx.PrimFunc:
    """An int8 conv on AMX tiles over blocks im2col'd in cache (:func:`gathered_conv_rows`):
    ``X`` the padded NHWC uint8 input, ``W`` the dense weight packed by
    :func:`pack_weight_amx` (K padded to 64), ``C`` the ``(N * OH * OW, n_padded)`` rows of
    :func:`int8_dense_amx` (same offset / requantize arguments), or ``out_border`` as in
    :func:`int8_conv_amx`."""
    if geo.m < 2 * TILE:
        raise ValueError(f"{geo} has fewer output pixels than two tiles of rows")
    n, c, h, w = geo.x_shape
    top, left, bottom, right = geo.padding
    tiles = amx_tiles(2 * TILE, geo.k, n_padded)
    x_shape = (n, h + top + bottom, w + left + right, c)
    return amx_kernel(
        "int8_conv_amx_gathered", x_shape, gathered_conv_rows(geo, out_border), tiles.k_padded,
        n_padded, tiles, with_offset, requantize, out_rows=output_rows(geo, out_border),
        fill=zero_border(geo, out_border, n_padded),
    )  # fmt: skip
