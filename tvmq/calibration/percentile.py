"""``percentile``: clip the range at a percentile of the observed values, on each side.

Values go into a fine :class:`~tvmq.calibration.base.Histogram` (8192 bins by default) that
widens as batches arrive, so memory stays fixed however much data is observed. The upper
end is the ``percentile``-th percentile, the lower end the ``(100 - percentile)``-th, estimated
like ``numpy.percentile`` (linear interpolation between order statistics), with each order
statistic placed inside its bin as if the bin's values were evenly spread: the result is
within one bin width (``range / 4096`` at worst) of ``numpy.percentile`` over all the data.
"""

from __future__ import annotations

import numpy as np

from tvmq.calibration.base import HistogramObserver
from tvmq.errors import TvmqError

__all__ = ["PercentileObserver"]


class PercentileObserver(HistogramObserver):
    """Range from the ``(100 - p)``-th to the ``p``-th percentile of all observed values.

    Parameters
    ----------
    percentile : float
        ``p`` in ``[50, 100]``; 100 gives the min/max.
    bins : int
        Histogram resolution.
    label : str, optional
        What is observed, for error messages.
    """

    name = "percentile"

    def __init__(
        self, percentile: float = 99.99, bins: int = 8192, *, label: str | None = None
    ) -> None:
        if not 50.0 <= float(percentile) <= 100.0:
            raise TvmqError(f"percentile must be in [50, 100], got {percentile!r}")
        self.percentile = float(percentile)
        self.bins = int(bins)
        super().__init__(label=label)

    def _order_statistic(self, cdf: np.ndarray, k: int) -> float:
        """The ``k``-th smallest value (0-based), assuming values spread evenly in a bin."""
        h = self.histogram
        b = int(np.searchsorted(cdf, k, side="right")) - 1  # cdf[b] <= k < cdf[b + 1]
        b = min(max(b, 0), len(h.counts) - 1)
        within = (k - cdf[b] + 0.5) / h.counts[b] if h.counts[b] > 0 else 0.5
        return float((h.start + b + within) * h.width)

    def _quantile(self, q: float) -> float:
        """``numpy.percentile``'s linear estimate at ``q``, from the histogram."""
        h = self.histogram
        if h.width == 0.0:
            return 0.0
        cdf = np.concatenate([[0.0], np.cumsum(h.counts)])
        pos = q * (cdf[-1] - 1)
        k0 = int(np.floor(pos))
        k1 = min(k0 + 1, int(cdf[-1]) - 1)
        frac = pos - k0
        return (1 - frac) * self._order_statistic(cdf, k0) + frac * self._order_statistic(cdf, k1)

    def _compute_range(self, dtype: str, symmetric: bool) -> tuple[float, float]:
        if self.percentile == 100.0:
            return self.min_val, self.max_val
        p = self.percentile / 100.0
        hi = min(max(self._quantile(p), self.min_val), self.max_val)
        lo = min(max(self._quantile(1.0 - p), self.min_val), hi)
        return lo, hi
