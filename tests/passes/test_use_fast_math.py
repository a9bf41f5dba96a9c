"""UseFastMath: which ops it rewrites, and its error against float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
from tvm import relax

from tvmq.passes.use_fast_math import UseFastMath

_ERF = np.vectorize(math.erf)


def _module(op, dtype: str = "float32", shape=(4, 4096)) -> tvm.IRModule:
    x = relax.Var("x", relax.TensorType(shape, dtype))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(op(x))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod: tvm.IRModule, *xs: np.ndarray) -> np.ndarray:
    ex = tvm.compile(mod, target=tvm.target.Target.from_device(tvm.cpu()))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*map(tvm.runtime.tensor, xs)).numpy()


def _ops(mod: tvm.IRModule) -> set[str]:
    return {
        line.split("R.")[1].split("(")[0]
        for line in mod["main"].script().splitlines()
        if "= R." in line
    }


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# name -> (relax op, float64 reference, input scale, max relative error, max absolute error)
CASES = {
    "exp": (relax.op.exp, np.exp, 15.0, 1e-6, 0.0),  # |x| < 88: no float32 overflow
    "erf": (relax.op.erf, _ERF, 3.0, 0.0, 1e-6),
    "tanh": (relax.op.tanh, np.tanh, 3.0, 0.0, 1e-6),
    "gelu": (relax.op.nn.gelu, lambda x: 0.5 * x * (1 + _ERF(x / math.sqrt(2))), 4.0, 0.0, 2e-6),
    "gelu_tanh": (
        relax.op.nn.gelu_tanh,
        lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
        4.0,
        0.0,
        2e-6,
    ),
    "sigmoid": (relax.op.sigmoid, lambda x: 1 / (1 + np.exp(-x)), 20.0, 0.0, 1e-6),
    "silu": (relax.op.nn.silu, lambda x: x / (1 + np.exp(-x)), 8.0, 1e-6, 1e-6),
    "power3": (lambda x: relax.op.power(x, relax.const(3.0)), lambda x: x**3, 4.0, 1e-6, 0.0),
    "power2": (lambda x: relax.op.power(x, relax.const(2.0)), lambda x: x**2, 4.0, 1e-6, 0.0),
    # softmax: float32 sums over 4,096 values round to ~1e-6 relative, with or without UseFastMath
    "softmax": (lambda x: relax.op.nn.softmax(x, axis=-1), _softmax, 8.0, 1e-5, 1e-7),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rewrite_matches_float64_reference_on_random_inputs(name):
    op, reference, scale, rtol, atol = CASES[name]
    mod = _module(op)
    fast = UseFastMath()(mod)
    assert _ops(fast) == {"call_tir"}, fast["main"].script()
    x = np.random.default_rng(0).standard_normal((4, 4096)).astype(np.float32) * scale
    out = _run(fast, x).astype(np.float64)
    expected = reference(x.astype(np.float64))
    np.testing.assert_allclose(out, expected, rtol=rtol, atol=atol)


def test_round_is_vectorizable_and_breaks_ties_to_even():
    # topi.round writes tirx.nearbyint, which TVM does not vectorize (a scalar loop: MiniLM's
    # dynamic row quantize 4x slower); the rewrite keeps only the vectorizable tirx.round,
    # the same llvm.nearbyint on LLVM targets: ties to even, like numpy.
    mod = _module(relax.op.round, shape=(4, 64))
    assert "nearbyint" in relax.transform.LegalizeOps()(mod).script()  # what it replaces
    fast = UseFastMath()(mod)
    script = fast.script()
    assert _ops(fast) == {"call_tir"} and "T.round(" in script and "nearbyint" not in script
    assert tvm.ir.Op.get("tirx.round").get_attr("TVectorizable")
    x = np.random.default_rng(4).standard_normal((4, 64)).astype(np.float32) * 40
    x[0, :10] = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.4999998, 2.0**23 + 1, -(2.0**24), 1e30]
    np.testing.assert_array_equal(_run(fast, x), np.round(x))


def test_other_ops_and_dtypes_are_left_alone():
    mods = [
        _module(relax.op.sigmoid, "float16"),
        _module(relax.op.exp, "float16"),
        _module(relax.op.round, "float16"),
        _module(lambda x: relax.op.add(x, x)),
        _module(lambda x: relax.op.power(x, relax.const(2.5))),  # not an integer exponent
        _module(lambda x: relax.op.power(x, relax.const(7.0))),  # left to powf
        _module(lambda x: relax.op.power(x, x)),
    ]
    for mod in mods:
        tvm.ir.assert_structural_equal(UseFastMath()(mod), mod)


def test_idempotent():
    once = UseFastMath()(_module(relax.op.nn.gelu))
    tvm.ir.assert_structural_equal(UseFastMath()(once), once)


@pytest.mark.parametrize("n", [197, 77])
def test_ragged_softmax_rows_are_padded_and_match(n):
    # Rows no 16 divides are padded with -inf inside the kernel (whole SIMD vectors for the
    # row max and sum); masked (-inf) entries give 0, a fully masked row NaN, as in numpy.
    mod = _module(lambda x: relax.op.nn.softmax(x, axis=-1), shape=(6, n))
    fast = UseFastMath()(mod)
    assert "T.int64(" + str(-(-n // 16) * 16) + ")" in fast.script()
    x = np.random.default_rng(3).standard_normal((6, n)).astype(np.float32) * 8
    x[1, n // 2 :] = -np.inf
    x[2, :] = -np.inf
    with np.errstate(invalid="ignore"):
        expected = _softmax(x.astype(np.float64))
    out = _run(fast, x)
    assert np.isnan(out[2]).all() and not np.isnan(np.delete(out, 2, axis=0)).any()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("flush", [False, True])
def test_softmax_exp_relative_error_over_its_whole_range(flush):
    """exp_nonpositive (the softmax's exponential): relative error < 2e-7 above -20, < 4e-7
    down to its floor, and exp(0) = 1. Below the floor (-86; EXP_FLUSH, -40, with flush)
    and for -inf: 4.4e-38 (a normal float: the exponent arithmetic stays exact), or exactly
    0 with flush."""
    from tvm import te

    from tvmq.kernels.fast_math import EXP_FLUSH, exp_nonpositive

    floor = EXP_FLUSH if flush else -86.0
    below = [floor - 0.001, -86.5, -1e30, -np.inf]
    d = np.concatenate([-np.geomspace(1e-8, -floor, 200_000), [0.0], below])
    d = d.astype(np.float32)
    x = te.placeholder((d.size,), "float32", name="x")
    y = te.compute(x.shape, lambda i: exp_nonpositive(x[i], flush), name="y")
    lib = tvm.compile(te.create_prim_func([x, y]), target=tvm.target.Target.from_device(tvm.cpu()))
    out = tvm.runtime.tensor(np.zeros_like(d))
    lib(tvm.runtime.tensor(d), out)
    got = out.numpy().astype(np.float64)
    tail = len(below) + 1
    ref = np.exp(d[:-tail].astype(np.float64))
    rel = np.abs(got[:-tail] / ref - 1)
    assert rel.max() < 4e-7 and rel[d[:-tail] > -20].max() < 2e-7
    assert got[-tail] == 1.0
    expected = 0.0 if flush else pytest.approx(math.exp(-86))
    assert all(v == expected for v in got[-len(below) :])


def test_masked_probabilities_are_zero_not_denormal():
    """A causal mask (scores + float32's lowest value, as transformers' GPT-2 adds it) gives
    probabilities of exactly 0, so P @ V multiplies no denormal: they were tiny normals times
    1 / sum, denormals that made GPT-2's float P @ V 75x slower. The other probabilities
    match numpy's softmax."""
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((2, 128, 128)).astype("float32") * 3
    causal = np.triu(np.full((128, 128), np.finfo("float32").min, "float32"), 1)
    x = relax.Var("x", relax.TensorType(scores.shape, "float32"))
    m = relax.Var("m", relax.TensorType(causal.shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, m]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.softmax(relax.op.add(x, m), axis=-1))
        bb.emit_func_output(out)
    got = _run(UseFastMath()(bb.get()), scores, causal)
    masked = np.broadcast_to(causal < 0, got.shape)
    assert np.all(got[masked] == 0.0)
    tiny = np.finfo("float32").tiny
    assert not np.any((got != 0) & (np.abs(got) < tiny))
    shifted = scores + causal - (scores + causal).max(-1, keepdims=True)
    expected = np.exp(shifted.astype(np.float64))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("keys, kernels", [(128, 1), (197, 2)])
def test_a_mask_add_fuses_into_the_softmax_kernel_unless_rows_are_padded(keys, kernels):
    """row_kernel_attrs marks whole-vector softmaxes a reduction, so FuseOps puts the mask
    add into their kernel; padded rows (197 keys) keep it apart (module docstring)."""
    from tvmq.build import build
    from tvmq.lowering import fuse_to_tir

    x = relax.Var("x", relax.TensorType((1, 4, 8, keys), "float32"))
    m = relax.Var("m", relax.TensorType((1, 1, 8, keys), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, m]):
        with bb.dataflow():
            s = bb.emit(relax.op.add(x, m))
            out = bb.emit_output(relax.op.nn.softmax(s, axis=-1))
        bb.emit_func_output(out)
    mod = bb.get()
    fused = fuse_to_tir(mod, "host")
    prims = [gv.name_hint for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(prims) == kernels, prims
    rng = np.random.default_rng(5)
    xv = (rng.standard_normal((1, 4, 8, keys)) * 4).astype(np.float32)
    mv = np.where(rng.random((1, 1, 8, keys)) < 0.2, -np.inf, 0).astype(np.float32)
    vm = relax.VirtualMachine(build(mod, "host"), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(xv), tvm.runtime.tensor(mv)).numpy()
    expected = _softmax((xv + mv).astype(np.float64))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
