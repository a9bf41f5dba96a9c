"""DecodeAtLoad: store large constants with few distinct values as a codebook and narrow codes,
decoded once when the library is loaded.

Runs on a fused module (after ``LegalizeOps`` / ``FoldConstant`` / ``FuseTIR``, so every
layout a kernel wants is already folded into its constants). Each constant of ``main`` with
at least ``min_size`` elements and at most 16 distinct values (4-bit codes, two a byte), or,
for float32, at most 256 (8-bit codes), becomes a parameter of ``main``, and a new function
computes it from its codes::

    main(x) = ... call_tir(kernel, x, C) ...             # C: float32 / int8 constant
    ==>
    main_transform_params() = (call_tir(decode, P, T),)  # P: uint8 codes, T: the values
    main(x, C) = ... call_tir(kernel, x, C) ...          # attribute num_input = 1

The names and the calling convention are those of TVM's ``LiftTransformParams``: the
runtime calls ``main_transform_params`` once at load and passes its outputs after the
inputs on every call of ``main`` (``tvmq.runtime``). ``LiftTransformParams`` itself needs
the weights as parameters, and tvmq embeds them as constants whose kernel layouts are known
only after fusion; this pass lifts just the decoding, which is exact: ``T[P]`` gives the
constant back bit for bit (a ``-0.0`` as ``0.0``). Kernels read the decoded tensor as they
read the constant, so tuning records and kernel speed are those of the float (or int8)
model, and the library keeps the compressed size: weight sharing (``ClusterWeights``, whose
decoders :class:`FoldTableDecoders` folded) leaves ``2**bits`` values per weight, and the
int8 weights of ``ClusterInt8Weights`` at most 16. Other constants are left alone.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax, te
from tvm.relax.expr_functor import PyExprMutator, mutator

from .relax_utils import is_tensor_const

FUNCTION = "main_transform_params"
"""The function the runtime calls once at load (TVM's ``LiftTransformParams`` name)."""
# dtype -> the largest code width worth storing (an 8-bit code saves nothing on int8)
_CODE_BITS = {"float32": 8, "int8": 4, "uint8": 4}


def encode_values(values: np.ndarray, max_bits: int) -> tuple[np.ndarray, np.ndarray, int] | None:
    """``(packed codes uint8, table, bits)`` with ``table[codes] == values``, or None when
    `values` has more than ``2**max_bits`` distinct values. 4-bit codes are packed two a
    byte (element ``2i`` in the low nibble, ``2i + 1`` in the high one)."""
    flat = values.ravel()
    table, codes = np.unique(flat, return_inverse=True)
    bits = 4 if table.size <= 16 else 8
    if bits > max_bits or table.size > 256:
        return None
    codes = codes.astype(np.uint8)
    if bits == 4:
        codes = np.concatenate([codes, np.zeros(codes.size % 2, np.uint8)])
        codes = codes[0::2] | (codes[1::2] << 4)
    return np.ascontiguousarray(codes), table.astype(values.dtype), bits


def decode_values(packed: np.ndarray, table: np.ndarray, bits: int, shape) -> np.ndarray:
    """Inverse of :func:`encode_values` (the numpy reference of the decode kernel)."""
    size = math.prod(shape)
    codes = packed if bits == 8 else np.stack([packed & 15, packed >> 4], axis=1).ravel()
    return table[codes[:size]].reshape(shape)


def decode_kernel(dtype: str, bits: int) -> tvm.tirx.PrimFunc:
    """``(P, T) -> W``: ``W[i] = T[code i of P]`` (codes as :func:`encode_values` packs them).

    One kernel per dtype and code width serves every constant: the lengths of ``P``, ``T``
    and ``W`` are symbolic (the caller reshapes ``W``). It runs once, at load.
    """
    n, m, t = (tvm.tirx.Var(v, "int64") for v in ("n", "m", "t"))
    packed = te.placeholder((m,), "uint8", name="P")
    table = te.placeholder((t,), dtype, name="T")

    def decode(i):
        if bits == 8:
            code = packed[i]
        else:
            shift = (i % 2 * 4).astype("uint8")
            code = (packed[i // 2] >> shift) & tvm.tirx.const(15, "uint8")
        return table[code.astype("int64")]

    out = te.compute((n,), decode, name="W")
    return te.create_prim_func([packed, table, out]).without_attr("global_symbol")


@mutator
class _Lifter(PyExprMutator):
    """Replaces each encodable constant by a new parameter; remembers its codes."""

    def __init__(self, mod: tvm.IRModule, min_size: int):
        super().__init__(mod)
        self.min_size = min_size
        self.lifted: dict = {}  # constant -> (param, packed, table, bits)

    def visit_generic_const_(self, const):
        if const in self.lifted:
            return self.lifted[const][0]
        if not is_tensor_const(const):
            return const
        value = const.value.numpy()
        max_bits = _CODE_BITS.get(str(value.dtype))
        if max_bits is None or value.size < self.min_size:
            return const
        encoded = encode_values(value, max_bits)
        if encoded is None:
            return const
        param = relax.Var(f"decoded_{len(self.lifted)}", const.ty)
        self.lifted[const] = (param, *encoded)
        return param


def _transform_params(mod: tvm.IRModule, lifted) -> tvm.IRModule:
    """``mod`` plus ``main_transform_params``, which decodes every lifted constant."""
    bb = relax.BlockBuilder(mod)
    kernels: dict = {}
    with bb.function(FUNCTION, [], {"num_input": 0}):
        with bb.dataflow():
            outs = []
            for param, packed, table, bits in lifted:
                dtype = str(param.ty.dtype)
                if (dtype, bits) not in kernels:
                    kernel = decode_kernel(dtype, bits)
                    kernels[dtype, bits] = bb.add_func(kernel, f"tvmq_decode_{dtype}_{bits}bit")
                size = math.prod(int(d) for d in param.ty.shape.values)
                args = [relax.const(packed, "uint8"), relax.const(table, dtype)]
                flat = relax.TensorType((size,), dtype)
                w = bb.emit(relax.call_tir(kernels[dtype, bits], args, out_ty=flat))
                outs.append(bb.emit(relax.op.reshape(w, param.ty.shape)))
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    return bb.get()


@tvm.transform.module_pass(opt_level=0, name="DecodeAtLoad")
class DecodeAtLoad:
    """Lift ``main``'s constants of few distinct values into ``main_transform_params``.

    Parameters
    ----------
    min_size : int
        Constants with fewer elements stay in ``main`` as they are.
    """

    def __init__(self, min_size: int = 256):
        self.min_size = int(min_size)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        main_gv = mod.get_global_var("main")
        main = mod[main_gv]
        if FUNCTION in [gv.name_hint for gv in mod.get_global_vars()]:
            return mod  # already done
        lifter = _Lifter(mod, self.min_size)
        body = lifter.visit_expr(main.body)
        if not lifter.lifted:
            return mod
        lifted = list(lifter.lifted.values())
        params = [*main.params, *(p for p, *_ in lifted)]
        new_main = relax.Function(params, body, main.ret_ty, main.is_pure, main.attrs)
        new_main = new_main.with_attr("num_input", len(main.params))
        out = _transform_params(mod, lifted)
        out[main_gv] = new_main
        return out
