"""QuantizeWeightOnly: int8 / int4 weights, dequantized to float in the graph (float compute).

Weight-only quantization (``tvmq.quantization.WeightOnly``), on a float Relax module before
``LegalizeOps``. Every quantizable site (see ``tvmq.passes.sites.list_weight_sites``: a float32
``matmul(x, W)`` with a constant 2-D ``W``, or an NCHW/OIHW ``conv2d``) that is not skipped
has its weight replaced by a call to a small private *decoder* function::

    y = matmul(x, permute_dims(C))                       # C: float32 [N, K] constant
    ==>
    w = tvmq_wdq_matmul_0(Q, S[, Z])                     # Q int8/uint8, S float32, Z float32
    y = matmul(x, w)

``Q`` holds the integer weight in the layout the op reads (``[K, N]`` for matmul, OIHW for
conv2d), or, for ``bits=4``, two 4-bit values a byte along the reduction axis (rows ``i``
and ``i + ceil(R/2)`` in the low and high nibble). Scales are per output channel
(``group_size=None``) or per group of ``group_size`` consecutive reduction elements
(``K`` for matmul, ``I*kh*kw`` for conv2d); a weight whose reduction length is not a
multiple of ``group_size`` falls back to per-channel scales. The decoder computes
``(float(q) - z) * s``, exactly :func:`tvmq.core.qmath.dequantize` per group.

Why a function: ``FoldConstant`` (in tvmq's CPU and CUDA builds, after ``LegalizeOps``)
evaluates any ``call_tir`` whose arguments are all constants, so a dequantize written
inline in ``main`` would be folded back into a float constant and the library would not
shrink. ``FoldConstant`` never evaluates a call to a Relax function, and inside the decoder
the weights are parameters, not constants. Nothing in the stock pipelines inlines private
functions; a pipeline that does (``InlinePrivateFunctions``) must run ``FoldConstant``
before it or not at all. Each decoder carries the attribute ``"tvmq.weight_decoder"``
and ``main`` records what was quantized in ``"tvmq.weight_only"``.

Limits: float32 weights only; the decoder runs on every call (it materialises the float
weight) unless a target kernel pass replaces it: on SIMD CPUs :class:`PackDecodedDense`
decodes matmul weights inside its matmul kernel. A rewritten op is no
longer a site, so a second run changes nothing; site names stay those of the float model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvmq.core import qmath
from tvmq.core.schemes import GROUP_SIZES, WEIGHT_BITS
from tvmq.errors import TvmqError

from .relax_utils import (
    binding_map,
    op_name,
    ordered_bindings,
    relax_functions,
    resolve,
    site_prefix,
)
from .sites import SITE_OPS, WeightSite, list_weight_sites, site_of_call, site_skipped

ATTR = "tvmq.weight_only"
DECODER_ATTR = "tvmq.weight_decoder"
DECODER_PREFIX = "tvmq_wdq_"


# --------------------------------------------------------------------------------------
# numpy reference: quantize, pack, dequantize


def _as_matrix(w: np.ndarray, kind: str) -> tuple[np.ndarray, int]:
    """(2-D view of the weight, reduction axis of that view): [K, N] / axis 0, [O, I*kh*kw] / 1."""
    if kind == "matmul":
        return w, 0
    return w.reshape(w.shape[0], -1), 1


def quantize_weight(
    w: np.ndarray,
    kind: str,
    bits: int = 8,
    group_size: int | None = None,
    symmetric: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int | None]:
    """Quantize a float weight per output channel or per group along the reduction axis.

    Parameters
    ----------
    w : numpy.ndarray
        ``[K, N]`` (matmul) or ``[O, I, kh, kw]`` (conv2d) float weight.
    kind : {"matmul", "conv2d"}
    bits : {8, 4}
    group_size : int, optional
        Reduction elements per scale; None (or not dividing the reduction length) for one
        scale per output channel.
    symmetric : bool
        Signed values with zero point 0 (``[-127, 127]`` / ``[-7, 7]``), else unsigned
        values with a zero point per group (``[0, 255]`` / ``[0, 15]``).

    Returns
    -------
    q : numpy.ndarray
        Integer weight, same shape as ``w`` (int8 storage if symmetric, else uint8).
    scale : numpy.ndarray
        float32, ``[G, N]`` (matmul) or ``[O, G]`` (conv2d); ``G = 1`` per channel.
    zero_point : numpy.ndarray or None
        int32 like ``scale``; None when symmetric.
    group_size : int or None
        The group size used (None: per channel).
    """
    m, raxis = _as_matrix(np.asarray(w, dtype=np.float32), kind)
    r = m.shape[raxis]
    g = group_size if group_size is not None and r % group_size == 0 else None
    size = r if g is None else g
    # [groups, size, C] with the reduction split in groups, channels last.
    mc = m if raxis == 0 else m.T
    grouped = mc.reshape(r // size, size, mc.shape[1]).astype(np.float64)
    lo, hi = grouped.min(axis=1), grouped.max(axis=1)
    dtype = f"{'' if symmetric else 'u'}int{bits}"
    scale, zp = qmath.choose_qparams(lo.ravel(), hi.ravel(), dtype, symmetric, axis=0)
    scale = np.where((lo.ravel() == 0) & (hi.ravel() == 0), np.float32(1.0), scale)
    scale = scale.astype(np.float32).reshape(lo.shape)
    zp = zp.reshape(lo.shape)
    q = np.clip(
        np.rint(grouped.astype(np.float32) / scale[:, None, :]) + zp[:, None, :],
        *qmath.qrange(dtype),
    )
    q = q.reshape(mc.shape).astype(np.int8 if symmetric else np.uint8)
    if raxis == 1:
        q, scale, zp = q.T, scale.T, zp.T
    q = np.ascontiguousarray(q).reshape(w.shape)
    return (
        q,
        np.ascontiguousarray(scale),
        None if symmetric else np.ascontiguousarray(zp).astype(np.int32),
        g,
    )


def dequantize_weight(
    q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, kind: str
) -> np.ndarray:
    """Inverse of :func:`quantize_weight`: ``(q - z) * s`` per group, float32, shape of ``q``."""
    m, raxis = _as_matrix(q, kind)
    s = scale if raxis == 0 else scale.T  # [G, C]
    z = np.zeros_like(s, dtype=np.int64) if zero_point is None else zero_point
    z = z if raxis == 0 else z.T
    mc = m if raxis == 0 else m.T
    groups = s.shape[0]
    grouped = mc.reshape(groups, -1, mc.shape[1]).astype(np.int64) - z[:, None, :]
    out = (grouped.astype(np.float32) * s[:, None, :].astype(np.float32)).reshape(mc.shape)
    if raxis == 1:
        out = out.T
    return np.ascontiguousarray(out).reshape(q.shape).astype(np.float32)


def pack_int4(q: np.ndarray, axis: int) -> np.ndarray:
    """Two 4-bit values a byte along `axis`: element ``i`` low nibble, ``i + ceil(n/2)`` high.

    Signed input (int8 in [-8, 7]) gives int8 bytes, unsigned (uint8 in [0, 15]) uint8 bytes;
    an odd length is padded with one zero.
    """
    q = np.moveaxis(np.asarray(q), axis, 0)
    n = q.shape[0]
    half = (n + 1) // 2
    padded = np.zeros((2 * half, *q.shape[1:]), dtype=np.uint8)
    padded[:n] = q.astype(np.uint8) & 15
    packed = (padded[:half] | (padded[half:] << 4)).astype(np.uint8)
    if q.dtype == np.int8:
        packed = packed.view(np.int8)
    return np.ascontiguousarray(np.moveaxis(packed, 0, axis))


def unpack_int4(packed: np.ndarray, axis: int, length: int) -> np.ndarray:
    """Inverse of :func:`pack_int4` (the numpy reference of the graph decoder)."""
    p = np.moveaxis(np.asarray(packed), axis, 0)
    if p.dtype == np.int8:
        lo = (p << 4).astype(np.int8) >> 4  # arithmetic shifts sign-extend the nibble
        hi = p >> 4
    else:
        lo, hi = p & 15, p >> 4
    out = np.concatenate([lo, hi], axis=0)[:length]
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


# --------------------------------------------------------------------------------------
# Sites with names stable across runs


def is_decoded_weight(expr: relax.Expr, bindings, mod: tvm.IRModule) -> bool:
    """Whether `expr` is the result of a call to a weight decoder of this pass."""
    call = resolve(expr, bindings)
    if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.GlobalVar):
        return False
    func = mod.functions.get(call.op) if call.op in mod.functions else None
    return func is not None and func.attrs is not None and DECODER_ATTR in func.attrs


def stable_sites(func: relax.Function, prefix: str, is_done) -> list[WeightSite]:
    """``list_weight_sites`` with names counting ops already rewritten (``is_done(call, bindings)``).

    A quantization pass that rewrites a site makes it stop being one; counting the
    rewritten ops keeps the other sites' names (``matmul_1``) those of the float model.
    """
    bindings = binding_map(func)
    by_call = {s.call: s for s in list_weight_sites(func, prefix)}
    out, index = [], 0
    for b in ordered_bindings(func):
        value = b.value
        kind = SITE_OPS.get(op_name(value))
        if kind is None:
            continue
        if site_of_call(value, bindings) is None and not is_done(value, bindings):
            continue
        site = by_call.get(value)
        if site is not None:
            out.append(dataclasses.replace(site, index=index, name=f"{prefix}{kind}_{index}"))
        index += 1
    return out


# --------------------------------------------------------------------------------------
# The pass


@dataclasses.dataclass
class _Plan:
    site: WeightSite
    decoder: relax.Function
    args: list[relax.Expr]
    record: dict


def _decoder(
    q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, kind: str, bits: int, shape
) -> tuple[relax.Function, list[relax.Expr]]:
    """A private Relax function turning the stored constants into the float weight."""
    raxis = 0 if kind == "matmul" else 1
    m, _ = _as_matrix(q, kind)
    rows = m.shape[raxis]
    stored = pack_int4(m, raxis) if bits == 4 else m
    dtype = str(stored.dtype)
    args = [relax.const(stored, dtype), relax.const(scale, "float32")]
    params = [
        relax.Var("q", relax.TensorType(stored.shape, dtype)),
        relax.Var("scale", relax.TensorType(scale.shape, "float32")),
    ]
    if zp is not None:
        args.append(relax.const(zp.astype(np.float32), "float32"))
        params.append(relax.Var("zero_point", relax.TensorType(zp.shape, "float32")))
    bb = relax.BlockBuilder()
    with bb.function("decoder", params, {DECODER_ATTR: True}, private=True):
        with bb.dataflow():
            p = params[0]
            if bits == 4:
                four = relax.const(4, dtype)
                if dtype == "int8":
                    # Arithmetic right shifts of int8 sign-extend each nibble.
                    lo = bb.emit(relax.op.right_shift(relax.op.left_shift(p, four), four))
                else:
                    lo = bb.emit(relax.op.bitwise_and(p, relax.const(15, dtype)))
                hi = bb.emit(relax.op.right_shift(p, four))
                p = bb.emit(relax.op.concat([lo, hi], axis=raxis))
                if 2 * stored.shape[raxis] != rows:
                    p = bb.emit(relax.op.strided_slice(p, axes=[raxis], begin=[0], end=[rows]))
            groups = scale.shape[0] if raxis == 0 else scale.shape[1]
            channels = m.shape[1 - raxis]
            # [G, R/G, C] (matmul) or [C, G, R/G] (conv2d): each scale broadcasts over a group.
            if raxis == 0:
                gshape, sshape = [groups, rows // groups, channels], [groups, 1, channels]
            else:
                gshape, sshape = [channels, groups, rows // groups], [channels, groups, 1]
            w = bb.emit(relax.op.astype(p, "float32"))
            if groups > 1:
                w = bb.emit(relax.op.reshape(w, gshape))
            if zp is not None:
                z = params[2] if groups == 1 else bb.emit(relax.op.reshape(params[2], sshape))
                w = bb.emit(relax.op.subtract(w, z))
            s = params[1] if groups == 1 else bb.emit(relax.op.reshape(params[1], sshape))
            w = bb.emit(relax.op.multiply(w, s))
            out = bb.emit_output(relax.op.reshape(w, list(shape)))
        bb.emit_func_output(out)
    return bb.get()["decoder"], args


@mutator
class _Rewriter(PyExprMutator):
    """Replaces each planned op's weight by a call to its decoder (added to the module)."""

    def __init__(
        self, mod: tvm.IRModule, plans: dict[relax.Call, tuple[str, relax.Function, list]]
    ):
        super().__init__(mod)
        self.plans = plans

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        plan = self.plans.get(call)
        if plan is None:
            return super().visit_call_(call)
        name, decoder, args = plan
        gv = self.builder_.add_func(decoder, name)
        x = self.visit_expr(call.args[0])
        w = self.builder_.emit(relax.Call(gv, args))
        return relax.Call(call.op, [x, w], call.attrs, call.ty_args, call.span)


