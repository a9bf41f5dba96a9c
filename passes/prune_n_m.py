"""PruneNM: N:M semi-structured sparsity (keep the N largest |w| of every M) on constant weights.

Runs on a float Relax module before ``LegalizeOps`` and before quantization or clustering,
on the same weight sites as :class:`PruneMagnitude` (constant matmul/conv2d weights).
Groups run along the reduction axis, the layout sparse tensor cores (2:4) expect: for a
Linear weight (``[out, in]`` in PyTorch, ``[K, N]`` as ``matmul`` reads it) that is the
input-feature axis, so each output neuron has ``n`` non-zeros in every ``m`` consecutive
inputs; for an OIHW conv2d weight it is the flattened ``I*H*W`` axis of each output channel.

Within a group the ``m - n`` entries of smallest ``|w|`` become 0.0, ties to the lower
index; running the pass twice equals running it once. A site whose reduction length is not
a multiple of ``m`` raises :class:`tvmq.errors.TvmqError` (``strict=True``, the default)
or is left dense (``strict=False``); ``skip`` names sites to leave alone. Shapes do not
change (the zeros pay off with 2:4 sparse kernels, not with TVM's dense ones).
"""

from __future__ import annotations

import numpy as np
import tvm

from tvmq.errors import TvmqError

from .relax_utils import replace_constants
from .sites import WeightSite, module_weight_sites, site_skipped


def reduction_matrix(site: WeightSite) -> np.ndarray:
    """The site's weight as [output channels, reduction length] (a copy)."""
    w = site.op_weight
    if site.kind == "matmul":
        return np.ascontiguousarray(w.T)
    return w.reshape(w.shape[0], -1).copy()


def from_reduction_matrix(site: WeightSite, rows: np.ndarray) -> np.ndarray:
    """Inverse of :func:`reduction_matrix`: back to the op layout."""
    if site.kind == "matmul":
        return np.ascontiguousarray(rows.T)
    return rows.reshape(site.op_weight.shape)


def n_m_mask(rows: np.ndarray, n: int, m: int) -> np.ndarray:
    """Boolean keep-mask of `rows` ([C, L], L % m == 0): the n largest |w| of each m."""
    c, length = rows.shape
    groups = np.abs(rows).reshape(c, length // m, m)
    order = np.argsort(groups, axis=-1, kind="stable")  # ascending, ties to the lower index
    keep = np.ones_like(groups, dtype=bool)
    np.put_along_axis(keep, order[..., : m - n], False, axis=-1)
    return keep.reshape(c, length)


@tvm.transform.module_pass(opt_level=0, name="PruneNM")
class PruneNM:
    """Keep the `n` largest-magnitude weights in every `m` along the reduction axis.

    Parameters
    ----------
    n, m : int
        ``0 < n <= m``; the default 2:4 is what NVIDIA sparse tensor cores run.
    strict : bool
        Raise on a site whose reduction length is not a multiple of `m` (default); with
        False such sites stay dense.
    skip : sequence of str
        Site names (``"matmul_1"``), source-model layer names (``"classifier"``) or fnmatch
        patterns of either (``"encoder.*"``), or op kinds (``"conv2d"``) to leave dense.
    """

    def __init__(self, n: int = 2, m: int = 4, strict: bool = True, skip=()) -> None:
        if int(m) < 1 or not 0 < int(n) <= int(m):
            raise TvmqError(f"N:M pruning needs 0 < n <= m, got n={n}, m={m}")
        self.n, self.m = int(n), int(m)
        self.strict = bool(strict)
        self.skip = tuple(str(s) for s in skip)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mapping = {}
        for site in module_weight_sites(mod):
            if site_skipped(site, self.skip) or site.const in mapping or self.n == self.m:
                continue
            rows = reduction_matrix(site)
            if rows.shape[1] % self.m:
                if not self.strict:
                    continue
                raise TvmqError(
                    f"{site.name}: reduction length {rows.shape[1]} (weight {list(site.op_weight.shape)}) "
                    f"is not a multiple of m={self.m}; skip this site (skip=[{site.name!r}]) "
                    "or pass strict=False"
                )
            keep = n_m_mask(rows, self.n, self.m)
            if not np.any(~keep & (rows != 0)):
                continue  # already N:M sparse: keep the very same constant
            rows[~keep] = 0.0
            mapping[site.const] = site.const_from_op_layout(from_reduction_matrix(site, rows))
        return replace_constants(mod, mapping)


def satisfies_n_m(mod: tvm.IRModule, n: int, m: int) -> dict[str, bool]:
    """Per weight site whose reduction length divides by `m`: at most `n` non-zeros per group."""
    out = {}
    for site in module_weight_sites(mod):
        rows = reduction_matrix(site)
        if rows.shape[1] % m == 0:
            nz = (rows.reshape(rows.shape[0], -1, m) != 0).sum(-1)
            out[site.name] = bool(np.all(nz <= n))
    return out
