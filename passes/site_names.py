"""Layer names from the source model on the sites, and skip lists checked against all names.

Sites (:mod:`.sites`, :mod:`.tensor_sites`) are named ``<kind>_<index>`` in dataflow order.
A frontend that knows the model's own name of a layer (the PyTorch module path
``encoder.0.fc``, the ONNX node name ``/encoder/encoder.0/fc/Gemm``) records it on the op's
span with :func:`tag_layer_names`; :class:`~.sites.WeightSite` reads it back as
``layer_names``. :func:`check_skip` refuses a skip pattern that selects nothing, listing names
that exist; :func:`layer_table` is what ``tvmq inspect`` prints.
"""

from __future__ import annotations

from collections.abc import Mapping

import tvm
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvmq.core.selectors import KIND_NAMES, is_kind_name
from tvmq.errors import TvmqError

from .relax_utils import layer_span, map_functions, relax_functions, site_prefix, with_span
from .sites import list_weight_sites, site_label, site_skipped
from .tensor_sites import list_tensor_sites

__all__ = ["check_skip", "layer_table", "tag_layer_names"]


@mutator
class _Tagger(PyExprMutator):
    """Rebuilds the tagged calls with a span that carries their names; copies the rest."""

    def __init__(self, mod, names: Mapping):
        super().__init__(mod)
        self.names = names

    def visit_call_(self, call):
        new = super().visit_call_(call)
        names = self.names.get(call)
        return with_span(new, layer_span(names)) if names else new


def tag_layer_names(mod: tvm.IRModule, names: Mapping) -> tvm.IRModule:
    """`mod` with each call in `names` (call -> tuple of names, first the display name)
    rebuilt to carry its source-model names."""
    names = {call: tuple(str(n) for n in ns if n) for call, ns in names.items()}
    names = {call: ns for call, ns in names.items() if ns}
    if not names:
        return mod
    return map_functions(mod, lambda _gv, func: _Tagger(mod, names).visit_expr(func))


def _all_sites(mod: tvm.IRModule) -> list:
    sites = []
    for gv, func in relax_functions(mod):
        prefix = site_prefix(gv)
        sites += list_weight_sites(func, prefix)
        sites += list_tensor_sites(func, prefix)
    return sites


def check_skip(mod: tvm.IRModule, skip, what: str = "skip") -> None:
    """Raise one ``TvmqError`` for a pattern of `skip` that selects no site of `mod`.

    A pattern may name a site (``matmul_2``), one of its source-model names
    (``classifier``), an fnmatch pattern of either (``encoder.*``), or an op kind
    (``linear``, ``conv2d``: never an error, a model may simply have none).
    """
    patterns = [p for p in (skip or ()) if not is_kind_name(p)]
    if not patterns:
        return
    sites = _all_sites(mod)
    for pattern in patterns:
        if any(site_skipped(s, (pattern,)) for s in sites):
            continue
        labels = [site_label(s) for s in sites]
        shown = ", ".join(labels[:8]) + (
            f", ... ({len(labels) - 8} more)" if len(labels) > 8 else ""
        )
        raise TvmqError(
            f"{what} pattern {pattern!r} matches no layer of the model; its layers: "
            f"{shown or 'none'} (`tvmq inspect MODEL` lists them all; op kinds: "
            f"{', '.join(KIND_NAMES)})"
        )


def layer_table(mod: tvm.IRModule) -> list[dict]:
    """One row per weight site of `mod`: name, kind, weight shape, source-model names."""
    rows = []
    for gv, func in relax_functions(mod):
        for s in list_weight_sites(func, site_prefix(gv)):
            rows.append(
                {
                    "name": s.name,
                    "kind": s.kind,
                    "weight_shape": [int(d) for d in s.weight.shape],
                    "layer_names": list(s.layer_names),
                }
            )
    return rows
