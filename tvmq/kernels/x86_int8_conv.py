"""im2col for tvmq's int8 conv2d on the VNNI dense kernel: NHWC activations -> uint8 rows.

A convolution with an OIHW weight is the matrix product ``cols @ W2`` with

- ``cols[(b, y, x), (ky, kx, c)] = X[b, y * sh + ky * dh - top, x * sw + kx * dw - left, c]``
  (0 outside ``X``; ``X`` the NHWC activation): one row per output pixel,
  ``M = N * OH * OW`` rows of ``K = KH * KW * C``;
- ``W2 = W.transpose(0, 2, 3, 1).reshape(O, K).T``, the ``(K, N)`` weight
  :func:`tvmq.kernels.int8_dense_vnni` takes.

Channels last, each ``(pixel, ky, kx)`` copies ``C`` contiguous bytes into ``C`` contiguous
bytes (an NCHW gather would move one byte at a time: 10x slower on the demo CNN), so the
caller transposes NCHW activations first (a small copy, often fused with their producer).

:func:`int8_im2col` builds the TIR kernel that writes ``cols`` in the form the dense
kernel wants: ``uint8`` (an int8 ``X`` is shifted by +128, padding included, the dense
kernel's per-column offset takes ``128 * colsum(W2)`` off again), rows padded to the dense
kernel's ``M`` tile and columns to a multiple of 4. The padded columns are 0 (any value
would do, their weight rows are 0), and so are the padded rows (sliced off afterwards).

The kernel first copies ``X`` into a zero-padded (and shifted) staging image, so that each
``(pixel, ky)`` of ``cols`` is then one branch-free run of ``KW * C`` contiguous bytes (``C``
per ``kx`` with a dilated W axis) that LLVM vectorizes; the bounds test per ``(pixel, ky,
kx)`` it replaces cost 40% of the demo CNN's first im2col (C = 1). A uint8 ``X`` without
padding (a CNN's first conv, whose image the input's quantize kernel padded) is read in place:
the copy was a third of MobileNetV2's 12544x28 im2col (34 -> 23 us on one thread, 21 -> 12.5
on two). The loops over the
staging image's rows and the output rows run in parallel once ``cols`` has
``_PARALLEL_MIN_BYTES`` (64 KiB; the demo CNN's are 9 and 28 KiB and stay on one thread).
The kernel is marked scheduled and opaque (``op_pattern`` 8), so FuseOps keeps it apart (fusing the
producer in would recompute it ``KH * KW`` times) and the default schedule leaves it alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm.script import tirx as T

from tvmq.kernels.x86_int8 import KERNEL_ATTR

OPAQUE = 8
"""FuseOps' ``kOpaque`` pattern: a call_tir to a function with this ``op_pattern`` is not fused."""

# cols smaller than this (bytes) are written by one thread: waking the pool costs more.
_PARALLEL_MIN_BYTES = 1 << 16


@dataclass(frozen=True)
class Conv2DGeometry:
    """The shapes of an NCHW x OIHW conv2d (``groups`` 1) and its im2col product."""

    x_shape: tuple[int, int, int, int]  # (N, C, H, W), the NCHW conv's data
    kernel: tuple[int, int]  # (KH, KW)
    strides: tuple[int, int]
    padding: tuple[int, int, int, int]  # (top, left, bottom, right), as relax conv2d
    dilation: tuple[int, int]

    @property
    def out_hw(self) -> tuple[int, int]:
        """``(OH, OW)``."""
        _, _, h, w = self.x_shape
        top, left, bottom, right = self.padding
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilation
        return (
            (h + top + bottom - dh * (kh - 1) - 1) // sh + 1,
            (w + left + right - dw * (kw - 1) - 1) // sw + 1,
        )

    @property
    def m(self) -> int:
        """Rows of ``cols``: output pixels ``N * OH * OW``."""
        oh, ow = self.out_hw
        return self.x_shape[0] * oh * ow

    @property
    def k(self) -> int:
        """Columns of ``cols``: ``KH * KW * C``."""
        return self.x_shape[1] * self.kernel[0] * self.kernel[1]


