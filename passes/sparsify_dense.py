"""SparsifyDense: float32 matmuls with a block-sparse constant weight -> a BSR kernel.

Rewrites, on an LLVM (CPU) target::

    y = R.matmul(x, W)     # x: (..., K) float32, static shape
                           # W: (K, N) float32 constant, or permute_dims of an (N, K)
                           #    constant as the PyTorch importer writes nn.Linear

into a ``call_tir`` to a BSR kernel of :mod:`tvmq.kernels.sparse`, with the weight packed
at compile time as ``W^T`` (``[N, K]``) in BSR: ``data``/``indices``/``indptr`` become
constants and the dense weight leaves the module. Batched activations (``M`` >= the SIMD
width) go to :func:`~tvmq.kernels.sparse.bsr_dense_tiled` (``x`` transposed by a
``permute_dims``, ``M`` padded to the tile), small ``M`` to
:func:`~tvmq.kernels.sparse.bsr_dense_rows`; ``nn.pad`` / ``strided_slice`` / ``reshape``
around the call handle ragged ``K``, ``N``, ``M`` and leading dimensions.

A weight is rewritten only when its *block* sparsity (the fraction of all-zero
``block``-sized tiles of ``W^T``) is at least ``min_sparsity``; the defaults come from
``bench/bench_sparse.py`` (BERT FFN GEMMs, 128 rows, against tvmq's default dense
schedule on AVX-512): see the class docstring. Every weight site's decision is recorded
as the function attribute ``"tvmq.sparse"``: a list of ``{"layer", "source", "shape",
"block", "sparsity", "chosen", "reason"}`` (``layer`` is the site name ``matmul_0``... of
:func:`tvmq.passes.sites.list_weight_sites`, ``source`` its name in the source model or "").

Where it belongs: after pruning (:class:`PruneMagnitude` with 1x1 blocks, or a block /
structured pruning for larger blocks), instead of quantization for those layers, and
before ``LegalizeOps``. The kernels are marked ``tirx.is_scheduled``. A function that
already carries ``"tvmq.sparse"`` is left alone (so running the pass twice changes
nothing); a module without float constant-weight matmuls, or a non-LLVM target (CUDA),
is returned unchanged. Limits: float32 only; no conv2d; no batched (3-D) weights; the
activation's shape must be static.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvmq.errors import TvmqError
from tvmq.kernels.sparse import (
    bsr_dense_rows,
    bsr_dense_tiled,
    choose_bsr_tiles,
    kernel_arrays,
    pack_bsr,
    simd_lanes,
)

from .relax_utils import relax_functions, site_prefix, static_shape
from .sites import list_weight_sites

SPARSE_ATTR = "tvmq.sparse"
"""Relax function attribute listing :class:`SparsifyDense`'s decision for every weight site."""

_DEFAULT_LANES = 8  # no target known: AVX2 / two NEON registers


@mutator
class _SparseRewriter(PyExprMutator):
    """Replaces each planned matmul call by pad -> (transpose) -> call_tir(BSR) -> slice."""

    def __init__(self, mod: tvm.IRModule, block: tuple[int, int], lanes: int):
        super().__init__(mod)
        self.block = block
        self.lanes = lanes
        self.plans: dict = {}  # original matmul Call -> (x shape, packed weight)
        self.kernels: dict[tuple, tvm.ir.GlobalVar] = {}

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        plan = self.plans.get(call)
        if plan is None:
            return super().visit_call_(call)
        x = self.visit_expr(call.args[0])
        return self._lower(x, *plan)

    def _kernel(self, key: tuple, make) -> tvm.ir.GlobalVar:
        if key not in self.kernels:
            variant, m, k, n, nnzb = key[:5]
            bs_r, bs_c = self.block
            name = f"tvmq_bsr_dense_{variant}_{bs_r}x{bs_c}_{m}x{k}x{n}_nnzb{nnzb}"
            self.kernels[key] = self.builder_.add_func(make(), name)
        return self.kernels[key]

    def _lower(self, x: relax.Expr, x_shape: tuple[int, ...], packed) -> relax.Expr:
        bb = self.builder_
        n, k = packed.shape
        n_pad, k_pad = packed.padded_shape
        m = math.prod(x_shape[:-1])
        data, indices, indptr = kernel_arrays(packed)
        nnzb = int(indices.shape[0])
        consts = [
            relax.const(data, "float32"),
            relax.const(indices, "int32"),
            relax.const(indptr, "int32"),
        ]
        if len(x_shape) != 2:
            x = bb.emit(relax.op.reshape(x, (m, k)))
        if m >= self.lanes:
            tiles = choose_bsr_tiles(m, self.block[0], self.lanes)
            m_out = tiles.m_padded
            if m_out != m or k_pad != k:
                x = bb.emit(relax.op.nn.pad(x, [0, m_out - m, 0, k_pad - k]))
            x = bb.emit(relax.op.permute_dims(x, [1, 0]))
            key = ("tiled", m_out, k_pad, n_pad, nnzb, tiles.mt)
            kernel = self._kernel(
                key, lambda: bsr_dense_tiled(m_out, k_pad, n_pad, nnzb, self.block, tiles.mt)
            )
        else:
            m_out = m
            if k_pad != k:
                x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, k_pad - k]))
            key = ("rows", m, k_pad, n_pad, nnzb)
            kernel = self._kernel(key, lambda: bsr_dense_rows(m, k_pad, n_pad, nnzb, self.block))
        out_ty = relax.TensorType((m_out, n_pad), "float32")
        y = bb.emit(relax.call_tir(kernel, [x, *consts], out_ty=out_ty))
        if m_out != m or n_pad != n:
            y = bb.emit(relax.op.strided_slice(y, axes=[0, 1], begin=[0, 0], end=[m, n]))
        if len(x_shape) != 2:
            return relax.op.reshape(y, (*x_shape[:-1], n))
        return y


