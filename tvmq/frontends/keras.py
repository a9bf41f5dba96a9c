"""Keras 3 files (``.keras``, legacy ``.h5``) -> Relax, through Keras's torch backend.

On the torch backend a Keras 3 model *is* a ``torch.nn.Module`` whose ``forward`` runs the
layers with torch ops, so the file is loaded with Keras itself and compiled like any PyTorch
module (``torch.export`` -> :func:`tvmq.frontends.pytorch.from_pytorch`): no converter of
our own, and the numbers are Keras's. Keras picks its backend once, at import, from
``KERAS_BACKEND``: tvmq sets it for that import only and puts the caller's environment back.
If the process already imported Keras with another backend, the file is refused with a
one-line hint (Keras cannot switch a running process to torch safely).

Loading runs no code from the file: ``keras.saving.load_model(..., safe_mode=True)`` refuses
``Lambda`` layers (Python bytecode in the file) for both formats, and tvmq reports that in
one line. Custom layer classes are not registered, so a file that needs them is refused too.

Shapes: a ``None`` batch dimension becomes 1 unless ``input_shapes`` gives the shape (by the
Keras input's name); any other ``None`` dimension must be given there.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tvmq.errors import TvmqError
from tvmq.frontends.model import ImportedModel

__all__ = ["from_keras", "load_keras"]

EXTRA_HINT = "reading Keras files needs the tflite extra: pip install 'tvmq[tflite]'"
SUFFIXES = (".keras", ".h5", ".hdf5")


def _keras_on_torch():
    """The ``keras`` module, imported on the torch backend without changing os.environ."""
    loaded = sys.modules.get("keras")
    if loaded is None:
        before = os.environ.get("KERAS_BACKEND")
        os.environ["KERAS_BACKEND"] = "torch"
        try:
            import keras
        except ImportError:
            raise TvmqError(EXTRA_HINT) from None
        finally:
            if before is None:
                os.environ.pop("KERAS_BACKEND", None)
            else:
                os.environ["KERAS_BACKEND"] = before
        loaded = keras
    backend = loaded.backend.backend()
    if backend != "torch":
        raise TvmqError(
            f"keras is already imported in this process with the {backend!r} backend; tvmq "
            "loads Keras files on the torch backend (set KERAS_BACKEND=torch before importing "
            "keras, or use a fresh process)"
        )
    return loaded


def load_keras(path: str | os.PathLike):
    """The Keras model in ``path`` (safe mode: a file with code in it is refused)."""
    label = os.fspath(path)
    keras = _keras_on_torch()
    try:
        return keras.saving.load_model(label, compile=False, safe_mode=True)
    except Exception as err:
        text = " ".join(str(err).split())
        if "safe_mode" in text or "Lambda" in text:
            raise TvmqError(
                f"{label}: the file holds Python code (a Lambda layer), which tvmq never "
                "runs; rebuild the model without Lambda layers"
            ) from None
        raise TvmqError(
            f"{label}: Keras could not load the file ({type(err).__name__}: {text[:300]})"
        ) from None


def from_keras(
    path: str | os.PathLike, input_shapes: dict[str, Sequence[int]] | None = None
) -> ImportedModel:
    """Import a ``.keras`` / ``.h5`` file as a Relax module (weights as constants)."""
    import torch

    from tvmq.frontends.pytorch import from_pytorch

    label = os.fspath(path)
    model = load_keras(path)
    shapes = dict(input_shapes or {})
    names, examples = [], []
    for inp in model.inputs:
        name = inp.name
        shape = shapes.pop(name, None)
        if shape is None:
            shape = [1 if (d is None and i == 0) else d for i, d in enumerate(inp.shape)]
            if any(d is None for d in shape):
                raise TvmqError(
                    f"{label}: input {name!r} has shape {list(inp.shape)}; give its static "
                    f"shape with --input-shape {name}=..."
                )
        names.append(name)
        examples.append(torch.zeros([int(d) for d in shape], dtype=getattr(torch, inp.dtype)))
    if shapes:
        raise TvmqError(
            f"{label}: a shape is given for {sorted(shapes)[0]!r}, which is not an input; "
            f"the inputs are {names}"
        )
    model.eval()  # a torch.nn.Module on this backend
    imported = from_pytorch(model, tuple(examples), input_names=names)
    imported.source = "keras"
    imported.meta["keras_file"] = Path(label).name
    return imported
