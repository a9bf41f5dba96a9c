"""PruneMagnitude: zero the smallest-magnitude entries of constant matmul/conv2d weights.

Unstructured pruning on a float Relax module, before ``LegalizeOps`` and before any
quantization or weight clustering (both read the pruned weights). A *weight site* is a
``matmul(x, W)`` with a constant 2-D ``W`` (also ``W = permute_dims(constant)``, as the
PyTorch importer writes ``nn.Linear``) or an NCHW/OIHW ``conv2d(x, W)`` with a constant
``W``. Sites are named ``matmul_0``, ``conv2d_1``, ... in dataflow order (the same names
the calibration/int8 passes use); functions other than ``main`` prefix their name.

For every site of at least ``min_size`` elements, the ``round(sparsity * size)`` entries of
smallest ``|w|`` become exactly 0.0 (``scope="layer"``: per tensor; ``scope="global"``: one
threshold over all sites together). Ties are broken by position (the earlier entry in
site order, then row-major order, is pruned first), so the result is deterministic and
pruning to the same sparsity twice equals pruning once. Biases, batch-norm parameters
and weights under ``min_size`` are left alone. Shapes do not change: the zeros only pay
off with sparse kernels or compression; :func:`tvmq.passes.analysis.sparsity_report` reads
what was reached back from the IR. Sites are :mod:`tvmq.passes.sites`' weight sites, so
``skip`` names the same layers as a quantization scheme's ``skip``.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from tvmq.errors import TvmqError

from .relax_utils import replace_constants
from .sites import module_weight_sites, site_skipped


def count_to_prune(sparsity: float, size: int) -> int:
    """``round(sparsity * size)``, halves rounded up."""
    return int(np.floor(sparsity * size + 0.5))


def _mask_smallest(values: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask (flat) of the `k` smallest |values|, ties to the lower index."""
    mask = np.zeros(values.size, dtype=bool)
    if k > 0:
        order = np.argsort(np.abs(values.ravel()), kind="stable")
        mask[order[:k]] = True
    return mask


@tvm.transform.module_pass(opt_level=0, name="PruneMagnitude")
class PruneMagnitude:
    """Zero the smallest-|w| entries of constant matmul/conv2d weights.

    Parameters
    ----------
    sparsity : float
        Fraction of entries to zero, in [0, 1).
    scope : {"layer", "global"}
        ``"layer"``: every eligible tensor reaches `sparsity`; ``"global"``: one magnitude
        threshold over all eligible tensors, so their total reaches `sparsity`.
    min_size : int
        Weights with fewer elements are left dense (first/last tiny layers hurt most).
    skip : sequence of str
        Site names (``"matmul_1"``), source-model layer names (``"classifier"``) or fnmatch
        patterns of either (``"encoder.*"``), or op kinds (``"conv2d"``) to leave dense.
    """

    def __init__(self, sparsity: float, scope: str = "layer", min_size: int = 256, skip=()) -> None:
        if not 0.0 <= float(sparsity) < 1.0:
            raise TvmqError(f"sparsity must be in [0, 1), got {sparsity}")
        if scope not in ("layer", "global"):
            raise TvmqError(f"scope must be 'layer' or 'global', got {scope!r}")
        if int(min_size) < 0:
            raise TvmqError(f"min_size must be >= 0, got {min_size}")
        self.sparsity = float(sparsity)
        self.scope = scope
        self.min_size = int(min_size)
        self.skip = tuple(str(s) for s in skip)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        sites = [
            s
            for s in module_weight_sites(mod)
            if not site_skipped(s, self.skip) and s.const.value.numpy().size >= self.min_size
        ]
        # A constant shared by two ops is pruned once.
        unique: dict = {}
        for s in sites:
            unique.setdefault(s.const, s)
        sites = list(unique.values())
        if not sites or self.sparsity == 0.0:
            return mod
        arrays = [s.const.value.numpy() for s in sites]
        masks = []
        if self.scope == "layer":
            masks = [_mask_smallest(a, count_to_prune(self.sparsity, a.size)) for a in arrays]
        else:
            flat = np.concatenate([a.ravel() for a in arrays])
            mask = _mask_smallest(flat, count_to_prune(self.sparsity, flat.size))
            offsets = np.cumsum([0] + [a.size for a in arrays])
            masks = [mask[offsets[i] : offsets[i + 1]] for i in range(len(arrays))]
        mapping = {}
        for s, a, m in zip(sites, arrays, masks, strict=True):
            if not np.any(m & (a.ravel() != 0)):
                continue  # already pruned: keep the very same constant
            new = a.copy().ravel()
            new[m] = 0.0
            mapping[s.const] = relax.const(new.reshape(a.shape), str(a.dtype))
        return replace_constants(mod, mapping)
