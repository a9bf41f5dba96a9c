"""An ONNX graph's real inputs and their shapes (static or named dims), checked against the
declared dims.

Shared by :func:`tvmq.frontends.onnx.from_onnx` (every dynamic input needs a shape) and
:func:`tvmq.frontends.onnx_shapes.fold_static_shapes` (inputs not named keep their dims).
"""

from __future__ import annotations

import re
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
    input_shapes: dict[str, Sequence[int | str]],
    label: str,
    *,
    require_all: bool,
) -> dict[str, tuple[int | str, ...]]:
    """Shape per real graph input: ints are static dims, strs symbolic (named) dims.

    A dim the file declares dynamic (``dim_param`` or unknown) stays symbolic unless
    ``input_shapes`` pins it to an int; its name is the ``dim_param`` (or ``NAME_AXIS``).
    ``input_shapes`` may name a dynamic dim (a str: the same name in two inputs is one
    symbol) but may not change or un-pin a static one. With ``require_all``, an input of
    unknown rank needs an entry.
    """
    inputs = graph_inputs(graph)
    names = [vi.name for vi in inputs]
    unknown = [n for n in input_shapes if n not in names]
    if unknown:
        raise TvmqError(
            f"{label}: input_shapes names {', '.join(repr(n) for n in unknown)}, which "
            f"{'is' if len(unknown) == 1 else 'are'} not a model input; "
            f"the model's inputs are {', '.join(repr(n) for n in names) or '(none)'}"
        )
    shapes: dict[str, tuple[int | str, ...]] = {}
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
                        f"dim(s) {clash} (only dynamic dims can be named or pinned)"
                    )
            shapes[vi.name] = given
        elif declared is not None:
            shapes[vi.name] = tuple(
                d if isinstance(d, int) else symbol_name(d, vi.name, i)
                for i, d in enumerate(declared)
            )
        elif require_all:
            missing.append(
                f"input {vi.name!r} has unknown rank; give its shape, e.g. "
                f"--input-shape {vi.name}:1x3x224x224 (input_shapes={{{vi.name!r}: ...}})"
            )
    if missing:
        raise TvmqError(f"{label}: " + "; ".join(missing))
    return shapes


def symbol_name(dim_param: str | None, input_name: str, axis: int) -> str:
    """A symbolic dim's name: the file's ``dim_param`` as an identifier, else ``INPUT_AXIS``."""
    text = dim_param or f"{input_name}_{axis}"
    name = re.sub(r"\W", "_", text)
    return name if name[:1].isalpha() or name[:1] == "_" else f"d_{name}"


def _check_shape(name: str, shape: Sequence[int | str], label: str) -> tuple[int | str, ...]:
    dims: list[int | str] = []
    ok = isinstance(shape, Sequence) and not isinstance(shape, str)
    for s in shape if ok else ():
        if isinstance(s, str) and s.isidentifier():
            dims.append(s)
            continue
        try:
            d = int(s)
        except (TypeError, ValueError):
            ok = False
            break
        ok = ok and d >= 0 and d == s
        dims.append(d)
    if not ok:
        raise TvmqError(
            f"{label}: input_shapes[{name!r}] must be a sequence of non-negative ints or "
            f"dim names (identifiers), got {shape!r}"
        )
    return tuple(dims)


def set_dims(vi: onnx.ValueInfoProto, dims: Sequence[int | str]) -> None:
    """Declare the dims of a value info: ints static, strs as named (dim_param) dims."""
    shape = vi.type.tensor_type.shape
    shape.ClearField("dim")
    for d in dims:
        if isinstance(d, str):
            shape.dim.add().dim_param = d
        else:
            shape.dim.add().dim_value = int(d)
