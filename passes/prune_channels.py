"""PruneChannels: structured pruning that removes output channels and really shrinks tensors.

Runs on a float Relax module before ``LegalizeOps`` (and before ``FoldBatchnormToConv2D``,
quantization or clustering). For each *producer*, a matmul (``[K, N]`` weight, also
``permute_dims`` of a constant as ``nn.Linear`` imports) or a ``groups=1`` NCHW/OIHW conv2d
with a constant weight, it drops the ``round(ratio * C)`` output channels of smallest weight
norm (L1 or L2 over the channel's weights; ties keep the lower index) and, to match, the
input channels of every consumer. It follows the producer's output through

* elementwise ops with a constant operand (bias ``add``, also a ``reshape``-d bias as the
  PyTorch importer writes conv biases; ``subtract``, ``multiply``, ``divide``), sliced along
  the channel axis unless they broadcast over it;
* unary elementwise ops (``relu``, ``gelu``, ``silu``, ``sigmoid``, ``tanh``, ``clip``, ...),
  ``nn.batch_norm`` on the channel axis (its gamma, beta, mean and variance are sliced),
  NCHW ``max_pool2d`` / ``avg_pool2d`` / ``adaptive_avg_pool2d``, ``zeros_like`` and
  tuples / tuple items (the importer wraps pools that way);
* a flattening ``reshape`` (``[N, C, H, W] -> [N, C*H*W]``): channel ``c`` is then the block
  of features ``c*H*W .. (c+1)*H*W - 1``;

up to a matmul (as activation, reduction on the last axis) or groups=1 conv2d (as data)
with a constant weight, whose input rows/channels are removed. A producer is left alone when
its output reaches anything else (the function's result, a residual ``add`` of two
activations, concat, a shared constant, ...). Removing channel ``c`` is exact: the pruned
model equals the original with the consumers' inputs for ``c`` zeroed.

What was pruned (and why other producers were not) is recorded on ``main`` as the attribute
``"tvmq.pruned_channels"``: ``{"pruned": {site: {"before", "after", "kept"}}, "skipped":
{site: reason}}``. Producers are judged on the original weights; running the pass twice
prunes twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvmq.errors import TvmqError

from .relax_utils import (
    binding_map,
    is_tensor_const,
    op_name,
    ordered_bindings,
    relax_functions,
    site_prefix,
    update_functions,
)
from .sites import WeightSite, list_weight_sites, site_skipped

ATTR = "tvmq.pruned_channels"

_UNARY = {
    "relax.nn.relu",
    "relax.nn.relu6",
    "relax.nn.gelu",
    "relax.nn.gelu_tanh",
    "relax.nn.silu",
    "relax.nn.leakyrelu",
    "relax.sigmoid",
    "relax.tanh",
    "relax.clip",
    "relax.zeros_like",
    "relax.ones_like",
    "relax.negative",
    "relax.exp",
}
_POOLS = {"relax.nn.max_pool2d", "relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d"}
_BINARY = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide"}
_RESHAPE = "relax.reshape"
_BATCH_NORM = "relax.nn.batch_norm"


@dataclass(frozen=True)
class _Chan:
    """Channel c of the producer is the block [c*block, (c+1)*block) of this tensor's axis."""

    axis: int
    block: int


class _CannotFollow(Exception):
    """The producer's channels reach something this pass cannot slice."""


@dataclass
class _Edits:
    """Slices to apply: constants by (axis -> kept indices), reshapes by (axis -> length)."""

    consts: dict = field(default_factory=dict)  # Constant -> {axis: indices}
    const_views: dict = field(default_factory=dict)  # Constant -> reshaped view shape
    reshapes: dict = field(default_factory=dict)  # reshape Call -> {axis: new length}

    def slice_const(self, const, axis: int, index: np.ndarray, view=None) -> None:
        per = self.consts.setdefault(const, {})
        if axis in per or (view is not None and self.const_views.get(const, view) != view):
            raise _CannotFollow("a constant is sliced twice on one axis")
        per[axis] = index
        if view is not None:
            self.const_views[const] = view

    def resize(self, call, axis: int, length: int) -> None:
        per = self.reshapes.setdefault(call, {})
        if axis in per:
            raise _CannotFollow("a reshape is resized twice on one axis")
        per[axis] = length

    def merge(self, other: _Edits) -> None:
        for const, per in other.consts.items():
            for axis, index in per.items():
                self.slice_const(const, axis, index, other.const_views.get(const))
        for call, per in other.reshapes.items():
            for axis, length in per.items():
                self.resize(call, axis, length)


