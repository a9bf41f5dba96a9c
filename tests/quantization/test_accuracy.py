"""Accuracy tooling: sensitivity ranking, accuracy-aware quantization, bias correction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tvmq.core.schemes import Int8Dynamic, Int8Static, WeightOnly
from tvmq.frontends.pytorch import from_pytorch
from tvmq.quantization.accuracy import (
    compile_for_host,
    layer_sensitivity,
    quantize_with_accuracy_control,
)
from tvmq.quantization.quantize import quantize


@pytest.fixture(scope="module")
def sensitive():
    """An MLP whose first layer has a huge weight on an input that is always 0.

    The float model ignores it; any per-channel int8 scale is stretched by it, so every
    other weight of matmul_0 rounds to 0 and the quantized model is ruined.
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    ).eval()
    with torch.no_grad():
        model[0].weight[:, 0] = 1000.0
    rng = np.random.default_rng(0)
    data = rng.standard_normal((64, 32)).astype("float32")
    data[:, 0] = 0.0
    imported = from_pytorch(model, (torch.zeros(16, 32),))
    x_eval = data[48:64]
    ref = model(torch.from_numpy(x_eval)).detach().numpy()

    def eval_fn(run):  # minus the relative MSE against the float model: float scores 0
        out = run(x_eval)
        return -float(np.mean((out - ref) ** 2) / np.mean(ref**2))

    return imported, data[:48], eval_fn


@pytest.mark.parametrize(
    "scheme", [Int8Static(), Int8Dynamic(), WeightOnly(8)], ids=["static", "dynamic", "w8"]
)
def test_accuracy_control_returns_the_sensitive_layer(sensitive, scheme):
    imported, calib, eval_fn = sensitive
    result = quantize_with_accuracy_control(imported, calib, scheme, eval_fn, max_drop=0.01)
    assert result.history[0]["float_layers"] == [] and result.history[0]["drop"] > 0.5
    assert result.float_layers == ["matmul_0"] and result.met and result.drop <= 0.01
    assert result.ranking[0][0] == "matmul_0"
    assert result.model.report.quantized_layers == ["matmul_1"]
    assert [h["float_layers"] for h in result.history] == [[], ["matmul_0"]]


def test_sensitivity_by_metric_and_by_sqnr(sensitive):
    imported, calib, eval_fn = sensitive
    by_sqnr = layer_sensitivity(imported, calib, "int8")
    assert [n for n, _ in by_sqnr] == ["matmul_0", "matmul_1"]
    assert by_sqnr[0][1] < 5 < 30 < by_sqnr[1][1]  # dB: ruined vs healthy
    by_metric = layer_sensitivity(imported, calib, "int8", eval_fn)
    assert by_metric[0][0] == "matmul_0" and by_metric[0][1] > 0.5 > by_metric[1][1]


def test_unreachable_drop_reports_not_met(sensitive):
    imported, calib, eval_fn = sensitive
    result = quantize_with_accuracy_control(
        imported, calib, "int8", eval_fn, max_drop=0.0, max_float_layers=1
    )
    assert not result.met or result.drop == 0.0
    assert len(result.float_layers) <= 1


def test_bias_correction_removes_output_mean_error():
    """Weights just below a rounding midpoint: every one rounds down, the error has a mean."""
    rng = np.random.default_rng(1)
    k, n = 64, 16
    s = 0.01
    q = rng.integers(0, 100, (n, k)).astype(np.float32)
    w = (q + 0.45) * s  # every weight rounds down by 0.45 * s
    w[:, 0] = 127 * s  # fixes each channel's scale at s
    lin = torch.nn.Linear(k, n).eval()
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
    imported = from_pytorch(lin, (torch.zeros(32, k),))
    calib = rng.uniform(0.5, 1.5, (256, k)).astype("float32")  # positive mean inputs
    x = rng.uniform(0.5, 1.5, (32, k)).astype("float32")
    ref = lin(torch.from_numpy(x)).detach().numpy()

    errors = {}
    for correct in (False, True):
        qm = quantize(imported, calib, Int8Static(), progress=False, bias_correction=correct)
        out = compile_for_host(qm.mod)(x)
        errors[correct] = np.abs((out - ref).mean(axis=0))  # per output channel
    assert errors[False].mean() > 0.05  # expected 0.45 * s * k * E[x] = 0.29
    assert errors[True].mean() < 0.2 * errors[False].mean(), errors
    qm = quantize(imported, calib, Int8Static(), progress=False, bias_correction=True)
    assert set(qm.report.bias_correction) == {"matmul_0"}
    assert len(qm.report.bias_correction["matmul_0"]) == n
