"""Accuracy of a compiled model against labels and the float model's outputs (``tvmq report --eval``).

The evaluation data is a ``.npz`` (or a dict of arrays) with

- one array per model input, named as the input, holding N samples along axis 0, where N
  is a multiple of the model's batch size (axis 0 of the input);
- ``labels`` (optional): the true classes, shape ``(N,)`` (for an output ``(N, classes)``;
  in general the output's shape without its last axis), compared with the argmax of the
  first output;
- ``ref_<output name>`` (optional): the float model's outputs on the same samples, e.g.
  ``ref_output0`` (the names are in ``model.json``'s ``outputs``). A compiled directory does
  not keep the float model, so this is how the report compares with it.

At least one of ``labels`` and a ``ref_`` array is needed; any other key is refused so that
a misspelt name does not go unnoticed.
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path

import numpy as np

from tvmq.core import qmath
from tvmq.errors import TvmqError

__all__ = ["evaluate", "load_eval_data"]

LABELS = "labels"
REF_PREFIX = "ref_"


def load_eval_data(data, manifest) -> dict[str, np.ndarray]:
    """The arrays of ``data`` (a .npz path or a dict), checked against the manifest's names."""
    where = "evaluation data"
    if isinstance(data, str | os.PathLike):
        path = Path(data)
        where = str(path)
        if not path.is_file():
            raise TvmqError(f"{path}: no such file (give a .npz of inputs and labels or ref_*)")
        try:
            z = np.load(path, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not a .npz archive of named arrays")
            with z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise TvmqError(f"{path}: not a readable .npz file ({e})") from None
    elif isinstance(data, dict):
        arrays = {str(k): np.asarray(v) for k, v in data.items()}
    else:
        raise TvmqError(f"evaluation data must be a .npz path or a dict, got {type(data).__name__}")
    inputs = [s.name for s in manifest.inputs]
    refs = [REF_PREFIX + s.name for s in manifest.outputs]
    missing = [n for n in inputs if n not in arrays]
    unknown = sorted(set(arrays) - set(inputs) - set(refs) - {LABELS})
    if missing or unknown:
        raise TvmqError(
            f"{where}: {'no array for input(s) ' + str(missing) if missing else ''}"
            f"{'; ' if missing and unknown else ''}"
            f"{'unknown key(s) ' + str(unknown) if unknown else ''}; expected the inputs "
            f"{inputs}, '{LABELS}' and/or the float outputs {refs}"
        )
    if LABELS not in arrays and not any(r in arrays for r in refs):
        raise TvmqError(f"{where}: give '{LABELS}' or the float model's outputs {refs}")
    for k, a in arrays.items():
        if a.dtype.kind not in "biuf" or a.ndim == 0:
            raise TvmqError(f"{where}: '{k}' must be a numeric array with a sample axis")
    return arrays


_SYMBOLIC_BATCH = 32  # samples per call for a model with a symbolic batch dim


def _batches(arrays: dict[str, np.ndarray], manifest, where: str) -> tuple[int, int]:
    """(N samples, model batch size) after checking every input's shape and dtype."""
    n = None
    batch = None
    for spec in manifest.inputs:
        a = arrays[spec.name]
        lead = spec.shape[0] if spec.shape else 1
        b = lead if isinstance(lead, int) else _SYMBOLIC_BATCH  # a dynamic batch: any rows
        rest_ok = len(a.shape) == len(spec.shape) and all(
            isinstance(d, str) or d == g for d, g in zip(spec.shape[1:], a.shape[1:], strict=True)
        )
        if not spec.shape or not rest_ok or (isinstance(lead, int) and a.shape[0] % b):
            raise TvmqError(
                f"{where}: input '{spec.name}' has shape {a.shape}; the model takes "
                f"{tuple(spec.shape)}: give N x {tuple(spec.shape[1:])} with N a multiple of {b}"
            )
        if str(a.dtype) != spec.dtype:
            raise TvmqError(
                f"{where}: input '{spec.name}' is {a.dtype}, the model takes {spec.dtype}"
            )
        if n is not None and a.shape[0] != n:
            raise TvmqError(f"{where}: the inputs hold different numbers of samples")
        n, batch = a.shape[0], b
    return n, batch


def _run_all(model, arrays, n: int, batch: int) -> list[np.ndarray]:
    """The model's outputs on all N samples, one model batch at a time, concatenated."""
    outs: list[list[np.ndarray]] = [[] for _ in model.outputs]
    names = [s.name for s in model.inputs]
    for i in range(0, n, batch):
        got = model(**{k: arrays[k][i : i + batch] for k in names})
        for j, y in enumerate(got if isinstance(got, tuple) else (got,)):
            outs[j].append(y)
    return [np.concatenate(o, axis=0) for o in outs]


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def evaluate(model, data) -> dict:
    """Accuracy of a loaded compiled model on evaluation data (see the module docstring).

    Returns a JSON-ready dict: ``samples``; per output with a reference, its ``sqnr_db``
    (None when equal), ``max_abs_error`` and ``top1_agreement`` with the float model; with
    labels, ``accuracy`` and (given ``ref_`` of the first output) ``float_accuracy``.
    """
    where = str(data) if isinstance(data, str | os.PathLike) else "evaluation data"
    arrays = load_eval_data(data, model.manifest)
    n, batch = _batches(arrays, model.manifest, where)
    outs = _run_all(model, arrays, n, batch)
    result: dict = {"samples": int(n), "outputs": []}
    for spec, got in zip(model.outputs, outs, strict=True):
        ref = arrays.get(REF_PREFIX + spec.name)
        if ref is None:
            continue
        if ref.shape != got.shape:
            raise TvmqError(
                f"{where}: '{REF_PREFIX}{spec.name}' has shape {ref.shape}, the model's "
                f"outputs on those samples have {got.shape}"
            )
        row = {
            "name": spec.name,
            "sqnr_db": _finite(qmath.sqnr(ref, got)),
            "max_abs_error": float(np.max(np.abs(ref.astype(np.float64) - got))),
        }
        if got.ndim >= 2 and got.shape[-1] > 1:
            row["top1_agreement"] = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
        result["outputs"].append(row)
    labels = arrays.get(LABELS)
    if labels is not None:
        first = outs[0]
        if labels.shape != first.shape[:-1] or labels.dtype.kind not in "iu":
            raise TvmqError(
                f"{where}: '{LABELS}' must be integer classes of shape {first.shape[:-1]} "
                f"(the first output is {first.shape}), got {labels.dtype} {labels.shape}"
            )
        result["accuracy"] = float(np.mean(first.argmax(-1) == labels))
        ref = arrays.get(REF_PREFIX + model.outputs[0].name)
        if ref is not None:
            result["float_accuracy"] = float(np.mean(ref.argmax(-1) == labels))
    return result
