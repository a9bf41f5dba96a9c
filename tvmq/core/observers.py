"""Names of calibration observers, so that a scheme can check its ``observer`` field.

The observer classes are calibration code and live in ``tvmq.calibration`` (driver layer);
each registers its name here when its class is defined (``Observer.__init_subclass__``).
The built-in names are listed too, so a scheme validates without importing calibration.
"""

from __future__ import annotations

BUILTIN_OBSERVERS = ("auto", "entropy", "minmax", "moving_average", "mse", "percentile")

_names: set[str] = set(BUILTIN_OBSERVERS)


def register_observer_name(name: str) -> None:
    """Record that an observer called `name` exists (called by ``tvmq.calibration``)."""
    _names.add(name)


def observer_names() -> list[str]:
    """Every known observer name, sorted."""
    return sorted(_names)


def normalize_observer_name(name: str) -> str:
    """``"Moving-Average"`` -> ``"moving_average"`` (the spelling the registry uses)."""
    return name.strip().lower().replace("-", "_")
