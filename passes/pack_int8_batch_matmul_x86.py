"""PackInt8BatchMatmulX86: int8 matmuls of two activations -> the batched VNNI kernel.

Static int8 quantizes attention's ``Q @ K^T`` and ``P @ V`` (``LowerInt8``'s activation
matmuls) into ``R.matmul(a, b, out_dtype="int32")`` with both operands int8 or uint8 and
computed at run time. TVM's default lowering of that integer matmul is slower than the
float one; when the target has ``avx512vnni`` this pass rewrites it into::

    a_u = a (uint8)  or  a + 128 (int8 a)                  # vpdpbusd: unsigned x signed
    b_s = b (int8)   or  b - 128 (uint8 b)
    packed = permute_dims(reshape(pad(b_s), [B, K/4, 4, N/16, 16]), [0, 3, 1, 4, 2])
    a @ b = call_tir(int8_batch_matmul_vnni, [reshape(pad(a_u), [B, M, K]), packed,
                     rowsum(a_u), colsum(b_s)])
          = acc + s_b * rowsum(a_u) - s_a * colsum(b_s) - s_a * s_b * K

(``s_a``, ``s_b``: the shifts, 0 or 128; terms with a zero shift are left out, and the
kernel adds the others to its accumulators before it stores them). The
packing is plain Relax (one injective kernel after fusion, usually merged with the
transpose that produced ``b``); batch dimensions are flattened, ``K`` padded to a
multiple of 4 and ``N`` of 16 with zeros, ``M`` to the register tile, and the padding
sliced off the result. Only matmuls whose operands have the same static batch dimensions
(no broadcasting) and a non-constant second operand are rewritten (a constant one is
:class:`PackInt8DenseX86`'s); without avx512vnni the module is returned unchanged.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from tvmq.kernels.vnni_intrin import LANES, REDUCE
from tvmq.kernels.x86_int8 import choose_tiles, int8_batch_matmul_vnni, padded_kn

from ._int8_dense import KernelRewriter, batch_matmul_dims, rewrite_functions, shift_bytes
from .pack_int8_dense_x86 import VNNIPass

_MATMUL = tvm.ir.Op.get("relax.matmul")
_INT8 = ("int8", "uint8")
_OPAQUE = 8  # FuseOps' kOpaque: the scheduled kernel is never fused with its neighbours
_SHIFT = 128


def match_int8_batch_matmul(call: relax.Expr):
    """``(a, b, batch dims, M, K, N)`` for a rewritable activation matmul, else None."""
    if not isinstance(call, relax.Call) or not call.op.same_as(_MATMUL):
        return None
    a, b = call.args
    if str(call.attrs.out_dtype) != "int32" or isinstance(b, tvm.ir.Constant):
        return None
    if any(not isinstance(x.ty, relax.TensorType) or str(x.ty.dtype) not in _INT8 for x in (a, b)):
        return None
    dims = batch_matmul_dims(a, b)
    return None if dims is None else (a, b, *dims)


@mutator
class _Rewriter(KernelRewriter):
    def match(self, call: relax.Call):
        return match_int8_batch_matmul(call)

    def _kernel(self, batch: int, mp: int, kp: int, np_: int, terms: dict) -> tvm.ir.GlobalVar:
        return self.kernel_var(
            (batch, mp, kp, np_, *terms.values()),
            f"tvmq_int8_batch_matmul_vnni_{batch}x{mp}x{kp}x{np_}" + ("_shifted" if terms else ""),
            lambda: int8_batch_matmul_vnni(batch, mp, kp, np_, **terms).with_attr(
                "op_pattern", _OPAQUE
            ),
        )

    def rewrite(self, a, b, batch: tuple[int, ...], m: int, k: int, n: int) -> relax.Expr:
        bb = self.builder_
        s_a = _SHIFT if str(a.ty.dtype) == "int8" else 0
        s_b = _SHIFT if str(b.ty.dtype) == "uint8" else 0
        a_u = bb.emit(shift_bytes(a, _SHIFT, "uint8")) if s_a else a
        b_s = bb.emit(shift_bytes(b, -_SHIFT, "int8")) if s_b else b
        kp, np_ = padded_kn(k, n)
        mp = choose_tiles(m, np_).m_padded
        nb = math.prod(batch)
        x = bb.emit(relax.op.reshape(a_u, (nb, m, k)))
        if (mp, kp) != (m, k):
            x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, mp - m, 0, kp - k]))
        w = bb.emit(relax.op.reshape(b_s, (nb, k, n)))
        if (kp, np_) != (k, n):
            w = bb.emit(relax.op.nn.pad(w, [0, 0, 0, kp - k, 0, np_ - n]))
        # The corrections (module docstring) from the padded operands, whose padding is 0;
        # the kernel adds them to its tiles.
        sums, terms = [], {}
        if s_b:  # b = b_s + s_b
            sums.append(bb.emit(relax.op.sum(relax.op.astype(x, "int32"), axis=[2])))
            terms["row_scale"] = s_b
        if s_a:  # a = a_u - s_a
            sums.append(bb.emit(relax.op.sum(relax.op.astype(w, "int32"), axis=[1])))
            terms["col_scale"] = -s_a
        if s_a and s_b:
            terms["constant"] = -s_a * s_b * k
        w = bb.emit(relax.op.reshape(w, (nb, kp // REDUCE, REDUCE, np_ // LANES, LANES)))
        w = bb.emit(relax.op.permute_dims(w, [0, 3, 1, 4, 2]))
        out_ty = relax.TensorType((nb, mp, np_), "int32")
        kernel = self._kernel(nb, mp, kp, np_, terms)
        y = bb.emit(relax.call_tir(kernel, [x, w, *sums], out_ty=out_ty))
        if (mp, np_) != (m, n):
            y = bb.emit(relax.op.strided_slice(y, axes=[1, 2], begin=[0, 0], end=[m, n]))
        return relax.op.reshape(y, (*batch, m, n))


@tvm.transform.module_pass(opt_level=0, name="PackInt8BatchMatmulX86")
class PackInt8BatchMatmulX86(VNNIPass):
    """Lower ``matmul(int8/uint8 a, int8/uint8 b, out_dtype=int32)`` of two activations to
    the batched VNNI kernel (see the module docstring; ``target``: see :class:`VNNIPass`)."""

    def rewrite(self, mod: tvm.IRModule, amx: bool) -> tvm.IRModule:
        return rewrite_functions(mod, _Rewriter(mod))