def int8_im2col(
    geo: Conv2DGeometry, x_dtype: str, m_padded: int, k_padded: int
) -> tvm.tirx.PrimFunc:
    """The kernel ``(X (N, H, W, C) x_dtype) -> cols (m_padded, k_padded) uint8``.

    ``cols`` is the im2col matrix of the module docstring, shifted to uint8 when
    ``x_dtype`` is int8, zero in its padded rows and columns.
    """
    if x_dtype not in ("uint8", "int8"):
        raise ValueError(f"im2col takes uint8 or int8 activations, not {x_dtype}")
    if m_padded < geo.m or k_padded < geo.k:
        raise ValueError(f"padded cols {m_padded}x{k_padded} smaller than {geo.m}x{geo.k}")
    n, c, h, w = geo.x_shape
    kh, kw = geo.kernel
    sh, sw = geo.strides
    dh, dw = geo.dilation
    top, left, bottom, right = geo.padding
    oh, ow = geo.out_hw
    m, k = geo.m, geo.k
    shift = 128 if x_dtype == "int8" else 0
    fill = T.uint8(shift)  # the shifted value of a padding 0
    # The image with its padding and the shift, flat: every patch row is then one
    # branch-free run of bytes.
    hp, wp = h + top + bottom, w + left + right
    # With dilation 1 along W, a patch row (kx, c) is KW * C contiguous bytes.
    run = kw * c if dw == 1 else c
    steps = 1 if dw == 1 else kw
    n_rows = n * oh
    parallel = m * k >= _PARALLEL_MIN_BYTES and n_rows > 1
    staged = shift != 0 or hp != h or wp != w

    @T.prim_func(private=True, s_tir=True)
    def im2col(x: T.handle, cols: T.handle):
        T.func_attr({"tirx.noalias": True})
        X4 = T.match_buffer(x, (n, h, w, c), x_dtype)
        C = T.match_buffer(cols, (m_padded, k_padded), "uint8")
        # One opaque root block: Relax's analyses (e.g. RewriteDataflowReshape) expect one.
        with T.sblock("root"):
            T.reads(X4[0:n, 0:h, 0:w, 0:c])
            T.writes(C[0:m_padded, 0:k_padded])
            X = T.decl_buffer((n * h * w * c,), x_dtype, data=X4.data)  # X4, flat
            staging = T.sblock_alloc_buffer((n * hp * wp * c if staged else 1,), "uint8")
            # the image the patches are read from: X itself where it is uint8 and unpadded
            P = T.decl_buffer((n * hp * wp * c,), "uint8", data=staging.data if staged else X4.data)
            if staged:  # else the loop would write into X: it does not run
                for bi in T.parallel(n * hp) if parallel else T.serial(n * hp):
                    b, i = bi // hp, bi % hp
                    if i < top or i >= top + h:
                        for j in range(wp * c):
                            P[(b * hp + i) * wp * c + j] = fill
                    else:
                        for j in range(left * c):
                            P[(b * hp + i) * wp * c + j] = fill
                        for j in range(w * c):  # contiguous: LLVM vectorizes it
                            P[((b * hp + i) * wp + left) * c + j] = T.Cast(
                                "uint8", T.Cast("int32", X[(b * h + i - top) * w * c + j]) + shift
                            )
                        for j in range(right * c):
                            P[((b * hp + i) * wp + left + w) * c + j] = fill
            for by in T.parallel(n_rows) if parallel else T.serial(n_rows):
                for xo in range(ow):
                    for ky, kx0 in T.grid(kh, steps):
                        for t in range(run):
                            C[by * ow + xo, (ky * kw + kx0) * c + t] = P[
                                ((by // oh * hp + by % oh * sh + ky * dh) * wp + xo * sw + kx0 * dw)
                                * c
                                + t
                            ]
                    for j in range(k_padded - k):
                        C[by * ow + xo, k + j] = T.uint8(0)
            for i, j in T.grid(m_padded - m, k_padded):
                C[m + i, j] = T.uint8(0)

    return (
        im2col.with_attr("tirx.is_scheduled", True)
        .with_attr("op_pattern", OPAQUE)
        .with_attr(KERNEL_ATTR, "int8_im2col")
    )
