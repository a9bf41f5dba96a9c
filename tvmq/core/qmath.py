"""Reference quantization math in numpy: the numbers every tvmq pass must reproduce.

Standard affine quantization (Jacob et al. 2018; the gemmlowp / TFLite scheme)::

    q = clamp(round(x / s) + z, qmin, qmax)        x ~= s * (q - z)

Conventions, chosen so these functions agree bit for bit with what TVM runs:

- ``quantize`` divides in float32 and rounds half to even (``numpy.rint``), exactly like
  Relax's legalized ``R.quantize`` (float32 ``x / s``, ``round`` lowered to LLVM ``nearbyint``).
- ``dequantize`` subtracts the zero point in integers, then multiplies by the float32 scale,
  like Relax's legalized ``R.dequantize``.
- ``requantize_int`` is gemmlowp/TFLite ``MultiplyByQuantizedMultiplier``:
  ``SaturatingRoundingDoublingHighMul`` (rounds half up) followed by ``RoundingDivideByPOT``
  (rounds half away from zero). ``requantize_float`` rounds half to even in float64.
- Every quantized range contains 0, so the real value 0 (padding, ReLU) is exact.
- Symmetric ranges are "restricted": int8 uses [-127, 127] with zero point 0, uint8 uses
  [1, 255] with zero point 128, so ``-x`` quantizes to ``-q`` and int8 x int8 products never
  see -128 * -128.

A per-channel parameter is a 1-D array whose length is ``x.shape[axis]``; per-tensor
parameters are scalars.
"""

from __future__ import annotations

import math

import numpy as np

from tvmq.errors import TvmqError

__all__ = [
    "SCALE_EPS",
    "choose_qparams",
    "dequantize",
    "qrange",
    "quantize",
    "quantize_multiplier",
    "requantize_float",
    "requantize_int",
    "sqnr",
    "storage_dtype",
]

#: Smallest scale ``choose_qparams`` returns (float32 machine epsilon, as PyTorch observers
#: use), so an all-zero tensor still gets a finite, invertible scale.
SCALE_EPS = float(np.finfo(np.float32).eps)

# dtype name -> (qmin, qmax, numpy dtype that stores it)
_QTYPES: dict[str, tuple[int, int, type[np.integer]]] = {
    "int4": (-8, 7, np.int8),
    "uint4": (0, 15, np.uint8),
    "int8": (-128, 127, np.int8),
    "uint8": (0, 255, np.uint8),
    "int16": (-(2**15), 2**15 - 1, np.int16),
    "uint16": (0, 2**16 - 1, np.uint16),
    "int32": (-(2**31), 2**31 - 1, np.int32),
}
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def qrange(dtype: str) -> tuple[int, int]:
    """Return the integer range ``(qmin, qmax)`` of a quantized dtype.

    Parameters
    ----------
    dtype : str
        One of ``int4``, ``uint4``, ``int8``, ``uint8``, ``int16``, ``uint16``, ``int32``.

    Returns
    -------
    tuple[int, int]
        The full range, e.g. ``(-128, 127)`` for ``int8``.
    """
    try:
        qmin, qmax, _ = _QTYPES[str(dtype)]
    except KeyError:
        raise TvmqError(
            f"unknown quantized dtype {dtype!r}; use one of {', '.join(_QTYPES)}"
        ) from None
    return qmin, qmax


def storage_dtype(dtype: str) -> np.dtype:
    """Return the numpy dtype that holds values of a quantized dtype (int4 lives in int8)."""
    qrange(dtype)
    return np.dtype(_QTYPES[str(dtype)][2])


def _is_signed(dtype: str) -> bool:
    return qrange(dtype)[0] < 0


