"""tvmq's IR passes (imported as ``tvmq.passes``): each a ``tvm.transform.Pass``, one per file.

Already-quantized ONNX QDQ models: :class:`CanonicalizeQDQ` first.
Static int8 quantization, in pipeline order: :class:`AnnotateQDQ`, :class:`FoldQuantScales`,
:class:`ShareQuantize`, :class:`LowerInt8`; ``pipeline.py`` chains them (with :class:`SmoothQuant`
and the dynamic sites' :class:`QuantizeDynamic`) in the phases ``tvmq compile`` runs, and importing this package
registers them as the Relax pipeline ``"tvmq"`` (``relax.get_pipeline("tvmq", ...)``).
Every pass takes plain parameters (numbers, names, mappings), never a scheme object.
Sparse execution: :class:`SparsifyDense` (BSR kernels for block-sparse float weights, after
pruning, before quantization).
SmoothQuant before static int8 calibration: :class:`SmoothQuant`; empirical bias correction
after it: :class:`CorrectBias`.
Dynamic int8 and weight-only int8/int4: :class:`QuantizeDynamic`, :class:`QuantizeWeightOnly`.
Target kernels, after ``LowerInt8`` (the build applies them per target):
:class:`PackInt8DenseX86` (AVX-512 VNNI), :class:`PackInt8DenseARM` (sdot / NEON),
:class:`PackInt8DenseCUDA` (dp4a), :class:`PackFp16DenseCUDA` (fp16 tensor cores, mma.sync),
:class:`PackBf16DenseCUDA` (float32 matmuls on bf16 tensor cores, ``precision="bf16"`` on CUDA:
:func:`bf16_tensor_core_passes` chains it with the batched-matmul and conv passes' bf16 mode),
:class:`PackMmaBatchMatmulCUDA` (fp16 / int8 attention matmuls on tensor cores), :class:`PackMmaConvCUDA`
(fp16 / int8 conv2d: im2col + tensor-core dense); :class:`UseFastMath` (vectorizable exp / erf / tanh, softmax and
GELU on CPU targets) and :class:`QuantizedSoftmax` (a softmax and its per-tensor quantize as one kernel),
:class:`QuantizeByMultiply` (quantize by a constant scale without a divide),
:class:`FastRowQuantize` (dynamic int8's per-row quantize without a divide per value); float CPU kernels :class:`PackFloatConv`, :class:`PackFloatDense`,
:class:`PackFloatBatchMatmul` (attention's float activation matmuls on x86), and
:class:`PackDecodedDense` (w8 / w4 matmul weights decoded inside the kernel),
:class:`PackImageNHWC` (a CNN's NCHW input image to padded NHWC in one vectorized kernel);
:class:`FoldTableDecoders` (clustered weights as plain float constants for the float kernels; the build runs it before `PackDecodedDense`, whose table kernel then serves direct users of the pass),
then, after fusion, :class:`DecodeAtLoad` (constants of few distinct values stored as
codes, decoded once at load by ``main_transform_params``).
Pruning and weight sharing, on float constant weights before quantization:
:class:`PruneChannels`, :class:`PruneMagnitude`, :class:`PruneNM`, :class:`ClusterWeights`;
on the int8 weights after quantization: :class:`ClusterInt8Weights`.
Int8 conv2d and attention on VNNI CPUs: :class:`PackInt8ConvX86`, :class:`PackInt8BatchMatmulX86`;
on x86 CPUs without avx512vnni, :class:`Int8AsFloat` (int8 products on the float kernels),
before it on AVX2 ones :class:`Int8AsInt16` (int8 matmuls as exact int16 pair products).
``precision="bf16"`` on AMX-BF16 CPUs: :class:`PackBf16ConvX86`, :class:`PackBf16DenseX86`,
:class:`PackBf16BatchMatmulX86` (attention's activation matmuls).

Shared by the passes and public: :mod:`~tvmq.passes.sites` (the one site model: which
matmul / conv2d layers the passes work on and their names; weightless add / concat /
attention matmuls in :mod:`~tvmq.passes.tensor_sites`), :mod:`~tvmq.passes.relax_utils`
(bindings, constants, op names) and :mod:`~tvmq.passes.analysis` (read-only measures:
:func:`~tvmq.passes.analysis.float_compute_ops`, ``count_macs``, ``constant_bytes``,
``sparsity_report``). This package imports only ``tvmq``'s core layer (``tvmq.core``,
``tvmq.errors``, ``tvmq.kernels``), never the driver (``tests/test_layers.py``).
"""

