"""``entropy``: TensorRT-style KL-divergence calibration (Migacz, GTC 2017).

Values go into a 2048-bin :class:`~tvmq.calibration.base.Histogram` of ``|x|`` that widens
(merging bin pairs) when a later batch has a larger magnitude. Exact zeros are left out:
zero is exactly representable, so it costs no error and would otherwise dominate the
divergence for ReLU outputs. For each candidate threshold of ``i`` bins (``n_q <= i <= n``):

- the reference ``P`` is the first ``i`` bins, with every count beyond added to bin ``i - 1``;
- the candidate ``Q`` merges the first ``i`` bins (outliers excluded) into ``n_q`` levels
  and spreads each level evenly over the bins of that level where ``P`` is non-zero;
- the threshold minimizing ``KL(P || Q)`` wins (the widest one on ties).

When the last level of ``Q`` is empty but ``P`` holds clipped outliers there (a threshold in
an empty gap below a few far outliers), ``Q`` gets ``smoothing`` counts in that bin instead of
making the divergence infinite, as MXNet and ONNX Runtime smooth their distributions; without
this, every threshold between the bulk of the data and the first outlier would be ruled out.

``n_q`` is half the levels of the dtype (128 for int8) for symmetric quantization or data
with negative values, and all of them (256) for non-negative data quantized asymmetrically.
All candidates are evaluated at once from prefix sums (about 20 ms for 2048 bins).
The range is the observed ``(min, max)``, widened to contain 0, clipped to
``[-threshold, threshold]``.
"""

from __future__ import annotations

import numpy as np

from tvmq.calibration.base import HistogramObserver
from tvmq.core.qmath import qrange

__all__ = ["EntropyObserver", "kl_divergences"]


def _xlogx(a: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0)), 0.0)


def kl_divergences(
    hist: np.ndarray, num_quantized_bins: int, smoothing: float = 1e-4
) -> tuple[np.ndarray, np.ndarray]:
    """KL divergence of every TensorRT candidate threshold of a histogram of ``|x|``.

    Parameters
    ----------
    hist : numpy.ndarray
        Counts of ``n >= num_quantized_bins`` bins starting at 0.
    num_quantized_bins : int
        Quantization levels ``n_q`` the candidate distribution is merged into.
    smoothing : float
        Counts given to an empty last level of ``Q`` that must hold clipped outliers.

    Returns
    -------
    candidates : numpy.ndarray
        Bin counts ``i`` from ``n_q`` to ``n``; the threshold of ``i`` is ``i * bin_width``.
    divergences : numpy.ndarray
        ``KL(P_i || Q_i)`` for each candidate.
    """
    h = np.asarray(hist, dtype=np.float64)
    n, nq = len(h), int(num_quantized_bins)
    cand = np.arange(nq, n + 1)
    total = h.sum()
    zero = np.zeros(1)
    csum = np.concatenate([zero, np.cumsum(h)])
    nonzero = np.concatenate([zero, np.cumsum(h > 0)])
    xlogx = np.concatenate([zero, np.cumsum(_xlogx(h))])

    outliers = total - csum[cand]
    last = h[cand - 1] + outliers  # P's last bin, before normalization
    # sum(P log P), P = counts / total
    p_log_p = (xlogx[cand - 1] + _xlogx(last)) / total - np.log(total)

    # Bin j of candidate i belongs to level floor(j * nq / i): level g starts at ceil(g * i / nq).
    g = np.arange(nq + 1)
    bounds = (g[None, :] * cand[:, None] + nq - 1) // nq
    start, stop = bounds[:, :-1], bounds[:, 1:]
    level_sum = csum[stop] - csum[start]  # Q's mass per level (outliers excluded)
    level_nnz = nonzero[stop] - nonzero[start]
    # P's support in the last bin includes the outliers added to it.
    level_nnz[:, -1] += (last > 0).astype(np.int64) - (h[cand - 1] > 0)
    p_mass = level_sum.copy()
    p_mass[:, -1] += outliers
    # Only the last level can be empty under P's mass: smooth it rather than return inf.
    level_sum[:, -1] = np.where(level_sum[:, -1] > 0, level_sum[:, -1], smoothing)
    q_total = csum[cand]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_q = np.log(level_sum) - np.log(np.maximum(level_nnz, 1)) - np.log(q_total)[:, None]
        terms = np.where(p_mass > 0, p_mass * log_q, 0.0)
    p_log_q = terms.sum(axis=1) / total
    kl = p_log_p - p_log_q
    kl[~np.isfinite(kl)] = np.inf
    return cand, np.maximum(kl, 0.0)


class EntropyObserver(HistogramObserver):
    """Threshold that minimizes the KL divergence between float and quantized histograms.

    Parameters
    ----------
    bins : int
        Resolution of the ``|x|`` histogram (TensorRT uses 2048).
    smoothing : float
        See :func:`kl_divergences`.
    label : str, optional
        What is observed, for error messages.
    """

    name = "entropy"

    def __init__(
        self, bins: int = 2048, smoothing: float = 1e-4, *, label: str | None = None
    ) -> None:
        self.bins = int(bins)
        self.smoothing = float(smoothing)
        super().__init__(label=label)

    def _histogram_values(self, x: np.ndarray) -> np.ndarray:
        """|x| without exact zeros (zero is always representable)."""
        a = np.abs(x.ravel())
        return a[a != 0]

    def threshold(self, dtype: str = "int8", symmetric: bool = False) -> float:
        """The chosen clipping magnitude for ``dtype``; ``max |x|`` if no search is possible."""

        amax = max(-self.min_val, self.max_val, 0.0)
        h = self.histogram
        qmin, qmax = qrange(dtype)
        levels = qmax - qmin + 1
        nq = levels // 2 if symmetric or self.min_val < 0 else levels
        if h.width == 0.0 or len(h.counts) <= nq:
            return amax
        cand, kl = kl_divergences(h.counts, nq, self.smoothing)
        if not np.isfinite(kl).any():
            return amax
        best = len(kl) - 1 - int(np.argmin(kl[::-1]))
        return min(float(cand[best]) * h.width, amax)

    def _compute_range(self, dtype: str, symmetric: bool) -> tuple[float, float]:
        t = self.threshold(dtype, symmetric)
        return max(min(self.min_val, 0.0), -t), min(max(self.max_val, 0.0), t)
