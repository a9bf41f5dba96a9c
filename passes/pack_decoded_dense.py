"""PackDecodedDense: matmuls with an int8 / int4 / clustered weight -> a kernel that decodes it.

``QuantizeWeightOnly`` (w8 / w4) and ``ClusterWeights`` store a weight compressed and
decode it in the graph, through a private decoder function, on every call: the decoded
float weight is written to memory and read back by a default-scheduled matmul, slower than
the float model. On LLVM CPU targets with SIMD this pass rewrites::

    w = tvmq_wdq_matmul_0(Q, S[, Z])          # or tvmq_cluster_*(codebook, indices)
    y = R.matmul(x, [permute_dims / reshape of] w)

into a call of :func:`tvmq.kernels.cpu_decoded_dense.decoded_dense`, which reads the
codes (repacked at compile time into ``[N/L, K', L]``, 8-bit or two 4-bit codes a byte)
and decodes each weight panel once per call inside the kernel, next to the multiply-adds::

    x2 = reshape(x, (M, K))  [+ nn.pad of M up to the register tile]
    y2 = call_tir(decoded_dense, x2, codes, S[, Z] | codebook)
    y  = reshape(strided_slice(y2), (..., N))

The library keeps the compressed size; the result equals the graph decoder's float weight
times ``x`` up to float summation order. Left alone: conv2d weights, weights that are not a
decoder's output (or a ``permute_dims`` / ``reshape`` of it), symbolic shapes, non-LLVM
targets. Where it belongs: a target kernel pass, after quantization (the decoders are then
unused and removed).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvmq.kernels.cpu_decoded_dense import DecodedWeight, decoded_dense, pack_codes
from tvmq.kernels.cpu_float_conv import choose_conv_tiles, simd_lanes_and_registers
from tvmq.kernels.x86_int8_conv import OPAQUE

from ._int8_dense import rewrite_functions
from .cluster_weights import unpack_indices
from .quantize_weight_only import DECODER_ATTR, unpack_int4
from .relax_utils import MATMUL, apply_layout, is_tensor_const, static_shape, view_source

_MATMUL = tvm.ir.Op.get(MATMUL)


def _padded(a: np.ndarray, n: int) -> np.ndarray:
    return np.pad(a, ((0, 0), (0, n - a.shape[1])))


def decoded_matrix(args: list[np.ndarray], out_shape, steps, k: int):
    """``(codes [K, N], DecodedWeight, float arrays)`` of a decoder's constant ``args``.

    ``out_shape`` is the decoder's result shape, ``steps`` the ``permute_dims`` / ``reshape``
    view of it the matmul reads as ``[K, N]``. None for a decoder this kernel cannot read.
    """
    if len(args) == 2 and args[0].dtype == np.float32 and args[0].ndim == 1:
        codebook, packed = args  # ClusterWeights: codebook + flat indices
        bits = int(math.log2(codebook.size)) if codebook.size > 1 else 1
        if 2**bits != codebook.size or packed.dtype != np.uint8:
            return None
        idx = unpack_indices(packed, bits, math.prod(out_shape)).reshape(out_shape)
        codes = apply_layout(idx, steps)
        fmt = DecodedWeight("table", 4 if bits <= 4 else 8, table_size=codebook.size)
        return codes, fmt, [codebook]
    if steps or len(args) not in (2, 3) or len(out_shape) != 2:
        return None  # QuantizeWeightOnly's matmul decoder returns [K, N] itself
    q, scale, *zp = args
    if q.ndim != 2 or q.dtype not in (np.int8, np.uint8) or scale.ndim != 2:
        return None
    bits = 8 if q.shape[0] == k else 4
    if bits == 4:
        if q.shape[0] != (k + 1) // 2:
            return None
        q = unpack_int4(q, 0, k)
    if k % scale.shape[0]:
        return None
    zero = zp[0].astype(np.float32) if zp else None
    offset = 0
    if bits == 4 and q.dtype == np.int8:  # signed nibbles: stored as q + 8, decoded minus 8
        q, offset = (q.astype(np.int16) + 8).astype(np.uint8), 8
    fmt = DecodedWeight("affine", bits, str(q.dtype), scale.shape[0], zero is not None, offset)
    return q, fmt, [scale] if zero is None else [scale, zero]


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, lanes: int, registers: int):
        super().__init__(mod)
        self.mod = mod
        self.lanes, self.registers = lanes, registers
        self.kernels: dict[tuple, tvm.ir.GlobalVar] = {}
        self.changed = False

    def _is_decoder_call(self, expr: relax.Expr) -> bool:
        if not isinstance(expr, relax.Call) or not isinstance(expr.op, tvm.ir.GlobalVar):
            return False
        func = self.mod.functions.get(expr.op) if expr.op in self.mod.functions else None
        return (
            isinstance(func, relax.Function)
            and func.attrs is not None
            and DECODER_ATTR in func.attrs
            and all(is_tensor_const(a) for a in expr.args)
        )

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call, relax.Call) or not call.op.same_as(_MATMUL):
            return call
        x, w = call.args
        x_shape = static_shape(x)
        if x_shape is None or len(x_shape) < 2 or str(getattr(x.ty, "dtype", "")) != "float32":
            return call
        found = view_source(w, self.lookup_binding, self._is_decoder_call)
        w_shape = static_shape(w)
        if found is None or w_shape is None or len(w_shape) != 2 or w_shape[0] != x_shape[-1]:
            return call
        decoder, steps = found
        out_shape = static_shape(decoder)
        if out_shape is None or x_shape[-1] < 2:
            return call
        args = [a.value.numpy() for a in decoder.args]
        matrix = decoded_matrix(args, out_shape, steps, x_shape[-1])
        if matrix is None:
            return call
        self.changed = True
        return self._lower(x, x_shape, w_shape[1], *matrix)

    def _lower(self, x, x_shape, n: int, codes, fmt: DecodedWeight, floats) -> relax.Expr:
        return emit_decoded_dense(
            self.builder_, self._kernel_var, x, x_shape, n, codes, fmt, floats,
            self.lanes, self.registers,
        )  # fmt: skip

    def _kernel_var(self, key: tuple, name: str, build) -> tvm.ir.GlobalVar:
        if key not in self.kernels:
            self.kernels[key] = self.builder_.add_func(build(), name)
        return self.kernels[key]


def emit_decoded_dense(
    bb, kernel_var, x, x_shape, n: int, codes, fmt: DecodedWeight, floats, lanes, registers
) -> relax.Expr:
    """Emit ``x @ W`` on :func:`~tvmq.kernels.cpu_decoded_dense.decoded_dense` for a weight
    given as its ``[K, N]`` ``codes`` in format ``fmt`` (and the ``floats`` it decodes with);
    ``kernel_var(key, name, build)`` adds a kernel once per key (:meth:`KernelRewriter.kernel_var`)."""
    k, m = x_shape[-1], math.prod(x_shape[:-1])
    tiles = choose_conv_tiles(m, n, lanes, registers)
    x = bb.emit(relax.op.reshape(x, (m, k)))
    if tiles.ow_padded != m:
        x = bb.emit(relax.op.nn.pad(x, [0, tiles.ow_padded - m, 0, 0]))
    label = fmt.fmt if fmt.fmt == "bf16" else f"{fmt.fmt}{fmt.bits}"
    kernel = kernel_var(
        (tiles, k, fmt),
        f"tvmq_decoded_dense_{label}_{tiles.ow_padded}x{k}x{tiles.o_padded}",
        lambda: decoded_dense(tiles.ow_padded, k, tiles, fmt).with_attr("op_pattern", OPAQUE),
    )
    packed = pack_codes(codes, lanes, tiles.o_padded, fmt.bits)
    extra = floats if fmt.fmt == "table" else [_padded(f, tiles.o_padded) for f in floats]
    consts = [relax.const(packed, str(packed.dtype))]
    consts += [relax.const(np.ascontiguousarray(f, np.float32), "float32") for f in extra]
    out_ty = relax.TensorType((tiles.ow_padded, tiles.o_padded), "float32")
    y = bb.emit(relax.call_tir(kernel, [x, *consts], out_ty=out_ty))
    if tiles.ow_padded != m or tiles.o_padded != n:
        y = bb.emit(relax.op.strided_slice(y, axes=[0, 1], begin=[0, 0], end=[m, n]))
    return relax.op.reshape(y, (*x_shape[:-1], n))


@tvm.transform.module_pass(opt_level=0, name="PackDecodedDense")
class PackDecodedDense:
    """Matmuls reading a ``QuantizeWeightOnly`` / ``ClusterWeights`` decoder's weight ->
    tvmq's decode-in-kernel dense kernel (``target`` as in :class:`~tvmq.passes.PackFloatDense`)."""

    def __init__(self, target: tvm.target.Target | dict | str | None = None):
        self.target = tvm.target.Target(target) if target is not None else None

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        simd = simd_lanes_and_registers(self.target)
        if simd is None:
            return mod
        with self.target or contextlib.nullcontext():  # tiles follow the target's CPU
            out = rewrite_functions(mod, _Rewriter(mod, *simd), relax.analysis.remove_all_unused)
        # the decoders the kernels replaced are no longer called: drop them
        return out if out.same_as(mod) else relax.transform.DeadCodeElimination()(out)