def choose_qparams(
    min_val,
    max_val,
    dtype: str = "int8",
    symmetric: bool = False,
    axis: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Choose scale and zero point that map ``[min_val, max_val]`` onto ``dtype``.

    The range is first widened to contain 0. Asymmetric: ``s = (max - min) / (qmax - qmin)``,
    ``z = qmin - round(min / s)`` clamped to ``[qmin, qmax]``. Symmetric:
    ``s = max(|min|, |max|) / ((qmax - qmin) // 2)`` (127 for 8 bits), ``z = 0`` for signed
    and ``(qmin + qmax + 1) // 2`` (128 for uint8) for unsigned dtypes. Scales are at least
    :data:`SCALE_EPS`.

    Parameters
    ----------
    min_val, max_val : float or array_like
        Observed range; 1-D arrays (one entry per channel) for per-channel quantization.
    dtype : str
        Quantized dtype, see :func:`qrange`.
    symmetric : bool
        Use a range symmetric around 0.
    axis : int, optional
        Set for per-channel parameters; ``min_val`` and ``max_val`` must then be 1-D.
        (The value itself is not used here: it names the channel axis of the tensor.)

    Returns
    -------
    scale : numpy.ndarray
        float32; a numpy scalar when the inputs are scalars.
    zero_point : numpy.ndarray
        int32, same shape as ``scale``.
    """
    lo = np.asarray(min_val, dtype=np.float64)
    hi = np.asarray(max_val, dtype=np.float64)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise TvmqError(
            "cannot choose quantization parameters for a range containing NaN or inf; "
            "check the calibration data and the float model"
        )
    try:
        lo, hi = np.broadcast_arrays(lo, hi)
    except ValueError:
        raise TvmqError(
            f"min_val has shape {lo.shape} but max_val has shape {hi.shape}; "
            "they must match (one value per channel)"
        ) from None
    if axis is not None and lo.ndim != 1:
        raise TvmqError(
            f"per-channel quantization (axis={axis}) needs 1-D min/max arrays, got shape {lo.shape}"
        )
    if np.any(lo > hi):
        raise TvmqError("min_val is greater than max_val; the range is empty")
    qmin, qmax = qrange(dtype)
    lo = np.minimum(lo, 0.0)
    hi = np.maximum(hi, 0.0)
    if symmetric:
        half = (qmax - qmin) // 2
        scale = (np.maximum(-lo, hi) / half).astype(np.float32)
        scale = np.maximum(scale, np.float32(SCALE_EPS))
        zp = np.full(scale.shape, 0 if qmin < 0 else (qmin + qmax + 1) // 2, dtype=np.int64)
    else:
        scale = ((hi - lo) / (qmax - qmin)).astype(np.float32)
        scale = np.maximum(scale, np.float32(SCALE_EPS))
        # Derive z from the float32 scale actually stored, so that min maps near qmin.
        zp = qmin - np.rint(lo / scale.astype(np.float64)).astype(np.int64)
        zp = np.clip(zp, qmin, qmax)
    scale = scale.astype(np.float32)
    zp = zp.astype(np.int32)
    if scale.ndim == 0:
        return scale[()], zp[()]
    return scale, zp


def _per_axis(param, ndim: int, axis: int | None, name: str, length: int | None, dtype):
    """Shape a scalar or per-channel parameter to broadcast against an ``ndim``-d tensor."""
    p = np.asarray(param, dtype=dtype)
    if axis is None:
        if p.size != 1:
            raise TvmqError(
                f"{name} has {p.size} values but no axis was given; pass axis=<channel axis> "
                "for per-channel parameters"
            )
        return p.reshape(())
    if p.size == 1:
        return p.reshape(())
    if p.ndim != 1 or p.shape[0] != length:
        raise TvmqError(
            f"{name} has shape {p.shape} but the tensor has {length} channels on axis {axis}"
        )
    shape = [1] * ndim
    shape[axis] = length
    return p.reshape(shape)


def _norm_axis(axis: int | None, ndim: int) -> int | None:
    if axis is None:
        return None
    if not -ndim <= axis < ndim:
        raise TvmqError(f"axis {axis} is out of range for a {ndim}-d tensor")
    return axis % ndim


def quantize(x, scale, zero_point, dtype: str = "int8", axis: int | None = None) -> np.ndarray:
    """Quantize: ``clamp(rint(float32(x) / scale) + zero_point, qmin, qmax)``.

    Parameters
    ----------
    x : array_like
        Float values (computed in float32, like ``R.quantize``).
    scale, zero_point : float/int or 1-D array_like
        Scalars, or one value per channel along ``axis``.
    dtype : str
        Target dtype; the result is stored in :func:`storage_dtype` (int4 in int8).
    axis : int, optional
        Channel axis for per-channel parameters.

    Returns
    -------
    numpy.ndarray
        Quantized values.
    """
    qmin, qmax = qrange(dtype)
    x = np.asarray(x, dtype=np.float32)
    if np.isnan(x).any():
        raise TvmqError("cannot quantize NaN values")
    ax = _norm_axis(axis, x.ndim)
    n = x.shape[ax] if ax is not None else None
    s = _per_axis(scale, x.ndim, ax, "scale", n, np.float32)
    z = _per_axis(zero_point, x.ndim, ax, "zero_point", n, np.int64)
    with np.errstate(over="ignore", divide="ignore"):
        q = np.rint(x / s).astype(np.float64) + z
    return np.clip(q, qmin, qmax).astype(storage_dtype(dtype))


def dequantize(q, scale, zero_point, axis: int | None = None) -> np.ndarray:
    """Dequantize: ``float32(q - zero_point) * scale`` (float32 result).

    Parameters
    ----------
    q : array_like
        Integer values.
    scale, zero_point : float/int or 1-D array_like
        Scalars, or one value per channel along ``axis``.
    axis : int, optional
        Channel axis for per-channel parameters.
    """
    q = np.asarray(q)
    if not np.issubdtype(q.dtype, np.integer):
        raise TvmqError(f"dequantize expects integer values, got dtype {q.dtype}")
    ax = _norm_axis(axis, q.ndim)
    n = q.shape[ax] if ax is not None else None
    s = _per_axis(scale, q.ndim, ax, "scale", n, np.float32)
    z = _per_axis(zero_point, q.ndim, ax, "zero_point", n, np.int64)
    return ((q.astype(np.int64) - z).astype(np.float32) * s).astype(np.float32)


def quantize_multiplier(real_multiplier) -> tuple[np.ndarray, np.ndarray]:
    """Split a positive real multiplier into an int32 mantissa and a power-of-two shift.

    TFLite ``QuantizeMultiplier``: ``real ~= M * 2**(shift - 31)`` with ``M`` in
    ``[2**30, 2**31)`` (relative error at most ``2**-31``). ``0`` gives ``(0, 0)``, and so
    does a multiplier below ``2**-32`` (it rounds to zero). Multipliers above 1 give
    positive shifts.

    Parameters
    ----------
    real_multiplier : float or array_like
        Non-negative, finite, below ``2**31``; typically ``s_in * s_w / s_out``.

    Returns
    -------
    multiplier : numpy.ndarray
        int32 mantissas (numpy scalar for scalar input).
    shift : numpy.ndarray
        int32 shifts, same shape.
    """
    r = np.asarray(real_multiplier, dtype=np.float64)
    if not np.all(np.isfinite(r)) or np.any(r < 0) or np.any(r >= 2.0**31):
        raise TvmqError(
            "requantization multipliers must be finite, non-negative and below 2**31; "
            "check the scales they were computed from"
        )
    mant, exp = np.frexp(r)  # r = mant * 2**exp, mant in [0.5, 1)
    # mant * 2**31 is exact in float64; round half away from zero like TfLiteRound.
    m = np.floor(mant * 2.0**31 + 0.5).astype(np.int64)
    exp = exp.astype(np.int64)
    carry = m == 2**31
    m = np.where(carry, m // 2, m)
    exp = np.where(carry, exp + 1, exp)
    tiny = (exp < -31) | (r == 0)
    m = np.where(tiny, 0, m).astype(np.int32)
    shift = np.where(tiny, 0, exp).astype(np.int32)
    if m.ndim == 0:
        return m[()], shift[()]
    return m, shift


def _saturating_rounding_doubling_high_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """gemmlowp SaturatingRoundingDoublingHighMul on int32 values held in int64."""
    overflow = (a == b) & (a == _INT32_MIN)
    ab = a * b  # |a*b| <= 2**62 fits int64
    nudge = np.where(ab >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    t = ab + nudge
    # C++ integer division truncates toward zero; numpy's >> floors.
    high = np.where(t >= 0, t >> 31, -((-t) >> 31))
    return np.where(overflow, np.int64(_INT32_MAX), high)


def _rounding_divide_by_pot(x: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """gemmlowp RoundingDivideByPOT: ``x / 2**exponent`` rounded half away from zero."""
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def requantize_int(
    acc,
    multiplier,
    shift,
    zero_point_out,
    dtype: str = "int8",
    axis: int | None = None,
) -> np.ndarray:
    """Requantize int32 accumulators with integer-only arithmetic (bit-exact gemmlowp/TFLite).

    Computes ``MultiplyByQuantizedMultiplier(acc, M, shift) + zero_point_out`` and clamps to
    ``dtype``. For a positive shift, ``acc << shift`` saturates to int32 (TFLite leaves that
    overflow undefined).

    Parameters
    ----------
    acc : array_like of int
        Accumulators; every value must fit in int32.
    multiplier, shift : int or 1-D array_like
        From :func:`quantize_multiplier`; per-channel along ``axis`` or scalars.
    zero_point_out : int or 1-D array_like
        Output zero point.
    dtype : str
        Output dtype.
    axis : int, optional
        Channel axis of ``acc`` for per-channel multipliers.

    Returns
    -------
    numpy.ndarray
        Stored in :func:`storage_dtype` of ``dtype``.
    """
    qmin, qmax = qrange(dtype)
    acc = np.asarray(acc)
    if not np.issubdtype(acc.dtype, np.integer):
        raise TvmqError(f"requantize_int expects integer accumulators, got dtype {acc.dtype}")
    acc = acc.astype(np.int64)
    if acc.size and (acc.min() < _INT32_MIN or acc.max() > _INT32_MAX):
        raise TvmqError("accumulator values must fit in int32")
    ax = _norm_axis(axis, acc.ndim)
    n = acc.shape[ax] if ax is not None else None
    m = _per_axis(multiplier, acc.ndim, ax, "multiplier", n, np.int64)
    sh = _per_axis(shift, acc.ndim, ax, "shift", n, np.int64)
    z = _per_axis(zero_point_out, acc.ndim, ax, "zero_point_out", n, np.int64)
    if np.any(m < 0) or np.any(m > _INT32_MAX) or np.any(sh > 31) or np.any(sh < -31):
        raise TvmqError("multiplier must be in [0, 2**31) and shift in [-31, 31]")
    left = np.maximum(sh, 0)
    right = np.maximum(-sh, 0)
    x = np.clip(acc << left, _INT32_MIN, _INT32_MAX)
    y = _rounding_divide_by_pot(_saturating_rounding_doubling_high_mul(x, m), right)
    return np.clip(y + z, qmin, qmax).astype(storage_dtype(dtype))


def requantize_float(
    acc,
    real_multiplier,
    zero_point_out,
    dtype: str = "int8",
    axis: int | None = None,
) -> np.ndarray:
    """Requantize with a float multiplier: ``clamp(rint(acc * m) + zp, qmin, qmax)`` in float64.

    The float reference for :func:`requantize_int`; rounds half to even.
    """
    qmin, qmax = qrange(dtype)
    acc = np.asarray(acc, dtype=np.float64)
    ax = _norm_axis(axis, acc.ndim)
    n = acc.shape[ax] if ax is not None else None
    m = _per_axis(real_multiplier, acc.ndim, ax, "real_multiplier", n, np.float64)
    z = _per_axis(zero_point_out, acc.ndim, ax, "zero_point_out", n, np.int64)
    q = np.rint(acc * m) + z
    return np.clip(q, qmin, qmax).astype(storage_dtype(dtype))


def sqnr(reference, approx) -> float:
    """Signal-to-quantization-noise ratio ``20 * log10(||x|| / ||x - y||)`` in dB.

    Returns ``inf`` when the two are equal.
    """
    x = np.asarray(reference, dtype=np.float64)
    y = np.asarray(approx, dtype=np.float64)
    if x.shape != y.shape:
        raise TvmqError(f"sqnr needs equal shapes, got {x.shape} and {y.shape}")
    noise = float(np.linalg.norm((x - y).ravel()))
    signal = float(np.linalg.norm(x.ravel()))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 20.0 * math.log10(signal / noise)
