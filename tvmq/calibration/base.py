"""The ``Observer`` interface, the observer registry and the histogram the observers share.

An observer watches one activation tensor across calibration batches (``update``) and then
says which float range to quantize it with (``range``, ``qparams``). Observers are
per-tensor; per-channel weight ranges are plain min/max along an axis, computed by the
passes. Observers hold only numpy arrays and floats, so they pickle (to resume calibration).

Add an observer by subclassing :class:`Observer` with a class attribute ``name``; it is
registered on definition and reachable through :func:`get_observer`.
"""

from __future__ import annotations

import copy
import inspect
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from tvmq.core.observers import register_observer_name
from tvmq.core.qmath import choose_qparams
from tvmq.errors import TvmqError

__all__ = ["Observer", "get_observer", "list_observers"]

_REGISTRY: dict[str, type[Observer]] = {}


class Observer(ABC):
    """Collects statistics of one tensor over calibration batches and picks its float range.

    Parameters
    ----------
    label : str, optional
        What is observed (e.g. a tensor name); used in error messages.
    """

    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is not None:
            if name in _REGISTRY and _REGISTRY[name] is not cls:
                raise TypeError(f"observer name {name!r} is already registered")
            _REGISTRY[name] = cls
            register_observer_name(name)

    def __init__(self, *, label: str | None = None) -> None:
        self.label = label
        self.reset()

    # -- public API -------------------------------------------------------------------------

    def update(self, x) -> None:
        """Accumulate the statistics of one batch of the observed tensor.

        Parameters
        ----------
        x : array_like
            Any shape; empty arrays are ignored. NaN or inf raise :class:`TvmqError`.
        """
        arr = np.asarray(x)
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise TvmqError(
                f"{self._who()} got values of dtype {arr.dtype}; it observes numeric tensors"
            )
        if arr.size == 0:
            return
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise TvmqError(
                f"{self._who()} got NaN or inf values in calibration batch "
                f"{self.num_batches + 1}; check the calibration data and the float model "
                "(a float model that overflows cannot be quantized)"
            )
        if not np.issubdtype(arr.dtype, np.floating) or arr.dtype == np.float16:
            arr = arr.astype(np.float32)
        self._update(arr)
        self.num_batches += 1
        self._cache.clear()

    def range(self) -> tuple[float, float]:
        """Return the calibrated ``(min, max)`` to quantize with (int8, asymmetric).

        Raises
        ------
        TvmqError
            When no batch has been observed yet.
        """
        return self._cached_range("int8", False)

    def qparams(self, dtype: str = "int8", symmetric: bool = False) -> tuple[float, int]:
        """Return ``(scale, zero_point)`` for ``dtype``, via ``choose_qparams``.

        Observers that search for a range (entropy, mse) search for this dtype and symmetry.
        """
        lo, hi = self._cached_range(dtype, symmetric)
        scale, zp = choose_qparams(lo, hi, dtype=dtype, symmetric=symmetric)
        return float(scale), int(zp)

    def reset(self) -> None:
        """Forget every batch observed so far."""
        self.num_batches = 0
        self._cache: dict[tuple[str, bool], tuple[float, float]] = {}
        self._reset()

    # -- for subclasses ---------------------------------------------------------------------

    @abstractmethod
    def _update(self, x: np.ndarray) -> None:
        """Accumulate a non-empty, finite, floating-point batch."""

    @abstractmethod
    def _reset(self) -> None:
        """Clear the accumulated statistics."""

    @abstractmethod
    def _compute_range(self, dtype: str, symmetric: bool) -> tuple[float, float]:
        """Return the range for ``dtype``/``symmetric``; at least one batch has been seen."""

    # -- helpers ----------------------------------------------------------------------------

    def _cached_range(self, dtype: str, symmetric: bool) -> tuple[float, float]:
        if self.num_batches == 0:
            raise TvmqError(
                f"{self._who()} has seen no calibration data; call update() with at least "
                "one batch (is the calibration data empty?)"
            )
        key = (dtype, bool(symmetric))
        if key not in self._cache:
            lo, hi = self._compute_range(dtype, bool(symmetric))
            self._cache[key] = (float(lo), float(hi))
        return self._cache[key]

    def _who(self) -> str:
        return f"observer {getattr(self, 'name', type(self).__name__)!r}" + (
            f" for {self.label}" if self.label else ""
        )

    def __repr__(self) -> str:
        params = inspect.signature(type(self).__init__).parameters
        args = ", ".join(
            f"{p}={getattr(self, p)!r}"
            for p in params
            if p not in ("self", "label") and hasattr(self, p)
        )
        return f"{type(self).__name__}({args})"


def list_observers() -> list[str]:
    """Return the names :func:`get_observer` accepts, sorted."""
    return sorted(_REGISTRY)


