"""exp / sigmoid as vectorizable TIR expressions (tvmq/kernels/fast_math.py): float64 numpy's
numbers within a few float32 ulps, and no denormal ever (a microcode assist per vector)."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te

from tvmq.kernels.fast_math import exp_f32, sigmoid_f32
from tvmq.targets import get_target


def _run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = te.placeholder(x.shape, "float32", name="A")
    outs = [
        te.compute(x.shape, lambda i: exp_f32(a[i]), name="E"),
        te.compute(x.shape, lambda i: sigmoid_f32(a[i]), name="S"),
        te.compute(x.shape, lambda i: a[i] * sigmoid_f32(a[i]), name="SiLU"),
    ]
    lib = tvm.compile(te.create_prim_func([a, *outs]), target=get_target("host").tvm_target())
    got = [tvm.runtime.tensor(np.zeros_like(x)) for _ in outs]
    lib(tvm.runtime.tensor(x), *got)
    return tuple(g.numpy() for g in got)


def test_exp_sigmoid_and_silu_match_float64():
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-120, 120, 4001), rng.standard_normal(4000) * 8])
    x = x.astype(np.float32)
    e, s, silu = _run(x)
    x64 = x.astype(np.float64)
    normal = (x > -87.3) & (x < 88.3)  # exp's range (clamped outside it)
    assert (np.abs(e[normal] - np.exp(x64[normal])) / np.exp(x64[normal])).max() < 3e-7
    sig = 1.0 / (1.0 + np.exp(-x64))
    assert np.abs(s - sig).max() < 2e-7
    ref = x64 * sig
    assert (np.abs(silu - ref) / np.maximum(np.abs(ref), 1.0)).max() < 3e-7
    assert np.all(s[x < -87] == 0) and np.all(s[x > 20] == 1)


def test_no_denormal_results():
    x = np.linspace(-200, 200, 100001).astype(np.float32)
    tiny = np.finfo(np.float32).tiny
    for y in _run(x):
        assert not np.any((y != 0) & (np.abs(y) < tiny))
