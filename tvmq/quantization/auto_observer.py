"""``observer="auto"``: choose the calibration observer by the quantized model's output SQNR.

Calibration ran once with :class:`~tvmq.calibration.AutoObserver` on the tensors whose
observer is ``"auto"``, so every candidate's range is known. For each candidate this module
quantizes the model with that candidate's ranges, compiles it for the host with TVM's stock
pipeline and measures its output SQNR against the float model on the first calibration
batch; the candidate with the best worst-output SQNR is set on every ``auto`` observer.
One choice per model (a per-tensor search would need a build per tensor and candidate);
it costs one host build per candidate.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import tvm

from tvmq.calibration.auto import CANDIDATES, AutoObserver
from tvmq.quantization.collect import ActivationStats
from tvmq.quantization.report import FirstBatch, host_output_sqnr

__all__ = ["choose_auto_observers"]


def choose_auto_observers(
    stats: ActivationStats,
    quantize_with: Callable[[], tvm.IRModule],
    input_names: list[str],
    *,
    progress: bool = False,
) -> dict | None:
    """Set the best candidate on every ``auto`` observer of ``stats``.

    ``quantize_with()`` returns the quantized module for the observers' current choice.
    Returns ``{"chosen": name, "output_sqnr_db": {candidate: [dB per output]}}``, or None
    when no observer is ``auto``.
    """
    autos = [obs for obs in stats.observers.values() if isinstance(obs, AutoObserver)]
    if not autos:
        return None
    batch = FirstBatch.of(stats)
    measured: dict[str, list[float]] = {}
    for name in CANDIDATES:
        for obs in autos:
            obs.choose(name)
        measured[name] = host_output_sqnr(quantize_with(), batch, input_names)
    best = max(CANDIDATES, key=lambda n: min(measured[n]))
    for obs in autos:
        obs.choose(best)
    if progress:

        def db(values):
            worst = min(values)
            return "inf" if math.isinf(worst) else f"{worst:.1f}"

        others = ", ".join(f"{n} {db(measured[n])}" for n in CANDIDATES if n != best)
        print(
            f"tvmq: observer auto chose {best}: output SQNR {db(measured[best])} dB ({others})",
            file=sys.stderr,
        )
    return {"chosen": best, "output_sqnr_db": measured}
