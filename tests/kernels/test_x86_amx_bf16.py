"""bf16 conversion kernels: every read in bounds after the default schedule, exact values."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.s_tir import analysis
from tvm.s_tir import dlight as dl

from tvmq.cpu_schedule import CPUDefaultSchedule
from tvmq.kernels.x86_amx_bf16 import bf16_bits, to_bf16_padded, to_bf16_rows
from tvmq.kernels.x86_int8_conv import Conv2DGeometry
from tvmq.targets import get_target


def _scheduled(func: tvm.tirx.PrimFunc) -> tvm.IRModule:
    """``func`` as the build schedules it, checked by TVM's out-of-bounds analysis (which
    raises on a read the loop bounds allow past a buffer's end)."""
    with get_target("host").tvm_target():
        func = func.with_attr("global_symbol", "main")
        mod = dl.ApplyDefaultSchedule(CPUDefaultSchedule())(tvm.IRModule({"main": func}))
    analysis.OOBChecker()(mod)
    return mod


def _run(mod: tvm.IRModule, x: np.ndarray, out_shape) -> np.ndarray:
    lib = tvm.compile(mod, target=get_target("host").tvm_target())
    out = tvm.runtime.tensor(np.zeros(out_shape, np.uint16))
    lib["main"](tvm.runtime.tensor(x), out)
    return out.numpy()


@pytest.mark.parametrize(
    ("x_shape", "padding"),
    [((1, 32, 7, 9), (1, 2, 1, 2)), ((2, 3, 5, 7), (3, 3, 3, 3)), ((2, 3, 80, 80), (1, 1, 1, 1))],
    ids=["32-channels", "rgb-batch-2-vector-tail", "rgb-batch-2-parallel-rows"],
)
def test_padded_conversion_reads_no_border_pixel(x_shape, padding):
    """The conv's zero border is written without a read (TVM's simplifier had dropped the
    clamped indices under a Select, whose both sides run, so the top-left border read X[-1]:
    ResNet-50 bf16 segfaulted where the row before the image was an unmapped page); each
    row's run of W * C values in 16-lane vectors and a tail (21 values of a 7-pixel RGB row)."""
    geo = Conv2DGeometry(x_shape, (3, 3), (1, 1), padding, (1, 1))
    mod = _scheduled(to_bf16_padded(geo))
    n, c, h, w = x_shape
    x = np.random.default_rng(0).standard_normal((n, h, w, c)).astype(np.float32)
    top, left, bottom, right = padding
    want = np.pad(bf16_bits(x), ((0, 0), (top, bottom), (left, right), (0, 0)))
    np.testing.assert_array_equal(_run(mod, x, want.shape), want)


@pytest.mark.parametrize("batch", [None, 3])
def test_row_conversion_reads_no_padded_row_or_column(batch):
    m, k, mp, kp = 13, 20, 16, 32
    mod = _scheduled(to_bf16_rows(m, k, mp, kp, batch))
    lead = () if batch is None else (batch,)
    x = np.random.default_rng(1).standard_normal((*lead, m, k)).astype(np.float32)
    pad = [(0, 0)] * len(lead) + [(0, mp - m), (0, kp - k)]
    want = np.pad(bf16_bits(x), pad)
    np.testing.assert_array_equal(_run(mod, x, want.shape), want)
