"""``quantize``: post-training quantization of an imported model, one verb for three schemes.

- :class:`Int8Static` (``static.py``): calibrate (``collect``) -> [bias correction] ->
  ``AnnotateQDQ`` -> ``FoldQuantScales`` -> ``LowerInt8``; matmul / conv2d run as
  int8 x int8 -> int32.
- :class:`Int8Dynamic` (``dynamic.py``): ``QuantizeDynamic``; int8 weights, activation
  ranges at run time.
- :class:`WeightOnly` (``weight_only.py``): ``QuantizeWeightOnly``; int8 / packed int4
  weights, float compute.

Each scheme's handler lives in its own module and registers itself for its config type
with :func:`register_handler`; :func:`quantize` looks the handler up by ``type(scheme)``.
The result is an ordinary Relax module plus a :class:`QuantizationReport` saying which
layers were quantized, which stayed float and how much signal each quantized tensor keeps
(SQNR). Dynamic and weight-only quantization need no calibration data; when some is
given, its first batch measures the SQNRs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tvm

from tvmq.core.schemes import Scheme, get_scheme
from tvmq.errors import TvmqError
from tvmq.frontends.model import ImportedModel, check_finite_weights, signature_of
from tvmq.passes import prepare_passes
from tvmq.passes.site_names import check_skip
from tvmq.quantization.report import (
    FirstBatch,
    LayerReport,
    QuantizationReport,
    host_output_sqnr,
)

__all__ = [
    "HandlerResult",
    "LayerReport",
    "QuantizationReport",
    "QuantizedModel",
    "quantize",
    "register_handler",
]


@dataclass
class HandlerResult:
    """What a scheme handler returns.

    ``first_batch``: the first calibration batch and the float outputs on it, for the output
    SQNRs (None without calibration data); ``pipeline_params``: the keyword arguments of the
    Relax pipeline ``"tvmq"`` that turn the float module into ``mod`` (None when no pass
    pipeline reproduces it: other schemes, bias correction).
    """

    report: QuantizationReport
    mod: tvm.IRModule
    first_batch: FirstBatch | None = None
    pipeline_params: dict[str, Any] | None = None


# handler(mod, imported, calibration_data, scheme, *, progress[, bias_correction])
#   -> HandlerResult; `mod` is `imported.mod` with finite weights.
Handler = Callable[..., HandlerResult]
_HANDLERS: dict[type, tuple[Handler, bool]] = {}


def register_handler(scheme_type: type, *, bias_correction: bool = False):
    """Decorator: make the function :func:`quantize`'s handler for schemes of `scheme_type`.

    Parameters
    ----------
    scheme_type : type
        The scheme (config) class, e.g. ``Int8Static``; subclasses use it too unless they
        register their own.
    bias_correction : bool
        Whether the handler takes ``bias_correction=True`` (otherwise :func:`quantize`
        rejects it before calling the handler).
    """

    def register(fn: Handler) -> Handler:
        _HANDLERS[scheme_type] = (fn, bias_correction)
        return fn

    return register


def _handler(scheme) -> tuple[Handler, bool]:
    for cls in type(scheme).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    raise TvmqError(
        f"quantize() has no handler for {type(scheme).__name__} schemes "
        "(tvmq.quantization.register_handler adds one)"
    )


@dataclass
class QuantizedModel(ImportedModel):
    """An :class:`ImportedModel` whose ``mod`` is quantized, with the :class:`QuantizationReport`.

    ``first_batch`` and ``pipeline_params`` as in :class:`HandlerResult`.
    """

    report: QuantizationReport | None = None
    first_batch: FirstBatch | None = None
    pipeline_params: dict[str, Any] | None = None

    @property
    def model(self) -> QuantizedModel:
        """The quantized model itself (for code that reads ``result.model``)."""
        return self

    @property
    def float_ops(self) -> list[str]:
        """Layers left in float, with the reason, then other float matmul / conv2d ops."""
        if self.report is None:
            return []
        layers = [f"{r.label} ({r.reason})" for r in self.report.layers if not r.quantized]
        float_vars = {r.var_name for r in self.report.layers if not r.quantized}
        others = [op for op in self.report.float_ops if op.split(":", 1)[1] not in float_vars]
        return layers + others

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for ``model.json``: the report as a dict."""
        return self.report.to_dict() if self.report is not None else {}


