"""Import ONNX models into Relax, with static or symbolic input dims and weights bound as constants.

A dim the file declares dynamic (``-1``/unknown or a ``dim_param`` name) stays symbolic
(a ``tirx.Var`` named after it) unless ``input_shapes`` pins it; ``input_shapes`` can also
name dynamic dims (``{"input_ids": ["B", 128]}``). Real exporters (``torch.onnx.export`` and friends) emit
run-time shape arithmetic (``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``,
``ConstantOfShape``, ``Expand``, ``Range``, casts and integer maths on shapes) that Relax's
ONNX frontend either rejects ("Reshape requires the input new shape to be Shape") or imports
with symbolic shapes. :func:`fold_static_shapes` fixes the input dims and folds the arithmetic
on static dims into initializers first; :func:`from_onnx` then hands the folded graph to
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
import os
import warnings
from collections.abc import Sequence

import onnx

from tvmq.errors import TvmqError, UnsupportedOperatorError
from tvmq.frontends.layer_names import onnx_layer_names
from tvmq.frontends.model import ImportedModel, signature_of
from tvmq.frontends.onnx_inputs import (
    DEFAULT_DOMAINS,
    graph_inputs,
    proto_label,
    resolve_input_shapes,
)
from tvmq.frontends.onnx_shapes import fold_static_shapes

__all__ = ["fold_static_shapes", "from_onnx"]

# Relax's table holds a few ONNX Runtime contrib ops (FastGelu, SkipLayerNormalization, ...).
_CONVERTIBLE_DOMAINS = DEFAULT_DOMAINS | {"com.microsoft"}
# Table entries that convert an ONNX Runtime contrib op, where the standard ONNX op of the
# same name (Attention-23) means something else: Relax's frontend ignores node.domain.
_CONTRIB_ONLY = frozenset({"Attention"})


def from_onnx(
    model: str | os.PathLike | onnx.ModelProto,
    input_shapes: dict[str, Sequence[int | str]] | None = None,
    *,
    opset: int | None = None,
) -> ImportedModel:
    """Import an ONNX model as a Relax module.

    Parameters
    ----------
    model
        Path to an ``.onnx`` file (external data next to it is loaded) or a loaded
        ``onnx.ModelProto``.
    input_shapes
        Shape for graph inputs, by ONNX input name: an int pins a dim, a str names a
        symbolic dim (the same name in two inputs is one symbol). Dims the file declares
        dynamic and not given here stay symbolic (named by their ``dim_param``, else
        ``INPUT_AXIS``); static dims cannot be changed. Needed for inputs of unknown rank.
        Initializers listed among the graph inputs are weights, not inputs.
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
        The file is missing or not ONNX, an input's rank is unknown and not given,
        ``input_shapes`` names an input the model lacks or contradicts a static dim.
    UnsupportedOperatorError
        A node uses an operator Relax's ONNX frontend cannot convert; the message names
        the op type and the node.
    """
    proto, label = _load(model)
    shapes = resolve_input_shapes(proto.graph, input_shapes or {}, label, require_all=True)
    if proto.functions:
        proto = _inline_functions(proto, label)
    folded = fold_static_shapes(proto, shapes)
    _check_supported(folded, label)
    mod = _convert(folded, shapes, opset, label)
    if any(isinstance(d, str) for shape in shapes.values() for d in shape):
        mod = _resolve_shape_vars(mod)
    mod = onnx_layer_names(folded, mod)  # node names on the weight ops, for skip lists

    input_names = [vi.name for vi in graph_inputs(folded.graph)]
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


def _resolve_shape_vars(mod):
    """Dims the graph computes from symbolic input dims (Range lengths) bound to those dims."""
    import tvm
    from tvm import relax

    from tvmq.passes import ResolveShapeVars

    seq = [
        ResolveShapeVars(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.DeadCodeElimination(),
    ]
    return tvm.transform.Sequential(seq)(mod)


# --- loading and validation ------------------------------------------------------------------


def _load(model: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """The ModelProto and a label for error messages (the path or the graph name)."""
    if isinstance(model, onnx.ModelProto):
        label = proto_label(model)
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


def _default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in DEFAULT_DOMAINS:
            return int(o.version)
    return 1


def _inline_functions(model: onnx.ModelProto, label: str) -> onnx.ModelProto:
    """Model-local functions expanded into plain nodes, which Relax can convert."""
    from onnx import inliner

    try:
        return inliner.inline_local_functions(model)
    except Exception as err:
        raise TvmqError(f"{label}: could not inline the model's local functions ({err})") from None


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
            if node.domain in DEFAULT_DOMAINS and node.op_type in _CONTRIB_ONLY:
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
    shapes: dict[str, tuple[int | str, ...]],
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
                # Symbolic dims are dim_params in the folded graph: the importer makes one
                # tirx.Var per name, shared by every input that uses it.
                shape_dict={
                    k: list(v) for k, v in shapes.items() if all(isinstance(d, int) for d in v)
                },
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
