"""FoldConstantCasts: casts, transposes and reshapes of constants become constants; nothing
else folds.

``ToMixedPrecision`` leaves each weight as ``astype(W, "float16")`` (and a linear layer's
``permute_dims`` after it); folding those makes the weights fp16 constants that the
tensor-core passes match and the library stores in 2 bytes. TVM's ``FoldConstant`` did that
here before, but it folds whatever it can evaluate: in all-MiniLM-L6-v2 at batch 32 it also
turned each attention layer's ``full_like`` (the zeros that fully masked rows take) into a
(32, 12, 128, 128) float32 constant of 25 MB, and the library grew to 57 MiB (163 MB of float32
constants) where its weights are 27 MB. Each op folded here gives a constant no larger than
the one it reads. A cast is folded with numpy (round to nearest even, as TVM's cast does); a
cast to a type numpy lacks (bfloat16) is left to the build.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .relax_utils import ASTYPE, PERMUTE_DIMS, RESHAPE, is_tensor_const, map_functions, op_name


@mutator
class _Folder(PyExprMutator):
    def _constant(self, expr: relax.Expr) -> np.ndarray | None:
        if isinstance(expr, relax.Var):
            expr = self.lookup_binding(expr)
        return expr.value.numpy() if expr is not None and is_tensor_const(expr) else None

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        op = op_name(call)
        if op not in (ASTYPE, PERMUTE_DIMS, RESHAPE):
            return call
        value = self._constant(call.args[0])
        if value is None:
            return call
        if op == ASTYPE:
            try:
                dtype = np.dtype(str(call.attrs.dtype))
            except TypeError:
                return call
            return relax.const(value.astype(dtype), str(call.attrs.dtype))
        if op == PERMUTE_DIMS:
            axes = call.attrs.axes
            folded = np.transpose(value, None if axes is None else [int(a) for a in axes])
        else:
            shape = call.ty.shape
            if shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in shape):
                return call
            folded = value.reshape([int(d) for d in shape])
        return relax.const(np.ascontiguousarray(folded), str(value.dtype))


@tvm.transform.module_pass(opt_level=0, name="FoldConstantCasts")
class FoldConstantCasts:
    """Casts, transposes and reshapes of constants folded (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return map_functions(mod, lambda _gv, func: _Folder(mod).visit_expr(func))
