"""The common shape of an imported model: a Relax IRModule plus its input/output signature."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import tvm

from tvmq.errors import TvmqError


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one model input or output.

    A dim is an int (static) or a str (symbolic: a name such as ``"batch"``, shared by every
    input that uses it, or for an output an expression such as ``"batch * seq"``). An integer
    input whose values index the rows of a table (token ids into an embedding) has an
    ``index_bound``, the table's rows: every value must lie in ``[0, index_bound)``, which
    the runtime checks (the compiled lookup does not, and reads outside the table).
    """

    name: str
    shape: tuple[int | str, ...]
    dtype: str
    index_bound: int | None = None

    @property
    def symbols(self) -> list[str]:
        """The symbolic dims, in order (empty for a static shape)."""
        return [d for d in self.shape if isinstance(d, str)]

    def to_json(self) -> dict:
        d = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.index_bound is not None:
            d["index_bound"] = self.index_bound
        return d

    @classmethod
    def from_json(cls, d: dict) -> TensorSpec:
        shape = tuple(s if isinstance(s, str) else int(s) for s in d["shape"])
        return cls(d["name"], shape, d["dtype"], d.get("index_bound"))


def format_shape(shape) -> str:
    """``(batch, 128)``-style text for a shape with static and symbolic dims."""
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def bind_symbols(specs: list[TensorSpec], shapes: list[tuple[int, ...]]) -> dict[str, int]:
    """The value of each symbolic dim in concrete input ``shapes`` (one per spec).

    Raises ValueError with one line when a rank or a static dim differs, or when one symbol
    gets two values.
    """
    values: dict[str, int] = {}
    for spec, shape in zip(specs, shapes, strict=True):
        shape = tuple(int(d) for d in shape)
        expected = f"the model was compiled for {format_shape(spec.shape)}"
        if len(shape) != len(spec.shape):
            raise ValueError(
                f"input '{spec.name}': shape {shape} has rank {len(shape)}, {expected}"
            )
        for axis, (want, have) in enumerate(zip(spec.shape, shape, strict=True)):
            if isinstance(want, str):
                seen = values.setdefault(want, have)
                if seen != have:
                    raise ValueError(
                        f"input '{spec.name}': shape {shape} gives {want}={have} at axis {axis}, "
                        f"but another input gives {want}={seen}; {expected}"
                    )
            elif want != have:
                raise ValueError(
                    f"input '{spec.name}': shape {shape} differs in the static dim {axis} "
                    f"({have} != {want}); {expected}"
                )
    return values


def concrete_shape(spec: TensorSpec, sizes: dict[str, int], default: int = 1) -> tuple[int, ...]:
    """``spec.shape`` with each symbolic dim replaced by ``sizes[name]`` (else ``default``)."""
    return tuple(d if isinstance(d, int) else int(sizes.get(d, default)) for d in spec.shape)


@dataclass
class ImportedModel:
    """A model in Relax form.

    Weights are bound into ``mod["main"]`` as ``relax.Constant`` nodes (no params dict):
    tvmq's passes see, rewrite and quantize them directly, and the compiled library
    embeds them.
    """

    mod: tvm.IRModule
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    source: str = ""  # "pytorch", "onnx" or "relax"
    meta: dict = field(default_factory=dict)


def _tensor_spec(name: str, ty, *, is_input: bool) -> TensorSpec:
    if not isinstance(ty, tvm.relax.TensorType) or ty.shape is None:
        raise TvmqError(f"{name}: tvmq needs tensors of known rank, got {ty}")
    shape: list[int | str] = []
    for d in ty.shape.values:
        if isinstance(d, tvm.tirx.IntImm):
            shape.append(int(d))
        elif isinstance(d, tvm.tirx.Var) or not is_input:
            shape.append(str(d))  # a symbol, or an output dim computed from symbols
        else:
            raise TvmqError(
                f"{name}: input dim {d} is an expression; tvmq takes static or named dims only"
            )
    return TensorSpec(name, tuple(shape), str(ty.dtype))


