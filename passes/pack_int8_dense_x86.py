"""PackInt8DenseX86: int8 matmuls with a constant weight -> a VNNI kernel on a packed weight.

Rewrites, when the target has ``avx512vnni``::

    y = R.matmul(x, W, out_dtype="int32")   # x: (..., K) uint8 or int8
                                            # W: (K, N) int8 relax.Constant

into a ``call_tir`` to :func:`tvmq.kernels.int8_dense_vnni` with ``W`` packed at compile
time as ``[N/16, K/4, 16, 4]`` (zero-padded to multiples of 4 / 16). Around the call:
leading dimensions of ``x`` are flattened (``reshape``); ``K`` is padded with a
``nn.pad`` (any value works, the padded weight rows are 0); ``M`` is padded when the
VNNI register tile does not divide it (the AMX kernel takes any M of one step's 16 or 32
rows and more as is); a ``strided_slice`` drops the padding of the result.
A symbolic ``M`` (dynamic batch / sequence) gets the same kernel with a run-time row count
(:func:`tvmq.kernels.x86_int8.int8_dense_vnni_rows`): rows padded to a multiple of 8 by a
``concat`` of zeros, the number of 8-row tiles passed as a scalar.

When the matmul's result only feeds ``LowerInt8``'s float requantize (per-column offset add,
ReLU, ``astype``, per-column multiply, ``quantize(scale=1)``, clip; or a dequantize to float32:
:func:`~tvmq.passes._int8_dense.find_dense_epilogues`), the kernel computes it before its
store (:class:`tvmq.kernels.x86_int8.Requantize`): one kernel instead of about five, the
int32 sums never go to memory, and the result is bit-identical.

A ``QuantizeDynamic`` layer (:mod:`~tvmq.passes.dynamic_epilogue`) on the VNNI kernel stores
its dequantize, bias and ReLU the same way, and where its ``x_q`` is the quantize of a float32
``x`` the kernel reads ``x`` and computes each row's range, scale, zero point and bytes itself
(:class:`tvmq.kernels.x86_int8.RowQuantize`, kernels named ``..._dynamic_quantize``): one
kernel per layer instead of three (``row_qparams_u8``, the quantize, the dense), bit-identical.
It does so where that pays (:func:`~tvmq.kernels.x86_int8.quantize_pays`: the row tiles are
its parallel tasks); a parallel GEMV keeps reading the uint8 row.

Signed activations: ``vpdpbusd`` multiplies *unsigned* by signed bytes, so an int8 ``x``
is shifted to uint8 (``x + 128``) before the kernel and the kernel adds the constant
compensation ``-128 * colsum(W)`` (an int32 per column) to the result; the answer is the
exact int8 x int8 product. Everything else (float matmuls, non-constant or non-int8
weights, batched weights, a symbolic K, other out dtypes) is left alone.

Where it belongs: after :class:`LowerInt8` and before ``LegalizeOps`` (it emits Relax
ops such as ``pad`` / ``strided_slice`` that still need legalizing, and ``LegalizeOps``
would otherwise lower the matmul itself). The kernels are marked ``tirx.is_scheduled``,
so dlight / MetaSchedule keep their schedule. Without avx512vnni in the target (or off
x86, or for a non-LLVM target) the module is returned unchanged; after a rewrite no int8
matmul is left, so running the pass again changes nothing.
"""

from __future__ import annotations

import tvm

from tvmq.kernels.x86_amx import x86_int8_dense
from tvmq.kernels.x86_int8 import (
    DynamicDequantize,
    Requantize,
    int8_dense_vnni_rows,
    pack_weight_vnni,
    quantize_pays,
)

from ._int8_dense import DenseKernel, rewrite_int8_dense


def llvm_target_has(target: tvm.target.Target | None, *features: str) -> bool:
    """True for an LLVM target whose CPU / attributes include every one of ``features``."""
    if target is None or target.kind.name != "llvm":
        return False
    try:
        return all(tvm.target.codegen.target_has_features(f, target) for f in features)
    except (RuntimeError, ValueError):  # e.g. a triple LLVM does not know
        return False


def target_has_vnni(target: tvm.target.Target | None) -> bool:
    """True for an LLVM x86 target whose CPU / attributes include ``avx512vnni``."""
    return llvm_target_has(target, "avx512vnni")


def _kernel(amx: bool) -> DenseKernel:
    """The x86 dense kernel: VNNI, or AMX tiles for M >= 16 where the target has AMX."""

    def plan(m: int, k: int, n: int):
        choice = x86_int8_dense(m, k, n, amx)
        return choice.m_padded, choice.k_padded, choice.n_padded, choice

    return DenseKernel(
        name="vnni",
        operand_dtype="uint8",  # vpdpbusd and tdpbusd multiply unsigned by signed bytes
        plan=plan,
        pack=lambda w, kp, np_: pack_weight_vnni(w, kp),
        build=lambda m, k, n, choice, with_offset, **kw: choice.build(with_offset, **kw),
        build_rows=lambda k, n, with_offset, **kw: int8_dense_vnni_rows(
            k, n, with_offset=with_offset, **kw
        ),
        label=lambda choice: choice.name,
        # LowerInt8's requantize in either kernel, QuantizeDynamic's dequantize in VNNI's
        epilogues=lambda choice: (Requantize,) + ((DynamicDequantize,) if not choice.amx else ()),
        gemv_rows=8,  # one row tile: int8 x flipped in registers, exact columns stored
        exact_rows=lambda choice: choice.amx is None,  # AMX's last row block overlaps instead
        # a dynamic layer's row range and quantize in the VNNI kernel, where that pays
        quantizes=lambda choice: (
            choice.amx is None and quantize_pays(choice.m_padded, choice.k_padded, choice.n_padded)
        ),
    )


def target_has_amx(target: tvm.target.Target | None) -> bool:
    """True for an LLVM x86 target with AMX int8 tiles (``amx-tile`` and ``amx-int8``)."""
    return llvm_target_has(target, "avx512vnni", "amx-tile", "amx-int8")


class VNNIPass:
    """Base of the x86 VNNI passes: a no-op unless the target has avx512vnni, else
    ``self.rewrite(mod)``.

    Parameters
    ----------
    target : tvm.target.Target or dict or str, optional
        The build target. Defaults to ``tvm.target.Target.current()`` when the pass runs;
        with neither, or without ``avx512vnni``, the pass is a no-op.
    """

    def __init__(self, target: tvm.target.Target | dict | str | None = None):
        self.target = tvm.target.Target(target) if target is not None else None

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = self.target or tvm.target.Target.current(allow_none=True)
        if not target_has_vnni(target):
            return mod
        with target:  # the kernels' tiles follow the CPU (x86_int8.choose_tiles)
            return self.rewrite(mod, amx=target_has_amx(target))

    def rewrite(self, mod: tvm.IRModule, amx: bool) -> tvm.IRModule:
        """``mod`` on the VNNI kernels (``amx``: the target has AMX int8 tiles too)."""
        raise NotImplementedError


@tvm.transform.module_pass(opt_level=0, name="PackInt8DenseX86")
class PackInt8DenseX86(VNNIPass):
    """Lower ``matmul(int8/uint8 x, const int8 W, out_dtype=int32)`` to a VNNI kernel
    (``target``: see :class:`VNNIPass`)."""

    def rewrite(self, mod: tvm.IRModule, amx: bool) -> tvm.IRModule:
        return rewrite_int8_dense(mod, _kernel(amx))
