"""Fold an ONNX graph's run-time shape arithmetic into constants, for static input shapes.

Exporters emit ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` chains,
``ConstantOfShape``, ``Expand``, ``Range``, casts and integer maths on shapes, which Relax's
ONNX frontend rejects or imports with symbolic shapes. Once the input dims are fixed, ONNX
shape inference knows them all: :func:`fold_static_shapes` replaces them by initializers, so
:func:`tvmq.frontends.onnx.from_onnx` hands Relax a graph with static shapes. See that
module's docstring for the limits.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from tvmq.frontends.onnx_inputs import (
    DEFAULT_DOMAINS,
    declared_dims,
    proto_label,
    resolve_input_shapes,
    set_dims,
)

__all__ = ["fold_static_shapes"]

# Outputs bigger than this are left to run time: folding them would duplicate weights.
_FOLD_MAX_ELEMENTS = 100_000
# Ops that only move existing values around; folding them on a constant that nothing else
# reads moves the weight instead of copying it, so the size limit does not apply.
_LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"})
# Never folded: random ops have no fixed value, and folding QDQ would erase the
# quantization structure that tvmq's passes look for.
_NEVER_FOLD = frozenset(
    {
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
    }
)
_MAX_FOLD_ROUNDS = 32


def fold_static_shapes(
    model: onnx.ModelProto, input_shapes: dict[str, Sequence[int]]
) -> onnx.ModelProto:
    """Fix input dims and fold shape computations into initializers.

    Sets the dims of the inputs named in ``input_shapes``, runs ONNX shape inference,
    replaces ``Shape``/``Size`` of every statically shaped tensor by a constant and
    evaluates (with ``onnx.reference``) every deterministic standard-domain node whose
    inputs are all constant, repeating until nothing changes; dead nodes and unused
    initializers are then dropped. Outputs over 100,000 elements are not folded unless
    the node only reshapes/transposes a constant nothing else reads, so weights are
    never duplicated. Quantize/Dequantize nodes are kept. The model's numbers are unchanged.

    Parameters
    ----------
    model
        The model; it is not modified.
    input_shapes
        Static shape per graph input name. Inputs not named keep their declared shapes.

    Returns
    -------
    onnx.ModelProto
        A new model with the folded graph.
    """
    label = proto_label(model)
    shapes = resolve_input_shapes(model.graph, input_shapes, label, require_all=False)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    init_names = {t.name for t in graph.initializer}
    for vi in graph.input:
        if vi.name in shapes:
            set_dims(vi, shapes[vi.name])
    if out.ir_version >= 4:
        # Initializers listed as inputs are overridable defaults in ONNX; tvmq treats them as
        # weights, so say so in the folded model too.
        kept = [vi for vi in graph.input if vi.name not in init_names]
        del graph.input[:]
        graph.input.extend(kept)

    facts = None
    changed = True
    for _ in range(_MAX_FOLD_ROUNDS):
        facts = _inferred_graph(out)
        changed = _fold_once(out, facts)
        changed |= _remove_dead(graph)
        if not changed:
            break
    if changed:
        facts = _inferred_graph(out)
    _record_inferred(graph, facts)
    return out


def _elements(t: onnx.TensorProto) -> int:
    return math.prod(int(d) for d in t.dims)


def _inferred_graph(model: onnx.ModelProto) -> onnx.GraphProto | None:
    """The graph after ONNX shape inference, without its big weights; None if inference fails.

    Inference runs on a skeleton where weights over the fold limit are plain inputs of the
    same type: it needs their shapes, not their values, and the skeleton stays far below
    protobuf's 2 GB limit and is cheap to serialise on every round.
    """
    g = model.graph
    skeleton = onnx.ModelProto(
        ir_version=max(model.ir_version, 4), producer_name=model.producer_name
    )
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    sg = skeleton.graph
    sg.name = g.name
    sg.node.extend(g.node)
    sg.input.extend(g.input)
    sg.output.extend(g.output)
    listed = {vi.name for vi in g.input}
    for t in g.initializer:
        if _elements(t) <= _FOLD_MAX_ELEMENTS:
            sg.initializer.append(t)
        elif t.name not in listed:
            sg.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    try:
        return onnx.shape_inference.infer_shapes(
            skeleton, check_type=False, strict_mode=False, data_prop=True
        ).graph
    except Exception:  # a node inference cannot handle: fold what needs no inference
        return None


def _record_inferred(graph: onnx.GraphProto, facts: onnx.GraphProto | None) -> None:
    """Write inferred intermediate types and static output dims into the folded graph."""
    del graph.value_info[:]
    if facts is None:
        return
    produced = {o for n in graph.node for o in n.output}
    graph.value_info.extend(vi for vi in facts.value_info if vi.name in produced)
    inferred = {vi.name: vi for vi in facts.output}
    for vi in graph.output:
        new = inferred.get(vi.name)
        if new is None or not new.type.HasField("tensor_type"):
            continue
        dims = declared_dims(new)
        if dims is not None and all(isinstance(d, int) for d in dims):
            set_dims(vi, dims)  # type: ignore[arg-type]
            if not vi.type.tensor_type.elem_type:
                vi.type.tensor_type.elem_type = new.type.tensor_type.elem_type


def _static_shapes(
    graph: onnx.GraphProto, facts: onnx.GraphProto | None
) -> dict[str, tuple[int, ...]]:
    """Every value whose shape is fully static, by name."""
    shapes: dict[str, tuple[int, ...]] = {}
    infos = [*graph.input, *graph.output]
    if facts is not None:
        infos += [*facts.value_info, *facts.output]
    for vi in infos:
        if not vi.type.HasField("tensor_type"):
            continue
        dims = declared_dims(vi)
        if dims is not None and all(isinstance(d, int) for d in dims):
            shapes[vi.name] = tuple(dims)  # type: ignore[arg-type]
    for t in graph.initializer:
        shapes[t.name] = tuple(int(d) for d in t.dims)
    return shapes


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read, including outer-scope names."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
        for g in graphs:
            for n in g.node:
                names.update(i for i in n.input if i)
                names |= _subgraph_reads(n)
            names.update(o.name for o in g.output)
    return names


def _consumers(graph: onnx.GraphProto) -> dict[str, int]:
    """How many nodes (or graph outputs) read each value."""
    count: dict[str, int] = {}
    for node in graph.node:
        for name in {i for i in node.input if i} | _subgraph_reads(node):
            count[name] = count.get(name, 0) + 1
    for vi in graph.output:
        count[vi.name] = count.get(vi.name, 0) + 1
    return count


def _evaluate(node: onnx.NodeProto, feeds: dict[str, np.ndarray], opsets: dict[str, int]):
    """The node's outputs on constant inputs, or None when onnx.reference cannot run it."""
    from onnx.reference import ReferenceEvaluator

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = ReferenceEvaluator(node, opsets=opsets).run(None, feeds)
    except Exception:
        return None
    if not all(isinstance(r, np.ndarray) for r in results):
        return None  # sequences, optionals: leave to run time
    return results