@tvm.transform.module_pass(opt_level=0, name="SparsifyDense")
class SparsifyDense:
    """Run float32 matmuls whose constant weight is block-sparse enough on a BSR kernel.

    Parameters
    ----------
    min_sparsity : float
        Rewrite a weight when at least this fraction of its ``block`` tiles is all zero.
        ``bench/bench_sparse.py`` (BERT FFN GEMMs, 128 rows, AVX-512, against tvmq's
        default dense schedule) measured every block size (1x1, 4x1, 16x1) already faster
        than dense at 50%, the lowest sparsity measured (1.4-2x for 1x1, 3-7x for 16x1);
        the default 0.7 is where all of them won by 1.9x or more, a margin for a
        MetaSchedule-tuned dense kernel (faster than the default one, not measured).
    block : (int, int)
        ``(bs_r, bs_c)``: rows (output features) x columns (inputs) of a BSR block. 16x1
        was the fastest per stored weight; 1x1 fits unstructured magnitude pruning
        (a 16x1 tile of a 90% unstructured-pruned weight is all zero only ~19% of the time).
    target : tvm.target.Target or dict or str, optional
        Sets the SIMD width of the kernels. Defaults to ``tvm.target.Target.current()``;
        with neither, a generic CPU (8 float lanes) is assumed. Non-LLVM targets: no-op.
    """

    def __init__(
        self,
        min_sparsity: float = 0.7,
        block: tuple[int, int] = (16, 1),
        target: tvm.target.Target | dict | str | None = None,
    ) -> None:
        if not 0.0 <= float(min_sparsity) <= 1.0:
            raise TvmqError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
        block = tuple(int(b) for b in block)
        if len(block) != 2 or min(block) < 1:
            raise TvmqError(f"block must be two sizes >= 1, got {block}")
        self.min_sparsity = float(min_sparsity)
        self.block = block
        self.target = tvm.target.Target(target) if target is not None else None

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = self.target or tvm.target.Target.current(allow_none=True)
        if target is not None and target.kind.name != "llvm":
            return mod
        lanes = simd_lanes(target) if target is not None else _DEFAULT_LANES
        rewriter = _SparseRewriter(mod, self.block, lanes)
        records: dict = {}
        for gv, func in relax_functions(mod):
            if func.attrs is not None and SPARSE_ATTR in func.attrs:
                continue
            sites = [s for s in list_weight_sites(func, site_prefix(gv)) if s.kind == "matmul"]
            if sites:
                records[gv] = [self._decide(s, rewriter) for s in sites]
        if not records:
            return mod
        updates = {}
        for gv, func in relax_functions(mod):
            if gv not in records:
                continue
            new = rewriter.visit_expr(func)
            if not new.same_as(func):
                new = relax.analysis.remove_all_unused(new)  # the dense weight's permute_dims
            updates[gv] = new.with_attr(SPARSE_ATTR, records[gv])
        new_mod = rewriter.builder_.get() if rewriter.kernels else mod
        out = tvm.IRModule(dict(new_mod.functions.items()), mod.attrs)
        for gv, func in updates.items():
            out[gv] = func
        return out

    def _decide(self, site, rewriter: _SparseRewriter) -> dict:
        """Plan one site's rewrite (in ``rewriter.plans``) and say why or why not."""
        w_nk = np.ascontiguousarray(site.op_weight.T)
        bs_r, bs_c = self.block
        record = {
            "layer": site.name,
            "source": site.source,
            "shape": [int(d) for d in w_nk.shape],
            "block": f"{bs_r}x{bs_c}",
        }
        packed = pack_bsr(w_nk, self.block)
        sparsity = packed.block_sparsity
        record["sparsity"] = round(float(sparsity), 4)
        x_shape = static_shape(site.call.args[0])
        if x_shape is None or len(x_shape) < 2 or 0 in x_shape:
            reason, chosen = "activation shape is not static (or not a matrix)", False
        elif sparsity < self.min_sparsity:
            reason = f"block sparsity {sparsity:.3f} < min_sparsity {self.min_sparsity}"
            chosen = False
        else:
            reason = f"block sparsity {sparsity:.3f} >= min_sparsity {self.min_sparsity}"
            chosen = True
            rewriter.plans[site.call] = (x_shape, packed)
        record["chosen"] = chosen
        record["reason"] = reason
        return record
