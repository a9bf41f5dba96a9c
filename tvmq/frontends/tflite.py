"""TFLite flatbuffers (``.tflite``) -> Relax, quantized tensors in tvmq's QDQ form.

The import is TVM 0.27's own Relax TFLite frontend (``tvm.relax.frontend.tflite``), read
with the ``tflite`` package's flatbuffer schema (the ``tflite`` extra). That frontend already
writes a quantized operator the way tvmq's lowering reads an ONNX Runtime QDQ file:
``dequantize`` of its int8 / uint8 inputs with the tensor's own scale and zero point (per
axis for weights), the float op, then ``quantize`` (and a ``clip`` for a fused ReLU) of its
result. :class:`~tvmq.passes.CanonicalizeQDQ`, :class:`~tvmq.passes.QDQConvToNCHW` (TFLite's
convolutions are NHWC) and ``static_int8_passes`` then lower those regions onto the integer
kernels, as for ONNX QDQ (``tvmq.pipeline``).

The four files the TFLite converter writes:

* float32: plain float ops.
* float16 (``supported_types=[tf.float16]``): float16 weights read through ``DEQUANTIZE``,
  imported as ``astype`` of a constant, folded to float32 at build time.
* full integer (``TFLITE_BUILTINS_INT8``, int8 or uint8 inputs and outputs): QDQ as above;
  the compiled model takes and returns the integers, like the interpreter.
* dynamic range (``Optimize.DEFAULT`` alone): int8 weights with float activations, which the
  interpreter quantizes per batch row at run time. TVM's frontend refuses these; here the
  int8 weights are imported as the float values they stand for (``(q - z) * s``, exact), and
  :func:`dynamic_range_scheme` gives the ``Int8Dynamic`` scheme that quantizes exactly those
  layers again (per output channel, so each weight's integers come back unchanged) with
  activation ranges per row at run time, as the interpreter does. Conv2d weights stay float
  (``Int8Dynamic`` handles matmul only).

An operator TVM's frontend does not convert, or converts only in float while the file holds
it quantized, is refused with its name before anything is converted. The input shapes are
the file's (a ``-1`` batch is read as 1); models whose graph computes shapes at run time
(``SHAPE`` from a ``Flatten`` with an unknown batch) are refused by TVM's frontend: convert
them with a fixed batch size (``keras.Input(shape, batch_size=1)``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tvmq.core.schemes import Int8Dynamic
from tvmq.errors import TvmqError, UnsupportedOperatorError
from tvmq.frontends.model import ImportedModel, signature_of
from tvmq.passes.sites import list_weight_sites

__all__ = ["dynamic_range_scheme", "from_tflite"]

EXTRA_HINT = "reading .tflite files needs the tflite extra: pip install 'tvmq[tflite]'"
# ImportedModel.meta key: the sites whose weights the file stores as int8 (dynamic range).
DYNAMIC_SITES = "tflite_dynamic_range_sites"


def _tflite():
    try:
        import tflite
    except ImportError:
        raise TvmqError(EXTRA_HINT) from None
    return tflite


def from_tflite(path: str | os.PathLike) -> ImportedModel:
    """Import a ``.tflite`` file; see the module docstring for what each kind becomes."""
    label = os.fspath(path)
    data = Path(path).read_bytes()
    # The flatbuffer's file identifier; anything else would crash the reader.
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise TvmqError(f"{label}: not a TFLite flatbuffer (no 'TFL3' identifier)")
    tflite = _tflite()
    model = tflite.Model.GetRootAsModel(data, 0)
    if model.SubgraphsLength() < 1:
        raise TvmqError(f"{label}: the TFLite model has no subgraph")

    from tvm.relax.frontend.tflite import tflite_frontend as tf_frontend

    converter_cls = _converter_class(tf_frontend)
    dynamic = _check_ops(model, label, tf_frontend, converter_cls)
    converter_cls.dynamic_weights = dynamic
    try:
        mod = tf_frontend.from_tflite(model, op_converter=converter_cls)
    except TvmqError:
        raise
    except Exception as err:  # the frontend's asserts, TypeErrors, OpNotImplemented ...
        first = (str(err).strip().splitlines() or [""])[0]
        raise TvmqError(
            f"{label}: TVM's TFLite importer failed ({type(err).__name__}: {first}); "
            "a model converted with a fixed batch size often avoids this"
        ) from None
    mod["main"] = mod["main"].without_attr("params")
    graph = model.Subgraphs(0)
    in_names = [_name(graph, graph.Inputs(i)) for i in range(graph.InputsLength())]
    out_names = [_name(graph, graph.Outputs(i)) for i in range(graph.OutputsLength())]
    try:
        inputs, outputs = signature_of(mod["main"], in_names, out_names)
    except TvmqError as err:
        raise TvmqError(f"{label}: {err}") from None
    meta = {"tflite_version": int(model.Version())}
    if dynamic:
        meta[DYNAMIC_SITES] = _dynamic_sites(mod, dynamic.values())
    return ImportedModel(mod, inputs, outputs, source="tflite", meta=meta)


def dynamic_range_scheme(model: ImportedModel):
    """The ``Int8Dynamic`` scheme that re-quantizes a dynamic-range file's int8 layers, or None."""
    sites = model.meta.get(DYNAMIC_SITES)
    if not sites:
        return None
    others = [s.name for s in list_weight_sites(model.mod["main"]) if s.name not in sites]
    return Int8Dynamic(weight_per_channel=True, activation_per_row=True, skip=tuple(others))