def _fold_once(model: onnx.ModelProto, facts: onnx.GraphProto | None) -> bool:
    """One pass of Shape/Size replacement and constant evaluation; True if anything folded."""
    graph = model.graph
    opsets = {
        (o.domain if o.domain != "ai.onnx" else ""): int(o.version) for o in model.opset_import
    }
    opset = opsets.get("", 1)
    static = _static_shapes(graph, facts)
    consumers = _consumers(graph)
    for vi in graph.input:  # an initializer still listed as an input is never dropped
        consumers[vi.name] = consumers.get(vi.name, 0) + 1
    elem_types = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in ([*facts.value_info, *facts.output] if facts is not None else [])
        if vi.type.HasField("tensor_type")
    }
    inits = {t.name: t for t in graph.initializer}
    arrays: dict[str, np.ndarray] = {}

    def const(name: str) -> np.ndarray | None:
        if name not in arrays and name in inits:
            try:
                arrays[name] = numpy_helper.to_array(inits[name])
            except Exception:  # external data not loaded, odd types
                return None
        return arrays.get(name)

    kept: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    changed = False
    for node in graph.node:
        results = _fold_node(node, static, consumers, const, opsets, opset)
        if results is None or not _types_match(node, results, elem_types):
            kept.append(node)
            continue
        for name, value in zip(node.output, results, strict=False):
            if not name:
                continue
            arrays[name] = value
            static[name] = tuple(value.shape)
            new_inits.append(numpy_helper.from_array(value, name))
        changed = True
    if changed:
        del graph.node[:]
        graph.node.extend(kept)
        graph.initializer.extend(new_inits)
    return changed


