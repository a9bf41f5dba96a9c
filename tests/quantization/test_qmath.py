"""Reference quantization math: hand-computed values, properties, and an independent
big-integer model of gemmlowp/TFLite requantization."""

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvmq.core.qmath import (
    SCALE_EPS,
    choose_qparams,
    dequantize,
    qrange,
    quantize,
    quantize_multiplier,
    requantize_float,
    requantize_int,
    sqnr,
    storage_dtype,
)
from tvmq.errors import TvmqError

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
dtypes = st.sampled_from(["int8", "uint8", "int4", "uint4"])


# -- qrange / choose_qparams ------------------------------------------------------------------


def test_qrange():
    assert qrange("int8") == (-128, 127)
    assert qrange("uint8") == (0, 255)
    assert qrange("int4") == (-8, 7)
    assert qrange("uint4") == (0, 15)
    assert qrange("int32") == (-(2**31), 2**31 - 1)
    assert storage_dtype("int4") == np.int8
    with pytest.raises(TvmqError, match="int8"):
        qrange("int7")


def test_choose_qparams_asymmetric_by_hand():
    s, z = choose_qparams(-1.0, 3.0, "int8")
    assert s.dtype == np.float32 and z.dtype == np.int32 and np.ndim(s) == 0
    assert s == np.float32(4.0 / 255)
    assert z == -128 - round(-1.0 / float(s))  # -128 + 64 = -64
    assert z == -64
    s, z = choose_qparams(0.0, 2.55, "uint8")
    assert np.isclose(s, 0.01) and z == 0


def test_choose_qparams_range_widened_to_zero():
    # [2, 4] is widened to [0, 4]: 0 must stay representable.
    s, z = choose_qparams(2.0, 4.0, "uint8")
    assert s == np.float32(4.0 / 255) and z == 0
    s, z = choose_qparams(-4.0, -2.0, "int8")
    assert s == np.float32(4.0 / 255) and z == 127


def test_choose_qparams_symmetric():
    s, z = choose_qparams(-2.0, 1.0, "int8", symmetric=True)
    assert s == np.float32(2.0 / 127) and z == 0
    s, z = choose_qparams(-2.0, 1.0, "uint8", symmetric=True)
    assert s == np.float32(2.0 / 127) and z == 128
    s, z = choose_qparams(-7.0, 3.0, "int4", symmetric=True)
    assert s == np.float32(1.0) and z == 0
    q = quantize([-2.0, 2.0], s := choose_qparams(-2.0, 2.0, "int8", True)[0], 0)
    assert q.tolist() == [-127, 127]  # restricted range: -128 unused


def test_choose_qparams_zero_range_and_per_channel():
    s, z = choose_qparams(0.0, 0.0)
    assert s == np.float32(SCALE_EPS) and z == -128
    assert quantize(0.0, s, z) == -128 and dequantize(np.int8(-128), s, z) == 0.0
    s, z = choose_qparams([-1.0, 0.0, -3.0], [1.0, 0.0, 3.0], "int8", symmetric=True, axis=0)
    assert s.shape == (3,) and s.dtype == np.float32 and z.dtype == np.int32
    np.testing.assert_array_equal(s, np.float32([1 / 127, SCALE_EPS, 3 / 127]))
    np.testing.assert_array_equal(z, 0)


def test_choose_qparams_rejects_bad_ranges():
    with pytest.raises(TvmqError, match="NaN or inf"):
        choose_qparams(np.nan, 1.0)
    with pytest.raises(TvmqError, match="greater"):
        choose_qparams(2.0, 1.0)
    with pytest.raises(TvmqError, match="1-D"):
        choose_qparams(np.zeros((2, 2)), np.ones((2, 2)), axis=0)


@settings(max_examples=60, deadline=None)
@given(finite, finite, dtypes, st.booleans(), st.lists(finite, min_size=1, max_size=50))
def test_roundtrip_error_within_half_step(a, b, dtype, symmetric, xs):
    lo, hi = min(a, b), max(a, b)
    s, z = choose_qparams(lo, hi, dtype, symmetric)
    qmin, qmax = qrange(dtype)
    assert qmin <= z <= qmax
    # zero is exact
    assert dequantize(quantize(0.0, s, z, dtype), s, z) == 0.0
    # inside the (zero-widened) range the error is at most half a step
    x = np.clip(np.float32(xs), min(lo, 0.0), max(hi, 0.0)).astype(np.float32)
    xr = dequantize(quantize(x, s, z, dtype), s, z)
    tol = float(s) * (0.5 + 1e-5) + 1e-6 * np.abs(x)
    assert np.all(np.abs(xr - x) <= tol)


