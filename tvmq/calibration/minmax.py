"""``minmax``: the range is the smallest and largest value seen in any batch."""

from __future__ import annotations

import numpy as np

from tvmq.calibration.base import Observer

__all__ = ["MinMaxObserver"]


class MinMaxObserver(Observer):
    """Running minimum and maximum over all batches.

    Exact and cheap, but a single outlier stretches the range; prefer ``entropy``,
    ``percentile`` or ``mse`` for activations with long tails.
    """

    name = "minmax"

    def _reset(self) -> None:
        self.min_val = np.inf
        self.max_val = -np.inf

    def _update(self, x: np.ndarray) -> None:
        self.min_val = min(self.min_val, float(x.min()))
        self.max_val = max(self.max_val, float(x.max()))

    def _compute_range(self, dtype: str, symmetric: bool) -> tuple[float, float]:
        return self.min_val, self.max_val
