"""Frontends: PyTorch, ONNX, TFLite, Keras and Relax models, all imported as ``ImportedModel``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tvmq.errors import TvmqError
from tvmq.frontends.model import ImportedModel, TensorSpec, signature_of

__all__ = ["ImportedModel", "TensorSpec", "import_model", "signature_of"]


def import_model(
    model,
    *,
    example_inputs=None,
    input_shapes: dict[str, Sequence[int | str]] | None = None,
    input_names: Sequence[str] | None = None,
) -> ImportedModel:
    """Import any supported model form into Relax.

    ``model`` may be a ``torch.nn.Module`` (needs ``example_inputs``), a
    ``torch.export.ExportedProgram`` or a path to one saved with ``torch.export.save``
    (``.pt2``), an ONNX file path or ``onnx.ModelProto`` (dynamic dimensions stay symbolic;
    ``input_shapes`` pins them with ints or names them with strs), a ``.tflite`` file, a
    Keras 3 ``.keras`` / ``.h5`` file (the ``tflite`` extra), a ``tvm.IRModule`` (its
    ``main``'s dims static or named ``tirx.Var``), or an ``ImportedModel``.
    """
    import tvm

    if isinstance(model, ImportedModel):
        return model
    if isinstance(model, tvm.IRModule):
        if not any(gv.name_hint == "main" for gv in model.get_global_vars()):
            raise TvmqError("the IRModule has no 'main' function to compile")
        inputs, outputs = signature_of(model["main"], list(input_names) if input_names else None)
        return ImportedModel(model, inputs, outputs, source="relax")
    if isinstance(model, str | os.PathLike):
        path = Path(model)
        if not path.exists():
            raise TvmqError(f"{path}: no such file")
        if path.is_dir():
            raise TvmqError(
                f"{path}: is a directory, not a model file (.onnx, .tflite, .keras, .h5, or .pt2 "
                "saved with torch.export.save); a tvmq compile output is read by run, bench "
                "and inspect"
            )
        if path.suffix == ".onnx":
            from tvmq.frontends.onnx import from_onnx

            return from_onnx(path, input_shapes)
        if path.suffix == ".pt2":
            from tvmq.frontends.pt2 import load_exported_program
            from tvmq.frontends.pytorch import from_exported

            # Never torch.export.load directly: it unpickles (see tvmq.frontends.pt2).
            model = from_exported(load_exported_program(path), input_names=input_names)
            _check_fixed_shapes(path, model, input_shapes, "a .pt2 program")
            return model
        if path.suffix in (".keras", ".h5", ".hdf5"):
            from tvmq.frontends.keras import from_keras

            return from_keras(path, input_shapes)
        if path.suffix == ".tflite":
            from tvmq.frontends.tflite import from_tflite

            model = from_tflite(path)
            _check_fixed_shapes(path, model, input_shapes, "a .tflite file")
            return model
        raise TvmqError(
            f"{path}: unknown model format {path.suffix!r}; tvmq reads .onnx, .tflite, Keras "
            "(.keras, .h5) and .pt2 files saved with torch.export.save (or a torch.nn.Module "
            "from Python)"
        )
    try:
        import onnx

        if isinstance(model, onnx.ModelProto):
            from tvmq.frontends.onnx import from_onnx

            return from_onnx(model, input_shapes)
    except ImportError:
        pass
    import torch

    if isinstance(model, torch.export.ExportedProgram):
        from tvmq.frontends.pytorch import from_exported

        return from_exported(model, input_names=input_names)
    if isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise TvmqError("a torch.nn.Module needs example_inputs to fix its input shapes")
        from tvmq.frontends.pytorch import from_pytorch

        return from_pytorch(model, example_inputs, input_names=input_names)
    raise TvmqError(f"cannot import a {type(model).__name__}; see tvmq.import_model's docstring")


def _check_fixed_shapes(
    path: Path, model: ImportedModel, input_shapes: dict[str, Sequence[int]] | None, what: str
) -> None:
    """A .pt2 program's or .tflite file's shapes are fixed: input_shapes may only restate them."""
    specs = {s.name: s.shape for s in model.inputs}
    for name, shape in (input_shapes or {}).items():
        if name not in specs:
            raise TvmqError(
                f"{path}: a shape is given for {name!r}, which is not an input; "
                f"the inputs are {sorted(specs)}"
            )
        if tuple(shape) != specs[name]:
            raise TvmqError(
                f"{path}: input {name!r} was exported with shape {list(specs[name])}; {what}'s "
                f"shapes are fixed at export, so it cannot take {list(shape)}"
            )
