"""``tvmq.compile``: import -> pipeline -> export.

The model is imported (``tvmq.frontends``), run through tvmq's pipeline (``tvmq.pipeline``:
compress -> quantize -> target kernels -> build) and exported with its manifest into an
output folder, swapped in atomically (``tvmq.output``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tvm

from tvmq import __version__, build, pipeline
from tvmq.core.compression import ClusterConfig, SparseConfig
from tvmq.frontends import import_model
from tvmq.frontends.model import ImportedModel
from tvmq.manifest import LIBRARY, Manifest, sha256_of
from tvmq.output import OutputFolder
from tvmq.pipeline import check_precision, scheme_for_target
from tvmq.progress import phase, phases
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
    return {"tvmq": __version__, "tvm": tvm.__version__}


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
    bias_correction: bool = False,
    accuracy_control=None,
    precision: str | None = None,
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
    cluster : ClusterConfig or int, optional
        Weight sharing into ``2**bits`` values per tensor (``tvmq.compression.ClusterConfig``);
        an int is the number of values (16 is ``ClusterConfig(bits=4)``).
    sparse : SparseConfig, float or True, optional
        Run float matmuls whose constant weight is block-sparse enough (e.g. after
        ``prune``) on tvmq's BSR kernels; a float is the minimum block sparsity.
    quantize : str or scheme, optional
        ``"int8"``, ``"int8-dynamic"``, ``"w8"``, ``"w4"`` or a scheme object from
        ``tvmq.quantization``; static schemes need ``calibration_data``.
    bias_correction : bool
        Static int8: empirical bias correction (see ``tvmq.quantization.quantize``).
    accuracy_control : AccuracyControl, optional
        Return the most sensitive layers to float until a metric drop fits
        (``tvmq.quantization.AccuracyControl``, ``quantize_with_accuracy_control``).
    precision : {"fp32", "fp16", "bf16"}, optional
        ``"fp16"`` (CUDA presets): the float model computes in fp16 with fp32 accumulation,
        its dense layers on tensor cores (``mma.sync``) on sm_80 and newer; inputs and outputs
        stay float32. ``"bf16"`` (CPU presets with AMX-BF16, e.g. Sapphire Rapids): matmuls
        with a constant weight of 16 rows or more and stride-1 convs over 32-channel multiples
        run on bf16 AMX tiles (inputs rounded to bf16, fp32 accumulation), the rest in fp32.
        ``"bf16"`` on CUDA presets (sm_80 and newer): matmuls with a constant weight,
        attention's matmuls and convolutions (groups 1) run on bf16 tensor cores
        (``mma.sync .bf16``, fp32 accumulation), the rest in fp32.
        Not combined with ``quantize``.
    tuning_logs : "auto", path, Database, list of them, or None
        MetaSchedule records to apply. ``"auto"``: ``./tuning_logs/<target>/`` and the logs
        shipped with tvmq; kernels without a record get tvmq's default schedule.

    Returns
    -------
    CompiledArtifact
        The ``tvm.relax.Executable``, the compressed Relax module and the manifest.
    """
    with phases(progress):
        return _compile(
            model, target, output_dir, example_inputs, input_shapes, input_names, overwrite,
            progress, tuning_logs, prune=prune, cluster=cluster, sparse=sparse,
            quantize=quantize, calibration_data=calibration_data,
            bias_correction=bias_correction, accuracy_control=accuracy_control,
            precision=precision,
        )  # fmt: skip


def _compile(
    model, target, output_dir, example_inputs, input_shapes, input_names, overwrite, progress,
    tuning_logs, *, prune, cluster, sparse, quantize, calibration_data, bias_correction,
    accuracy_control, precision,
) -> CompiledArtifact:  # fmt: skip
    preset = get_target(target)
    check_precision(precision, preset, quantize)  # before the import: a bad mix fails fast
    cluster = ClusterConfig.of(cluster)
    # checked before the long build: a folder that is not ours fails fast
    folder = OutputFolder.open(output_dir, overwrite) if output_dir is not None else None
    if not isinstance(model, ImportedModel):
        phase("import", progress)
    imported = import_model(
        model, example_inputs=example_inputs, input_shapes=input_shapes, input_names=input_names
    )
    built = pipeline.run(
        imported,
        preset,
        tuning_logs=tuning_logs,
        progress=progress,
        prune=prune,
        cluster=cluster,
        sparse=SparseConfig.of(sparse),
        quantize=None if quantize is None else scheme_for_target(quantize, preset),
        calibration_data=calibration_data,
        bias_correction=bias_correction,
        accuracy_control=accuracy_control,
        precision=precision,
    )
    ex, applied, notes = built.executable, built.applied, built.notes
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
    out = None
    if folder is not None:
        phase("link and export", progress)
        info = built.build_info
        out = _write_build(
            folder,
            ex,
            preset,
            manifest,
            fresh_outputs=info is not None and info.fresh_outputs,
            plan=None if info is None else info.plan,
        )
    phase("done", progress)
    return CompiledArtifact(ex, built.model.mod, manifest, out)


def _write_build(
    folder: OutputFolder,
    ex,
    preset: TargetPreset,
    manifest: Manifest,
    fresh_outputs: bool,
    plan: dict | None = None,
) -> Path:
    """Export the library and manifest into a staging folder, then commit it atomically.
    ``fresh_outputs``: the VM allocates each output anew per call (the runtime may hand
    them to the caller without a copy); ``plan``: the static call plan
    (:mod:`tvmq.static_plan`), if the build made one."""
    with folder.stage() as stage:
        lib = stage / LIBRARY
        build.export_library(ex, lib, preset, plan)
        manifest.library = {
            "file": LIBRARY,
            "bytes": lib.stat().st_size,
            "sha256": sha256_of(lib),
            "fresh_outputs": fresh_outputs,
            **({"plan": plan} if plan is not None else {}),
        }
        # whatever the exporter left in the staging folder is tvmq's to replace next time
        manifest.files = sorted(p.name for p in stage.iterdir())
        manifest.write(stage)  # last: a staged folder with a manifest is complete
    return folder.path
