"""Import ONNX models into Relax, with static input shapes and weights bound as constants.

tvmq compiles for static shapes. Real exporters (``torch.onnx.export`` and friends) emit
run-time shape arithmetic (``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``,
``ConstantOfShape``, ``Expand``, ``Range``, casts and integer maths on shapes) that Relax's
ONNX frontend either rejects ("Reshape requires the input new shape to be Shape") or imports
with symbolic shapes. :func:`fold_static_shapes` fixes the input dims and folds that arithmetic
into initializers first; :func:`from_onnx` then hands the folded graph to
``tvm.relax.frontend.onnx.from_onnx`` with ``keep_params_in_input=False`` so every weight is a
``relax.Constant`` in ``mod["main"]``.

Limits
------
* Only tensor inputs; sequence/optional/map inputs are rejected.
* Custom-domain operators are rejected even when their ``op_type`` matches a standard one:
  Relax's frontend ignores ``node.domain`` and would silently convert them as the
  standard op. ``com.microsoft`` contrib ops the Relax table knows are let through.
* Quantize/Dequantize nodes are never folded, so QDQ graphs keep their structure.
* Folding needs ONNX shape inference to know a tensor's shape; where inference gives up
  (an op it cannot infer), the shape arithmetic after it stays and may still fail in Relax.
* Control flow: ``If`` is converted by Relax, ``Loop``/``Scan`` are not supported there,
  and nodes with subgraphs are never folded.
* Inputs must be loaded: a ``ModelProto`` loaded with ``load_external_data=False`` fails.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from tvmq.errors import TvmqError, UnsupportedOperatorError
from tvmq.frontends.model import ImportedModel, signature_of

__all__ = ["fold_static_shapes", "from_onnx"]

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
_DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})
# Relax's table holds a few ONNX Runtime contrib ops (FastGelu, SkipLayerNormalization, ...).
_CONVERTIBLE_DOMAINS = _DEFAULT_DOMAINS | {"com.microsoft"}
# Table entries that convert an ONNX Runtime contrib op, where the standard ONNX op of the
# same name (Attention-23) means something else: Relax's frontend ignores node.domain.
_CONTRIB_ONLY = frozenset({"Attention"})
_MAX_FOLD_ROUNDS = 32


def from_onnx(
    model: str | os.PathLike | onnx.ModelProto,
    input_shapes: dict[str, Sequence[int]] | None = None,
    *,
    opset: int | None = None,
) -> ImportedModel:
    """Import an ONNX model as a Relax module with static shapes.

    Parameters
    ----------
    model
        Path to an ``.onnx`` file (external data next to it is loaded) or a loaded
        ``onnx.ModelProto``.
    input_shapes
        Static shape for each graph input, by ONNX input name. Needed for every input
        with a dynamic (``dim_param`` or unknown) dim; may be omitted for inputs whose
        shape is already static. Initializers listed among the graph inputs are weights,
        not inputs.
    opset
        Opset to convert with, overriding the model's ``ai.onnx`` opset import.

    Returns
    -------
    ImportedModel
        ``mod["main"]`` takes the graph inputs in ONNX order and returns the graph
        outputs (a tuple when there are several); weights are ``relax.Constant`` nodes.
        ``inputs``/``outputs`` carry the ONNX names; ``source`` is ``"onnx"``.

    Raises
    ------
    TvmqError
        The file is missing or not ONNX, an input's shape is dynamic and not given,
        ``input_shapes`` names an input the model lacks or contradicts a static dim.
    UnsupportedOperatorError
        A node uses an operator Relax's ONNX frontend cannot convert; the message names
        the op type and the node.
    """
    proto, label = _load(model)
    shapes = _resolve_input_shapes(proto.graph, input_shapes or {}, label, require_all=True)
    if proto.functions:
        proto = _inline_functions(proto, label)
    folded = fold_static_shapes(proto, shapes)
    _check_supported(folded, label)
    mod = _convert(folded, shapes, opset, label)

    input_names = [vi.name for vi in _graph_inputs(folded.graph)]
    output_names = [vi.name for vi in folded.graph.output]
    try:
        inputs, outputs = signature_of(mod["main"], input_names, output_names)
    except TvmqError as err:
        raise TvmqError(f"{label}: {err}") from None
    meta = {
        "onnx_opset": _default_opset(proto),
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "nodes_before_folding": len(proto.graph.node),
        "nodes_after_folding": len(folded.graph.node),
    }
    return ImportedModel(mod, inputs, outputs, source="onnx", meta=meta)


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
    label = _proto_label(model)
    shapes = _resolve_input_shapes(model.graph, input_shapes, label, require_all=False)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    init_names = {t.name for t in graph.initializer}
    for vi in graph.input:
        if vi.name in shapes:
            _set_dims(vi, shapes[vi.name])
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


# --- loading and validation ------------------------------------------------------------------


def _load(model: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """The ModelProto and a label for error messages (the path or the graph name)."""
    if isinstance(model, onnx.ModelProto):
        label = _proto_label(model)
        proto = model
    elif isinstance(model, str | os.PathLike):
        label = os.fspath(model)
        if not os.path.exists(label):
            raise TvmqError(f"{label}: no such file")
        if os.path.isdir(label):
            raise TvmqError(f"{label}: is a directory, not an ONNX file")
        try:
            proto = onnx.load(label)
        except Exception as err:  # DecodeError, missing external data, ...
            raise TvmqError(
                f"{label}: not a valid ONNX file ({type(err).__name__}: {err})"
            ) from None
    else:
        raise TvmqError(f"from_onnx takes a path or an onnx.ModelProto, not {type(model).__name__}")
    # Protobuf accepts many byte strings that are not ONNX at all; a model needs a graph
    # with outputs and an IR version.
    problems = []
    if proto.ir_version <= 0:
        problems.append("no IR version")
    if not proto.HasField("graph"):
        problems.append("no graph")
    elif not proto.graph.output:
        problems.append("the graph has no outputs")
    if problems:
        raise TvmqError(f"{label}: not a valid ONNX file ({', '.join(problems)})")
    if proto.ir_version < 3:
        raise TvmqError(
            f"{label}: ONNX IR version {proto.ir_version} is too old; re-export with ONNX >= 1.1"
        )
    return proto, label


def _proto_label(model: onnx.ModelProto) -> str:
    return f"ONNX graph {model.graph.name!r}" if model.graph.name else "ONNX model"


def _graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are real inputs, not initializers listed as inputs."""
    init_names = {t.name for t in graph.initializer}
    return [vi for vi in graph.input if vi.name not in init_names]


