"""Activation statistics for static quantization: run the float model, observe every site.

The model's ``main`` is instrumented to also return the input activation of each
quantizable site (``tvmq.passes`` site names: ``conv2d_0``, ``matmul_1``, ...) and the
tensors of each integer add / concat (``add_0:0``, ``add_0:1``, ``add_0``, ``concat_0``)
and both operands of each activation matmul (``matmul_act_0:0``, ``matmul_act_0:1``), compiled
once for the host and run on every calibration batch; each activation feeds its own
observer (``tvmq.calibration``). Sites are listed on the *prepared* module
(``tvmq.passes.prepare_passes``), the same form the quantization passes annotate.

Calibration batches of another batch size than the model's static one are split into
chunks of the model's batch size (``iter_calibration_batches(batch_size=...)``); a short
last chunk is padded by repeating its own rows and the padded rows are dropped from every
activation whose leading dimension is the batch, so they add nothing to the statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm
from tvm import relax

from tvmq.build import build
from tvmq.calibration import count_batches, get_observer, iter_calibration_batches
from tvmq.calibration.base import Observer
from tvmq.core.schemes import get_scheme
from tvmq.core.selectors import is_skipped
from tvmq.errors import TvmqError
from tvmq.frontends.model import TensorSpec, bind_symbols, signature_of
from tvmq.passes import prepare_passes
from tvmq.passes.sites import list_weight_sites
from tvmq.passes.tensor_sites import list_observed_tensors

__all__ = [
    "ActivationStats",
    "collect_activation_qparams",
    "collect_channel_absmax",
    "collect_activation_stats",
    "instrument",
]


@dataclass
class ActivationStats:
    """What calibration saw.

    Attributes
    ----------
    observers : dict[str, Observer]
        Site name -> observer that saw that site's input activation.
    samples : dict[str, numpy.ndarray]
        Site name -> the activation of the first calibration batch (for SQNR reports).
    first_inputs : dict[str, numpy.ndarray]
        The first calibration batch as fed to the model (model batch size).
    first_outputs : list[numpy.ndarray]
        The float model's outputs on ``first_inputs``.
    num_batches : int
        Calibration batches run (after splitting to the model's batch size).
    site_kinds : dict[str, str]
        Site name -> "matmul", "conv2d", "add", "concat" or "matmul_act".
    site_layer_names : dict[str, tuple[str, ...]]
        Site name -> its names in the source model (weight sites the frontend named).
    """

    observers: dict[str, Observer]
    samples: dict[str, np.ndarray] = field(default_factory=dict)
    first_inputs: dict[str, np.ndarray] = field(default_factory=dict)
    first_outputs: list[np.ndarray] = field(default_factory=list)
    num_batches: int = 0
    site_kinds: dict[str, str] = field(default_factory=dict)
    site_layer_names: dict[str, tuple[str, ...]] = field(default_factory=dict)


def host_executable(mod: tvm.IRModule) -> relax.VMExecutable:
    """`mod` built for this machine with tvmq's kernels and no tuning records.

    Calibration, bias correction, accuracy control and the report run float (or quantized)
    models many times: TVM's default lowering of a float matmul is about 30x slower than
    tvmq's kernels (MiniLM: 4.8 s -> 0.16 s a calibration batch), and this way the numbers
    are those of the kernels the compiled model will run.
    """
    return build(mod, "host")


def instrument(mod: tvm.IRModule, sites: Sequence) -> tuple[tvm.IRModule, list[str]]:
    """A copy of `mod` whose ``main`` returns ``(original result, act_0, act_1, ...)``.

    Parameters
    ----------
    mod : tvm.IRModule
        The (prepared) module the sites were listed on.
    sites : sequence of WeightSite or ObservedTensor
        What to observe (``.name``, ``.activation``); activations must be vars of ``main``.

    Returns
    -------
    (tvm.IRModule, list[str])
        The instrumented module and the names of the sites it returns, in order.
    """
    func = mod["main"]
    body = func.body
    params = set(func.params)
    wanted = [s for s in sites if isinstance(s.activation, relax.Var)]
    out_vars: dict[str, relax.Var] = {}
    blocks = []
    for block in body.blocks:
        defined = {b.var for b in block.bindings}
        extra = []
        for s in wanted:
            act = s.activation
            if act in defined and isinstance(act, relax.DataflowVar):
                var = relax.Var(f"tvmq_act_{len(out_vars)}", act.ty)
                extra.append(relax.VarBinding(var, act))
                out_vars[s.name] = var
            elif act in defined or act in params:
                out_vars[s.name] = act
        if extra:
            cls = (
                relax.DataflowBlock
                if isinstance(block, relax.DataflowBlock)
                else relax.BindingBlock
            )
            block = cls([*block.bindings, *extra])
        blocks.append(block)
    names = [s.name for s in wanted if s.name in out_vars]
    acts = [out_vars[n] for n in names]
    ret = relax.Tuple([body.body, *acts])
    ret_ty = tvm.ir.TupleType([func.ret_ty, *[a.ty for a in acts]])
    new_func = relax.Function(
        func.params, relax.SeqExpr(blocks, ret), ret_ty, func.is_pure, func.attrs
    )
    out = mod.clone()
    out["main"] = new_func
    return out, names


def _flatten(value) -> list[np.ndarray]:
    if isinstance(value, tvm.runtime.Tensor):
        return [value.numpy()]
    if isinstance(value, list | tuple) or hasattr(value, "__len__"):
        out = []
        for item in value:
            out.extend(_flatten(item))
        return out
    return [np.asarray(value)]


def _model_batch(specs: list[TensorSpec]) -> int | None:
    """The common static leading dimension of all inputs, else None (then batches must match
    the inputs' shapes: exactly, or in their static dims where some dims are symbolic)."""
    leads = {s.shape[0] for s in specs if len(s.shape) > 0}
    if len(leads) != 1 or any(len(s.shape) == 0 for s in specs):
        return None
    lead = leads.pop()
    return lead if isinstance(lead, int) else None


def _fit_batch(batch: dict, specs: list[TensorSpec], batch_size: int | None):
    """(inputs in model shape and dtype, number of real rows)."""
    feed, rows = {}, None
    if batch_size is None and any(spec.symbols for spec in specs):
        try:  # symbolic dims take the calibration data's sizes, static dims must match
            bind_symbols(specs, [np.shape(batch[spec.name]) for spec in specs])
        except ValueError as e:
            raise TvmqError(f"calibration data: {e}") from None
        feed = {s.name: np.asarray(batch[s.name]).astype(s.dtype, copy=False) for s in specs}
        return feed, None
    for spec in specs:
        arr = np.asarray(batch[spec.name])
        if arr.shape[1:] != spec.shape[1:] or (batch_size is None and arr.shape != spec.shape):
            raise TvmqError(
                f"calibration input {spec.name!r} has shape {arr.shape}, but the model "
                f"expects {spec.shape} (any number of rows along axis 0 is fine)"
            )
        n = arr.shape[0]
        rows = n if rows is None else rows
        if batch_size is not None and n < batch_size:
            # Pad with the chunk's own rows; padded rows are dropped from the statistics.
            arr = np.take(arr, np.arange(batch_size) % n, axis=0)
        feed[spec.name] = arr.astype(spec.dtype, copy=False)
    return feed, rows


def collect_activation_stats(
    mod: tvm.IRModule,
    calibration_data: Any,
    scheme=None,
    *,
    inputs: list[TensorSpec] | None = None,
    input_names: Sequence[str] | None = None,
    progress: bool = True,
) -> ActivationStats:
    """Run the float model on calibration data and observe every site's input activation.

    Parameters
    ----------
    mod : tvm.IRModule
        The float model; ``prepare_passes`` is applied first (site names refer to that form).
    calibration_data
        Anything ``tvmq.calibration.iter_calibration_batches`` accepts.
    scheme : Int8Static, optional
        ``observer`` (per tensor through ``observer_for``: per-layer overrides, and
        ``matmul_act_observer`` for attention-matmul operands) and ``num_calibration_batches``.
    inputs : list[TensorSpec], optional
        The model's input specs (default: from ``main``'s signature, named by `input_names`).
    input_names : sequence of str, optional
        Names of ``main``'s inputs in the calibration data (default: parameter names).
    progress : bool
        Show a tqdm progress bar over batches.

    Returns
    -------
    ActivationStats

    Raises
    ------
    TvmqError
        Bad calibration data (shapes, empty), or NaN/inf in an activation.
    """
    prepared = prepare_passes()(mod)
    if inputs is None:
        inputs, _ = signature_of(prepared["main"], list(input_names) if input_names else None)
    sites = [*list_weight_sites(prepared["main"]), *list_observed_tensors(prepared["main"])]
    kinds = {s.name: s.kind for s in sites}

    def observer_name(name):
        if hasattr(scheme, "observer_for"):
            return scheme.observer_for(name, kinds[name])
        return getattr(scheme, "observer", "minmax")

    observers: dict[str, Observer] = {}
    layer_names = {s.name: s.layer_names for s in sites if getattr(s, "layer_names", ())}
    stats = ActivationStats(observers=observers, site_kinds=kinds, site_layer_names=layer_names)

    def on_batch(i, feed, outputs, acts):
        for name, act in acts.items():
            if name not in observers:
                observers[name] = get_observer(observer_name(name), label=f"the input of {name}")
            observers[name].update(act)
            if i == 0:
                stats.samples[name] = act
        if i == 0:
            stats.first_inputs = feed
            stats.first_outputs = outputs
        stats.num_batches = i + 1

    site_names = _run_calibration(
        prepared, sites, calibration_data, inputs, scheme, progress, on_batch, "tvmq calibrate"
    )
    for name in site_names:  # no batch at all: still one (empty) observer per site
        if name not in observers:
            observers[name] = get_observer(observer_name(name), label=f"the input of {name}")
    stats.observers = {n: observers[n] for n in site_names}
    return stats


def _run_calibration(prepared, sites, calibration_data, inputs, scheme, progress, on_batch, label):
    """Run the float `prepared` module on every calibration batch, instrumented to return
    the activations of `sites`; ``on_batch(i, feed, outputs, {site name: activation})``
    per batch (padded rows dropped, NaN/inf rejected); `label` names the progress bar.
    Returns the observed site names."""
    from tqdm.auto import tqdm

    names = [s.name for s in inputs]
    instrumented, site_names = instrument(prepared, sites)
    ex = host_executable(instrumented)
    device = tvm.cpu()
    vm = relax.VirtualMachine(ex, device)
    batch_size = _model_batch(inputs)
    max_batches = getattr(scheme, "num_calibration_batches", None)
    total = count_batches(calibration_data, names, batch_size=batch_size, max_batches=max_batches)
    batches = iter_calibration_batches(
        calibration_data, names, batch_size=batch_size, max_batches=max_batches
    )
    for i, batch in enumerate(
        tqdm(batches, total=total, desc=label, unit="batch", disable=not progress)
    ):
        feed, rows = _fit_batch(batch, inputs, batch_size)
        result = vm["main"](*[tvm.runtime.tensor(feed[n], device) for n in names])
        n_out = len(_flatten(result[0]))
        flat = _flatten(result)
        outputs, acts = flat[:n_out], flat[n_out:]
        observed = {}
        for name, act in zip(site_names, acts, strict=True):
            if batch_size is not None and rows < batch_size and act.shape[:1] == (batch_size,):
                act = act[:rows]
            if not np.isfinite(act).all():
                raise TvmqError(
                    f"the float model produced NaN or inf at the input of {name} on calibration "
                    f"batch {i + 1}; check the calibration data and the model's weights"
                )
            observed[name] = act
        on_batch(i, feed, outputs, observed)
    return site_names


def collect_channel_absmax(
    mod: tvm.IRModule,
    calibration_data: Any,
    site_names: Sequence[str],
    scheme=None,
    *,
    inputs: list[TensorSpec] | None = None,
    input_names: Sequence[str] | None = None,
    progress: bool = True,
    label: str = "tvmq calibrate (channel ranges)",
) -> dict[str, np.ndarray]:
    """``max |x|`` per channel (last axis) of the input activation of each named matmul site,
    over the calibration data (what ``tvmq.passes.SmoothQuant`` takes).

    Arguments as :func:`collect_activation_stats` (``scheme`` only for
    ``num_calibration_batches``); only the named sites are observed.
    """
    prepared = prepare_passes()(mod)
    if inputs is None:
        inputs, _ = signature_of(prepared["main"], list(input_names) if input_names else None)
    wanted = set(site_names)
    sites = [s for s in list_weight_sites(prepared["main"]) if s.name in wanted]
    out: dict[str, np.ndarray] = {}

    def on_batch(_i, _feed, _outputs, acts):
        for name, act in acts.items():
            m = np.abs(act).reshape(-1, act.shape[-1]).max(axis=0)
            out[name] = m if name not in out else np.maximum(out[name], m)

    if sites:
        _run_calibration(
            prepared, sites, calibration_data, inputs, scheme, progress, on_batch, label
        )
    return out


def collect_activation_qparams(
    mod: tvm.IRModule,
    calibration_data: Any,
    scheme=None,
    **kwargs,
) -> dict[str, tuple[float, int]]:
    """Calibrated ``(scale, zero_point)`` per site, ready for ``AnnotateQDQ`` / the pipeline.

    Takes the arguments of :func:`collect_activation_stats`; uses the scheme's (per-layer)
    ``activation_dtype`` and ``activation_symmetric`` and leaves out skipped sites.
    """
    scheme = get_scheme(scheme if scheme is not None else "int8")
    stats = collect_activation_stats(mod, calibration_data, scheme, **kwargs)
    return activation_qparams(stats, scheme)


def activation_qparams(stats: ActivationStats, scheme) -> dict[str, tuple[float, int]]:
    """``(scale, zero_point)`` per observed, non-skipped site."""
    out = {}

    for name, obs in stats.observers.items():
        aliases = stats.site_layer_names.get(name, ())
        if is_skipped(name, stats.site_kinds[name], scheme.skip, aliases):
            continue
        layer = scheme.for_layer(name)
        out[name] = obs.qparams(layer.activation_dtype, layer.activation_symmetric)
    return out
