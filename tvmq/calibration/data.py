"""Calibration data in any common form, turned into ``{input name: numpy array}`` batches.

Accepted forms of ``data``:

- a numpy array or torch tensor (single-input model): one batch, or ``batch_size`` chunks;
- a dict ``{input name: array}``: one batch holding every input;
- a path to a ``.npz`` (keys are input names; a single array is accepted for a single-input
  model, whatever its key) or a ``.npy`` (single-input model);
- for a model with N > 1 inputs, a tuple/list of exactly N arrays: one batch, in input order;
- otherwise a list/tuple or any iterable of batches (generator, torch ``DataLoader``), where
  each batch is an array/tensor, a dict, or a tuple/list. A tuple/list batch is taken
  positionally; extra trailing items (labels from a labelled loader, ``(x, y)``) are
  ignored, and a batch of the form ``((x1, x2), y)`` gives its first item to a multi-input model.

Dict keys beyond the input names (``"label"``) are ignored; a missing name is an error.
Arrays keep their dtype; tensors are detached and moved to the CPU. Every array must be
numeric (bool, integer or float) and hold at least one value. Files are read with
``allow_pickle=False``: an object array in a file is refused, never unpickled.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from tvmq.errors import TvmqError

__all__ = ["check_calibration_file", "count_batches", "iter_calibration_batches"]

# Errors numpy and zipfile raise for a damaged, truncated or pickled .npy/.npz.
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile)
_NUMERIC_KINDS = "biuf"

_FORMS = (
    "a numpy array, a dict {input name: array}, a .npz/.npy path, a list of batches, "
    "or an iterable of batches such as a torch DataLoader"
)


def iter_calibration_batches(
    data: Any,
    input_names: Sequence[str],
    *,
    batch_size: int | None = None,
    max_batches: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield calibration batches as ``{input name: numpy array}``.

    Parameters
    ----------
    data
        Calibration data in one of the forms listed in the module docstring.
    input_names : sequence of str
        The model's input names, in order.
    batch_size : int, optional
        Split every batch larger than this along axis 0 (all inputs together).
    max_batches : int, optional
        Stop after this many batches.

    Yields
    ------
    dict[str, numpy.ndarray]
        One entry per input name.

    Raises
    ------
    TvmqError
        For an unsupported form, missing input names, mismatched batch sizes, or data that
        yields no batch at all.
    """
    names = _check_names(input_names)
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise TvmqError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise TvmqError(f"max_batches must be a positive integer, got {max_batches!r}")
    batches = (
        chunk
        for raw in _raw_batches(data, names)
        for chunk in _split(_to_batch(raw, names), batch_size)
    )
    count = 0
    for batch in islice(batches, max_batches):
        count += 1
        yield batch
    if count == 0:
        raise TvmqError(f"the calibration data is empty; expected {_FORMS} with at least one batch")


def count_batches(
    data: Any,
    input_names: Sequence[str] | None = None,
    *,
    batch_size: int | None = None,
    max_batches: int | None = None,
) -> int | None:
    """Number of batches :func:`iter_calibration_batches` will yield, or ``None`` if unknown.

    Known without reading the data for arrays, dicts, files, lists and sized iterables
    (a ``DataLoader``); with ``batch_size``, sized iterables of unknown batch size give ``None``.
    """
    n = _count(data, input_names, batch_size)
    if n is not None and max_batches is not None:
        n = min(n, max_batches)
    return n


