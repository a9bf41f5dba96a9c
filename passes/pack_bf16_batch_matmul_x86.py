"""PackBf16BatchMatmulX86: float32 activation x activation matmuls -> bf16 AMX tiles (bf16).

Attention's ``Q @ K^T`` and ``P @ V`` have no constant operand, so :class:`PackBf16DenseX86`
leaves them to the float32 kernels. When the target has ``amx-bf16`` this pass rewrites
what :func:`~tvmq.passes.pack_float_batch_matmul.match_activation_matmul` accepts (same
static batch dims, big enough) with at least 16 rows::

    y = R.matmul(a, b)     # a: (*batch, M, K), b: (*batch, K, N) float32

into (:mod:`tvmq.kernels.x86_amx_bf16`)::

    ab = call_tir(to_bf16_rows, reshape(a, (B, M, K)))      # (B, Mp, Kp) bf16, padded
    bf = permute_dims(reshape(pad(b), (B, K'/2, 2, N'/16, 16)), [0, 3, 1, 2, 4])
    bp = call_tir(to_bf16_pairs, reshape(bf, (B * N'/16 * K'/2, 2, 16)))  # bf16 B tiles
    y2 = call_tir(bf16_batch_matmul_amx, reshape(ab), reshape(bp))  # (B * Mp, Np) float32
    y = reshape(strided_slice(reshape(y2, (B, Mp, Np))), (*batch, M, N))

The B-tile layout (``[B, N'/16, K'/2, 16, 2]``, each batch as
:func:`~tvmq.kernels.x86_amx_bf16.pack_weight_bf16`) is made in two steps: plain Relax ops
in float32 put each tile row's two K rows of 16 columns side by side (FuseOps merges that
into the kernel that produced ``b``, the head split), then ``to_bf16_pairs`` rounds and
interleaves them, 32-bit words at a time (vectorized). Interleaving in the float layout
instead left the head split's inner loop 2 elements long: DeiT-tiny's ``V`` packing ran
3.5x slower in situ, the whole model 3-5% slower. When ``b`` is ``K^T`` (a
``permute_dims`` swapping the last two axes, see
:func:`~tvmq.passes.pack_float_batch_matmul.transposed_source`), the packing reads ``K``
itself. Operands are rounded to bf16, products and sums stay float32.

Part of ``precision="bf16"`` only (:func:`tvmq.pipeline.run`), before the target kernel
passes (which would give these matmuls to :class:`PackFloatBatchMatmul`). A no-op without
AMX-BF16; idempotent.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from tvmq.kernels.x86_amx import TILE
from tvmq.kernels.x86_amx_bf16 import (
    bf16_batch_matmul_amx,
    bf16_padded,
    to_bf16_pairs,
    to_bf16_rows,
)
from tvmq.kernels.x86_int8_conv import OPAQUE

from ._int8_dense import KernelRewriter, rewrite_functions
from .pack_bf16_dense_x86 import MIN_ROWS, AmxBf16Pass
from .pack_float_batch_matmul import match_activation_matmul, transposed_source


@mutator
class _Rewriter(KernelRewriter):
    def match(self, call: relax.Call):
        found = match_activation_matmul(call, self.lookup_binding)
        return found if found is not None and found[3] >= MIN_ROWS else None

    def rewrite(self, a, b, batch: tuple[int, ...], m: int, k: int, n: int) -> relax.Expr:
        bb = self.builder_
        nb = math.prod(batch)
        mp, kp, np_ = bf16_padded(m, k, n)
        convert = self.kernel_var(
            ("bf16", nb, m, k, mp, kp),
            f"tvmq_to_bf16_{nb}x{mp}x{kp}",
            lambda: to_bf16_rows(m, k, mp, kp, batch=nb),
        )
        x = bb.emit(relax.op.reshape(a, (nb, m, k)))
        x = bb.emit(relax.call_tir(convert, [x], out_ty=relax.TensorType((nb, mp, kp), "uint16")))
        x = bb.emit(relax.op.reshape(x, (nb * mp, kp)))
        w = self._panels(b, nb, k, n, kp, np_)
        rows = nb * np_ // TILE * kp // 2  # B-tile rows: 16 pairs each
        pairs = self.kernel_var(
            ("pairs", rows), f"tvmq_to_bf16_pairs_{rows}", lambda: to_bf16_pairs(rows)
        )
        w = bb.emit(relax.op.reshape(w, (rows, 2, TILE)))
        w = bb.emit(relax.call_tir(pairs, [w], out_ty=relax.TensorType((rows, TILE, 2), "uint16")))
        w = bb.emit(relax.op.reshape(w, (nb * np_ // TILE, kp // 2, TILE, 2)))
        product = self.kernel_var(
            ("matmul", nb, mp, kp, np_),
            f"tvmq_bf16_batch_matmul_amx_{nb}x{mp}x{kp}x{np_}",
            lambda: bf16_batch_matmul_amx(nb, mp, kp, np_).with_attr("op_pattern", OPAQUE),
        )
        out_ty = relax.TensorType((nb * mp, np_), "float32")
        y = bb.emit(relax.call_tir(product, [x, w], out_ty=out_ty))
        y = bb.emit(relax.op.reshape(y, (nb, mp, np_)))
        if (mp, np_) != (m, n):
            y = bb.emit(relax.op.strided_slice(y, axes=[1, 2], begin=[0, 0], end=[m, n]))
        return relax.op.reshape(y, (*batch, m, n))

    def _panels(self, b: relax.Expr, nb: int, k: int, n: int, kp: int, np_: int) -> relax.Expr:
        """``b`` as float32 ``[nb, N'/16, K'/2, 2, 16]`` (the B-tile layout, each pair of K
        rows not yet interleaved), zero-padded: plain Relax, fused into whatever produced
        ``b`` (the head split)."""
        bb = self.builder_
        source = transposed_source(b, self.lookup_binding)
        if source is not None:  # (.., N, K): the pairs of k are next to each other
            w = bb.emit(relax.op.reshape(source, (nb, n, k)))
            if (np_, kp) != (n, k):
                w = bb.emit(relax.op.nn.pad(w, [0, 0, 0, np_ - n, 0, kp - k]))
            w = bb.emit(relax.op.reshape(w, (nb, np_ // TILE, TILE, kp // 2, 2)))
            return bb.emit(relax.op.permute_dims(w, [0, 1, 3, 4, 2]))
        w = bb.emit(relax.op.reshape(b, (nb, k, n)))
        if (kp, np_) != (k, n):
            w = bb.emit(relax.op.nn.pad(w, [0, 0, 0, kp - k, 0, np_ - n]))
        w = bb.emit(relax.op.reshape(w, (nb, kp // 2, 2, np_ // TILE, TILE)))
        return bb.emit(relax.op.permute_dims(w, [0, 3, 1, 2, 4]))


@tvm.transform.module_pass(opt_level=0, name="PackBf16BatchMatmulX86")
class PackBf16BatchMatmulX86(AmxBf16Pass):
    """Lower float32 ``matmul(a, b)`` of two activations to bf16 AMX tiles (see the module
    docstring; ``target``: see :class:`~tvmq.passes.pack_bf16_dense_x86.AmxBf16Pass`)."""

    def rewrite(self, mod: tvm.IRModule) -> tvm.IRModule:
        return rewrite_functions(mod, _Rewriter(mod), relax.analysis.remove_all_unused)
