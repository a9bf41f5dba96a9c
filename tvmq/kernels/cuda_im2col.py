"""im2col on CUDA for tvmq's tensor-core convolutions: NHWC activations -> fp16 / bf16 / int8 rows.

A conv2d with an OIHW weight is ``cols @ W2`` (see :mod:`tvmq.kernels.x86_int8_conv`):
``cols[(b, y, x), (ky, kx, c)] = X[b, y * sh + ky * dh - top, x * sw + kx * dw - left, c]``,
0 outside ``X`` (``X`` channels last), ``M = N * OH * OW`` rows of ``K = KH * KW * C``;
``W2 = W.transpose(0, 2, 3, 1).reshape(O, K).T``. :func:`mma_im2col` writes ``cols`` in the
form the tensor-core dense kernels of :mod:`tvmq.kernels.cuda_mma` take:

- its dtype is the kernel's operand, float16, bfloat16 (from float32 ``X``, rounded here) or
  int8. A uint8 ``X`` is shifted to int8
  (``x - 128``; the conv's padding zeros too, so they become -128): the caller adds
  ``128 * colsum(W2)`` per output channel back, and the result is the exact integer conv;
- rows are padded to the dense kernel's ``M`` tile and columns to its ``K`` step, with 0
  (the padded weight rows are 0, the padded rows are sliced off afterwards).

On CUDA each thread writes one vector of a row (8 fp16 or 4 bf16 / int8 columns, one kernel
tap's consecutive channels; fewer where ``C`` does not split so): the ``(row, column
vector)`` loops are fused and split over 256-thread blocks, so consecutive threads write
consecutive vectors and read consecutive channels of ``X``. One element per thread (before)
ran ResNet-18's im2col at about a fifth of the H200's memory bandwidth. With
``device="cpu"`` the same loop nest is left unbound (the CPU twin, for checks against numpy on an ``llvm`` target). The
kernel is marked scheduled and opaque (``op_pattern`` 8): FuseOps keeps it apart (fusing its
producer in would recompute it ``KH * KW`` times).
"""

from __future__ import annotations

import tvm
from tvm import te
from tvm.s_tir import Schedule

from tvmq.kernels.x86_int8 import KERNEL_ATTR
from tvmq.kernels.x86_int8_conv import OPAQUE, Conv2DGeometry

KERNEL = "mma_im2col"
"""Value of :data:`~tvmq.kernels.x86_int8.KERNEL_ATTR` on the im2col kernels built here."""

GEOMETRY_ATTR = "tvmq.im2col"
"""PrimFunc attribute: the conv's kernel size, strides, padding (top, left, bottom, right) and
dilation, flat, so that :func:`im2col_for_cpu` can rebuild the kernel."""

_THREADS = 256
_PAIRS = (("float16", "float16"), ("float32", "bfloat16"), ("int8", "int8"), ("uint8", "int8"))


def mma_im2col(
    geo: Conv2DGeometry,
    x_dtype: str,
    operand: str,
    m_padded: int,
    k_padded: int,
    device: str = "cuda",
) -> tvm.tirx.PrimFunc:
    """The kernel ``(X (N, H, W, C) x_dtype) -> cols (m_padded, k_padded) operand`` (see
    module). ``x_dtype``/``operand``: float16/float16, float32/bfloat16, int8/int8 or
    uint8/int8."""
    if (x_dtype, operand) not in _PAIRS:
        raise ValueError(f"im2col cannot turn {x_dtype} activations into {operand} rows")
    if m_padded < geo.m or k_padded < geo.k:
        raise ValueError(f"padded cols {m_padded}x{k_padded} smaller than {geo.m}x{geo.k}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    n, c, h, w = geo.x_shape
    kh, kw = geo.kernel
    (sh, sw), (dh, dw) = geo.strides, geo.dilation
    top, left, _, _ = geo.padding
    oh, ow = geo.out_hw
    m, k = geo.m, geo.k
    x = te.placeholder((n, h, w, c), x_dtype, name="X")
    zero = tvm.tirx.const(0, operand)

    def element(r, q):
        iy = r // ow % oh * sh + q // (kw * c) * dh - top
        ix = r % ow * sw + q // c % kw * dw - left
        inside = tvm.tirx.all(iy >= 0, iy < h, ix >= 0, ix < w)
        value = tvm.tirx.if_then_else(
            inside, x[r // (oh * ow), iy, ix, q % c], tvm.tirx.const(0, x_dtype)
        )
        if x_dtype == "uint8":  # x - 128 as int8 (the kernel multiplies signed bytes): the
            # top bit flipped, read as int8; byte arithmetic keeps a 16-byte vector one vector
            value = tvm.tirx.bitwise_xor(value, tvm.tirx.const(128, "uint8")).astype("int8")
        elif x_dtype != operand:  # float32 -> bfloat16
            value = value.astype(operand)
        return tvm.tirx.if_then_else(tvm.tirx.all(r < m, q < k), value, zero)

    cols = te.compute((m_padded, k_padded), element, name="cols")
    sch = Schedule(te.create_prim_func([x, cols]))
    rows, columns = sch.get_loops(sch.get_sblock("cols"))
    vector = _vector(c, k_padded, operand)
    columns, lanes = sch.split(columns, [None, vector])
    fused = sch.fuse(rows, columns)
    if device == "cuda":
        bx, tx = sch.split(fused, [None, _THREADS])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    if vector > 1:
        sch.vectorize(lanes)
    geometry = [*geo.kernel, *geo.strides, *geo.padding, *geo.dilation]
    return (
        sch.mod["main"]
        .with_attr("tirx.is_scheduled", True)
        .with_attr(KERNEL_ATTR, KERNEL)
        .with_attr(GEOMETRY_ATTR, geometry)
        .with_attr("tvmq.device", device)
        .with_attr("op_pattern", OPAQUE)
        .without_attr("global_symbol")
    )


def _vector(c: int, k_padded: int, operand: str) -> int:
    """Columns per thread: one vector (8 fp16: 16 bytes; 4 bf16 or int8) where the channels and
    the padded row split into whole vectors, so that a vector never crosses a kernel tap
    (``(ky, kx)``) and reads ``C``-contiguous input; else 1."""
    # int8 and bf16: 4, since TVM 0.27's CUDA codegen prints wider int8 constants (the
    # padding's 0, uint8's 128) as make_int4 / make_int2 of 16 / 8 chars, which nvcc rejects,
    # and fails likewise on 8 lanes of float32 -> bfloat16
    vector = 8 if operand == "float16" else 4
    while vector > 1 and (c % vector or k_padded % vector):
        vector //= 2
    return vector


def im2col_for_cpu(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """The ``device="cpu"`` twin of a CUDA :func:`mma_im2col` kernel: same arguments, same
    loop nest, no thread bindings."""
    (n, h, w, c), (mp, kp) = (tuple(int(d) for d in p.ty.shape) for p in func.params)
    x_dtype, operand = (str(p.ty.dtype) for p in func.params)
    kh, kw, sh, sw, top, left, bottom, right, dh, dw = (int(v) for v in func.attrs[GEOMETRY_ATTR])
    geo = Conv2DGeometry((n, c, h, w), (kh, kw), (sh, sw), (top, left, bottom, right), (dh, dw))
    return mma_im2col(geo, x_dtype, operand, mp, kp, device="cpu")
