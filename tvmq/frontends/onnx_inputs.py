"""An ONNX graph's real inputs and their static shapes, checked against the declared dims.

Shared by :func:`tvmq.frontends.onnx.from_onnx` (every dynamic input needs a shape) and
:func:`tvmq.frontends.onnx_shapes.fold_static_shapes` (inputs not named keep their dims).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import onnx

from tvmq.errors import TvmqError

DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})


def proto_label(model: onnx.ModelProto) -> str:
    return f"ONNX graph {model.graph.name!r}" if model.graph.name else "ONNX model"


def graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are real inputs, not initializers listed as inputs."""
    init_names = {t.name for t in graph.initializer}
    return [vi for vi in graph.input if vi.name not in init_names]


def declared_dims(vi: onnx.ValueInfoProto) -> list[int | str | None] | None:
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


def resolve_input_shapes(
    graph: onnx.GraphProto,
    input_shapes: dict[str, Sequence[int]],
    label: str,
    *,
    require_all: bool,
) -> dict[str, tuple[int, ...]]:
    """Static shape per real graph input, checked against the declared dims."""
    inputs = graph_inputs(graph)
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
        declared = declared_dims(vi)
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


def set_dims(vi: onnx.ValueInfoProto, dims: Sequence[int]) -> None:
    shape = vi.type.tensor_type.shape
    shape.ClearField("dim")
    for d in dims:
        shape.dim.add().dim_value = int(d)
