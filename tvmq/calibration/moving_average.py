"""``moving_average``: exponential moving average of each batch's min and max.

Like PyTorch's ``MovingAverageMinMaxObserver``: the first batch sets the range, and each
later batch moves it by ``averaging_constant`` toward that batch's own min and max::

    min <- min + c * (batch_min - min)
"""

from __future__ import annotations

import numpy as np

from tvmq.calibration.base import Observer
from tvmq.errors import TvmqError

__all__ = ["MovingAverageMinMaxObserver"]


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of per-batch min and max.

    Parameters
    ----------
    averaging_constant : float
        Weight ``c`` in ``(0, 1]`` of each new batch; 1 keeps only the last batch.
    label : str, optional
        What is observed, for error messages.
    """

    name = "moving_average"

    def __init__(self, averaging_constant: float = 0.01, *, label: str | None = None) -> None:
        if not 0.0 < float(averaging_constant) <= 1.0:
            raise TvmqError(f"averaging_constant must be in (0, 1], got {averaging_constant!r}")
        self.averaging_constant = float(averaging_constant)
        super().__init__(label=label)

    def _reset(self) -> None:
        self.min_val = np.nan
        self.max_val = np.nan

    def _update(self, x: np.ndarray) -> None:
        lo, hi = float(x.min()), float(x.max())
        if self.num_batches == 0:
            self.min_val, self.max_val = lo, hi
            return
        c = self.averaging_constant
        self.min_val += c * (lo - self.min_val)
        self.max_val += c * (hi - self.max_val)

    def _compute_range(self, dtype: str, symmetric: bool) -> tuple[float, float]:
        return self.min_val, self.max_val
