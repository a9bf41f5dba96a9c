"""Accuracy tooling: per-layer sensitivity and accuracy-aware quantization.

- :func:`layer_sensitivity` ranks the quantized layers, most sensitive first, either by
  each layer's own output SQNR on calibration data (cheap: one quantization) or by how
  much of a user metric comes back when that layer alone stays float (one quantization
  and one evaluation per layer).
- :func:`quantize_with_accuracy_control` quantizes everything, measures the metric drop
  against the float model, and returns the most sensitive layers to float one at a time
  until the drop is at most ``max_drop`` (the idea of NNCF's
  ``quantize_with_accuracy_control``). It works with every scheme (static, dynamic,
  weight-only) through the scheme's ``skip``.

``eval_fn`` receives a callable that runs the compiled model on the host:
``run(*inputs) -> numpy.ndarray`` (a list of arrays for a model with several outputs),
and returns a metric where higher is better (accuracy, -loss, SQNR...).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm
from tvm import relax

from tvmq.core.schemes import Scheme, get_scheme
from tvmq.errors import TvmqError
from tvmq.frontends.model import ImportedModel
from tvmq.quantization.collect import _flatten, host_executable
from tvmq.quantization.quantize import QuantizedModel, _model_parts, quantize

__all__ = [
    "AccuracyControl",
    "AccuracyControlResult",
    "compile_for_host",
    "layer_sensitivity",
    "quantize_with_accuracy_control",
]

EvalFn = Callable[[Callable[..., Any]], float]


@dataclass(frozen=True)
class AccuracyControl:
    """Accuracy control for ``tvmq.compile(..., accuracy_control=)``: the arguments of
    :func:`quantize_with_accuracy_control` other than the model, data and scheme."""

    eval_fn: EvalFn
    max_drop: float
    ranking: str = "sqnr"
    max_float_layers: int | None = None

    def __post_init__(self) -> None:
        if not callable(self.eval_fn):
            raise TvmqError("AccuracyControl.eval_fn must be callable: eval_fn(run) -> metric")
        if not self.max_drop >= 0:
            raise TvmqError(f"AccuracyControl.max_drop must be >= 0, got {self.max_drop!r}")


def compile_for_host(model: ImportedModel | tvm.IRModule) -> Callable[..., Any]:
    """Compile a model for the host: ``run(*inputs)`` -> one array, or a list for several."""
    mod = model.mod if isinstance(model, ImportedModel) else model
    vm = relax.VirtualMachine(host_executable(mod), tvm.cpu())

    def run(*inputs):
        out = _flatten(vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs]))
        return out[0] if len(out) == 1 else out

    return run


def _with_skip(scheme: Scheme, layers) -> Scheme:
    return dataclasses.replace(scheme, skip=tuple(scheme.skip) + tuple(layers))


def _metric(eval_fn: EvalFn, model) -> float:
    value = float(eval_fn(compile_for_host(model)))
    if math.isnan(value):
        raise TvmqError("eval_fn returned NaN; it must return a number (higher is better)")
    return value


def layer_sensitivity(
    model: ImportedModel | tvm.IRModule,
    calibration_data: Any,
    scheme: Scheme | str = "int8",
    eval_fn: EvalFn | None = None,
    *,
    input_names: list[str] | None = None,
    quantized: QuantizedModel | None = None,
) -> list[tuple[str, float]]:
    """The quantized layers, most sensitive first, with their score.

    Parameters
    ----------
    model, calibration_data, scheme, input_names
        As for :func:`tvmq.quantization.quantize`.
    eval_fn : callable, optional
        ``eval_fn(run) -> metric`` (higher is better). When given, a layer's score is the
        metric gained by leaving that layer alone float (higher = more sensitive). When
        None, the score is the layer's output SQNR in dB on the first calibration batch
        (``LayerReport.output_sqnr_db``; lower = more sensitive).
    quantized : QuantizedModel, optional
        The fully quantized model, if already computed.

    Returns
    -------
    list of (layer name, score)
    """
    scheme = get_scheme(scheme)
    q = quantized or quantize(
        model, calibration_data, scheme, input_names=input_names, progress=False, evaluate=False
    )
    layers = [r for r in q.report.layers if r.quantized]
    if eval_fn is None:
        scored = []
        for r in layers:
            db = r.output_sqnr_db if r.output_sqnr_db is not None else r.weight_sqnr_db
            scored.append((r.name, math.inf if db is None else float(db)))
        return sorted(scored, key=lambda item: item[1])
    base = _metric(eval_fn, q.mod)
    scored = []
    for r in layers:
        alone = quantize(
            model,
            calibration_data,
            _with_skip(scheme, [r.name]),
            input_names=input_names,
            progress=False,
            evaluate=False,
        )
        scored.append((r.name, _metric(eval_fn, alone.mod) - base))
    return sorted(scored, key=lambda item: -item[1])


@dataclass
class AccuracyControlResult:
    """What :func:`quantize_with_accuracy_control` found.

    Attributes
    ----------
    model : QuantizedModel
        The last model tried: the first one meeting ``max_drop``, or the best effort.
    float_layers : list[str]
        Layers returned to float, in the order they were returned.
    float_metric : float
        The float model's metric.
    metric : float
        ``model``'s metric.
    history : list[dict]
        One entry per model tried: ``{"float_layers", "metric", "drop"}``.
    ranking : list[tuple[str, float]]
        The sensitivity ranking used (see :func:`layer_sensitivity`).
    met : bool
        Whether ``float_metric - metric <= max_drop``.
    """

    model: QuantizedModel
    float_layers: list[str]
    float_metric: float
    metric: float
    history: list[dict] = field(default_factory=list)
    ranking: list[tuple[str, float]] = field(default_factory=list)
    met: bool = False

    @property
    def drop(self) -> float:
        return self.float_metric - self.metric


def quantize_with_accuracy_control(
    model: ImportedModel | tvm.IRModule,
    calibration_data: Any,
    scheme: Scheme | str,
    eval_fn: EvalFn,
    max_drop: float,
    *,
    ranking: str = "sqnr",
    max_float_layers: int | None = None,
    input_names: list[str] | None = None,
    progress: bool = False,
) -> AccuracyControlResult:
    """Quantize, then return the most sensitive layers to float until the metric drop fits.

    Parameters
    ----------
    model, calibration_data, scheme, input_names
        As for :func:`tvmq.quantization.quantize`.
    eval_fn : callable
        ``eval_fn(run) -> metric``, higher is better; ``run(*inputs)`` runs a compiled model.
    max_drop : float
        Largest acceptable ``float metric - quantized metric`` (in the metric's units).
    ranking : {"sqnr", "metric"}
        Order layers by their output SQNR (one quantization) or by the metric regained
        when each alone is float (one quantization and evaluation per layer).
    max_float_layers : int, optional
        Stop after returning this many layers to float (default: all of them).
    progress : bool
        Print each step to stderr.

    Returns
    -------
    AccuracyControlResult
        ``met`` is False when even the allowed float layers did not bring the drop down.
    """
    if ranking not in ("sqnr", "metric"):
        raise TvmqError(f"ranking must be 'sqnr' or 'metric', got {ranking!r}")
    if not max_drop >= 0:
        raise TvmqError(f"max_drop must be >= 0, got {max_drop!r}")
    scheme = get_scheme(scheme)
    _, imported = _model_parts(model, input_names)
    float_metric = _metric(eval_fn, imported.mod)

    def log(text):
        if progress:
            print(f"tvmq accuracy control: {text}", file=sys.stderr)

    q = quantize(
        model, calibration_data, scheme, input_names=input_names, progress=False, evaluate=False
    )
    metric = _metric(eval_fn, q.mod)
    history = [{"float_layers": [], "metric": metric, "drop": float_metric - metric}]
    log(f"float {float_metric:.6g}, all quantized {metric:.6g}")
    order = layer_sensitivity(
        model,
        calibration_data,
        scheme,
        eval_fn if ranking == "metric" else None,
        input_names=input_names,
        quantized=q,
    )
    limit = len(order) if max_float_layers is None else max_float_layers
    kept: list[str] = []
    for name, _ in order:
        if float_metric - metric <= max_drop or len(kept) >= limit:
            break
        kept.append(name)
        q = quantize(
            model,
            calibration_data,
            _with_skip(scheme, kept),
            input_names=input_names,
            progress=False,
            evaluate=False,
        )
        metric = _metric(eval_fn, q.mod)
        history.append(
            {"float_layers": list(kept), "metric": metric, "drop": float_metric - metric}
        )
        log(f"{name} back to float: {metric:.6g} (drop {float_metric - metric:.6g})")
    return AccuracyControlResult(
        model=q,
        float_layers=kept,
        float_metric=float_metric,
        metric=metric,
        history=history,
        ranking=order,
        met=float_metric - metric <= max_drop,
    )
