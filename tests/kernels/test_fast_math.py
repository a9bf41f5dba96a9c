"""sigmoid / SiLU / hardswish as vectorizable TIR expressions (tvmq/kernels/fast_math.py):
float64 numpy's numbers within a few float32 ulps, and no denormal ever (a microcode assist
per vector), not even in the products of the next layer: the sigmoid's tails stop at +-20."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import te

from tvmq.kernels.fast_math import activation_f32, sigmoid_f32
from tvmq.targets import get_target


def _run(x: np.ndarray) -> tuple[np.ndarray, ...]:
    a = te.placeholder(x.shape, "float32", name="A")
    outs = [
        te.compute(x.shape, lambda i: sigmoid_f32(a[i]), name="S"),
        te.compute(x.shape, lambda i: activation_f32("silu", a[i]), name="SiLU"),
        te.compute(x.shape, lambda i: activation_f32("hardswish", a[i]), name="H"),
        te.compute(x.shape, lambda i: activation_f32("hardswish_divide_first", a[i]), name="Hd"),
    ]
    lib = tvm.compile(te.create_prim_func([a, *outs]), target=get_target("host").tvm_target())
    got = [tvm.runtime.tensor(np.zeros_like(x)) for _ in outs]
    lib(tvm.runtime.tensor(x), *got)
    return tuple(g.numpy() for g in got)


def test_sigmoid_silu_and_hardswish_match_float64():
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-120, 120, 4001), rng.standard_normal(4000) * 8])
    x = x.astype(np.float32)
    s, silu, hswish, hswish_d = _run(x)
    x64 = x.astype(np.float64)
    sig = 1.0 / (1.0 + np.exp(-x64))
    assert np.abs(s - sig).max() < 2e-7
    ref = x64 * sig
    assert (np.abs(silu - ref) / np.maximum(np.abs(ref), 1.0)).max() < 3e-7
    assert np.all(s[x > 20] == 1) and np.all(silu[x > 20] == x[x > 20])
    # below -20 the sigmoid holds its value at -20 (2.06e-9), never the tiny exact tail
    # whose products downstream are denormals; the SiLU is x times it
    tail = 1.0 / (1.0 + np.exp(20.0))
    np.testing.assert_allclose(s[x <= -20], tail, rtol=5e-7)
    np.testing.assert_allclose(silu[x <= -20], x64[x <= -20] * tail, rtol=5e-7)
    # the same bits as a model's own x * sigmoid(x) (PyTorch's form), which a conv kernel's
    # SiLU store replaces
    np.testing.assert_array_equal(silu, x * s)
    ref = x64 * np.clip(x64 + 3, 0, 6) / 6
    for h in (hswish, hswish_d):
        assert (np.abs(h - ref) / np.maximum(np.abs(ref), 1.0)).max() < 3e-7
    # the two orders are the model's ops' float32 bits: torch's (x * t) / 6, ONNX's x * (t / 6)
    t = np.clip(x + np.float32(3), 0, 6).astype(np.float32)
    np.testing.assert_array_equal(hswish, (x * t) / np.float32(6))
    np.testing.assert_array_equal(hswish_d, x * (t / np.float32(6)))


def test_no_denormal_results():
    x = np.linspace(-200, 200, 100001).astype(np.float32)
    tiny = np.finfo(np.float32).tiny
    for y in _run(x):
        assert not np.any((y != 0) & (np.abs(y) < tiny))


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="'tanh'"):
        activation_f32("tanh", tvm.tirx.const(1.0, "float32"))