def _name(graph, index: int) -> str:
    return graph.Tensors(index).Name().decode("utf-8")


def _op_names(model, tf_frontend) -> list[str]:
    from tflite.BuiltinOperator import BuiltinOperator

    codes = tf_frontend.build_str_map(BuiltinOperator())
    graph = model.Subgraphs(0)
    names = []
    for i in range(graph.OperatorsLength()):
        oc = model.OperatorCodes(graph.Operators(i).OpcodeIndex())
        code = max(oc.DeprecatedBuiltinCode(), oc.BuiltinCode())
        name = codes.get(code, f"builtin #{code}")
        if name == "CUSTOM":
            name = f"CUSTOM ({(oc.CustomCode() or b'').decode('utf-8', 'replace')})"
        names.append(name)
    return names


def _check_ops(model, label: str, tf_frontend, converter_cls) -> dict[int, np.ndarray]:
    """Refuse unsupported ops by name; return the dynamic-range weights (tensor -> float value)."""
    from tvm import relax

    graph = model.Subgraphs(0)
    conv = converter_cls(model, graph, tf_frontend.ExprTable(), relax.BlockBuilder())
    names = _op_names(model, tf_frontend)
    unknown = sorted({n for n in names if n not in conv.convert_map})
    if unknown:
        raise UnsupportedOperatorError(
            f"{label}: TFLite operator(s) {', '.join(unknown)} not supported "
            "(TVM's TFLite frontend has no converter for them)"
        )
    dynamic: dict[int, np.ndarray] = {}
    bad_quantized = set()
    for i, name in enumerate(names):
        op = graph.Operators(i)
        ins = conv.get_input_tensors(op)
        outs = conv.get_output_tensors(op)
        acts_q = any(t.qnn_params for t in ins[:1] + outs)
        weights_q = [t for t in ins[1:] if t.qnn_params]
        if not acts_q and weights_q and name != "DEQUANTIZE":
            for t in weights_q:  # dynamic range: float activations, int8 constant weights
                dynamic[t.tensor_idx] = _dequantized(conv, t)
        elif (acts_q or weights_q) and name not in conv._SUPPORTED_QUANTIZED_OPS:
            bad_quantized.add(name)
    if bad_quantized:
        raise UnsupportedOperatorError(
            f"{label}: quantized TFLite operator(s) {', '.join(sorted(bad_quantized))} not "
            "supported (TVM's TFLite frontend converts them in float only)"
        )
    return dynamic


def _dequantized(conv, t) -> np.ndarray:
    """A quantized constant's float value, ``(q - z) * s`` along its quantized axis."""
    q = conv.get_tensor_value(t).astype(np.float32)
    qp = t.tensor.Quantization()
    scale = qp.ScaleAsNumpy().astype(np.float32)
    zero = qp.ZeroPointAsNumpy().astype(np.float32)
    shape = [1] * q.ndim
    if scale.size > 1:
        shape[qp.QuantizedDimension()] = scale.size
    return ((q - zero.reshape(shape)) * scale.reshape(shape)).astype(np.float32)


def _converter_class(tf_frontend):
    """TVM's converter, with dynamic-range weights read as the float values they stand for."""

    class _FloatTensor:
        """A TFLite tensor seen as FLOAT32 (its buffer is replaced by the dequantized value)."""

        def __init__(self, tensor):
            self._tensor = tensor

        def Type(self):  # noqa: N802 - the flatbuffer API's name
            from tflite.TensorType import TensorType

            return TensorType.FLOAT32

        def __getattr__(self, name):
            return getattr(self._tensor, name)

    class Converter(tf_frontend.OperatorConverter):
        dynamic_weights: dict[int, np.ndarray] = {}

        def check_unsupported_ops(self):  # done by _check_ops, with tvmq's errors
            return None

        def get_tensors(self, tensors_idx_list):
            out = super().get_tensors(tensors_idx_list)
            for i, t in enumerate(out):
                if t.tensor_idx in self.dynamic_weights:
                    out[i] = tf_frontend.TensorWrapper(
                        t.tensor_idx, _FloatTensor(t.tensor), t.buffer, None
                    )
            return out

        def get_tensor_value(self, tensor_wrapper, is_sparse=False):
            value = self.dynamic_weights.get(tensor_wrapper.tensor_idx)
            if value is not None:
                return value
            return super().get_tensor_value(tensor_wrapper, is_sparse)

    return Converter


def _dynamic_sites(mod, weights) -> list[str]:
    """Names of the weight sites that read one of the dequantized dynamic-range weights."""
    found = []
    for site in list_weight_sites(mod["main"]):
        w = np.asarray(site.weight)
        for d in weights:
            if any(c.shape == w.shape and np.array_equal(c, w) for c in (d, d.T)):
                found.append(site.name)
                break
    return found
