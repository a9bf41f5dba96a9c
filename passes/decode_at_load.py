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

The panels of a Winograd conv's matmul (a call of a kernel marked
:data:`~tvmq.kernels.cpu_winograd.PANELS_ATTR`: ``U = G g G^T``, 16 values per 9 of the 3x3
weight ``g``) are lifted too: the library stores ``g`` (recovered as ``L U L^T``; as 8-bit
codes where it has at most 256 values, an int8 model's), and ``main_transform_params``
computes ``U`` from it (:func:`~tvmq.kernels.cpu_winograd.winograd_weight_kernel`): ResNet-18
fp32 76 -> 47 MB, int8 on AVX2 69 -> 12 MB. ``U`` comes back exactly for integer weights,
within float32's rounding of it otherwise.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import tvm
from tvm import relax, te
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvmq.kernels.cpu_winograd import PANELS_ATTR, weight_from_panels, winograd_weight_kernel

from .relax_utils import is_tensor_const, op_name

FUNCTION = "main_transform_params"
"""The function the runtime calls once at load (TVM's ``LiftTransformParams`` name)."""
# dtype -> the largest code width worth storing (an 8-bit code saves nothing on int8)
_CODE_BITS = {"float32": 8, "int16": 8, "int8": 4, "uint8": 4}


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


class _Lifted(NamedTuple):
    """A constant of ``main`` that ``main_transform_params`` computes: ``value`` (the
    constant's, or with ``panels`` its 3x3 weight's) stored as it is (``bits`` 0) or as
    ``packed`` codes into ``value``'s distinct values; with ``panels`` ``(o_padded, c,
    lanes, int16)``, then transformed into Winograd panels (int16 ones: the int16 kernel's)."""

    param: relax.Var
    value: np.ndarray  # the table of distinct values where there are codes
    packed: np.ndarray | None = None
    bits: int = 0
    panels: tuple[int, int, int, bool] | None = None


@mutator
class _Lifter(PyExprMutator):
    """Replaces each encodable constant, and each Winograd matmul's panels, by a new
    parameter; remembers how to compute it."""

    def __init__(self, mod: tvm.IRModule, min_size: int):
        super().__init__(mod)
        self.mod, self.min_size = mod, min_size
        self.lifted: dict = {}  # constant -> _Lifted

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        panels = self._panels(call)
        if panels is None:
            return super().visit_call_(call)
        if panels not in self.lifted:
            self.lifted[panels] = self._panels_from_weight(panels)
        args = [self.visit_expr(a) for a in call.args[1].fields]
        args[1] = self.lifted[panels].param
        return relax.Call(
            call.op, [call.args[0], relax.Tuple(args), *call.args[2:]], call.attrs, call.ty_args
        )

    def _panels(self, call: relax.Call) -> relax.Constant | None:
        """The Winograd panels constant a ``call_tir`` of a :data:`PANELS_ATTR` kernel reads."""
        if op_name(call) != "relax.call_tir" or not isinstance(call.args[0], tvm.ir.GlobalVar):
            return None
        kernel = self.mod.functions.get(call.args[0])
        attrs = getattr(kernel, "attrs", None)
        if attrs is None or PANELS_ATTR not in attrs:
            return None
        panels = call.args[1].fields[1]
        return panels if is_tensor_const(panels) else None

    def _panels_from_weight(self, const: relax.Constant) -> _Lifted:
        panels = const.value.numpy()
        w = weight_from_panels(panels)
        param = relax.Var(f"winograd_{len(self.lifted)}", const.ty)
        int16 = panels.dtype == np.int16  # 4 U in channel pairs (the int16 kernel's)
        shape = (w.shape[0], w.shape[1], panels.shape[-2 if int16 else -1], int16)
        encoded = encode_values(w, _CODE_BITS["float32"])
        if encoded is None:
            return _Lifted(param, w, panels=shape)
        packed, table, bits = encoded
        return _Lifted(param, table, packed, bits, shape)

    def visit_generic_const_(self, const):
        if const in self.lifted:
            return self.lifted[const].param
        if not is_tensor_const(const):
            return const
        value = const.value.numpy()
        max_bits = _CODE_BITS.get(str(value.dtype))
        if max_bits is None or value.size < self.min_size:
            return const
        encoded = encode_values(value, max_bits)
        if encoded is None:
            return const
        packed, table, bits = encoded
        param = relax.Var(f"decoded_{len(self.lifted)}", const.ty)
        self.lifted[const] = _Lifted(param, table, packed, bits)
        return param


def _transform_params(mod: tvm.IRModule, lifted: list[_Lifted]) -> tvm.IRModule:
    """``mod`` plus ``main_transform_params``, which decodes (and, for Winograd panels,
    transforms) every lifted constant."""
    bb = relax.BlockBuilder(mod)
    kernels: dict = {}

    def kernel(name, build, *args):
        if (name, *args) not in kernels:
            kernels[name, *args] = bb.add_func(build(*args), name)
        return kernels[name, *args]

    with bb.function(FUNCTION, [], {"num_input": 0}):
        with bb.dataflow():
            outs = []
            for entry in lifted:
                # a Winograd entry stores its 3x3 weight (float32), whatever its panels hold
                dtype = str((entry.value if entry.panels else entry.param.ty).dtype)
                shape = entry.param.ty.shape
                if entry.panels is not None:
                    o, c, _, _ = entry.panels
                    shape = relax.ShapeExpr([o, c, 3, 3])
                if entry.bits:
                    name = f"tvmq_decode_{dtype}_{entry.bits}bit"
                    decode = kernel(name, decode_kernel, dtype, entry.bits)
                    size = math.prod(int(d) for d in shape.values)
                    args = [relax.const(entry.packed, "uint8"), relax.const(entry.value, dtype)]
                    flat = relax.TensorType((size,), dtype)
                    w = bb.emit(relax.call_tir(decode, args, out_ty=flat))
                    w = bb.emit(relax.op.reshape(w, shape))
                else:
                    w = relax.const(entry.value, dtype)
                if entry.panels is not None:
                    transform = kernel(
                        "tvmq_winograd_weight", winograd_weight_kernel, *entry.panels
                    )
                    w = bb.emit(relax.call_tir(transform, [w], out_ty=entry.param.ty))
                outs.append(w)
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
        params = [*main.params, *(entry.param for entry in lifted)]
        new_main = relax.Function(params, body, main.ret_ty, main.is_pure, main.attrs)
        new_main = new_main.with_attr("num_input", len(main.params))
        out = _transform_params(mod, lifted)
        out[main_gv] = new_main
        return out