def _shape(expr) -> list[int]:
    return [int(s) for s in expr.ty.shape]


def channel_norms(site: WeightSite, norm: str) -> np.ndarray:
    """L1 or L2 norm of each output channel's weights."""
    w = np.moveaxis(site.op_weight, site.weight_axis, 0).reshape(
        site.op_weight.shape[site.weight_axis], -1
    )
    w = w.astype(np.float64)
    return np.abs(w).sum(1) if norm == "l1" else np.sqrt((w * w).sum(1))


def kept_channels(norms: np.ndarray, ratio: float) -> np.ndarray:
    """Sorted indices of the channels kept: all but the round(ratio*C) smallest norms."""
    c = norms.size
    remove = min(int(np.floor(ratio * c + 0.5)), c - 1)
    order = np.argsort(-norms, kind="stable")  # largest first, ties to the lower index
    return np.sort(order[: c - remove])


class _Graph:
    """Bindings in order, the vars each reads, and how often each var/constant is read."""

    def __init__(self, func: relax.Function):
        self.bindings = ordered_bindings(func)
        self.values = binding_map(func)
        self.reads: dict = {}
        self.const_uses: dict = {}
        self.var_uses: dict = {}
        for b in self.bindings:
            reads = []

            def visit(e, reads=reads):
                if isinstance(e, relax.Var):
                    reads.append(e)
                    self.var_uses[e] = self.var_uses.get(e, 0) + 1
                if is_tensor_const(e):
                    self.const_uses[e] = self.const_uses.get(e, 0) + 1

            relax.analysis.post_order_visit(b.value, visit)
            self.reads[b.var] = reads
        self.returned = []
        relax.analysis.post_order_visit(
            func.body.body, lambda e: self.returned.append(e) if isinstance(e, relax.Var) else None
        )


def _follow(graph: _Graph, sites: dict, site: WeightSite, keep: np.ndarray, edits: _Edits):
    """Walk from a producer to its consumers, collecting the slices; raise if impossible."""
    channels = site.op_weight.shape[site.weight_axis]
    edits.slice_const(site.const, site.perm[site.weight_axis], keep)
    out_ndim = len(_shape(site.var))
    states = {site.var: _Chan(out_ndim - 1 if site.kind == "matmul" else 1, 1)}

    def expand(block):
        return (keep[:, None] * block + np.arange(block)[None, :]).ravel()

    # Bindings are in dataflow order, so every input's state is known when a use is reached.
    for b in graph.bindings:
        tracked = [v for v in graph.reads[b.var] if v in states]
        if not tracked:
            continue
        if not isinstance(b, relax.VarBinding):
            raise _CannotFollow("used in a match_cast")
        state = _step(graph, sites, b, tracked, states, channels, expand, edits)
        if state is not None:
            states[b.var] = state
    if any(v in states for v in graph.returned):
        raise _CannotFollow("its output is part of the function's result")


def _const_operand(graph: _Graph, arg):
    """(constant, reshape call or None) if `arg` is a constant or a reshaped constant."""
    if is_tensor_const(arg):
        return arg, None
    value = graph.values.get(arg) if isinstance(arg, relax.Var) else None
    if op_name(value) == _RESHAPE and is_tensor_const(value.args[0]):
        if graph.var_uses.get(arg, 0) != 1:
            raise _CannotFollow("a reshaped constant is shared")
        return value.args[0], value
    return None, None


