"""The int8 pass lists of ``tvmq compile --quantize int8``, and the Relax pipeline ``"tvmq"``.

One builder per phase, each returning a ``tvm.transform.Pass`` that takes plain parameters
(the driver, ``tvmq.quantization.static``, turns an ``Int8Static`` config and its
calibration into them); ``tvmq compile`` runs these very builders, so the Relax pipeline
is exactly the IR part of a compile for the same parameters::

    # Phase 1, prepare: CanonicalizeBindings + DeadCodeElimination -- drops the importers'
    #   no-op bindings (max_pool2d's unused index tuple); ConvTransposeAsMatmul, FoldScalarMultiply;
    #   site names are defined on this form.
    # Phase 2, smooth: SmoothQuant on the sites of `smooth_absmax` (calibration, which
    #   needs phases 1-2 to observe the model it quantizes, runs after this phase).
    # Phase 3, quantize: [CorrectBias (empirical bias correction, computed by the driver from
    #   calibration)] -> AnnotateQDQ (calibrated activation parameters) -> FoldQuantScales
    #   (int8 weight constants, batch_norm folding) -> ShareQuantize (a tensor read by several
    #   quantizes is quantized once, the others requantize) -> LowerInt8 (int8 x int8 -> int32,
    #   integer add / concat / requantize) -> QuantizeDynamic on the `dynamic_vars`
    #   matmuls (run-time per-row activation ranges: the scheme's `dynamic` sites).
    # Phase 4, target kernels: the passes of `tvmq.lowering.target_kernel_passes(target)`,
    #   handed in as `target_kernels` (the driver chooses them per target).
    # Phase 5, build (pipeline only, optional): the stock "zero" pipeline (legalize, fuse)
    #   and "default_build", so the result can go to tvm.compile(relax_pipeline=...).

``relax.get_pipeline("tvmq")`` (no arguments; also ``tvm.compile(mod, target,
relax_pipeline="tvmq")``) lowers a module already in QDQ form and builds it;
``relax.get_pipeline("tvmq", **params)`` with the parameters a compile used
(``tvmq.quantization.QuantizedModel.pipeline_params``) quantizes the float module the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import tvm
from tvm import relax

from .annotate_qdq import AnnotateQDQ
from .cluster_int8_weights import ClusterInt8Weights
from .conv_transpose_as_matmul import ConvTransposeAsMatmul
from .correct_bias import CorrectBias
from .fold_batch_norm import FoldBatchNorm
from .fold_constant_casts import FoldConstantCasts
from .fold_quant_scales import FoldQuantScales
from .fold_scalar_multiply import FoldScalarMultiply
from .lower_int8 import LowerInt8
from .pack_bf16_dense_cuda import PackBf16DenseCUDA
from .pack_mma_batch_matmul_cuda import PackMmaBatchMatmulCUDA
from .pack_mma_conv_cuda import PackMmaConvCUDA
from .quantize_dynamic import QuantizeDynamic
from .quantize_embedding import QuantizeEmbedding
from .share_quantize import ShareQuantize
from .smooth_quant import SmoothQuant

PIPELINE_NAME = "tvmq"
_NOTHING = tvm.transform.Sequential([])


def prepare_passes() -> tvm.transform.Pass:
    """Phase 1: canonical bindings, no dead code (site names are defined on this form)."""
    return tvm.transform.Sequential(
        [
            relax.transform.CanonicalizeBindings(),
            relax.transform.DeadCodeElimination(),
            ConvTransposeAsMatmul(),  # a matmul site: the quantizer takes it like any other
            FoldScalarMultiply(),  # SDPA's q/k scales into the projections: int8 requantizes
        ],
        name="tvmq.prepare",
    )


def smooth_passes(
    smooth_absmax: Mapping[str, np.ndarray] | None = None,
    smooth: Sequence[tuple[str, float]] = (),
) -> tvm.transform.Pass:
    """Phases 1-2: prepare, then SmoothQuant the sites of ``smooth_absmax``.

    Parameters
    ----------
    smooth_absmax : Mapping[str, numpy.ndarray], optional
        Site name -> ``max |x|`` per input channel over the calibration data; only these
        sites are smoothed.
    smooth : sequence of (selector, alpha)
        Migration strength per site selector (``Int8Static.smooth``).
    """
    smoothing = SmoothQuant(smooth_absmax, smooth) if smooth_absmax else _NOTHING
    return tvm.transform.Sequential([prepare_passes(), smoothing], name="tvmq.smooth")


def static_int8_passes(
    activation_qparams: Mapping[str, tuple[float, int]] | None = None,
    *,
    activation_dtype: str | Mapping[str, str] = "int8",
    weight_per_channel: bool | Mapping[str, bool] = True,
    skip: Sequence[str] = (),
    requantize: str = "float",
    dynamic_vars: Collection[str] = (),
    dynamic_weight_per_channel: bool = True,
    bias_corrections: Mapping[str, np.ndarray] | None = None,
    int8_embeddings: bool = False,
    int8_cluster: Mapping[str, Any] | None = None,
) -> tvm.transform.Pass:
    """Phases 1 and 3: prepare, then quantize (no smoothing, no build).

    Parameters
    ----------
    activation_qparams : Mapping[str, tuple[float, int]], optional
        Site name -> calibrated ``(scale, zero_point)``; None for a module already in QDQ form.
    activation_dtype, weight_per_channel, skip
        As for :class:`AnnotateQDQ`.
    requantize : {"float", "integer"}
        As for :class:`LowerInt8`.
    dynamic_vars : collection of str
        Binding names of the matmuls to quantize with run-time activation ranges
        (:class:`QuantizeDynamic`) after the static passes, which must leave them float.
    dynamic_weight_per_channel : bool
        Weight scales of those matmuls per output channel.
    bias_corrections : Mapping[str, numpy.ndarray], optional
        Site name -> per-output-channel correction added to its bias (:class:`CorrectBias`)
        before quantizing.
    int8_embeddings : bool
        Store embedding tables read by ``take`` as int8 rows (:class:`QuantizeEmbedding`).
    int8_cluster : Mapping, optional
        Keyword arguments of :class:`ClusterInt8Weights` (``bits``, ``init``, ``min_size``,
        ``seed``): share each int8 weight's values once the weights are int8 and before
        ``LowerInt8`` computes the zero-point terms from them.
    """
    passes = [prepare_passes()]
    if bias_corrections:
        passes.append(CorrectBias(bias_corrections))
    if activation_qparams is not None:
        passes.append(
            AnnotateQDQ(
                activation_qparams,
                activation_dtype=activation_dtype,
                weight_per_channel=weight_per_channel,
                skip=skip,
            )
        )
    passes.append(FoldQuantScales())
    if int8_cluster:
        passes.append(ClusterInt8Weights(**int8_cluster))
    passes.append(ShareQuantize())  # a tensor several quantizes read: int8 once
    passes.append(LowerInt8(requantize))
    if dynamic_vars:
        passes.append(
            QuantizeDynamic(weight_per_channel=dynamic_weight_per_channel, only_vars=dynamic_vars)
        )
    if int8_embeddings:
        passes.append(QuantizeEmbedding())
    return tvm.transform.Sequential(passes, name="tvmq.static_int8")


def tvmq_pipeline(
    activation_qparams: Mapping[str, tuple[float, int]] | None = None,
    *,
    smooth_absmax: Mapping[str, np.ndarray] | None = None,
    smooth: Sequence[tuple[str, float]] = (),
    target_kernels: Sequence[tvm.transform.Pass] = (),
    build: bool = True,
    fuse: bool = True,
    **quantize_params,
) -> tvm.transform.Pass:
    """The ``"tvmq"`` Relax pipeline: phases 1 to 4, then optionally the stock build.

    Parameters
    ----------
    activation_qparams, **quantize_params
        As in :func:`static_int8_passes`.
    smooth_absmax, smooth
        As in :func:`smooth_passes`.
    target_kernels : sequence of tvm.transform.Pass
        Phase 4, e.g. ``tvmq.lowering.target_kernel_passes(target)``.
    build : bool
        Append the stock ``"default_build"`` pipeline (what ``tvm.compile`` runs by default).
    fuse : bool
        Legalize and fuse (the stock ``"zero"`` pipeline) before building, so the
        elementwise requantize ops become one kernel with their producer.
    """
    passes = [
        smooth_passes(smooth_absmax, smooth),
        static_int8_passes(activation_qparams, **quantize_params),
        *target_kernels,
    ]
    if build:
        if fuse:
            passes.append(relax.get_pipeline("zero"))
        passes.append(relax.get_pipeline("default_build"))
    return tvm.transform.Sequential(passes, name=PIPELINE_NAME)


def half_precision_passes() -> tvm.transform.Pass:
    """A float model computed in fp16 with fp32 accumulation (``--precision fp16``).

    TVM's ``ToMixedPrecision(out_dtype="float32")``: matmul and conv2d take fp16 operands and
    accumulate in fp32, elementwise ops run in fp16, the model's inputs and outputs stay
    float32. Then ``FoldConstantCasts`` (not TVM's ``FoldConstant``, which also folds zeros
    and broadcasts to full activation shapes), so the weights are fp16 constants that the
    target kernel passes (``PackFp16DenseCUDA``) match, and the library stores them in 2 bytes.
    """
    return tvm.transform.Sequential(
        [
            relax.transform.ToMixedPrecision(out_dtype="float32"),
            FoldConstantCasts(),
            relax.transform.CanonicalizeBindings(),  # the weights' readers see the constants
        ],
        name="tvmq.half_precision",
    )


def bf16_tensor_core_passes(target) -> tvm.transform.Pass:
    """``--precision bf16`` on CUDA (sm_80 and newer): the model stays float32 (bf16 has its
    range) and its float32 matmuls and convolutions run on bf16 tensor cores with fp32
    accumulation: dense layers with a constant weight (``PackBf16DenseCUDA``; 2x2/2
    up-convolutions become such matmuls), matmuls of two activations (attention:
    ``PackMmaBatchMatmulCUDA(bf16=True)``) and conv2d with groups 1 after batch norms are
    folded into their weights (``PackMmaConvCUDA(bf16=True)``: im2col + the dense kernel)."""
    return tvm.transform.Sequential(
        [
            ConvTransposeAsMatmul(),
            FoldBatchNorm(),
            PackBf16DenseCUDA(target),
            PackMmaBatchMatmulCUDA(target, bf16=True),
            PackMmaConvCUDA(target, bf16=True),
        ],
        name="tvmq.bf16_tensor_core",
    )


def _register() -> None:
    # ValueError: already registered (the module was imported twice).
    with contextlib.suppress(ValueError):
        relax.register_pipeline(PIPELINE_NAME)(tvmq_pipeline)


_register()
