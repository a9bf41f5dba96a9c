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
kernel adds the others to its accumulators before it stores them). ``LowerInt8``'s
zero-point terms after the matmul (``- z_b * rowsum(a) - z_a * colsum(b) + c``, see
:func:`find_zero_point_terms`) join the kernel's the same way: ``rowsum(a) = rowsum(a_u) -
K * s_a`` and ``colsum(b) = colsum(b_s) + K * s_b``, so the kernel stores the whole sum
with one row and one column term (MiniLM int8: two passes over the int32 scores and two
row / column sums less a layer). The
packing is plain Relax (one injective kernel after fusion, usually merged with the
transpose that produced ``b``); batch dimensions are flattened, ``K`` padded to a
multiple of 4 and ``N`` of 16 with zeros, ``M`` to the register tile, and the padding
sliced off the result. Only matmuls whose operands have the same static batch dimensions
(no broadcasting) and a non-constant second operand are rewritten (a constant one is
:class:`PackInt8DenseX86`'s); without avx512vnni the module is returned unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from tvmq.kernels.vnni_intrin import LANES, REDUCE
from tvmq.kernels.x86_int8 import choose_tiles, int8_batch_matmul_vnni, padded_kn

from ._int8_dense import KernelRewriter, batch_matmul_dims, rewrite_functions, shift_bytes
from .pack_int8_dense_x86 import VNNIPass
from .relax_utils import ADD, alias_binding, dataflow_bindings, op_name, scalar_value
from .requantize_epilogue import chain_step

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


@dataclass(frozen=True)
class ZeroPointTerms:
    """``LowerInt8``'s ``acc - z_b * rowsum(a) - z_a * colsum(b) + c`` after an activation
    matmul ``acc``: its ints (0 where a term is absent), its ops' vars and the last one."""

    z_b: int
    z_a: int
    c: int
    chain: tuple[relax.Var, ...]

    @property
    def result(self) -> relax.Var:
        return self.chain[-1]


def _int_const(expr: relax.Expr) -> int | None:
    value = scalar_value(expr)
    return value if value is not None and str(expr.ty.dtype) == "int32" else None


def find_zero_point_terms(mod: tvm.IRModule) -> dict[relax.Var, ZeroPointTerms]:
    """For each int8 activation matmul var of ``mod``'s dataflow blocks followed (each value
    read once) by ``LowerInt8``'s zero-point terms, the terms."""
    bindings = list(dataflow_bindings(mod))
    values = {b.var: b.value for b, _ in bindings}

    def summed(term, operand, axis: int) -> int | None:
        """``z`` when ``term`` is ``multiply(sum(astype(operand, int32), [axis], keepdims), z)``."""
        mul = values.get(term)
        if op_name(mul) != "relax.multiply" or (z := _int_const(mul.args[1])) is None:
            return None
        total = values.get(mul.args[0])
        if op_name(total) != "relax.sum" or not total.attrs.keepdims:
            return None
        axes = [int(a) for a in total.attrs.axis or ()]
        cast = values.get(total.args[0])
        ndim = operand.ty.ndim
        if axes not in ([axis], [axis - ndim]) or op_name(cast) != "relax.astype":
            return None
        return z if cast.args[0].same_as(operand) and str(cast.attrs.dtype) == "int32" else None

    found = {}
    for binding, only_user in bindings:
        if match_int8_batch_matmul(binding.value) is None:
            continue
        a, b = binding.value.args
        z_b = z_a = c = 0
        chain = [binding.var]
        step = chain_step(chain, only_user)
        while True:
            if (sub := step("relax.subtract")) is not None:
                zb = summed(sub.args[1], a, a.ty.ndim - 1)
                za = summed(sub.args[1], b, b.ty.ndim - 2)
                if zb is not None and not z_b:
                    z_b = zb
                elif za is not None and not z_a:
                    z_a = za
                else:  # another subtraction: not a term of the kernel's
                    chain.pop()
                    break
            elif not c and (add := step(ADD)) is not None:
                c = _int_const(add.args[1]) or 0
                if not c:
                    chain.pop()
                    break
            else:
                break
        if chain[1:]:
            found[binding.var] = ZeroPointTerms(z_b, z_a, c, tuple(chain[1:]))
    return found


@mutator
class _Rewriter(KernelRewriter):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.terms = find_zero_point_terms(mod)
        # a chain's var -> its matmul's var
        self.folded = {v: m for m, t in self.terms.items() for v in t.chain}
        self.binding_var = None

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        matmul = self.folded.get(binding.var)
        if matmul is not None:  # the kernel stored this sum already
            if binding.var.same_as(self.terms[matmul].result):
                alias_binding(self, binding.var, matmul)
            return
        self.binding_var = binding.var
        super().visit_var_binding_(binding)

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
        zp = self.terms.get(self.binding_var, ZeroPointTerms(0, 0, 0, ()))
        row, col = s_b - zp.z_b, -s_a - zp.z_a
        constant = k * (-s_a * s_b + zp.z_b * s_a - zp.z_a * s_b) + zp.c
        sums, terms = [], {}
        if row:
            sums.append(bb.emit(relax.op.sum(relax.op.astype(x, "int32"), axis=[2])))
            terms["row_scale"] = row
        if col:
            sums.append(bb.emit(relax.op.sum(relax.op.astype(w, "int32"), axis=[1])))
            terms["col_scale"] = col
        if constant:
            terms["constant"] = constant
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
        # the zero-point terms' sums the kernel made unused go
        return rewrite_functions(mod, _Rewriter(mod), relax.analysis.remove_all_unused)
