"""``quantize``: static int8 post-training quantization of an imported model.

calibrate (``collect``) -> ``AnnotateQDQ`` -> ``FoldQuantScales`` -> ``LowerInt8``; the
result is an ordinary Relax module whose matmul / conv2d run as int8 x int8 -> int32,
plus a :class:`QuantizationReport` saying which layers were quantized, which stayed float
and how much signal each quantized tensor keeps (SQNR).
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import tvm
from tvm import relax

from tvmq.errors import TvmqError
from tvmq.frontends.model import ImportedModel, signature_of
from tvmq.quantization import qmath
from tvmq.quantization.collect import (
    ActivationStats,
    activation_qparams,
    collect_activation_stats,
)
from tvmq.quantization.schemes import Int8Static, get_scheme

__all__ = [
    "LayerReport",
    "QuantizationReport",
    "QuantizedModel",
    "quantize",
    "static_int8_passes",
]


@dataclass
class LayerReport:
    """One quantizable layer (site) of the model.

    Attributes
    ----------
    name : str
        Site name (``conv2d_0``, ``matmul_3``): what ``skip`` and ``overrides`` match.
    op : str
        ``"matmul"`` or ``"conv2d"``.
    quantized : bool
        Whether the layer computes in int8 x int8 -> int32.
    reason : str
        Why it stayed float (empty when quantized).
    weight_shape : tuple[int, ...]
    activation_dtype : str or None
    activation_scale, activation_zero_point : float / int or None
        Calibrated per-tensor parameters of the layer's input.
    weight_sqnr_db : float or None
        SQNR of the int8 weight against the float weight.
    activation_sqnr_db : float or None
        SQNR of the quantized input activation against the float one, on the first
        calibration batch.
    var_name : str
        The Relax var that holds the op's result (how ``float_ops`` entries name it).
    """

    name: str
    op: str
    quantized: bool
    reason: str = ""
    weight_shape: tuple[int, ...] = ()
    activation_dtype: str | None = None
    activation_scale: float | None = None
    activation_zero_point: int | None = None
    weight_sqnr_db: float | None = None
    activation_sqnr_db: float | None = None
    var_name: str = ""


@dataclass
class QuantizationReport:
    """What :func:`quantize` did.

    Attributes
    ----------
    scheme : dict
        The scheme, as ``Int8Static.to_dict()``.
    layers : list[LayerReport]
        Every quantizable layer in dataflow order.
    float_ops : list[str]
        matmul / conv2d ops of the result that still compute in float (``"<op>:<var>"``,
        the form of the ``"tvmq.float_ops"`` attribute ``LowerInt8`` sets).
    num_calibration_batches : int
        Batches run during calibration (at the model's batch size).
    output_sqnr_db : list[float] or None
        Per model output: SQNR of the compiled int8 model against the float model on the
        first calibration batch (None when not evaluated).
    """

    scheme: dict
    layers: list[LayerReport] = field(default_factory=list)
    float_ops: list[str] = field(default_factory=list)
    num_calibration_batches: int = 0
    output_sqnr_db: list[float] | None = None

    @property
    def quantized_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.quantized]

    @property
    def float_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if not layer.quantized]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (infinite SQNRs become None)."""

        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, list | tuple):
                return [clean(x) for x in v]
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return v

        return clean(asdict(self))

    def summary(self) -> str:
        """A table of layers: dtype, scale, SQNRs, and why a layer stayed float."""

        def db(v):
            return "-" if v is None else ("inf" if math.isinf(v) else f"{v:.1f}")

        lines = [
            f"{'layer':<14} {'op':<7} {'int8':<5} {'act':<6} {'w SQNR':>7} {'x SQNR':>7}  note"
        ]
        for r in self.layers:
            lines.append(
                f"{r.name:<14} {r.op:<7} {'yes' if r.quantized else 'no':<5} "
                f"{r.activation_dtype or '-':<6} {db(r.weight_sqnr_db):>7} "
                f"{db(r.activation_sqnr_db):>7}  {r.reason}"
            )
        if self.output_sqnr_db is not None:
            lines.append("output SQNR (dB): " + ", ".join(db(v) for v in self.output_sqnr_db))
        return "\n".join(lines)


