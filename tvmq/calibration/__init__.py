"""Calibration: observers that turn activation statistics into quantization ranges.

``get_observer("minmax" | "moving_average" | "percentile" | "entropy" | "mse", **options)``
returns a fresh observer (``"auto"``: one of each kind, for the quantizer to choose from);
``iter_calibration_batches`` turns any supported form of calibration data into
``{input name: array}`` batches.
"""

from tvmq.calibration.auto import AutoObserver
from tvmq.calibration.base import Histogram, Observer, get_observer, list_observers
from tvmq.calibration.data import check_calibration_file, count_batches, iter_calibration_batches
from tvmq.calibration.entropy import EntropyObserver
from tvmq.calibration.minmax import MinMaxObserver
from tvmq.calibration.moving_average import MovingAverageMinMaxObserver
from tvmq.calibration.mse import MSEObserver
from tvmq.calibration.percentile import PercentileObserver

__all__ = [
    "AutoObserver",
    "EntropyObserver",
    "Histogram",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "PercentileObserver",
    "check_calibration_file",
    "count_batches",
    "get_observer",
    "iter_calibration_batches",
    "list_observers",
]
