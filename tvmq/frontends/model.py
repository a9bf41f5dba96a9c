"""The common shape of an imported model: a Relax IRModule plus its input/output signature."""

from __future__ import annotations

from dataclasses import dataclass, field

import tvm

from tvmq.errors import TvmqError


@dataclass(frozen=True)
class TensorSpec:
    """Name, static shape and dtype of one model input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> TensorSpec:
        return cls(d["name"], tuple(int(s) for s in d["shape"]), d["dtype"])


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


def _tensor_spec(name: str, ty) -> TensorSpec:
    if not isinstance(ty, tvm.relax.TensorType) or ty.shape is None:
        raise TvmqError(f"{name}: tvmq needs tensors of static shape, got {ty}")
    try:
        shape = tuple(int(s) for s in ty.shape)
    except (TypeError, ValueError):
        raise TvmqError(
            f"{name}: shape {ty.shape} is not static; give static input shapes when importing"
        ) from None
    return TensorSpec(name, shape, str(ty.dtype))


def signature_of(
    func: tvm.relax.Function,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output specs of a Relax function with static shapes.

    A tuple return type gives one output per field; names default to ``output0``, ...
    """
    params = list(func.params)
    in_names = input_names or [p.name for p in params]
    inputs = [_tensor_spec(n, p.ty) for n, p in zip(in_names, params, strict=True)]
    ret = func.ret_ty
    fields = list(ret.fields) if isinstance(ret, tvm.ir.TupleType) else [ret]
    out_names = output_names or [f"output{i}" for i in range(len(fields))]
    outputs = [_tensor_spec(n, t) for n, t in zip(out_names, fields, strict=True)]
    return inputs, outputs


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