def test_quantize_rounds_half_to_even_and_clamps():
    q = quantize([0.5, 1.5, 2.5, -0.5, -1.5, 1000.0, -1000.0], 1.0, 0, "int8")
    assert q.dtype == np.int8
    assert q.tolist() == [0, 2, 2, 0, -2, 127, -128]
    assert quantize([3.0], 1.0, 250, "uint8").tolist() == [253]
    with pytest.raises(TvmqError, match="NaN"):
        quantize([np.nan], 1.0, 0)


def test_per_channel_quantize_dequantize():
    x = np.array([[1.0, -2.0, 3.0], [0.5, 0.25, -0.75]], dtype=np.float32)
    s = np.float32([3.0 / 127, 0.75 / 127])
    q = quantize(x, s, [0, 0], "int8", axis=0)
    assert q[0].tolist() == [42, -85, 127] and q[1].tolist() == [85, 42, -127]
    np.testing.assert_allclose(dequantize(q, s, [0, 0], axis=0), x, atol=float(s.max()) / 2)
    # axis=-2 names the same axis; axis=1 has the wrong length
    np.testing.assert_array_equal(quantize(x, s, [0, 0], axis=-2), q)
    with pytest.raises(TvmqError, match="channels"):
        quantize(x, s, [0, 0], axis=1)
    with pytest.raises(TvmqError, match="axis"):
        quantize(x, s, [0, 0])


# -- fixed-point multipliers --------------------------------------------------------------------


def test_quantize_multiplier_by_hand():
    assert quantize_multiplier(0.5) == (2**30, 0)
    assert quantize_multiplier(0.25) == (2**30, -1)
    assert quantize_multiplier(1.0) == (2**30, 1)
    assert quantize_multiplier(3.0) == (3 * 2**29, 2)
    assert quantize_multiplier(0.0) == (0, 0)
    assert quantize_multiplier(2.0**-40) == (0, 0)  # below 2**-32: rounds to zero
    # mantissa rounding up to 2**31 carries into the shift
    m, sh = quantize_multiplier(1.0 - 2.0**-40)
    assert (m, sh) == (2**30, 1)
    m, sh = quantize_multiplier(np.array([0.5, 0.75]))
    assert m.dtype == np.int32 and m.tolist() == [2**30, 3 * 2**29] and sh.tolist() == [0, 0]
    with pytest.raises(TvmqError):
        quantize_multiplier(-1.0)


@settings(max_examples=80, deadline=None)
@given(st.floats(-31.0, 30.0))
def test_quantize_multiplier_reconstructs(log2_real):
    real = 2.0**log2_real
    m, sh = quantize_multiplier(real)
    assert 2**30 <= int(m) < 2**31
    approx = int(m) * 2.0 ** (int(sh) - 31)
    assert abs(approx - real) / real <= 1e-9


def _round_half_away(f: Fraction) -> int:
    r = math.floor(abs(f) + Fraction(1, 2))
    return r if f >= 0 else -r


def _requantize_bigint(acc: int, m: int, shift: int, zp: int, qmin: int, qmax: int) -> int:
    """TFLite MultiplyByQuantizedMultiplier restated on exact rationals with Python ints."""
    left, right = max(shift, 0), max(-shift, 0)
    x = min(max(acc * 2**left, INT32_MIN), INT32_MAX)
    # SaturatingRoundingDoublingHighMul: x*m / 2**31 rounded half up (toward +inf)
    high = math.floor(Fraction(x * m, 2**31) + Fraction(1, 2))
    # RoundingDivideByPOT: rounded half away from zero
    out = _round_half_away(Fraction(high, 2**right))
    return min(max(out + zp, qmin), qmax)


