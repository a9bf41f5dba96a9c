"""Static int8 quantization (:class:`Int8Static`), the handler of ``quantize(..., "int8")``.

prepare -> [SmoothQuant] -> calibrate (``collect``) -> [bias correction] -> ``AnnotateQDQ``
-> ``FoldQuantScales`` -> ``LowerInt8`` -> [``QuantizeDynamic`` on ``scheme.dynamic``
sites]; matmul / conv2d run as int8 x int8 -> int32. The report compares each layer's
quantized weight, input and output with the float ones on the first calibration batch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tvm

from tvmq.core import qmath
from tvmq.core.schemes import Int8Static, get_scheme
from tvmq.errors import TvmqError
from tvmq.passes import pipeline as pass_pipeline
from tvmq.passes import prepare_passes
from tvmq.passes.analysis import float_compute_ops
from tvmq.passes.annotate_qdq import weight_qparams
from tvmq.passes.quantize_dynamic import ATTR as DYNAMIC_ATTR
from tvmq.passes.quantize_dynamic import QuantizeDynamic
from tvmq.passes.relax_utils import ordered_bindings
from tvmq.passes.sites import list_weight_sites, select_sites, site_skipped
from tvmq.passes.smooth_quant import smooth_sites
from tvmq.passes.tensor_sites import list_tensor_sites
from tvmq.progress import phase
from tvmq.quantization.auto_observer import choose_auto_observers
from tvmq.quantization.bias_correction import bias_corrections
from tvmq.quantization.collect import (
    ActivationStats,
    activation_qparams,
    collect_activation_stats,
    collect_channel_absmax,
)
from tvmq.quantization.dynamic import fill_dynamic_matmul_report
from tvmq.quantization.quantize import HandlerResult, register_handler
from tvmq.quantization.report import (
    FirstBatch,
    LayerReport,
    QuantizationReport,
    combined_sqnr,
    layer_output_sqnr,
)

__all__ = [
    "dynamic_sites",
    "quantize_params",
    "quantize_static",
    "smooth_site_names",
    "static_int8_passes",
    "static_pipeline_params",
]


def static_int8_passes(
    activation_qparams=None, scheme: Int8Static | str = "int8"
) -> tvm.transform.Pass:
    """The pass ``Sequential`` :func:`quantize` runs after calibration (for compiler engineers).

    ``tvmq.passes.static_int8_passes`` with the scheme turned into its parameters;
    ``activation_qparams`` comes from ``tvmq.quantization.collect.collect_activation_qparams``.
    """
    scheme = _static_scheme(scheme)
    return pass_pipeline.static_int8_passes(
        activation_qparams, **quantize_params(scheme, activation_qparams or {})
    )


def quantize_params(scheme: Int8Static, activation_qparams) -> dict:
    """The parameters of ``tvmq.passes.static_int8_passes`` for `scheme`.

    Per-layer ``overrides`` become per-name mappings over the calibrated tensors.
    """
    params = {"skip": scheme.skip, "requantize": scheme.requantize}
    if not scheme.overrides:
        params["activation_dtype"] = scheme.activation_dtype
        params["weight_per_channel"] = scheme.weight_per_channel
    else:
        names = sorted(activation_qparams)
        params["activation_dtype"] = {n: scheme.for_layer(n).activation_dtype for n in names}
        params["weight_per_channel"] = {n: scheme.for_layer(n).weight_per_channel for n in names}
    return params


def _static_scheme(scheme) -> Int8Static:
    scheme = get_scheme(scheme)
    if not isinstance(scheme, Int8Static):
        raise TvmqError(
            f"quantize() does static int8 quantization and needs an Int8Static scheme "
            f"(e.g. 'int8'), got {type(scheme).__name__}"
        )
    return scheme


@register_handler(Int8Static, bias_correction=True)
def quantize_static(
    mod,
    imported,
    calibration_data,
    scheme: Int8Static,
    *,
    progress,
    bias_correction=False,
):
    """Static int8 quantization: the config and calibration become the parameters of
    ``tvmq.passes.pipeline``'s phases, which are then run.

    prepare -> [SmoothQuant on ``scheme.smooth`` sites, from per-channel ranges of a first
    calibration run] -> calibrate -> [bias correction] -> static passes (``scheme.dynamic``
    sites skipped) -> [QuantizeDynamic on exactly the ``scheme.dynamic`` sites].
    """
    if calibration_data is None:
        raise TvmqError(
            "static int8 quantization needs calibration data: a few hundred typical "
            "inputs (an array, a .npz file, or an iterable of batches)"
        )
    prepared = prepare_passes()(mod)
    dynamic = dynamic_sites(prepared["main"], scheme)
    smoothed = smooth_site_names(prepared["main"], scheme, dynamic)
    smooth = {"smooth_absmax": {}, "smooth": scheme.smooth}
    if smoothed:
        if _one_shot(calibration_data):  # read twice: for smoothing, then calibration
            calibration_data = list(calibration_data)
        smooth["smooth_absmax"] = collect_channel_absmax(
            prepared, calibration_data, smoothed, scheme, inputs=imported.inputs,
            progress=progress, label="tvmq calibrate (SmoothQuant channel ranges)",
        )  # fmt: skip
        prepared = pass_pipeline.smooth_passes(**smooth)(mod)
    static = _skipping(scheme, dynamic)
    stats = collect_activation_stats(
        prepared, calibration_data, scheme, inputs=imported.inputs, progress=progress
    )
    phase("quantize", progress)

    def quantized_module() -> tvm.IRModule:  # with the observers' current choice
        params = static_pipeline_params(prepared, scheme, activation_qparams(stats, static))
        return pass_pipeline.static_int8_passes(**params)(prepared)

    observer_choice = choose_auto_observers(
        stats, quantized_module, [s.name for s in imported.inputs], progress=progress
    )
    qparams = activation_qparams(stats, static)
    corrections = {}
    if bias_correction:
        corrections = bias_corrections(
            prepared, calibration_data, static, qparams, inputs=imported.inputs
        )
    params = static_pipeline_params(prepared, scheme, qparams, corrections)
    quantized = pass_pipeline.static_int8_passes(**params)(prepared)
    _check_dynamic_sites(quantized, dynamic)

    float_ops = float_compute_ops(quantized["main"])
    report = QuantizationReport(
        scheme=scheme.to_dict(),
        layers=_layer_reports(
            prepared, scheme, stats, params["activation_qparams"], float_ops, dynamic
        ),
        float_ops=float_ops,
        num_calibration_batches=stats.num_batches,
        bias_correction={k: [float(x) for x in v] for k, v in corrections.items()}
        if bias_correction
        else None,
        observer_choice=observer_choice,
    )
    return HandlerResult(report, quantized, FirstBatch.of(stats), {**smooth, **params})


def static_pipeline_params(
    prepared: tvm.IRModule,
    scheme: Int8Static,
    qparams: dict[str, tuple[float, int]],
    bias_corrections: dict | None = None,
) -> dict:
    """The parameters of ``tvmq.passes.static_int8_passes`` for `scheme` on `prepared`.

    ``qparams``: calibrated activation parameters (``activation_qparams``); the scheme's
    ``dynamic`` sites are left to ``QuantizeDynamic``; ``bias_corrections``: from
    ``tvmq.quantization.bias_correction.bias_corrections``. ``tvmq.quantization.quantize``
    builds its parameters here, and so can a script that calibrates on its own.
    """
    dynamic = dynamic_sites(prepared["main"], scheme)
    qparams = {k: v for k, v in qparams.items() if k.split(":")[0] not in dynamic}
    return {
        "activation_qparams": qparams,
        **quantize_params(_skipping(scheme, dynamic), qparams),
        "dynamic_vars": _site_vars(prepared["main"], dynamic),
        "dynamic_weight_per_channel": scheme.weight_per_channel,
        "bias_corrections": dict(bias_corrections or {}),
        "int8_embeddings": True,
    }


def _skipping(scheme: Int8Static, sites) -> Int8Static:
    """`scheme` with `sites` skipped as well."""
    return dataclasses.replace(scheme, skip=(*scheme.skip, *sites)) if sites else scheme


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
            source=site.source,
        )
        if site.name in dynamic:
            _dynamic_layer_report(r, site, stats, float_vars)
            reports.append(r)
            continue
        if site_skipped(site, scheme.skip):
            r.reason = "skipped by the scheme"
        elif site.name not in qparams:
            r.reason = "no calibration statistics (activation is not a variable of main)"
        elif site.var.name in float_vars:
            r.reason = "LowerInt8 could not lower it"
        else:
            r.quantized = True
        s_w, z_w, axis = weight_qparams(site, layer.weight_per_channel)
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
                r.output_sqnr_db = layer_output_sqnr(site, sample, w_dq, x_dq)
        if r.output_sqnr_db is None:
            r.output_sqnr_db = combined_sqnr(r.weight_sqnr_db, r.activation_sqnr_db)
        reports.append(r)
    reports += _matmul_act_reports(prepared, scheme, stats, qparams, float_vars)
    order = {b.var.name: i for i, b in enumerate(ordered_bindings(prepared["main"]))}
    return sorted(reports, key=lambda r: order.get(r.var_name, len(order)))


def _dynamic_layer_report(r: LayerReport, site, stats: ActivationStats, float_vars) -> None:
    """Fill `r` for a site quantized dynamically (per-row run-time uint8 activation ranges)."""
    r.quantized = site.var.name not in float_vars
    r.reason = "" if r.quantized else "QuantizeDynamic could not lower it"
    fill_dynamic_matmul_report(r, site, stats.samples.get(site.name), True, True)


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
        # the second operand's shape: ints, and names where its dims are symbolic
        r.weight_shape = tuple(
            int(d) if isinstance(d, tvm.tirx.IntImm) else str(d) for d in site.inputs[1].ty.shape
        )
        if site_skipped(site, scheme.skip):
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
                r.output_sqnr_db = combined_sqnr(r.weight_sqnr_db, r.activation_sqnr_db)
        reports.append(r)
    return reports


def _one_shot(data) -> bool:
    """Whether `data` is an iterator (a generator...) that a second pass would find empty."""
    try:
        return iter(data) is data
    except TypeError:
        return False


def dynamic_sites(func, scheme: Int8Static) -> tuple[str, ...]:
    """Names of the matmul sites of ``main`` that ``scheme.dynamic`` selects (not skipped,
    and with an accumulator that fits int32)."""
    if not scheme.dynamic:
        return ()
    plan = QuantizeDynamic(weight_per_channel=scheme.weight_per_channel).plan
    return tuple(
        s.name
        for s in select_sites(func, scheme.dynamic)
        if not site_skipped(s, scheme.skip) and plan(s) is None
    )


def smooth_site_names(func, scheme: Int8Static, dynamic) -> list[str]:
    """Names of the matmul sites to smooth: selected by ``scheme.smooth``, static, not skipped."""
    if not scheme.smooth:
        return []
    sites = {s.name: s for s in list_weight_sites(func)}
    return [
        n
        for n in smooth_sites(func, scheme.smooth)
        if n not in dynamic and not site_skipped(sites[n], scheme.skip)
    ]


def _site_vars(func, names) -> tuple[str, ...]:
    """Binding names of the weight sites called `names`.

    ``LowerInt8`` renumbers the sites it leaves float, so ``QuantizeDynamic`` finds the
    dynamic sites after it by their binding var, which the static passes keep.
    """
    wanted = set(names)
    return tuple(s.var.name for s in list_weight_sites(func) if s.name in wanted)


def _check_dynamic_sites(quantized, dynamic) -> None:
    done = quantized["main"].attrs.get(DYNAMIC_ATTR, []) if quantized["main"].attrs else []
    if len(done) != len(dynamic):
        raise TvmqError(
            f"internal error: could not find the dynamic sites {list(dynamic)} after static "
            "quantization (their binding vars changed)"
        )
