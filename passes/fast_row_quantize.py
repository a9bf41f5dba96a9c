"""FastRowQuantize: ``QuantizeDynamic``'s per-row quantize as one kernel with no divide per value.

A dynamically quantized layer's input is quantized row by row (:mod:`dynamic_epilogue`'s
form, ``params = row_qparams_u8(x)``)::

    x_q = astype(clip(add(round(divide(x, s_x)), z_f), 0, 255), uint8)

TVM's kernel for it divides every value by its row's scale: a 512-bit ``vdivps`` a 16 values,
the slowest float operation on x86. Where no dense kernel quantizes its own rows (the VNNI
kernel's ``RowQuantize``), as on the AMX kernels of a transformer's second FFN layer
(DistilBERT's 128 x 3072 GELU output), that kernel took 107 us a layer, a row range 82.
:func:`tvmq.kernels.row_quantize.row_quantize_u8` computes the same bytes with one
reciprocal a row and a multiply and two FMAs a value (:func:`exact_quotient`). x86 targets
with FMA; static shapes.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvmq.kernels.row_quantize import row_quantize_u8

from .dynamic_epilogue import quantized_rows
from .pack_int8_dense_x86 import llvm_target_has
from .relax_utils import binding_map, relax_functions, static_shape


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod = mod
        self.values: dict = {}
        for _, func in relax_functions(mod):
            self.values.update(binding_map(func))
        self.kernels: dict[tuple[int, int], tvm.ir.GlobalVar] = {}
        self.changed = False

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        found = quantized_rows(binding.var, self.values, self.mod)
        shape = static_shape(binding.var)
        if found is None or shape is None or not shape:
            super().visit_var_binding_(binding)
            return
        x, params = (self.visit_expr(e) for e in found)
        rows, k = math.prod(shape[:-1]), shape[-1]
        kernel = self.kernels.get((rows, k))
        if kernel is None:
            kernel = self.builder_.add_func(row_quantize_u8(rows, k), "row_quantize_u8")
            self.kernels[(rows, k)] = kernel
        if len(shape) != 2:
            x = self.builder_.emit(relax.op.reshape(x, (rows, k)))
            params = self.builder_.emit(relax.op.reshape(params, (rows, 2)))
        value = relax.call_tir(kernel, [x, params], relax.TensorType((rows, k), "uint8"))
        if len(shape) != 2:
            value = relax.op.reshape(self.builder_.emit(value), shape)
        value = self.builder_.normalize(value)
        self.builder_.emit_normalized(relax.VarBinding(binding.var, value))
        self.changed = True


@tvm.transform.module_pass(opt_level=0, name="FastRowQuantize")
class FastRowQuantize:
    """``QuantizeDynamic``'s per-row quantize ops as :func:`row_quantize_u8` (module docstring).

    Parameters
    ----------
    target : tvm.target.Target or dict or str, optional
        The build target (default: the current one); a no-op unless it is x86 with ``fma``.
    """

    def __init__(self, target: tvm.target.Target | dict | str | None = None):
        self.target = tvm.target.Target(target) if target is not None else None

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = self.target or tvm.target.Target.current(allow_none=True)
        if not llvm_target_has(target, "fma"):
            return mod
        rewriter = _Rewriter(mod)
        for gv, func in relax_functions(mod):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        if not rewriter.changed:
            return mod
        # the divide, round, add and clip the kernel replaces
        return relax.transform.DeadCodeElimination()(rewriter.builder_.get())
