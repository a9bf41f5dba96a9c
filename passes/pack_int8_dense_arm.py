"""PackInt8DenseARM: int8 matmuls with a constant weight -> an AArch64 dot-product kernel.

Rewrites, on an AArch64 LLVM target (``mtriple`` ``aarch64-*``) with NEON::

    y = R.matmul(x, W, out_dtype="int32")   # x: (..., K) int8 or uint8, static shape
                                            # W: (K, N) int8 relax.Constant

into a ``call_tir`` to :func:`tvmq.kernels.arm_int8.int8_dense_arm` with ``W`` packed at
compile time as ``[N/4, K/4, 4, 4]`` (zero-padded to multiples of 4). The kernel's inner
step is ``sdot`` when the target has ``+dotprod`` (Cortex-A76/A78, Pi 5, Jetson Orin CPU);
otherwise (Cortex-A72, Raspberry Pi 4) the same kernel with a plain-NEON step
(``smull`` + ``saddlp`` + ``addp``, :data:`tvmq.kernels.arm_dot_intrin.NEON_4X4`). Around
the call: leading dimensions of ``x`` are flattened (``reshape``); ``K`` is padded with a
``nn.pad`` (the padded weight rows are 0); ``M`` is padded when the register tile does not
divide it; a ``strided_slice`` drops the padding of the result.

Unsigned activations: ``sdot`` multiplies *signed* bytes (``usdot`` needs ``+i8mm``, which
the A76/A78 lack), so a uint8 ``x`` is shifted to int8 (``x - 128``) before the kernel and
the kernel adds the constant compensation ``+128 * colsum(W)`` (an int32 per column); the
answer is the exact uint8 x int8 product. Everything else (float matmuls, non-constant or
non-int8 weights, batched weights, symbolic shapes, other out dtypes) is left alone.

Where it belongs: after :class:`LowerInt8` and before ``LegalizeOps`` (it emits Relax ops
such as ``pad`` / ``strided_slice`` that still need legalizing), next to
:class:`PackInt8DenseX86` (each is a no-op on the other's targets). The kernels are marked
``tirx.is_scheduled``, so dlight / MetaSchedule keep their schedule. For a non-AArch64 or
non-LLVM target the module is returned unchanged; after a rewrite no int8 matmul is left,
so running the pass again changes nothing. int8 ``conv2d`` is not rewritten.
"""

from __future__ import annotations

import tvm

from tvmq.kernels.arm_int8 import (
    Instruction,
    choose_tiles,
    int8_dense_arm,
    pack_weight_arm,
    padded_kn,
)

from ._int8_dense import DenseKernel, rewrite_int8_dense


def arm_int8_instruction(target: tvm.target.Target | None) -> Instruction | None:
    """``"sdot"`` for an AArch64 LLVM target with dotprod, ``"neon"`` for one without, else None."""
    if target is None or target.kind.name != "llvm":
        return None
    triple = str(target.attrs.get("mtriple", "") or "")
    if not triple.startswith(("aarch64", "arm64")):
        return None
    try:
        return "sdot" if tvm.target.codegen.target_has_features("dotprod", target) else "neon"
    except (RuntimeError, ValueError):  # e.g. a triple LLVM does not know
        return None


def _dense_kernel(instruction: Instruction) -> DenseKernel:
    def plan(m: int, k: int, n: int):
        kp, np_ = padded_kn(k, n)
        return choose_tiles(m, np_, instruction).m_padded, kp, np_, None

    def build(m: int, k: int, n: int, _tiles, with_offset: bool):
        # Looked up at call time, so tests can swap in an unscheduled kernel.
        return int8_dense_arm(m, k, n, instruction=instruction, with_offset=with_offset)

    return DenseKernel(
        name=instruction,
        operand_dtype="int8",  # sdot and smull multiply signed by signed bytes
        plan=plan,
        pack=lambda w, kp, np_: pack_weight_arm(w),
        build=build,
    )


@tvm.transform.module_pass(opt_level=0, name="PackInt8DenseARM")
class PackInt8DenseARM:
    """Lower ``matmul(int8/uint8 x, const int8 W, out_dtype=int32)`` to an AArch64 kernel.

    Parameters
    ----------
    target : tvm.target.Target or dict or str, optional
        The build target. Defaults to ``tvm.target.Target.current()`` when the pass runs;
        with neither, or for a target that is not AArch64 LLVM, the pass is a no-op.
    """

    def __init__(self, target: tvm.target.Target | dict | str | None = None):
        self.target = tvm.target.Target(target) if target is not None else None

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = self.target or tvm.target.Target.current(allow_none=True)
        instruction = arm_int8_instruction(target)
        if instruction is None:
            return mod
        return rewrite_int8_dense(mod, _dense_kernel(instruction))