def signature_of(
    func: tvm.relax.Function,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output specs of a Relax function (static or symbolic dims).

    A tuple return type gives one output per field; names default to ``output0``, ...
    """
    params = list(func.params)
    in_names = input_names or [p.name for p in params]
    inputs = [_tensor_spec(n, p.ty, is_input=True) for n, p in zip(in_names, params, strict=True)]
    bounds = index_bounds(func)
    inputs = [replace(s, index_bound=bounds.get(i)) for i, s in enumerate(inputs)]
    ret = func.ret_ty
    fields = list(ret.fields) if isinstance(ret, tvm.ir.TupleType) else [ret]
    out_names = output_names or [f"output{i}" for i in range(len(fields))]
    outputs = [_tensor_spec(n, t, is_input=False) for n, t in zip(out_names, fields, strict=True)]
    return inputs, outputs


# Ops that pass an index tensor's values on unchanged (casts, views)
_INDEX_VIEWS = {
    "relax.astype", "relax.reshape", "relax.expand_dims", "relax.squeeze", "relax.flatten",
    "relax.permute_dims", "relax.broadcast_to",
}  # fmt: skip


def index_bounds(func: tvm.relax.Function) -> dict[int, int]:
    """Parameter position -> the rows of the smallest constant table that a ``take`` along
    axis 0 (an embedding lookup, ONNX ``Gather``) indexes with that integer parameter's
    values, seen through casts and views."""
    origin = {p: i for i, p in enumerate(func.params) if "int" in str(getattr(p.ty, "dtype", ""))}
    bounds: dict[int, int] = {}
    blocks = func.body.blocks if isinstance(func.body, tvm.relax.SeqExpr) else []
    for block in blocks:
        for b in block.bindings:
            call = b.value
            if not isinstance(call, tvm.relax.Call) or not isinstance(call.op, tvm.ir.Op):
                continue
            src = call.args[0] if call.op.name in _INDEX_VIEWS else None
            if isinstance(src, tvm.relax.Var) and src in origin:
                origin[b.var] = origin[src]
            if call.op.name != "relax.take" or call.args[1] not in origin:
                continue
            table, axis = call.args[0], call.attrs.axis
            if not isinstance(table, tvm.ir.Constant) or axis is None:
                continue
            shape = table.value.shape
            rows = int(shape[0])
            if int(axis) in (0, -len(shape)):
                i = origin[call.args[1]]
                bounds[i] = min(bounds.get(i, rows), rows)
    return bounds


# Ops whose constant operands are weights: an infinite weight is always a broken model.
# Elsewhere -inf is a legitimate constant (attention masks, ONNX Clip's open bounds as
# `where(isnan(c), -inf, c)`), so only NaN is refused there.
_WEIGHT_OPS = {"relax.matmul", "relax.nn.conv1d", "relax.nn.conv2d", "relax.nn.conv2d_transpose"}


def check_finite_weights(mod: tvm.IRModule, when: str = "compiling") -> None:
    """Raise TvmqError naming the first float constant with NaN (or, for a weight, inf)."""
    import numpy as np

    # Imported here: tvmq.passes loads every pass and kernel (seconds), and this module is
    # also what tvmq.load / the manifest import for TensorSpec.
    from tvmq.passes.relax_utils import is_tensor_const, ordered_bindings, relax_functions

    for gv, func in relax_functions(mod):
        bindings = ordered_bindings(func)
        # Weights often reach the matmul through a permute_dims / reshape binding.
        weight_vars = {
            arg
            for b in bindings
            if isinstance(b.value, tvm.relax.Call) and str(b.value.op.name) in _WEIGHT_OPS
            for arg in b.value.args[1:]
        }
        for b in bindings:
            value = b.value
            op = value.op.name if isinstance(value, tvm.relax.Call) else type(value).__name__
            weights = op in _WEIGHT_OPS or b.var in weight_vars
            bad = []

            def visit(e, bad=bad, weights=weights):
                if is_tensor_const(e) and str(e.ty.dtype).startswith("float"):
                    data = e.value.numpy()
                    if np.isnan(data).any() or (weights and not np.isfinite(data).all()):
                        bad.append(data)

            tvm.relax.analysis.post_order_visit(value, visit)
            if bad:
                data = bad[0]
                raise TvmqError(
                    f"a constant of shape {tuple(data.shape)} read by {op} (binding "
                    f"'{b.var.name}' in {gv.name_hint}) has {int(np.isnan(data).sum())} NaN "
                    f"and {int(np.isinf(data).sum())} inf values; fix the model's weights "
                    f"before {when}"
                )
