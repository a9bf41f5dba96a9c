"""Evaluation data for accuracy control: a ``.npz`` of inputs plus labels or reference outputs.

``load_top1_eval(path, inputs, outputs)`` returns an ``eval_fn(run) -> metric`` for
``tvmq.quantization.quantize_with_accuracy_control``: the top-1 accuracy (percent) of the
first output, argmax over its last axis, against

- ``labels`` (integer class per row) when the file has them,
- else the argmax of reference outputs stored under the model's output names,
- else the argmax of the model's own float outputs (the float model then scores 100).

Rows are fed in chunks of the model's static batch size; a short last chunk is padded with
its own rows, whose predictions are dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from tvmq.errors import TvmqError

__all__ = ["load_top1_eval"]


def _read(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise TvmqError(f"evaluation file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            if isinstance(data, np.ndarray):
                raise TvmqError(f"evaluation file {str(path)!r} must be a .npz (inputs + labels)")
            return {k: data[k] for k in data.files}
    except TvmqError:
        raise
    except Exception as e:  # damaged, pickled, not numpy at all
        raise TvmqError(f"evaluation file {str(path)!r} is not a readable .npz ({e})") from None


def load_top1_eval(path, inputs, outputs) -> Callable[[Callable], float]:
    """``eval_fn(run)``: top-1 accuracy in percent on the evaluation file (see module doc)."""
    path = Path(path)
    arrays = _read(path)
    names = [s.name for s in inputs]
    unnamed = [k for k in arrays if k != "labels" and k not in {s.name for s in outputs}]
    if len(names) == 1 and names[0] not in arrays and len(unnamed) == 1:
        arrays[names[0]] = arrays.pop(unnamed[0])  # one input: its array may have any name
    missing = [n for n in names if n not in arrays]
    if missing:
        raise TvmqError(
            f"evaluation file {str(path)!r} has no array for input(s) {missing}; "
            f"it has {sorted(arrays)}"
        )
    rows = {arrays[n].shape[0] if arrays[n].ndim else 0 for n in names}
    if len(rows) != 1 or 0 in rows:
        raise TvmqError(f"evaluation file {str(path)!r}: inputs need the same number of rows (>0)")
    n = rows.pop()
    feeds = [arrays[s.name].astype(s.dtype, copy=False) for s in inputs]
    for s, x in zip(inputs, feeds, strict=True):
        if len(x.shape) != len(s.shape) or any(
            not isinstance(d, str) and d != g
            for d, g in zip(s.shape[1:], x.shape[1:], strict=False)
        ):  # a symbolic dim (str) takes any size
            raise TvmqError(
                f"evaluation file {str(path)!r}: input {s.name!r} has rows of shape "
                f"{tuple(x.shape[1:])}, the model takes {tuple(s.shape[1:])}"
            )
    target = None
    if "labels" in arrays:
        target = arrays["labels"].reshape(-1)
        if target.shape[0] != n or not np.issubdtype(target.dtype, np.integer):
            raise TvmqError(
                f"evaluation file {str(path)!r}: 'labels' must hold one integer class per row "
                f"({n} rows), got {arrays['labels'].dtype} {arrays['labels'].shape}"
            )
    elif outputs and outputs[0].name in arrays:
        ref = arrays[outputs[0].name]
        if ref.shape[0] != n:
            raise TvmqError(
                f"evaluation file {str(path)!r}: reference output {outputs[0].name!r} has "
                f"{ref.shape[0]} rows, the inputs {n}"
            )
        target = ref.argmax(axis=-1)
    lead = inputs[0].shape[0]
    batch = lead if isinstance(lead, int) else min(n, 32)  # a symbolic batch: 32 rows a call
    cache: dict[str, np.ndarray] = {}

    def predict(run) -> np.ndarray:
        preds = []
        for start in range(0, n, batch):
            chunk = [x[start : start + batch] for x in feeds]
            k = chunk[0].shape[0]
            if k < batch:
                chunk = [np.take(x, np.arange(batch) % k, axis=0) for x in chunk]
            out = run(*chunk)
            first = out[0] if isinstance(out, list | tuple) else out
            preds.append(np.asarray(first).argmax(axis=-1)[:k])
        return np.concatenate(preds)

    def eval_fn(run) -> float:
        pred = predict(run)
        if target is None and "float" not in cache:
            cache["float"] = pred  # the first call is on the float model
        ref = target if target is not None else cache["float"]
        return 100.0 * float((pred == ref).mean())

    return eval_fn