def _step(graph, sites, b, tracked, states, channels, expand, edits):
    """The channel state of `b.var` given its tracked inputs (None: not channel-indexed)."""
    value = b.value
    if isinstance(value, relax.Tuple):
        return tuple(states.get(f) if isinstance(f, relax.Var) else None for f in value.fields)
    if isinstance(value, relax.TupleGetItem):
        state = states[value.tuple_value]
        return state[value.index] if isinstance(state, tuple) else None
    if len(set(tracked)) != 1 or len(tracked) != 1:
        raise _CannotFollow(f"{op_name(value)} reads it more than once")
    var = tracked[0]
    state = states[var]
    if isinstance(state, tuple):
        raise _CannotFollow(f"a tuple reaches {op_name(value) or type(value).__name__}")
    axis, block = state.axis, state.block
    name = op_name(value)
    if name in _UNARY and value.args[0].same_as(var):
        return state
    if name in _POOLS and block == 1 and axis == 1 and value.attrs.layout == "NCHW":
        return state
    if name in _BINARY:
        return _step_binary(graph, b, var, state, channels, expand, edits)
    if name == _BATCH_NORM and value.args[0].same_as(var) and block == 1:
        ndim = len(_shape(var))
        if int(value.attrs.axis) % ndim != axis:
            raise _CannotFollow("batch_norm over another axis")
        for p in value.args[1:]:
            if not is_tensor_const(p) or graph.const_uses.get(p) != 1:
                raise _CannotFollow("batch_norm parameters are not private constants")
            edits.slice_const(p, 0, expand(1))
        return (state, _Chan(0, 1), _Chan(0, 1))
    if name == _RESHAPE and value.args[0].same_as(var):
        src, dst = _shape(var), _shape(b.var)
        if (
            dst[:axis] == src[:axis]
            and len(dst) == axis + 1
            and dst[axis] == int(np.prod(src[axis:]))
        ):
            inner = int(np.prod(src[axis + 1 :]))
            edits.resize(value, axis, len(expand(1)) * block * inner)
            return _Chan(axis, block * inner)
        raise _CannotFollow(f"reshape {src} -> {dst} mixes channels")
    site = sites.get(b.var)
    if site is not None and site.call.args[0].same_as(var) and not site.call.args[1].same_as(var):
        if site.perm is None:
            raise _CannotFollow(f"{site.name}'s weight is a reshaped constant")
        if site.kind == "matmul" and axis == len(_shape(var)) - 1:
            edits.slice_const(site.const, site.perm[0], expand(block))
            return None
        if site.kind == "conv2d" and axis == 1 and block == 1 and int(site.call.attrs.groups) == 1:
            edits.slice_const(site.const, site.perm[1], expand(1))
            return None
    raise _CannotFollow(f"it feeds {name or type(value).__name__}")


def _step_binary(graph, b, var, state, channels, expand, edits):
    axis, block = state.axis, state.block
    value = b.value
    lhs, rhs = value.args
    other = rhs if lhs.same_as(var) else lhs
    if other.same_as(var):
        raise _CannotFollow("an op reads it twice")
    const, reshape = _const_operand(graph, other)
    if const is None:
        raise _CannotFollow(f"{op_name(value)} with another activation (e.g. a residual)")
    if graph.const_uses.get(const) != 1:
        raise _CannotFollow("a shared constant")
    ndim = len(_shape(var))
    view = _shape(reshape) if reshape is not None else list(const.value.shape)
    if len(view) > ndim or _shape(b.var) != _shape(var):
        raise _CannotFollow("a constant operand broadcasts the activation")
    aligned = axis - (ndim - len(view))
    if aligned >= 0 and view[aligned] != 1:
        if view[aligned] != channels * block:
            raise _CannotFollow("a constant operand of unexpected shape")
        index = expand(block)
        if reshape is None:
            edits.slice_const(const, aligned, index)
        else:
            edits.slice_const(const, aligned, index, view=tuple(view))
            edits.resize(reshape, aligned, len(index))
    return state


def _sliced(const, per_axis: dict, view) -> tvm.ir.Constant:
    data = const.value.numpy()
    orig_shape = data.shape
    if view is not None:
        data = data.reshape(view)
    for axis, index in per_axis.items():
        data = np.take(data, index, axis=axis)
    if view is not None and len(orig_shape) == 1:
        data = data.ravel()
    return relax.const(np.ascontiguousarray(data), str(data.dtype))


