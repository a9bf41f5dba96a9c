"""The target half of tvmq's pipeline: Relax module -> scheduled TIR kernels -> VM code.

Phases, in order (:func:`tvmq.build.build_with_info` runs them; :func:`tvmq.tuning.tune`
extracts its tasks from phase 2's output, so what is tuned is what is built):

1. Target kernels (:func:`target_kernel_passes`): int8 dense / conv2d / attention layers
   become tvmq's hand-scheduled kernels (``tvmq.passes.PackInt8*``: VNNI, sdot, dp4a),
   and float exp / erf / tanh vectorizable polynomials (``UseFastMath``). Each pass is a no-op
   on targets it does not serve.
2. Fuse (:func:`fuse_to_tir`): TVM's library dispatch, ``LegalizeOps``, ``FoldConstant``,
   ``FuseOps``, ``FuseTIR`` -> one TIR kernel per fused group.
3. Tuning records (in ``tvmq.build``): kernels with a MetaSchedule record get its schedule.
4. Default schedules and lowering (:func:`schedule_and_lower`): tvmq's
   :class:`~tvmq.cpu_schedule.CPUDefaultSchedule` on CPUs, dlight's GPU rules on CUDA,
   then TVM's dataflow lowering and finalization.

The Relax -> Relax half (compression, quantization) runs before phase 1: see
``tvmq.pipeline``, which runs the whole sequence.
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, tirx
from tvm.relax.backend.cpu_generic import pipeline as cpu
from tvm.relax.backend.cuda import pipeline as cuda
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func

from tvmq.cpu_schedule import CPUDefaultSchedule
from tvmq.passes import (
    ConvTransposeAsMatmul,
    FastRowQuantize,
    FoldBatchNorm,
    FoldConstantCasts,
    FoldScalarMultiply,
    FoldTableDecoders,
    Int8AsFloat,
    Int8AsInt16,
    PackDecodedDense,
    PackFloatBatchMatmul,
    PackFloatConv,
    PackFloatDense,
    PackFp16DenseCUDA,
    PackImageNHWC,
    PackInt8BatchMatmulX86,
    PackInt8ConvX86,
    PackInt8DenseARM,
    PackInt8DenseCUDA,
    PackInt8DenseX86,
    PackMmaBatchMatmulCUDA,
    PackMmaConvCUDA,
    QuantizeByMultiply,
    QuantizedSoftmax,
    SafeSoftmax,
    UseFastMath,
)
from tvmq.targets import TargetPreset, get_target

__all__ = ["fuse_to_tir", "schedule_and_lower", "target_kernel_passes"]


def fuse_to_tir(mod: tvm.IRModule, target: TargetPreset | str) -> tvm.IRModule:
    """The first phase of :func:`build`: dispatch, legalize and fuse into TIR kernels.

    Its output is what gets scheduled, so :func:`tvmq.tuning.tune` extracts its tasks from
    it: the kernels tuned are exactly the kernels built. Call it under the TVM target.
    """
    preset = get_target(target)
    tvm_target = preset.tvm_target()
    passes = _cuda_fusion(tvm_target) if preset.kind == "cuda" else _cpu_fusion(tvm_target)
    with tvm_target:
        return tvm.transform.Sequential(passes, name="tvmq_fuse_to_tir")(mod)


def target_kernel_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """Phase 1: tvmq's hand-scheduled kernels for `target` (each pass a no-op elsewhere)."""
    # Canonical bindings first, as the quantizer's prepare_passes: a max_pool2d's unused
    # indices tuple (``(y, zeros_like(y))[0]``) otherwise hides ``y`` from channels last.
    # SDPA's scalar q / k scales go into the projections' weights (one elementwise pass less).
    # The ONNX importer reshapes each conv's bias at run time (``add(conv, reshape(b))``):
    # folded into a constant, it and the activation after it join the conv's kernel.
    tidy = [
        FoldConstantCasts(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.DeadCodeElimination(),
        FoldScalarMultiply(),
    ]
    if target.kind.name == "cuda":
        # int8 dense: IMMA tensor cores (sm_80+) or dp4a (sm_61+); dlight has no working int8
        # matmul rule in TVM 0.27.
        # fp16 matmuls (--precision fp16) on tensor cores: ldmatrix + mma.sync (sm_80 and newer).
        # Attention's activation x activation matmuls and conv2d (im2col + the dense kernel) on
        # tensor cores too, fp16 and int8 (sm_80 and newer).
        return [
            *tidy,
            ConvTransposeAsMatmul(),  # 2x2/2 up-convolutions: a matmul + pixel shuffle
            PackInt8DenseCUDA(target),
            PackFp16DenseCUDA(target),
            PackMmaBatchMatmulCUDA(target),
            PackMmaConvCUDA(target),
            SafeSoftmax(one_kernel=False),  # SDPA's masked-row test fused into the softmax
        ]
    return [
        *tidy,
        ConvTransposeAsMatmul(),  # 2x2/2 up-convolutions: a matmul + pixel shuffle (float)
        FoldTableDecoders(),  # clustered weights as float constants: decoded at load (build.py)
        Int8AsInt16(target),  # AVX2 x86: int8 matmuls with a constant weight as int16 pairs
        Int8AsFloat(target),  # x86 without avx512vnni: int8 products on the float kernels
        PackInt8DenseX86(target),  # VNNI int8 dense, where the x86 CPU has avx512vnni
        PackInt8ConvX86(target),  # int8 conv2d: im2col + the VNNI dense kernel
        PackInt8BatchMatmulX86(target),  # int8 activation x activation (attention)
        PackInt8DenseARM(target),  # sdot, or a NEON fallback, on aarch64
        FoldBatchNorm(),  # float convs: batch_norm into the weight, so the conv stays NHWC
        PackFloatConv(target),  # float conv2d: register-blocked NHWC kernel (SIMD CPUs)
        PackFloatDense(target),  # float matmuls with a constant weight, the same kernel
        PackFloatBatchMatmul(target),  # float attention matmuls (x86): the same kernel, batched
        PackDecodedDense(target),  # w8 / w4 matmul weights, decoded in the kernel
        QuantizedSoftmax(),  # a softmax quantized per tensor (int8 attention): one kernel
        SafeSoftmax(),  # PyTorch SDPA's softmax with 0 for fully masked rows: one kernel
        QuantizeByMultiply(),  # quantize by a constant scale: x * (1/s), no divide per element
        FastRowQuantize(target),  # dynamic int8's row quantize: no divide per value (x86 FMA)
        UseFastMath(),  # vectorizable exp / erf / tanh: softmax and GELU
        PackImageNHWC(target),  # a CNN's NCHW input image to padded NHWC: one vector kernel
    ]


def schedule_and_lower(target: tvm.target.Target) -> tvm.transform.Pass:
    """Phase 4: default schedules for kernels not yet scheduled, then TVM's lowering."""
    return _cuda_tail(target) if target.kind.name == "cuda" else _cpu_tail(target)


def _cpu_fusion(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """TVM's CPU pipeline up to scheduling (unlike ``relax.build``'s default, it fuses).

    First, int8 dense layers become tvmq's pre-packed kernels: VNNI where the x86 CPU has
    avx512vnni, sdot (or a NEON fallback) on aarch64; TVM's default int8 lowering is slower
    than float.
    """
    return [
        *target_kernel_passes(target),
        *cpu.library_dispatch_passes(target),
        *cpu.legalize_passes(target),  # LegalizeOps, FoldConstant, FuseOps, FuseTIR
    ]


def _cpu_tail(target: tvm.target.Target) -> tvm.transform.Pass:
    """tvmq's default schedule for kernels not yet scheduled, then TVM's CPU lowering."""
    return tvm.transform.Sequential(
        [
            dl.ApplyDefaultSchedule(CPUDefaultSchedule()),
            *cpu.dataflow_lower_passes(target),
            *cpu.finalize_passes(target),
        ],
        name="tvmq_cpu_build",
    )


def _cuda_fusion(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """TVM's CUDA pipeline up to scheduling.

    First, int8 dense layers become tvmq's dp4a kernels (sm_61 and newer): dlight has no
    working int8 matmul rule in TVM 0.27, and its Fallback rule is slow.
    """
    return [
        *target_kernel_passes(target),
        *cuda.library_dispatch_passes(target),
        # The stock CUDA legalize phase, unrolled so the dlight rules can be swapped (below).
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def _cuda_tail(target: tvm.target.Target) -> tvm.transform.Pass:
    """The dlight GPU rules, with Matmul kept off integer matmuls, then TVM's CUDA lowering."""
    return tvm.transform.Sequential(
        [
            dl.ApplyDefaultSchedule(
                _FloatMatmul(),
                dl.gpu.GEMV(),
                dl.gpu.Reduction(),
                dl.gpu.GeneralReduction(),
                dl.gpu.Fallback(),
            ),
            *cuda.dataflow_lower_passes(target),
            *cuda.finalize_passes(target),
        ],
        name="tvmq_cuda_build",
    )


class _FloatMatmul(dl.ScheduleRule):
    """dlight's GPU Matmul rule, declined for matmuls that accumulate in an integer type.

    TVM 0.27's rule crashes on int8 x int8 -> int32 (InternalError in
    inject_software_pipeline / GetWmmaFragmentSize); declining lets the next rule schedule it.
    """

    def __init__(self) -> None:
        self._matmul = dl.gpu.Matmul()

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        for info in normalize_prim_func(sch) or []:
            written = sch.get(info.block_rv).writes
            if info.is_reduction() and written and "int" in str(written[0].source.dtype):
                return None
        return self._matmul.apply(func, target, tunable)
