"""Quantization: reference math (``qmath``) and schemes (``Int8Static``, ``WeightOnly``...)."""

from tvmq.core import qmath
from tvmq.core.schemes import (
    Int8Dynamic,
    Int8Static,
    Scheme,
    WeightOnly,
    get_scheme,
    list_schemes,
)

# One module per scheme; importing it registers its quantize() handler.
from tvmq.quantization import dynamic, weight_only  # noqa: F401
from tvmq.quantization.accuracy import (
    AccuracyControl,
    AccuracyControlResult,
    layer_sensitivity,
    quantize_with_accuracy_control,
)
from tvmq.quantization.bias_correction import bias_corrections
from tvmq.quantization.collect import (
    ActivationStats,
    collect_activation_qparams,
    collect_activation_stats,
)
from tvmq.quantization.quantize import (
    LayerReport,
    QuantizationReport,
    QuantizedModel,
    quantize,
    register_handler,
)
from tvmq.quantization.static import static_int8_passes

__all__ = [
    "AccuracyControl",
    "AccuracyControlResult",
    "bias_corrections",
    "layer_sensitivity",
    "quantize_with_accuracy_control",
    "ActivationStats",
    "LayerReport",
    "QuantizationReport",
    "QuantizedModel",
    "collect_activation_qparams",
    "collect_activation_stats",
    "quantize",
    "register_handler",
    "static_int8_passes",
    "Int8Dynamic",
    "Int8Static",
    "Scheme",
    "WeightOnly",
    "get_scheme",
    "list_schemes",
    "qmath",
]
