"""What :func:`tvmq.quantization.quantize` reports, and the SQNR measurements behind it.

:class:`QuantizationReport` lists every quantizable layer (:class:`LayerReport`): whether it
was quantized, why not, and how much signal its quantized weight, input and output keep
(SQNR, dB) on the first calibration batch. The helpers here are shared by the scheme
handlers (``static.py``, ``dynamic.py``, ``weight_only.py``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import tvm
from tvm import relax

from tvmq.core import qmath
from tvmq.quantization.collect import (
    ActivationStats,
    _flatten,
    collect_activation_stats,
    host_executable,
)
from tvmq.runtime import decoded_params

__all__ = ["FirstBatch", "LayerReport", "QuantizationReport", "output_sqnr"]


@dataclass
class LayerReport:
    """One quantizable layer (site) of the model.

    Attributes
    ----------
    name : str
        Site name (``conv2d_0``, ``matmul_3``): what ``skip`` and ``overrides`` match.
    source : str
        The layer's name in the source model (PyTorch module path ``encoder.0.fc``, ONNX
        node name), "" when the frontend recorded none; ``skip`` matches it too.
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
    source: str = ""

    @property
    def label(self) -> str:
        """``matmul_2`` or ``matmul_2 [classifier]``: the name with the source-model name."""
        return f"{self.name} [{self.source}]" if self.source else self.name


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
    observer_choice : dict or None
        Static int8 with ``observer="auto"``: ``{"chosen": observer, "output_sqnr_db":
        {candidate: [dB per output]}}`` (``tvmq.quantization.auto_observer``).
    """

    scheme: dict
    layers: list[LayerReport] = field(default_factory=list)
    float_ops: list[str] = field(default_factory=list)
    num_calibration_batches: int = 0
    output_sqnr_db: list[float] | None = None
    bias_correction: dict[str, list[float]] | None = None
    observer_choice: dict | None = None

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

        width = max([14, *(len(r.source) + 1 for r in self.layers)])
        lines = [
            f"{'layer':<14} {'source':<{width}} {'op':<10} {'q':<5} {'act':<6} {'w SQNR':>7} "
            f"{'x SQNR':>7}  note"
        ]
        for r in self.layers:
            lines.append(
                f"{r.name:<14} {r.source or '-':<{width}} {r.op:<10} "
                f"{'yes' if r.quantized else 'no':<5} "
                f"{r.activation_dtype or '-':<6} {db(r.weight_sqnr_db):>7} "
                f"{db(r.activation_sqnr_db):>7}  {r.reason}"
            )
        if self.output_sqnr_db is not None:
            lines.append("output SQNR (dB): " + ", ".join(db(v) for v in self.output_sqnr_db))
        return "\n".join(lines)


def combined_sqnr(*values: float | None) -> float | None:
    """SQNR of a product whose factors carry independent noise of these SQNRs (dB)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    noise = sum(0.0 if math.isinf(v) else 10.0 ** (-v / 10.0) for v in vals)
    return math.inf if noise == 0 else -10.0 * math.log10(noise)


def layer_output_sqnr(site, sample, w_dq, x_dq) -> float | None:
    """SQNR of ``x_dq @ w_dq`` against ``x @ W`` (matmul sites with a sample)."""
    if sample is None or site.kind != "matmul":
        return None
    ref = sample.astype(np.float64) @ site.weight.astype(np.float64)
    return qmath.sqnr(ref, x_dq.astype(np.float64) @ w_dq.astype(np.float64))


@dataclass(frozen=True)
class FirstBatch:
    """The first calibration batch as fed to the model, and the float model's outputs on it:
    what the output SQNRs of a report are measured on."""

    inputs: dict[str, np.ndarray]
    outputs: list[np.ndarray]

    @classmethod
    def of(cls, stats: ActivationStats | None) -> FirstBatch | None:
        """The first batch of calibration statistics (None without them)."""
        if stats is None or not stats.first_inputs:
            return None
        return cls(dict(stats.first_inputs), list(stats.first_outputs))


def output_sqnr(
    ex: tvm.relax.Executable | tvm.runtime.Module, batch: FirstBatch, names: list[str]
) -> list[float]:
    """Per output: SQNR of a host executable's (or loaded library's) outputs on `batch`
    against the float ones."""
    vm = relax.VirtualMachine(ex, tvm.cpu())
    inputs = [tvm.runtime.tensor(batch.inputs[n]) for n in names]
    out = vm["main"](*inputs, *decoded_params(vm))
    got = _flatten(out)
    return [qmath.sqnr(ref, q) for ref, q in zip(batch.outputs, got, strict=True)]


def host_output_sqnr(mod: tvm.IRModule, batch: FirstBatch, names: list[str]) -> list[float]:
    """:func:`output_sqnr` of `mod` built for the host with tvmq's kernels."""
    return output_sqnr(host_executable(mod), batch, names)


class _FirstBatches:
    """A stand-in scheme for ``collect_activation_stats``: min/max observers, `n` batches."""

    def __init__(self, n: int = 1):
        self.num_calibration_batches = n


def first_batch_stats(prepared: tvm.IRModule, calibration_data, inputs) -> ActivationStats | None:
    """Statistics of the first calibration batch (None without data): for measuring SQNRs."""
    if calibration_data is None:
        return None
    return collect_activation_stats(
        prepared, calibration_data, _FirstBatches(1), inputs=inputs, progress=False
    )


LOW_SQNR_DB = 20.0  # below this output SQNR the CLI warns (outputs far from float's)


def worst_layers(report: QuantizationReport, n: int = 3) -> list[tuple[str, float]]:
    """The ``n`` quantized layers with the lowest (finite) output SQNR: ``(name, dB)``."""
    scored = [
        (r.output_sqnr_db, r.name)
        for r in report.layers
        if r.quantized and r.output_sqnr_db is not None and math.isfinite(r.output_sqnr_db)
    ]
    return [(name, db) for db, name in sorted(scored)[:n]]