def _declared_dims(vi: onnx.ValueInfoProto) -> list[int | str | None] | None:
    """Dims of a tensor value info (int, dim_param or None); None for unknown rank."""
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def _fmt_dims(dims: Iterable[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _resolve_input_shapes(
    graph: onnx.GraphProto,
    input_shapes: dict[str, Sequence[int]],
    label: str,
    *,
    require_all: bool,
) -> dict[str, tuple[int, ...]]:
    """Static shape per real graph input, checked against the declared dims."""
    inputs = _graph_inputs(graph)
    names = [vi.name for vi in inputs]
    unknown = [n for n in input_shapes if n not in names]
    if unknown:
        raise TvmqError(
            f"{label}: input_shapes names {', '.join(repr(n) for n in unknown)}, which "
            f"{'is' if len(unknown) == 1 else 'are'} not a model input; "
            f"the model's inputs are {', '.join(repr(n) for n in names) or '(none)'}"
        )
    shapes: dict[str, tuple[int, ...]] = {}
    missing: list[str] = []
    for vi in inputs:
        if not vi.type.HasField("tensor_type"):
            raise TvmqError(
                f"{label}: input {vi.name!r} is a {vi.type.WhichOneof('value')}, "
                "tvmq imports tensor inputs only"
            )
        declared = _declared_dims(vi)
        if vi.name in input_shapes:
            given = _check_shape(vi.name, input_shapes[vi.name], label)
            if declared is not None:
                if len(declared) != len(given):
                    raise TvmqError(
                        f"{label}: input {vi.name!r} has rank {len(declared)} "
                        f"{_fmt_dims(declared)} but input_shapes gives {list(given)}"
                    )
                clash = [
                    i
                    for i, (d, g) in enumerate(zip(declared, given, strict=True))
                    if isinstance(d, int) and d != g
                ]
                if clash:
                    raise TvmqError(
                        f"{label}: input {vi.name!r} is declared {_fmt_dims(declared)}, "
                        f"input_shapes gives {list(given)}, which differs in the static "
                        f"dim(s) {clash}"
                    )
            shapes[vi.name] = given
        elif declared is not None and all(isinstance(d, int) for d in declared):
            shapes[vi.name] = tuple(declared)  # type: ignore[arg-type]
        elif require_all:
            example = (
                "(...)"
                if declared is None
                else str(tuple(d if isinstance(d, int) else 1 for d in declared))
            )
            what = "unknown rank" if declared is None else f"dynamic shape {_fmt_dims(declared)}"
            missing.append(
                f"input {vi.name!r} has {what}; pass input_shapes={{{vi.name!r}: {example}}}"
            )
    if missing:
        raise TvmqError(f"{label}: tvmq compiles for static shapes: " + "; ".join(missing))
    return shapes


def _check_shape(name: str, shape: Sequence[int], label: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(s) for s in shape)
        ok = all(d >= 0 and d == s for d, s in zip(dims, shape, strict=True))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise TvmqError(
            f"{label}: input_shapes[{name!r}] must be a sequence of non-negative ints, got {shape!r}"
        )
    return dims


def _set_dims(vi: onnx.ValueInfoProto, dims: Sequence[int]) -> None:
    shape = vi.type.tensor_type.shape
    shape.ClearField("dim")
    for d in dims:
        shape.dim.add().dim_value = int(d)


def _default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in _DEFAULT_DOMAINS:
            return int(o.version)
    return 1


def _inline_functions(model: onnx.ModelProto, label: str) -> onnx.ModelProto:
    """Model-local functions expanded into plain nodes, which Relax can convert."""
    from onnx import inliner

    try:
        return inliner.inline_local_functions(model)
    except Exception as err:
        raise TvmqError(f"{label}: could not inline the model's local functions ({err})") from None


# --- folding ---------------------------------------------------------------------------------


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
        dims = _declared_dims(new)
        if dims is not None and all(isinstance(d, int) for d in dims):
            _set_dims(vi, dims)  # type: ignore[arg-type]
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
        dims = _declared_dims(vi)
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
    if node.domain not in _DEFAULT_DOMAINS or node.op_type in _NEVER_FOLD:
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


# --- conversion ------------------------------------------------------------------------------


def _relax_op_table() -> set[str] | None:
    """Op types Relax's ONNX frontend converts, or None if its table cannot be read."""
    try:
        from tvm.relax.frontend.onnx import onnx_frontend
    except ImportError:
        return None
    get_map = getattr(onnx_frontend, "_get_convert_map", None)
    if get_map is None:
        return None
    # Constant and If are handled outside the table.
    return set(get_map()) | {"Constant", "If"}


def _node_label(node: onnx.NodeProto, index: int | None = None) -> str:
    if node.name:
        return repr(node.name)
    where = f"#{index} " if index is not None and index >= 0 else ""
    return f"{where}(unnamed, outputs {', '.join(repr(o) for o in node.output)})"


def _check_supported(model: onnx.ModelProto, label: str) -> None:
    """Raise UnsupportedOperatorError for the first node Relax cannot convert."""
    table = _relax_op_table()

    def walk(graph: onnx.GraphProto, where: str) -> None:
        for i, node in enumerate(graph.node):
            op = node.op_type if not node.domain else f"{node.domain}::{node.op_type}"
            if node.domain not in _CONVERTIBLE_DOMAINS:
                raise UnsupportedOperatorError(
                    f"{label}: node {_node_label(node, i)}{where} uses operator {op!r} from "
                    f"the domain {node.domain!r}; Relax's ONNX frontend converts standard "
                    "ONNX operators (and a few com.microsoft ones) only"
                )
            if node.domain in _DEFAULT_DOMAINS and node.op_type in _CONTRIB_ONLY:
                raise UnsupportedOperatorError(
                    f"{label}: node {_node_label(node, i)}{where} uses the standard ONNX "
                    f"operator {op!r}, which Relax's ONNX frontend does not support (its "
                    f"{op!r} converter is for ONNX Runtime's com.microsoft op of that name)"
                )
            if table is not None and node.op_type not in table:
                raise UnsupportedOperatorError(
                    f"{label}: node {_node_label(node, i)}{where} uses operator {op!r}, "
                    "which Relax's ONNX frontend (TVM 0.27) does not support"
                )
            for attr in node.attribute:
                for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    walk(g, f" (in the {attr.name!r} subgraph of node {_node_label(node, i)})")

    walk(model.graph, "")


def _failing_node(tb) -> onnx.NodeProto | None:
    """The ONNX node Relax's importer was converting when it raised, from its traceback."""
    node = None
    while tb is not None:
        frame = tb.tb_frame
        candidate = frame.f_locals.get("node")
        if isinstance(candidate, onnx.NodeProto):
            node = candidate  # innermost wins: subgraph nodes come after their If
        tb = tb.tb_next
    return node


def _convert(
    model: onnx.ModelProto,
    shapes: dict[str, tuple[int, ...]],
    opset: int | None,
    label: str,
):
    """Relax's ONNX frontend on the folded model, its failures turned into tvmq errors."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx as relax_from_onnx

    # The importer prints every failing node to stdout and warns about renamed inputs and
    # checker findings: tvmq's own message says what matters.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return relax_from_onnx(
                model,
                shape_dict={k: list(v) for k, v in shapes.items()},
                opset=opset,
                keep_params_in_input=False,
            )
        except tvm.error.OpNotImplemented as err:
            raise UnsupportedOperatorError(f"{label}: {err}") from None
        except Exception as err:
            node = _failing_node(err.__traceback__)
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if node is None:
                raise TvmqError(
                    f"{label}: Relax's ONNX frontend failed: {type(err).__name__}: {reason}"
                ) from err
            index = next((i for i, n in enumerate(model.graph.node) if n == node), -1)
            op = node.op_type if not node.domain else f"{node.domain}::{node.op_type}"
            raise UnsupportedOperatorError(
                f"{label}: Relax's ONNX frontend cannot convert node {_node_label(node, index)} "
                f"(operator {op!r}) in this model: {type(err).__name__}: {reason}"
            ) from err
