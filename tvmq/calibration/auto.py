"""``auto``: every candidate observer watches the tensor; the quantizer then picks one.

An :class:`AutoObserver` feeds each batch to one observer of each candidate kind
(:data:`CANDIDATES`), so one calibration run yields every candidate's range. It gives no
range until ``choice`` names a candidate: static int8 quantization
(``tvmq.quantization.auto_observer``) quantizes the model once per candidate, measures the
compiled model's output SQNR against the float model on the first calibration batch and
sets the winner on every ``auto`` observer (one choice per model, not per tensor). Before
a choice is made it gives minmax's range.
"""

from __future__ import annotations

import numpy as np

from tvmq.calibration.base import Observer, get_observer
from tvmq.errors import TvmqError

__all__ = ["CANDIDATES", "AutoObserver"]

# moving_average is left out: on calibration data (no training loop) it is a smoothed minmax.
CANDIDATES = ("minmax", "percentile", "entropy", "mse")


class AutoObserver(Observer):
    """One observer of each kind in :data:`CANDIDATES`; ``choice`` says whose range to use."""

    name = "auto"

    def _reset(self) -> None:
        self.candidates = {n: get_observer(n, label=self.label) for n in CANDIDATES}
        self.choice: str | None = None

    def _update(self, x: np.ndarray) -> None:
        for obs in self.candidates.values():
            obs.update(x)

    def _compute_range(self, dtype: str, symmetric: bool) -> tuple[float, float]:
        # Until a choice is made: minmax, the default observer.
        return self.candidates[self.choice or "minmax"]._cached_range(dtype, symmetric)

    def choose(self, name: str) -> None:
        """Use candidate ``name``'s range from now on."""
        if name not in self.candidates:
            raise TvmqError(f"{name!r} is not an auto candidate ({', '.join(CANDIDATES)})")
        self.choice = name
        self._cache.clear()
