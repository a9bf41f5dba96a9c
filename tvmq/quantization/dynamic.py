"""Dynamic int8 quantization (:class:`Int8Dynamic`), the handler of
``quantize(..., "int8-dynamic")``.

``QuantizeDynamic``: int8 weights quantized now, uint8 activation ranges computed at run
time (per row or per tensor), integer matmul. No calibration data is needed; when some is
given, its first batch measures the SQNRs of the report.
"""

from __future__ import annotations

import numpy as np

from tvmq.core import qmath
from tvmq.core.schemes import Int8Dynamic
from tvmq.passes import QuantizeEmbedding, prepare_passes
from tvmq.passes.analysis import float_compute_ops
from tvmq.passes.quantize_dynamic import (
    QuantizeDynamic,
    activation_qparams_dynamic,
    quantize_activation,
    weight_qparams_int8,
)
from tvmq.passes.sites import list_weight_sites
from tvmq.quantization.quantize import HandlerResult, register_handler
from tvmq.quantization.report import (
    FirstBatch,
    LayerReport,
    QuantizationReport,
    combined_sqnr,
    first_batch_stats,
    layer_output_sqnr,
)

__all__ = ["fill_dynamic_matmul_report", "quantize_dynamic"]


@register_handler(Int8Dynamic)
def quantize_dynamic(mod, imported, calibration_data, scheme: Int8Dynamic, *, progress):
    """Dynamic int8 quantization (no calibration): the scheme's fields are the pass's."""
    prepared = prepare_passes()(mod)
    qpass = QuantizeDynamic(
        weight_per_channel=scheme.weight_per_channel,
        activation_per_row=scheme.activation_per_row,
        skip=scheme.skip,
    )
    quantized = QuantizeEmbedding()(qpass(prepared))
    stats = first_batch_stats(prepared, calibration_data, imported.inputs)
    layers = []
    for site in list_weight_sites(prepared["main"]):
        r = LayerReport(
            site.name,
            site.kind,
            False,
            weight_shape=tuple(site.weight.shape),
            var_name=site.var.name,
            source=site.source,
        )
        r.reason = qpass.plan(site) or ""
        r.quantized = not r.reason
        r.weight_dtype = "int8"
        if site.kind == "matmul":
            sample = stats.samples.get(site.name) if stats is not None else None
            fill_dynamic_matmul_report(
                r, site, sample, scheme.weight_per_channel, scheme.activation_per_row
            )
        layers.append(r)
    report = QuantizationReport(
        scheme=scheme.to_dict(),
        layers=layers,
        float_ops=float_compute_ops(quantized["main"]),
        num_calibration_batches=0 if stats is None else stats.num_batches,
    )
    return HandlerResult(report, quantized, FirstBatch.of(stats))


def fill_dynamic_matmul_report(
    r: LayerReport, site, sample, weight_per_channel: bool, activation_per_row: bool
) -> None:
    """Fill `r`'s dtypes and SQNRs for a matmul site quantized dynamically.

    ``sample`` is the site's float input on the first calibration batch, or None.
    """
    w_q, s_w = weight_qparams_int8(site.weight, weight_per_channel)
    axis = site.weight_axis if np.ndim(s_w) else None
    w_dq = qmath.dequantize(w_q, s_w, 0, axis)
    r.weight_sqnr_db = qmath.sqnr(site.weight, w_dq)
    r.weight_dtype = "int8"
    r.activation_dtype = "uint8"  # per row or tensor at run time: no calibrated scale
    x_dq = sample
    if sample is not None:
        s_x, z_x = activation_qparams_dynamic(sample, activation_per_row)
        x_q = quantize_activation(sample, s_x, z_x).astype(np.int32)
        x_dq = ((x_q - z_x) * s_x).astype(np.float32)
        r.activation_sqnr_db = qmath.sqnr(sample, x_dq)
    r.output_sqnr_db = layer_output_sqnr(site, sample, w_dq, x_dq)
    if r.output_sqnr_db is None:
        r.output_sqnr_db = combined_sqnr(r.weight_sqnr_db, r.activation_sqnr_db)
