"""Weight-only quantization (:class:`WeightOnly`), the handler of ``quantize(..., "w8" | "w4")``.

``QuantizeWeightOnly``: int8 or packed int4 weights (per channel or per group, symmetric or
not), dequantized at run time; compute stays float. No calibration data is needed; when
some is given, its first batch measures the SQNRs of the report.
"""

from __future__ import annotations

from tvmq.core import qmath
from tvmq.core.schemes import WeightOnly
from tvmq.passes import QuantizeEmbedding, prepare_passes
from tvmq.passes.quantize_weight_only import (
    QuantizeWeightOnly,
    dequantize_weight,
    quantize_weight,
)
from tvmq.passes.sites import list_weight_sites, site_skipped
from tvmq.quantization.quantize import HandlerResult, register_handler
from tvmq.quantization.report import (
    FirstBatch,
    LayerReport,
    QuantizationReport,
    combined_sqnr,
    first_batch_stats,
    layer_output_sqnr,
)

__all__ = ["quantize_weight_only"]


@register_handler(WeightOnly)
def quantize_weight_only(mod, imported, calibration_data, scheme: WeightOnly, *, progress):
    """Weight-only quantization (no calibration): the scheme's fields are the pass's."""
    prepared = prepare_passes()(mod)
    qpass = QuantizeWeightOnly(scheme.bits, scheme.group_size, scheme.symmetric, scheme.skip)
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
        skipped = site_skipped(site, scheme.skip)
        r.reason = "skipped by the scheme" if skipped else ""
        r.quantized = not r.reason
        q, s, z, g = quantize_weight(
            site.weight, site.kind, scheme.bits, scheme.group_size, scheme.symmetric
        )
        w_dq = dequantize_weight(q, s, z, site.kind)
        r.weight_sqnr_db = qmath.sqnr(site.weight, w_dq)
        r.weight_dtype = f"{'' if scheme.symmetric else 'u'}int{scheme.bits}"
        r.group_size = g
        sample = stats.samples.get(site.name) if stats is not None else None
        r.output_sqnr_db = layer_output_sqnr(site, sample, w_dq, sample)
        if r.output_sqnr_db is None:
            r.output_sqnr_db = combined_sqnr(r.weight_sqnr_db, r.activation_sqnr_db)
        layers.append(r)
    report = QuantizationReport(
        scheme=scheme.to_dict(),
        layers=layers,
        # compute is float by design: list the ops whose weights stay float
        float_ops=[f"{s.kind}:{s.var.name}" for s in list_weight_sites(quantized["main"])],
        num_calibration_batches=0 if stats is None else stats.num_batches,
    )
    return HandlerResult(report, quantized, FirstBatch.of(stats))
