"""tvmq's pipeline: what ``tvmq compile`` does to an imported model, phase by phase.

:func:`run` runs the phases in this order::

    # Phase 1, compress: prune channels, then zero weights, then share weights
    #   (tvmq.compression: configs -> PruneChannels / PruneMagnitude / PruneNM /
    #   ClusterWeights; with int8, ClusterInt8Weights inside phase 2); float matmuls with a
    #   block-sparse weight -> BSR kernels (SparsifyDense).
    # Phase 2, quantize: the scheme's handler (tvmq.quantization: static.py, dynamic.py,
    #   weight_only.py) calibrates on the prepared model and turns the config and the
    #   statistics into plain pass parameters; the passes come from tvmq.passes.pipeline
    #   (static int8: prepare -> SmoothQuant -> AnnotateQDQ -> FoldQuantScales -> LowerInt8
    #   -> QuantizeDynamic). An ONNX QDQ model skips calibration (CanonicalizeQDQ).
    # Phase 3, target kernels: tvmq.lowering.target_kernel_passes(target) (VNNI / sdot /
    #   dp4a int8 kernels, fast exp / erf / tanh).
    # Phase 4, build: fuse, tuning records, default schedules, lower, link (tvmq.build).

Phases 3 and 4 run inside :func:`tvmq.build.build_with_info`, whose fusion step
(:func:`tvmq.lowering.fuse_to_tir`) starts with the target kernels so that ``tvmq tune``
extracts exactly the kernels a build schedules. For static int8, the IR part of phases 2
and 3 is the registered Relax pipeline ``"tvmq"``: ``relax.get_pipeline("tvmq",
**compressed.pipeline_params, target_kernels=target_kernel_passes(target), build=False)``
on the float module gives the IR this pipeline builds (``tests/test_compile_pipeline.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm

from tvmq import build
from tvmq.build import BuildInfo
from tvmq.compression import (
    apply_compression,
    as_prune_list,
    clustered_layers,
    int8_cluster_params,
)
from tvmq.core.compression import SparseConfig
from tvmq.core.schemes import Int8Static, get_scheme
from tvmq.errors import TvmqError
from tvmq.frontends.model import ImportedModel, check_finite_weights
from tvmq.frontends.tflite import dynamic_range_scheme
from tvmq.passes import (
    SPARSE_ATTR,
    CanonicalizeQDQ,
    ConvTransposeAsMatmul,
    FoldBatchNorm,
    FoldScalarMultiply,
    PackBf16BatchMatmulX86,
    PackBf16ConvX86,
    PackBf16DenseX86,
    QDQConvToNCHW,
    SparsifyDense,
    bf16_tensor_core_passes,
    half_precision_passes,
    has_qdq,
    static_int8_passes,
    tvmq_pipeline,
)
from tvmq.passes.analysis import float_compute_ops
from tvmq.passes.pack_bf16_dense_x86 import target_has_amx_bf16
from tvmq.passes.pack_fp16_dense_cuda import target_has_fp16_mma
from tvmq.passes.pack_int8_dense_x86 import target_has_vnni
from tvmq.progress import phase
from tvmq.quantization import quantize_with_accuracy_control
from tvmq.quantization.quantize import quantize_checked
from tvmq.quantization.report import output_sqnr
from tvmq.targets import TargetPreset

__all__ = ["Compressed", "Built", "check_precision", "compress", "run", "scheme_for_target"]

PRECISIONS = ("fp32", "fp16", "bf16")
"""``precision=`` values: fp32 (the default), fp16 (CUDA presets), bf16 (CUDA presets for sm_80
and newer, CPUs with AMX-BF16)."""

_log = logging.getLogger("tvmq")


@dataclass
class Compressed:
    """The model after phases 1-2, what was applied (for ``model.json``) and notes.

    ``pipeline_params``: keyword arguments of the Relax pipeline ``"tvmq"`` reproducing
    phase 2 (static int8 only, else None); ``quantized``: the quantizer's result, if any.
    """

    model: ImportedModel
    applied: dict[str, Any]
    notes: dict[str, Any]
    pipeline_params: dict[str, Any] | None = None
    quantized: Any = None


@dataclass
class Built(Compressed):
    """:class:`Compressed`, then built (phases 3-4)."""

    executable: tvm.relax.Executable | None = None
    build_info: BuildInfo | None = None


def scheme_for_target(quantize, preset: TargetPreset):
    """The quantization scheme to use on ``preset`` for a scheme name or object.

    A name gets the target's preferred form: x86 with VNNI multiplies u8 x s8, so
    ``"int8"`` there means uint8 activations (no run-time sign flip before each kernel).
    A scheme object is used as given.
    """
    scheme = get_scheme(quantize)
    if (
        isinstance(quantize, str)
        and isinstance(scheme, Int8Static)
        and target_has_vnni(preset.tvm_target())
    ):
        scheme = dataclasses.replace(scheme, activation_dtype="uint8")
    return scheme


def check_precision(precision: str | None, preset: TargetPreset, quantize=None) -> str | None:
    """``"fp16"`` / ``"bf16"`` for a half-precision build, None for fp32; TvmqError (one
    line) for a value or combination tvmq cannot build."""
    if precision is None or precision == "fp32":
        return None
    if precision not in PRECISIONS:
        raise TvmqError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    cuda = preset.kind == "cuda"
    if precision == "bf16" and cuda and not target_has_fp16_mma(preset.tvm_target()):
        raise TvmqError(
            f"precision bf16 needs bf16 tensor cores (sm_80 or newer); target {preset.name!r} "
            "has none: drop it, or pick cuda-sm80 / cuda-sm90"
        )
    if precision == "bf16" and not cuda and not target_has_amx_bf16(preset.tvm_target()):
        raise TvmqError(
            f"precision bf16 needs AMX-BF16 tiles (Intel Sapphire Rapids or newer); target "
            f"{preset.name!r} has none: drop it, or pick a preset with amx-bf16 (x86-amx)"
        )
    if preset.kind != "cuda" and precision != "bf16":
        raise TvmqError(
            f"precision {precision} is for CUDA targets (tensor cores); target {preset.name!r} "
            "is a CPU: drop it or pick a cuda-* preset"
        )
    if quantize is not None:
        raise TvmqError(
            f"precision {precision} and quantization cannot be combined yet: the quantized "
            "layers already run in int8; drop one of them"
        )
    return precision


def compress(
    model: ImportedModel,
    preset: TargetPreset,
    *,
    prune=None,
    cluster=None,
    sparse: SparseConfig | None = None,
    quantize=None,
    calibration_data=None,
    bias_correction: bool = False,
    accuracy_control=None,
    progress: bool = True,
    evaluate: bool = True,
) -> Compressed:
    """Phases 1-2: prune, cluster, sparse kernels, then quantize.

    ``quantize`` is a scheme (see :func:`scheme_for_target`); ``evaluate=False`` leaves the
    quantizer's output SQNRs to be measured later (:func:`run` measures them on the build).
    ``bias_correction`` as for :func:`tvmq.quantization.quantize`; ``accuracy_control``
    (``tvmq.quantization.AccuracyControl``) quantizes through
    :func:`~tvmq.quantization.quantize_with_accuracy_control` instead.
    The weights are checked for NaN / inf here, once (the quantizer does not check again).
    """
    check_finite_weights(model.mod)
    if has_qdq(model.mod):
        return _lower_prequantized(model, prune, cluster, quantize)
    if quantize is None:  # a dynamic-range .tflite: its own int8 layers, quantized at run time
        quantize = dynamic_range_scheme(model)
    int8_cluster = _int8_cluster(cluster, quantize, accuracy_control)
    if int8_cluster is not None:
        cluster = None  # shared on the int8 weights, inside quantization
    applied: dict = {}
    notes: dict = {}
    # Phase 1: compress.
    if prune is not None or cluster is not None or sparse is not None:
        phase("compress", progress)
    if prune is not None or cluster is not None:
        mod, report = apply_compression(model.mod, prune=prune, cluster=cluster)
        model = _with_mod(model, mod)
        if report["prune"]:
            applied["prune"] = report["prune"]
        if report["cluster"]:
            applied["cluster"] = report["cluster"]
        notes["compression"] = {k: report[k] for k in ("before", "after", "sparsity")}
        if sparse is None and any(p.method == "n:m" for p in as_prune_list(prune)):
            _log.warning(
                "N:M pruning zeroes weights, but no %s kernel skips them: the library's size "
                "and speed are unchanged (add --sparse --sparse-block 1x1 or --quantize, or "
                "remove whole channels with --prune-kind channel)",
                preset.name,
            )
    if sparse is not None:
        # Before quantization: BSR layers stay float32, the quantizer takes the dense rest.
        mod = SparsifyDense(sparse.min_sparsity, sparse.block, preset.tvm_target())(model.mod)
        model = _with_mod(model, mod)
        decisions = mod["main"].attrs.get(SPARSE_ATTR, []) if mod["main"].attrs else []
        applied["sparse"] = {
            "min_sparsity": sparse.min_sparsity,
            "block": list(sparse.block),
            "layers": [{str(k): _plain(v) for k, v in d.items()} for d in decisions],
        }
        if not any(d.get("chosen") for d in applied["sparse"]["layers"]):
            _log.warning(
                "--sparse: no float matmul weight is %.0f%% block-sparse in %dx%d blocks, so "
                "none runs on a sparse kernel (after unstructured --prune, use "
                "--sparse-block 1x1)",
                100 * sparse.min_sparsity,
                *sparse.block,
            )
    if quantize is None:
        return Compressed(model, applied, notes)
    # Phase 2: quantize.
    if calibration_data is None and getattr(quantize, "observer", None):
        raise TvmqError(
            "static int8 quantization needs calibration data: a few hundred typical "
            "inputs (an array, a .npz file, or an iterable of batches)"
        )
    # a calibrated scheme's handler announces "quantize" itself once calibration is done
    phase("calibrate" if getattr(quantize, "observer", None) else "quantize", progress)
    if accuracy_control is None:
        result = quantize_checked(
            model, calibration_data, quantize, progress=progress, evaluate=evaluate,
            bias_correction=bias_correction,
        )  # fmt: skip
        applied["quantize"] = result.describe()
    else:
        if bias_correction:
            raise TvmqError("bias correction and accuracy control cannot be combined yet")
        control = quantize_with_accuracy_control(
            model, calibration_data, quantize, accuracy_control.eval_fn,
            accuracy_control.max_drop, ranking=accuracy_control.ranking,
            max_float_layers=accuracy_control.max_float_layers, progress=progress,
        )  # fmt: skip
        result = control.model
        applied["quantize"] = result.describe()
        applied["quantize"]["accuracy_control"] = {
            "max_drop": accuracy_control.max_drop,
            "float_metric": control.float_metric,
            "metric": control.metric,
            "met": control.met,
            "float_layers": control.float_layers,
        }
    notes["float_ops"] = list(result.float_ops)
    if int8_cluster is not None:
        # The static passes again, from the calibrated parameters, with the int8 weights
        # shared before LowerInt8 derives the zero-point terms from them.
        c = int8_cluster
        params = {**result.pipeline_params, "int8_cluster": int8_cluster_params(c)}
        mod = tvmq_pipeline(**params, build=False)(model.mod)
        result = dataclasses.replace(result, mod=mod, pipeline_params=params)
        applied["cluster"] = {**c.describe(), "codebook": "int8"}
        notes.setdefault("compression", {})["clustered"] = clustered_layers(result.mod)
    return Compressed(result, applied, notes, result.pipeline_params, result)


def run(
    model: ImportedModel,
    preset: TargetPreset,
    *,
    tuning_logs="auto",
    progress: bool = True,
    precision: str | None = None,
    **compression,
) -> Built:
    """Phases 1 to 4: :func:`compress`, then build for ``preset``.

    ``compression``: the keyword arguments of :func:`compress`. ``precision="fp16"`` (CUDA
    presets, see :func:`check_precision`): the float model runs in fp16 with fp32
    accumulation, its matmuls on tensor cores where the arch has them (sm_80 and newer).
    ``precision="bf16"``: the model stays float32 and its matmuls (with constant weights,
    and attention's of two activations) run on bf16 tensor cores (CUDA, sm_80 and newer) or
    AMX-BF16 tiles (CPUs), accumulating in float32. On the host the quantizer's
    output SQNRs are measured on the executable built here rather than on a second,
    report-only build.
    """
    on_host = preset.name == "host"
    precision = check_precision(precision, preset, compression.get("quantize"))
    done = compress(model, preset, progress=progress, evaluate=not on_host, **compression)
    if precision == "fp16":
        phase("fp16", progress)
        done.model = _with_mod(done.model, half_precision_passes()(done.model.mod))
        done.applied["precision"] = {"compute": "float16", "accumulate": "float32"}
    if precision == "bf16":
        phase("bf16", progress)
        target = preset.tvm_target()
        if preset.kind == "cuda":
            bf16 = bf16_tensor_core_passes(target)
            compute = "bfloat16 (tensor-core matmuls)"
        else:
            bf16 = tvm.transform.Sequential(
                [
                    # SDPA's q / k scales into the projections before their weights are
                    # packed: attention's K^T is then a plain transpose of K (read directly).
                    FoldScalarMultiply(),
                    ConvTransposeAsMatmul(),
                    FoldBatchNorm(),
                    PackBf16ConvX86(target),
                    PackBf16DenseX86(target),
                    PackBf16BatchMatmulX86(target),
                ]
            )
            compute = "bfloat16 (AMX matmuls)"
        done.model = _with_mod(done.model, bf16(done.model.mod))
        done.applied["precision"] = {"compute": compute, "accumulate": "float32"}
    # Phases 3-4: target kernels, fuse, tuning records, default schedules, lower.
    phase(f"build for {preset.name}", progress)
    ex, info = build.build_with_info(
        done.model.mod, preset, tuning_logs=tuning_logs, int8_weight_codes=True
    )
    done.notes["kernels"] = info.to_json()
    done.notes["weights"] = dict(info.weights)  # dtype -> bytes of constants in the library
    if progress:
        print(f"tvmq: kernels {info.summary()}", file=sys.stderr)
        if info.symbolic_default:
            print(
                f"tvmq: {len(info.symbolic_default)} matmul kernel(s) with symbolic shapes run "
                f"on TVM's default lowering, not a tvmq kernel: "
                f"{', '.join(info.symbolic_default[:6])}"
                + (" ..." if len(info.symbolic_default) > 6 else ""),
                file=sys.stderr,
            )
    quantized = done.quantized
    if on_host and quantized is not None and quantized.first_batch is not None:
        names = [s.name for s in model.inputs]
        with tempfile.TemporaryDirectory(prefix="tvmq-sqnr-") as tmp:
            # A VM that loads `ex` itself changes what `ex` exports later: run a linked copy.
            lib = Path(tmp) / "model.so"
            build.export_library(ex, lib, preset)
            sqnr = output_sqnr(tvm.runtime.load_module(str(lib)), quantized.first_batch, names)
        quantized.report.output_sqnr_db = sqnr
        done.applied["quantize"] = {**done.applied["quantize"], **quantized.describe()}
    return Built(**vars(done), executable=ex, build_info=info)


def _int8_cluster(cluster, quantize, accuracy_control):
    """The cluster config to apply to the int8 weights after quantizing, or None when
    `cluster` is not combined with quantization; TvmqError for a combination that cannot be."""
    if cluster is None or quantize is None:
        return None
    if not isinstance(quantize, Int8Static):
        raise TvmqError(
            "weight clustering combines with static int8 quantization only, not "
            f"{type(quantize).__name__}; drop one of them"
        )
    if accuracy_control is not None:
        raise TvmqError("weight clustering and accuracy control cannot be combined yet")
    if cluster.bits > 4:
        raise TvmqError(
            f"with int8 quantization, clustering shares at most 16 values per weight, got "
            f"{2**cluster.bits}: an int8 weight is already 8 bits (use --cluster 16 or fewer)"
        )
    if cluster.skip:
        raise TvmqError(
            "with int8 quantization, the int8 weights are clustered and layers are left out "
            "of both through the scheme's skip; drop the cluster config's skip"
        )
    return cluster


def _with_mod(model: ImportedModel, mod: tvm.IRModule) -> ImportedModel:
    return ImportedModel(mod, model.inputs, model.outputs, model.source, model.meta)


def _plain(value):
    """TVM FFI containers and strings as plain JSON values."""
    if isinstance(value, str | bool | int | float) or value is None:
        return value if not isinstance(value, str) else str(value)
    try:
        return [_plain(v) for v in value]
    except TypeError:
        return str(value)


def _lower_prequantized(model: ImportedModel, prune, cluster, quantize) -> Compressed:
    """An already-quantized model (ONNX QDQ, PT2E, int8 TFLite): lower its QDQ regions, no calibration."""
    scheme, ops = {
        "pytorch": ("pt2e", "quantize/dequantize ops of PT2E"),
        "tflite": ("tflite-int8", "TFLite int8/uint8 tensors"),
    }.get(model.source, ("onnx-qdq", "QuantizeLinear/DequantizeLinear"))
    if quantize is not None or prune is not None or cluster is not None:
        raise TvmqError(
            f"the model is already quantized (it holds {ops}); "
            "compile it without --quantize, --prune or --cluster"
        )
    # NHWC convolutions (TFLite's) to the NCHW form LowerInt8 matches
    mod = static_int8_passes()(QDQConvToNCHW()(CanonicalizeQDQ()(model.mod)))
    float_ops = float_compute_ops(mod["main"])
    return Compressed(
        _with_mod(model, mod),
        {"quantize": {"scheme": scheme, "float_ops": float_ops}},
        {"float_ops": float_ops},
    )