@tvm.transform.module_pass(opt_level=0, name="QuantizeWeightOnly")
class QuantizeWeightOnly:
    """Store constant matmul / conv2d weights as int8 or packed int4 with float dequantize.

    Parameters
    ----------
    bits : {8, 4}
        Weight bits.
    group_size : {None, 32, 64, 128}
        One scale per group of this many reduction elements; None: per output channel.
    symmetric : bool
        Zero point 0; else asymmetric with a zero point per group or channel.
    skip : sequence of str
        Sites to leave float (site names, fnmatch patterns or op kinds).
    """

    def __init__(
        self,
        bits: int = 8,
        group_size: int | None = None,
        symmetric: bool = True,
        skip: Sequence[str] = (),
    ):
        if bits not in WEIGHT_BITS or isinstance(bits, bool):
            raise TvmqError(f"QuantizeWeightOnly bits must be one of {WEIGHT_BITS}, got {bits!r}")
        if group_size is not None and (
            group_size not in GROUP_SIZES or isinstance(group_size, bool)
        ):
            raise TvmqError(
                f"QuantizeWeightOnly group_size must be None or one of {GROUP_SIZES}, "
                f"got {group_size!r}"
            )
        self.bits, self.group_size, self.symmetric = bits, group_size, bool(symmetric)
        self.skip = (skip,) if isinstance(skip, str) else tuple(skip)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        sc = self
        taken = {gv.name_hint for gv in mod.get_global_vars()}
        work: dict = {}
        for gv, func in relax_functions(mod):
            if func.attrs is not None and DECODER_ATTR in func.attrs:
                continue
            plans, records = {}, {}

            def done(call, bindings):
                return is_decoded_weight(call.args[1], bindings, mod)

            for site in stable_sites(func, site_prefix(gv), done):
                if site_skipped(site, sc.skip):
                    continue
                q, scale, zp, g = quantize_weight(
                    site.weight, site.kind, sc.bits, sc.group_size, sc.symmetric
                )
                decoder, args = _decoder(q, scale, zp, site.kind, sc.bits, site.weight.shape)
                base = name = DECODER_PREFIX + site.name.replace("/", "_")
                i = 1
                while name in taken:
                    name, i = f"{base}_{i}", i + 1
                taken.add(name)
                plans[site.call] = (name, decoder, args)
                records[site.name] = {
                    "bits": sc.bits,
                    "group_size": g or 0,
                    "symmetric": sc.symmetric,
                    "bytes_before": int(site.weight.nbytes),
                    "bytes_after": sum(int(a.value.numpy().nbytes) for a in args),
                }
            if plans:
                work[gv] = (func, plans, records)
        if not work:
            return mod
        all_plans = {c: p for _, plans, _ in work.values() for c, p in plans.items()}
        rewriter = _Rewriter(mod, all_plans)
        new_funcs = {}
        for gv, (func, _, records) in work.items():
            new = relax.analysis.remove_all_unused(rewriter.visit_expr(func))
            old = dict(func.attrs[ATTR]) if func.attrs is not None and ATTR in func.attrs else {}
            old.update(records)
            new_funcs[gv] = new.with_attr(ATTR, old)
        out = rewriter.builder_.get()
        for gv, func in new_funcs.items():
            out[gv] = func
        return out