@mutator
class _Slicer(PyExprMutator):
    """Applies the slices; types of everything downstream are re-inferred."""

    def __init__(self, mod, consts: dict, reshapes: dict):
        super().__init__(mod)
        self.consts = consts
        self.reshapes = reshapes

    def visit_generic_const_(self, const):
        return self.consts.get(const, const)

    def visit_call_(self, call):
        per = self.reshapes.get(call)
        if per is None:
            return super().visit_call_(call)
        shape = [int(s) for s in call.ty.shape]
        for axis, length in per.items():
            shape[axis] = length
        return relax.op.reshape(self.visit_expr(call.args[0]), shape)


def _prune_function(mod, func, prefix, ratio, norm, skip=()):
    graph = _Graph(func)
    sites_list = list_weight_sites(func, prefix)
    sites = {s.var: s for s in sites_list}
    edits = _Edits()
    pruned, skipped = {}, {}
    for site in sites_list:
        if site_skipped(site, skip):
            skipped[site.name] = "skipped by the config"
            continue
        if site.kind == "conv2d" and int(site.call.attrs.groups) != 1:
            skipped[site.name] = "grouped convolution"
            continue
        if graph.const_uses.get(site.const) != 1:
            skipped[site.name] = "its weight is shared"
            continue
        if site.perm is None:
            skipped[site.name] = "its weight is a reshaped constant"
            continue
        norms = channel_norms(site, norm)
        keep = kept_channels(norms, ratio)
        if keep.size == norms.size:
            skipped[site.name] = "nothing to remove at this ratio"
            continue
        mine = _Edits()
        try:
            _follow(graph, sites, site, keep, mine)
            trial = _Edits()
            trial.merge(edits)
            trial.merge(mine)
        except _CannotFollow as e:
            skipped[site.name] = str(e)
            continue
        edits = trial
        pruned[site.name] = {
            "before": int(norms.size),
            "after": int(keep.size),
            "kept": [int(i) for i in keep],
        }
    if not pruned:
        return None, skipped
    consts = {c: _sliced(c, per, edits.const_views.get(c)) for c, per in edits.consts.items()}
    new = _Slicer(mod, consts, edits.reshapes).visit_expr(func)
    return relax.analysis.remove_all_unused(new), {"pruned": pruned, "skipped": skipped}


@tvm.transform.module_pass(opt_level=0, name="PruneChannels")
class PruneChannels:
    """Remove the weakest output channels of Linear/conv layers and the inputs that read them.

    Parameters
    ----------
    ratio : float
        Fraction of each prunable layer's output channels to remove, in [0, 1).
    norm : {"l1", "l2"}
        Channel importance: the L1 or L2 norm of its weights.
    skip : sequence of str
        Layers whose output channels stay (site or source-model names, patterns, op kinds);
        their inputs still shrink when the layer before them is pruned.
    """

    def __init__(self, ratio: float, norm: str = "l1", skip=()) -> None:
        if not 0.0 <= float(ratio) < 1.0:
            raise TvmqError(f"ratio must be in [0, 1), got {ratio}")
        if norm not in ("l1", "l2"):
            raise TvmqError(f"norm must be 'l1' or 'l2', got {norm!r}")
        self.ratio = float(ratio)
        self.norm = norm
        self.skip = tuple(str(s) for s in skip)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates, records = {}, {}
        for gv, func in relax_functions(mod):
            new, record = _prune_function(
                mod, func, site_prefix(gv), self.ratio, self.norm, self.skip
            )
            if new is not None:
                updates[gv] = new
                records.update(record["pruned"])
                records_skipped = record["skipped"]
                records.setdefault("__skipped__", {}).update(records_skipped)
        if not updates:
            return mod
        skipped = records.pop("__skipped__", {})
        mod = update_functions(mod, updates)
        main = next((gv for gv, _ in relax_functions(mod) if gv.name_hint == "main"), None)
        if main is not None:
            mod[main] = mod[main].with_attr(ATTR, {"pruned": records, "skipped": skipped})
        return mod