def _fold_node(node, static, consumers, const, opsets, opset) -> list[np.ndarray] | None:
    """Constant outputs of one node, or None to keep it."""
    if node.domain not in DEFAULT_DOMAINS or node.op_type in _NEVER_FOLD:
        return None
    if any(a.HasField("g") or a.graphs for a in node.attribute):
        return None
    op = node.op_type
    if op in ("Shape", "Size") and node.input[0] in static:
        dims = static[node.input[0]]
        if op == "Size":
            return [np.array(math.prod(dims), dtype=np.int64)]
        attrs = {a.name: a.i for a in node.attribute}
        start = attrs.get("start", 0) if opset >= 15 else 0
        end = attrs.get("end", len(dims)) if opset >= 15 else len(dims)
        return [np.array(dims[start:end], dtype=np.int64)]

    names = [i for i in node.input if i]
    if not all(n in static for n in names):
        return None  # cheap early exit: a value with no static shape is not a constant
    big_inputs = [n for n in names if math.prod(static[n]) > _FOLD_MAX_ELEMENTS]
    # A layout op on weights nothing else reads moves them: the old initializers die with it.
    moves_weights = op in _LAYOUT_OPS and all(consumers.get(n, 0) == 1 for n in big_inputs)
    out_shapes = [static.get(o) for o in node.output if o]
    if (
        op != "Constant"
        and not moves_weights
        and all(s is not None for s in out_shapes)
        and sum(math.prod(s) for s in out_shapes) > _FOLD_MAX_ELEMENTS
    ):
        return None  # known to be too big: do not spend time computing it
    feeds = {}
    for name in names:
        value = const(name)
        if value is None:
            return None
        feeds[name] = value
    results = _evaluate(node, feeds, opsets)
    if results is None:
        return None
    if op == "Constant" or moves_weights:
        return results  # a move, not a copy
    if sum(r.size for r in results) <= _FOLD_MAX_ELEMENTS:
        return results
    return None


def _types_match(node: onnx.NodeProto, results: list[np.ndarray], elem_types: dict) -> bool:
    """False when a computed value's dtype differs from the type ONNX inferred for it."""
    for name, value in zip(node.output, results, strict=False):
        want = elem_types.get(name)
        if not name or not want:
            continue
        try:
            have = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        except Exception:
            return False
        if have != want:
            return False
    return True


def _remove_dead(graph: onnx.GraphProto) -> bool:
    """Drop nodes and initializers no graph output depends on; True if anything went."""
    used = {vi.name for vi in graph.output}
    alive: list[onnx.NodeProto] = []
    for node in reversed(graph.node):  # ONNX graphs are topologically sorted
        if any(o in used for o in node.output if o):
            alive.append(node)
            used.update(i for i in node.input if i)
            used |= _subgraph_reads(node)
    changed = len(alive) != len(graph.node)
    if changed:
        del graph.node[:]
        graph.node.extend(reversed(alive))
    # An initializer that is also a graph input stays: dropping it would turn a weight into
    # a real input.
    listed = {vi.name for vi in graph.input}
    inits = [t for t in graph.initializer if t.name in used or t.name in listed]
    if len(inits) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(inits)
        changed = True
    return changed
