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

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import tirx

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


def amx_conv_applies(geo: Conv2DGeometry) -> bool:
    """Whether :func:`int8_conv_amx` takes this conv: stride 1, no dilation, channels a
    multiple of 64 (each 64-byte K step one tap's run of channels) and a tile of rows."""
    c = geo.x_shape[1]
    return (
        geo.strides == (1, 1)
        and geo.dilation == (1, 1)
        and c % TILE_K == 0
        and conv_rows(geo, c).count >= 2 * TILE
    )


def conv_rows(geo: Conv2DGeometry, c: int, k_step: int = TILE_K, elem_bytes: int = 1) -> AmxRows:
    """The rows of a stride-1 conv read straight from its zero-padded NHWC input (``Hp x Wp``
    pixels an image): output pixel ``(b, y, x)`` is row ``p = (b * Hp + y) * Wp + x``, and tap
    ``(ky, kx)`` of it reads pixel ``p + ky * Wp + kx``, so consecutive rows are ``C`` bytes
    apart for every tap (``elem_bytes`` each). Rows with ``x >= OW`` or ``y >= OH`` (the
    padding's) are computed and not stored; the last row needed is the last output pixel.
    ``k_step``: the channels one instruction reduces (a divisor of ``C``)."""
    n, _, h, w = geo.x_shape
    top, left, bottom, right = geo.padding
    hp, wp = h + top + bottom, w + left + right
    oh, ow = geo.out_hw
    kw = geo.kernel[1]
    per_tap = max(1, c // k_step)

    def k_offset(ko):
        tap = ko // per_tap
        return ((tap // kw) * wp + tap % kw) * c + (ko % per_tap) * k_step

    def store(p):
        r = p % (hp * wp)
        y, x = r // wp, r % wp
        return ((p // (hp * wp)) * oh + y) * ow + x, tirx.all(y < oh, x < ow)

    count = ((n - 1) * hp + oh - 1) * wp + ow
    return AmxRows(count, c * elem_bytes, lambda p: p * c, store, k_offset)


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
    rows = conv_rows(geo, c)
    tiles = amx_tiles(2 * TILE, geo.k, n_padded)
    x_shape = (n, h + top + bottom, w + left + right, c)
    name = "int8_conv_amx"
    return amx_kernel(
        name, x_shape, rows, geo.k, n_padded, tiles, with_offset, requantize, out_rows=geo.m
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
    target has AMX, it applies and pays (:func:`amx_pays`), else the dense kernel over its
    im2col rows."""
    conv = AmxConv(geo, round_up(o, TILE))
    vnni = x86_int8_dense(geo.m, geo.k, o, False)
    if amx and amx_conv_applies(geo) and amx_pays(conv, vnni, geo.k):
        return conv
    return x86_int8_dense(geo.m, geo.k, o, amx)
