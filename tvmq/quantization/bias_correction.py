"""Empirical bias correction for static int8 (Nagel et al. 2019, "Data-Free Quantization").

Quantization error is not zero-mean: rounding a layer's weights (and clipping/rounding its
input) shifts the *expected* value of each output channel. For a linear layer
``y = W x + b`` the shift is ``E[W x] - E[W_q x_q]``, and since both are linear in the
input it only needs the per-channel means of the layer input and of its quantized version
over the calibration data::

    c = E[x] @ W - E[x_q] @ W_q                  # matmul, x: [..., K], W: [K, N]
    c_o = sum_{i,kh,kw} W[o,i,kh,kw] E[x_i] - ...  # conv2d (borders ignored)

Adding ``c`` to the bias makes the quantized layer's output unbiased on that data.
:func:`bias_corrections` computes ``c`` on the *prepared float* module; the pass
``tvmq.passes.CorrectBias`` adds it to the bias before ``AnnotateQDQ`` (a parameter of the
Relax pipeline ``"tvmq"``), and the corrected bias goes through the normal static int8 flow
(``LowerInt8`` folds it into the int32 accumulator offset). Layers without a bias get one. ``W_q`` and ``x_q``
use exactly the weight and activation parameters the static passes will use.

Limits: each layer is corrected with *float* inputs (the quantization error of earlier
layers is not propagated); grouped convolutions are not corrected.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax

from tvmq.calibration import iter_calibration_batches
from tvmq.core import qmath
from tvmq.passes.annotate_qdq import weight_qparams
from tvmq.passes.sites import list_weight_sites
from tvmq.quantization.collect import (
    _fit_batch,
    _flatten,
    _model_batch,
    host_executable,
    instrument,
)

__all__ = ["activation_means", "bias_corrections", "layer_corrections"]


def activation_means(
    prepared: tvm.IRModule,
    calibration_data: Any,
    sites,
    qparams: dict[str, tuple[float, int]],
    scheme,
    inputs,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel ``(E[x], E[dequantize(quantize(x))])`` of each site's input activation.

    Channels are the last axis for matmul and axis 1 for conv2d. Sites without
    ``qparams`` are left out.
    """
    wanted = [s for s in sites if s.name in qparams]
    instrumented, names = instrument(prepared, wanted)
    kinds = {s.name: s.kind for s in wanted}
    ex = host_executable(instrumented)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    batch_size = _model_batch(inputs)
    input_names = [s.name for s in inputs]
    sums: dict[str, list] = {}
    for batch in iter_calibration_batches(
        calibration_data,
        input_names,
        batch_size=batch_size,
        max_batches=scheme.num_calibration_batches,
    ):
        feed, rows = _fit_batch(batch, inputs, batch_size)
        result = vm["main"](*[tvm.runtime.tensor(feed[n]) for n in input_names])
        n_out = len(_flatten(result[0]))
        for name, act in zip(names, _flatten(result)[n_out:], strict=True):
            if batch_size is not None and rows < batch_size and act.shape[:1] == (batch_size,):
                act = act[:rows]
            scale, zp = qparams[name]
            dtype = scheme.for_layer(name).activation_dtype
            x_dq = qmath.dequantize(qmath.quantize(act, scale, zp, dtype), scale, zp)
            axis = act.ndim - 1 if kinds[name] == "matmul" else 1
            other = tuple(i for i in range(act.ndim) if i != axis)
            n = act.size // act.shape[axis]
            acc = sums.setdefault(name, [0.0, 0.0, 0])
            acc[0] = acc[0] + act.astype(np.float64).sum(axis=other)
            acc[1] = acc[1] + x_dq.astype(np.float64).sum(axis=other)
            acc[2] += n
    return {name: (sx / n, sq / n) for name, (sx, sq, n) in sums.items()}


def layer_corrections(site, mean_x: np.ndarray, mean_xq: np.ndarray, scheme) -> np.ndarray | None:
    """``E[W x] - E[W_q x_q]`` per output channel of one site (None: not correctable)."""
    s_w, z_w, axis = weight_qparams(site, scheme.for_layer(site.name).weight_per_channel)
    w = site.weight.astype(np.float64)
    w_dq = qmath.dequantize(qmath.quantize(site.weight, s_w, z_w, "int8", axis), s_w, z_w, axis)
    w_dq = w_dq.astype(np.float64)
    if site.kind == "matmul":
        return mean_x @ w - mean_xq @ w_dq
    if int(site.call.attrs.groups) != 1 or w.shape[1] != mean_x.size:
        return None
    return np.einsum("oikl,i->o", w, mean_x) - np.einsum("oikl,i->o", w_dq, mean_xq)


def bias_corrections(
    prepared: tvm.IRModule,
    calibration_data: Any,
    scheme,
    qparams: dict[str, tuple[float, int]],
    *,
    inputs,
) -> dict[str, np.ndarray]:
    """Each quantized layer's expected output error per channel (static int8).

    ``tvmq.passes.CorrectBias`` adds them to the biases (the ``bias_corrections`` parameter
    of ``tvmq.passes.static_int8_passes``).

    Parameters
    ----------
    prepared : tvm.IRModule
        The float module after ``prepare_passes`` (site names refer to it).
    calibration_data
        As for ``tvmq.quantization.quantize``.
    scheme : Int8Static
        Weight granularity and activation dtype, per layer.
    qparams : dict
        Calibrated activation ``(scale, zero_point)`` per site (``activation_qparams``).
    inputs : list[TensorSpec]
        The model's inputs.

    Returns
    -------
    dict
        Site name -> correction per output channel (float32), for the sites that need one.
    """
    sites = [s for s in list_weight_sites(prepared["main"]) if s.name in qparams]
    if not sites:
        return {}
    means = activation_means(prepared, calibration_data, sites, qparams, scheme, inputs)
    out = {}
    for site in sites:
        if site.name not in means:
            continue
        c = layer_corrections(site, *means[site.name], scheme.for_layer(site.name))
        if c is not None and np.any(c):
            out[site.name] = c.astype(np.float32)
    return out
