"""Makers of bad array files (.npz / .npy) shared by the calibration-data and run-input corpora.

Each maker is ``make(path, marker) -> Path``: it writes a file next to ``path`` and returns it;
``marker`` is a file that must never appear (an unpickled :class:`Marker` would create it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class Marker:
    """Creates ``path`` when unpickled: an object array holding it must never be loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def npz(**arrays):
    """An .npz of ``arrays``; a callable value is called with the marker path."""

    def make(path: Path, marker: Path) -> Path:
        np.savez(path, **{k: (v(marker) if callable(v) else v) for k, v in arrays.items()})
        return path

    return make


def npy(array):
    """An .npy of ``array`` (called with the marker path when callable)."""

    def make(path: Path, marker: Path) -> Path:
        path = path.with_suffix(".npy")
        np.save(path, array(marker) if callable(array) else array)
        return path

    return make


def raw(data: bytes, suffix: str = ".npz"):
    """A file holding ``data`` as it is, under ``suffix``."""

    def make(path: Path, marker: Path) -> Path:
        path = path.with_suffix(suffix)
        path.write_bytes(data)
        return path

    return make


def truncated_npz(shape: tuple[int, ...]):
    """The first half of a valid .npz of one float32 array ``x``."""

    def make(path: Path, marker: Path) -> Path:
        np.savez(path, x=np.ones(shape, np.float32))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path

    return make