from .analysis import FLOAT_OPS_ATTR, sparsity_report
from .annotate_qdq import AnnotateQDQ
from .canonicalize_qdq import CanonicalizeQDQ, has_qdq
from .cluster_int8_weights import ClusterInt8Weights
from .cluster_weights import ClusterWeights
from .conv_transpose_as_matmul import ConvTransposeAsMatmul
from .correct_bias import CorrectBias
from .decode_at_load import DecodeAtLoad
from .drop_matmul_broadcasts import DropMatmulBroadcasts
from .fast_row_quantize import FastRowQuantize
from .fold_batch_norm import FoldBatchNorm
from .fold_constant_casts import FoldConstantCasts
from .fold_quant_scales import FoldQuantScales
from .fold_scalar_multiply import FoldScalarMultiply
from .fold_table_decoders import FoldTableDecoders
from .int8_as_float import Int8AsFloat
from .int8_as_int16 import Int8AsInt16
from .lower_int8 import LowerInt8
from .pack_bf16_batch_matmul_x86 import PackBf16BatchMatmulX86
from .pack_bf16_conv_x86 import PackBf16ConvX86
from .pack_bf16_dense_cuda import PackBf16DenseCUDA
from .pack_bf16_dense_x86 import PackBf16DenseX86
from .pack_decoded_dense import PackDecodedDense
from .pack_float_batch_matmul import PackFloatBatchMatmul
from .pack_float_conv import PackFloatConv
from .pack_float_dense import PackFloatDense
from .pack_fp16_dense_cuda import PackFp16DenseCUDA
from .pack_image_nhwc import PackImageNHWC
from .pack_int8_batch_matmul_x86 import PackInt8BatchMatmulX86
from .pack_int8_conv_x86 import PackInt8ConvX86
from .pack_int8_dense_arm import PackInt8DenseARM, arm_int8_instruction
from .pack_int8_dense_cuda import PackInt8DenseCUDA
from .pack_int8_dense_x86 import PackInt8DenseX86
from .pack_mma_batch_matmul_cuda import PackMmaBatchMatmulCUDA
from .pack_mma_conv_cuda import PackMmaConvCUDA
from .pipeline import (
    PIPELINE_NAME,
    bf16_tensor_core_passes,
    half_precision_passes,
    prepare_passes,
    static_int8_passes,
    tvmq_pipeline,
)
from .prune_channels import PruneChannels
from .prune_magnitude import PruneMagnitude
from .prune_n_m import PruneNM
from .qdq_conv_nchw import QDQConvToNCHW
from .quantize_by_multiply import QuantizeByMultiply
from .quantize_dynamic import QuantizeDynamic
from .quantize_embedding import QuantizeEmbedding
from .quantize_weight_only import QuantizeWeightOnly
from .quantized_softmax import QuantizedSoftmax
from .resolve_shape_vars import ResolveShapeVars
from .safe_softmax import SafeSoftmax
from .share_quantize import ShareQuantize
from .smooth_quant import SmoothQuant
from .sparsify_dense import SPARSE_ATTR, SparsifyDense
from .use_fast_math import UseFastMath

__all__ = [
    "FLOAT_OPS_ATTR",
    "PIPELINE_NAME",
    "AnnotateQDQ",
    "CanonicalizeQDQ",
    "QDQConvToNCHW",
    "has_qdq",
    "ClusterInt8Weights",
    "ClusterWeights",
    "DecodeAtLoad",
    "DropMatmulBroadcasts",
    "FastRowQuantize",
    "FoldTableDecoders",
    "Int8AsFloat",
    "Int8AsInt16",
    "CorrectBias",
    "PackDecodedDense",
    "PackFloatConv",
    "PackBf16BatchMatmulX86",
    "PackBf16ConvX86",
    "PackBf16DenseCUDA",
    "PackBf16DenseX86",
    "PackFloatBatchMatmul",
    "PackFloatDense",
    "PackImageNHWC",
    "UseFastMath",
    "QuantizedSoftmax",
    "QuantizeByMultiply",
    "SafeSoftmax",
    "PackInt8DenseCUDA",
    "PackFp16DenseCUDA",
    "PackInt8BatchMatmulX86",
    "PackInt8ConvX86",
    "PackInt8DenseARM",
    "PackInt8DenseX86",
    "PackMmaBatchMatmulCUDA",
    "PackMmaConvCUDA",
    "arm_int8_instruction",
    "PruneChannels",
    "PruneMagnitude",
    "PruneNM",
    "ResolveShapeVars",
    "QuantizeDynamic",
    "QuantizeEmbedding",
    "SPARSE_ATTR",
    "SparsifyDense",
    "QuantizeWeightOnly",
    "SmoothQuant",
    "sparsity_report",
    "ConvTransposeAsMatmul",
    "FoldConstantCasts",
    "FoldScalarMultiply",
    "FoldBatchNorm",
    "FoldQuantScales",
    "LowerInt8",
    "ShareQuantize",
    "bf16_tensor_core_passes",
    "half_precision_passes",
    "prepare_passes",
    "static_int8_passes",
    "tvmq_pipeline",
]
