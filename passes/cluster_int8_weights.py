"""ClusterInt8Weights: weight sharing on quantized weights, an int8 codebook per tensor.

Runs inside static int8 quantization, between ``FoldQuantScales`` (weights are int8
constants) and ``LowerInt8`` (which derives the zero-point terms from them: the
``int8_cluster`` parameter of ``static_int8_passes``), on the int8 weight constants of
matmul / conv2d layers (read through ``dequantize``, ``permute_dims`` / ``reshape``, or
directly). The quantizer has already chosen each weight's per-output-channel scales ``s``,
so ``W ~ s * q`` with ``q`` int8; this pass clusters the int8 values ``q`` of each tensor by
1-D k-means into ``2**bits`` centroids, rounds the centroids to integers and replaces ``q``
by ``T[idx]``::

    matmul(x, dequantize(Q, s))         # Q: int8 constant, any of 255 values
    ==>
    matmul(x, dequantize(T[idx], s))    # an int8 constant holding <= 2**bits values

So the weight shares ``2**bits`` levels of its (per-channel) normalised range: clustering
``W / s`` with an int8 codebook. Scales, zero points and biases are unchanged, and the int8
kernels run as for any int8 model. The constant stays a plain int8 tensor in the IR; with
at most 16 values the build stores it as 4-bit codes and a 16-byte table, decoded once at
load (:class:`DecodeAtLoad`), which is where the size gain comes from. Exact zeros (pruned
weights, or values that rounded to 0) keep a centroid of 0.

Layers the quantizer left float are not touched (leave a layer out of both with the
scheme's ``skip``). What was clustered is recorded on ``main`` as ``"tvmq.clustered"``,
each layer by its op kind and its index among the int8 weights (``matmul_0``).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvmq.errors import TvmqError

from .cluster_weights import ATTR, INITS, _assign, cluster_tensor
from .relax_utils import (
    CONV2D,
    DEQUANTIZE,
    MATMUL,
    binding_map,
    const_source,
    op_name,
    ordered_bindings,
    relax_functions,
    site_prefix,
    view_source,
)

_INT8 = ("int8", "uint8")


def cluster_int8_tensor(
    q: np.ndarray, bits: int, init: str = "kmeans++", seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(table, idx)``: at most ``2**bits`` integer values (dtype of `q`, sorted) and the
    index of each element's nearest (uint8, shape of `q`), from k-means on the values of `q`."""
    codebook, _ = cluster_tensor(q.astype(np.float32), bits, init, seed)
    table = np.unique(np.clip(np.rint(codebook), int(q.min()), int(q.max())))
    idx = _assign(q.astype(np.float64).ravel(), table)
    return table.astype(q.dtype), idx.astype(np.uint8).reshape(q.shape)


def _int8_weights(func: relax.Function) -> list[tuple[str, tvm.ir.Constant]]:
    """``(name, constant)`` of each int8 matmul / conv2d weight of `func`, in dataflow order."""
    bindings = binding_map(func)
    found, seen, counts = [], set(), {}
    for b in ordered_bindings(func):
        name = op_name(b.value)
        if name not in (MATMUL, CONV2D) or len(b.value.args) < 2:
            continue
        src = const_source(b.value.args[1], bindings)
        if src is None:  # before LowerInt8: the op reads dequantize(Q, s, z)
            dq = view_source(b.value.args[1], bindings, lambda e: op_name(e) == DEQUANTIZE)
            src = const_source(dq[0].args[0], bindings) if dq is not None else None
        if src is None or str(src[0].value.dtype) not in _INT8 or src[0] in seen:
            continue
        kind = "matmul" if name == MATMUL else "conv2d"
        found.append((f"{kind}_{counts.get(kind, 0)}", src[0]))
        counts[kind] = counts.get(kind, 0) + 1
        seen.add(src[0])
    return found


@mutator
class _Replace(PyExprMutator):
    def __init__(self, mod, new):
        super().__init__(mod)
        self.new = new

    def visit_generic_const_(self, const):
        return self.new.get(const, const)


@tvm.transform.module_pass(opt_level=0, name="ClusterInt8Weights")
class ClusterInt8Weights:
    """Share the values of int8 weights: ``2**bits`` integer levels per tensor.

    Parameters
    ----------
    bits : int
        1..4 (at most 16 levels: stored as 4-bit codes by :class:`DecodeAtLoad`).
    init : {"kmeans++", "linear", "density"}
        Centroid initialisation, as for :class:`ClusterWeights`.
    min_size : int
        Weights with fewer elements are left as they are.
    seed : int
        Seed of the k-means++ sampling.
    """

    def __init__(self, bits: int = 4, init: str = "kmeans++", min_size: int = 256, seed: int = 0):
        if not 1 <= int(bits) <= 4:
            raise TvmqError(
                f"int8 weights share at most 16 values (bits 1..4), got bits={bits}: an int8 "
                "weight is already 8 bits"
            )
        if init not in INITS:
            raise TvmqError(f"init must be one of {INITS}, got {init!r}")
        self.bits, self.init = int(bits), init
        self.min_size, self.seed = int(min_size), int(seed)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        new, record = {}, {}
        for gv, func in relax_functions(mod):
            prefix = site_prefix(gv)
            for name, const in _int8_weights(func):
                q = const.value.numpy()
                if q.size < self.min_size or const in new:
                    continue
                table, idx = cluster_int8_tensor(q, self.bits, self.init, self.seed)
                new[const] = relax.const(table[idx], str(q.dtype))
                record[prefix + name] = {
                    "bits": self.bits,
                    "dtype": str(q.dtype),
                    "distinct": int(table.size),
                    "bytes_before": int(q.nbytes),
                    "bytes_after": int(table.nbytes + (q.size + 1) // 2),
                }
        if not new:
            return mod
        replace = _Replace(mod, new)
        out = tvm.IRModule({gv: f for gv, f in mod.functions_items()}, attrs=mod.attrs)
        for gv, func in relax_functions(mod):
            func = replace.visit_expr(func)
            if gv.name_hint == "main":
                old = dict(func.attrs[ATTR]) if func.attrs and ATTR in func.attrs else {}
                func = func.with_attr(ATTR, {**old, **record})
            out[gv] = func
        return out