@dataclass
class QuantizedModel(ImportedModel):
    """An :class:`ImportedModel` whose ``mod`` is quantized, with the :class:`QuantizationReport`."""

    report: QuantizationReport | None = None

    @property
    def model(self) -> QuantizedModel:
        """The quantized model itself (for code that reads ``result.model``)."""
        return self

    @property
    def float_ops(self) -> list[str]:
        """Layers left in float, with the reason, then other float matmul / conv2d ops."""
        if self.report is None:
            return []
        layers = [f"{r.name} ({r.reason})" for r in self.report.layers if not r.quantized]
        float_vars = {r.var_name for r in self.report.layers if not r.quantized}
        others = [op for op in self.report.float_ops if op.split(":", 1)[1] not in float_vars]
        return layers + others

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for ``model.json``: the report as a dict."""
        return self.report.to_dict() if self.report is not None else {}


def static_int8_passes(activation_qparams=None, scheme: Int8Static | str = "int8"):
    """The pass ``Sequential`` :func:`quantize` runs after calibration (for compiler engineers).

    ``tvmq.passes.static_int8_passes`` with the scheme resolved; ``activation_qparams``
    comes from ``tvmq.quantization.collect.collect_activation_qparams``.
    """
    from tvmq.passes import static_int8_passes as passes

    return passes(activation_qparams, _static_scheme(scheme))


def _static_scheme(scheme) -> Int8Static:
    scheme = get_scheme(scheme)
    if not isinstance(scheme, Int8Static):
        raise TvmqError(
            f"quantize() does static int8 quantization and needs an Int8Static scheme "
            f"(e.g. 'int8'), got {type(scheme).__name__}"
        )
    return scheme


def _check_weights(mod: tvm.IRModule) -> None:
    """Raise TvmqError naming the first float constant with NaN/inf and the op reading it."""
    from tvmq.passes._quant_sites import is_tensor_const, ordered_bindings, relax_functions

    for gv, func in relax_functions(mod):
        for b in ordered_bindings(func):
            bad = []

            def visit(e, bad=bad):
                if is_tensor_const(e) and str(e.ty.dtype).startswith("float"):
                    data = e.value.numpy()
                    if not np.isfinite(data).all():
                        bad.append(data)

            relax.analysis.post_order_visit(b.value, visit)
            if bad:
                data = bad[0]
                op = b.value.op.name if isinstance(b.value, relax.Call) else type(b.value).__name__
                n_nan = int(np.isnan(data).sum())
                n_inf = int(np.isinf(data).sum())
                raise TvmqError(
                    f"a constant of shape {tuple(data.shape)} read by {op} (binding "
                    f"'{b.var.name}' in {gv.name_hint}) has {n_nan} NaN and {n_inf} inf "
                    "values; fix the float model's weights before quantizing"
                )


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


def _layer_reports(prepared, scheme: Int8Static, stats: ActivationStats, qparams, float_ops):
    from tvmq.passes._quant_sites import is_skipped, list_quant_sites
    from tvmq.passes.annotate_qdq import weight_qparams

    float_vars = {op.split(":", 1)[1] for op in float_ops}
    reports = []
    for site in list_quant_sites(prepared["main"]):
        layer = scheme.for_layer(site.name)
        r = LayerReport(
            site.name,
            site.kind,
            False,
            weight_shape=tuple(site.weight.shape),
            var_name=site.var.name,
        )
        if is_skipped(site.name, site.kind, scheme.skip):
            r.reason = "skipped by the scheme"
        elif site.name not in qparams:
            r.reason = "no calibration statistics (activation is not a variable of main)"
        elif site.var.name in float_vars:
            r.reason = "LowerInt8 could not lower it"
        else:
            r.quantized = True
        s_w, z_w, axis = weight_qparams(site, layer)
        w_q = qmath.quantize(site.weight, s_w, z_w, "int8", axis)
        r.weight_sqnr_db = qmath.sqnr(site.weight, qmath.dequantize(w_q, s_w, z_w, axis))
        if site.name in qparams:
            scale, zp = qparams[site.name]
            r.activation_dtype = layer.activation_dtype
            r.activation_scale, r.activation_zero_point = float(scale), int(zp)
            sample = stats.samples.get(site.name)
            if sample is not None:
                q = qmath.quantize(sample, scale, zp, layer.activation_dtype)
                r.activation_sqnr_db = qmath.sqnr(sample, qmath.dequantize(q, scale, zp))
        reports.append(r)
    return reports


def _evaluate(mod: tvm.IRModule, stats: ActivationStats, names: list[str]) -> list[float]:
    from tvmq.quantization.collect import _flatten, _host_target

    ex = tvm.compile(mod, target=_host_target())
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(stats.first_inputs[n]) for n in names])
    got = _flatten(out)
    return [qmath.sqnr(ref, q) for ref, q in zip(stats.first_outputs, got, strict=True)]


def quantize(
    model: ImportedModel | tvm.IRModule,
    calibration_data: Any,
    scheme: Int8Static | str = "int8",
    *,
    input_names: list[str] | None = None,
    progress: bool = True,
    evaluate: bool = True,
) -> QuantizedModel:
    """Quantize a float model to static int8 (int8 x int8 -> int32 matmul / conv2d).

    Parameters
    ----------
    model : ImportedModel or tvm.IRModule
        The float model; weights must be constants of ``main``.
    calibration_data
        Representative inputs in any form ``tvmq.calibration.iter_calibration_batches``
        takes (array, dict, .npz path, list or iterable of batches, DataLoader). Batches
        may have any number of rows; they are split/padded to the model's batch size.
    scheme : Int8Static or str
        ``"int8"`` or an :class:`Int8Static` (activation dtype, observer, skip, requantize...).
    input_names : list[str], optional
        Input names for a bare IRModule (default: ``main``'s parameter names).
    progress : bool
        Show calibration progress and print which layers stay float.
    evaluate : bool
        Compile the result for the host and measure output SQNR on the first calibration
        batch (``report.output_sqnr_db``).

    Returns
    -------
    QuantizedModel
        ``mod`` quantized, same inputs/outputs, ``report`` (also in ``meta["quantization"]``).

    Raises
    ------
    TvmqError
        Non-static scheme, NaN/inf weights, bad calibration data, NaN/inf activations.
    """
    from tvmq.passes import prepare_passes
    from tvmq.passes import static_int8_passes as passes
    from tvmq.passes.lower_int8 import float_compute_ops

    scheme = _static_scheme(scheme)
    mod, imported = _model_parts(model, input_names)
    _check_weights(mod)
    prepared = prepare_passes()(mod)
    stats = collect_activation_stats(
        prepared, calibration_data, scheme, inputs=imported.inputs, progress=progress
    )
    qparams = activation_qparams(stats, scheme)
    quantized = passes(qparams, scheme)(prepared)

    float_ops = float_compute_ops(quantized["main"])
    report = QuantizationReport(
        scheme=scheme.to_dict(),
        layers=_layer_reports(prepared, scheme, stats, qparams, float_ops),
        float_ops=float_ops,
        num_calibration_batches=stats.num_batches,
    )
    if evaluate:
        report.output_sqnr_db = _evaluate(quantized, stats, [s.name for s in imported.inputs])
    if progress and report.float_layers:
        print(
            f"tvmq: {len(report.float_layers)} of {len(report.layers)} layers stay float: "
            + ", ".join(f"{r.name} ({r.reason})" for r in report.layers if not r.quantized),
            file=sys.stderr,
        )
    meta = dict(imported.meta)
    meta["quantization"] = report.to_dict()
    return QuantizedModel(
        mod=quantized,
        inputs=list(imported.inputs),
        outputs=list(imported.outputs),
        source=imported.source,
        meta=meta,
        report=report,
    )
