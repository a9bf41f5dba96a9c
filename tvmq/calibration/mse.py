"""``mse``: the clipping range that minimizes the expected quantization error.

Values go into a 2048-bin signed :class:`~tvmq.calibration.base.Histogram`. For a candidate
range ``[lo, hi]`` with step ``s``, each bin (center ``c``, width ``w``, count ``n``) adds
``n * s**2 / 12`` (uniform rounding noise) if ``c`` is inside, or
``n * ((c - clip(c))**2 + w**2 / 12)`` if it is clipped. Candidates shrink the observed range
toward 0 in ``steps`` steps: symmetric ranges on one magnitude; asymmetric ranges first on
both ends together, then on each end alone (two rounds of coordinate descent).

The search depends on the dtype: ``qparams(dtype, symmetric)`` searches for that dtype, and
``range()`` for asymmetric int8. Squared error weighs outliers heavily: a handful of huge
values is kept in range, because clipping them costs more than the rounding it saves. Use
``entropy`` or ``percentile`` to ignore such outliers.
"""

from __future__ import annotations

import numpy as np

from tvmq.calibration.base import HistogramObserver
from tvmq.core.qmath import SCALE_EPS, qrange
from tvmq.errors import TvmqError

__all__ = ["MSEObserver"]


class MSEObserver(HistogramObserver):
    """Range minimizing the expected squared quantization error over the observed histogram.

    Parameters
    ----------
    bins : int
        Histogram resolution.
    steps : int
        Candidate ranges per search direction.
    label : str, optional
        What is observed, for error messages.
    """

    name = "mse"

    def __init__(self, bins: int = 2048, steps: int = 100, *, label: str | None = None) -> None:
        if int(steps) < 2:
            raise TvmqError(f"steps must be at least 2, got {steps!r}")
        self.bins = int(bins)
        self.steps = int(steps)
        super().__init__(label=label)

    def expected_error(self, lo, hi, scale) -> np.ndarray:
        """Expected total squared error for candidate ranges (arrays of equal length)."""
        h = self.histogram
        w = h.width
        centers = (h.start + np.arange(len(h.counts)) + 0.5) * w
        lo = np.asarray(lo, dtype=np.float64)[:, None]
        hi = np.asarray(hi, dtype=np.float64)[:, None]
        s = np.asarray(scale, dtype=np.float64)[:, None]
        clipped = np.clip(centers, lo, hi)
        inside = (centers >= lo) & (centers <= hi)
        per_value = np.where(inside, s**2 / 12.0, (centers - clipped) ** 2 + w**2 / 12.0)
        return per_value @ h.counts

    def _compute_range(self, dtype: str, symmetric: bool) -> tuple[float, float]:

        if self.histogram.width == 0.0:
            return self.min_val, self.max_val
        qmin, qmax = qrange(dtype)
        lo0, hi0 = min(self.min_val, 0.0), max(self.max_val, 0.0)
        t = np.linspace(1.0 / self.steps, 1.0, self.steps)
        if symmetric:
            half = (qmax - qmin) // 2
            a = t * max(-lo0, hi0)
            err = self.expected_error(-a, a, np.maximum(a / half, SCALE_EPS))
            best = a[_last_argmin(err)]
            return max(lo0, -best), min(hi0, best)

        def search(los: np.ndarray, his: np.ndarray) -> tuple[float, float]:
            err = self.expected_error(los, his, np.maximum((his - los) / (qmax - qmin), SCALE_EPS))
            i = _last_argmin(err)
            return float(los[i]), float(his[i])

        lo, hi = search(t * lo0, t * hi0)
        for _ in range(2):
            lo, hi = search(t * lo0, np.full_like(t, hi))
            lo, hi = search(np.full_like(t, lo), t * hi0)
        return lo, hi


def _last_argmin(a: np.ndarray) -> int:
    """Index of the minimum, preferring the widest candidate on ties."""
    return len(a) - 1 - int(np.argmin(a[::-1]))
