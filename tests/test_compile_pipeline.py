"""tvmq.pipeline: the Relax pipeline "tvmq" is exactly the IR part of a compile."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from tvmq import pipeline
from tvmq.frontends import import_model
from tvmq.lowering import target_kernel_passes
from tvmq.targets import get_target

torch = pytest.importorskip("torch")


def _ffn():
    """LayerNorm -> matmul (SmoothQuant's default sites) and GELU -> matmul (dynamic's)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 64),
        torch.nn.LayerNorm(64),
        torch.nn.Linear(64, 64),
        torch.nn.GELU(),
        torch.nn.Linear(64, 16),
    ).eval()


def test_relax_pipeline_is_the_ir_part_of_compile():
    preset = get_target("host")
    imported = import_model(_ffn(), example_inputs=(torch.zeros(4, 32),))
    calib = np.random.default_rng(0).standard_normal((16, 32)).astype("float32")
    built = pipeline.run(
        imported,
        preset,
        tuning_logs=None,
        progress=False,
        quantize=pipeline.scheme_for_target("int8", preset),
        calibration_data=calib,
    )
    params = built.pipeline_params
    assert params["smooth_absmax"] and params["dynamic_vars"]  # both phases are exercised
    target = preset.tvm_target()
    with target:
        compiled_ir = tvm.transform.Sequential(target_kernel_passes(target))(built.model.mod)
        tvmq_pipeline = relax.get_pipeline(
            "tvmq", **params, target_kernels=target_kernel_passes(target), build=False
        )
        tvm.ir.assert_structural_equal(tvmq_pipeline(imported.mod), compiled_ir)
    # the report's output SQNR was measured on the host build itself
    sqnr = built.quantized.report.output_sqnr_db
    assert sqnr is not None and sqnr[0] > 20
    assert built.applied["quantize"]["output_sqnr_db"] == sqnr


def test_relax_pipeline_reproduces_bias_correction():
    """Bias correction is a pipeline parameter (CorrectBias), not an edit outside it."""
    from tvmq.quantization import quantize

    imported = import_model(_ffn(), example_inputs=(torch.zeros(4, 32),))
    calib = np.random.default_rng(1).standard_normal((16, 32)).astype("float32")
    q = quantize(imported, calib, "int8", progress=False, evaluate=False, bias_correction=True)
    params = q.pipeline_params
    assert set(params["bias_corrections"]) == set(q.report.bias_correction) != set()
    tvm.ir.assert_structural_equal(
        relax.get_pipeline("tvmq", **params, build=False)(imported.mod), q.mod
    )