def check_calibration_file(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """Check a ``.npz``/``.npy`` calibration file from its array headers, without its data.

    For command-line checks before any heavy work: reads each array's header only (shape
    and dtype), so it takes milliseconds whatever the file's size, and never unpickles.

    Returns
    -------
    dict[str, tuple[tuple[int, ...], str]]
        Array name (``""`` for a ``.npy``) -> (shape, dtype name).

    Raises
    ------
    TvmqError
        The file is missing, not a .npz/.npy, damaged, empty, or holds an array that is
        not numeric (strings, objects) or has no values.
    """
    path = Path(path)
    label = f"calibration file {str(path)!r}"
    if not path.is_file():
        raise TvmqError(f"{label} does not exist")
    if path.suffix.lower() not in (".npz", ".npy"):
        raise TvmqError(f"{label} must be a .npz or .npy file")
    try:
        headers = _npz_headers(path) if path.suffix.lower() == ".npz" else {"": _npy_header(path)}
    except _READ_ERRORS as err:
        raise TvmqError(f"cannot read {label}: {_brief(err)}") from None
    if not headers:
        raise TvmqError(f"{label} holds no arrays")
    for name, (shape, dtype) in headers.items():
        where = f"{label}, array {name!r}" if name else label
        _check_values(shape, dtype, where)
    return {n: (shape, dtype.name) for n, (shape, dtype) in headers.items()}


# -- helpers ------------------------------------------------------------------------------


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    with open(path, "rb") as f:
        return _read_header(f)


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    with zipfile.ZipFile(path) as archive:
        headers = {}
        for member in archive.namelist():
            if member.endswith(".npy"):
                with archive.open(member) as f:
                    headers[member[: -len(".npy")]] = _read_header(f)
        return headers


def _read_header(f) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from an open .npy stream's header (numpy's own parser, no data read)."""
    version = np.lib.format.read_magic(f)
    read = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    if version not in read:
        raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported")
    shape, _fortran, dtype = read[version](f)
    return tuple(shape), dtype


def _check_values(shape: tuple[int, ...], dtype: np.dtype, where: str) -> None:
    """Calibration arrays are numeric and hold values: strings or objects cannot be inputs."""
    if dtype.kind not in _NUMERIC_KINDS:
        raise TvmqError(
            f"{where} has dtype {dtype} ({'objects' if dtype.kind == 'O' else 'not numbers'}); "
            "calibration data must be bool, integer or float arrays"
        )
    if math.prod(shape) == 0:
        raise TvmqError(f"{where} is empty (shape {tuple(shape)}); give at least one sample")


def _brief(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _check_names(input_names: Sequence[str]) -> list[str]:
    if isinstance(input_names, str):
        input_names = [input_names]
    names = list(input_names)
    if not names or not all(isinstance(n, str) for n in names):
        raise TvmqError(f"input_names must be a non-empty list of strings, got {input_names!r}")
    return names


def _is_tensor(x: Any) -> bool:
    """A numpy array or anything that converts to one (torch tensors)."""
    return isinstance(x, np.ndarray | np.generic) or (
        hasattr(x, "__array__") and hasattr(x, "shape") and not isinstance(x, Mapping)
    )


def _to_numpy(x: Any, where: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
    if not _is_tensor(x):
        raise TvmqError(f"{where} is a {type(x).__name__}; expected a numpy array or a tensor")
    array = np.asarray(x)
    _check_values(array.shape, array.dtype, where)
    return array


def _is_input_tuple(data: Any, names: list[str]) -> bool:
    """A tuple/list holding one array per input of a multi-input model: a single batch."""
    return (
        len(names) > 1
        and isinstance(data, tuple | list)
        and len(data) == len(names)
        and all(_is_tensor(x) or hasattr(x, "detach") for x in data)
    )


def _raw_batches(data: Any, names: list[str]) -> Iterator[Any]:
    """Yield the batches of ``data`` in whatever form they come."""
    if isinstance(data, str | os.PathLike):
        yield _load_file(Path(data), names)
    elif _is_tensor(data) or hasattr(data, "detach") or isinstance(data, Mapping):
        yield data
    elif _is_input_tuple(data, names):
        yield tuple(data)
    elif isinstance(data, bytes):
        raise TvmqError(f"calibration data of type bytes is not supported; expected {_FORMS}")
    elif isinstance(data, Iterable):
        yield from data
    else:
        raise TvmqError(
            f"calibration data of type {type(data).__name__} is not supported; expected {_FORMS}"
        )


def _load_file(path: Path, names: list[str]) -> Any:
    if not path.is_file():
        raise TvmqError(f"calibration file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".npy"):
        raise TvmqError(f"calibration file {str(path)!r} must be a .npz or .npy file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded:  # a .npz reads (and may fail on) each array only here
            arrays = {key: loaded[key] for key in loaded.files}
    except _READ_ERRORS as err:
        raise TvmqError(f"cannot read calibration file {str(path)!r}: {_brief(err)}") from None
    if len(names) == 1 and len(arrays) == 1:
        return next(iter(arrays.values()))
    missing = [n for n in names if n not in arrays]
    if missing:
        raise TvmqError(
            f"calibration file {str(path)!r} has arrays {sorted(arrays)} but the model's inputs "
            f"are {names}; name the arrays after the inputs (missing: {missing})"
        )
    return arrays


def _to_batch(raw: Any, names: list[str]) -> dict[str, np.ndarray]:
    """Normalize one batch to ``{name: array}``."""
    if isinstance(raw, Mapping):
        missing = [n for n in names if n not in raw]
        if missing:
            raise TvmqError(
                f"a calibration batch has keys {sorted(map(str, raw))} but the model's inputs "
                f"are {names} (missing: {missing})"
            )
        return {n: _to_numpy(raw[n], f"calibration input {n!r}") for n in names}
    if _is_tensor(raw) or hasattr(raw, "detach"):
        if len(names) > 1:
            raise TvmqError(
                f"a calibration batch is a single array but the model has {len(names)} inputs "
                f"{names}; give each batch as a dict or a tuple of arrays in input order"
            )
        return {names[0]: _to_numpy(raw, f"calibration input {names[0]!r}")}
    if isinstance(raw, tuple | list):
        if not raw:
            raise TvmqError("a calibration batch is an empty tuple/list")
        if len(names) == 1:
            # (x, y) from a labelled loader, or a 1-tuple.
            return _to_batch(raw[0], names)
        if len(raw) >= len(names) and all(
            _is_tensor(x) or hasattr(x, "detach") for x in raw[: len(names)]
        ):
            return {
                n: _to_numpy(x, f"calibration input {n!r}")
                for n, x in zip(names, raw, strict=False)
            }
        if isinstance(raw[0], tuple | list | Mapping):
            # ((x1, x2), y) or ({...}, y) from a labelled loader.
            return _to_batch(raw[0], names)
        raise TvmqError(
            f"a calibration batch has {len(raw)} items but the model has {len(names)} inputs "
            f"{names}; give each batch as a dict or a tuple of arrays in input order"
        )
    raise TvmqError(
        f"a calibration batch is a {type(raw).__name__}; expected an array, a tensor, "
        f"a dict {{input name: array}} or a tuple of arrays"
    )


def _split(batch: dict[str, np.ndarray], batch_size: int | None) -> Iterator[dict[str, np.ndarray]]:
    if batch_size is None:
        yield batch
        return
    lengths = {n: (a.shape[0] if a.ndim else None) for n, a in batch.items()}
    if None in lengths.values() or len(set(lengths.values())) != 1:
        raise TvmqError(
            f"batch_size={batch_size} splits inputs along axis 0, but their leading "
            f"dimensions differ or are missing: {lengths}"
        )
    n = next(iter(lengths.values()))
    for i in range(0, max(n, 1), batch_size):
        yield {name: a[i : i + batch_size] for name, a in batch.items()}


def _count(data: Any, input_names: Sequence[str] | None, batch_size: int | None) -> int | None:
    names = _check_names(input_names) if input_names is not None else None

    def chunks(n_rows: int | None) -> int | None:
        if batch_size is None:
            return 1
        return None if n_rows is None else max(1, math.ceil(n_rows / batch_size))

    def rows(x: Any) -> int | None:
        if isinstance(x, Mapping):
            x = next(iter(x.values()), None)
        elif isinstance(x, tuple | list):
            x = x[0] if x else None
        shape = getattr(x, "shape", None)
        return int(shape[0]) if shape else None

    if isinstance(data, str | os.PathLike):
        path = Path(data)
        if batch_size is None:
            return 1
        if not path.is_file():
            return None
        try:
            loaded = np.load(path, mmap_mode="r", allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                return chunks(rows(loaded))
            with loaded:
                return chunks(rows(loaded[loaded.files[0]])) if loaded.files else None
        except _READ_ERRORS:  # reading the batches says what is wrong with the file
            return None
    if _is_tensor(data) or hasattr(data, "detach") or isinstance(data, Mapping):
        return chunks(rows(data))
    if names is not None and _is_input_tuple(data, names):
        return chunks(rows(data))
    if isinstance(data, tuple | list):
        if batch_size is None:
            return len(data)
        counts = [chunks(rows(b)) for b in data]
        return None if None in counts else sum(counts)
    if batch_size is None and hasattr(data, "__len__") and not isinstance(data, Iterator):
        try:
            return len(data)
        except TypeError:
            return None
    return None
