"""``tvmq.compile``: model -> Relax -> compression passes -> build -> deployable directory."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tvm

from tvmq.core.compression import SparseConfig
from tvmq.errors import TvmqError
from tvmq.frontends import ImportedModel, import_model
from tvmq.frontends.model import check_finite_weights
from tvmq.manifest import LIBRARY, Manifest, sha256_of
from tvmq.output import OutputFolder
from tvmq.targets import TargetPreset, get_target


@dataclass
class CompiledArtifact:
    """What ``compile`` produced: ordinary TVM objects plus the manifest."""

    executable: tvm.relax.Executable
    mod: tvm.IRModule  # the Relax module after tvmq's passes, before lowering
    manifest: Manifest
    output_dir: Path | None


def versions() -> dict:
    """tvmq and TVM versions, recorded in every manifest."""
    from tvmq import __version__

    return {"tvmq": __version__, "tvm": tvm.__version__}


def scheme_for_target(quantize, preset: TargetPreset):
    """The quantization scheme to use on ``preset`` for a scheme name or object.

    A name gets the target's preferred form: x86 with VNNI multiplies u8 x s8, so
    ``"int8"`` there means uint8 activations (no run-time sign flip before each kernel).
    A scheme object is used as given.
    """
    import dataclasses

    from tvmq.passes.pack_int8_dense_x86 import target_has_vnni
    from tvmq.quantization import Int8Static, get_scheme

    scheme = get_scheme(quantize)
    if (
        isinstance(quantize, str)
        and isinstance(scheme, Int8Static)
        and target_has_vnni(preset.tvm_target())
    ):
        scheme = dataclasses.replace(scheme, activation_dtype="uint8")
    return scheme


def _compress(
    model: ImportedModel,
    preset: TargetPreset,
    *,
    prune=None,
    cluster=None,
    sparse=None,
    quantize=None,
    calibration_data=None,
    progress: bool = True,
):
    """Apply the requested compression in order: prune, cluster, sparse kernels, quantize.

    Returns the new model, what was applied (for the manifest) and notes.
    """
    from tvmq.passes.canonicalize_qdq import has_qdq

    applied: dict = {}
    notes: dict = {}
    if has_qdq(model.mod):
        return _lower_prequantized(model, prune, cluster, quantize)
    if cluster is not None and quantize is not None:
        raise TvmqError(
            "weight clustering and quantization cannot be combined yet: clustered weights "
            "are decoded at run time, so the quantizer finds no constant weights"
        )
    if prune is not None or cluster is not None:
        from tvmq.compression import apply_compression

        mod, report = apply_compression(model.mod, prune=prune, cluster=cluster)
        model = ImportedModel(mod, model.inputs, model.outputs, model.source, model.meta)
        if report["prune"]:
            applied["prune"] = report["prune"]
        if report["cluster"]:
            applied["cluster"] = report["cluster"]
        notes["compression"] = {k: report[k] for k in ("before", "after", "sparsity")}
    if sparse is not None:
        # Before quantization: BSR layers stay float32, the quantizer takes the dense rest.
        from tvmq.passes import SPARSE_ATTR, SparseDense

        mod = SparseDense(sparse.min_sparsity, sparse.block, preset.tvm_target())(model.mod)
        model = ImportedModel(mod, model.inputs, model.outputs, model.source, model.meta)
        decisions = mod["main"].attrs.get(SPARSE_ATTR, []) if mod["main"].attrs else []
        applied["sparse"] = {
            "min_sparsity": sparse.min_sparsity,
            "block": list(sparse.block),
            "layers": [{str(k): _plain(v) for k, v in d.items()} for d in decisions],
        }
    if quantize is not None:
        from tvmq.quantization import quantize as run_quantize

        result = run_quantize(model, calibration_data, quantize, progress=progress)
        model = result.model
        applied["quantize"] = result.describe()
        notes["float_ops"] = list(result.float_ops)
    return model, applied, notes


def _plain(value):
    """TVM FFI containers and strings as plain JSON values."""
    if isinstance(value, str | bool | int | float) or value is None:
        return value if not isinstance(value, str) else str(value)
    try:
        return [_plain(v) for v in value]
    except TypeError:
        return str(value)


def _lower_prequantized(model: ImportedModel, prune, cluster, quantize):
    """An already-quantized model (ONNX QDQ): lower its QDQ regions, no calibration."""
    from tvmq.passes import CanonicalizeQDQ, static_int8_passes
    from tvmq.passes.analysis import float_compute_ops

    if quantize is not None or prune is not None or cluster is not None:
        raise TvmqError(
            "the model is already quantized (it holds QuantizeLinear/DequantizeLinear); "
            "compile it without --quantize, --prune or --cluster"
        )
    mod = static_int8_passes()(CanonicalizeQDQ()(model.mod))
    float_ops = float_compute_ops(mod["main"])
    model = ImportedModel(mod, model.inputs, model.outputs, model.source, model.meta)
    return (
        model,
        {"quantize": {"scheme": "onnx-qdq", "float_ops": float_ops}},
        {"float_ops": float_ops},
    )


def compile(  # noqa: A001 - the user-facing verb, like torch.compile / tvm.compile
    model,
    target: str | TargetPreset = "host",
    *,
    output_dir: os.PathLike | None = None,
    example_inputs=None,
    input_shapes: dict[str, Sequence[int]] | None = None,
    input_names: Sequence[str] | None = None,
    prune=None,
    cluster=None,
    sparse=None,
    quantize=None,
    calibration_data=None,
    overwrite: bool = True,
    progress: bool = True,
    tuning_logs="auto",
) -> CompiledArtifact:
    """Compile a model for a hardware target, optionally compressing it first.

    Parameters
    ----------
    model
        A ``torch.nn.Module`` (with ``example_inputs``), an ONNX file or ``ModelProto``
        (``input_shapes`` fixes dynamic dimensions), a ``.pt2`` file, a ``tvm.IRModule``
        or an ``ImportedModel``.
    target : str or TargetPreset
        A preset name (``tvmq targets`` lists them), a path to a preset JSON file, or a preset.
    output_dir : path, optional
        Where to write ``model.so`` + ``model.json``. Written atomically: a failed build
        leaves nothing behind, and an existing tvmq output there is replaced only on success.
        Only files tvmq wrote are ever replaced: a folder holding a tvmq build keeps the
        user's other files; a non-empty folder without one is refused.
    overwrite : bool
        Whether a tvmq build already in ``output_dir`` may be replaced.
    prune : PruneConfig or list of PruneConfig, optional
        Magnitude, N:M or channel pruning (``tvmq.compression.PruneConfig``), applied first.
    cluster : ClusterConfig, optional
        Weight sharing into ``2**bits`` values per tensor (``tvmq.compression.ClusterConfig``).
    sparse : SparseConfig, float or True, optional
        Run float matmuls whose constant weight is block-sparse enough (e.g. after
        ``prune``) on tvmq's BSR kernels; a float is the minimum block sparsity.
    quantize : str or scheme, optional
        ``"int8"``, ``"int8-dynamic"``, ``"w8"``, ``"w4"`` or a scheme object from
        ``tvmq.quantization``; static schemes need ``calibration_data``.
    tuning_logs : "auto", path, Database, list of them, or None
        MetaSchedule records to apply. ``"auto"``: ``./tuning_logs/<target>/`` and the logs
        shipped with tvmq; kernels without a record get tvmq's default schedule.

    Returns
    -------
    CompiledArtifact
        The ``tvm.relax.Executable``, the compressed Relax module and the manifest.
    """
    from tvmq.build import build_with_info

    preset = get_target(target)
    # checked before the long build: a folder that is not ours fails fast
    folder = OutputFolder.open(output_dir, overwrite) if output_dir is not None else None
    imported = import_model(
        model, example_inputs=example_inputs, input_shapes=input_shapes, input_names=input_names
    )
    check_finite_weights(imported.mod)
    if quantize is not None:
        quantize = scheme_for_target(quantize, preset)
        if calibration_data is None and getattr(quantize, "observer", None):
            raise TvmqError(
                "static int8 quantization needs calibration data: a few hundred typical "
                "inputs (an array, a .npz file, or an iterable of batches)"
            )
    compressed, applied, notes = _compress(
        imported,
        preset,
        prune=prune,
        cluster=cluster,
        sparse=SparseConfig.of(sparse),
        quantize=quantize,
        calibration_data=calibration_data,
        progress=progress,
    )
    ex, build_info = build_with_info(compressed.mod, preset, tuning_logs=tuning_logs)
    notes["kernels"] = build_info.to_json()
    if progress:
        print(f"tvmq: kernels {build_info.summary()}", file=sys.stderr)
    manifest = Manifest(
        inputs=imported.inputs,
        outputs=imported.outputs,
        target={
            "name": preset.name,
            "kind": preset.kind,
            "cross_compiled": preset.is_cross_compiled,
            "description": preset.description,
            "tvm_target": preset.to_json()["target"],
            "host": preset.to_json()["host"],
            "cc": preset.cc,
            "features": list(preset.features),
        },
        compression=applied,
        source=imported.source,
        versions=versions(),
        notes=notes,
    )
    out = _write_build(folder, ex, preset, manifest) if folder is not None else None
    return CompiledArtifact(ex, compressed.mod, manifest, out)


def _write_build(folder: OutputFolder, ex, preset: TargetPreset, manifest: Manifest) -> Path:
    """Export the library and manifest into a staging folder, then commit it atomically."""
    from tvmq.build import export_library

    with folder.stage() as stage:
        lib = stage / LIBRARY
        export_library(ex, lib, preset)
        manifest.library = {"file": LIBRARY, "bytes": lib.stat().st_size, "sha256": sha256_of(lib)}
        # whatever the exporter left in the staging folder is tvmq's to replace next time
        manifest.files = sorted(p.name for p in stage.iterdir())
        manifest.write(stage)  # last: a staged folder with a manifest is complete
    return folder.path
