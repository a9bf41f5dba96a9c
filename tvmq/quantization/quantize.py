"""``quantize``: post-training quantization of an imported model, one verb for three schemes.

- :class:`Int8Static`: calibrate (``collect``) -> [bias correction] -> ``AnnotateQDQ`` ->
  ``FoldQuantScales`` -> ``LowerInt8``; matmul / conv2d run as int8 x int8 -> int32.
- :class:`Int8Dynamic`: ``QuantizeDynamic``; int8 weights, activation ranges at run time.
- :class:`WeightOnly`: ``QuantizeWeightOnly``; int8 / packed int4 weights, float compute.

The result is an ordinary Relax module plus a :class:`QuantizationReport` saying which
layers were quantized, which stayed float and how much signal each quantized tensor keeps
(SQNR). Dynamic and weight-only quantization need no calibration data; when some is
given, its first batch measures the SQNRs.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import tvm
from tvm import relax

from tvmq.core import qmath
from tvmq.core.schemes import Int8Dynamic, Int8Static, Scheme, get_scheme
from tvmq.core.selectors import is_skipped
from tvmq.errors import TvmqError
from tvmq.frontends.model import ImportedModel, check_finite_weights, signature_of
from tvmq.passes import pipeline as pass_pipeline
from tvmq.passes import prepare_passes
from tvmq.passes.analysis import float_compute_ops
from tvmq.passes.annotate_qdq import weight_qparams
from tvmq.passes.quantize_dynamic import (
    QuantizeDynamic,
    _is_dynamic_matmul,
    activation_qparams_dynamic,
    quantize_activation,
    weight_qparams_int8,
)
from tvmq.passes.quantize_weight_only import (
    QuantizeWeightOnly,
    dequantize_weight,
    quantize_weight,
    stable_sites,
)
from tvmq.passes.relax_utils import ordered_bindings
from tvmq.passes.sites import list_tensor_sites, list_weight_sites, select_sites
from tvmq.passes.smooth_quant import SmoothQuant, smooth_sites
from tvmq.quantization.bias_correction import correct_biases
from tvmq.quantization.collect import (
    ActivationStats,
    _flatten,
    _host_target,
    activation_qparams,
    collect_activation_stats,
    collect_channel_absmax,
)

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
        ``"matmul"``, ``"conv2d"``, or ``"matmul_act"`` for a matmul of two activations
        (attention's ``Q @ K^T``, ``P @ V``): its ``activation_*`` fields describe the
        first operand, ``weight_shape`` / ``weight_dtype`` / ``weight_sqnr_db`` the
        second (quantized per tensor like an activation).
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
    weight_dtype : str or None
        How the weight is stored when quantized: ``int8``, ``int4``, ``uint8``, ``uint4``.
    group_size : int or None
        Weight-only: reduction elements per scale (None: one scale per output channel).
    output_sqnr_db : float or None
        SQNR of the layer's output computed with quantized weight and input against the
        float output, on the first calibration batch (matmul layers; None when unknown).
        The per-layer sensitivity ``tvmq.quantization.accuracy`` ranks layers by.
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
    weight_dtype: str | None = None
    group_size: int | None = None
    output_sqnr_db: float | None = None


@dataclass
class QuantizationReport:
    """What :func:`quantize` did.

    Attributes
    ----------
    scheme : dict
        The scheme, as ``scheme.to_dict()``.
    layers : list[LayerReport]
        Every quantizable layer in dataflow order.
    float_ops : list[str]
        matmul / conv2d ops of the result that still compute in float (``"<op>:<var>"``,
        the form of the ``"tvmq.float_ops"`` attribute ``LowerInt8`` sets).
    num_calibration_batches : int
        Batches run during calibration (at the model's batch size); dynamic and
        weight-only quantization run at most one, to measure SQNRs.
    output_sqnr_db : list[float] or None
        Per model output: SQNR of the compiled quantized model against the float model on
        the first calibration batch (None when not evaluated).
    bias_correction : dict or None
        Static int8 with ``bias_correction=True``: layer name -> the per-channel
        correction added to its bias.
    """

    scheme: dict
    layers: list[LayerReport] = field(default_factory=list)
    float_ops: list[str] = field(default_factory=list)
    num_calibration_batches: int = 0
    output_sqnr_db: list[float] | None = None
    bias_correction: dict[str, list[float]] | None = None

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

        lines = [f"{'layer':<14} {'op':<10} {'q':<5} {'act':<6} {'w SQNR':>7} {'x SQNR':>7}  note"]
        for r in self.layers:
            lines.append(
                f"{r.name:<14} {r.op:<10} {'yes' if r.quantized else 'no':<5} "
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
    return pass_pipeline.static_int8_passes(activation_qparams, _static_scheme(scheme))


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
    check_finite_weights(mod, when="quantizing")


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


def _layer_reports(
    prepared, scheme: Int8Static, stats: ActivationStats, qparams, float_ops, dynamic=()
):
    float_vars = {op.split(":", 1)[1] for op in float_ops}
    reports = []
    for site in list_weight_sites(prepared["main"]):
        layer = scheme.for_layer(site.name)
        r = LayerReport(
            site.name,
            site.kind,
            False,
            weight_shape=tuple(site.weight.shape),
            var_name=site.var.name,
        )
        if site.name in dynamic:
            _dynamic_layer_report(r, site, stats, float_vars)
            reports.append(r)
            continue
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
        w_dq = qmath.dequantize(w_q, s_w, z_w, axis)
        r.weight_sqnr_db = qmath.sqnr(site.weight, w_dq)
        r.weight_dtype = "int8"
        if site.name in qparams:
            scale, zp = qparams[site.name]
            r.activation_dtype = layer.activation_dtype
            r.activation_scale, r.activation_zero_point = float(scale), int(zp)
            sample = stats.samples.get(site.name)
            if sample is not None:
                q = qmath.quantize(sample, scale, zp, layer.activation_dtype)
                x_dq = qmath.dequantize(q, scale, zp)
                r.activation_sqnr_db = qmath.sqnr(sample, x_dq)
                r.output_sqnr_db = _layer_output_sqnr(site, sample, w_dq, x_dq)
        if r.output_sqnr_db is None:
            r.output_sqnr_db = _combined_sqnr(r.weight_sqnr_db, r.activation_sqnr_db)
        reports.append(r)
    reports += _matmul_act_reports(prepared, scheme, stats, qparams, float_vars)
    order = {b.var.name: i for i, b in enumerate(ordered_bindings(prepared["main"]))}
    return sorted(reports, key=lambda r: order.get(r.var_name, len(order)))


def _dynamic_layer_report(r: LayerReport, site, stats: ActivationStats, float_vars) -> None:
    """Fill `r` for a site quantized dynamically (per-row run-time uint8 activation ranges)."""
    r.quantized = site.var.name not in float_vars
    r.reason = "" if r.quantized else "QuantizeDynamic could not lower it"
    w_q, s_w = weight_qparams_int8(site.weight, True)
    w_dq = qmath.dequantize(w_q, s_w, 0, site.weight_axis)
    r.weight_sqnr_db = qmath.sqnr(site.weight, w_dq)
    r.weight_dtype = "int8"
    r.activation_dtype = "uint8"  # per row at run time: no calibrated scale
    sample = stats.samples.get(site.name)
    if sample is not None:
        s_x, z_x = activation_qparams_dynamic(sample, True)
        x_q = quantize_activation(sample, s_x, z_x).astype(np.int32)
        x_dq = ((x_q - z_x) * s_x).astype(np.float32)
        r.activation_sqnr_db = qmath.sqnr(sample, x_dq)
        r.output_sqnr_db = _layer_output_sqnr(site, sample, w_dq, x_dq)
    if r.output_sqnr_db is None:
        r.output_sqnr_db = _combined_sqnr(r.weight_sqnr_db, r.activation_sqnr_db)


def _operand_sqnr(sample, qp, dtype) -> tuple[np.ndarray | None, float | None]:
    """(dequantized sample, its SQNR) of one per-tensor quantized operand."""
    if sample is None:
        return None, None
    x_dq = qmath.dequantize(qmath.quantize(sample, qp[0], qp[1], dtype), qp[0], qp[1])
    return x_dq, qmath.sqnr(sample, x_dq)


def _matmul_act_reports(prepared, scheme: Int8Static, stats, qparams, float_vars):
    """A :class:`LayerReport` per activation matmul (``matmul_act`` site) of ``main``."""
    reports = []
    for site in list_tensor_sites(prepared["main"]):
        if site.kind != "matmul_act":
            continue
        lhs, rhs = site.input_names
        r = LayerReport(site.name, site.kind, False, var_name=site.var.name)
        r.weight_shape = tuple(int(d) for d in site.inputs[1].ty.shape)
        if is_skipped(site.name, site.kind, scheme.skip):
            r.reason = "skipped by the scheme"
        elif lhs not in qparams or rhs not in qparams:
            r.reason = "no calibration statistics (an operand is not a variable of main)"
        elif site.var.name in float_vars:
            r.reason = "LowerInt8 could not lower it"
        else:
            r.quantized = True
        if lhs in qparams and rhs in qparams:
            a_dtype = scheme.for_layer(lhs).activation_dtype
            r.activation_dtype, r.weight_dtype = a_dtype, scheme.for_layer(rhs).activation_dtype
            r.activation_scale, r.activation_zero_point = map(float, qparams[lhs])
            r.activation_zero_point = int(r.activation_zero_point)
            a, b = stats.samples.get(lhs), stats.samples.get(rhs)
            a_dq, r.activation_sqnr_db = _operand_sqnr(a, qparams[lhs], a_dtype)
            b_dq, r.weight_sqnr_db = _operand_sqnr(b, qparams[rhs], r.weight_dtype)
            if a_dq is not None and b_dq is not None:
                ref = np.matmul(a.astype(np.float64), b.astype(np.float64))
                r.output_sqnr_db = qmath.sqnr(ref, np.matmul(a_dq, b_dq).astype(np.float64))
            else:
                r.output_sqnr_db = _combined_sqnr(r.weight_sqnr_db, r.activation_sqnr_db)
        reports.append(r)
    return reports


def _evaluate(mod: tvm.IRModule, stats: ActivationStats, names: list[str]) -> list[float]:
    ex = tvm.compile(mod, target=_host_target())
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(stats.first_inputs[n]) for n in names])
    got = _flatten(out)
    return [qmath.sqnr(ref, q) for ref, q in zip(stats.first_outputs, got, strict=True)]


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
        batch (``report.output_sqnr_db``; needs calibration data).
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
    scheme = get_scheme(scheme)
    mod, imported = _model_parts(model, input_names)
    _check_weights(mod)
    if isinstance(scheme, Int8Static):
        if calibration_data is None:
            raise TvmqError(
                "static int8 quantization needs calibration data: a few hundred typical "
                "inputs (an array, a .npz file, or an iterable of batches)"
            )
        report, quantized = _quantize_static(
            mod, imported, calibration_data, scheme, progress, evaluate, bias_correction
        )
    else:
        if bias_correction:
            raise TvmqError(
                "bias_correction applies to static int8 (Int8Static) only: it needs the "
                "calibrated activation quantization"
            )
        report, quantized = _quantize_weights(
            mod, imported, calibration_data, scheme, progress, evaluate
        )
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


def _quantize_static(mod, imported, calibration_data, scheme, progress, evaluate, correct):
    """(report, module) of static int8 quantization.

    prepare -> [SmoothQuant on ``scheme.smooth`` sites, from per-channel ranges of a first
    calibration run] -> calibrate -> [bias correction] -> static passes (``scheme.dynamic``
    sites skipped) -> [QuantizeDynamic on exactly the ``scheme.dynamic`` sites].
    """
    import dataclasses

    prepared = prepare_passes()(mod)
    dynamic = _dynamic_sites(prepared["main"], scheme)
    smoothed = _smooth_site_names(prepared["main"], scheme, dynamic)
    if smoothed:
        if _one_shot(calibration_data):  # read twice: for smoothing, then calibration
            calibration_data = list(calibration_data)
        absmax = collect_channel_absmax(
            prepared, calibration_data, smoothed, scheme, inputs=imported.inputs,
            progress=progress,
        )  # fmt: skip
        prepared = SmoothQuant(absmax, scheme.smooth)(prepared)
    static = scheme
    if dynamic:
        static = dataclasses.replace(scheme, skip=(*scheme.skip, *dynamic))
    stats = collect_activation_stats(
        prepared, calibration_data, scheme, inputs=imported.inputs, progress=progress
    )
    qparams = activation_qparams(stats, static)
    corrections = None
    if correct:
        prepared, corrections = correct_biases(
            prepared, calibration_data, static, qparams, inputs=imported.inputs
        )
    quantized = pass_pipeline.static_int8_passes(qparams, static)(prepared)
    if dynamic:
        quantized = _quantize_dynamic_sites(quantized, prepared, dynamic, scheme)

    float_ops = float_compute_ops(quantized["main"])
    report = QuantizationReport(
        scheme=scheme.to_dict(),
        layers=_layer_reports(prepared, scheme, stats, qparams, float_ops, dynamic),
        float_ops=float_ops,
        num_calibration_batches=stats.num_batches,
        bias_correction=corrections,
    )
    if evaluate:
        report.output_sqnr_db = _evaluate(quantized, stats, [s.name for s in imported.inputs])
    return report, quantized


def _one_shot(data) -> bool:
    """Whether `data` is an iterator (a generator...) that a second pass would find empty."""
    try:
        return iter(data) is data
    except TypeError:
        return False


def _dynamic_sites(func, scheme: Int8Static) -> tuple[str, ...]:
    """Names of the matmul sites of ``main`` that ``scheme.dynamic`` selects (not skipped,
    and with an accumulator that fits int32)."""
    if not scheme.dynamic:
        return ()
    plan = QuantizeDynamic(Int8Dynamic(weight_per_channel=scheme.weight_per_channel)).plan
    return tuple(
        s.name
        for s in select_sites(func, scheme.dynamic)
        if not is_skipped(s.name, s.kind, scheme.skip) and plan(s) is None
    )


def _smooth_site_names(func, scheme: Int8Static, dynamic) -> list[str]:
    """Names of the matmul sites to smooth: selected by ``scheme.smooth``, static, not skipped."""
    if not scheme.smooth:
        return []
    kinds = {s.name: s.kind for s in _sites(func)}
    return [
        n
        for n in smooth_sites(func, scheme.smooth)
        if n not in dynamic and not is_skipped(n, kinds[n], scheme.skip)
    ]


def _sites(func):
    return list_weight_sites(func)


def _quantize_dynamic_sites(quantized, prepared, dynamic, scheme: Int8Static):
    """Run ``QuantizeDynamic`` on the static result, on exactly the ``dynamic`` sites.

    The static passes left them float; ``QuantizeDynamic`` names sites counting only its
    own integer matmuls, so after ``LowerInt8`` its names can differ from the float
    model's: the sites are matched by their binding var instead, and every other float
    site goes to its ``skip`` list.
    """
    wanted = {s.var.name for s in _sites(prepared["main"]) if s.name in set(dynamic)}
    sites = stable_sites(quantized["main"], "", _is_dynamic_matmul)
    chosen = [s for s in sites if s.var.name in wanted]
    if len(chosen) != len(wanted) or len(wanted) != len(dynamic):
        raise TvmqError(
            f"internal error: could not find the dynamic sites {list(dynamic)} after static "
            "quantization (their binding vars changed)"
        )
    others = tuple(s.name for s in sites if s not in chosen)
    dyn_scheme = Int8Dynamic(weight_per_channel=scheme.weight_per_channel, skip=others)
    return QuantizeDynamic(dyn_scheme)(quantized)


class _FirstBatches:
    """A stand-in scheme for ``collect_activation_stats``: min/max observers, `n` batches."""

    def __init__(self, n: int = 1):
        self.num_calibration_batches = n


def _combined_sqnr(*values: float | None) -> float | None:
    """SQNR of a product whose factors carry independent noise of these SQNRs (dB)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    noise = sum(0.0 if math.isinf(v) else 10.0 ** (-v / 10.0) for v in vals)
    return math.inf if noise == 0 else -10.0 * math.log10(noise)


def _layer_output_sqnr(site, sample, w_dq, x_dq) -> float | None:
    """SQNR of ``x_dq @ w_dq`` against ``x @ W`` (matmul sites with a sample)."""
    if sample is None or site.kind != "matmul":
        return None
    ref = sample.astype(np.float64) @ site.weight.astype(np.float64)
    return qmath.sqnr(ref, x_dq.astype(np.float64) @ w_dq.astype(np.float64))


def _quantize_weights(mod, imported, calibration_data, scheme, progress, evaluate):
    """(report, module) of dynamic int8 or weight-only quantization (no calibration)."""
    prepared = prepare_passes()(mod)
    dynamic = isinstance(scheme, Int8Dynamic)
    qpass = QuantizeDynamic(scheme) if dynamic else QuantizeWeightOnly(scheme)
    quantized = qpass(prepared)
    stats = None
    if calibration_data is not None:
        stats = collect_activation_stats(
            prepared, calibration_data, _FirstBatches(1), inputs=imported.inputs, progress=False
        )

    layers = []
    for site in list_weight_sites(prepared["main"]):
        r = LayerReport(
            site.name,
            site.kind,
            False,
            weight_shape=tuple(site.weight.shape),
            var_name=site.var.name,
        )
        sample = stats.samples.get(site.name) if stats is not None else None
        x_dq = sample
        if dynamic:
            r.reason = qpass.plan(site) or ""
            r.weight_dtype = "int8"
            w_q, s_w = weight_qparams_int8(site.weight, scheme.weight_per_channel)
            axis = site.weight_axis if np.ndim(s_w) else None
            w_dq = qmath.dequantize(w_q, s_w, 0, axis) if site.kind == "matmul" else None
            if site.kind == "matmul":
                r.weight_sqnr_db = qmath.sqnr(site.weight, w_dq)
                r.activation_dtype = "uint8"
            if sample is not None and site.kind == "matmul":
                s_x, z_x = activation_qparams_dynamic(sample, scheme.activation_per_row)
                x_q = quantize_activation(sample, s_x, z_x).astype(np.int32)
                x_dq = ((x_q - z_x) * s_x).astype(np.float32)
                r.activation_sqnr_db = qmath.sqnr(sample, x_dq)
        else:
            r.reason = (
                "skipped by the scheme" if is_skipped(site.name, site.kind, scheme.skip) else ""
            )
            q, s, z, g = quantize_weight(
                site.weight, site.kind, scheme.bits, scheme.group_size, scheme.symmetric
            )
            w_dq = dequantize_weight(q, s, z, site.kind)
            r.weight_sqnr_db = qmath.sqnr(site.weight, w_dq)
            r.weight_dtype = f"{'' if scheme.symmetric else 'u'}int{scheme.bits}"
            r.group_size = g
        r.quantized = not r.reason
        if w_dq is not None:
            r.output_sqnr_db = _layer_output_sqnr(site, sample, w_dq, x_dq)
            if r.output_sqnr_db is None:
                r.output_sqnr_db = _combined_sqnr(r.weight_sqnr_db, r.activation_sqnr_db)
        layers.append(r)

    if dynamic:
        float_ops = float_compute_ops(quantized["main"])
    else:  # compute is float by design: list the ops whose weights stay float
        float_ops = [f"{s.kind}:{s.var.name}" for s in list_weight_sites(quantized["main"])]
    report = QuantizationReport(
        scheme=scheme.to_dict(),
        layers=layers,
        float_ops=float_ops,
        num_calibration_batches=0 if stats is None else stats.num_batches,
    )
    if evaluate and stats is not None:
        report.output_sqnr_db = _evaluate(quantized, stats, [s.name for s in imported.inputs])
    return report, quantized
