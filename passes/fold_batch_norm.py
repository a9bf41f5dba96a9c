"""FoldBatchNorm: inference ``batch_norm`` after a conv2d -> the conv's weight and one bias add.

``batch_norm(conv2d(x, W) [+ b])[0]`` with constant parameters becomes
``conv2d(x, W * f) + (b * f + t)``, ``f = gamma / sqrt(var + eps)``, ``t = beta - mean * f``
(rewrite 2 of :class:`FoldQuantScales`, which static int8 runs; this pass is that rewrite
alone, for float models). Besides saving the per-element scale and shift, it leaves the
conv followed by plain elementwise ops, which the CPU conv kernels keep channels last
(:class:`PackFloatConv`). Where it belongs: before the target kernels and ``LegalizeOps``.
Running it twice is the same as once.
"""

from __future__ import annotations

import tvm

from .fold_quant_scales import fold_module


@tvm.transform.module_pass(opt_level=0, name="FoldBatchNorm")
class FoldBatchNorm:
    """Fold inference batch_norms into the convs before them (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return fold_module(mod, quantization=False)