def _model_parts(model, input_names) -> tuple[tvm.IRModule, ImportedModel]:
    if isinstance(model, ImportedModel):
        return model.mod, model
    if isinstance(model, tvm.IRModule):
        if "main" not in [gv.name_hint for gv in model.get_global_vars()]:
            raise TvmqError("the IRModule has no 'main' function to quantize")
        inputs, outputs = signature_of(model["main"], list(input_names) if input_names else None)
        return model, ImportedModel(model, inputs, outputs, source="relax")
    raise TvmqError(
        f"quantize() takes an ImportedModel or a tvm.IRModule, got {type(model).__name__}; "
        "import the model first (tvmq.frontends)"
    )


def quantize(
    model: ImportedModel | tvm.IRModule,
    calibration_data: Any = None,
    scheme: Scheme | str = "int8",
    *,
    input_names: list[str] | None = None,
    progress: bool = True,
    evaluate: bool = True,
    bias_correction: bool = False,
) -> QuantizedModel:
    """Quantize a float model: static int8, dynamic int8 or weight-only int8 / int4.

    Parameters
    ----------
    model : ImportedModel or tvm.IRModule
        The float model; weights must be constants of ``main``.
    calibration_data
        Representative inputs in any form ``tvmq.calibration.iter_calibration_batches``
        takes (array, dict, .npz path, list or iterable of batches, DataLoader). Batches
        may have any number of rows; they are split/padded to the model's batch size.
        Required for static int8; optional (None) for dynamic and weight-only schemes,
        where only its first batch is used, to measure SQNRs.
    scheme : Int8Static, Int8Dynamic, WeightOnly or str
        ``"int8"``, ``"int8-dynamic"``, ``"w8"``, ``"w4"`` or a scheme object.
    input_names : list[str], optional
        Input names for a bare IRModule (default: ``main``'s parameter names).
    progress : bool
        Show calibration progress and print which layers stay float.
    evaluate : bool
        Compile the result for the host and measure output SQNR on the first calibration
        batch (``report.output_sqnr_db``; needs calibration data). ``tvmq.compile`` passes
        False and measures it on the executable it builds when the target is the host.
    bias_correction : bool
        Static int8 only: add to each layer's bias the expected quantization error of its
        output on the calibration data (empirical bias correction, Nagel et al. 2019; see
        ``tvmq.quantization.bias_correction``).

    Returns
    -------
    QuantizedModel
        ``mod`` quantized, same inputs/outputs, ``report`` (also in ``meta["quantization"]``).

    Raises
    ------
    TvmqError
        Unknown scheme, static int8 without calibration data, NaN/inf weights, bad
        calibration data, NaN/inf activations.
    """
    mod, imported = _model_parts(model, input_names)
    check_finite_weights(mod, when="quantizing")
    return quantize_checked(
        imported,
        calibration_data,
        scheme,
        progress=progress,
        evaluate=evaluate,
        bias_correction=bias_correction,
    )


def quantize_checked(
    imported: ImportedModel,
    calibration_data: Any = None,
    scheme: Scheme | str = "int8",
    *,
    progress: bool = True,
    evaluate: bool = True,
    bias_correction: bool = False,
) -> QuantizedModel:
    """:func:`quantize` for a model whose weights are known to be finite.

    ``tvmq.pipeline.compress`` checks the weights once (``check_finite_weights``), then
    quantizes through here; the parameters are :func:`quantize`'s.
    """
    scheme = get_scheme(scheme)
    mod = imported.mod
    # Site names are defined on the prepared form, which every handler quantizes.
    check_skip(prepare_passes()(mod), getattr(scheme, "skip", ()))
    handler, takes_bias_correction = _handler(scheme)
    if bias_correction and not takes_bias_correction:
        raise TvmqError(
            f"bias_correction applies to static int8 (Int8Static) only, not "
            f"{type(scheme).__name__}: it needs the calibrated activation quantization"
        )
    options = {"bias_correction": True} if bias_correction else {}
    result = handler(mod, imported, calibration_data, scheme, progress=progress, **options)
    report = result.report
    if evaluate and result.first_batch is not None:
        names = [s.name for s in imported.inputs]
        report.output_sqnr_db = host_output_sqnr(result.mod, result.first_batch, names)
    if progress and report.float_layers:
        print(
            f"tvmq: {len(report.float_layers)} of {len(report.layers)} layers stay float: "
            + ", ".join(f"{r.label} ({r.reason})" for r in report.layers if not r.quantized),
            file=sys.stderr,
        )
    meta = dict(imported.meta)
    meta["quantization"] = report.to_dict()
    return QuantizedModel(
        mod=result.mod,
        inputs=list(imported.inputs),
        outputs=list(imported.outputs),
        source=imported.source,
        meta=meta,
        report=report,
        first_batch=result.first_batch,
        pipeline_params=result.pipeline_params,
    )