def get_observer(spec: str | Observer | type[Observer], **kwargs: Any) -> Observer:
    """Return a new observer.

    Parameters
    ----------
    spec : str, Observer subclass, or Observer
        A registered name (see :func:`list_observers`; ``-`` and ``_`` are interchangeable),
        a class, or an instance to copy (configuration kept, statistics cleared).
    **kwargs
        Options of the observer's constructor (e.g. ``percentile=99.9``, ``label="conv1"``).

    Returns
    -------
    Observer
        A fresh object on every call, so observers are never shared between tensors.
    """
    if isinstance(spec, Observer):
        obs = copy.deepcopy(spec)
        for key, value in kwargs.items():
            if key != "label":
                raise TvmqError(
                    f"cannot pass option {key!r} together with an observer instance; "
                    "configure the instance instead"
                )
            obs.label = value
        obs.reset()
        return obs
    if isinstance(spec, str):
        key = spec.strip().lower().replace("-", "_")
        if key not in _REGISTRY:
            raise TvmqError(
                f"unknown observer {spec!r}; known observers: {', '.join(list_observers())}"
            )
        cls = _REGISTRY[key]
    elif isinstance(spec, type) and issubclass(spec, Observer):
        cls = spec
    else:
        raise TvmqError(
            f"an observer must be a name ({', '.join(list_observers())}), an Observer "
            f"subclass or instance, not {type(spec).__name__}"
        )
    accepted = [
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
        or p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    ]
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        options = ", ".join(a for a in accepted if a != "self")
        raise TvmqError(
            f"observer {getattr(cls, 'name', cls.__name__)!r} has no option "
            f"{', '.join(map(repr, unknown))}; its options are: {options}"
        )
    return cls(**kwargs)


class Histogram:
    """Counts of values on a grid anchored at 0 that widens as the data range grows.

    Bin ``k`` covers ``[k * width, (k + 1) * width)`` and the grid always contains bin 0, so
    its range includes 0 like every quantization range. When new data falls outside, bins are
    appended; when that would exceed ``max_bins``, the width doubles and pairs of bins merge.
    Merging pairs is exact, so the histogram equals the one the final width would have built
    from the start; after the first batch it has between ``max_bins / 2`` and ``max_bins`` bins
    across the data's range.
    """

    def __init__(self, max_bins: int) -> None:
        if max_bins < 8:
            raise TvmqError(f"a histogram needs at least 8 bins, got {max_bins}")
        self.max_bins = int(max_bins)
        self.width = 0.0  # 0 until a non-zero value sets the scale
        self.start = 0  # index k of counts[0]
        self.counts = np.zeros(1, dtype=np.float64)
        self._pending_zeros = 0

    @property
    def total(self) -> float:
        return float(self.counts.sum()) + self._pending_zeros

    def edges(self) -> np.ndarray:
        """Bin edges, ``len(counts) + 1`` of them."""
        return (self.start + np.arange(len(self.counts) + 1)) * self.width

    def add(self, values: np.ndarray) -> None:
        """Count finite ``values`` (any shape)."""
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            return
        lo, hi = float(v.min()), float(v.max())
        if self.width == 0.0:
            span = max(hi, 0.0) - min(lo, 0.0)
            if span == 0.0:
                self._pending_zeros += v.size
                return
            # max_bins - 2 leaves room for the floor of both ends.
            self.width = span / (self.max_bins - 2)
            self.counts[0] += self._pending_zeros
            self._pending_zeros = 0
        while True:
            k_lo = min(math.floor(lo / self.width), self.start)
            k_hi = max(math.floor(hi / self.width), self.start + len(self.counts) - 1)
            if k_hi - k_lo + 1 <= self.max_bins:
                break
            self._double()
        self._extend(k_lo, k_hi)
        k = np.floor(v / self.width).astype(np.int64) - self.start
        # Guard against floor() landing one bin off at an edge in floating point.
        np.clip(k, 0, len(self.counts) - 1, out=k)
        self.counts += np.bincount(k, minlength=len(self.counts))

    def _double(self) -> None:
        ks = self.start + np.arange(len(self.counts))
        new_start = self.start // 2
        self.counts = np.bincount(ks // 2 - new_start, weights=self.counts)
        self.start = new_start
        self.width *= 2.0

    def _extend(self, k_lo: int, k_hi: int) -> None:
        left = self.start - k_lo
        right = k_hi - (self.start + len(self.counts) - 1)
        if left > 0 or right > 0:
            self.counts = np.pad(self.counts, (max(left, 0), max(right, 0)))
            self.start = min(self.start, k_lo)


class HistogramObserver(Observer):
    """Base of the observers that search a histogram: keeps the running min/max and a
    histogram (of ``bins`` bins) of :meth:`_histogram_values` of every batch."""

    bins: int

    def _reset(self) -> None:
        self.histogram = Histogram(self.bins)
        self.min_val = np.inf
        self.max_val = -np.inf

    def _update(self, x: np.ndarray) -> None:
        self.min_val = min(self.min_val, float(x.min()))
        self.max_val = max(self.max_val, float(x.max()))
        self.histogram.add(self._histogram_values(x))

    def _histogram_values(self, x: np.ndarray) -> np.ndarray:
        """What goes into the histogram; the values themselves by default."""
        return x
