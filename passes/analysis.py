"""Read-only analyses of Relax modules: what is left in float, sizes, MACs, sparsity.

None of these rewrites anything; the passes record their results with them
(:func:`with_float_ops`) and the driver reports them (``tvmq.compression.model_stats``,
``tvmq.quantization.quantize``'s report, ``model.json``).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .relax_utils import (
    CONV2D,
    MATMUL,
    binding_map,
    is_tensor_const,
    op_name,
    ordered_bindings,
    relax_functions,
)
from .sites import SITE_OPS, is_activation_matmul, module_weight_sites


def _shape(expr) -> list[int]:
    return [int(s) for s in expr.ty.shape]


FLOAT_OPS_ATTR = "tvmq.float_ops"


def with_float_ops(func: relax.Function) -> relax.Function:
    """``func`` with :data:`FLOAT_OPS_ATTR` listing what still computes in float now
    (recomputed, so ops an earlier pass listed and a later one lowered drop out)."""
    floats = float_compute_ops(func)
    return func.with_attr(FLOAT_OPS_ATTR, floats) if floats else func.without_attr(FLOAT_OPS_ATTR)


def float_compute_ops(func: relax.Function) -> list[str]:
    """``"<op>:<var>"`` for every matmul / conv2d that still computes in float.

    ``<op>`` is the site kind: ``matmul``, ``conv2d``, or ``matmul_act`` for a matmul of
    two activations (``_quant_sites.is_activation_matmul``).
    """
    bindings = binding_map(func)
    out = []
    for b in ordered_bindings(func):
        name = op_name(b.value)
        if name in (MATMUL, CONV2D) and str(b.value.ty.dtype).startswith("float"):
            kind = "matmul_act" if is_activation_matmul(b.value, bindings) else SITE_OPS[name]
            out.append(f"{kind}:{b.var.name}")
    return out


def count_params(mod: tvm.IRModule) -> int:
    """Elements of the distinct constant tensors in the Relax functions of `mod`."""
    seen: dict = {}

    def visit(e):
        if is_tensor_const(e):
            seen[e] = int(np.prod(e.value.shape))

    for _, func in relax_functions(mod):
        relax.analysis.post_order_visit(func, visit)
    return int(sum(seen.values()))


def count_macs(mod: tvm.IRModule) -> int:
    """Multiply-accumulates of every matmul and conv2d with static shapes in `mod`."""
    total = 0
    for _, func in relax_functions(mod):
        for b in ordered_bindings(func):
            name = op_name(b.value)
            if name == "relax.matmul":
                k = _shape(b.value.args[0])[-1]
                total += int(np.prod(_shape(b.var))) * k
            elif name == "relax.nn.conv2d":
                w = _shape(b.value.args[1])
                total += int(np.prod(_shape(b.var))) * int(np.prod(w[1:]))
    return total


def constant_bytes(mod: tvm.IRModule) -> int:
    """Bytes of the distinct constant tensors in the Relax functions of `mod`."""
    seen: dict = {}

    def visit(expr):
        if is_tensor_const(expr):
            seen[expr] = expr.value.numpy().nbytes

    for _, func in relax_functions(mod):
        relax.analysis.post_order_visit(func, visit)
    return int(sum(seen.values()))


def sparsity_report(mod: tvm.IRModule) -> dict:
    """Zeros per weight site, read from the IR.

    Returns ``{"sites": {name: {"kind", "shape", "size", "zeros", "sparsity"[, "source"]}}, "size",
    "zeros", "sparsity"}``; the totals cover every constant matmul/conv2d weight.
    """
    sites = {}
    size = zeros = 0
    for s in module_weight_sites(mod):
        w = s.op_weight
        z = int(np.count_nonzero(w == 0))
        sites[s.name] = {
            "kind": s.kind,
            "shape": list(w.shape),
            "size": int(w.size),
            "zeros": z,
            "sparsity": z / w.size if w.size else 0.0,
        }
        if s.source:
            sites[s.name]["source"] = s.source
        size += int(w.size)
        zeros += z
    return {"sites": sites, "size": size, "zeros": zeros, "sparsity": zeros / size if size else 0.0}