def test_requantize_int_rounding_by_hand():
    # 0.5 = 2**30 * 2**(0 - 31): only the doubling high multiply rounds, ties toward +inf
    m, sh = quantize_multiplier(0.5)
    acc = np.array([1, 3, -1, -3, 300, -300], dtype=np.int32)
    assert requantize_int(acc, m, sh, 0).tolist() == [1, 2, 0, -1, 127, -128]
    assert requantize_int(acc, m, sh, 10, "uint8").tolist() == [11, 12, 10, 9, 160, 0]
    # 0.25 = 2**30 * 2**(-1 - 31): the exact halves are then divided by 2, ties away from zero
    m, sh = quantize_multiplier(0.25)
    acc = np.array([2, 6, -2, -6, -1], dtype=np.int32)
    assert requantize_int(acc, m, sh, 0).tolist() == [1, 2, -1, -2, 0]
    with pytest.raises(TvmqError, match="int32"):
        requantize_int(np.array([2**31]), m, sh, 0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(INT32_MIN, INT32_MAX), min_size=1, max_size=30),
    st.floats(-34.0, 8.0),
    st.integers(-128, 127),
    st.sampled_from(["int8", "int32", "uint8"]),
)
def test_requantize_int_bit_exact_and_close_to_float(accs, log2_mult, zp, dtype):
    real = 2.0**log2_mult
    m, sh = quantize_multiplier(real)
    qmin, qmax = qrange(dtype)
    zp = min(max(zp, qmin), qmax)
    acc = np.array(accs, dtype=np.int64)
    got = requantize_int(acc, m, sh, zp, dtype)
    expected = [_requantize_bigint(a, int(m), int(sh), zp, qmin, qmax) for a in accs]
    assert got.astype(np.int64).tolist() == expected
    ref = requantize_float(acc, real, zp, dtype).astype(np.int64)
    if log2_mult >= -31:  # smaller multipliers quantize to 0 by design
        # Compare where neither side saturates inside int32: a positive shift saturates
        # acc << shift first (TFLite leaves that overflow undefined).
        comparable = (np.abs(acc) * 2.0 ** max(int(sh), 0) < 2**31 - 1) & (
            np.abs(acc * real) < 2**24
        )
        diff = np.abs(got.astype(np.int64) - ref)
        assert np.all(diff[comparable] <= 1)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(-(2**20), 2**20), min_size=6, max_size=6),
    st.lists(st.floats(-20.0, 2.0), min_size=3, max_size=3),
)
def test_requantize_int_per_channel(accs, log2s):
    acc = np.array(accs, dtype=np.int32).reshape(2, 3)
    reals = 2.0 ** np.array(log2s)
    m, sh = quantize_multiplier(reals)
    zps = np.array([0, 5, -5])
    got = requantize_int(acc, m, sh, zps, "int8", axis=1)
    for c in range(3):
        col = requantize_int(acc[:, c], m[c], sh[c], zps[c], "int8")
        np.testing.assert_array_equal(got[:, c], col)
        ref = requantize_float(acc[:, c], reals[c], zps[c], "int8").astype(int)
        assert np.all(np.abs(got[:, c].astype(int) - ref) <= 1)


def test_requantize_float_by_hand():
    assert requantize_float([5, 15, -5, 2000], 0.1, 3).tolist() == [3, 5, 3, 127]
    np.testing.assert_array_equal(
        requantize_float([[10, 10]], [0.1, 0.2], [0, 1], axis=1), [[1, 3]]
    )


# -- sqnr ---------------------------------------------------------------------------------------


def test_sqnr():
    x = np.array([3.0, 4.0])
    assert sqnr(x, x) == float("inf")
    assert sqnr(x, x * 0.9) == pytest.approx(20.0)
    assert sqnr(x, [3.0, 4.5]) == pytest.approx(20 * np.log10(5 / 0.5))
    with pytest.raises(TvmqError, match="shapes"):
        sqnr(x, [1.0])


# -- agreement with TVM -------------------------------------------------------------------------


def test_bit_exact_with_relax_quantize_dequantize():
    """The reference matches Relax's legalized R.quantize/R.dequantize, ties included."""
    tvm = pytest.importorskip("tvm")
    from tvm import relax
    from tvm.script import relax as R

    @tvm.script.ir_module
    class Module:
        @R.function
        def main(
            x: R.Tensor((64, 4), "float32"),
            s: R.Tensor((4,), "float32"),
            z: R.Tensor((4,), "int8"),
        ):
            q = R.quantize(x, s, z, axis=1, out_dtype="int8")
            d = R.dequantize(q, s, z, axis=1, out_dtype="float32")
            return (q, d)

    vm = relax.VirtualMachine(tvm.compile(Module, target="llvm"), tvm.cpu())
    rng = np.random.default_rng(0)
    s = np.float32([0.1, 0.7, 1e-3, 0.05])
    z = np.int8([0, -3, 5, 127])
    x = (rng.integers(-300, 300, (64, 4)) * 0.5 * s).astype(np.float32)  # many exact ties
    x[:8] = rng.standard_normal((8, 4)) * 5
    ratio = x / s
    assert (ratio - np.floor(ratio) == 0.5).sum() > 20
    q, d = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(s), tvm.runtime.tensor(z))
    expected_q = quantize(x, s, z, "int8", axis=1)
    np.testing.assert_array_equal(q.numpy(), expected_q)
    np.testing.assert_array_equal(d.numpy(), dequantize(expected_q, s, z, axis=1))
