"""FoldTableDecoders: ``ClusterWeights``' codebook decoders -> the float weights they decode.

``ClusterWeights`` stores a weight as a codebook and packed indices and decodes it in the
graph, on every call. For CPU targets tvmq decodes it once at load instead (see
:class:`DecodeAtLoad`): this pass evaluates each decoder call on its constants at compile
time::

    w = tvmq_cluster_matmul_0(codebook, indices)     # a private decoder function
    ==>
    w = <float32 constant: codebook[indices]>

so that the float kernels (``PackFloatDense``, default schedules, tuning records) see a
plain float weight, exactly as in the float model. The weight holds only the codebook's
values, which is what :class:`DecodeAtLoad` finds again after fusion to store it as a
codebook and narrow codes in the library. Left alone: weight-only (w8 / w4) decoders,
decoder calls on anything but constants, and conv2d (4-D) weights, which keep their graph
decoder: ``FoldBatchNorm`` would scale a folded conv weight per channel, leaving too many
distinct values to store it as codes again. Where it belongs: first of the CPU target kernel
passes, before ``PackDecodedDense`` (which would otherwise decode inside its kernel).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._int8_dense import rewrite_functions
from .cluster_weights import decode_table
from .quantize_weight_only import DECODER_ATTR
from .relax_utils import is_tensor_const, static_shape


@mutator
class _Folder(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod = mod
        self.changed = False

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.GlobalVar):
            return call
        func = self.mod.functions.get(call.op) if call.op in self.mod.functions else None
        if not isinstance(func, relax.Function) or func.attrs is None:
            return call
        if DECODER_ATTR not in func.attrs or not all(is_tensor_const(a) for a in call.args):
            return call
        shape = static_shape(call)
        if shape is None or len(shape) != 2 or len(call.args) != 2:
            return call
        weight = decode_table(*(a.value.numpy() for a in call.args), shape)
        if weight is None:
            return call
        self.changed = True
        return relax.const(weight, "float32")


@tvm.transform.module_pass(opt_level=0, name="FoldTableDecoders")
class FoldTableDecoders:
    """Replace calls of ``ClusterWeights``' decoders on constants by the decoded weights."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        folder = _Folder(mod)
        out = rewrite_functions(mod, folder, relax.analysis.remove_all_unused)
        if not folder.changed:
            return out
        # The decoders are no longer called: drop them (DeadCodeElimination keeps every
        # function unless told the entry points: the public ones).
        entries = [
            gv.name_hint
            for gv, f in out.functions_items()
            if f.attrs is not None and "global_symbol" in f.attrs
        ]
        return relax.transform.DeadCodeElimination(entries)(out)
