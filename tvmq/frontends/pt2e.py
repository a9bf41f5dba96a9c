"""PT2E programs: ``quantized_decomposed`` ops -> Relax ``quantize`` / ``dequantize``.

``convert_pt2e`` (torchao's ``torchao.quantization.pt2e``, formerly ``torch.ao``) leaves a
float graph with explicit quantize / dequantize calls around each quantized operator, and
its weights as integer constants read through ``dequantize_per_channel``: the same QDQ form
as an ONNX Runtime QDQ file. They are imported here as Relax ``quantize`` / ``dequantize``
with the program's own scales and zero points as constants (float32 scales, int32 zero
points, ``axis=-1`` per tensor), which :class:`~tvmq.passes.CanonicalizeQDQ` and
``static_int8_passes`` then lower onto the integer kernels, as for ONNX.

torch's semantics, kept: ``quantize`` is ``clamp(round(x / s) + z, quant_min, quant_max)``
(Relax clamps to the dtype's range; a narrower ``quant_min`` / ``quant_max`` adds a
``clip``); ``dequantize`` is ``(q - z) * s`` and does not clamp. Only int8 / uint8 data,
float32 results and parameters that are constants of the program (not computed at run
time) are imported; any other ``quantized_decomposed`` op (dynamic ``choose_qparams``,
per-token or group quantization, fp8) is refused with its name.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tvm import relax

from tvmq.errors import UnsupportedOperatorError

NAMESPACE = "quantized_decomposed"
# The overloads imported, as node.target.__name__ (the key of TVM's convert map).
SUPPORTED = (
    "quantize_per_tensor.default",
    "quantize_per_tensor.tensor",
    "dequantize_per_tensor.default",
    "dequantize_per_tensor.tensor",
    "quantize_per_channel.default",
    "dequantize_per_channel.default",
)
_DTYPES = {"torch.int8": "int8", "torch.uint8": "uint8"}


def register_ops() -> None:
    """Register torch's ``quantized_decomposed`` library (needed to load a PT2E ``.pt2``)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the ops, runs no file)


def is_quantized_op(node) -> bool:
    return node.op == "call_function" and getattr(node.target, "namespace", "") == NAMESPACE


def check_supported(ep) -> None:
    """Refuse a program with a ``quantized_decomposed`` op tvmq does not import."""
    for node in ep.graph.nodes:
        if is_quantized_op(node) and node.target.__name__ not in SUPPORTED:
            raise UnsupportedOperatorError(
                f"quantized op {NAMESPACE}.{node.target.__name__} at node '{node.name}' is not "
                f"supported; tvmq imports PT2E static quantization ({', '.join(SUPPORTED)})"
            )


def convert_map(ep) -> dict[str, Callable]:
    """TVM ``custom_convert_map`` entries for the ``quantized_decomposed`` ops of ``ep``.

    ``ep`` must be the program handed to the importer (after any ``run_decompositions``):
    tensor-valued scales and zero points are read from its buffers and constants.
    """
    lifted = _lifted_tensors(ep)

    def convert(node, importer) -> relax.Var:
        if not is_quantized_op(node):  # an aten op of the same name (torch's qint tensors)
            raise UnsupportedOperatorError(
                f"operator {node.target} at node '{node.name}' is not supported"
            )
        return importer.block_builder.emit(_qdq(node, importer.env, lifted))

    return dict.fromkeys(SUPPORTED, convert)


def _lifted_tensors(ep) -> dict[str, np.ndarray]:
    """Placeholder name -> value, for the program's buffers, parameters and constants."""
    sig = ep.graph_signature
    values = {**ep.state_dict, **ep.constants}
    out = {}
    for table in (
        sig.inputs_to_buffers,
        sig.inputs_to_parameters,
        sig.inputs_to_lifted_tensor_constants,
    ):
        for name, target in table.items():
            if target in values:
                out[name] = values[target].detach().cpu().numpy()
    return out


def _qdq(node, env, lifted) -> relax.Expr:
    name = node.target.__name__
    per_channel = "per_channel" in name
    args = list(node.args)
    x = env[args[0]]
    where = f"{NAMESPACE}.{name} at node '{node.name}'"
    scale = _param(args[1], lifted, where, "scale")
    zp = _param(args[2], lifted, where, "zero point") if args[2] is not None else np.zeros(())
    if not per_channel:  # a .tensor overload's 0-d or 1-element tensors
        scale, zp = scale.reshape(()), zp.reshape(())
    rest = args[3:]
    axis = -1
    if per_channel:
        axis, rest = int(rest[0]), rest[1:]
        axis %= len(node.args[0].meta["val"].shape)
    quant_min, quant_max, dtype = int(rest[0]), int(rest[1]), _dtype(rest[2], where)
    out_dtype = node.kwargs.get("out_dtype")
    if out_dtype is not None and str(out_dtype) != "torch.float32":
        raise UnsupportedOperatorError(f"{where}: out_dtype {out_dtype} (tvmq: float32 only)")
    s = relax.const(scale.astype("float32"), "float32")
    z = relax.const(np.round(zp).astype("int32"), "int32")
    if name.startswith("dequantize"):
        return relax.op.dequantize(x, s, z, axis=axis, out_dtype="float32")
    q = relax.op.quantize(x, s, z, axis=axis, out_dtype=dtype)
    info = np.iinfo(dtype)
    if (quant_min, quant_max) == (info.min, info.max):
        return q
    return relax.op.clip(q, quant_min, quant_max)


def _param(arg, lifted, where: str, what: str) -> np.ndarray:
    """A scale / zero point: a Python number, or a tensor the program holds as a constant."""
    if isinstance(arg, int | float):
        return np.array(arg)
    value = lifted.get(getattr(arg, "name", None))
    if value is None:
        raise UnsupportedOperatorError(
            f"{where}: the {what} is computed at run time (dynamic quantization); tvmq "
            "imports PT2E programs with constant quantization parameters only"
        )
    if value.ndim > 1:
        raise UnsupportedOperatorError(f"{where}: a {value.ndim}-d {what} is not supported")
    return value


def _dtype(dtype, where: str) -> str:
    found = _DTYPES.get(str(dtype))
    if found is None:
        raise UnsupportedOperatorError(
            f"{where}: {dtype} data is not supported (tvmq imports int8 and uint8)"
        )
    return found
