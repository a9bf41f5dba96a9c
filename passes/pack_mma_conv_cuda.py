"""PackMmaConvCUDA: fp16 and int8 conv2d -> im2col + a tensor-core dense kernel (CUDA sm_80+).

Rewrites, on a CUDA target with ``mma.sync`` (sm_80 or later)::

    y = R.nn.conv2d(x, W, strides, padding, dilation, groups=1,
                    data_layout="NCHW", kernel_layout="OIHW", out_dtype=...)

with a constant weight and static shapes, in two forms:

- int8 (what ``LowerInt8`` emits): ``x`` int8 or uint8, ``W`` int8, ``out_dtype`` int32 ->
  the IMMA dense kernel :func:`tvmq.kernels.cuda_mma.int8_dense_imma`
  (``mma.sync.m16n8k32.s32.s8.s8.s32``);
- fp16 (what ``ToMixedPrecision`` makes of a float conv under ``--precision fp16``): ``x``
  and ``W`` float16, ``out_dtype`` float32 or float16 -> :func:`tvmq.kernels.cuda_mma.fp16_dense_mma`
  (``mma.sync.m16n8k16``, fp32 accumulators; a float16 result is cast after the kernel);
- bf16 (``--precision bf16``, only with ``bf16=True``): ``x``, ``W`` and the result float32
  -> :func:`tvmq.kernels.cuda_mma.bf16_dense_mma`, the im2col rows rounded to bf16, the
  weight stored bf16, fp32 accumulation and result.

as::

    cols = call_tir(mma_im2col, x_nhwc)       # (M, K), M = N*OH*OW, K = KH*KW*C, padded
    acc = call_tir(dense, cols, W2 packed)     # (M, O) on tensor cores
    y = permute_dims(reshape(acc[:M, :O] [+ 128 * colsum(W2)]), NCHW)

The im2col kernel (:func:`tvmq.kernels.cuda_im2col.mma_im2col`) does the conv's padding, the
padding of ``M`` and ``K`` to the dense kernel's tiles and, for a uint8 ``x``, the shift to
int8 (``x - 128``), which the constant ``128 * colsum(W2)`` per output channel corrects:
the int8 result is the exact integer convolution. ``W2 = W.transpose(0, 2, 3, 1).reshape(O,
K).T`` is packed at compile time like a dense weight. The result stays channels last (NHWC)
between convolutions as long as it can (:mod:`tvmq.passes.channels_last`: the epilogue, pooling
and the next conv's im2col read it without a transpose).

Left alone: depthwise and other grouped convs, other layouts, non-constant weights, symbolic
shapes, other dtypes (they keep TVM's lowering: dlight's rules). On a non-CUDA target or an
arch before sm_80 the module is returned unchanged; no matching conv2d is left after a
rewrite, so the pass is idempotent. Run it with the other CUDA target-kernel passes, before
``LegalizeOps``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import tvm
from tvm import relax

from tvmq.kernels.cuda_im2col import mma_im2col
from tvmq.kernels.cuda_mma import (
    MmaTiles,
    bf16_dense_mma,
    choose_mma_tiles,
    fp16_dense_mma,
    int8_dense_imma,
    pack_weight_imma,
    padded_mkn_mma,
)

from .channels_last import TO_NCHW, ChannelsLastRewriter, match_nchw_conv2d, rewrite_channels_last
from .pack_fp16_dense_cuda import MmaPass
from .pack_int8_conv_x86 import match_int8_conv2d

_OPAQUE = 8  # FuseOps' kOpaque: the scheduled kernel is never fused with its neighbours
_SHIFT = 128
_NUMPY = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
_DENSE = {
    "float16": (fp16_dense_mma, "fp16_dense_mma"),
    "bfloat16": (bf16_dense_mma, "bf16_dense_mma"),
}


def match_fp16_conv2d(call: relax.Expr, dtype: str = "float16"):
    """``(x, geometry, W as numpy OIHW, out dtype)`` for an fp16 (or, with ``dtype``, float32)
    NCHW conv2d (groups 1)."""
    for out_dtype in ("float32", dtype):
        found = match_nchw_conv2d(call, (dtype,), dtype, out_dtype)
        if found is not None:
            x, geo, w, groups = found
            if groups == 1 and w.shape[1] == geo.x_shape[1]:
                return x, geo, w, out_dtype
    return None


class _Lowering:
    """The ``lower`` callback of :class:`ChannelsLastRewriter` (see the module docstring)."""

    def __init__(self, tiles: MmaTiles | None, bf16: bool):
        self.tiles, self.bf16 = tiles, bf16

    def __call__(self, rw: ChannelsLastRewriter, call: relax.Expr) -> relax.Expr | None:
        found = match_int8_conv2d(call)
        if found is not None:
            (x, geo, w), operand, out_dtype = found, "int8", "int32"
        elif (found := match_fp16_conv2d(call)) is not None:
            (x, geo, w, out_dtype), operand = found, "float16"
        elif self.bf16 and (found := match_fp16_conv2d(call, "float32")) is not None:
            (x, geo, w, out_dtype), operand = found, "bfloat16"
        else:
            return None
        bb = rw.builder_
        o, m, k = w.shape[0], geo.m, geo.k
        tiles = self.tiles or choose_mma_tiles(m, k, o, operand)
        mp, kp, np_ = padded_mkn_mma(m, k, o, tiles)
        x_dtype = str(x.ty.dtype)
        cols_fn = rw.kernel_var(
            ("im2col", geo, x_dtype, mp, kp),
            f"tvmq_mma_im2col_{mp}x{kp}",
            lambda: mma_im2col(geo, x_dtype, operand, mp, kp),
        )
        cols = relax.call_tir(
            cols_fn, [rw.nhwc_input(x)], out_ty=relax.TensorType((mp, kp), operand)
        )
        w2 = np.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(o, k).T)  # (K, O)
        if operand == "int8":
            weight, build, name = pack_weight_imma(w2, kp, np_), int8_dense_imma, "int8_dense_imma"
            acc = "int32"
        else:
            weight = np.zeros((kp, np_), dtype=_NUMPY[operand])
            weight[:k, :o] = w2.astype(_NUMPY[operand])
            build, name = _DENSE[operand]
            acc = "float32"
        dense_fn = rw.kernel_var(
            ("dense", operand, mp, kp, np_, tiles),
            f"tvmq_conv_{name}_{mp}x{kp}x{np_}",
            lambda: build(mp, kp, np_, tiles=tiles).with_attr("op_pattern", _OPAQUE),
        )
        args = [bb.emit(cols), relax.const(weight, str(weight.dtype))]
        y = bb.emit(relax.call_tir(dense_fn, args, out_ty=relax.TensorType((mp, np_), acc)))
        if mp != m or np_ != o:
            y = bb.emit(relax.op.strided_slice(y, axes=[0, 1], begin=[0, 0], end=[m, o]))
        if x_dtype == "uint8":  # cols hold x - 128
            fix = _SHIFT * w2.astype(np.int32).sum(axis=0)
            y = bb.emit(relax.op.add(y, relax.const(fix.astype(np.int32))))
        if out_dtype == "float16":
            y = bb.emit(relax.op.astype(y, "float16"))
        oh, ow = geo.out_hw
        y = bb.emit(relax.op.reshape(y, (geo.x_shape[0], oh, ow, o)))
        return relax.op.permute_dims(y, TO_NCHW)


@tvm.transform.module_pass(opt_level=0, name="PackMmaConvCUDA")
class PackMmaConvCUDA(MmaPass):
    """Lower fp16 and int8 NCHW conv2d with a constant weight to im2col + a tensor-core dense
    kernel on sm_80 and newer (see the module docstring; parameters: see :class:`MmaPass`);
    with ``bf16=True`` (``--precision bf16``) float32 ones too, on bf16 operands."""

    def __init__(self, target=None, tiles: MmaTiles | None = None, bf16: bool = False):
        super().__init__(target, tiles)
        self.bf16 = bf16

    def rewrite(self, mod: tvm.IRModule) -> tvm.IRModule:
        return rewrite_channels_last(mod, _Lowering(self.tiles, self.bf16))
